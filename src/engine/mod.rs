//! The execution engine: a loaded model plus its tokenizer, and the two orders of execution
//! over the same model code: full inference (the baseline) and GRATING's monolithic,
//! layer-major forwarding with progressive pruning.

pub mod full;
pub mod monolithic;
pub mod shared;
pub mod stats;

use crate::error::{GratingError, Result};
use crate::models::{self, LoadOptions, ModelInfo, RerankModel};
use crate::prune::PruneConfig;
use crate::tokenize::{EncodeOptions, EncodedPair, PairEncoder, Truncation};
use crate::weights::{MmapSource, ModelFiles, WeightIndex};
use candle_core::{DType, Device};
pub use stats::{LayerTiming, PruneEvent, RequestStats};
use std::sync::Arc;
use std::time::Instant;

/// How candidates are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Conventional batches through all layers; every score exact.
    Full,
    /// Monolithic layer-major forwarding with progressive cluster pruning.
    Grating,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(Mode::Full),
            "grating" => Ok(Mode::Grating),
            _ => Err(format!("unknown mode {s:?} (full, grating)")),
        }
    }
}

/// Receives progress of long requests (a CLI progress bar, for instance).
pub trait Progress: Sync {
    fn step(&self, done: usize, total: usize);
}

/// Engine-wide settings fixed at load time.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    /// Compute dtype; f32 on CPU unless asked otherwise.
    pub dtype: Option<DType>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Cpu,
            dtype: None,
        }
    }
}

/// One top-K (or score-everything) request.
#[derive(Debug, Clone)]
pub struct RerankRequest {
    pub query: String,
    pub documents: Vec<String>,
    /// K; `None` scores and returns every document.
    pub top_k: Option<usize>,
    pub mode: Mode,
    /// Candidates per batch in full mode.
    pub batch_size: usize,
    /// Tokens per chunk in grating mode.
    pub chunk_tokens: usize,
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    pub truncate: bool,
    pub instruction: Option<String>,
    pub prune: PruneConfig,
}

impl RerankRequest {
    pub fn new(query: impl Into<String>, documents: Vec<String>) -> Self {
        RerankRequest {
            query: query.into(),
            documents,
            top_k: None,
            mode: Mode::Grating,
            batch_size: 32,
            chunk_tokens: monolithic::DEFAULT_CHUNK_TOKENS,
            max_length: None,
            truncation: Truncation::Right,
            truncate: true,
            instruction: None,
            prune: PruneConfig::default(),
        }
    }
}

/// A ranked candidate: `index` into the request's documents, and its raw logit.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scored {
    pub index: usize,
    pub logit: f32,
}

#[derive(Debug, Clone)]
pub struct RerankOutput {
    /// The top K (or all) candidates, best first.
    pub ranked: Vec<Scored>,
    pub stats: RequestStats,
}

/// The sigmoid users expect for a single relevance logit (P(yes) for Qwen3).
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Sorts best first; ties keep document order so results are deterministic.
pub(crate) fn rank(scores: impl IntoIterator<Item = Scored>) -> Vec<Scored> {
    let mut v: Vec<Scored> = scores.into_iter().collect();
    v.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.index.cmp(&b.index)));
    v
}

/// A loaded reranker: model, tokenizer and the files they came from.
pub struct Reranker {
    model: Arc<dyn RerankModel>,
    encoder: PairEncoder,
    files: ModelFiles,
    model_id: String,
}

impl Reranker {
    /// Loads `model` (a local HF directory or a hub id) with all layers resident.
    pub fn load(model: &str, opts: &EngineOptions) -> Result<Reranker> {
        let files = ModelFiles::resolve(model)?;
        let config_text = std::fs::read_to_string(&files.config)?;
        let (arch, _) = models::detect_architecture(&config_text)?;
        let encoder = PairEncoder::from_file(&files.tokenizer, arch)?;
        let index = WeightIndex::open(&files.weights)?;
        let dtype = opts.dtype.unwrap_or(if opts.device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        });
        let src = MmapSource::open(index, dtype, opts.device.clone())?;
        let load = LoadOptions {
            device: opts.device.clone(),
            dtype,
            resident_layers: true,
            yes_no_ids: encoder.yes_no_ids,
        };
        let model_arc = models::load_model(&files, &src, &load)?;
        Ok(Reranker {
            model: model_arc,
            encoder,
            files,
            model_id: model.to_string(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        self.model.info()
    }

    pub fn model(&self) -> &Arc<dyn RerankModel> {
        &self.model
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn encoder(&self) -> &PairEncoder {
        &self.encoder
    }

    /// Tokenizes a request's pairs with its truncation settings.
    pub fn encode(&self, req: &RerankRequest) -> Result<Vec<EncodedPair>> {
        let docs: Vec<&str> = req.documents.iter().map(String::as_str).collect();
        let max_length = req.max_length.unwrap_or(self.info().max_length);
        if max_length > self.info().max_length {
            return Err(GratingError::LimitExceeded(format!(
                "max length {max_length} exceeds the model's {}",
                self.info().max_length
            )));
        }
        self.encoder.encode(
            &req.query,
            &docs,
            &EncodeOptions {
                max_length,
                truncation: req.truncation,
                instruction: req.instruction.clone(),
                truncate: req.truncate,
            },
        )
    }

    /// Runs one request to completion.
    pub fn rerank(&self, req: &RerankRequest, progress: Option<&dyn Progress>) -> Result<RerankOutput> {
        let start = Instant::now();
        if let Some(0) = req.top_k {
            return Err(GratingError::InvalidInput("top_k must be at least 1".into()));
        }
        let pairs = self.encode(req)?;
        let mut stats = RequestStats {
            candidates: pairs.len(),
            tokens: pairs.iter().map(EncodedPair::len).sum(),
            truncated: pairs.iter().filter(|p| p.truncated).count(),
            num_layers: self.info().num_layers,
            tokenize_seconds: start.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let k = req.top_k.unwrap_or(pairs.len()).min(pairs.len());
        let ranked = match req.mode {
            Mode::Full => {
                stats.mode = "full".into();
                let scores = full::score_all(self.model.as_ref(), &pairs, req.batch_size, &mut stats, progress)?;
                let mut r = rank(scores.into_iter().enumerate().map(|(index, logit)| Scored { index, logit }));
                r.truncate(k);
                r
            }
            Mode::Grating => {
                stats.mode = "grating".into();
                monolithic::run(
                    self.model.as_ref(),
                    &pairs,
                    k,
                    req.chunk_tokens,
                    &req.prune,
                    &mut stats,
                    progress,
                )?
            }
        };
        if let Some(bad) = ranked.iter().find(|s| !s.logit.is_finite()) {
            return Err(GratingError::InvalidInput(format!(
                "document {} produced a non-finite score",
                bad.index
            )));
        }
        stats.total_seconds = start.elapsed().as_secs_f64();
        stats.finish_counts();
        Ok(RerankOutput { ranked, stats })
    }

    /// Scores of every candidate after every layer (`[layer][candidate]`, no pruning): what
    /// calibration and evaluation replay pruning rules on.
    pub fn layer_scores(&self, req: &RerankRequest) -> Result<(Vec<Vec<f32>>, RequestStats)> {
        let pairs = self.encode(req)?;
        let mut stats = RequestStats {
            mode: "record".into(),
            candidates: pairs.len(),
            tokens: pairs.iter().map(EncodedPair::len).sum(),
            num_layers: self.info().num_layers,
            ..Default::default()
        };
        let mut rec = Vec::new();
        monolithic::forward(
            self.model.as_ref(),
            &pairs,
            req.chunk_tokens,
            monolithic::Observer::Record(&mut rec),
            &mut stats,
            None,
        )?;
        stats.finish_counts();
        Ok((rec, stats))
    }
}
