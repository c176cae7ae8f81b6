//! Many callers, one shared layer-major pass: each thread's request rides in the same layer
//! steps as the others', and each gets exactly the answer it would get alone.
//!
//! `cargo run --release --example concurrent -- MODEL_DIR_OR_HUB_ID`
use grating::{RerankOptions, Reranker, SharedOptions, SharedReranker};
use std::sync::Arc;

fn main() -> grating::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or("../shared/models/minilm-l6-msmarco-layerwise".into());
    let reranker = Arc::new(Reranker::builder(model).build()?);
    let shared = Arc::new(SharedReranker::new(
        reranker.clone(),
        SharedOptions::default(),
    )?);
    let queries = [
        "what is a monotonic function",
        "how do rivers form",
        "capital of france",
        "why is the sky blue",
    ];
    let docs: Vec<String> = [
        "A monotonic function is one that never decreases, or never increases.",
        "Rivers form where rain and melting snow gather and flow downhill.",
        "Paris is the capital and largest city of France.",
        "Sunlight scatters off air molecules, and blue light scatters most.",
        "The stock market closed higher on Tuesday.",
    ]
    .map(String::from)
    .to_vec();
    let threads: Vec<_> = queries
        .iter()
        .map(|&q| {
            let (shared, docs) = (shared.clone(), docs.clone());
            std::thread::spawn(move || {
                let out = shared.rerank_blocking(q, &docs, &RerankOptions::top_k(1))?;
                // The same request alone gives the same answer.
                let alone = shared
                    .reranker()
                    .rerank(q, &docs, &RerankOptions::top_k(1))?;
                assert_eq!(out.ranked, alone.ranked);
                Ok::<_, grating::GratingError>((q, out.ranked[0]))
            })
        })
        .collect();
    for t in threads {
        let (q, best) = t.join().expect("a caller thread panicked")?;
        println!(
            "{q:32} -> {:.4}  {}",
            reranker.relevance(best.logit),
            docs[best.index]
        );
    }
    let steps = shared
        .counters()
        .steps
        .load(std::sync::atomic::Ordering::Relaxed);
    let served = shared
        .counters()
        .request_steps
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("{steps} layer steps served {served} request-steps");
    Ok(())
}
