//! The shared pass through the public API ([`SharedReranker`]): requests interleaved at chunk
//! granularity across many small steps, under every queue order, with resident or streamed
//! layers, must get exactly (bit for bit) the answers they get alone. Runs on the committed
//! tiny fixtures everywhere, and on the shared MiniLM when `../shared` is there.

mod common;

use common::Req;
use grating::{
    EngineOptions, GratingError, QueueOrder, RankedPolicy, RerankOptions, Reranker, SharedOptions,
    SharedReranker, WeightsMode,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn load(dir: &std::path::Path, weights: WeightsMode) -> Arc<Reranker> {
    let opts = EngineOptions {
        weights,
        ..Default::default()
    };
    Arc::new(Reranker::load(dir.to_str().unwrap(), &opts).expect("load model"))
}

/// `n` documents of 5 to 60 words from a small vocabulary (lengths vary so chunks repack).
fn documents(n: usize) -> Vec<String> {
    let words = [
        "river", "bank", "loan", "water", "flow", "credit", "interest", "fish", "boat", "rate",
        "deposit", "stream", "current", "account", "mortgage", "bridge", "flea", "spruce", "heart",
        "life",
    ];
    (0..n)
        .map(|i| {
            (0..5 + (i * 7) % 56)
                .map(|j| words[(i * 5 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Where the shared pass's steps get their layers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layers {
    Resident,
    Stream,
    /// Rebuilt from the memory-mapped checkpoint whenever a step needs one not built.
    Reload,
}

/// Submits four overlapping requests at once to a shared pass with a tiny step budget and
/// small chunks, under each queue order, and compares every answer with the same request run
/// alone.
fn interleaving_is_exact(resident: &Arc<Reranker>, streamed: &Arc<Reranker>, all: &[String]) {
    let chunk_tokens = 600;
    let configs = [
        (QueueOrder::least_attained(), Layers::Resident, 2),
        (QueueOrder::shortest_remaining(), Layers::Resident, 2),
        ("most-shared".parse().unwrap(), Layers::Resident, 2),
        (
            "shortest-remaining-aligned".parse().unwrap(),
            Layers::Stream,
            2,
        ),
        (QueueOrder::alternating(), Layers::Stream, 1),
        (
            "shortest-remaining,most-shared".parse().unwrap(),
            Layers::Stream,
            2,
        ),
        (
            "shortest-unpruned-remaining".parse().unwrap(),
            Layers::Stream,
            2,
        ),
        (QueueOrder::default(), Layers::Stream, 2),
        (QueueOrder::default(), Layers::Reload, 1),
        (QueueOrder::least_attained(), Layers::Reload, 2),
    ];
    for (order, layers, cached_layers) in configs {
        let stream = layers == Layers::Stream;
        let r = if stream { streamed } else { resident };
        let shared = SharedReranker::new(
            r.clone(),
            SharedOptions {
                step_tokens: 1500,
                policy: Arc::new(RankedPolicy {
                    order: order.clone(),
                    ..Default::default()
                }),
                cached_layers,
                chunk_tokens,
                reload_layers: layers == Layers::Reload,
                ..Default::default()
            },
        )
        .expect("start the shared pass");
        let cases: Vec<(&str, std::ops::Range<usize>, usize)> = vec![
            ("what is the daily life of thai people", 0..60, 5),
            ("causes of left ventricular hypertrophy", 60..70, 2),
            ("how long is life cycle of flea", 70..120, 50),
            ("what is physical description of spruce", 10..40, 1),
        ];
        let mut pending = Vec::new();
        let mut expected = Vec::new();
        for (q, range, k) in &cases {
            let mut req = Req::new(*q, all[range.clone()].to_vec());
            req.opts.top_k = Some(*k);
            req.chunk_tokens = Some(chunk_tokens);
            expected.push(req.run(r).unwrap());
            pending.push(shared.submit(q, &req.documents, &req.opts, None).unwrap());
        }
        for (i, (p, exp)) in pending.into_iter().zip(&expected).enumerate() {
            let got = p.wait().unwrap();
            assert_eq!(got.ranked, exp.ranked, "{order:?} case {i}");
            assert_eq!(
                got.stats.layers_per_candidate, exp.stats.layers_per_candidate,
                "{order:?} case {i}"
            );
            assert_eq!(
                got.stats.prune_events, exp.stats.prune_events,
                "{order:?} case {i}"
            );
        }
        let c = shared.counters();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (steps, served) = (load(&c.steps), load(&c.request_steps));
        let (loads, ahead) = (load(&c.layer_loads), load(&c.read_ahead_hits));
        eprintln!(
            "{order:?}, {layers:?} layers, {cached_layers} cached: {steps} steps served \
             {served} request-steps; {loads} layer loads, {ahead} read ahead"
        );
        assert!(
            served > steps,
            "{order:?}: no step was shared between requests"
        );
        // Steps at the layer of the previous step reuse it; reloaded layers are counted as
        // loads too.
        assert!(loads < steps, "{order:?}: every step loaded its layer");
        if layers == Layers::Reload {
            assert!(loads > 0, "{order:?}: no layer was reloaded");
        }
        if stream {
            assert!(ahead > 0, "{order:?}: no layer was read ahead");
        }
        shared.shutdown();
    }
}

#[test]
fn shared_pass_equals_alone_on_the_fixtures() {
    for name in ["xlm-roberta-tiny", "qwen3-tiny"] {
        let dir = common::fixture(name);
        let (resident, streamed) = (
            load(&dir, WeightsMode::Resident),
            load(&dir, WeightsMode::Stream),
        );
        interleaving_is_exact(&resident, &streamed, &documents(120));
    }
}

#[test]
fn shared_pass_equals_alone_on_the_shared_model() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    let corpus = common::shared_dir()
        .expect("shared dir")
        .join("data/trec-dl19-subset/corpus.jsonl");
    let text = std::fs::read_to_string(corpus).unwrap();
    let all: Vec<String> = text
        .lines()
        .take(120)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let (resident, streamed) = (
        load(&dir, WeightsMode::Resident),
        load(&dir, WeightsMode::Stream),
    );
    interleaving_is_exact(&resident, &streamed, &all);
}

/// The same question asked the same way everywhere: K = 0 is refused, no K means all, and the
/// shared pass refuses what it cannot run, each with a clear error.
#[test]
fn k_zero_and_bad_options_are_refused_the_same_everywhere() {
    let r = load(&common::fixture("xlm-roberta-tiny"), WeightsMode::Resident);
    let docs = documents(7);
    let zero = RerankOptions::top_k(0);
    let alone = r.rerank("q", &docs, &zero).unwrap_err();
    assert!(matches!(alone, GratingError::InvalidInput(_)), "{alone}");
    assert!(
        alone.to_string().contains("top_k must be at least 1"),
        "{alone}"
    );
    let full = r
        .rerank("q", &docs, &zero.clone().with_mode(grating::Mode::Full))
        .unwrap_err();
    assert_eq!(full.to_string(), alone.to_string());
    let all = r.rerank("q", &docs, &RerankOptions::default()).unwrap();
    assert_eq!(all.ranked.len(), docs.len());

    let shared = SharedReranker::new(r.clone(), SharedOptions::default()).unwrap();
    let e = shared.rerank_blocking("q", &docs, &zero).unwrap_err();
    assert_eq!(e.to_string(), alone.to_string());
    let e = shared
        .rerank_blocking(
            "q",
            &docs,
            &RerankOptions::default().with_mode(grating::Mode::Full),
        )
        .unwrap_err();
    assert!(matches!(e, GratingError::InvalidInput(_)), "{e}");
    let all_shared = shared
        .rerank_blocking("q", &docs, &RerankOptions::default())
        .unwrap();
    assert_eq!(all_shared.ranked, all.ranked);
    let no_docs: [&str; 0] = [];
    let e = shared
        .rerank_blocking("q", &no_docs, &RerankOptions::top_k(1))
        .unwrap_err();
    assert_eq!(e.error_type(), "invalid_request", "{e}");
    let mut bad = RerankOptions::top_k(2);
    bad.prune = Some(grating::PruneConfig {
        max_clusters: 1,
        ..Default::default()
    });
    let e = r.rerank("q", &docs, &bad).unwrap_err();
    assert!(e.to_string().contains("max clusters"), "{e}");
    assert!(SharedReranker::new(
        r.clone(),
        SharedOptions {
            step_tokens: 0,
            ..Default::default()
        }
    )
    .is_err());
}

/// A request whose `Pending` is dropped unanswered is cancelled in the pass, and a deadline
/// in the past answers `Cancelled`; the pass keeps serving.
#[test]
fn dropped_and_expired_requests_are_cancelled() {
    let r = load(&common::fixture("qwen3-tiny"), WeightsMode::Resident);
    let shared = SharedReranker::new(r.clone(), SharedOptions::default()).unwrap();
    let docs = documents(40);
    let past = std::time::Instant::now() - Duration::from_millis(1);
    let e = shared
        .submit("q", &docs, &RerankOptions::top_k(3), Some(past))
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(matches!(e, GratingError::Cancelled(_)), "{e}");
    drop(
        shared
            .submit("q", &docs, &RerankOptions::top_k(3), None)
            .unwrap(),
    );
    let out = shared
        .rerank_blocking("q", &docs, &RerankOptions::top_k(3))
        .unwrap();
    assert_eq!(out.ranked.len(), 3);
}
