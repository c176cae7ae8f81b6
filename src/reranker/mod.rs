//! The front door for library users: load a reranker once ([`Reranker::builder`]), then rank
//! documents for queries ([`Reranker::rerank`]); for concurrent callers, share the layer
//! passes of their requests through a [`SharedReranker`].
//!
//! ```no_run
//! use grating::{RerankOptions, Reranker};
//! let reranker = Reranker::builder("cross-encoder/ms-marco-MiniLM-L6-v2").build()?;
//! let docs = ["Paris is the capital of France.", "Berlin has many museums."];
//! let out = reranker.rerank("capital of France", &docs, &RerankOptions::top_k(1))?;
//! assert_eq!(out.ranked[0].index, 0);
//! # Ok::<(), grating::GratingError>(())
//! ```

mod builder;
mod options;
mod process;
pub mod scores;
mod shared;

pub use builder::RerankerBuilder;
pub use options::{EngineOptions, Execution, GpuPath, RerankOptions};
pub use scores::ScoreCalibration;
pub use shared::{Pending, SharedOptions, SharedReranker};

use crate::engine::{budget, Engine, Progress, RequestStats, RerankOutput, WeightsMode};
use crate::error::{GratingError, Result};
use crate::models::ModelInfo;
use crate::prune::PruneConfig;
use crate::tokenize::{EncodeOptions, EncodedPair, PairEncoder};
use crate::weights::ModelFiles;
use candle_core::{DType, Device};
use std::time::Instant;

/// A loaded reranker: model, tokenizer, where its layers come from, and the defaults its
/// requests use. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Reranker {
    engine: Engine,
    encoder: PairEncoder,
    files: ModelFiles,
    model_id: String,
    weights: WeightsMode,
    max_memory: Option<u64>,
    prune: PruneConfig,
    execution: Execution,
    /// The model's score calibration, when one was fitted (see [`scores`]).
    score_calibration: Option<ScoreCalibration>,
    /// Where the model's profiles are read from and learned ones written.
    profile_dir: std::path::PathBuf,
}

impl Reranker {
    /// Starts loading `model`: a local HF directory or a hub id.
    pub fn builder(model: impl Into<String>) -> RerankerBuilder {
        RerankerBuilder::new(model)
    }

    /// Loads `model` with settings gathered in one struct (what the builder fills in).
    pub fn load(model: &str, opts: &EngineOptions) -> Result<Reranker> {
        RerankerBuilder::new(model).options(opts.clone()).build()
    }

    pub fn info(&self) -> &ModelInfo {
        self.engine.model.info()
    }

    /// The model as it was named when loading (a directory or a hub id).
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The 0-1 relevance score of a logit: the model's calibration when it has one (a
    /// probability of relevance fitted on judged data), else the plain sigmoid. Monotone in
    /// the logit, so it never changes a ranking.
    pub fn relevance(&self, logit: f32) -> f32 {
        match &self.score_calibration {
            Some(c) => c.apply(logit),
            None => crate::engine::sigmoid(logit),
        }
    }

    /// The calibration [`Reranker::relevance`] uses, if any.
    pub fn score_calibration(&self) -> Option<&ScoreCalibration> {
        self.score_calibration.as_ref()
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn device(&self) -> &Device {
        &self.engine.device
    }

    pub fn dtype(&self) -> DType {
        self.engine.dtype
    }

    /// Where the layer weights live (`Auto` is resolved at load).
    pub fn weights_mode(&self) -> WeightsMode {
        self.weights
    }

    /// The pruning rule requests use unless they bring their own.
    /// The directory of the model's pruning and score profiles (`EngineOptions::profile_dir`
    /// or the platform's default): where the server's self-calibration saves what it learns.
    pub fn profile_dir(&self) -> &std::path::Path {
        &self.profile_dir
    }

    pub fn prune_config(&self) -> &PruneConfig {
        &self.prune
    }

    /// How candidates are grouped for compute.
    pub fn execution(&self) -> &Execution {
        &self.execution
    }

    /// Tokens of `text` alone, without the pair template.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        self.encoder
            .tokenizer()
            .encode(text, false)
            .map(|e| e.len())
            .map_err(|e| GratingError::Tokenizer(e.to_string()))
    }

    /// Tokens the pair template adds around the query and the document.
    pub fn template_tokens(&self) -> usize {
        self.encoder.template_tokens()
    }

    /// Tokenizes `query` against each document with the request's truncation settings.
    pub fn encode<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
    ) -> Result<Vec<EncodedPair>> {
        let docs: Vec<&str> = documents.iter().map(AsRef::as_ref).collect();
        let model_max = self.info().max_length;
        let max_length = opts.max_length.unwrap_or(model_max);
        if max_length > model_max {
            return Err(GratingError::LimitExceeded(format!(
                "max length {max_length} exceeds the model's {model_max}"
            )));
        }
        self.encoder.encode(
            query,
            &docs,
            &EncodeOptions {
                max_length,
                truncation: opts.truncation,
                instruction: opts.instruction.clone(),
                truncate: opts.truncate,
            },
        )
    }

    /// Ranks `documents` for `query`: the top K (or all), best first, with the request's stats.
    pub fn rerank<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
    ) -> Result<RerankOutput> {
        self.run(query, documents, opts, None)
    }

    /// [`Reranker::rerank`], reporting progress (layers in grating mode, batches in full mode).
    pub fn rerank_with_progress<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
        progress: &dyn Progress,
    ) -> Result<RerankOutput> {
        self.run(query, documents, opts, Some(progress))
    }

    fn run<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
        progress: Option<&dyn Progress>,
    ) -> Result<RerankOutput> {
        let start = Instant::now();
        let k = opts.k_for(documents.len())?;
        let pairs = self.encode(query, documents, opts)?;
        let tokenize_seconds = start.elapsed().as_secs_f64();
        let grouping = self.execution_for(opts)?.grouping();
        let mut out = match opts.mode {
            crate::engine::Mode::Full => self.engine.rerank_full(&pairs, k, grouping, progress)?,
            crate::engine::Mode::Grating => {
                let prune = opts.prune.as_ref().unwrap_or(&self.prune);
                prune.validate()?;
                let (grouping, predicted) = match self.max_memory {
                    Some(limit) => {
                        let plan = budget::plan_request(&self.engine, limit, &pairs, grouping)?;
                        (plan.0, plan.1)
                    }
                    None => (grouping, 0.0),
                };
                let mut out = self.engine.rerank(pairs, k, prune, grouping, progress)?;
                out.stats.predicted_peak_mib = predicted;
                out
            }
        };
        out.stats.tokenize_seconds = tokenize_seconds;
        out.stats.total_seconds = start.elapsed().as_secs_f64();
        out.stats.gpu_memory = crate::memory::gpu_memory(&self.engine.device);
        Ok(out)
    }

    /// Scores of every candidate after every layer (`[layer][candidate]`, no pruning): what
    /// calibration and evaluation replay pruning rules on.
    pub fn layer_scores<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
    ) -> Result<(Vec<Vec<f32>>, RequestStats)> {
        let pairs = self.encode(query, documents, opts)?;
        let grouping = self.execution_for(opts)?.grouping();
        self.engine.layer_scores(pairs, grouping)
    }

    /// The request's grouping, else the reranker's.
    fn execution_for(&self, opts: &RerankOptions) -> Result<Execution> {
        let e = opts.execution.unwrap_or(self.execution);
        e.validate()?;
        Ok(e)
    }
}
