//! The pruning state of one request across layers: which candidates are live, accepted or
//! dropped, and the final ranking. The engine feeds it real scores layer by layer; calibration
//! and evaluation replay recorded per-layer scores through the same code, so a simulated
//! decision is exactly the decision the engine would take.

use super::{decide, PruneConfig, PruneEvent};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Live,
    Accepted { event: usize, logit: f32 },
    Dropped,
}

#[derive(Debug, Clone)]
pub struct PruneState {
    cfg: PruneConfig,
    k: usize,
    num_layers: usize,
    fate: Vec<Fate>,
    accepted: usize,
    live: usize,
    events: Vec<PruneEvent>,
}

impl PruneState {
    pub fn new(cfg: &PruneConfig, candidates: usize, k: usize, num_layers: usize) -> PruneState {
        PruneState {
            cfg: cfg.clone(),
            k: k.min(candidates),
            num_layers,
            fate: vec![Fate::Live; candidates],
            accepted: 0,
            live: candidates,
            events: Vec::new(),
        }
    }

    pub fn is_live(&self, i: usize) -> bool {
        self.fate[i] == Fate::Live
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn events(&self) -> &[PruneEvent] {
        &self.events
    }

    /// Whether the scores after 1-based layer `layer` could change anything (so the engine
    /// only runs the head where a decision is possible).
    pub fn wants_scores(&self, layer: usize) -> bool {
        let slots = self.k - self.accepted;
        layer < self.num_layers && self.cfg.may_prune_after(layer) && slots > 0 && self.live > slots
    }

    /// Applies the decision for the live candidates `ids` scored `scores` after `layer`.
    /// Returns true when some candidate stopped being live.
    pub fn observe(&mut self, layer: usize, ids: &[usize], scores: &[f32]) -> bool {
        if !self.wants_scores(layer) {
            return false;
        }
        let slots = self.k - self.accepted;
        let d = if self.cfg.schedule.is_empty() {
            decide(&self.cfg, layer, scores, slots)
        } else {
            self.scheduled(layer, scores)
        };
        if d.is_noop() {
            return false;
        }
        let event = self.events.len() + 1;
        for &p in &d.accept {
            self.fate[ids[p]] = Fate::Accepted {
                event,
                logit: scores[p],
            };
        }
        for &p in &d.drop {
            self.fate[ids[p]] = Fate::Dropped;
        }
        self.events.push(PruneEvent {
            layer,
            live_before: self.live,
            accepted: d.accept.len(),
            dropped: d.drop.len(),
            dispersion: d.dispersion,
            clusters: d.clusters,
            margin_logits: d.margin_logits,
        });
        self.accepted += d.accept.len();
        self.live -= d.accept.len() + d.drop.len();
        true
    }

    /// The forced-schedule decision: keep the best `fraction` of all candidates (at least K).
    fn scheduled(&self, layer: usize, scores: &[f32]) -> super::Decision {
        let frac = self
            .cfg
            .schedule
            .iter()
            .find(|&&(l, _)| l == layer)
            .map_or(1.0, |&(_, f)| f);
        let keep = ((frac as f64 * self.fate.len() as f64).ceil() as usize).max(self.k);
        let order = super::best_first(scores);
        super::Decision {
            drop: order.get(keep..).map(<[usize]>::to_vec).unwrap_or_default(),
            dispersion: super::dispersion(scores),
            ..Default::default()
        }
    }

    /// The answer, best first: accepted candidates (earlier acceptances first, as they stood
    /// above the boundary cluster that later ones came from), then the survivors of the last
    /// layer by their final logits; cut to K. `finals` are `(candidate, logit)` at the last
    /// layer.
    pub fn ranking(&self, finals: &[(usize, f32)]) -> Vec<(usize, f32)> {
        let mut acc: Vec<(usize, usize, f32)> = self
            .fate
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f {
                Fate::Accepted { event, logit } => Some((*event, i, *logit)),
                _ => None,
            })
            .collect();
        acc.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.total_cmp(&a.2)).then(a.1.cmp(&b.1)));
        let mut fin: Vec<(usize, f32)> = finals.to_vec();
        fin.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out: Vec<(usize, f32)> = acc.into_iter().map(|(_, i, l)| (i, l)).collect();
        out.extend(fin);
        out.truncate(self.k);
        out
    }
}

/// The outcome of replaying recorded scores through the pruning rule.
#[derive(Debug, Clone)]
pub struct Replay {
    pub ranking: Vec<(usize, f32)>,
    /// Layers each candidate would have computed.
    pub layers_per_candidate: Vec<usize>,
    pub events: Vec<PruneEvent>,
}

/// Replays `layer_scores[l][i]` (score of candidate i after 1-based layer l+1) through the rule,
/// as the engine would have run it.
pub fn replay(cfg: &PruneConfig, layer_scores: &[Vec<f32>], k: usize) -> Replay {
    let num_layers = layer_scores.len();
    let n = layer_scores.first().map_or(0, Vec::len);
    let mut st = PruneState::new(cfg, n, k, num_layers);
    let mut layers = vec![0usize; n];
    let mut finals = Vec::new();
    for (l, scores) in layer_scores.iter().enumerate() {
        let layer = l + 1;
        let ids: Vec<usize> = (0..n).filter(|&i| st.is_live(i)).collect();
        if ids.is_empty() {
            break;
        }
        for &i in &ids {
            layers[i] += 1;
        }
        let live_scores: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
        if layer == num_layers {
            finals = ids.into_iter().zip(live_scores).collect();
        } else {
            st.observe(layer, &ids, &live_scores);
        }
    }
    Replay {
        ranking: st.ranking(&finals),
        layers_per_candidate: layers,
        events: st.events().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_without_pruning_is_full_ranking() {
        let scores = vec![vec![1.0, 2.0, 3.0], vec![3.0, 1.0, 2.0]];
        let r = replay(&PruneConfig::off(), &scores, 2);
        assert_eq!(r.ranking, vec![(0, 3.0), (2, 2.0)]);
        assert_eq!(r.layers_per_candidate, vec![2, 2, 2]);
    }

    #[test]
    fn replay_prunes_and_accepts() {
        // Layer 1 separates a clear top group of 2 and a bottom group; K = 2.
        let mut l1 = vec![10.0, 10.1];
        l1.extend((0..20).map(|i| -5.0 + 0.01 * i as f32));
        let l2: Vec<f32> = (0..22).map(|i| i as f32).collect();
        for cfg in [
            PruneConfig::cluster(),
            PruneConfig::margin(vec![Some(2.0), Some(2.0)], 1.0),
        ] {
            let r = replay(&cfg, &[l1.clone(), l2.clone(), l2.clone()], 2);
            assert_eq!(
                r.ranking.iter().map(|x| x.0).collect::<Vec<_>>(),
                vec![1, 0]
            );
            assert!(r.layers_per_candidate.iter().all(|&l| l == 1));
            assert_eq!(r.events.len(), 1);
        }
    }

    #[test]
    fn an_uncalibrated_margin_rule_computes_every_layer() {
        let l1: Vec<f32> = (0..22).map(|i| i as f32).collect();
        let r = replay(&PruneConfig::default(), &[l1.clone(), l1.clone(), l1], 2);
        assert!(r.events.is_empty());
        assert!(r.layers_per_candidate.iter().all(|&l| l == 3));
    }
}
