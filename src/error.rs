//! Library error type. Every failure a user can cause (bad input, bad files, exceeded limits)
//! maps to a variant with a message that names the offending thing, so front ends can turn it
//! into a clear CLI message or a 4xx response without guessing.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GratingError {
    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("limit exceeded: {0}")]
    LimitExceeded(String),

    #[error("model directory {path}: {reason}")]
    ModelFiles { path: PathBuf, reason: String },

    #[error("config.json: {0}")]
    Config(String),

    #[error("unsupported architecture {found:?}; supported: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },

    #[error("weights: tensor `{name}` is missing")]
    MissingTensor { name: String },

    #[error("weights: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("weights: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },

    #[error("weights file {path}: {reason}")]
    WeightFile { path: PathBuf, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("memory budget: {0}")]
    MemoryBudget(String),

    #[error("request cancelled: {0}")]
    Cancelled(String),

    /// The model produced NaN or infinity for a candidate: a fault of the weights or the
    /// engine, never of the caller's text.
    #[error("document {document} produced a non-finite score (the model's weights or the engine are at fault)")]
    NonFiniteScore { document: usize },

    /// A bug inside the engine (a caught panic, a stopped scheduler); never the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),

    #[error("tensor backend: {0}")]
    Backend(#[from] candle_core::Error),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl GratingError {
    /// True when the caller's input (not the engine or its files) caused the error; servers
    /// answer these with a 4xx status.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            GratingError::InvalidInput(_)
                | GratingError::LimitExceeded(_)
                | GratingError::MemoryBudget(_)
                | GratingError::Tokenizer(_)
        )
    }

    /// The same error again, for answering several requests that one fault stopped (the
    /// backend's and the OS's errors are not `Clone`; their copies keep kind and message).
    pub fn replicate(&self) -> GratingError {
        use GratingError as E;
        match self {
            E::InvalidInput(m) => E::InvalidInput(m.clone()),
            E::LimitExceeded(m) => E::LimitExceeded(m.clone()),
            E::ModelFiles { path, reason } => E::ModelFiles {
                path: path.clone(),
                reason: reason.clone(),
            },
            E::Config(m) => E::Config(m.clone()),
            E::UnsupportedArchitecture { found, supported } => E::UnsupportedArchitecture {
                found: found.clone(),
                supported: supported.clone(),
            },
            E::MissingTensor { name } => E::MissingTensor { name: name.clone() },
            E::ShapeMismatch {
                name,
                expected,
                found,
            } => E::ShapeMismatch {
                name: name.clone(),
                expected: expected.clone(),
                found: found.clone(),
            },
            E::UnsupportedDtype { name, dtype } => E::UnsupportedDtype {
                name: name.clone(),
                dtype: dtype.clone(),
            },
            E::WeightFile { path, reason } => E::WeightFile {
                path: path.clone(),
                reason: reason.clone(),
            },
            E::Tokenizer(m) => E::Tokenizer(m.clone()),
            E::MemoryBudget(m) => E::MemoryBudget(m.clone()),
            E::Cancelled(m) => E::Cancelled(m.clone()),
            E::NonFiniteScore { document } => E::NonFiniteScore {
                document: *document,
            },
            E::Internal(m) => E::Internal(m.clone()),
            E::Backend(e) => E::Backend(candle_core::Error::Msg(e.to_string())),
            E::Io(e) => E::Io(std::io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// A stable, machine-readable name of the kind of failure, the same in every front end
    /// (the server's `error_type`, the Python exception's `kind`).
    pub fn error_type(&self) -> &'static str {
        match self {
            GratingError::InvalidInput(_) => "invalid_request",
            GratingError::LimitExceeded(_) => "limit_exceeded",
            GratingError::MemoryBudget(_) => "memory_budget",
            GratingError::Tokenizer(_) => "tokenizer",
            GratingError::Cancelled(_) => "cancelled",
            GratingError::NonFiniteScore { .. } => "non_finite_score",
            GratingError::ModelFiles { .. }
            | GratingError::Config(_)
            | GratingError::UnsupportedArchitecture { .. }
            | GratingError::MissingTensor { .. }
            | GratingError::ShapeMismatch { .. }
            | GratingError::UnsupportedDtype { .. }
            | GratingError::WeightFile { .. } => "model_files",
            GratingError::Backend(_) => "backend",
            GratingError::Io(_) => "io",
            GratingError::Internal(_) => "internal",
        }
    }
}

pub type Result<T> = std::result::Result<T, GratingError>;
