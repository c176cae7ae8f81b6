//! grating: fast, memory-bounded semantic top-K selection with cross-encoder rerankers.
//!
//! Start at [`Reranker::builder`]: load a model once, then [`Reranker::rerank`] a query's
//! documents; many concurrent callers share layer passes through a [`SharedReranker`].
//!
//! The layout follows the path of a request:
//! - [`reranker`]: the front door (builder, options, the shared reranker);
//! - [`tokenize`]: (query, document) pairs or a decoder's prompt -> token ids;
//! - `engine` (internal): a request's state machine, the single-request loop, the shared scheduler,
//!   full inference (the baseline) and the layer provider that owns residency;
//! - [`prune`]: dispersion, optimal 1-D clustering and the accept/drop rule;
//! - `models` (internal): one file per architecture behind a layer-wise API (embed, layer, head);
//! - `weights` (internal): locating, indexing and reading safetensors weights (the weight store);
//! - [`ops`]: the tensor operations the model files are written in;
//! - [`eval`]: BM25 candidates, TREC DL metrics; [`synth`]: random-weight models for tests;
//! - `server` (feature `server`): the HTTP front end, which only translates.

#![warn(clippy::undocumented_unsafe_blocks)]

pub(crate) mod engine;
pub mod error;
pub mod eval;
pub mod memory;
pub(crate) mod models;
/// The tensor operations, public only so the GPU kernel tests (`tests/gpu.rs`) can check each
/// kernel against candle's generic path; not part of the API.
#[doc(hidden)]
pub mod ops;
pub mod prune;
pub mod reranker;
#[cfg(feature = "server")]
pub mod server;
pub mod synth;
pub mod tokenize;
pub(crate) mod weights;

/// No sequence may exceed this many tokens, whatever the model or flags say: it bounds the
/// rotary tables and the attention scratch.
pub const HARD_MAX_TOKENS: usize = 32 * 1024;

/// The shared pass's step policies and counters (for [`SharedOptions::policy`] and
/// [`SharedReranker::counters`]).
pub mod scheduler {
    pub use crate::engine::scheduler::policy::{
        plan_step, predict_next_layer, Rank, StepCandidate, StepPlan,
    };
    pub use crate::engine::scheduler::{
        Counters, QueueOrder, RankedPolicy, StepPolicy, DEFAULT_CACHED_LAYERS,
        DEFAULT_STARVE_AFTER_STEPS, DEFAULT_STEP_TOKENS,
    };
}

pub use engine::budget::parse_size;
pub use engine::scheduler::{QueueOrder, RankedPolicy, StepPolicy};
pub use engine::stats::LayerTiming;
pub use engine::{
    sigmoid, Mode, Progress, RequestStats, RerankOutput, Scored, WeightsMode, DEFAULT_CHUNK_TOKENS,
};
pub use error::{GratingError, Result};
pub use models::{ModelInfo, ScoreKind};
pub use prune::PruneEvent;
pub use prune::{PruneConfig, PruneMode};
pub use reranker::{
    EngineOptions, Execution, Pending, RerankOptions, Reranker, RerankerBuilder, SharedOptions,
    SharedReranker,
};
pub use tokenize::Truncation;
pub use weights::ModelFiles;
