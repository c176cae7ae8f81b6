//! Cross-request layer sharing: one scheduler thread owns the model and runs a single,
//! never-ending monolithic pass into which concurrent requests are admitted.
//!
//! Every admitted request keeps exactly what a lone monolithic pass keeps: its own candidates,
//! its own chunks of hidden states (planned and repacked with the same functions and the same
//! chunk budget, never mixed with another request's rows), its own [`PruneState`] and the index
//! of the layer it is at. A *step* runs one layer `l` over chunks of several requests that are
//! all at layer `l`, so the layer's weights are obtained once (resident, or read from the weight
//! store when streaming) and serve all of them. Because a
//! request's chunks and the order of its pruning decisions are those of a lone run, its answer
//! is bit-for-bit the answer of [`crate::engine::Reranker::rerank`] in grating mode.
//!
//! A request answers as soon as its own top K is decided (or its last layer is scored), without
//! waiting for anyone else.
//!
//! The pieces: [`policy`] decides each step (who runs, at which layer), [`admission`] embeds
//! arriving requests on a thread of their own and bounds how many hold hidden states, and
//! [`pass`] is the loop that runs the steps over the request state machines
//! ([`super::request`]), with layers from the one layer provider ([`super::layers`]).
//!
//! # Layers between steps
//! After planning a step the scheduler also predicts the next one (the same plan applied to
//! the state this step leaves) and, with streamed weights, reads that layer while this step
//! computes. The last `cached_layers` built layers are kept, so a step at a layer a recent
//! step used (a request whose chunks exceed one step, or orders that take turns) reads
//! nothing. Requests are embedded on a thread of their own before they reach the scheduler,
//! so a large arrival does not stall every running request's next step; with sharing that
//! thread takes the smallest waiting request first (see [`admission`]).
//!
//! Without sharing (`layer_sharing: false`, the baseline the benchmark compares against) the
//! scheduler admits one request at a time in arrival order and runs each whole layer of it in
//! one step: exactly one request after another (the next one is embedded while it runs).

pub(crate) mod admission;
pub(crate) mod pass;
pub mod policy;

use super::layers::LayerSource;
use super::{Engine, RerankOutput};
use crate::error::{GratingError, Result};
use crate::prune::PruneConfig;
use crate::tokenize::EncodedPair;
use admission::{embedder, EmbedQueue, Holders};
use pass::Scheduler;
pub use policy::{QueueOrder, RankedPolicy, StepPolicy, DEFAULT_STARVE_AFTER_STEPS};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Tokens per step unless configured: one default chunk. A small request's latency under load
/// is about its layers times one step (it goes first, but shares each step with the others at
/// its layer), so the step is kept short; a larger step lets more requests share one read of a
/// layer (worth it when layers are streamed) at the cost of that latency. Measured on the
/// shared MiniLM with 2 cores: 8192 gave small requests 4.8x their lone latency at
/// concurrency 4, see docs/serve.md.
pub const DEFAULT_STEP_TOKENS: usize = 4096;

/// Built layers kept between steps.
pub const DEFAULT_CACHED_LAYERS: usize = 2;

/// How the shared pass runs.
pub struct SharedOptions {
    /// Share layer steps between requests (false: one request after another, FIFO).
    pub layer_sharing: bool,
    /// Who gets each step (the fairness policy).
    pub policy: Arc<dyn StepPolicy>,
    /// Token budget of one step, shared by the requests in it.
    pub step_tokens: usize,
    /// Requests holding hidden states at once; later arrivals wait to be embedded (in
    /// `EmbedQueue` order).
    pub max_active: usize,
    /// Layers kept built between steps (at least 1): steps that alternate between requests
    /// at two layers find both without reading either again.
    pub cached_layers: usize,
    /// Tokens per chunk of each request.
    pub chunk_tokens: usize,
    /// Rebuild a layer from the memory-mapped checkpoint whenever a step needs one that is not
    /// built (a stand-in for weight streaming that measures what sharing a read saves).
    pub reload_layers: bool,
}

impl Default for SharedOptions {
    fn default() -> Self {
        SharedOptions {
            layer_sharing: true,
            policy: Arc::new(RankedPolicy::default()),
            step_tokens: DEFAULT_STEP_TOKENS,
            max_active: 64,
            cached_layers: DEFAULT_CACHED_LAYERS,
            chunk_tokens: crate::engine::DEFAULT_CHUNK_TOKENS,
            reload_layers: false,
        }
    }
}

/// Called once with the request's answer, on the scheduler thread (keep it short: send it on).
pub(crate) type Reply = Box<dyn FnOnce(Result<RerankOutput>) + Send>;

/// One tokenized request.
pub(crate) struct Job {
    pub pairs: Vec<EncodedPair>,
    /// K (at most the number of candidates; 0 is refused).
    pub k: usize,
    pub chunk_tokens: usize,
    pub prune: PruneConfig,
    /// Set by the caller when the answer is no longer wanted (timeout, client gone); the
    /// request is dropped at the next step and answered with `Cancelled`.
    pub cancel: Arc<AtomicBool>,
    /// Dropped and answered with `Cancelled` when still running at this instant.
    pub deadline: Option<Instant>,
    /// Seconds the caller spent tokenizing, copied into the stats.
    pub tokenize_seconds: f64,
    pub reply: Reply,
}

/// Engine-wide counters, read by the server's metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests waiting for admission.
    pub pending: AtomicUsize,
    /// Requests admitted and not yet answered.
    pub active: AtomicUsize,
    /// Layer steps run (each obtains one layer's weights once).
    pub steps: AtomicU64,
    /// Sum over steps of the requests served by the step (steps x sharing factor).
    pub request_steps: AtomicU64,
    /// Candidate-layers computed, and those pruning saved, over finished requests.
    pub candidate_layers_computed: AtomicU64,
    pub candidate_layers_saved: AtomicU64,
    /// Tokens run through layers.
    pub token_layers: AtomicU64,
    /// Microseconds steps waited for streamed weights.
    pub stall_micros: AtomicU64,
    /// Steps that had to obtain their layer (a read when streaming); the others reused the
    /// previous step's layer.
    pub layer_loads: AtomicU64,
    /// Streamed layer loads that found their layer already read ahead.
    pub read_ahead_hits: AtomicU64,
    /// Microseconds the reader threads took to read the streamed layers that steps used
    /// (mostly overlapped with computation, unlike `stall_micros`).
    pub read_micros: AtomicU64,
    /// Microseconds spent embedding requests (on the embedder thread), and on the scheduler's
    /// thread obtaining layers (stalls included) and running them (scoring included).
    pub embed_micros: AtomicU64,
    pub obtain_micros: AtomicU64,
    pub compute_micros: AtomicU64,
}

pub(crate) enum Msg {
    /// A job and when it was submitted.
    Job(Box<Job>, Instant),
    CancelAll,
}

/// Handle to the scheduler thread. Dropping it (or [`SharedEngine::shutdown`]) lets in-flight
/// requests finish, then stops the thread.
pub(crate) struct SharedEngine {
    tx: Mutex<Option<Sender<Msg>>>,
    /// Set by [`SharedEngine::cancel_all`]: from then on every request, queued, running or
    /// submitted later, is answered with `Cancelled` (so a request racing the cancellation
    /// cannot slip through).
    cancelled: Arc<AtomicBool>,
    /// The embedder, then the scheduler.
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

impl SharedEngine {
    /// Starts the embedder and scheduler threads over `engine`'s model, with layers from
    /// `source`.
    pub(crate) fn start(
        engine: &Engine,
        source: LayerSource,
        opts: SharedOptions,
    ) -> Result<SharedEngine> {
        let model = engine.model.clone();
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let cancelled = Arc::new(AtomicBool::new(false));
        // With sharing, as many requests hold hidden states as may be admitted; without, the
        // running one and the next one, embedded while the first runs.
        let holders = Arc::new(Holders::new(if opts.layer_sharing {
            opts.max_active.max(1)
        } else {
            2
        }));
        let (m, c, flag) = (model.clone(), counters.clone(), cancelled.clone());
        // One request after another means in arrival order.
        let queue = EmbedQueue::new(opts.layer_sharing);
        let embedder = std::thread::Builder::new()
            .name("grating-embedder".into())
            .spawn(move || embedder(m, rx, ready_tx, holders, flag, c, queue))?;
        let (c, flag) = (counters.clone(), cancelled.clone());
        let scheduler = std::thread::Builder::new()
            .name("grating-scheduler".into())
            .spawn(move || Scheduler::new(model, source, opts, c, flag).run(ready_rx))?;
        Ok(SharedEngine {
            tx: Mutex::new(Some(tx)),
            cancelled,
            threads: Mutex::new(vec![embedder, scheduler]),
            counters,
        })
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Queues a job. On error (the engine stopped) the job's reply is called with it.
    pub(crate) fn submit(&self, job: Job) {
        if self.cancelled.load(Ordering::SeqCst) {
            (job.reply)(Err(GratingError::Cancelled(
                "the server is shutting down".into(),
            )));
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(tx) = tx else {
            (job.reply)(Err(GratingError::Cancelled(
                "the engine is shutting down".into(),
            )));
            return;
        };
        self.counters.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(Msg::Job(job, _))) =
            tx.send(Msg::Job(Box::new(job), Instant::now()))
        {
            self.counters.pending.fetch_sub(1, Ordering::SeqCst);
            (job.reply)(Err(GratingError::Internal(
                "the scheduler has stopped".into(),
            )));
        }
    }

    /// Whether a submitted job would be run: not cancelled, not shut down, and both threads
    /// alive (a thread that ended on its own would leave jobs unanswered).
    pub(crate) fn is_running(&self) -> bool {
        let open = self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        open && !self.cancelled.load(Ordering::SeqCst)
            && !threads.is_empty()
            && threads.iter().all(|t| !t.is_finished())
    }

    /// Answers every queued and running request with `Cancelled` at the next step.
    pub(crate) fn cancel_all(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(Msg::CancelAll);
        }
    }

    /// Stops accepting jobs, lets the admitted and queued ones finish, and joins the thread.
    pub(crate) fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for SharedEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod policy_props;
