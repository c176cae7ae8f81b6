//! grating: fast, memory-bounded semantic top-K selection with cross-encoder rerankers.
//!
//! The layout follows the path of a request:
//! - [`tokenize`]: (query, document) pairs or the Qwen3-Reranker prompt -> token ids.
//! - [`models`]: one file per architecture behind a layer-wise API (embed, layer, head).
//! - [`ops`]: the tensor operations those files are written in, with fast CPU kernels.
//! - [`weights`]: locating, indexing and reading safetensors weights.
//! - [`engine`]: full inference (the baseline) and GRATING's monolithic forwarding.
//! - [`prune`]: dispersion, optimal 1-D clustering and the accept/drop rule.
//! - [`eval`]: BM25 candidates, TREC DL metrics and the evaluation harness.

pub mod engine;
pub mod error;
pub mod eval;
pub mod memory;
pub mod models;
pub mod ops;
pub mod prune;
#[cfg(feature = "server")]
pub mod server;
pub mod synth;
pub mod tokenize;
pub mod weights;

pub use engine::{EngineOptions, Mode, RerankOutput, RerankRequest, Reranker, Scored};
pub use error::{GratingError, Result};
