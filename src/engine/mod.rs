//! The execution engine: a loaded model plus its tokenizer, and the two orders of execution
//! over the same model code: full inference (the baseline) and GRATING's monolithic,
//! layer-major forwarding with progressive pruning.

pub mod budget;
pub mod full;
pub mod monolithic;
pub(crate) mod offload;
pub mod shared;
pub mod stats;

use crate::error::{GratingError, Result};
use crate::models::{self, LayerBlock, LoadOptions, ModelInfo, RerankModel};
use crate::prune::PruneConfig;
use crate::tokenize::{EncodeOptions, EncodedPair, PairEncoder, Truncation};
use crate::weights::stream::{layer_plans, LayerPlan, LayerStream};
use crate::weights::{MmapSource, ModelFiles, PreadFiles, PreadSource, WeightIndex};
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

/// Where layer weights live while requests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsMode {
    /// Every layer loaded once, at start.
    Resident,
    /// Two layers' bytes resident; the next layer is read while the current one computes,
    /// and only the embedding rows requests use are kept.
    Stream,
    /// Resident when it fits the memory budget, else streaming.
    Auto,
}

impl std::str::FromStr for WeightsMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "resident" => Ok(WeightsMode::Resident),
            "stream" => Ok(WeightsMode::Stream),
            "auto" => Ok(WeightsMode::Auto),
            _ => Err(format!(
                "unknown weights mode {s:?} (resident, stream, auto)"
            )),
        }
    }
}

/// Engine-wide settings fixed at load time.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    /// Compute dtype; f32 on CPU unless asked otherwise.
    pub dtype: Option<DType>,
    pub weights: WeightsMode,
    /// Streaming only: share of the vocabulary the embedding-row cache may keep.
    pub embedding_cache_share: f32,
    /// Peak memory budget in bytes: with `WeightsMode::Auto` it picks resident or streaming,
    /// and per request it picks the chunk size and offload (grating mode).
    pub max_memory: Option<u64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Cpu,
            dtype: None,
            weights: WeightsMode::Resident,
            embedding_cache_share: 0.1,
            max_memory: None,
        }
    }
}

/// What a streaming reranker needs to read layers during a pass.
#[derive(Clone)]
pub struct Streaming {
    files: Arc<PreadFiles>,
    plans: Arc<Vec<LayerPlan>>,
    dtype: DType,
    device: Device,
    cache_share: f32,
}

/// Supplies the layers of one pass: resident ones directly, streamed ones through a
/// read-ahead stream started for the pass.
pub(crate) struct Layers<'a> {
    model: &'a dyn RerankModel,
    streaming: Option<&'a Streaming>,
    stream: Option<LayerStream>,
}

impl Streaming {
    /// Starts reading `order` ahead for `model`'s layers.
    pub fn start(&self, order: Vec<usize>) -> LayerStream {
        LayerStream::start(
            self.files.clone(),
            self.plans.clone(),
            order,
            self.dtype,
            self.device.clone(),
        )
    }
}

impl<'a> Layers<'a> {
    pub(crate) fn new(model: &'a dyn RerankModel, streaming: Option<&'a Streaming>) -> Self {
        Layers {
            model,
            streaming,
            stream: None,
        }
    }

    /// Announces the layers the pass will ask for, in order (streaming reads them ahead).
    pub(crate) fn begin(&mut self, order: Vec<usize>) {
        self.stream = self.streaming.map(|s| {
            LayerStream::start(
                s.files.clone(),
                s.plans.clone(),
                order,
                s.dtype,
                s.device.clone(),
            )
        });
    }

    /// Layer `l` and the seconds spent waiting for its weights.
    pub(crate) fn get(&mut self, l: usize) -> Result<(Arc<dyn LayerBlock>, f64)> {
        match &mut self.stream {
            Some(st) => st.next(self.model, l),
            None => Ok((self.model.layer(l)?, 0.0)),
        }
    }

    pub(crate) fn end(&mut self) {
        self.stream = None;
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
    /// Candidates per batch in full mode (batches are also cut at `chunk_tokens` tokens).
    pub batch_size: usize,
    /// Tokens per chunk in grating mode.
    pub chunk_tokens: usize,
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    pub truncate: bool,
    pub instruction: Option<String>,
    pub prune: PruneConfig,
    /// Offload hidden states of chunks not being computed (grating mode).
    pub offload: bool,
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
            offload: false,
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
    streaming: Option<Streaming>,
    weights: WeightsMode,
    max_memory: Option<u64>,
    dtype: DType,
    device: Device,
}

impl Reranker {
    /// Loads `model` (a local HF directory or a hub id) with all layers resident.
    pub fn load(model: &str, opts: &EngineOptions) -> Result<Reranker> {
        let files = ModelFiles::resolve(model)?;
        crate::memory::keep_gpu_pool(&opts.device);
        let config_text = std::fs::read_to_string(&files.config)?;
        let (arch, _) = models::detect_architecture(&config_text)?;
        let encoder = PairEncoder::from_file(&files.tokenizer, arch)?;
        let index = WeightIndex::open(&files.weights)?;
        let dtype = opts.dtype.unwrap_or(if opts.device.is_cpu() {
            DType::F32
        } else {
            // Half precision with f32 softmax and norms, as the published models run on GPUs.
            DType::BF16
        });
        let weights = match (opts.weights, opts.max_memory) {
            (WeightsMode::Auto, None) => WeightsMode::Resident,
            (WeightsMode::Auto, Some(budget)) => {
                // Resident weights in the compute dtype, plus what runs already, plus room for
                // one default chunk's activations.
                let resident: u64 = index
                    .entries
                    .values()
                    .map(|e| (e.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64)
                    .sum();
                let rss = (crate::memory::rss_mib().unwrap_or(0.0) * 1048576.0) as u64;
                let cfg_text = &config_text;
                let hidden = serde_json::from_str::<serde_json::Value>(cfg_text)
                    .ok()
                    .and_then(|v| v["hidden_size"].as_u64())
                    .unwrap_or(1024);
                let room = monolithic::DEFAULT_CHUNK_TOKENS as u64
                    * hidden
                    * 16
                    * dtype.size_in_bytes() as u64;
                if rss + resident + room <= budget {
                    WeightsMode::Resident
                } else {
                    WeightsMode::Stream
                }
            }
            (w, _) => w,
        };
        let load = LoadOptions {
            device: opts.device.clone(),
            dtype,
            resident_layers: weights == WeightsMode::Resident,
            yes_no_ids: encoder.yes_no_ids,
        };
        let (model_arc, streaming) = match weights {
            WeightsMode::Auto => unreachable!("auto resolved above"),
            WeightsMode::Resident => {
                let src = MmapSource::open(index, dtype, opts.device.clone())?;
                (models::load_model(&files, &src, &load)?, None)
            }
            WeightsMode::Stream => {
                if !(0.0..=1.0).contains(&opts.embedding_cache_share) {
                    return Err(GratingError::InvalidInput(
                        "embedding cache share must be in [0, 1]".into(),
                    ));
                }
                let pf = PreadFiles::open(Arc::new(index))?;
                let pf = Arc::new(if opts.device.is_cpu() {
                    pf
                } else {
                    pf.keeping_page_cache()
                });
                let src = PreadSource {
                    files: pf.clone(),
                    dtype,
                    device: opts.device.clone(),
                    cache_share: opts.embedding_cache_share,
                };
                let m = models::load_model(&files, &src, &load)?;
                let plans = Arc::new(layer_plans(&pf.index, m.as_ref())?);
                let s = Streaming {
                    files: pf,
                    plans,
                    dtype,
                    device: opts.device.clone(),
                    cache_share: opts.embedding_cache_share,
                };
                (m, Some(s))
            }
        };
        Ok(Reranker {
            model: model_arc,
            encoder,
            files,
            model_id: model.to_string(),
            streaming,
            weights,
            max_memory: opts.max_memory,
            dtype,
            device: opts.device.clone(),
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

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn weights_mode(&self) -> WeightsMode {
        self.weights
    }

    /// Chunk size and offload for a grating-mode request: the request's own unless a memory
    /// budget is set, in which case the largest that fit (see [`budget`]).
    fn plan_memory(
        &self,
        req: &RerankRequest,
        pairs: &[EncodedPair],
        stats: &mut RequestStats,
    ) -> Result<(usize, bool)> {
        let Some(limit) = self.max_memory else {
            return Ok((req.chunk_tokens, req.offload));
        };
        let info = self.info();
        let b = self.dtype.size_in_bytes() as u64;
        let stream_bytes = match &self.streaming {
            Some(s) => {
                let disk = s.plans.iter().map(|p| p.bytes as u64).max().unwrap_or(0);
                let elems = |p: &LayerPlan| {
                    p.tensors
                        .iter()
                        .map(|(_, e)| e.shape.iter().product::<usize>() as u64)
                        .sum::<u64>()
                };
                let built = s.plans.iter().map(elems).max().unwrap_or(0) * b;
                let tensor = s
                    .plans
                    .iter()
                    .flat_map(|p| {
                        p.tensors
                            .iter()
                            .map(|(_, e)| e.shape.iter().product::<usize>() as u64)
                    })
                    .max()
                    .unwrap_or(0)
                    * b;
                (disk, built, tensor)
            }
            None => (0, 0, 0),
        };
        let embedding_growth = match &self.streaming {
            Some(s) => {
                (info.vocab_size as f64 * s.cache_share as f64).ceil() as u64
                    * info.hidden_size as u64
                    * 4
            }
            None => 0,
        };
        let inputs = budget::BudgetInputs {
            rss_now: (crate::memory::rss_mib().unwrap_or(0.0) * 1048576.0) as u64,
            stream_bytes,
            embedding_growth,
            threads: crate::ops::threads(),
            dtype_bytes: b,
        };
        let total: usize = pairs.iter().map(EncodedPair::len).sum();
        let max_len = pairs.iter().map(EncodedPair::len).max().unwrap_or(1);
        match budget::plan(info, &inputs, total, max_len, req.chunk_tokens, limit) {
            Ok(p) => {
                stats.predicted_peak_mib = p.predicted_peak_bytes as f64 / 1048576.0;
                Ok((p.chunk_tokens, p.offload || req.offload))
            }
            Err(min) => Err(GratingError::MemoryBudget(format!(
                "this request needs at least {:.0} MiB ({} candidates, {total} tokens, {:?} weights) but the budget is {:.0} MiB",
                min as f64 / 1048576.0,
                pairs.len(),
                self.weights,
                limit as f64 / 1048576.0
            ))),
        }
    }

    /// The streaming handle when weights are streamed (for schedulers that run layers
    /// themselves, like the server's shared pass).
    pub fn streaming(&self) -> Option<&Streaming> {
        self.streaming.as_ref()
    }

    pub(crate) fn layers(&self) -> Layers<'_> {
        Layers::new(self.model.as_ref(), self.streaming.as_ref())
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
    pub fn rerank(
        &self,
        req: &RerankRequest,
        progress: Option<&dyn Progress>,
    ) -> Result<RerankOutput> {
        let start = Instant::now();
        if let Some(0) = req.top_k {
            return Err(GratingError::InvalidInput(
                "top_k must be at least 1".into(),
            ));
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
                let scores = full::score_all(
                    self.model.as_ref(),
                    &mut self.layers(),
                    &pairs,
                    req.batch_size,
                    req.chunk_tokens,
                    &mut stats,
                    progress,
                )?;
                let mut r = rank(
                    scores
                        .into_iter()
                        .enumerate()
                        .map(|(index, logit)| Scored { index, logit }),
                );
                r.truncate(k);
                r
            }
            Mode::Grating => {
                stats.mode = "grating".into();
                let (chunk_tokens, offload) = self.plan_memory(req, &pairs, &mut stats)?;
                monolithic::run(
                    self.model.as_ref(),
                    &mut self.layers(),
                    &pairs,
                    k,
                    chunk_tokens,
                    offload,
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
        stats.gpu_memory = crate::memory::gpu_memory(&self.device);
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
            &mut self.layers(),
            &pairs,
            req.chunk_tokens,
            req.offload,
            monolithic::Observer::Record(&mut rec),
            &mut stats,
            None,
        )?;
        stats.finish_counts();
        Ok((rec, stats))
    }
}
