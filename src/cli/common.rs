//! Flags shared by several subcommands.

use anyhow::{bail, Result};
use clap::Args;
use grating::prune::{PruneConfig, PruneMode, RuleKind, DEFAULT_MAX_CLUSTERS, DEFAULT_SSE_RATIO};
use grating::reranker::GpuPath;
use std::path::PathBuf;

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
    pub weights: grating::WeightsMode,
    /// Peak memory budget, e.g. 512MiB: picks resident or streaming weights, the chunk size and
    /// hidden-state offload so the peak stays under it, or refuses naming the minimum needed.
    #[arg(long, value_parser = grating::parse_size)]
    pub max_memory: Option<u64>,
    /// Streaming: share of the vocabulary the embedding-row cache may keep (LRU).
    #[arg(long, default_value_t = 0.1)]
    pub embedding_cache: f32,
    /// Where calibrated pruning profiles are read and saved (default: the user's cache
    /// directory, grating/profiles).
    #[arg(long, env = "GRATING_PROFILE_DIR")]
    pub profile_dir: Option<PathBuf>,
    /// Where offloaded hidden states are written (default: the system's temporary directory).
    #[arg(long, env = "GRATING_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,
    /// Threads reading a streamed layer bound for a GPU (default: up to 4).
    #[arg(long, env = "GRATING_READ_THREADS")]
    pub read_threads: Option<usize>,
    /// GPU paths run on candle's generic kernels instead of grating's, for comparison:
    /// gemm, attention, norm (comma-separated) or all.
    #[arg(long, env = "GRATING_GPU_GENERIC", hide = true)]
    pub gpu_generic: Option<String>,
    /// Synchronise after each stage of a layer and print stage times at exit (profiling).
    #[arg(long, env = "GRATING_STAGE_PROFILE", hide = true, value_parser = parse_flag, default_value = "0")]
    pub stage_profile: bool,
}

/// `1`/`true` or `0`/`false` (the environment variables' convention).
fn parse_flag(s: &str) -> Result<bool> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" | "" => Ok(false),
        _ => bail!("expected 1 or 0, got {s:?}"),
    }
}

impl ModelArgs {
    /// The load-time options these flags ask for, with the grouping of `batch`.
    pub fn engine_options(&self, batch: &BatchArgs) -> Result<grating::EngineOptions> {
        let threads = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        Ok(grating::EngineOptions {
            device: parse_device(&self.device)?,
            dtype: self.dtype,
            weights: self.weights,
            embedding_cache_share: self.embedding_cache,
            max_memory: self.max_memory,
            threads: Some(threads),
            batch_size: batch.batch_size,
            chunk_tokens: batch.chunk_tokens,
            offload: batch.offload,
            profile_dir: self.profile_dir.clone(),
            spill_dir: self.spill_dir.clone(),
            read_threads: self.read_threads,
            generic_gpu_paths: match &self.gpu_generic {
                Some(list) => Some(GpuPath::parse_list(list).map_err(|e| anyhow::anyhow!(e))?),
                None => None,
            },
            stage_profile: Some(self.stage_profile),
            ..Default::default()
        })
    }

    /// Loads the model these flags name.
    pub fn load(&self, batch: &BatchArgs) -> Result<grating::Reranker> {
        let opts = self.engine_options(batch)?;
        Ok(grating::Reranker::load(&self.model, &opts)?)
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
    /// Pruning: top-k (accept and drop), off (monolithic only, exact scores).
    #[arg(long, default_value = "top-k", value_parser = ["top-k", "off"])]
    pub prune: String,
    /// Drop losers only: the top K run every layer, so their order and scores equal full mode.
    #[arg(long)]
    pub exact_order: bool,
    /// The rule: margin (score margins in units of the model's measured score movement; needs
    /// a calibrated profile) or cluster (the paper's dispersion-gated clusters). Default: the
    /// profile's rule; cluster when --threshold is given.
    #[arg(long, value_parser = ["margin", "cluster"])]
    pub rule: Option<String>,
    /// Margin rule: movement units between a dropped (accepted) candidate and the K-th best
    /// (the (K+1)-th). Default: the profile's. Larger is safer and prunes less.
    #[arg(long)]
    pub margin: Option<f32>,
    /// Cluster rule: dispersion threshold (std / (|mean| + 1) of a layer's scores) above
    /// which a layer prunes. Default: the profile's, else 0.15.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// First layer (1-based) after which pruning may happen. Default: the profile's, else 1.
    #[arg(long)]
    pub first_layer: Option<usize>,
    /// Cluster rule: most clusters the 1-D k-means may use.
    #[arg(long, default_value_t = DEFAULT_MAX_CLUSTERS)]
    pub max_clusters: usize,
    /// Cluster rule: the smallest k whose within-cluster SSE is at most this share of the
    /// total.
    #[arg(long, default_value_t = DEFAULT_SSE_RATIO)]
    pub sse_ratio: f32,
}

impl PruneArgs {
    /// The pruning rule: `base` (the reranker's own, from its calibrated profile if it has
    /// one) with the values these flags set.
    pub fn config(&self, base: &PruneConfig) -> Result<PruneConfig> {
        let mut cfg = base.clone();
        match (self.rule.as_deref(), self.threshold) {
            (Some("cluster"), _) | (None, Some(_)) => cfg.rule = RuleKind::Cluster,
            (Some(_), _) => cfg.rule = RuleKind::Margin,
            (None, None) => {}
        }
        if let Some(t) = self.threshold {
            cfg.threshold = t;
        }
        if let Some(m) = self.margin {
            cfg.margin = m;
        }
        if let Some(f) = self.first_layer {
            cfg.first_layer = f;
        }
        cfg.max_clusters = self.max_clusters;
        cfg.sse_ratio = self.sse_ratio;
        cfg.mode = match (self.prune.as_str(), self.exact_order) {
            ("off", _) => PruneMode::Off,
            (_, true) => PruneMode::ExactOrder,
            _ => PruneMode::TopK,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same flags as command-line arguments (for benchmarks that run the binary).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--prune".to_string(), self.prune.clone()];
        if self.exact_order {
            a.push("--exact-order".into());
        }
        let mut opt = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v);
            }
        };
        opt("--rule", self.rule.clone());
        opt("--margin", self.margin.map(|v| v.to_string()));
        opt("--threshold", self.threshold.map(|v| v.to_string()));
        opt("--first-layer", self.first_layer.map(|v| v.to_string()));
        a.extend([
            "--max-clusters".into(),
            self.max_clusters.to_string(),
            "--sse-ratio".into(),
            self.sse_ratio.to_string(),
        ]);
        a
    }
}

/// How candidates are grouped for compute.
#[derive(Args, Debug, Clone, Default)]
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
    /// Offload hidden states between layers (set by subcommands that offer `--offload`).
    #[arg(skip)]
    pub offload: bool,
}
