//! The server's self-calibration loop replayed on real trajectories: every layer's scores of
//! the DL19 requests (layerwise shared model, BM25 top 100) are recorded once, then fed in a
//! loop as a server would see them: answer with the rule in force, re-run in full, record.
//!
//! - Started from a deliberately aggressive margin, the loop tightens and its answers meet
//!   the 0.99 target from a stated number of re-runs on.
//! - A shifted stream (the same requests with intermediate scores twice as far from the
//!   final ones: scores that settle later) makes a loop that had settled tighten again.

mod common;

use grating::eval::dl19::Dl19;
use grating::prune::online::{SelfCalibration, MIN_MARGIN};
use grating::prune::state::replay;
use grating::prune::{best_first, PruneConfig};
use grating::{RerankOptions, Reranker};

const K: usize = 10;
const TARGET: f64 = 0.99;
/// Re-runs after which the answers must meet the target (stated in docs/pruning.md).
const SETTLE: usize = 200;

/// `[request][layer][candidate]` scores of the DL19 queries' BM25 top 100.
fn dl19_trajectories() -> Option<(Vec<Vec<Vec<f32>>>, PruneConfig)> {
    let shared = common::shared_dir()?;
    let model = common::shared_model("minilm-l6-msmarco-layerwise")?;
    let r = Reranker::load(model.to_str().unwrap(), &common::engine_options()).unwrap();
    let data = Dl19::load(&shared.join("data/trec-dl19-subset")).unwrap();
    let recs = data
        .queries
        .iter()
        .map(|(_, q)| {
            let docs: Vec<String> = data
                .candidates(q, 100)
                .into_iter()
                .map(|d| data.doc_texts[d].clone())
                .collect();
            r.layer_scores(q, &docs, &RerankOptions::default())
                .unwrap()
                .0
        })
        .collect();
    Some((recs, r.prune_config().clone()))
}

/// One re-run per request, in a fixed shuffled order; returns each answer's agreement.
fn drive(cal: &mut SelfCalibration, recs: &[Vec<Vec<f32>>], rounds: usize) -> Vec<f64> {
    let mut order: Vec<usize> = (0..recs.len()).collect();
    let mut out = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while out.len() < rounds {
        // A deterministic Fisher-Yates shuffle per pass over the requests.
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        for &i in order.iter().take(rounds - out.len()) {
            let scores = &recs[i];
            let answer: Vec<usize> = replay(cal.config(), scores, K)
                .ranking
                .iter()
                .map(|x| x.0)
                .collect();
            let full = best_first(scores.last().unwrap());
            let agree = answer.iter().filter(|a| full[..K].contains(a)).count();
            out.push(agree as f64 / K as f64);
            cal.record(&answer, scores);
        }
    }
    out
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Intermediate scores twice as far from the final ones.
fn later_settling(recs: &[Vec<Vec<f32>>]) -> Vec<Vec<Vec<f32>>> {
    recs.iter()
        .map(|layers| {
            let last = layers.last().unwrap().clone();
            layers
                .iter()
                .map(|s| {
                    s.iter()
                        .zip(&last)
                        .map(|(x, f)| f + 2.0 * (x - f))
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[test]
fn self_calibration_on_dl19_trajectories_reaches_the_target_and_tracks_a_shift() {
    let Some((recs, profile)) = dl19_trajectories() else {
        return;
    };
    assert!(
        profile.movement.iter().any(Option::is_some),
        "the layerwise model has a built-in profile"
    );

    // From the most aggressive margin the loop allows.
    let mut cal = SelfCalibration::new(
        PruneConfig {
            margin: MIN_MARGIN,
            ..profile.clone()
        },
        TARGET,
    );
    let trace = drive(&mut cal, &recs, 800);
    let snap = cal.snapshot();
    eprintln!(
        "aggressive start: first {SETTLE} re-runs {:.4}, then {:.4}; margin {MIN_MARGIN} -> {} ({} tightened, {} relaxed)",
        mean(&trace[..SETTLE]),
        mean(&trace[SETTLE..]),
        snap.margin,
        snap.tightened,
        snap.relaxed
    );
    assert!(snap.tightened >= 1, "{snap:?}");
    assert!(
        mean(&trace[..50]) < TARGET,
        "the aggressive start must fail the target first, else the test shows nothing"
    );
    assert!(mean(&trace[SETTLE..]) >= TARGET, "{snap:?}");

    // The settled loop meets a stream whose scores settle later.
    let settled = cal.snapshot();
    let shifted = later_settling(&recs);
    let trace = drive(&mut cal, &shifted, 800);
    let snap = cal.snapshot();
    eprintln!(
        "shifted stream: first {SETTLE} re-runs {:.4}, then {:.4}; margin {} -> {} ({} more tightenings)",
        mean(&trace[..SETTLE]),
        mean(&trace[SETTLE..]),
        settled.margin,
        snap.margin,
        snap.tightened - settled.tightened
    );
    assert!(snap.tightened > settled.tightened, "{snap:?}");
    assert!(mean(&trace[SETTLE..]) >= TARGET, "{snap:?}");
}
