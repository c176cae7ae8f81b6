//! What a user chooses: per request ([`RerankOptions`]) and per loaded model
//! ([`EngineOptions`], set through [`super::RerankerBuilder`]), with the defaults that depend on
//! the device.

use crate::engine::{Grouping, Mode, WeightsMode, DEFAULT_CHUNK_TOKENS};
use crate::error::{GratingError, Result};
pub use crate::ops::GpuPath;
use crate::prune::PruneConfig;
use crate::tokenize::Truncation;
use candle_core::{DType, Device};
use std::path::PathBuf;

/// Per-request choices. `RerankOptions::default()` ranks every document in grating mode with
/// the reranker's own pruning rule; [`RerankOptions::top_k`] is the usual start.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankOptions {
    /// Return the K best, best first; `None` scores and returns every document. `Some(0)` is
    /// refused (everywhere: library, CLI and server).
    pub top_k: Option<usize>,
    pub mode: Mode,
    /// The pruning rule; `None` uses the reranker's (its calibrated profile, else the
    /// built-in default).
    pub prune: Option<PruneConfig>,
    /// Most tokens of one (query, document) sequence; at most the model's (its default).
    pub max_length: Option<usize>,
    /// Which end of a document is cut when it does not fit.
    pub truncation: Truncation,
    /// When false, a pair that does not fit is an error instead of being cut.
    pub truncate: bool,
    /// Decoder rerankers only: the instruction line of the prompt.
    pub instruction: Option<String>,
    /// How this request's candidates are grouped for compute; `None` uses the reranker's
    /// (a memory budget may still shrink the chunks).
    pub execution: Option<Execution>,
}

impl Default for RerankOptions {
    fn default() -> Self {
        RerankOptions {
            top_k: None,
            mode: Mode::Grating,
            prune: None,
            max_length: None,
            truncation: Truncation::Right,
            truncate: true,
            instruction: None,
            execution: None,
        }
    }
}

impl RerankOptions {
    /// The `k` best documents, the rest as default.
    pub fn top_k(k: usize) -> RerankOptions {
        RerankOptions {
            top_k: Some(k),
            ..Default::default()
        }
    }

    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    pub fn with_prune(mut self, prune: PruneConfig) -> Self {
        self.prune = Some(prune);
        self
    }

    pub fn with_max_length(mut self, max_length: usize) -> Self {
        self.max_length = Some(max_length);
        self
    }

    pub fn with_instruction(mut self, instruction: impl Into<String>) -> Self {
        self.instruction = Some(instruction.into());
        self
    }

    pub fn with_execution(mut self, execution: Execution) -> Self {
        self.execution = Some(execution);
        self
    }

    /// K for `candidates` documents: `top_k`, at most the documents; all without it.
    pub(crate) fn k_for(&self, candidates: usize) -> Result<usize> {
        match self.top_k {
            Some(0) => Err(GratingError::InvalidInput(
                "top_k must be at least 1 (omit it to rank every document)".into(),
            )),
            Some(k) => Ok(k.min(candidates)),
            None => Ok(candidates),
        }
    }
}

/// How candidates are grouped for compute, unless a memory budget decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    /// Candidates per batch in full mode.
    pub batch_size: usize,
    /// Tokens per chunk in grating mode, and most tokens of a full-mode batch (bounds
    /// activation memory in both).
    pub chunk_tokens: usize,
    /// Offload hidden states of chunks not being computed to a scratch file (grating mode).
    pub offload: bool,
}

/// GPU defaults of [`Execution`]: the configuration docs/gpu.md measured (the GEMMs of a large
/// GPU need large operands; 100 docs of 128-384 tokens in one chunk).
const GPU_CHUNK_TOKENS: usize = 65536;
const GPU_BATCH_SIZE: usize = 100_000;
/// CPU full-mode batch: 32 candidates (docs/RESULTS.md's baseline configuration).
const CPU_BATCH_SIZE: usize = 32;

impl Execution {
    /// The measured defaults for `device`.
    pub fn for_device(device: &Device) -> Execution {
        if device.is_cpu() {
            Execution {
                batch_size: CPU_BATCH_SIZE,
                chunk_tokens: DEFAULT_CHUNK_TOKENS,
                offload: false,
            }
        } else {
            Execution {
                batch_size: GPU_BATCH_SIZE,
                chunk_tokens: GPU_CHUNK_TOKENS,
                offload: false,
            }
        }
    }

    /// Refuses groupings that cannot run.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.chunk_tokens == 0 {
            return Err(GratingError::InvalidInput(
                "batch size and chunk tokens must be positive".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn grouping(&self) -> Grouping {
        Grouping {
            batch_size: self.batch_size,
            chunk_tokens: self.chunk_tokens,
            offload: self.offload,
        }
    }
}

/// Everything fixed when a model is loaded. Build it with [`super::Reranker::builder`]; every
/// field left `None` takes the default for the device.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    /// Compute dtype; f32 on the CPU, bf16 on a GPU unless set.
    pub dtype: Option<DType>,
    pub weights: WeightsMode,
    /// Streaming only: share of the vocabulary the embedding-row cache may keep.
    pub embedding_cache_share: f32,
    /// Peak memory budget in bytes: with `WeightsMode::Auto` it picks resident or streaming,
    /// and per request it picks the chunk size and offload (grating mode).
    pub max_memory: Option<u64>,
    /// Compute threads (rayon and BLAS; process-wide). `None` leaves them as they are (all
    /// cores unless something set them).
    pub threads: Option<usize>,
    pub batch_size: Option<usize>,
    pub chunk_tokens: Option<usize>,
    pub offload: bool,
    /// The pruning rule requests use unless they bring their own; `None`: the model's
    /// calibrated profile if there is one, else the built-in default.
    pub prune: Option<PruneConfig>,
    /// Where calibrated profiles are looked up (`None`: the platform's cache directory).
    pub profile_dir: Option<PathBuf>,
    /// Whether to use a calibrated profile at all.
    pub use_profile: bool,
    /// Where offloaded hidden states go (`None`: the system's temporary directory).
    pub spill_dir: Option<PathBuf>,
    /// Threads reading a streamed layer bound for a GPU (`None`: up to 4).
    pub read_threads: Option<usize>,
    /// GPU paths to run on candle's generic kernels instead of grating's (process-wide; for
    /// comparisons). `None` leaves the process's choice as it is (grating's kernels).
    pub generic_gpu_paths: Option<Vec<GpuPath>>,
    /// Synchronise after each stage of a layer and report stage times at exit (process-wide;
    /// for profiling accelerators). `None` leaves it as it is (off).
    pub stage_profile: Option<bool>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Cpu,
            dtype: None,
            weights: WeightsMode::Resident,
            embedding_cache_share: 0.1,
            max_memory: None,
            threads: None,
            batch_size: None,
            chunk_tokens: None,
            offload: false,
            prune: None,
            profile_dir: None,
            use_profile: true,
            spill_dir: None,
            read_threads: None,
            generic_gpu_paths: None,
            stage_profile: None,
        }
    }
}

impl EngineOptions {
    /// The grouping for this device, with the options' overrides; zeros are refused.
    pub(crate) fn execution(&self) -> Result<Execution> {
        let mut e = Execution::for_device(&self.device);
        if let Some(b) = self.batch_size {
            e.batch_size = b;
        }
        if let Some(c) = self.chunk_tokens {
            e.chunk_tokens = c;
        }
        e.offload = self.offload;
        e.validate()?;
        Ok(e)
    }

    /// Checks what can be checked before loading anything.
    pub(crate) fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.embedding_cache_share) {
            return Err(GratingError::InvalidInput(
                "embedding cache share must be in [0, 1]".into(),
            ));
        }
        if self.threads == Some(0) || self.read_threads == Some(0) {
            return Err(GratingError::InvalidInput(
                "thread counts must be positive".into(),
            ));
        }
        if let Some(p) = &self.prune {
            p.validate()?;
        }
        self.execution().map(|_| ())
    }
}
