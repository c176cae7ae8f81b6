//! Execution: how a loaded model's layers run over a request's candidates.
//!
//! - [`request`]: one request's state machine (chunks, pruning state, stats, the layer step);
//! - [`single`]: the single-request loop over it (GRATING's monolithic forwarding);
//! - [`scheduler`]: the shared pass that drives many of them, one layer step at a time;
//! - [`full`]: the conventional baseline (length-sorted batches through every layer);
//! - [`layers`]: where every path obtains layers (resident, reloaded, streamed, cached);
//! - [`batch`], [`offload`], [`budget`], [`stats`]: the helpers they share.
//!
//! Nothing here parses flags, reads environment variables or speaks HTTP: the front door
//! ([`crate::reranker`]) turns a user's settings into an [`Engine`] and calls in.

pub(crate) mod batch;
pub mod budget;
pub(crate) mod full;
pub(crate) mod layers;
pub(crate) mod offload;
pub(crate) mod request;
pub mod scheduler;
pub(crate) mod single;
pub mod stats;

use crate::error::{GratingError, Result};
use crate::models::RerankModel;
use crate::prune::PruneConfig;
use crate::tokenize::EncodedPair;
use candle_core::{DType, Device};
use layers::{LayerProvider, LayerSource};
use request::{ChunkPolicy, RequestRun};
pub use single::DEFAULT_CHUNK_TOKENS;
pub use stats::RequestStats;
use std::path::PathBuf;
use std::sync::Arc;

/// How candidates are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Conventional batches through all layers; every score exact.
    Full,
    /// Monolithic layer-major forwarding with progressive cluster pruning.
    #[default]
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

/// A ranked candidate: `index` into the request's documents, and its raw logit.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scored {
    pub index: usize,
    pub logit: f32,
}

impl Scored {
    /// Sigmoid of the logit (P(yes) for yes/no heads), uncalibrated; `Reranker::relevance`
    /// applies the model's score calibration when it has one.
    pub fn score(&self) -> f32 {
        sigmoid(self.logit)
    }
}

/// A request's answer.
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

/// A NaN or infinite score is the model's or the engine's fault, never a ranking.
pub(crate) fn check_finite(ranked: &[Scored]) -> Result<()> {
    match ranked.iter().find(|s| !s.logit.is_finite()) {
        Some(bad) => Err(GratingError::NonFiniteScore {
            document: bad.index,
        }),
        None => Ok(()),
    }
}

/// How one request's candidates are grouped for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grouping {
    /// Candidates per batch in full mode.
    pub batch_size: usize,
    /// Tokens per chunk (grating mode) and most tokens per batch (full mode).
    pub chunk_tokens: usize,
    /// Offload hidden states between layers (grating mode).
    pub offload: bool,
}

/// A loaded model and where its layers come from: what every execution path runs on.
pub(crate) struct Engine {
    pub model: Arc<dyn RerankModel>,
    pub source: LayerSource,
    pub dtype: DType,
    pub device: Device,
    /// Where offloaded hidden states go (the system's temporary directory when `None`).
    pub spill_dir: Option<PathBuf>,
}

impl Engine {
    /// A layer provider for one pass that keeps no built layer beyond the one in use.
    fn provider(&self) -> LayerProvider {
        LayerProvider::new(self.model.clone(), self.source.clone(), 0)
    }

    fn run(
        &self,
        pairs: Vec<EncodedPair>,
        k: usize,
        prune: Option<&PruneConfig>,
        grouping: Grouping,
        mode: &str,
    ) -> Result<RequestRun> {
        let chunks = ChunkPolicy {
            chunk_tokens: grouping.chunk_tokens,
            offload: grouping.offload.then_some(self.spill_dir.as_deref()),
        };
        RequestRun::new(pairs, k, prune, self.model.info(), chunks, mode)
    }

    /// Runs one request alone in grating mode and returns its top `k`.
    pub(crate) fn rerank(
        &self,
        pairs: Vec<EncodedPair>,
        k: usize,
        prune: &PruneConfig,
        grouping: Grouping,
        progress: Option<&dyn Progress>,
    ) -> Result<RerankOutput> {
        let mut run = self.run(pairs, k, Some(prune), grouping, "grating")?;
        single::drive(
            self.model.as_ref(),
            &mut self.provider(),
            &mut run,
            progress,
        )?;
        run.finish()
    }

    /// Scores of every candidate after every layer (`[layer][candidate]`, no pruning).
    pub(crate) fn layer_scores(
        &self,
        pairs: Vec<EncodedPair>,
        grouping: Grouping,
    ) -> Result<(Vec<Vec<f32>>, RequestStats)> {
        let k = pairs.len();
        let mut run = self.run(pairs, k, None, grouping, "record")?;
        single::drive(self.model.as_ref(), &mut self.provider(), &mut run, None)?;
        run.finish_record()
    }

    /// Full mode: every candidate through every layer; the top `k`, best first.
    pub(crate) fn rerank_full(
        &self,
        pairs: &[EncodedPair],
        k: usize,
        grouping: Grouping,
        progress: Option<&dyn Progress>,
    ) -> Result<RerankOutput> {
        if k == 0 {
            return Err(GratingError::InvalidInput(
                "top_k must be at least 1 (omit it to rank every document)".into(),
            ));
        }
        let mut stats = RequestStats {
            mode: "full".into(),
            candidates: pairs.len(),
            tokens: pairs.iter().map(EncodedPair::len).sum(),
            truncated: pairs.iter().filter(|p| p.truncated).count(),
            num_layers: self.model.info().num_layers,
            ..Default::default()
        };
        let scores = full::score_all(
            self.model.as_ref(),
            &mut self.provider(),
            pairs,
            grouping.batch_size,
            grouping.chunk_tokens,
            &mut stats,
            progress,
        )?;
        let mut ranked = rank(
            scores
                .into_iter()
                .enumerate()
                .map(|(index, logit)| Scored { index, logit }),
        );
        ranked.truncate(k);
        check_finite(&ranked)?;
        stats.finish_counts();
        Ok(RerankOutput { ranked, stats })
    }
}
