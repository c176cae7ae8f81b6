//! Execution modes on the shared models: monolithic without pruning equals full inference,
//! exact-order pruning returns full inference's top K, scores do not depend on batch-mates,
//! and pruning decisions are deterministic.

mod common;

use common::Req;
use grating::eval::dl19::Dl19;
use grating::prune::{PruneConfig, PruneMode};
use grating::{Mode, Reranker};

fn dl19_requests(n_queries: usize, n_docs: usize) -> Option<Vec<Req>> {
    let shared = common::shared_dir()?;
    let data = Dl19::load(&shared.join("data/trec-dl19-subset")).unwrap();
    Some(
        data.queries
            .iter()
            .step_by(43 / n_queries)
            .take(n_queries)
            .map(|(_, q)| {
                let docs = data
                    .candidates(q, n_docs)
                    .into_iter()
                    .map(|d| data.doc_texts[d].clone())
                    .collect();
                Req::new(q.clone(), docs)
            })
            .collect(),
    )
}

fn load(name: &str) -> Option<Reranker> {
    let dir = common::shared_model(name)?;
    Some(Reranker::load(dir.to_str().unwrap(), &common::engine_options()).unwrap())
}

fn run(
    r: &Reranker,
    base: &Req,
    mode: Mode,
    prune: PruneMode,
    k: Option<usize>,
) -> Vec<(usize, f32)> {
    let mut req = base.clone();
    req.opts.mode = mode;
    req.opts.top_k = k;
    // The model's own rule (its built-in profile) in the mode asked for.
    req.opts.prune = Some(PruneConfig {
        mode: prune,
        ..r.prune_config().clone()
    });
    common::ranked(r, &req)
}

#[test]
fn prune_off_equals_full_mode_and_exact_order_keeps_full_top_k() {
    for model in ["minilm-l6-msmarco-distilled", "minilm-l6-msmarco-layerwise"] {
        let Some(r) = load(model) else { return };
        let Some(reqs) = dl19_requests(4, 40) else {
            return;
        };
        for req in &reqs {
            let full = run(&r, req, Mode::Full, PruneMode::Off, None);
            let mono = run(&r, req, Mode::Grating, PruneMode::Off, None);
            assert_eq!(full.len(), req.documents.len());
            let mut by_index = vec![0f32; full.len()];
            for &(i, s) in &full {
                by_index[i] = s;
            }
            for &(i, s) in &mono {
                assert!(
                    (by_index[i] - s).abs() < common::batch_tolerance(),
                    "{model}: doc {i}: full {} vs monolithic {s}",
                    by_index[i]
                );
            }
            let k = 10;
            let exact = run(&r, req, Mode::Grating, PruneMode::ExactOrder, Some(k));
            assert_eq!(exact.len(), k);
            for (e, f) in exact.iter().zip(&full[..k]) {
                assert_eq!(
                    e.0, f.0,
                    "{model}: exact-order top-{k} order differs from full"
                );
                assert!((e.1 - f.1).abs() < common::batch_tolerance());
            }
        }
    }
}

#[test]
fn scores_do_not_depend_on_batch_mates() {
    let Some(r) = load("minilm-l6-msmarco-distilled") else {
        return;
    };
    let Some(reqs) = dl19_requests(1, 30) else {
        return;
    };
    let req = &reqs[0];
    let scores = |batch: usize, chunk: usize, docs: &[String]| -> Vec<f32> {
        let mut q = Req::new(req.query.clone(), docs.to_vec());
        q.opts.mode = Mode::Full;
        q.batch_size = Some(batch);
        q.chunk_tokens = Some(chunk);
        let out = q.run(&r).unwrap();
        let mut v = vec![0f32; docs.len()];
        for s in out.ranked {
            v[s.index] = s.logit;
        }
        v
    };
    let alone: Vec<f32> = req
        .documents
        .iter()
        .map(|d| scores(1, 4096, std::slice::from_ref(d))[0])
        .collect();
    for batch in [2, 7, 32] {
        let together = scores(batch, 4096, &req.documents);
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert!(
                (a - b).abs() < common::batch_tolerance(),
                "doc {i}: alone {a}, in batches of {batch}: {b}"
            );
        }
    }
    // A different companion set: the first document with the last five.
    let mut mix = vec![req.documents[0].clone()];
    mix.extend(req.documents[25..].iter().cloned());
    assert!((scores(32, 4096, &mix)[0] - alone[0]).abs() < common::batch_tolerance());
}

#[test]
fn pruning_is_deterministic_and_saves_compute_on_the_layerwise_model() {
    if std::env::var("GRATING_TEST_WEIGHTS").is_ok_and(|w| w == "f16") {
        println!(
            "skipped: f16 copies of the shared models are other checkpoints (no built-in profile)"
        );
        return;
    }
    let Some(r) = load("minilm-l6-msmarco-layerwise") else {
        return;
    };
    let Some(reqs) = dl19_requests(3, 100) else {
        return;
    };
    let mut saved_any = false;
    for req in &reqs {
        let mut q = req.clone();
        q.opts.top_k = Some(10);
        let a = q.run(&r).unwrap();
        let b = q.run(&r).unwrap();
        assert_eq!(a.ranked, b.ranked);
        assert_eq!(a.stats.prune_events, b.stats.prune_events);
        assert_eq!(a.stats.layers_per_candidate, b.stats.layers_per_candidate);
        saved_any |= a.stats.saved_percent > 0.0;
        assert_eq!(a.ranked.len(), 10);
    }
    assert!(
        saved_any,
        "the layerwise model's intermediate layers rank: pruning should trigger"
    );
}

#[test]
fn plain_model_early_layers_do_not_trigger_pruning() {
    let Some(r) = load("minilm-l6-msmarco-distilled") else {
        return;
    };
    let Some(reqs) = dl19_requests(3, 100) else {
        return;
    };
    for req in &reqs {
        let mut q = req.clone();
        q.opts.top_k = Some(10);
        let out = q.run(&r).unwrap();
        for e in &out.stats.prune_events {
            assert!(
                e.layer >= 5,
                "pruned after layer {} whose scores are flat",
                e.layer
            );
        }
    }
}

/// The shared models' built-in profiles are found by fingerprint: the layerwise model gets the
/// margin rule with movement for its ranking layers; the plain model is never pruned (its
/// layers before the last do not rank, so its profile switches every layer off).
#[test]
fn built_in_profiles_are_found_for_the_shared_models() {
    if std::env::var("GRATING_TEST_WEIGHTS").is_ok_and(|w| w == "f16") {
        println!(
            "skipped: f16 copies of the shared models are other checkpoints (no built-in profile)"
        );
        return;
    }
    let Some(lw) = load("minilm-l6-msmarco-layerwise") else {
        return;
    };
    let cfg = lw.prune_config();
    assert_eq!(cfg.rule, grating::prune::RuleKind::Margin);
    assert!(cfg.movement.len() == 5 && cfg.movement[3].is_some() && cfg.movement[4].is_some());
    assert!(cfg.movement[..3].iter().all(Option::is_none));
    let Some(plain) = load("minilm-l6-msmarco-distilled") else {
        return;
    };
    let cfg = plain.prune_config();
    assert!((1..=6).all(|l| !cfg.may_prune_after(l)), "{cfg:?}");
}
