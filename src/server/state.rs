//! What every handler shares, and the server's only contact with the engine: its construction
//! in [`AppState::new`] and [`AppState::submit`]. Keeping the engine behind these few methods
//! lets the engine handle change without touching the handlers.

use super::api::{Info, Limits, TeiClassifier, TeiInfo, TeiModelType};
use super::calibration::{Calibrator, Settings};
use super::config::ServerConfig;
use super::metrics::{self, Metrics};
use super::request::Prepared;
use crate::engine::scheduler::{Counters, RankedPolicy};
use crate::engine::{RerankOutput, WeightsMode};
use crate::prune::{PruneConfig, PruneMode, RuleKind};
use crate::reranker::{Pending, RerankOptions, Reranker, SharedOptions, SharedReranker};
use crate::tokenize::EncodedPair;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

/// Shared by all handlers.
pub struct AppState {
    engine: SharedReranker,
    pub(super) cfg: ServerConfig,
    pub(super) metrics: metrics::Metrics,
    /// One per rerank request being handled; none left means 429.
    pub(super) permits: Arc<Semaphore>,
    max_doc_tokens: usize,
    pub(super) info: Info,
    /// When the server started, in Unix seconds (`/v1/models`).
    pub(super) started_unix: u64,
    /// Set when a shutdown begins: the server finishes what it has but is no longer ready.
    draining: std::sync::atomic::AtomicBool,
    /// Self-calibration of the pruning margin (margin rule, sampling on).
    pub(super) calibrator: Option<Arc<Calibrator>>,
}

impl AppState {
    /// Starts the engine's scheduler for `reranker`.
    pub fn new(reranker: Arc<Reranker>, cfg: ServerConfig) -> crate::Result<Arc<AppState>> {
        if cfg.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err(crate::GratingError::InvalidInput(
                "the API key is empty or blank: give a key, or none to serve without one".into(),
            ));
        }
        let model_max = reranker.info().max_length;
        let max_doc_tokens = cfg.max_tokens_per_doc.unwrap_or(model_max).min(model_max);
        let engine = SharedReranker::new(
            reranker.clone(),
            SharedOptions {
                layer_sharing: cfg.layer_sharing,
                policy: Arc::new(RankedPolicy {
                    order: cfg.queue_order.clone(),
                    starve_after_steps: cfg.starve_after_steps.max(1),
                }),
                step_tokens: cfg.step_tokens,
                max_active: cfg.max_concurrent_requests.max(1),
                cached_layers: cfg.cached_layers.max(1),
                chunk_tokens: cfg.chunk_tokens,
                reload_layers: cfg.reload_layers,
            },
        )?;
        let info = describe(&reranker, &cfg, max_doc_tokens);
        let permits = Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1)));
        let calibrates = cfg.calibration_sample > 0.0
            && cfg.prune.rule == RuleKind::Margin
            && cfg.prune.mode != PruneMode::Off
            && cfg.prune.schedule.is_empty();
        let valid = (0.0..=1.0).contains(&cfg.calibration_sample)
            && (0.0..=1.0).contains(&cfg.calibration_busy_share)
            && cfg.target_agreement > 0.0
            && cfg.target_agreement <= 1.0;
        if !valid {
            return Err(crate::GratingError::InvalidInput(
                "the calibration sample and busy shares must be in [0, 1] and the target agreement in (0, 1]"
                    .into(),
            ));
        }
        let calibrator = calibrates.then(|| {
            let idle_permits = permits.clone();
            let all = cfg.max_concurrent_requests.max(1);
            let settings = Settings {
                target: cfg.target_agreement,
                sample: cfg.calibration_sample,
                busy_share: cfg.calibration_busy_share,
                profile_dir: cfg
                    .profile_dir
                    .clone()
                    .unwrap_or_else(|| reranker.profile_dir().to_path_buf()),
            };
            Calibrator::start(reranker.clone(), cfg.prune.clone(), settings, move || {
                idle_permits.available_permits() == all
            })
        });
        Ok(Arc::new(AppState {
            engine,
            calibrator,
            permits,
            cfg,
            metrics: Metrics::default(),
            max_doc_tokens,
            info,
            draining: std::sync::atomic::AtomicBool::new(false),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }))
    }

    pub fn engine(&self) -> &SharedReranker {
        &self.engine
    }

    /// Why the server should not be sent new requests now, if it should not: it is shutting
    /// down, or its engine stopped.
    pub(super) fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            Some("the server is shutting down")
        } else if !self.engine.is_running() {
            Some("the engine is not running")
        } else {
            None
        }
    }

    /// Marks the start of a shutdown (readiness turns off).
    pub(super) fn begin_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The 0-1 score of a logit: the model's calibration when it has one, else the sigmoid.
    pub(super) fn relevance(&self, logit: f32) -> f32 {
        self.engine.reranker().relevance(logit)
    }

    /// Tokenizes a request under the server's and the request's length limits. It blocks (the
    /// tokenizer is synchronous), so callers run it on the blocking pool. The documents come
    /// back with the pairs because the handlers echo them in their answers.
    pub(super) fn encode(&self, p: Prepared) -> crate::Result<Encoded> {
        let r = self.engine.reranker();
        let max_length = p.max_length(
            self.max_doc_tokens,
            |q| r.count_tokens(q).unwrap_or(0),
            r.template_tokens(),
        );
        let opts = RerankOptions {
            max_length: Some(max_length),
            truncate: p.truncate,
            truncation: p.truncation,
            instruction: p.instruction,
            ..Default::default()
        };
        let pairs = r.encode(&p.query, &p.documents, &opts)?;
        Ok(Encoded {
            pairs,
            documents: p.documents,
            query: p.query,
            opts,
        })
    }

    /// The pruning rule a request runs with: none when it asks for exact results, else the
    /// self-calibrated rule when self-calibration is on, else the server's.
    fn prune_for(&self, exact: bool) -> PruneConfig {
        if exact {
            return PruneConfig {
                mode: PruneMode::Off,
                ..self.cfg.prune.clone()
            };
        }
        match &self.calibrator {
            Some(c) => c.config(),
            None => self.cfg.prune.clone(),
        }
    }

    /// Hands tokenized pairs to the engine with the server's chunking and pruning settings.
    /// Dropping the answer before it arrives (the client went away, the deadline passed)
    /// cancels the request, so the engine stops spending steps on it.
    pub(super) fn submit(
        &self,
        pairs: Vec<EncodedPair>,
        k: usize,
        exact: bool,
        deadline: Instant,
        tokenize_seconds: f64,
    ) -> Pending {
        self.engine.submit_encoded(
            pairs,
            k,
            self.prune_for(exact),
            Some(deadline),
            tokenize_seconds,
        )
    }

    pub(super) fn counters(&self) -> &Counters {
        self.engine.counters()
    }

    /// Rerank requests being handled now (their permits are taken).
    pub(super) fn in_flight(&self) -> usize {
        self.cfg.max_concurrent_requests.max(1) - self.permits.available_permits()
    }

    /// Answers every queued and running request with `Cancelled` (the shutdown grace is over).
    pub(super) fn cancel_all(&self) {
        self.engine.cancel_all();
    }

    /// Lets the admitted and queued requests finish, then stops the engine's threads; blocks.
    pub(super) fn stop_engine(&self) {
        if let Some(c) = &self.calibrator {
            c.stop();
        }
        self.engine.shutdown();
    }
}

/// A tokenized request, with what a self-calibration re-run needs to repeat it.
pub(super) struct Encoded {
    pub pairs: Vec<EncodedPair>,
    pub documents: Vec<String>,
    pub query: String,
    pub opts: RerankOptions,
}

/// The engine's answer, or `None` when `deadline` passed first (dropping `pending` then
/// cancels the request).
pub(super) async fn wait_until(
    pending: Pending,
    deadline: Instant,
) -> Option<crate::Result<RerankOutput>> {
    tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), pending)
        .await
        .ok()
}

/// The `/info` answer, fixed for the server's lifetime.
fn describe(reranker: &Reranker, cfg: &ServerConfig, max_doc_tokens: usize) -> Info {
    let mi = reranker.info();
    let name = cfg
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_name(reranker.model_id()));
    Info {
        calibration: None,
        model: name.clone(),
        architecture: mi.architecture.clone(),
        num_layers: mi.num_layers,
        hidden_size: mi.hidden_size,
        max_length: mi.max_length,
        score_kind: serde_json::to_value(mi.score_kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        scores: if reranker.score_calibration().is_some() {
            "calibrated"
        } else {
            "sigmoid"
        }
        .into(),
        mode: "grating".into(),
        pruning: match cfg.prune.mode {
            PruneMode::Off => "off",
            PruneMode::TopK => "top-k",
            PruneMode::ExactOrder => "exact-order",
        }
        .into(),
        layer_sharing: cfg.layer_sharing,
        queue_order: cfg.queue_order.clone(),
        step_tokens: cfg.step_tokens,
        cached_layers: cfg.cached_layers,
        starve_after_steps: cfg.starve_after_steps,
        chunk_tokens: cfg.chunk_tokens,
        weights: if cfg.reload_layers {
            "reload"
        } else if reranker.weights_mode() == WeightsMode::Stream {
            "stream"
        } else {
            "resident"
        }
        .into(),
        limits: Limits {
            max_documents: cfg.max_documents,
            max_tokens_per_doc: max_doc_tokens,
            max_body_bytes: cfg.max_body_bytes,
            max_concurrent_requests: cfg.max_concurrent_requests,
            request_timeout_seconds: cfg.request_timeout.as_secs_f64(),
        },
        auth: cfg.api_key.is_some(),
        version: env!("CARGO_PKG_VERSION").into(),
        tei: TeiInfo {
            model_id: name,
            model_sha: None,
            model_dtype: match reranker.dtype() {
                candle_core::DType::F16 => "float16",
                candle_core::DType::BF16 => "bfloat16",
                _ => "float32",
            }
            .into(),
            model_type: TeiModelType {
                reranker: TeiClassifier::single_label(),
            },
            max_concurrent_requests: cfg.max_concurrent_requests,
            max_input_length: max_doc_tokens,
            max_batch_tokens: cfg.step_tokens,
            max_client_batch_size: cfg.max_documents,
            tokenization_workers: 1,
        },
    }
}

/// The name a model is served under when none is given: a hub id as it is, a local
/// directory by its last component (never the full path, which would tell every client where
/// the server's files are).
pub fn default_model_name(model_id: &str) -> String {
    let path = std::path::Path::new(model_id);
    if path.is_absolute() || path.exists() || model_id.starts_with('.') {
        let trimmed = model_id.trim_end_matches(['/', '\\']);
        if let Some(name) = std::path::Path::new(trimmed).file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    model_id.to_string()
}

#[cfg(test)]
mod tests {
    use super::default_model_name;

    #[test]
    fn served_names_never_show_a_path() {
        assert_eq!(
            default_model_name("BAAI/bge-reranker-base"),
            "BAAI/bge-reranker-base"
        );
        assert_eq!(default_model_name("/srv/models/minilm/"), "minilm");
        assert_eq!(default_model_name("../shared/models/minilm"), "minilm");
        assert_eq!(default_model_name("./m"), "m");
    }
}
