//! Property tests of the pruning decisions: [`PruneState`] fed random score matrices the way
//! the engine feeds it (after each layer, only when it wants scores, only the live
//! candidates, in the engine's chunk order rather than by index), in every [`PruneMode`].

use super::state::PruneState;
use super::{PruneConfig, PruneMode, RuleKind};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use std::cmp::Ordering;

/// A finite score: small integers (many ties), ordinary logits, or any normal float.
fn score() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => (-6i32..=6).prop_map(|v| v as f32),
        4 => -20.0f32..20.0,
        1 => prop::num::f32::NORMAL | prop::num::f32::ZERO,
    ]
}

/// `layers x candidates` scores (row `l`: the scores after 1-based layer `l + 1`), some rows
/// constant.
fn matrix() -> impl Strategy<Value = Vec<Vec<f32>>> {
    (1usize..=8, 1usize..=24).prop_flat_map(|(layers, n)| {
        let row = prop_oneof![
            1 => score().prop_map(move |v| vec![v; n]),
            4 => prop::collection::vec(score(), n),
        ];
        prop::collection::vec(row, layers)
    })
}

fn config(layers: usize) -> impl Strategy<Value = PruneConfig> {
    let movement = prop::collection::vec(
        prop_oneof![1 => Just(None), 3 => (0.0f32..20.0).prop_map(Some)],
        0..=layers,
    );
    (
        prop_oneof![
            2 => Just(PruneMode::TopK),
            2 => Just(PruneMode::ExactOrder),
            1 => Just(PruneMode::Off),
        ],
        prop_oneof![Just(RuleKind::Cluster), Just(RuleKind::Margin)],
        prop_oneof![Just(0.0f32), Just(super::DEFAULT_THRESHOLD), 0.0f32..1.0],
        prop_oneof![2 => Just(1), 1 => 1..=layers + 1],
        2usize..=8,
        0.0f32..1.0,
        movement,
        prop_oneof![Just(0.0f32), Just(super::DEFAULT_MARGIN), 0.0f32..3.0],
    )
        .prop_map(
            |(mode, rule, threshold, first_layer, max_clusters, sse_ratio, movement, margin)| {
                PruneConfig {
                    mode,
                    rule,
                    movement,
                    margin,
                    threshold,
                    first_layer,
                    max_clusters,
                    sse_ratio,
                    schedule: Vec::new(),
                }
            },
        )
}

/// A case: scores, K in 1..=n, a config, and the order the engine's chunks hold the
/// candidates in.
fn case() -> impl Strategy<Value = (Vec<Vec<f32>>, usize, PruneConfig, Vec<usize>)> {
    matrix().prop_flat_map(|m| {
        let (layers, n) = (m.len(), m[0].len());
        let order: Vec<usize> = (0..n).collect();
        (
            Just(m),
            any::<Index>(),
            config(layers),
            Just(order).prop_shuffle(),
        )
            .prop_map(move |(m, k, cfg, order)| (m, 1 + k.index(n), cfg, order))
    })
}

/// Best first, ties by index: the order of the final logits in the ranking.
fn by_score(a: &(usize, f32), b: &(usize, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The top `k` of `(candidate, score)` pairs.
fn top_k(mut v: Vec<(usize, f32)>, k: usize) -> Vec<(usize, f32)> {
    v.sort_by(by_score);
    v.truncate(k);
    v
}

/// Bit-exact comparison of rankings (scores included).
fn bits(v: &[(usize, f32)]) -> Vec<(usize, u32)> {
    v.iter().map(|&(i, s)| (i, s.to_bits())).collect()
}

struct Outcome {
    st: PruneState,
    /// Per candidate: the event (1-based) that accepted it and its logit then.
    accepted: Vec<Option<(usize, f32)>>,
    /// The last layer's `(candidate, score)` of the candidates live to the end (empty when
    /// nobody was live then).
    finals: Vec<(usize, f32)>,
    /// Layers whose scores were fed to `observe`.
    observed_layers: usize,
}

/// Runs the request's layers as `RequestRun::complete_layer` does, checking every
/// decision.
fn run(
    cfg: &PruneConfig,
    m: &[Vec<f32>],
    k: usize,
    chunk_order: &[usize],
) -> Result<Outcome, TestCaseError> {
    let (layers, n) = (m.len(), m[0].len());
    prop_assert!(cfg.validate().is_ok(), "invalid config {:?}", cfg);
    let mut st = PruneState::new(cfg, n, k, layers);
    let mut accepted: Vec<Option<(usize, f32)>> = vec![None; n];
    let mut finals = Vec::new();
    let mut observed_layers = 0;
    for layer in 1..=layers {
        let ids: Vec<usize> = chunk_order
            .iter()
            .copied()
            .filter(|&i| st.is_live(i))
            .collect();
        // No live chunks left: the request is done.
        if ids.is_empty() {
            break;
        }
        let scores: Vec<f32> = ids.iter().map(|&i| m[layer - 1][i]).collect();
        if layer == layers {
            finals = ids.into_iter().zip(scores).collect();
            break;
        }
        if !st.wants_scores(layer) {
            // Fed anyway, it changes nothing.
            let mut copy = st.clone();
            prop_assert!(!copy.observe(layer, &ids, &scores));
            prop_assert_eq!(copy.live(), st.live());
            prop_assert_eq!(copy.events().len(), st.events().len());
            continue;
        }
        prop_assert!(cfg.mode != PruneMode::Off, "Off wants scores at {}", layer);
        prop_assert!(
            layer >= cfg.first_layer,
            "scores wanted before the first layer"
        );
        observed_layers += 1;
        let live_before = st.live();
        let events_before = st.events().len();
        let changed = st.observe(layer, &ids, &scores);

        // Consistency of the counters with the per-candidate state.
        let live_now: Vec<bool> = (0..n).map(|i| st.is_live(i)).collect();
        let live = live_now.iter().filter(|&&l| l).count();
        prop_assert_eq!(st.live(), live);
        // The ranking without finals lists the accepted candidates (at most K of them).
        let acc_now = st.ranking(&[]);
        let accepted_total: usize = st.events().iter().map(|e| e.accepted).sum();
        prop_assert_eq!(acc_now.len(), accepted_total, "more accepted than K?");
        let mut new_acc = Vec::new();
        for &(i, _) in &acc_now {
            if accepted[i].is_none() {
                prop_assert!(ids.contains(&i), "accepted {} without scoring it", i);
                new_acc.push(i);
            }
        }
        let new_drop: Vec<usize> = ids
            .iter()
            .copied()
            .filter(|&i| !live_now[i] && !new_acc.contains(&i))
            .collect();
        prop_assert!(ids
            .iter()
            .all(|&i| live_now[i] || new_acc.contains(&i) || new_drop.contains(&i)));
        prop_assert_eq!(changed, !new_acc.is_empty() || !new_drop.is_empty());
        if changed {
            prop_assert_eq!(st.events().len(), events_before + 1);
            let e = st.events().last().unwrap();
            prop_assert_eq!(e.layer, layer);
            prop_assert_eq!(e.live_before, live_before);
            prop_assert_eq!(e.accepted, new_acc.len());
            prop_assert_eq!(e.dropped, new_drop.len());
        } else {
            prop_assert_eq!(st.events().len(), events_before);
        }
        let event = st.events().len();
        for &(i, logit) in &acc_now {
            if new_acc.contains(&i) {
                let s = m[layer - 1][i];
                prop_assert_eq!(logit.to_bits(), s.to_bits(), "accepted logit of {}", i);
                accepted[i] = Some((event, s));
            }
        }

        // Accepted plus live never below K: the ranking can always be filled.
        prop_assert!(
            accepted_total + live >= k,
            "after layer {}: {} accepted + {} live < K = {}",
            layer,
            accepted_total,
            live,
            k
        );
        // Decisions follow this layer's scores: the accepted are at least as good as every
        // other scored candidate, the dropped at most as good.
        let score = |i: usize| m[layer - 1][i];
        for &a in &new_acc {
            prop_assert!(
                ids.iter()
                    .filter(|i| !new_acc.contains(i))
                    .all(|&o| score(a) >= score(o)),
                "accepted {} ({}) below a candidate it passed",
                a,
                score(a)
            );
        }
        for &d in &new_drop {
            prop_assert!(
                ids.iter()
                    .filter(|i| !new_drop.contains(i))
                    .all(|&o| score(d) <= score(o)),
                "dropped {} ({}) above a candidate kept",
                d,
                score(d)
            );
        }
        if cfg.mode == PruneMode::ExactOrder {
            prop_assert!(new_acc.is_empty(), "exact order accepted {:?}", new_acc);
        }
    }
    Ok(Outcome {
        st,
        accepted,
        finals,
        observed_layers,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Every decision keeps the ranking fillable and follows the scores; the final ranking
    /// has K distinct entries, ordered as `PruneState::ranking` documents.
    #[test]
    fn the_ranking_is_always_filled_and_ordered((m, k, cfg, order) in case()) {
        let out = run(&cfg, &m, k, &order)?;
        let last = m.len() - 1;
        let ranking = out.st.ranking(&out.finals);
        prop_assert_eq!(ranking.len(), k, "ranking {:?}", ranking);
        let mut ids: Vec<usize> = ranking.iter().map(|r| r.0).collect();
        ids.sort_unstable();
        ids.dedup();
        prop_assert_eq!(ids.len(), k, "repeated candidates in {:?}", ranking);
        // Accepted first: earlier events first, then by logit, then by index.
        let n_acc = out.accepted.iter().flatten().count();
        prop_assert!(n_acc <= k);
        let (acc, fin) = ranking.split_at(n_acc);
        let key = |&(i, l): &(usize, f32)| {
            let (event, logit) = out.accepted[i].expect("an accepted candidate");
            prop_assert_eq!(logit.to_bits(), l.to_bits());
            Ok((event, l, i))
        };
        let keys = acc.iter().map(key).collect::<Result<Vec<_>, TestCaseError>>()?;
        for w in keys.windows(2) {
            let ((e0, l0, i0), (e1, l1, i1)) = (w[0], w[1]);
            prop_assert!(
                e0 < e1 || (e0 == e1 && (l1.total_cmp(&l0).then(i0.cmp(&i1)) == Ordering::Less)),
                "accepted out of order: {:?}", acc
            );
        }
        // Then the best of the finals, with their last-layer scores, best first.
        for &(i, l) in fin {
            prop_assert!(out.st.is_live(i), "{} in the ranking's tail is not live", i);
            prop_assert_eq!(l.to_bits(), m[last][i].to_bits());
        }
        prop_assert_eq!(bits(fin), bits(&top_k(out.finals.clone(), k - n_acc)));
        // Nobody is both live at the end and accepted.
        prop_assert!(out.finals.iter().all(|&(i, _)| out.accepted[i].is_none()));
        if cfg.mode == PruneMode::Off {
            // Off never prunes: everyone runs to the end and the ranking is the last layer's
            // top K.
            prop_assert_eq!(out.observed_layers, 0);
            prop_assert!(out.st.events().is_empty());
            prop_assert_eq!(out.finals.len(), m[0].len());
            let all: Vec<(usize, f32)> = m[last].iter().copied().enumerate().collect();
            prop_assert_eq!(bits(&ranking), bits(&top_k(all, k)));
        }
        if cfg.mode == PruneMode::ExactOrder {
            // Never accepts early: the ranking is the top K, by the last layer's exact scores,
            // of the candidates kept live to the end.
            prop_assert_eq!(n_acc, 0);
            prop_assert!(out.st.events().iter().all(|e| e.accepted == 0));
            prop_assert!(out.finals.len() >= k);
            let kept: Vec<(usize, f32)> = (0..m[0].len())
                .filter(|&i| out.st.is_live(i))
                .map(|i| (i, m[last][i]))
                .collect();
            prop_assert_eq!(bits(&ranking), bits(&top_k(kept, k)));
        }
    }
}

/// Integer-valued score matrices (exact in f32 after adding an integer offset).
fn integer_matrix() -> impl Strategy<Value = Vec<Vec<f32>>> {
    (2usize..=6, 2usize..=30).prop_flat_map(|(layers, n)| {
        prop::collection::vec(
            prop::collection::vec((-40i32..=40).prop_map(|v| v as f32), n),
            layers,
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// A head's logits carry an arbitrary offset: adding a constant to every score of every
    /// layer changes no decision of the margin rule (movements and margins in quarter units,
    /// scores in integers, so every sum is exact).
    #[test]
    fn the_margin_rule_ignores_a_constant_offset(
        m in integer_matrix(),
        offset in -1000i32..=1000,
        quarters in prop::collection::vec(prop::option::of(0u8..=40), 6),
        margin_quarters in 0u8..=12,
        k in 1usize..=10,
        exact in any::<bool>(),
    ) {
        let mut cfg = PruneConfig::margin(
            quarters.iter().map(|q| q.map(|q| q as f32 / 4.0)).collect(),
            margin_quarters as f32 / 4.0,
        );
        if exact {
            cfg.mode = PruneMode::ExactOrder;
        }
        let k = k.min(m[0].len());
        let shifted: Vec<Vec<f32>> = m
            .iter()
            .map(|row| row.iter().map(|s| s + offset as f32).collect())
            .collect();
        let a = super::state::replay(&cfg, &m, k);
        let b = super::state::replay(&cfg, &shifted, k);
        let ids = |r: &super::state::Replay| r.ranking.iter().map(|x| x.0).collect::<Vec<_>>();
        prop_assert_eq!(ids(&a), ids(&b));
        prop_assert_eq!(&a.layers_per_candidate, &b.layers_per_candidate);
        let counts = |r: &super::state::Replay| {
            r.events.iter().map(|e| (e.layer, e.accepted, e.dropped)).collect::<Vec<_>>()
        };
        prop_assert_eq!(counts(&a), counts(&b));
    }
}
