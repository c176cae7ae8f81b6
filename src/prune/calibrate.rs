//! Calibrating the margin rule on recorded requests, and measuring any rule honestly: out of
//! fold, so that no query ever calibrates the rule it is measured with.
//!
//! A request is recorded once without pruning (every candidate's score after every layer);
//! a candidate's score does not depend on which others are live, so replaying a rule on the
//! record is exactly what the engine would have done ([`super::state::replay`]).

use super::state::replay;
use super::{PruneConfig, PruneMode};
use crate::eval::metrics::topk_agreement;

/// The movement unit is this percentile of the per-candidate movements.
pub const MOVEMENT_QUANTILE: f64 = 0.99;
/// Movements are taken on each request's final top this-many candidates: the ones whose
/// movement decides a top-K boundary (low scorers move more and matter less).
pub const MOVEMENT_TOP: usize = 20;
/// Folds of the out-of-fold reports.
pub const DEFAULT_FOLDS: usize = 5;
/// Margins tried when choosing one, smallest first.
pub const MARGIN_GRID: [f32; 12] = [
    0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0,
];

/// One recorded request: its query (folds are drawn by query) and `[layer][candidate]` scores.
#[derive(Debug, Clone)]
pub struct Recording {
    pub query: String,
    pub layer_scores: Vec<Vec<f32>>,
}

impl Recording {
    /// The same request cut to its first `n` candidates (BM25 order for TREC collections).
    pub fn first(&self, n: usize) -> Recording {
        Recording {
            query: self.query.clone(),
            layer_scores: self
                .layer_scores
                .iter()
                .map(|l| l[..n.min(l.len())].to_vec())
                .collect(),
        }
    }

    fn candidates(&self) -> usize {
        self.layer_scores.first().map_or(0, Vec::len)
    }
}

/// Per-candidate movements after each layer: `|(s_L - s_l) - median_j (s_L - s_l)|` for the
/// request's final top [`MOVEMENT_TOP`], appended to `out[l - 1]`.
pub fn movements_into(layer_scores: &[Vec<f32>], out: &mut Vec<Vec<f32>>) {
    let Some(last) = layer_scores.last() else {
        return;
    };
    let layers = layer_scores.len();
    out.resize(out.len().max(layers.saturating_sub(1)), Vec::new());
    let order = super::best_first(last);
    let top = &order[..MOVEMENT_TOP.min(order.len())];
    for (l, scores) in layer_scores[..layers - 1].iter().enumerate() {
        let mut deltas: Vec<f32> = last.iter().zip(scores).map(|(f, s)| f - s).collect();
        let median = median(&mut deltas.clone());
        for &i in top {
            deltas[i] -= median;
            out[l].push(deltas[i].abs());
        }
    }
}

/// The movement unit of each layer over `recs` ([`MOVEMENT_QUANTILE`] of the movements).
pub fn movement(recs: &[Recording]) -> Vec<Option<f32>> {
    let mut all = Vec::new();
    for r in recs {
        movements_into(&r.layer_scores, &mut all);
    }
    all.into_iter()
        .map(|m| quantile(m, MOVEMENT_QUANTILE))
        .collect()
}

/// The `q` quantile (nearest rank, rounding up: conservative) of `v`; `None` when empty.
pub fn quantile(mut v: Vec<f32>, q: f64) -> Option<f32> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn median(v: &mut [f32]) -> f32 {
    v.sort_by(f32::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The fold of each request: a hash of its query text, so that repeats of a query (common in
/// logged traffic) always share a fold and a query never calibrates itself.
pub fn folds_by_query(recs: &[Recording], folds: usize) -> Vec<usize> {
    recs.iter()
        .map(|r| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in r.query.trim().as_bytes() {
                h ^= *b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            (h % folds.max(1) as u64) as usize
        })
        .collect()
}

/// One request's outcome under a rule: top-K agreement with full inference and the
/// candidate-layers computed out of those possible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub agreement: f64,
    pub computed: usize,
    pub possible: usize,
}

/// Replays `cfg` on one recording at `k`.
pub fn outcome(cfg: &PruneConfig, rec: &Recording, k: usize) -> Outcome {
    outcome_of(&replay(cfg, &rec.layer_scores, k), rec, k)
}

/// The outcome of a replay already made of `rec` at `k`.
pub fn outcome_of(rep: &super::state::Replay, rec: &Recording, k: usize) -> Outcome {
    let last = rec.layer_scores.last().expect("at least one layer");
    let full = super::best_first(last);
    let got: Vec<usize> = rep.ranking.iter().map(|x| x.0).collect();
    Outcome {
        agreement: topk_agreement(&got, &full, k),
        computed: rep.layers_per_candidate.iter().sum(),
        possible: rec.candidates() * rec.layer_scores.len(),
    }
}

/// Out-of-fold results at one (N, K): mean and minimum per-request agreement, compute share.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct HeldOutRow {
    /// Candidates per request (`0`: each request's own count).
    pub candidates: usize,
    pub k: usize,
    pub requests: usize,
    pub agreement: f64,
    pub min_agreement: f64,
    pub compute_share: f64,
}

/// Aggregates per-request outcomes.
pub fn summarize(candidates: usize, k: usize, outcomes: &[Outcome]) -> HeldOutRow {
    let n = outcomes.len().max(1) as f64;
    HeldOutRow {
        candidates,
        k,
        requests: outcomes.len(),
        agreement: outcomes.iter().map(|o| o.agreement).sum::<f64>() / n,
        min_agreement: outcomes.iter().map(|o| o.agreement).fold(1.0, f64::min),
        compute_share: outcomes.iter().map(|o| o.computed).sum::<usize>() as f64
            / outcomes.iter().map(|o| o.possible).sum::<usize>().max(1) as f64,
    }
}

/// The requests cut to `n` candidates (`0`: as they are), keeping those with more than `k`.
pub fn at_size(recs: &[Recording], n: usize, k: usize) -> Vec<Recording> {
    recs.iter()
        .map(|r| if n == 0 { r.clone() } else { r.first(n) })
        .filter(|r| r.candidates() > k)
        .collect()
}

/// For each request, the config `calibrated` builds from the other folds' requests. Shared by
/// every out-of-fold report so none can let a query see itself.
pub fn out_of_fold<F>(recs: &[Recording], folds: usize, mut calibrated: F) -> Vec<PruneConfig>
where
    F: FnMut(&[Recording]) -> PruneConfig,
{
    let fold = folds_by_query(recs, folds);
    let per_fold: Vec<PruneConfig> = (0..folds.max(1))
        .map(|f| {
            let train: Vec<Recording> = recs
                .iter()
                .zip(&fold)
                .filter(|(_, &g)| g != f)
                .map(|(r, _)| r.clone())
                .collect();
            calibrated(&train)
        })
        .collect();
    fold.iter().map(|&f| per_fold[f].clone()).collect()
}

/// Out-of-fold results of the margin rule with `margin` over `base` (mode, first layer), at
/// every (N, K): the movement of each held-out request's rule is measured on the other folds.
pub fn held_out_margin(
    recs: &[Recording],
    base: &PruneConfig,
    margin: f32,
    sizes: &[usize],
    ks: &[usize],
    folds: usize,
) -> Vec<HeldOutRow> {
    let mut rows = Vec::new();
    for &n in sizes {
        for &k in ks {
            let set = at_size(recs, n, k);
            let cfgs = out_of_fold(&set, folds, |train| PruneConfig {
                movement: movement(train),
                margin,
                ..base.clone()
            });
            let outs: Vec<Outcome> = set
                .iter()
                .zip(&cfgs)
                .map(|(r, c)| outcome(c, r, k))
                .collect();
            rows.push(summarize(n, k, &outs));
        }
    }
    rows
}

/// What [`fit`] chose and why.
#[derive(Debug, Clone)]
pub struct Fit {
    /// The rule for the model: movement from every request, the chosen margin, and layers
    /// after which it never pruned on any request switched off (their head is not run).
    pub config: PruneConfig,
    /// Out-of-fold rows at the chosen margin.
    pub held_out: Vec<HeldOutRow>,
    /// Whether some margin met the targets (else the widest was kept).
    pub met: bool,
}

/// Chooses the smallest margin of [`MARGIN_GRID`] whose out-of-fold mean agreement reaches
/// `target` and minimum per-request agreement reaches `min_agreement` at every (N, K).
pub fn fit(
    recs: &[Recording],
    base: &PruneConfig,
    target: f64,
    min_agreement: f64,
    sizes: &[usize],
    ks: &[usize],
    folds: usize,
) -> Fit {
    let mut chosen = None;
    for &m in &MARGIN_GRID {
        let rows = held_out_margin(recs, base, m, sizes, ks, folds);
        let ok = rows
            .iter()
            .all(|r| r.agreement >= target && r.min_agreement >= min_agreement);
        if ok {
            chosen = Some((m, rows, true));
            break;
        }
        chosen = Some((m, rows, false));
    }
    let (margin, held_out, met) = chosen.expect("a non-empty grid");
    let mut config = PruneConfig {
        mode: if base.mode == PruneMode::Off {
            PruneMode::TopK
        } else {
            base.mode
        },
        movement: movement(recs),
        margin,
        ..base.clone()
    };
    // Layers after which nothing was ever decided cost a head evaluation per candidate and
    // save nothing.
    let mut used = vec![false; config.movement.len()];
    for &n in sizes {
        for &k in ks {
            for r in at_size(recs, n, k) {
                for e in replay(&config, &r.layer_scores, k).events {
                    used[e.layer - 1] = true;
                }
            }
        }
    }
    for (m, u) in config.movement.iter_mut().zip(used) {
        if !u {
            *m = None;
        }
    }
    if config.movement.iter().all(Option::is_none) {
        // Nothing prunes at any margin tried: keep the default, not the grid's smallest.
        config.margin = super::DEFAULT_MARGIN.max(config.margin);
    }
    Fit {
        config,
        held_out,
        met,
    }
}

/// The cluster rule's lowest threshold from which every higher one meets the target on
/// `recs` at every K (agreement is not monotone in the threshold in general).
pub fn cluster_threshold(
    recs: &[Recording],
    base: &PruneConfig,
    thresholds: &[f32],
    ks: &[usize],
    target: f64,
) -> f32 {
    let mut sorted = thresholds.to_vec();
    sorted.sort_by(f32::total_cmp);
    let mut chosen = f32::MAX;
    for &t in sorted.iter().rev() {
        let cfg = PruneConfig {
            threshold: t,
            ..base.clone()
        };
        let ok = ks.iter().all(|&k| {
            let outs: Vec<_> = at_size(recs, 0, k)
                .iter()
                .map(|r| outcome(&cfg, r, k))
                .collect();
            summarize(0, k, &outs).agreement >= target
        });
        if !ok {
            break;
        }
        chosen = t;
    }
    chosen
}

/// The cluster rule over `base` with the threshold [`cluster_threshold`] picks (`f32::MAX`,
/// i.e. never pruning, when none meets the target).
pub fn fit_cluster(
    recs: &[Recording],
    base: &PruneConfig,
    thresholds: &[f32],
    ks: &[usize],
    target: f64,
) -> PruneConfig {
    PruneConfig {
        threshold: cluster_threshold(recs, base, thresholds, ks, target),
        ..base.clone()
    }
}

/// The cluster thresholds `grating calibrate` tries: 24 values from 0.01 to 2, log-spaced.
pub fn default_thresholds() -> Vec<f32> {
    (0..24)
        .map(|i| 0.01f32 * (200f32).powf(i as f32 / 23.0))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Requests whose final scores are a latent relevance and whose earlier layers see it
    /// through noise that shrinks with depth.
    pub fn synthetic(requests: usize, n: usize, noise: f32, seed: u64) -> Vec<Recording> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        (0..requests)
            .map(|q| {
                let latent: Vec<f32> = (0..n).map(|_| 8.0 * uniform()).collect();
                let layers = 6;
                let layer_scores = (1..=layers)
                    .map(|l| {
                        let sd = noise * (layers - l) as f32 / layers as f32;
                        latent.iter().map(|&s| s + 3.0 + sd * uniform()).collect()
                    })
                    .collect();
                Recording {
                    query: format!("query {q}"),
                    layer_scores,
                }
            })
            .collect()
    }

    #[test]
    fn no_query_calibrates_itself() {
        let mut recs = synthetic(40, 20, 2.0, 1);
        // Repeats of queries, as in logged traffic, must share their fold.
        recs.extend(synthetic(10, 20, 2.0, 2));
        // Each calibration call is told apart by its first layer; remember what it saw.
        let mut trained_on: Vec<Vec<String>> = Vec::new();
        let cfgs = out_of_fold(&recs, 5, |train| {
            trained_on.push(train.iter().map(|r| r.query.clone()).collect());
            PruneConfig {
                first_layer: trained_on.len(),
                ..Default::default()
            }
        });
        assert_eq!(trained_on.len(), 5);
        assert_eq!(cfgs.len(), recs.len());
        for (r, c) in recs.iter().zip(&cfgs) {
            let seen = &trained_on[c.first_layer - 1];
            assert!(!seen.contains(&r.query), "{} calibrated itself", r.query);
            assert!(!seen.is_empty());
        }
    }

    #[test]
    fn movement_follows_the_noise() {
        let calm = movement(&synthetic(30, 40, 1.0, 3));
        let noisy = movement(&synthetic(30, 40, 4.0, 3));
        assert_eq!(calm.len(), 5);
        for (c, n) in calm.iter().zip(&noisy) {
            assert!(n.unwrap() > 2.0 * c.unwrap(), "{c:?} {n:?}");
        }
        // Movement shrinks with depth.
        assert!(calm[4].unwrap() < calm[0].unwrap());
    }

    #[test]
    fn fit_meets_its_target_out_of_fold_and_prunes() {
        let recs = synthetic(60, 40, 2.0, 4);
        let f = fit(
            &recs,
            &PruneConfig::default(),
            0.99,
            0.9,
            &[20, 40],
            &[1, 5],
            5,
        );
        assert!(f.met);
        for r in &f.held_out {
            assert!(r.agreement >= 0.99 && r.min_agreement >= 0.9, "{r:?}");
            assert!(r.compute_share < 0.95, "{r:?}");
        }
        assert!(f.config.movement.iter().any(Option::is_some));
    }

    #[test]
    fn quantile_rounds_up() {
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(quantile(v.clone(), 0.99), Some(99.0));
        assert_eq!(quantile(v, 1.0), Some(100.0));
        assert_eq!(quantile(vec![], 0.5), None);
    }
}
