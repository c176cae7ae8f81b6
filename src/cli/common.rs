//! Flags shared by several subcommands.

use anyhow::{bail, Result};
use clap::Args;
use grating::prune::{PruneConfig, PruneMode, DEFAULT_MAX_CLUSTERS, DEFAULT_SSE_RATIO};
use grating::weights::ModelFiles;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a local HF directory (config.json, model.safetensors, tokenizer.json) or a hub id.
    #[arg(long, env = "GRATING_MODEL")]
    pub model: String,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, f16 or bf16 (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<candle_core::DType>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// resident: load every layer at start; stream: keep two layers, read the next while the
    /// current one computes, and cache only the embedding rows requests use; auto: resident
    /// when it fits --max-memory, else stream.
    #[arg(long, default_value = "auto")]
    pub weights: grating::engine::WeightsMode,
    /// Peak memory budget, e.g. 512MiB: picks resident or streaming weights, the chunk size and
    /// hidden-state offload so the peak stays under it, or refuses naming the minimum needed.
    #[arg(long, value_parser = grating::engine::budget::parse_size)]
    pub max_memory: Option<u64>,
    /// Streaming: share of the vocabulary the embedding-row cache may keep (LRU).
    #[arg(long, default_value_t = 0.1)]
    pub embedding_cache: f32,
}

impl ModelArgs {
    pub fn engine_options(&self) -> Result<grating::EngineOptions> {
        let threads = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        grating::ops::set_threads(threads);
        Ok(grating::EngineOptions {
            device: parse_device(&self.device)?,
            dtype: self.dtype,
            weights: self.weights,
            embedding_cache_share: self.embedding_cache,
            max_memory: self.max_memory,
        })
    }
}

/// A float dtype, by the names `synth-model` and `convert` take.
pub fn parse_dtype(s: &str) -> Result<candle_core::DType> {
    let d: grating::synth::DiskDtype = s.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    Ok(d.into())
}

pub fn parse_device(s: &str) -> Result<candle_core::Device> {
    if s == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("invalid device {s:?} (cpu, cuda or cuda:N)"),
        },
        None => bail!("invalid device {s:?} (cpu, cuda or cuda:N)"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("device {s:?} requested but this build has no CUDA support (build with --features cuda)");
    }
    Ok(candle_core::Device::new_cuda(ordinal)?)
}

/// Pruning flags.
#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Pruning: top-k (accept and drop clusters), off (monolithic only, exact scores).
    #[arg(long, default_value = "top-k", value_parser = ["top-k", "off"])]
    pub prune: String,
    /// Drop losers only: the top K run every layer, so their order and scores equal full mode.
    #[arg(long)]
    pub exact_order: bool,
    /// Dispersion threshold (std / (|mean| + 1) of a layer's scores) above which a layer prunes.
    /// Default: the calibrated profile of the model if there is one, else 0.15.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// First layer (1-based) after which pruning may happen. Default: the profile's, else 1.
    #[arg(long)]
    pub first_layer: Option<usize>,
    /// Most clusters the 1-D k-means may use.
    #[arg(long, default_value_t = DEFAULT_MAX_CLUSTERS)]
    pub max_clusters: usize,
    /// Cluster count rule: the smallest k whose within-cluster SSE is at most this share of
    /// the total.
    #[arg(long, default_value_t = DEFAULT_SSE_RATIO)]
    pub sse_ratio: f32,
}

impl PruneArgs {
    /// The pruning config, filling unset values from the model's calibration profile.
    pub fn config(&self, files: &ModelFiles) -> Result<PruneConfig> {
        let profile = grating::prune::profile::load(files)?;
        let mut cfg = PruneConfig::default();
        if let Some(p) = &profile {
            cfg.threshold = p.threshold;
            cfg.first_layer = p.first_layer;
            tracing::info!(
                threshold = p.threshold,
                first_layer = p.first_layer,
                "using calibrated pruning profile"
            );
        }
        if let Some(t) = self.threshold {
            cfg.threshold = t;
        }
        if let Some(f) = self.first_layer {
            if f == 0 {
                bail!("--first-layer counts from 1");
            }
            cfg.first_layer = f;
        }
        if self.max_clusters < 2 {
            bail!("--max-clusters must be at least 2");
        }
        if !(0.0..1.0).contains(&self.sse_ratio) {
            bail!("--sse-ratio must be in [0, 1)");
        }
        cfg.max_clusters = self.max_clusters;
        cfg.sse_ratio = self.sse_ratio;
        cfg.mode = match (self.prune.as_str(), self.exact_order) {
            ("off", _) => PruneMode::Off,
            (_, true) => PruneMode::ExactOrder,
            _ => PruneMode::TopK,
        };
        Ok(cfg)
    }
}

/// How candidates are grouped for compute.
#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Candidates per batch in full mode (default: 32 on the CPU; on a GPU batches are bounded
    /// by --chunk-tokens only).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per chunk in grating mode, and most tokens of a full-mode batch (bounds
    /// activation memory in both). Default: 4096 on the CPU, 65536 on a GPU, whose GEMMs need
    /// large operands (docs/gpu.md).
    #[arg(long)]
    pub chunk_tokens: Option<usize>,
}

/// GPU defaults of [`BatchArgs`]: the configuration docs/gpu.md measured.
const GPU_CHUNK_TOKENS: usize = 65536;
const GPU_BATCH_SIZE: usize = 100_000;

impl BatchArgs {
    /// Batch size and chunk tokens: the flags, else the defaults for `device`.
    pub fn resolve(&self, device: &candle_core::Device) -> (usize, usize) {
        let gpu = !device.is_cpu();
        (
            self.batch_size
                .unwrap_or(if gpu { GPU_BATCH_SIZE } else { 32 }),
            self.chunk_tokens.unwrap_or(if gpu {
                GPU_CHUNK_TOKENS
            } else {
                grating::engine::monolithic::DEFAULT_CHUNK_TOKENS
            }),
        )
    }

    /// Sets the request's batch size and chunk tokens, refusing zeros.
    pub fn apply(
        &self,
        req: &mut grating::RerankRequest,
        device: &candle_core::Device,
    ) -> Result<()> {
        let (batch_size, chunk_tokens) = self.resolve(device);
        if chunk_tokens == 0 || batch_size == 0 {
            bail!("--chunk-tokens and --batch-size must be positive");
        }
        req.batch_size = batch_size;
        req.chunk_tokens = chunk_tokens;
        Ok(())
    }
}
