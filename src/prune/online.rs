//! Self-calibration (the paper's v2 mechanism, made measurable): a share of answered requests
//! is re-run without pruning, and how many of each answer's top K the full run confirms
//! drives the margin rule's parameter.
//!
//! The estimate is the share of top-K members confirmed over a window, with a Wilson score
//! interval (95%). The margin widens at once (x1.5) when the interval's upper end falls below
//! the target (the pruning is surely too aggressive), or when a full window ([`WINDOW`]
//! members) still measures below the target (more samples would not clear it: a margin that
//! sits just under the target must not stay). It narrows by 10% only when the interval's
//! lower end is above the target (surely safe). So the margin settles where the measured
//! agreement is at or a little above the target. Each change starts a new window, so the
//! estimate always describes the margin in force. Members of one answer are not
//! independent, so the interval is narrower than an exact one: it decides when to move, it is
//! not a guarantee.
//!
//! Every re-run also yields movement samples; a model that came without a profile gets its
//! movement from them after [`LEARN_AFTER`] re-runs, starting at a cautious margin; the
//! movement is refreshed from the samples whenever the margin changes.

use super::calibrate::{movements_into, quantile, MOVEMENT_QUANTILE};
use super::PruneConfig;
use std::collections::VecDeque;

/// Re-runs needed before a model without a profile starts pruning.
pub const LEARN_AFTER: usize = 20;
/// The margin a model learned from scratch starts at.
pub const CAUTIOUS_MARGIN: f32 = 2.0;
pub const MIN_MARGIN: f32 = 0.25;
pub const MAX_MARGIN: f32 = 16.0;
/// Most top-K members in the window.
pub const WINDOW: usize = 2000;
/// Movement samples kept per layer (the newest).
const MAX_MOVEMENTS: usize = 50_000;

/// The two-sided 95% Wilson score interval of `successes` out of `trials`.
pub fn wilson(successes: u64, trials: u64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_964f64;
    let n = trials as f64;
    let p = successes as f64 / n;
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// What [`SelfCalibration::record`] changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    None,
    Tightened {
        from: f32,
        to: f32,
    },
    Relaxed {
        from: f32,
        to: f32,
    },
    /// A model without a profile got its movement.
    Learned,
}

/// The running state, as `/metrics` and `/info` show it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Snapshot {
    pub target_agreement: f64,
    /// Top-K members confirmed by the full re-runs in the window, out of those checked.
    pub agreement: f64,
    pub agreement_lower: f64,
    pub agreement_upper: f64,
    pub window_members: u64,
    /// Re-runs recorded since start.
    pub samples: u64,
    pub margin: f32,
    pub movement: Vec<Option<f32>>,
    pub tightened: u64,
    pub relaxed: u64,
}

#[derive(Debug, Clone)]
pub struct SelfCalibration {
    target: f64,
    base: PruneConfig,
    /// (confirmed, K) of each re-run in the window.
    window: VecDeque<(u32, u32)>,
    movements: Vec<VecDeque<f32>>,
    samples: u64,
    tightened: u64,
    relaxed: u64,
}

impl SelfCalibration {
    /// Starts from `base` (the model's rule: its profile, or uncalibrated).
    pub fn new(base: PruneConfig, target: f64) -> SelfCalibration {
        SelfCalibration {
            target,
            base,
            window: VecDeque::new(),
            movements: Vec::new(),
            samples: 0,
            tightened: 0,
            relaxed: 0,
        }
    }

    /// The rule requests should run with now.
    pub fn config(&self) -> &PruneConfig {
        &self.base
    }

    fn counts(&self) -> (u64, u64) {
        self.window
            .iter()
            .fold((0, 0), |(s, n), &(c, k)| (s + c as u64, n + k as u64))
    }

    pub fn snapshot(&self) -> Snapshot {
        let (s, n) = self.counts();
        let (lo, hi) = wilson(s, n);
        Snapshot {
            target_agreement: self.target,
            agreement: if n == 0 { 1.0 } else { s as f64 / n as f64 },
            agreement_lower: lo,
            agreement_upper: hi,
            window_members: n,
            samples: self.samples,
            margin: self.base.margin,
            movement: self.base.movement.clone(),
            tightened: self.tightened,
            relaxed: self.relaxed,
        }
    }

    /// Records one re-run: `answered` is the top K the client got (candidate indices),
    /// `layer_scores` the full run's `[layer][candidate]` scores.
    pub fn record(&mut self, answered: &[usize], layer_scores: &[Vec<f32>]) -> Change {
        let Some(last) = layer_scores.last() else {
            return Change::None;
        };
        let k = answered.len().min(last.len());
        if k == 0 {
            return Change::None;
        }
        self.samples += 1;
        let mut fresh = Vec::new();
        movements_into(layer_scores, &mut fresh);
        self.movements
            .resize(fresh.len().max(self.movements.len()), VecDeque::new());
        for (kept, new) in self.movements.iter_mut().zip(fresh) {
            kept.extend(new);
            while kept.len() > MAX_MOVEMENTS {
                kept.pop_front();
            }
        }
        if self.base.movement.is_empty() {
            if self.samples as usize >= LEARN_AFTER {
                self.refresh_movement();
                self.base.margin = self.base.margin.max(CAUTIOUS_MARGIN);
                self.window.clear();
                return Change::Learned;
            }
            return Change::None;
        }
        let full = super::best_first(last);
        let confirmed = answered[..k]
            .iter()
            .filter(|i| full[..k].contains(i))
            .count();
        self.window.push_back((confirmed as u32, k as u32));
        // Keep at least WINDOW members once there are that many.
        let (mut s, mut n) = self.counts();
        while let Some(&(c, oldest)) = self.window.front() {
            if n - oldest as u64 >= WINDOW as u64 {
                self.window.pop_front();
                s -= c as u64;
                n -= oldest as u64;
            } else {
                break;
            }
        }
        let (lo, hi) = wilson(s, n);
        let below = (s as f64) < self.target * n as f64;
        let from = self.base.margin;
        if (hi < self.target || (n >= WINDOW as u64 && below)) && from < MAX_MARGIN {
            let to = (from * 1.5).min(MAX_MARGIN);
            self.change_margin(to);
            self.tightened += 1;
            Change::Tightened { from, to }
        } else if lo > self.target && from > MIN_MARGIN {
            let to = (from * 0.9).max(MIN_MARGIN);
            self.change_margin(to);
            self.relaxed += 1;
            Change::Relaxed { from, to }
        } else {
            Change::None
        }
    }

    fn change_margin(&mut self, to: f32) {
        self.base.margin = to;
        self.window.clear();
        if self.samples as usize >= LEARN_AFTER {
            self.refresh_movement();
        }
    }

    /// Movement from the samples, keeping layers the base rule switched off switched off.
    fn refresh_movement(&mut self) {
        let learned: Vec<Option<f32>> = self
            .movements
            .iter()
            .map(|m| quantile(m.iter().copied().collect(), MOVEMENT_QUANTILE))
            .collect();
        let off: Vec<bool> = if self.base.movement.is_empty() {
            vec![false; learned.len()]
        } else {
            (0..learned.len())
                .map(|l| self.base.movement.get(l).is_some_and(Option::is_none))
                .collect()
        };
        self.base.movement = learned
            .into_iter()
            .zip(off)
            .map(|(m, off)| if off { None } else { m })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::calibrate::Recording;
    use crate::prune::state::replay;

    #[test]
    fn wilson_brackets_the_share() {
        let (lo, hi) = wilson(99, 100);
        assert!(lo < 0.99 && hi > 0.99 && lo > 0.94, "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        let (lo, _) = wilson(400, 400);
        assert!(lo > 0.99);
    }

    /// Feeds `recs` in a loop as a server would: answer with the current rule, re-run, record.
    /// Returns the margin after each re-run and the answers' agreement.
    pub(crate) fn drive(
        cal: &mut SelfCalibration,
        recs: &[Recording],
        k: usize,
        rounds: usize,
    ) -> Vec<(f32, f64)> {
        let mut trace = Vec::new();
        for i in 0..rounds {
            let r = &recs[i % recs.len()];
            let answer: Vec<usize> = replay(cal.config(), &r.layer_scores, k)
                .ranking
                .iter()
                .map(|x| x.0)
                .collect();
            let full = crate::prune::best_first(r.layer_scores.last().unwrap());
            let agree = answer.iter().filter(|a| full[..k].contains(a)).count() as f64 / k as f64;
            cal.record(&answer, &r.layer_scores);
            trace.push((cal.config().margin, agree));
        }
        trace
    }

    fn synthetic(n: usize, noise: f32, seed: u64) -> Vec<Recording> {
        crate::prune::calibrate::tests::synthetic(n, 40, noise, seed)
    }

    #[test]
    fn an_aggressive_margin_tightens_to_the_target_and_stays() {
        let recs = synthetic(60, 3.0, 7);
        let movement = crate::prune::calibrate::movement(&recs);
        let mut cal = SelfCalibration::new(PruneConfig::margin(movement, 0.25), 0.99);
        let trace = drive(&mut cal, &recs, 10, 600);
        assert!(cal.snapshot().tightened >= 1);
        // Over the last 300 re-runs the answers meet the target.
        let tail: f64 = trace[300..].iter().map(|t| t.1).sum::<f64>() / 300.0;
        assert!(tail >= 0.99, "{tail}");
        assert!(trace[599].0 > 0.25);
    }

    #[test]
    fn a_noisier_stream_makes_it_tighten() {
        let calm = synthetic(60, 1.0, 8);
        let noisy = synthetic(60, 6.0, 9);
        let mut cal = SelfCalibration::new(
            PruneConfig::margin(crate::prune::calibrate::movement(&calm), 1.0),
            0.99,
        );
        drive(&mut cal, &calm, 10, 300);
        let before = cal.config().margin;
        let tightened = cal.snapshot().tightened;
        let trace = drive(&mut cal, &noisy, 10, 400);
        assert!(cal.snapshot().tightened > tightened, "{:?}", cal.snapshot());
        let tail: f64 = trace[200..].iter().map(|t| t.1).sum::<f64>() / 200.0;
        assert!(
            tail >= 0.99,
            "{tail} (margin {before} -> {})",
            cal.config().margin
        );
    }

    #[test]
    fn a_model_without_profile_learns_its_movement() {
        let recs = synthetic(60, 2.0, 10);
        let mut cal = SelfCalibration::new(PruneConfig::default(), 0.99);
        let trace = drive(&mut cal, &recs, 5, LEARN_AFTER - 1);
        assert!(trace.iter().all(|t| t.1 == 1.0));
        assert!(cal.config().movement.is_empty());
        let r = &recs[0];
        let answer: Vec<usize> = (0..5).collect();
        assert_eq!(cal.record(&answer, &r.layer_scores), Change::Learned);
        assert!(cal.config().movement.iter().all(Option::is_some));
        assert_eq!(cal.config().margin, CAUTIOUS_MARGIN);
    }
}
