//! Loading a reranker: the builder's settings, the defaults that depend on the device and on
//! the model's calibration profile, and the choice between resident and streamed weights.

use super::{EngineOptions, Reranker};
use crate::engine::layers::{LayerSource, Streaming};
use crate::engine::{Engine, WeightsMode, DEFAULT_CHUNK_TOKENS};
use crate::error::Result;
use crate::models::{self, LoadOptions};
use crate::prune::{profile, PruneConfig};
use crate::tokenize::{PairEncoder, PromptTemplate};
use crate::weights::plan::layer_plans;
use crate::weights::stream::default_gpu_read_threads;
use crate::weights::{MmapSource, ModelFiles, PreadFiles, PreadSource, WeightIndex};
use candle_core::{DType, Device};
use std::path::PathBuf;
use std::sync::Arc;

/// Settings for [`Reranker::builder`]; each has a default that suits the device.
#[derive(Debug, Clone)]
pub struct RerankerBuilder {
    model: String,
    opts: EngineOptions,
}

impl RerankerBuilder {
    pub(crate) fn new(model: impl Into<String>) -> RerankerBuilder {
        RerankerBuilder {
            model: model.into(),
            opts: EngineOptions::default(),
        }
    }

    /// Replaces every setting at once.
    pub fn options(mut self, opts: EngineOptions) -> Self {
        self.opts = opts;
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.opts.device = device;
        self
    }

    /// Compute dtype (default: f32 on the CPU, bf16 on a GPU).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.opts.dtype = Some(dtype);
        self
    }

    /// Resident, streamed, or chosen by the memory budget (`Auto`).
    pub fn weights(mut self, weights: WeightsMode) -> Self {
        self.opts.weights = weights;
        self
    }

    /// Peak memory budget in bytes.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.opts.max_memory = Some(bytes);
        self
    }

    /// Compute threads, process-wide (rayon's pool is set once per process).
    pub fn threads(mut self, n: usize) -> Self {
        self.opts.threads = Some(n);
        self
    }

    pub fn batch_size(mut self, n: usize) -> Self {
        self.opts.batch_size = Some(n);
        self
    }

    pub fn chunk_tokens(mut self, n: usize) -> Self {
        self.opts.chunk_tokens = Some(n);
        self
    }

    pub fn offload(mut self, on: bool) -> Self {
        self.opts.offload = on;
        self
    }

    /// The pruning rule requests use unless they bring their own (default: the model's
    /// calibrated profile, else the built-in rule).
    pub fn prune(mut self, prune: PruneConfig) -> Self {
        self.opts.prune = Some(prune);
        self
    }

    pub fn profile_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.opts.profile_dir = Some(dir.into());
        self
    }

    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.opts.spill_dir = Some(dir.into());
        self
    }

    pub fn embedding_cache_share(mut self, share: f32) -> Self {
        self.opts.embedding_cache_share = share;
        self
    }

    /// Loads the model, its tokenizer and (unless streamed) its layers.
    pub fn build(self) -> Result<Reranker> {
        let RerankerBuilder { model, opts } = self;
        opts.validate()?;
        super::process::apply(&opts)?;
        let files = ModelFiles::resolve(&model)?;
        crate::memory::keep_gpu_pool(&opts.device);
        let config_text = std::fs::read_to_string(&files.config)?;
        let (arch, _) = models::detect_architecture(&config_text)?;
        let template = if arch.uses_chat_prompt() {
            PromptTemplate::Qwen3Reranker
        } else {
            PromptTemplate::Pair
        };
        let encoder = PairEncoder::from_file(&files.tokenizer, template)?;
        let index = WeightIndex::open(&files.weights)?;
        let dtype = opts.dtype.unwrap_or(if opts.device.is_cpu() {
            DType::F32
        } else {
            // Half precision with f32 softmax and norms, as the published models run on GPUs.
            DType::BF16
        });
        let weights = resolve_weights(&opts, &index, dtype, &config_text);
        let load = LoadOptions {
            resident_layers: weights == WeightsMode::Resident,
            yes_no_ids: encoder.yes_no_ids,
        };
        let (model_arc, source) = if weights == WeightsMode::Stream {
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
            let plans = layer_plans(&pf.index, m.num_layers(), |l| m.layer_prefix(l))?;
            let streaming = Streaming {
                files: pf,
                plans: Arc::new(plans),
                dtype,
                device: opts.device.clone(),
                cache_share: opts.embedding_cache_share,
                read_threads: opts.read_threads.unwrap_or_else(default_gpu_read_threads),
            };
            (m, LayerSource::Stream(streaming))
        } else {
            let src = MmapSource::open(index, dtype, opts.device.clone())?;
            (
                models::load_model(&files, &src, &load)?,
                LayerSource::Resident,
            )
        };
        let prune = match &opts.prune {
            Some(p) => p.clone(),
            None if opts.use_profile => profile_rule(&files, &opts)?,
            None => PruneConfig::default(),
        };
        let execution = opts.execution()?;
        let profile_dir = opts
            .profile_dir
            .clone()
            .unwrap_or_else(profile::default_profile_dir);
        let score_calibration = if opts.use_profile {
            let c = super::scores::load(&profile_dir, &files)?;
            if let Some(c) = &c {
                tracing::info!(scale = c.scale, bias = c.bias, "using calibrated scores");
            }
            c
        } else {
            None
        };
        Ok(Reranker {
            engine: Engine {
                model: model_arc,
                source,
                dtype,
                device: opts.device.clone(),
                spill_dir: opts.spill_dir.clone(),
            },
            encoder,
            files,
            model_id: model,
            weights,
            max_memory: opts.max_memory,
            prune,
            execution,
            score_calibration,
            profile_dir,
        })
    }
}

/// `Auto` becomes resident when the weights in the compute dtype, what runs already and room
/// for one default chunk's activations fit the budget, else streaming.
fn resolve_weights(
    opts: &EngineOptions,
    index: &WeightIndex,
    dtype: DType,
    config_text: &str,
) -> WeightsMode {
    match (opts.weights, opts.max_memory) {
        (WeightsMode::Auto, None) => WeightsMode::Resident,
        (WeightsMode::Auto, Some(budget)) => {
            let resident: u64 = index
                .entries
                .values()
                .map(|e| (e.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64)
                .sum();
            let rss = (crate::memory::rss_mib().unwrap_or(0.0) * 1048576.0) as u64;
            let hidden = serde_json::from_str::<serde_json::Value>(config_text)
                .ok()
                .and_then(|v| v["hidden_size"].as_u64())
                .unwrap_or(1024);
            let room = DEFAULT_CHUNK_TOKENS as u64 * hidden * 16 * dtype.size_in_bytes() as u64;
            if rss + resident + room <= budget {
                WeightsMode::Resident
            } else {
                WeightsMode::Stream
            }
        }
        (w, _) => w,
    }
}

/// The model's calibrated rule (its saved or built-in profile). A model without one is not
/// pruned: the margin rule needs the model's score movement, and a guessed one is exactly the
/// default that fails on data it was not tuned on. Monolithic forwarding still runs, at the
/// cost of full inference (about 1.0x its latency); `grating calibrate` or the server's
/// self-calibration gives it a profile.
fn profile_rule(files: &ModelFiles, opts: &EngineOptions) -> Result<PruneConfig> {
    let dir = opts
        .profile_dir
        .clone()
        .unwrap_or_else(profile::default_profile_dir);
    match profile::load(&dir, files)? {
        Some(p) => {
            let cfg = p.config();
            tracing::info!(
                rule = ?cfg.rule,
                margin = cfg.margin,
                threshold = p.threshold,
                first_layer = p.first_layer,
                source = %p.source,
                "using calibrated pruning profile"
            );
            Ok(cfg)
        }
        None => {
            tracing::info!(
                "no pruning profile for this model: nothing is pruned until `grating calibrate` \
                 (or `grating serve`'s self-calibration) measures it"
            );
            Ok(PruneConfig::default())
        }
    }
}
