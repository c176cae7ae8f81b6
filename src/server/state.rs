//! What every handler shares, and the server's only contact with the engine: its construction
//! in [`AppState::new`] and [`AppState::submit`]. Keeping the engine behind these few methods
//! lets the engine handle change without touching the handlers.

use super::api::{Info, Limits};
use super::config::ServerConfig;
use super::metrics::{self, Metrics};
use super::request::Prepared;
use crate::engine::shared::{Counters, Job, LayerSource, SharedEngine, SharedOptions};
use crate::engine::{RerankOutput, RerankRequest, Reranker};
use crate::error::GratingError;
use crate::prune::PruneMode;
use crate::tokenize::EncodedPair;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, Semaphore};

/// Shared by all handlers.
pub struct AppState {
    reranker: Arc<Reranker>,
    engine: SharedEngine,
    pub(super) cfg: ServerConfig,
    pub(super) metrics: metrics::Metrics,
    /// One per rerank request being handled; none left means 429.
    pub(super) permits: Arc<Semaphore>,
    max_doc_tokens: usize,
    pub(super) info: Info,
}

impl AppState {
    /// Starts the engine's scheduler for `reranker`.
    pub fn new(reranker: Arc<Reranker>, cfg: ServerConfig) -> crate::Result<Arc<AppState>> {
        let model_max = reranker.info().max_length;
        let max_doc_tokens = cfg.max_tokens_per_doc.unwrap_or(model_max).min(model_max);
        let layer_source = if cfg.reload_layers {
            let index = crate::weights::WeightIndex::open(&reranker.files().weights)?;
            let src = crate::weights::MmapSource::open(
                index,
                candle_core::DType::F32,
                candle_core::Device::Cpu,
            )?;
            LayerSource::Reload(Arc::new(src))
        } else if let Some(s) = reranker.streaming() {
            LayerSource::Stream(s.clone())
        } else {
            LayerSource::Resident
        };
        let engine = SharedEngine::start(
            reranker.model().clone(),
            SharedOptions {
                layer_sharing: cfg.layer_sharing,
                order: cfg.queue_order.clone(),
                step_tokens: cfg.step_tokens,
                max_active: cfg.max_concurrent_requests.max(1),
                layer_source,
                cached_layers: cfg.cached_layers.max(1),
                starve_after_steps: cfg.starve_after_steps.max(1),
            },
        );
        let info = describe(&reranker, &cfg, max_doc_tokens);
        Ok(Arc::new(AppState {
            reranker,
            engine,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1))),
            cfg,
            metrics: Metrics::default(),
            max_doc_tokens,
            info,
        }))
    }

    pub fn engine(&self) -> &SharedEngine {
        &self.engine
    }

    /// Tokenizes a request under the server's and the request's length limits. It blocks (the
    /// tokenizer is synchronous), so callers run it on the blocking pool. The documents come
    /// back with the pairs because the handlers echo them in their answers.
    pub(super) fn encode(&self, p: Prepared) -> crate::Result<(Vec<EncodedPair>, Vec<String>)> {
        let r = &self.reranker;
        let max_length = p.max_length(
            self.max_doc_tokens,
            |q| {
                r.encoder()
                    .tokenizer()
                    .encode(q, false)
                    .map(|e| e.len())
                    .unwrap_or(0)
            },
            r.encoder().template_tokens(),
        );
        let mut req = RerankRequest::new(p.query, p.documents);
        req.max_length = Some(max_length);
        req.truncate = p.truncate;
        req.truncation = p.truncation;
        let pairs = r.encode(&req)?;
        Ok((pairs, req.documents))
    }

    /// Hands tokenized pairs to the engine with the server's chunking and pruning settings.
    pub(super) fn submit(
        &self,
        pairs: Vec<EncodedPair>,
        k: usize,
        deadline: Instant,
        tokenize_seconds: f64,
    ) -> Submitted {
        let (tx, answer) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.engine.submit(Job {
            pairs,
            k,
            chunk_tokens: self.cfg.chunk_tokens,
            prune: self.cfg.prune.clone(),
            cancel: cancel.clone(),
            deadline: Some(deadline),
            tokenize_seconds,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        Submitted {
            answer,
            cancel,
            answered: false,
        }
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
        self.engine.shutdown();
    }
}

/// A request in the engine. Dropping it before its answer arrived (the client went away or the
/// deadline passed) cancels it, so the engine stops spending steps on an answer nobody waits
/// for.
pub(super) struct Submitted {
    answer: oneshot::Receiver<crate::Result<RerankOutput>>,
    cancel: Arc<AtomicBool>,
    answered: bool,
}

impl Submitted {
    /// The engine's answer, or `None` when `deadline` passed first (the request is then
    /// cancelled).
    pub(super) async fn wait_until(
        mut self,
        deadline: Instant,
    ) -> Option<crate::Result<RerankOutput>> {
        let got =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), &mut self.answer)
                .await
                .ok()?;
        self.answered = true;
        Some(got.unwrap_or_else(|_| {
            Err(GratingError::Internal(
                "the engine dropped the request".into(),
            ))
        }))
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if !self.answered {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// The `/info` answer, fixed for the server's lifetime.
fn describe(reranker: &Reranker, cfg: &ServerConfig, max_doc_tokens: usize) -> Info {
    let mi = reranker.info();
    Info {
        model: reranker.model_id().to_string(),
        architecture: mi.architecture.clone(),
        num_layers: mi.num_layers,
        hidden_size: mi.hidden_size,
        max_length: mi.max_length,
        score_kind: serde_json::to_value(mi.score_kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
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
        } else if reranker.streaming().is_some() {
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
    }
}
