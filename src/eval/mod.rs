//! Evaluation on TREC DL: BM25 candidates, graded-relevance metrics, agreement with full
//! inference.

pub mod bm25;
pub mod dl19;
pub mod metrics;
