//! Evaluation on TREC DL: BM25 candidates, graded-relevance metrics, agreement with full
//! inference.
