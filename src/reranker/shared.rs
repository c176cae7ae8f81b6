//! Concurrent requests sharing one layer-major pass: what `grating serve` runs on, and what a
//! Rust program with many callers (threads or async tasks) can use the same way.

use super::{RerankOptions, Reranker};
use crate::engine::layers::LayerSource;
pub use crate::engine::scheduler::SharedOptions;
use crate::engine::scheduler::{Counters, Job, SharedEngine};
use crate::engine::{Mode, RerankOutput};
use crate::error::{GratingError, Result};
use crate::tokenize::EncodedPair;
use crate::weights::{MmapSource, WeightIndex};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::oneshot;

/// A reranker whose concurrent requests share layer steps: each layer's weights are obtained
/// once per step and serve every request at that layer, and each request still gets exactly
/// the answer it gets alone. Requests answer as soon as their own top K is decided.
///
/// ```no_run
/// use grating::{RerankOptions, Reranker, SharedOptions, SharedReranker};
/// use std::sync::Arc;
/// let reranker = Arc::new(Reranker::builder("cross-encoder/ms-marco-MiniLM-L6-v2").build()?);
/// let shared = SharedReranker::new(reranker, SharedOptions::default())?;
/// let out = shared.rerank_blocking("capital of France", &["Paris", "Rome"], &RerankOptions::top_k(1))?;
/// # Ok::<(), grating::GratingError>(())
/// ```
pub struct SharedReranker {
    reranker: Arc<Reranker>,
    engine: SharedEngine,
    chunk_tokens: usize,
}

impl SharedReranker {
    /// Starts the shared pass (an embedder thread and a scheduler thread) over `reranker`.
    pub fn new(reranker: Arc<Reranker>, opts: SharedOptions) -> Result<SharedReranker> {
        if opts.chunk_tokens == 0 || opts.step_tokens == 0 || opts.max_active == 0 {
            return Err(GratingError::InvalidInput(
                "chunk tokens, step tokens and the number of active requests must be positive"
                    .into(),
            ));
        }
        let source = if opts.reload_layers {
            // Rebuilt in the compute dtype on the compute device, as the resident layers are.
            let index = WeightIndex::open(&reranker.files().weights)?;
            let src = MmapSource::open(index, reranker.dtype(), reranker.device().clone())?;
            LayerSource::Reload(Arc::new(src))
        } else {
            reranker.engine.source.clone()
        };
        let chunk_tokens = opts.chunk_tokens;
        let engine = SharedEngine::start(&reranker.engine, source, opts)?;
        Ok(SharedReranker {
            reranker,
            engine,
            chunk_tokens,
        })
    }

    pub fn reranker(&self) -> &Arc<Reranker> {
        &self.reranker
    }

    /// The shared pass's counters (steps, sharing, layer loads, time split).
    pub fn counters(&self) -> &Counters {
        self.engine.counters()
    }

    /// Tokenizes the request on the calling thread and queues it; the answer comes through
    /// the returned [`Pending`]. A request still running at `deadline` is dropped and answered
    /// with [`GratingError::Cancelled`]. Grating mode only (the shared pass is layer-major).
    pub fn submit<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
        deadline: Option<Instant>,
    ) -> Result<Pending> {
        let start = Instant::now();
        if opts.mode != Mode::Grating {
            return Err(GratingError::InvalidInput(
                "the shared pass runs grating mode; use Reranker::rerank for full mode".into(),
            ));
        }
        let k = opts.k_for(documents.len())?;
        let prune = opts
            .prune
            .clone()
            .unwrap_or_else(|| self.reranker.prune_config().clone());
        prune.validate()?;
        let pairs = self.reranker.encode(query, documents, opts)?;
        Ok(self.submit_encoded(pairs, k, prune, deadline, start.elapsed().as_secs_f64()))
    }

    /// Queues an already tokenized request (the server tokenizes on its blocking pool).
    pub(crate) fn submit_encoded(
        &self,
        pairs: Vec<EncodedPair>,
        k: usize,
        prune: crate::prune::PruneConfig,
        deadline: Option<Instant>,
        tokenize_seconds: f64,
    ) -> Pending {
        let (tx, rx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.engine.submit(Job {
            pairs,
            k,
            chunk_tokens: self.chunk_tokens,
            prune,
            cancel: cancel.clone(),
            deadline,
            tokenize_seconds,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        Pending {
            rx,
            cancel,
            answered: false,
        }
    }

    /// Ranks `documents` for `query` in the shared pass (tokenizing on the calling task).
    pub async fn rerank<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
    ) -> Result<RerankOutput> {
        self.submit(query, documents, opts, None)?.await
    }

    /// [`SharedReranker::rerank`] for threads: blocks until the answer (never call it from
    /// inside an async runtime's worker).
    pub fn rerank_blocking<S: AsRef<str>>(
        &self,
        query: &str,
        documents: &[S],
        opts: &RerankOptions,
    ) -> Result<RerankOutput> {
        self.submit(query, documents, opts, None)?.wait()
    }

    /// Whether a request submitted now would be run: not cancelled or shut down, and the
    /// embedder and scheduler threads alive.
    pub fn is_running(&self) -> bool {
        self.engine.is_running()
    }

    /// Answers every queued and running request with `Cancelled` at the next step, and every
    /// later one at once (for shutdown after a grace period).
    pub fn cancel_all(&self) {
        self.engine.cancel_all();
    }

    /// Stops accepting requests, lets the admitted and queued ones finish, and joins the
    /// threads (dropping the `SharedReranker` does the same).
    pub fn shutdown(&self) {
        self.engine.shutdown();
    }
}

/// The answer to a submitted request, to await (any async runtime) or [`Pending::wait`] for.
/// Dropping it unanswered cancels the request, so the pass stops spending steps on it.
pub struct Pending {
    rx: oneshot::Receiver<Result<RerankOutput>>,
    cancel: Arc<AtomicBool>,
    answered: bool,
}

impl Pending {
    /// Blocks until the answer.
    pub fn wait(mut self) -> Result<RerankOutput> {
        let answer = std::mem::replace(&mut self.rx, oneshot::channel().1).blocking_recv();
        self.answered = true;
        answer.unwrap_or_else(|_| Err(dropped()))
    }

    /// Asks the pass to drop the request; it is answered with `Cancelled` at the next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn dropped() -> GratingError {
    GratingError::Internal("the engine dropped the request".into())
}

impl Future for Pending {
    type Output = Result<RerankOutput>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(r) => {
                self.answered = true;
                Poll::Ready(r.unwrap_or_else(|_| Err(dropped())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}
