//! The margin rule, grating's default.
//!
//! After layer l, with K' answers still open among the live candidates:
//! - drop a candidate whose score is below `s(K') - margin * movement(l)`, where `s(K')` is
//!   the K'-th best live score;
//! - accept (top-K mode) one whose score is above `s(K'+1) + margin * movement(l)`;
//! - when the candidates left exactly fill the open slots, accept them all (top-K mode).
//!
//! `movement(l)` is how far a score still moves, relative to the others of its request,
//! between layer l and the last: the 99th percentile over the calibration requests of
//! `|(s_L - s_l) - median over the request (s_L - s_l)|`, taken on each request's final
//! top 20 ([`super::calibrate::movement`]). A candidate `margin` units below the K'-th best
//! would need to rise, relative to it, by more than such a movement to overtake it; with
//! `margin` = 1 the rule assumes no two candidates move against each other by more than one
//! 99th-percentile movement, which held on every held-out DL19 request (docs/pruning.md).
//!
//! Why this rule: it decides on differences of scores only, so adding a constant to every
//! logit (the arbitrary offset of a classifier head) never changes a decision; its unit comes
//! from thousands of candidate movements, not from a few dozen requests' extremes, so its tail
//! is estimated where it matters; and it needs no per-(K, N) tuning, since both the K'-th
//! score and the margin are read off the request itself. The paper's cluster rule and a
//! rank-depth rule were compared with it out of fold (`scripts/prune_study.py`).

use super::{best_first, dispersion, Decision, PruneMode};

/// Applies the rule with a distance of `margin_logits` to one layer's live `scores`, with
/// `slots` answers still open (fewer than the scores, checked by [`super::decide`]).
pub fn decide(mode: PruneMode, margin_logits: f32, scores: &[f32], slots: usize) -> Decision {
    let order = best_first(scores);
    let mut d = Decision {
        dispersion: dispersion(scores),
        margin_logits,
        ..Default::default()
    };
    let kth = scores[order[slots - 1]];
    let next = scores[order[slots]];
    let drop_below = kth - margin_logits;
    let accept_above = next + margin_logits;
    // Dropped candidates are below the K'-th, accepted ones above the (K'+1)-th, so the
    // two never meet and at least `slots` candidates stay accepted or live.
    let kept_end = order
        .iter()
        .position(|&i| scores[i] < drop_below)
        .unwrap_or(order.len());
    d.drop = order[kept_end..].to_vec();
    if mode == PruneMode::TopK {
        if kept_end == slots {
            d.accept = order[..slots].to_vec();
        } else {
            let n_accept = order[..slots]
                .iter()
                .take_while(|&&i| scores[i] > accept_above)
                .count();
            d.accept = order[..n_accept].to_vec();
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::{PruneConfig, PruneMode};

    fn three_groups() -> Vec<f32> {
        let mut s = vec![];
        s.extend((0..5).map(|i| 12.0 + 0.01 * i as f32));
        s.extend((0..20).map(|i| 6.0 + 0.01 * i as f32));
        s.extend((0..25).map(|i| -3.0 + 0.01 * i as f32));
        s
    }

    #[test]
    fn drops_below_and_accepts_above_the_margin() {
        let d = decide(PruneMode::TopK, 2.0, &three_groups(), 10);
        let mut acc = d.accept.clone();
        acc.sort();
        assert_eq!(acc, (0..5).collect::<Vec<_>>());
        let mut dr = d.drop.clone();
        dr.sort();
        assert_eq!(dr, (25..50).collect::<Vec<_>>());
        assert_eq!(d.margin_logits, 2.0);
    }

    #[test]
    fn a_wide_margin_decides_nothing() {
        assert!(decide(PruneMode::TopK, 100.0, &three_groups(), 10).is_noop());
    }

    #[test]
    fn exact_order_only_drops() {
        let d = decide(PruneMode::ExactOrder, 2.0, &three_groups(), 10);
        assert!(d.accept.is_empty());
        assert_eq!(d.drop.len(), 25);
    }

    #[test]
    fn survivors_filling_the_slots_are_accepted() {
        let mut s: Vec<f32> = (0..10).map(|i| 10.0 + 0.01 * i as f32).collect();
        s.extend((0..30).map(|i| -5.0 + 0.01 * i as f32));
        let d = decide(PruneMode::TopK, 1.0, &s, 10);
        assert_eq!(d.accept.len(), 10);
        assert_eq!(d.drop.len(), 30);
    }

    #[test]
    fn uncalibrated_layers_never_prune() {
        let cfg = PruneConfig::default();
        assert!(!cfg.may_prune_after(1));
        assert!(crate::prune::decide(&cfg, 1, &three_groups(), 10).is_noop());
        let cfg = PruneConfig::margin(vec![None, Some(1.0)], 1.0);
        assert!(!cfg.may_prune_after(1));
        assert!(cfg.may_prune_after(2));
        assert!(!cfg.may_prune_after(3));
    }
}
