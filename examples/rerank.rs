//! Rank three passages for a query: `cargo run --release --example rerank -- MODEL_DIR_OR_HUB_ID`.
use grating::{RerankOptions, Reranker};

fn main() -> grating::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or("../shared/models/minilm-l6-msmarco-layerwise".into());
    let reranker = Reranker::builder(model).build()?;
    let docs = [
        "A monotonic function never decreases.",
        "Paris is in France.",
        "Rivers flow downhill.",
    ];
    let out = reranker.rerank(
        "what is a monotonic function",
        &docs,
        &RerankOptions::top_k(2),
    )?;
    for s in &out.ranked {
        println!("{:.4}  {}", reranker.relevance(s.logit), docs[s.index]);
    }
    Ok(())
}
