//! The paper's rule (GRATING/PRISM §4.1), with the parts the paper leaves open made explicit:
//! 1. Dispersion. The paper's CV = |std/mean| is undefined near a zero mean and depends on
//!    the logit's arbitrary offset, so grating uses `D = std / (|mean| + 1)`: the 1 (one logit
//!    unit, i.e. an odds ratio of e) keeps D finite near zero and equals the paper's CV when the
//!    mean is large. Scores whose spread is small against that scale are treated as noise and
//!    nothing is pruned. A layer prunes only when `D > threshold`. D still changes when a
//!    constant is added to every logit, which is one reason this is not the default rule.
//! 2. Clusters. Optimal 1-D k-means ([`kmeans1d`]); the number of clusters is the smallest k
//!    whose within-cluster sum of squares is at most `sse_ratio` of the total (k = 1 when
//!    none up to `max_clusters` is), i.e. the coarsest clustering that explains
//!    `1 - sse_ratio` of the variance.
//! 3. Decision. With K' slots left, the boundary cluster is the one holding the K'-th best
//!    live candidate. Clusters above it are accepted (in exact-order mode they keep running),
//!    clusters below are dropped, the boundary cluster keeps running.
//! 4. Termination. When the live candidates exactly fill the remaining slots, they are all
//!    accepted (top-K mode) or simply stop being pruned (exact-order mode).

use super::{best_first, dispersion, kmeans1d, Decision, PruneConfig, PruneMode};

/// Applies the rule to one layer's live scores with `slots` answers still open (more live
/// scores than slots, checked by [`super::decide`]).
pub fn decide(cfg: &PruneConfig, scores: &[f32], slots: usize) -> Decision {
    let n = scores.len();
    let mut d = Decision {
        dispersion: dispersion(scores),
        ..Default::default()
    };
    if d.dispersion <= cfg.threshold {
        return d;
    }
    let order = best_first(scores);
    let sorted: Vec<f64> = order.iter().map(|&i| scores[i] as f64).collect();
    let all = kmeans1d::optimal_all(&sorted, cfg.max_clusters);
    let total = all[0].sse;
    let chosen = all
        .iter()
        .find(|c| c.sse <= cfg.sse_ratio as f64 * total)
        .unwrap_or(&all[0]);
    d.clusters = chosen.starts.len();
    if d.clusters < 2 {
        return d;
    }
    let boundary = chosen.cluster_of(slots - 1);
    let (b_start, b_end) = chosen.range(boundary, n);
    if cfg.mode == PruneMode::TopK {
        d.accept = order[..b_start].to_vec();
    }
    d.drop = order[b_end..].to_vec();
    // Accepting everything above the boundary and the whole boundary fills the slots exactly:
    // the answer is decided.
    if cfg.mode == PruneMode::TopK && b_end == slots {
        d.accept = order[..b_end].to_vec();
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_scores_are_left_alone() {
        let scores: Vec<f32> = (0..50).map(|i| 8.4 + 0.001 * (i % 7) as f32).collect();
        let d = decide(&PruneConfig::cluster(), &scores, 10);
        assert!(d.is_noop());
        assert!(d.dispersion < 1e-3);
    }

    #[test]
    fn dispersed_scores_accept_top_and_drop_bottom_clusters() {
        // Three clear groups: 5 high, 20 middle, 25 low; K = 10 lies in the middle group.
        let mut scores = vec![];
        scores.extend((0..5).map(|i| 12.0 + 0.01 * i as f32));
        scores.extend((0..20).map(|i| 6.0 + 0.01 * i as f32));
        scores.extend((0..25).map(|i| -3.0 + 0.01 * i as f32));
        // Two clusters already explain 90% of the variance; ask for 98% to get the three.
        let cfg = PruneConfig {
            sse_ratio: 0.02,
            ..PruneConfig::cluster()
        };
        let d = decide(&cfg, &scores, 10);
        assert_eq!(d.clusters, 3);
        let mut acc = d.accept.clone();
        acc.sort();
        assert_eq!(acc, (0..5).collect::<Vec<_>>());
        let mut dr = d.drop.clone();
        dr.sort();
        assert_eq!(dr, (25..50).collect::<Vec<_>>());
    }

    #[test]
    fn exact_order_never_accepts() {
        let mut scores = vec![];
        scores.extend((0..5).map(|i| 12.0 + 0.01 * i as f32));
        scores.extend((0..20).map(|i| 6.0 + 0.01 * i as f32));
        scores.extend((0..25).map(|i| -3.0 + 0.01 * i as f32));
        let cfg = PruneConfig {
            mode: PruneMode::ExactOrder,
            sse_ratio: 0.02,
            ..PruneConfig::cluster()
        };
        let d = decide(&cfg, &scores, 10);
        assert!(d.accept.is_empty());
        assert_eq!(d.drop.len(), 25);
    }

    #[test]
    fn boundary_filling_the_slots_terminates() {
        let mut scores = vec![];
        scores.extend((0..10).map(|i| 10.0 + 0.01 * i as f32));
        scores.extend((0..30).map(|i| -5.0 + 0.01 * i as f32));
        let d = decide(&PruneConfig::cluster(), &scores, 10);
        assert_eq!(d.accept.len(), 10);
        assert_eq!(d.drop.len(), 30);
    }

    #[test]
    fn decisions_are_deterministic_with_ties() {
        let scores = vec![5.0, 5.0, 5.0, 1.0, 1.0, 1.0, -4.0, -4.0, -4.0, -4.0];
        let a = decide(&PruneConfig::cluster(), &scores, 4);
        for _ in 0..10 {
            assert_eq!(decide(&PruneConfig::cluster(), &scores, 4), a);
        }
    }

    #[test]
    fn dispersion_is_finite_near_zero_mean() {
        let d = dispersion(&[-1.0, 1.0, -1.0, 1.0]);
        assert!((d - 1.0).abs() < 1e-6);
        assert_eq!(dispersion(&[3.0]), 0.0);
    }
}
