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
//! # Fairness policy
//! Each step computes at most `step_tokens` tokens (one chunk more when a single chunk is
//! larger). Who gets them is decided by the queue order. The default is **shortest remaining
//! work counted as if nothing were pruned** (SRPT on the admitted size): requests are ordered
//! by the token-layers they would still compute had pruning removed nothing (admitted tokens
//! times the layers ahead), ties by arrival. A step costs about one layer read however few
//! tokens ride in it, so a pruned large request still has all its steps ahead; ranked on its
//! pruned tokens it would hold up a small newcomer for all of them. The step's
//! layer is the layer of the first request in that order, except that a request of about its
//! size a few layers behind it catches up first (`shortest-unpruned-aligned`): the two then
//! share every later layer read instead of taking turns. The requests at that layer then
//! take their next chunks round robin in that order, one chunk each per round, until the budget
//! is spent (the order is strict: when the next chunk does not fit, the step is full and no
//! later request leapfrogs it with a smaller chunk). A small request therefore advances at
//! nearly every step from its arrival however large the running requests are, and a request
//! with thousands of candidates gets the steps small ones leave plus a ride in theirs. Plain
//! SRPT can starve a large request under a steady stream of small ones, so a request passed
//! over for `starve_after_steps` consecutive steps goes first (the starvation guard). See
//! [`plan_step`], which is pure and unit-tested.
//!
//! Other orders ([`Rank`]): plain shortest remaining work (on live tokens), least attained
//! service (newcomers first: most sharing, since newcomers catch up with each other, but a
//! small request deep into its layers waits for every newcomer to catch up with it), and most
//! shared (the layer most requests wait at). A
//! [`QueueOrder`] is a list of ranks that steps take in turn. docs/serve.md has the
//! measurements behind the default.
//!
//! # Layers between steps
//! After planning a step the scheduler also predicts the next one (the same plan applied to
//! the state this step leaves) and, with streamed weights, reads that layer while this step
//! computes. The last `cached_layers` built layers are kept, so a step at a layer a recent
//! step used (a request whose chunks exceed one step, or orders that take turns) reads
//! nothing. Requests are embedded on a thread of their own before they reach the scheduler,
//! so a large arrival does not stall every running request's next step; with sharing that
//! thread takes the smallest waiting request first (see [`EmbedQueue`]).
//!
//! Without sharing (`layer_sharing: false`, the baseline the benchmark compares against) the
//! scheduler admits one request at a time in arrival order and runs each whole layer of it in
//! one step: exactly one request after another (the next one is embedded while it runs).

use super::full::{length_order, pack};
use super::monolithic::{plan_chunks, repack, Chunk};
use super::offload::Hidden;
use super::stats::{LayerTiming, RequestStats};
use super::{RerankOutput, Scored};
use crate::error::{GratingError, Result};
use crate::models::{LayerBlock, RerankModel};
use crate::prune::state::PruneState;
use crate::prune::PruneConfig;
use crate::tokenize::EncodedPair;
use crate::weights::TensorSource;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Tokens per step unless configured: one default chunk. A small request's latency under load
/// is about its layers times one step (it goes first, but shares each step with the others at
/// its layer), so the step is kept short; a larger step lets more requests share one read of a
/// layer (worth it when layers are streamed) at the cost of that latency. Measured on the
/// shared MiniLM with 2 cores: 8192 gave small requests 4.8x their lone latency at
/// concurrency 4, see docs/serve.md.
pub const DEFAULT_STEP_TOKENS: usize = 4096;

/// Steps a request may be passed over before it goes first regardless of the queue order.
/// Long enough for a few small requests to run all their layers (28 for Qwen3-0.6B) between
/// two guarded steps of a large one: each guarded step is a whole large layer that every
/// small request at another layer waits for. Measured on H200s with streamed weights
/// (docs/serve.md): at 32, 6-7 such steps (about 40 ms) were in the slowest small requests'
/// latency; with the default order, the small p99 under load was at a median 2.87x its p99
/// alone at 32 and 2.67x at 96, and the p99 of all requests (the large ones) 0.84-1.03 s at
/// 32 and 1.12-1.38 s at 96.
pub const DEFAULT_STARVE_AFTER_STEPS: u32 = 96;

/// Built layers kept between steps.
pub const DEFAULT_CACHED_LAYERS: usize = 2;

/// Where the scheduler gets a layer's weights for each step.
pub enum LayerSource {
    /// The model's resident layers.
    Resident,
    /// Rebuild a layer from this source (the memory-mapped checkpoint) whenever a step needs
    /// one that is not built: a stand-in for the streaming weight store, so that the cost of
    /// reading a layer, which sharing pays once per step instead of once per request, is part
    /// of what is measured.
    Reload(Arc<dyn TensorSource + Send + Sync>),
    /// Streamed weights: each step's layer is read with `pread`, and the following layer is
    /// read ahead while the step computes (steps mostly advance one layer at a time).
    Stream(super::Streaming),
}

/// What one step's queue is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rank {
    /// Least attained service first: token-layers computed so far, ties by arrival. Needs no
    /// size estimate; newcomers go first.
    LeastAttained,
    /// Least work left first: token-layers still to compute (its live tokens times the layers
    /// ahead, an upper bound since pruning only removes work), ties by arrival. Small requests
    /// are not preempted by large newcomers; fewer requests share each step.
    ShortestRemaining,
    /// The layer most requests are waiting at first (ties: least work left): one read serves
    /// the most requests.
    MostShared,
    /// Least work left first, except that a request a few layers behind the first one (at most
    /// [`CATCH_UP_LAYERS`]) whose whole layer fits in the step goes first, so that it catches
    /// up and the two then share every later step. A step of a small request costs about one
    /// layer read whoever rides in it, so a short wait of the leader buys the trailing request
    /// all its later steps.
    ShortestRemainingAligned,
    /// Least work left as if nothing were pruned (its admitted tokens times the layers ahead),
    /// ties by arrival. A step costs about one layer read however few tokens ride in it, so
    /// pruning shrinks a request's tokens but not its steps: ranked on its pruned tokens, a
    /// large request with many layers ahead goes before a small newcomer and holds it up for
    /// all of them.
    ShortestUnprunedRemaining,
    /// [`Rank::ShortestUnprunedRemaining`], except that a request of about the first one's
    /// size (admitted tokens at most [`ALIGN_SIZE_RATIO`] times its) at most
    /// [`CATCH_UP_LAYERS`] behind it, whose layer fits in the step, goes first and catches up;
    /// the two then share every later read. Only requests of about the leader's size: a
    /// larger one catching up would make the leader wait for its heavier steps and then ride
    /// in every one of them.
    ShortestUnprunedAligned,
}

/// How far behind the request with the least work left a request may be and still catch up
/// with it under [`Rank::ShortestRemainingAligned`].
pub const CATCH_UP_LAYERS: usize = 4;

/// Steps a request may wait, over its life, for others to catch up with it: bounds what the
/// alignment costs the leader.
pub const MAX_DEFERRALS: u32 = 2 * CATCH_UP_LAYERS as u32;

/// Under [`Rank::ShortestUnprunedAligned`], a request catches up with the first one only if
/// its admitted tokens are at most this many times the first one's.
pub const ALIGN_SIZE_RATIO: f64 = 1.5;

impl Rank {
    fn name(self) -> &'static str {
        match self {
            Rank::LeastAttained => "least-attained",
            Rank::ShortestRemaining => "shortest-remaining",
            Rank::MostShared => "most-shared",
            Rank::ShortestRemainingAligned => "shortest-remaining-aligned",
            Rank::ShortestUnprunedRemaining => "shortest-unpruned-remaining",
            Rank::ShortestUnprunedAligned => "shortest-unpruned-aligned",
        }
    }

    /// Under an aligned rank, the largest admitted size (in tokens) of a request that may
    /// catch up with a first request of `leader_tokens`; `None` for other ranks.
    fn catch_up_limit(self, leader_tokens: u64) -> Option<u64> {
        match self {
            Rank::ShortestRemainingAligned => Some(u64::MAX),
            Rank::ShortestUnprunedAligned => Some((leader_tokens as f64 * ALIGN_SIZE_RATIO) as u64),
            _ => None,
        }
    }
}

/// The order in which admitted requests get the steps (see the module docs): step `i` is
/// ranked by `ranks[i % ranks.len()]`, so a list makes steps take turns between orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOrder {
    ranks: Vec<Rank>,
}

impl QueueOrder {
    pub fn new(ranks: Vec<Rank>) -> Result<QueueOrder> {
        if ranks.is_empty() {
            return Err(GratingError::InvalidInput(
                "a queue order needs a rank".into(),
            ));
        }
        Ok(QueueOrder { ranks })
    }

    pub fn least_attained() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::LeastAttained],
        }
    }

    pub fn shortest_remaining() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::ShortestRemaining],
        }
    }

    pub fn shortest_unpruned_aligned() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::ShortestUnprunedAligned],
        }
    }

    /// Even steps to the request with the least work left, odd steps to the one with the
    /// least attained service.
    pub fn alternating() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::ShortestRemaining, Rank::LeastAttained],
        }
    }

    /// The rank that orders step number `step`.
    pub fn rank(&self, step: u64) -> Rank {
        self.ranks[(step % self.ranks.len() as u64) as usize]
    }
}

/// Shortest remaining work counted as if nothing were pruned, with requests of the leader's
/// size catching up with it: measured side by side with the same order without catching up
/// on H200s with streamed weights (docs/serve.md), 16-21% more throughput at concurrency 16
/// and a small-request p99 at a median 2.9x its p99 alone instead of 3.2x (2.7x with the
/// default starvation guard).
impl Default for QueueOrder {
    fn default() -> Self {
        QueueOrder::shortest_unpruned_aligned()
    }
}

impl std::fmt::Display for QueueOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.ranks.iter().map(|r| r.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for QueueOrder {
    type Err = GratingError;
    /// A comma-separated list of `least-attained`, `shortest-remaining`, `most-shared`,
    /// `shortest-remaining-aligned`, `shortest-unpruned-remaining`, `shortest-unpruned-aligned`;
    /// `alternating` stands for `shortest-remaining,least-attained`.
    fn from_str(s: &str) -> Result<QueueOrder> {
        let mut ranks = Vec::new();
        for part in s.split(',').map(str::trim) {
            match part {
                "least-attained" => ranks.push(Rank::LeastAttained),
                "shortest-remaining" => ranks.push(Rank::ShortestRemaining),
                "most-shared" => ranks.push(Rank::MostShared),
                "shortest-remaining-aligned" => ranks.push(Rank::ShortestRemainingAligned),
                "shortest-unpruned-remaining" => ranks.push(Rank::ShortestUnprunedRemaining),
                "shortest-unpruned-aligned" => ranks.push(Rank::ShortestUnprunedAligned),
                "alternating" => ranks.extend(QueueOrder::alternating().ranks),
                other => {
                    return Err(GratingError::InvalidInput(format!(
                        "unknown queue order {other:?} (least-attained, shortest-remaining, \
                         shortest-remaining-aligned, shortest-unpruned-remaining, \
                         shortest-unpruned-aligned, most-shared, alternating, or a \
                         comma-separated list of them)"
                    )))
                }
            }
        }
        QueueOrder::new(ranks)
    }
}

impl serde::Serialize for QueueOrder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

pub struct SharedOptions {
    /// Share layer steps between requests (false: one request after another, FIFO).
    pub layer_sharing: bool,
    pub order: QueueOrder,
    /// Token budget of one step, shared by the requests in it.
    pub step_tokens: usize,
    /// Requests holding hidden states at once; later arrivals wait to be embedded (in
    /// [`EmbedQueue`] order).
    pub max_active: usize,
    pub starve_after_steps: u32,
    pub layer_source: LayerSource,
    /// Layers kept built between steps (at least 1): steps that alternate between requests
    /// at two layers find both without reading either again.
    pub cached_layers: usize,
}

impl Default for SharedOptions {
    fn default() -> Self {
        SharedOptions {
            layer_sharing: true,
            order: QueueOrder::default(),
            step_tokens: DEFAULT_STEP_TOKENS,
            max_active: 64,
            starve_after_steps: DEFAULT_STARVE_AFTER_STEPS,
            layer_source: LayerSource::Resident,
            cached_layers: DEFAULT_CACHED_LAYERS,
        }
    }
}

/// Called once with the request's answer, on the scheduler thread (keep it short: send it on).
pub type Reply = Box<dyn FnOnce(Result<RerankOutput>) + Send>;

/// One tokenized request.
pub struct Job {
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

enum Msg {
    /// A job and when it was submitted.
    Job(Box<Job>, Instant),
    CancelAll,
}

/// Handle to the scheduler thread. Dropping it (or [`SharedEngine::shutdown`]) lets in-flight
/// requests finish, then stops the thread.
pub struct SharedEngine {
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
    pub fn start(model: Arc<dyn RerankModel>, opts: SharedOptions) -> SharedEngine {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let cancelled = Arc::new(AtomicBool::new(false));
        // With sharing, as many requests hold hidden states as may be admitted; without, the
        // running one and the next one, embedded while the first runs.
        let holders = Arc::new(Holders {
            count: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            limit: if opts.layer_sharing {
                opts.max_active.max(1)
            } else {
                2
            },
        });
        let (m, c, flag) = (model.clone(), counters.clone(), cancelled.clone());
        // One request after another means in arrival order.
        let queue = EmbedQueue::new(opts.layer_sharing);
        let embedder = std::thread::Builder::new()
            .name("grating-embedder".into())
            .spawn(move || embedder(m, rx, ready_tx, holders, flag, c, queue))
            .expect("spawn the embedder thread");
        let (c, flag) = (counters.clone(), cancelled.clone());
        let scheduler = std::thread::Builder::new()
            .name("grating-scheduler".into())
            .spawn(move || Scheduler::new(model, opts, c, flag).run(ready_rx))
            .expect("spawn the scheduler thread");
        SharedEngine {
            tx: Mutex::new(Some(tx)),
            cancelled,
            threads: Mutex::new(vec![embedder, scheduler]),
            counters,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Queues a job. On error (the engine stopped) the job's reply is called with it.
    pub fn submit(&self, job: Job) {
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

    /// Answers every queued and running request with `Cancelled` at the next step.
    pub fn cancel_all(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(Msg::CancelAll);
        }
    }

    /// Stops accepting jobs, lets the admitted and queued ones finish, and joins the thread.
    pub fn shutdown(&self) {
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

/// What [`plan_step`] knows of one admitted request.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCandidate {
    /// Arrival order.
    pub seq: u64,
    /// The layer (0-based) its next chunks run.
    pub layer: usize,
    /// Token-layers computed for it so far.
    pub attained: u64,
    /// Token-layers still to compute at most: its tokens left at `layer`, plus its live
    /// tokens for every later layer.
    pub remaining: u64,
    /// Its tokens when admitted, before any pruning.
    pub admitted_tokens: u64,
    /// Consecutive steps it had work but was passed over.
    pub idle_steps: u32,
    /// Steps it led the queue but waited for a trailing request to catch up.
    pub deferrals: u32,
    /// Tokens of its chunks still to run at `layer`, in order.
    pub chunk_tokens: Vec<usize>,
    /// Tokens of all its live chunks (what it runs at the next layer unless pruning shrinks
    /// it).
    pub live_chunk_tokens: Vec<usize>,
}

/// A planned step: the layer, and `(request position, chunks to run)` in service order.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub layer: usize,
    pub work: Vec<(usize, usize)>,
    /// The request that led the queue but waits this step for a trailing one to catch up.
    pub deferred: Option<usize>,
}

impl StepCandidate {
    /// `remaining` scaled from its live tokens up to its admitted ones: its admitted tokens
    /// times the layers ahead, counting the part of this layer still to run.
    pub fn unpruned_remaining(&self) -> u64 {
        let live: u64 = self.live_chunk_tokens.iter().map(|&t| t as u64).sum();
        let scaled =
            self.remaining as u128 * self.admitted_tokens.max(live) as u128 / live.max(1) as u128;
        scaled.min(u64::MAX as u128) as u64
    }
}

impl StepPlan {
    /// Updates request `i`'s waiting counters for this step: passed-over steps (the
    /// starvation guard) and steps it led but waited for a trailing request.
    fn count_waits(&self, i: usize, idle_steps: &mut u32, deferrals: &mut u32) {
        if self.work.iter().any(|w| w.0 == i) {
            *idle_steps = 0;
        } else {
            *idle_steps = idle_steps.saturating_add(1);
        }
        if self.deferred == Some(i) {
            *deferrals += 1;
        }
    }
}

/// The fairness policy (see the module docs): the order of `rank` with a starvation guard,
/// the layer of the first request (or of a trailing one catching up, under
/// [`Rank::ShortestRemainingAligned`] and [`Rank::ShortestUnprunedAligned`]), then chunks of
/// the requests at that layer, round robin
/// in that order (one chunk each per round), within `budget` (at least one chunk).
pub fn plan_step(
    cands: &[StepCandidate],
    budget: usize,
    starve_after: u32,
    rank: Rank,
) -> Option<StepPlan> {
    let mut order: Vec<usize> = (0..cands.len())
        .filter(|&i| !cands[i].chunk_tokens.is_empty())
        .collect();
    // Requests with work at each layer (for `MostShared`).
    let mut waiting_at: Vec<u64> = Vec::new();
    if rank == Rank::MostShared {
        for &i in &order {
            let l = cands[i].layer;
            if waiting_at.len() <= l {
                waiting_at.resize(l + 1, 0);
            }
            waiting_at[l] += 1;
        }
    }
    order.sort_by_cached_key(|&i| {
        let c = &cands[i];
        let (first, second) = match rank {
            Rank::ShortestRemaining | Rank::ShortestRemainingAligned => (c.remaining, 0),
            Rank::LeastAttained => (c.attained, 0),
            Rank::MostShared => (u64::MAX - waiting_at[c.layer], c.remaining),
            Rank::ShortestUnprunedRemaining | Rank::ShortestUnprunedAligned => {
                (c.unpruned_remaining(), 0)
            }
        };
        (c.idle_steps < starve_after, first, second, c.seq)
    });
    let head_index = *order.first()?;
    let head = &cands[head_index];
    let mut layer = head.layer;
    let mut deferred = None;
    let may_wait = head.idle_steps < starve_after && head.deferrals < MAX_DEFERRALS;
    if let Some(limit) = rank
        .catch_up_limit(head.admitted_tokens)
        .filter(|_| may_wait)
    {
        // The furthest behind of the cheap requests within reach catches up first (it picks
        // up the others on its way).
        let trailing = order
            .iter()
            .map(|&i| &cands[i])
            .filter(|c| c.layer < layer && layer - c.layer <= CATCH_UP_LAYERS)
            .filter(|c| c.admitted_tokens <= limit)
            .filter(|c| c.chunk_tokens.iter().sum::<usize>() <= budget)
            .map(|c| c.layer)
            .min();
        if let Some(t) = trailing {
            layer = t;
            deferred = Some(head_index);
        }
    }
    let at_layer: Vec<usize> = order
        .into_iter()
        .filter(|&i| cands[i].layer == layer)
        .collect();
    // Round robin in rank order, one chunk per request per round, so every request at the
    // layer gets a share of the step (and of the layer read) before any gets a second chunk.
    let mut taken = vec![0usize; at_layer.len()];
    let mut used = 0usize;
    'rounds: loop {
        let mut progressed = false;
        for (j, &i) in at_layer.iter().enumerate() {
            let Some(&t) = cands[i].chunk_tokens.get(taken[j]) else {
                continue;
            };
            if used > 0 && used + t > budget {
                break 'rounds;
            }
            used += t;
            taken[j] += 1;
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    let work = at_layer
        .into_iter()
        .zip(taken)
        .filter(|&(_, n)| n > 0)
        .collect();
    Some(StepPlan {
        layer,
        work,
        deferred,
    })
}

/// The layer of the step after `plan`, as far as the scheduler can tell now: the candidates
/// are advanced by the plan (a request that completes its layer moves on with all its live
/// chunks, one past the last layer leaves) and planned again. Arrivals and pruning can change
/// it; the streamed layer read ahead for it is then wasted and the step reads its own.
pub fn predict_next_layer(
    cands: &[StepCandidate],
    plan: &StepPlan,
    num_layers: usize,
    budget: usize,
    starve_after: u32,
    rank: Rank,
) -> Option<usize> {
    let mut after: Vec<StepCandidate> = Vec::with_capacity(cands.len());
    for (i, c) in cands.iter().enumerate() {
        let mut c = c.clone();
        plan.count_waits(i, &mut c.idle_steps, &mut c.deferrals);
        if let Some(&(_, n)) = plan.work.iter().find(|w| w.0 == i) {
            let n = n.min(c.chunk_tokens.len());
            let ran: usize = c.chunk_tokens.drain(..n).sum();
            c.attained += ran as u64;
            c.remaining = c.remaining.saturating_sub(ran as u64);
            if c.chunk_tokens.is_empty() {
                c.layer += 1;
                if c.layer >= num_layers {
                    continue;
                }
                c.chunk_tokens = c.live_chunk_tokens.clone();
            }
        }
        after.push(c);
    }
    plan_step(&after, budget, starve_after, rank).map(|p| p.layer)
}

/// An admitted request.
struct Active {
    seq: u64,
    pairs: Vec<EncodedPair>,
    k: usize,
    chunk_tokens: usize,
    cancel: Arc<AtomicBool>,
    deadline: Option<Instant>,
    reply: Option<Reply>,
    state: PruneState,
    chunks: Vec<Chunk>,
    layer: usize,
    next_chunk: usize,
    attained: u64,
    idle_steps: u32,
    deferrals: u32,
    layers_done: Vec<u16>,
    stats: RequestStats,
    /// When its embedding started (its engine time counts from here).
    admitted: Instant,
    /// How long it waited for the embedder.
    queued: Duration,
    layer_tokens: usize,
    layer_seconds: f64,
    finals: Vec<(usize, f32)>,
    done: bool,
    _slot: HolderSlot,
}

impl Active {
    fn finish(&mut self, result: Result<Vec<Scored>>, counters: &Counters) {
        self.done = true;
        tracing::debug!(
            target: "grating::step",
            seq = self.seq,
            candidates = self.pairs.len(),
            layer = self.layer,
            ok = result.is_ok(),
            engine_ms = self.admitted.elapsed().as_secs_f64() * 1e3,
            "request done"
        );
        let result = result.map(|ranked| {
            let mut stats = std::mem::take(&mut self.stats);
            stats.layers_per_candidate = std::mem::take(&mut self.layers_done);
            stats.prune_events = self.state.events().to_vec();
            stats.total_seconds = self.admitted.elapsed().as_secs_f64() + stats.tokenize_seconds;
            stats.finish_counts();
            counters
                .candidate_layers_computed
                .fetch_add(stats.candidate_layers_computed, Ordering::Relaxed);
            counters.candidate_layers_saved.fetch_add(
                stats
                    .candidate_layers_full
                    .saturating_sub(stats.candidate_layers_computed),
                Ordering::Relaxed,
            );
            RerankOutput { ranked, stats }
        });
        self.chunks.clear();
        if let Some(r) = self.reply.take() {
            r(result);
        }
    }
}

struct Scheduler {
    model: Arc<dyn RerankModel>,
    opts: SharedOptions,
    counters: Arc<Counters>,
    /// Embedded requests waiting for admission.
    pending: VecDeque<Box<Active>>,
    active: Vec<Active>,
    next_seq: u64,
    open: bool,
    cancelled: Arc<AtomicBool>,
    /// Streaming: the layer being read ahead for the next step.
    read_ahead: Option<(usize, crate::weights::stream::LayerStream)>,
    /// Layers built by recent steps, least recently used first (at most `cached_layers`): a
    /// step at one of them (a request whose chunks at a layer exceed one step's budget, or
    /// alternating steps) reuses it instead of obtaining it again.
    built: VecDeque<(usize, Arc<dyn LayerBlock>)>,
    /// Steps planned so far (the alternating order's parity).
    steps: u64,
}

impl Scheduler {
    fn new(
        model: Arc<dyn RerankModel>,
        opts: SharedOptions,
        counters: Arc<Counters>,
        cancelled: Arc<AtomicBool>,
    ) -> Self {
        Scheduler {
            model,
            opts,
            counters,
            pending: VecDeque::new(),
            active: Vec::new(),
            next_seq: 0,
            open: true,
            cancelled,
            read_ahead: None,
            built: VecDeque::new(),
            steps: 0,
        }
    }

    fn run(mut self, rx: Receiver<Ready>) {
        loop {
            // Take what has arrived; block only when there is nothing to compute.
            loop {
                let msg = if self.active.is_empty() && self.pending.is_empty() && self.open {
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => {
                            self.open = false;
                            break;
                        }
                    }
                } else if self.open {
                    match rx.try_recv() {
                        Ok(m) => m,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            self.open = false;
                            break;
                        }
                    }
                } else {
                    break;
                };
                match msg {
                    Ready::Request(a) => self.pending.push_back(a),
                    Ready::CancelAll => {}
                }
            }
            if self.cancelled.load(Ordering::SeqCst) {
                self.cancel_all();
            }
            if !self.open && self.active.is_empty() && self.pending.is_empty() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.active.retain(|a| !a.done);
            self.counters
                .active
                .store(self.active.len(), Ordering::SeqCst);
        }
    }

    fn cancel_all(&mut self) {
        for mut a in self.pending.drain(..) {
            self.counters.pending.fetch_sub(1, Ordering::SeqCst);
            a.finish(
                Err(GratingError::Cancelled(
                    "the server is shutting down".into(),
                )),
                &self.counters,
            );
        }
        for a in &mut self.active {
            a.finish(
                Err(GratingError::Cancelled(
                    "the server is shutting down".into(),
                )),
                &self.counters,
            );
        }
        self.active.clear();
    }

    fn drop_cancelled(&mut self) {
        let now = Instant::now();
        let expired = |cancel: &AtomicBool, deadline: Option<Instant>| {
            cancel.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d)
        };
        let counters = &self.counters;
        self.pending.retain_mut(|a| {
            if expired(&a.cancel, a.deadline) {
                counters.pending.fetch_sub(1, Ordering::SeqCst);
                a.finish(
                    Err(GratingError::Cancelled(
                        "deadline exceeded or cancelled".into(),
                    )),
                    counters,
                );
                false
            } else {
                true
            }
        });
        for a in &mut self.active {
            if expired(&a.cancel, a.deadline) {
                a.finish(
                    Err(GratingError::Cancelled(
                        "deadline exceeded or cancelled".into(),
                    )),
                    counters,
                );
            }
        }
        self.active.retain(|a| !a.done);
    }

    /// Admits embedded requests (all of them up to `max_active` with sharing; one at a time
    /// without).
    fn admit(&mut self) {
        let limit = if self.opts.layer_sharing {
            self.opts.max_active.max(1)
        } else {
            1
        };
        while self.active.len() < limit {
            let Some(mut a) = self.pending.pop_front() else {
                break;
            };
            self.counters.pending.fetch_sub(1, Ordering::SeqCst);
            a.seq = self.next_seq;
            self.next_seq += 1;
            tracing::debug!(
                target: "grating::step",
                seq = a.seq,
                candidates = a.pairs.len(),
                // Nothing but the embedding has been computed yet.
                embed_us = (a.stats.compute_seconds * 1e6) as u64,
                queued_us = a.queued.as_micros() as u64,
                "request admitted"
            );
            self.active.push(*a);
        }
        self.counters
            .active
            .store(self.active.len(), Ordering::SeqCst);
    }

    fn step(&mut self) {
        if self.active.is_empty() {
            return;
        }
        let num_layers = self.model.info().num_layers;
        let budget = if self.opts.layer_sharing {
            self.opts.step_tokens.max(1)
        } else {
            usize::MAX
        };
        let cands: Vec<StepCandidate> = self
            .active
            .iter()
            .map(|a| {
                let live_chunk_tokens: Vec<usize> =
                    a.chunks.iter().map(|c| c.batch.num_tokens()).collect();
                let chunk_tokens = live_chunk_tokens[a.next_chunk.min(a.chunks.len())..].to_vec();
                let live: usize = live_chunk_tokens.iter().sum();
                let later = num_layers.saturating_sub(a.layer + 1);
                StepCandidate {
                    seq: a.seq,
                    layer: a.layer,
                    attained: a.attained,
                    remaining: (chunk_tokens.iter().sum::<usize>() + live * later) as u64,
                    // Packed chunks hold every token of every candidate, no padding.
                    admitted_tokens: a.stats.tokens as u64,
                    idle_steps: a.idle_steps,
                    deferrals: a.deferrals,
                    chunk_tokens,
                    live_chunk_tokens,
                }
            })
            .collect();
        let rank = self.opts.order.rank(self.steps);
        let plan = plan_step(&cands, budget, self.opts.starve_after_steps, rank);
        let Some(plan) = plan else {
            return;
        };
        self.steps += 1;
        let _span =
            tracing::trace_span!("step", layer = plan.layer, requests = plan.work.len()).entered();
        let served: Vec<usize> = plan.work.iter().map(|w| w.0).collect();
        for (i, a) in self.active.iter_mut().enumerate() {
            plan.count_waits(i, &mut a.idle_steps, &mut a.deferrals);
        }
        let model = self.model.clone();
        // Only streamed layers are read ahead. With nothing left after this step, the next
        // work is a newcomer at layer 0.
        let next = matches!(self.opts.layer_source, LayerSource::Stream(_)).then(|| {
            predict_next_layer(
                &cands,
                &plan,
                num_layers,
                budget,
                self.opts.starve_after_steps,
                self.opts.order.rank(self.steps),
            )
            .unwrap_or(0)
        });
        let t = Instant::now();
        let obtained = catch_unwind(AssertUnwindSafe(|| self.obtain_layer(plan.layer, next)));
        let obtain_us = t.elapsed().as_micros() as u64;
        self.counters
            .obtain_micros
            .fetch_add(obtain_us, Ordering::Relaxed);
        let layer = match obtained {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return self.fail(&served, e),
            Err(_) => {
                return self.fail(
                    &served,
                    GratingError::Internal("panic while loading a layer".into()),
                )
            }
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters
            .request_steps
            .fetch_add(plan.work.len() as u64, Ordering::Relaxed);
        let t = Instant::now();
        // Two phases: every request's chunks are queued first, then the requests that completed
        // the layer are scored. Scoring reads the scores back to the host, which waits for the
        // device; done per request between the others' layers, each read-back waited before
        // the next request's kernels were queued.
        let counters = &self.counters;
        let mut completed: Vec<usize> = Vec::with_capacity(plan.work.len());
        for &(i, n) in &plan.work {
            let ran = guarded(&mut self.active[i], counters, "running a layer", |a| {
                run_chunks(model.as_ref(), layer.as_ref(), a, n, counters)
            });
            if ran == Some(true) {
                completed.push(i);
            }
        }
        for i in completed {
            guarded(&mut self.active[i], counters, "scoring a layer", |a| {
                complete_layer(model.as_ref(), a, counters)
            });
        }
        let computed = t.elapsed();
        self.counters
            .compute_micros
            .fetch_add(computed.as_micros() as u64, Ordering::Relaxed);
        if tracing::enabled!(target: "grating::step", tracing::Level::DEBUG) {
            // One line per step (`GRATING_LOG=grating::step=debug`): who ran how many tokens.
            let work: Vec<String> = plan
                .work
                .iter()
                .map(|&(i, n)| {
                    let c = &cands[i];
                    let tokens: usize = c.chunk_tokens.iter().take(n).sum();
                    format!(
                        "{}:{}/{}",
                        c.seq,
                        tokens,
                        c.live_chunk_tokens.iter().sum::<usize>()
                    )
                })
                .collect();
            tracing::debug!(
                target: "grating::step",
                layer = plan.layer,
                rank = ?rank,
                next = ?next,
                loads = self.counters.layer_loads.load(Ordering::Relaxed),
                active = self.active.len(),
                work = work.join(" "),
                obtain_us = obtain_us,
                compute_us = computed.as_micros() as u64,
            );
        }
    }

    /// Layer `l` for this step; `next` is the predicted layer of the following step, read
    /// ahead while this one computes (streamed layers only).
    fn obtain_layer(&mut self, l: usize, next: Option<usize>) -> Result<Arc<dyn LayerBlock>> {
        let block = match self.built.iter().position(|(bl, _)| *bl == l) {
            Some(i) => {
                let entry = self.built.remove(i).expect("position is in range");
                let block = entry.1.clone();
                self.built.push_back(entry);
                block
            }
            None => {
                // Evicted before the new layer is built: at most `cached_layers` are held.
                while self.built.len() >= self.opts.cached_layers.max(1) {
                    self.built.pop_front();
                }
                self.counters.layer_loads.fetch_add(1, Ordering::Relaxed);
                let block = self.load_layer(l)?;
                self.built.push_back((l, block.clone()));
                block
            }
        };
        if let (LayerSource::Stream(s), Some(next)) = (&self.opts.layer_source, next) {
            let have = self.built.iter().any(|(bl, _)| *bl == next)
                || self.read_ahead.as_ref().is_some_and(|(pl, _)| *pl == next);
            if !have {
                self.read_ahead = Some((next, s.start(vec![next])));
            }
        }
        Ok(block)
    }

    fn load_layer(&mut self, l: usize) -> Result<Arc<dyn LayerBlock>> {
        match &self.opts.layer_source {
            LayerSource::Resident => self.model.layer(l),
            LayerSource::Reload(src) => self.model.load_layer(l, src.as_ref()),
            LayerSource::Stream(s) => {
                let mut stream = match self.read_ahead.take() {
                    Some((pl, st)) if pl == l => {
                        self.counters
                            .read_ahead_hits
                            .fetch_add(1, Ordering::Relaxed);
                        st
                    }
                    _ => s.start(vec![l]),
                };
                let (block, stall) = stream.next(self.model.as_ref(), l)?;
                self.counters
                    .stall_micros
                    .fetch_add((stall * 1e6) as u64, Ordering::Relaxed);
                self.counters
                    .read_micros
                    .fetch_add((stream.read_seconds() * 1e6) as u64, Ordering::Relaxed);
                Ok(block)
            }
        }
    }

    fn fail(&mut self, which: &[usize], e: GratingError) {
        let msg = e.to_string();
        for &i in which {
            self.active[i].finish(Err(GratingError::Internal(msg.clone())), &self.counters);
        }
    }
}

/// A job on the embedder thread, embedded into chunks (as [`super::monolithic::forward`]
/// does) one chunk at a time, so that a small job arriving meanwhile waits for one chunk of a
/// large one, not for all of it.
struct Embedding {
    job: Box<Job>,
    submitted: Instant,
    /// Member lists of the chunks still to embed (planned at the first chunk).
    plan: Option<VecDeque<Vec<usize>>>,
    chunks: Vec<Chunk>,
    /// Its slot among the requests holding hidden states, taken at the first chunk.
    slot: Option<HolderSlot>,
    /// When its first chunk started (its engine time counts from here).
    started: Option<Instant>,
    embed_seconds: f64,
}

impl Embedding {
    fn new(job: Box<Job>, submitted: Instant) -> Embedding {
        Embedding {
            job,
            submitted,
            plan: None,
            chunks: Vec::new(),
            slot: None,
            started: None,
            embed_seconds: 0.0,
        }
    }

    /// Tokens still to embed.
    fn tokens_left(&self) -> usize {
        let pairs = &self.job.pairs;
        match &self.plan {
            Some(plan) => plan.iter().flatten().map(|&m| pairs[m].len()).sum(),
            None => pairs.iter().map(EncodedPair::len).sum(),
        }
    }

    /// Embeds the next chunk; true once all are embedded.
    fn embed_next(&mut self, model: &dyn RerankModel) -> Result<bool> {
        let t = Instant::now();
        self.started.get_or_insert(t);
        let job = &self.job;
        let plan = match &mut self.plan {
            Some(plan) => plan,
            None => {
                if job.pairs.is_empty() || job.k == 0 {
                    return Err(GratingError::InvalidInput(
                        "a request needs at least one document and K of at least 1".into(),
                    ));
                }
                let order = length_order(&job.pairs);
                self.plan
                    .insert(plan_chunks(&job.pairs, &order, job.chunk_tokens.max(1)).into())
            }
        };
        if let Some(members) = plan.pop_front() {
            let batch = pack(&job.pairs, &members);
            let hidden = Hidden::Resident(model.embed(&batch)?);
            self.chunks.push(Chunk {
                members,
                batch,
                hidden,
            });
        }
        self.embed_seconds += t.elapsed().as_secs_f64();
        Ok(plan.is_empty())
    }

    /// Answers the job with `err`: it leaves the engine before admission.
    fn refuse(self, err: GratingError, counters: &Counters) {
        counters.pending.fetch_sub(1, Ordering::SeqCst);
        (self.job.reply)(Err(err));
    }

    /// The embedded request, ready for the scheduler.
    fn into_active(self, model: &dyn RerankModel) -> Active {
        let Job {
            pairs,
            k,
            chunk_tokens,
            prune,
            cancel,
            deadline,
            tokenize_seconds,
            reply,
        } = *self.job;
        let started = self.started.unwrap_or_else(Instant::now);
        let info = model.info();
        let n = pairs.len();
        let stats = RequestStats {
            mode: "grating-shared".into(),
            candidates: n,
            tokens: pairs.iter().map(EncodedPair::len).sum(),
            truncated: pairs.iter().filter(|p| p.truncated).count(),
            num_layers: info.num_layers,
            tokenize_seconds,
            compute_seconds: self.embed_seconds,
            ..Default::default()
        };
        let k = k.min(n);
        Active {
            seq: 0,
            state: PruneState::new(&prune, n, k, info.num_layers),
            layers_done: vec![0; n],
            pairs,
            k,
            chunk_tokens: chunk_tokens.max(1),
            cancel,
            deadline,
            reply: Some(reply),
            chunks: self.chunks,
            layer: 0,
            next_chunk: 0,
            attained: 0,
            idle_steps: 0,
            deferrals: 0,
            stats,
            admitted: started,
            queued: started.saturating_duration_since(self.submitted),
            layer_tokens: 0,
            layer_seconds: 0.0,
            finals: Vec::new(),
            done: false,
            _slot: self.slot.expect("a slot is taken before the first chunk"),
        }
    }
}

/// Bounds the requests holding hidden states (embedded and not yet answered): the embedder
/// takes a slot before embedding one, and the slot is given back when its `Active` is dropped.
struct Holders {
    count: Mutex<usize>,
    freed: std::sync::Condvar,
    limit: usize,
}

impl Holders {
    /// Waits for a free slot; None once `stop` is set (the job is then answered by the caller).
    fn acquire(self: &Arc<Self>, stop: &AtomicBool) -> Option<HolderSlot> {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= self.limit {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            n = self
                .freed
                .wait_timeout(n, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *n += 1;
        Some(HolderSlot(self.clone()))
    }
}

struct HolderSlot(Arc<Holders>);

impl Drop for HolderSlot {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// The embedder thread: turns jobs into embedded requests off the scheduler's thread
/// (embedding a request with hundreds of candidates takes milliseconds that would otherwise
/// stall every admitted request's step), one chunk at a time in [`EmbedQueue`] order.
fn embedder(
    model: Arc<dyn RerankModel>,
    rx: Receiver<Msg>,
    tx: Sender<Ready>,
    holders: Arc<Holders>,
    cancelled: Arc<AtomicBool>,
    counters: Arc<Counters>,
    mut queue: EmbedQueue,
) {
    loop {
        // Wait for work only when none is queued; then take in everything that arrived, so
        // the choice below sees all of it.
        if queue.is_empty() {
            match rx.recv() {
                Ok(msg) => queue.push(msg),
                Err(_) => return,
            }
        }
        while let Ok(msg) = rx.try_recv() {
            queue.push(msg);
        }
        let Some((place, next, passed)) = queue.pop() else {
            continue;
        };
        let mut e = match next {
            Waiting::Job(e) => e,
            Waiting::CancelAll => {
                let _ = tx.send(Ready::CancelAll);
                continue;
            }
        };
        if e.slot.is_none() {
            match holders.acquire(&cancelled) {
                Some(slot) => e.slot = Some(slot),
                None => {
                    e.refuse(
                        GratingError::Cancelled("the server is shutting down".into()),
                        &counters,
                    );
                    continue;
                }
            }
        }
        let t = Instant::now();
        let embedded = catch_unwind(AssertUnwindSafe(|| e.embed_next(model.as_ref())));
        counters
            .embed_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let error = match embedded {
            Ok(Ok(false)) => {
                queue.put_back(place, e, passed);
                continue;
            }
            Ok(Ok(true)) => None,
            Ok(Err(err)) => Some(err),
            Err(_) => {
                tracing::error!("panic while embedding a request (answered with an error)");
                Some(GratingError::Internal(
                    "panic while embedding the request".into(),
                ))
            }
        };
        if let Some(err) = error {
            e.refuse(err, &counters);
            continue;
        }
        let a = e.into_active(model.as_ref());
        if let Err(mpsc::SendError(Ready::Request(mut a))) = tx.send(Ready::Request(Box::new(a))) {
            counters.pending.fetch_sub(1, Ordering::SeqCst);
            a.finish(
                Err(GratingError::Internal("the scheduler has stopped".into())),
                &counters,
            );
        }
    }
}

/// Chunks of other jobs a job waiting to be embedded may see go before it (jobs with fewer
/// tokens left) before it goes first whatever its size.
const EMBED_PASSES: u32 = 64;

/// What waits on the embedder thread.
enum Waiting {
    Job(Embedding),
    CancelAll,
}

/// The embedder's queue. With `smallest_first`, the job with the fewest tokens left to embed
/// goes next, one chunk at a time: embedding time grows with tokens (a 300-candidate request
/// took 13-20 ms on the GPU), and a small request should not wait for all of a large one's. A
/// job passed over [`EMBED_PASSES`] times goes first, and a cancellation keeps its place (it
/// waits for the jobs that came before it). Without, jobs go whole, in arrival order.
struct EmbedQueue {
    smallest_first: bool,
    /// (what waits, chunks of others that went before it), in arrival order.
    waiting: VecDeque<(Waiting, u32)>,
}

impl EmbedQueue {
    fn new(smallest_first: bool) -> EmbedQueue {
        EmbedQueue {
            smallest_first,
            waiting: VecDeque::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn push(&mut self, msg: Msg) {
        let w = match msg {
            Msg::Job(job, submitted) => Waiting::Job(Embedding::new(job, submitted)),
            Msg::CancelAll => Waiting::CancelAll,
        };
        self.waiting.push_back((w, 0));
    }

    /// Takes out what goes next, with its place and passes (for [`EmbedQueue::put_back`]).
    fn pop(&mut self) -> Option<(usize, Waiting, u32)> {
        // Only jobs before the first cancellation compete; the cancellation goes when it is
        // at the front.
        let open = self
            .waiting
            .iter()
            .position(|w| matches!(w.0, Waiting::CancelAll))
            .unwrap_or(self.waiting.len());
        let pick = (0..open)
            .filter(|_| self.smallest_first)
            .min_by_key(|&i| {
                let (w, passed) = &self.waiting[i];
                let tokens = match w {
                    Waiting::Job(e) => e.tokens_left(),
                    Waiting::CancelAll => 0,
                };
                (*passed < EMBED_PASSES, tokens, i)
            })
            .unwrap_or(0);
        for (i, w) in self.waiting.iter_mut().enumerate().take(open) {
            if i != pick {
                w.1 += 1;
            }
        }
        self.waiting.remove(pick).map(|w| (pick, w.0, w.1))
    }

    /// Returns a job with chunks left to its place (keeping arrival order for ties) and its
    /// passes (a job that waited long enough to go first keeps going first).
    fn put_back(&mut self, place: usize, e: Embedding, passed: u32) {
        let place = place.min(self.waiting.len());
        self.waiting.insert(place, (Waiting::Job(e), passed));
    }
}

/// What the embedder hands the scheduler.
enum Ready {
    Request(Box<Active>),
    CancelAll,
}

/// Runs `f` on `a`; an error or a panic answers `a` with an error (the other requests go on)
/// and gives None.
fn guarded<T>(
    a: &mut Active,
    counters: &Counters,
    doing: &str,
    f: impl FnOnce(&mut Active) -> Result<T>,
) -> Option<T> {
    let err = match catch_unwind(AssertUnwindSafe(|| f(a))) {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => e,
        Err(_) => GratingError::Internal(format!("panic while {doing}")),
    };
    tracing::error!(error = %err, "request failed inside the engine");
    a.finish(Err(err), counters);
    None
}

/// Runs `layer` over the next `n` chunks of `a` (queues their kernels). Returns whether that
/// completed the layer for `a`, which [`complete_layer`] must then finish.
fn run_chunks(
    model: &dyn RerankModel,
    layer: &dyn LayerBlock,
    a: &mut Active,
    n: usize,
    counters: &Counters,
) -> Result<bool> {
    let info = model.info();
    let t = Instant::now();
    let end = (a.next_chunk + n).min(a.chunks.len());
    for chunk in &mut a.chunks[a.next_chunk..end] {
        chunk.hidden = Hidden::Resident(layer.forward(chunk.hidden.resident()?, &chunk.batch)?);
        let tokens = chunk.batch.num_tokens();
        a.layer_tokens += tokens;
        a.attained += tokens as u64;
        counters
            .token_layers
            .fetch_add(tokens as u64, Ordering::Relaxed);
        for (&m, &(_, len)) in chunk.members.iter().zip(&chunk.batch.layout.spans) {
            a.layers_done[m] += 1;
            a.stats.flops += info.layer_flops(len);
        }
    }
    a.next_chunk = end;
    a.layer_seconds += t.elapsed().as_secs_f64();
    a.stats.compute_seconds += t.elapsed().as_secs_f64();
    Ok(a.next_chunk >= a.chunks.len())
}

/// Finishes a layer `a` has run over all its chunks: scores, prunes and repacks exactly as a
/// lone monolithic pass does, and answers when the request is done.
fn complete_layer(model: &dyn RerankModel, a: &mut Active, counters: &Counters) -> Result<()> {
    let info = model.info();
    let t = Instant::now();
    let layer_no = a.layer + 1;
    let is_last = layer_no == info.num_layers;
    let live_before: usize = a.chunks.iter().map(|c| c.members.len()).sum();
    let score_start = Instant::now();
    if is_last || a.state.wants_scores(layer_no) {
        let mut ids = Vec::with_capacity(live_before);
        let mut scores = Vec::with_capacity(live_before);
        for chunk in &a.chunks {
            ids.extend_from_slice(&chunk.members);
            scores.extend(model.score(chunk.hidden.resident()?, &chunk.batch)?);
        }
        if let Some(Ok(t)) = a.chunks.first().map(|c| c.hidden.resident()) {
            crate::ops::profile::mark("score", t);
        }
        if is_last {
            a.finals = ids.into_iter().zip(scores).collect();
        } else if a.state.observe(layer_no, &ids, &scores) {
            let chunks = std::mem::take(&mut a.chunks);
            let (dtype, device) = match chunks.first() {
                Some(c) => {
                    let t = c.hidden.resident()?;
                    (t.dtype(), t.device().clone())
                }
                None => (candle_core::DType::F32, candle_core::Device::Cpu),
            };
            let st = &a.state;
            a.chunks = repack(
                chunks,
                |m| st.is_live(m),
                &a.pairs,
                a.chunk_tokens,
                None,
                (dtype, &device),
            )?;
            if let Some(Ok(t)) = a.chunks.first().map(|c| c.hidden.resident()) {
                crate::ops::profile::mark("repack", t);
            }
        }
    }
    a.stats.layer_timings.push(LayerTiming {
        layer: layer_no,
        live_candidates: live_before,
        tokens: a.layer_tokens,
        seconds: a.layer_seconds + score_start.elapsed().as_secs_f64(),
        stall_seconds: 0.0,
    });
    a.stats.compute_seconds += t.elapsed().as_secs_f64();
    a.layer_tokens = 0;
    a.layer_seconds = 0.0;
    a.layer += 1;
    a.next_chunk = 0;
    if is_last || a.chunks.is_empty() {
        let ranked: Vec<Scored> = a
            .state
            .ranking(&a.finals)
            .into_iter()
            .map(|(index, logit)| Scored { index, logit })
            .collect();
        if let Some(bad) = ranked.iter().find(|s| !s.logit.is_finite()) {
            return Err(GratingError::InvalidInput(format!(
                "document {} produced a non-finite score",
                bad.index
            )));
        }
        debug_assert!(ranked.len() <= a.k);
        a.finish(Ok(ranked), counters);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(seq: u64, layer: usize, attained: u64, chunks: &[usize]) -> StepCandidate {
        StepCandidate {
            seq,
            layer,
            attained,
            remaining: 0,
            admitted_tokens: chunks.iter().sum::<usize>() as u64,
            idle_steps: 0,
            deferrals: 0,
            chunk_tokens: chunks.to_vec(),
            live_chunk_tokens: chunks.to_vec(),
        }
    }

    /// A candidate with `remaining` token-layers left (attained service 0).
    fn left(seq: u64, layer: usize, remaining: u64, chunks: &[usize]) -> StepCandidate {
        StepCandidate {
            remaining,
            ..cand(seq, layer, 0, chunks)
        }
    }

    /// The layer of the step `plan_step` plans (there is work).
    fn step_layer(c: &[StepCandidate], budget: usize, starve_after: u32, rank: Rank) -> usize {
        plan_step(c, budget, starve_after, rank)
            .expect("a step is planned")
            .layer
    }

    const LAS: Rank = Rank::LeastAttained;
    const SRPT: Rank = Rank::ShortestRemaining;

    #[test]
    fn least_attained_service_goes_first_and_sets_the_layer() {
        // A big request deep into layer 3, two newcomers at layer 0.
        let c = vec![
            cand(0, 3, 50_000, &[4000, 4000, 4000]),
            cand(1, 0, 0, &[1800]),
            cand(2, 0, 0, &[900]),
        ];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 0);
        assert_eq!(p.work, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn ties_are_broken_by_arrival() {
        let c = vec![cand(7, 0, 0, &[100]), cand(3, 0, 0, &[100])];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.work, vec![(1, 1), (0, 1)]);
    }

    #[test]
    fn the_budget_is_shared_round_robin_and_order_is_strict() {
        // One chunk each per round in LAS order; request 0's second chunk no longer fits.
        let c = vec![
            cand(0, 2, 10, &[3000, 3000, 3000]),
            cand(1, 2, 20, &[3000]),
            cand(2, 2, 30, &[500]),
        ];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 2);
        assert_eq!(p.work, vec![(0, 1), (1, 1), (2, 1)]);
        // Rounds continue while chunks fit.
        let c = vec![cand(0, 0, 0, &[1000; 5]), cand(1, 0, 5, &[1000, 1000])];
        assert_eq!(
            plan_step(&c, 5000, 64, LAS).unwrap().work,
            vec![(0, 3), (1, 2)]
        );
        // Request 1's chunk does not fit, so the smaller chunk of request 2 (later in LAS
        // order) does not leapfrog it.
        let c = vec![
            cand(0, 2, 10, &[3000, 3000]),
            cand(1, 2, 20, &[6000]),
            cand(2, 2, 30, &[500]),
        ];
        assert_eq!(plan_step(&c, 8192, 64, LAS).unwrap().work, vec![(0, 1)]);
        // A chunk larger than the budget still runs, alone.
        let c = vec![cand(0, 0, 0, &[20_000, 100])];
        assert_eq!(plan_step(&c, 8192, 64, LAS).unwrap().work, vec![(0, 1)]);
    }

    #[test]
    fn requests_at_other_layers_wait() {
        let c = vec![
            cand(0, 1, 100, &[100]),
            cand(1, 4, 50, &[100]),
            cand(2, 1, 200, &[100]),
        ];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 4);
        assert_eq!(p.work, vec![(1, 1)]);
    }

    #[test]
    fn starved_requests_go_first() {
        let mut big = cand(0, 5, 1_000_000, &[4000]);
        big.idle_steps = 64;
        let c = vec![big, cand(1, 0, 0, &[100])];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 5);
        assert_eq!(p.work, vec![(0, 1)]);
    }

    #[test]
    fn nothing_to_do_plans_nothing() {
        assert_eq!(plan_step(&[], 8192, 64, SRPT), None);
        assert_eq!(plan_step(&[cand(0, 0, 0, &[])], 8192, 64, SRPT), None);
    }

    #[test]
    fn alternating_steps_take_turns_between_the_two_orders() {
        let order = QueueOrder::alternating();
        let ranks: Vec<Rank> = (0..4).map(|s| order.rank(s)).collect();
        assert_eq!(ranks, vec![SRPT, LAS, SRPT, LAS]);
        assert_eq!(QueueOrder::least_attained().rank(0), LAS);
        assert_eq!(QueueOrder::shortest_remaining().rank(1), SRPT);
        // Parsed from lists, printed back.
        let o: QueueOrder = "shortest-remaining, shortest-remaining,most-shared"
            .parse()
            .unwrap();
        assert_eq!(
            (o.rank(0), o.rank(1), o.rank(2)),
            (SRPT, SRPT, Rank::MostShared)
        );
        assert_eq!(o.rank(5), Rank::MostShared);
        assert_eq!(
            o.to_string(),
            "shortest-remaining,shortest-remaining,most-shared"
        );
        assert_eq!("alternating".parse::<QueueOrder>().unwrap(), order);
        assert!("fastest".parse::<QueueOrder>().is_err());
        assert!("".parse::<QueueOrder>().is_err());
        // A small request part way through, a big newcomer: the even step serves the small
        // one, the odd step the newcomer.
        let small = StepCandidate {
            attained: 9 * 6000,
            ..left(0, 9, 20 * 6000, &[6000])
        };
        let c = vec![small, left(1, 0, 28 * 90_000, &[8192; 11])];
        assert_eq!(step_layer(&c, 32_768, 64, order.rank(0)), 9);
        assert_eq!(step_layer(&c, 32_768, 64, order.rank(1)), 0);
    }

    #[test]
    fn most_shared_serves_the_layer_the_most_requests_wait_at() {
        // Three requests at layer 4, one (with the least work left) at layer 9.
        let c = vec![
            left(0, 9, 10, &[100]),
            left(1, 4, 500, &[100]),
            left(2, 4, 400, &[100]),
            left(3, 4, 900, &[100]),
        ];
        let p = plan_step(&c, 8192, 64, Rank::MostShared).unwrap();
        assert_eq!(p.layer, 4);
        // At the layer, least work left first.
        assert_eq!(p.work, vec![(2, 1), (1, 1), (3, 1)]);
        // A tie in requests goes to the layer holding the least work left.
        let c = vec![left(0, 9, 10, &[100]), left(1, 4, 500, &[100])];
        assert_eq!(step_layer(&c, 8192, 64, Rank::MostShared), 9);
        // Requests with nothing to run at their layer are not counted.
        let c = vec![
            left(0, 9, 10, &[100]),
            left(1, 4, 500, &[100]),
            left(2, 4, 400, &[]),
        ];
        assert_eq!(step_layer(&c, 8192, 64, Rank::MostShared), 9);
    }

    #[test]
    fn aligned_order_lets_a_cheap_request_close_behind_catch_up() {
        const ALIGNED: Rank = Rank::ShortestRemainingAligned;
        // The head (least work left) at layer 10; cheap requests 2 and 3 layers behind, one
        // 9 behind, and a request 1 behind whose layer does not fit in the step.
        let c = vec![
            left(0, 10, 1000, &[500]),
            left(1, 8, 5000, &[500]),
            left(2, 7, 5000, &[500]),
            left(3, 1, 5000, &[500]),
            left(4, 9, 9000, &[6000, 6000]),
        ];
        let p = plan_step(&c, 8192, 64, ALIGNED).unwrap();
        assert_eq!(p.layer, 7);
        assert_eq!(p.work, vec![(2, 1)]);
        // Plain shortest-remaining serves the head.
        assert_eq!(step_layer(&c, 8192, 64, SRPT), 10);
        // Nobody within reach: the head's layer.
        let c = vec![left(0, 10, 1000, &[500]), left(3, 1, 5000, &[500])];
        assert_eq!(step_layer(&c, 8192, 64, ALIGNED), 10);
        // A starved request still goes first.
        let mut starved = left(0, 20, 1_000_000, &[500]);
        starved.idle_steps = 64;
        let c = vec![starved, left(1, 18, 10, &[500])];
        assert_eq!(step_layer(&c, 8192, 64, ALIGNED), 20);
        assert_eq!(
            "shortest-remaining-aligned"
                .parse::<QueueOrder>()
                .unwrap()
                .rank(0),
            ALIGNED
        );
        // The plan names the leader that waits; once it has waited MAX_DEFERRALS steps it
        // goes first.
        let c = vec![left(0, 10, 1000, &[500]), left(1, 8, 5000, &[500])];
        let p = plan_step(&c, 8192, 64, ALIGNED).unwrap();
        assert_eq!((p.layer, p.deferred), (8, Some(0)));
        let mut patient = left(0, 10, 1000, &[500]);
        patient.deferrals = MAX_DEFERRALS;
        let c = vec![patient, left(1, 8, 5000, &[500])];
        let p = plan_step(&c, 8192, 64, ALIGNED).unwrap();
        assert_eq!((p.layer, p.deferred), (10, None));
    }

    #[test]
    fn unpruned_aligned_lets_only_a_request_of_the_leaders_size_catch_up() {
        const ALIGNED: Rank = Rank::ShortestUnprunedAligned;
        // The leader: a small request (3000 tokens) at layer 12. Behind it: a small newcomer
        // (4000 tokens, within 1.5x) 3 layers back, and a pruned large one (admitted 40000,
        // 2000 live) 2 layers back whose layer would fit in the step.
        let leader = left(0, 12, 3_000 * 16, &[3_000]);
        let newcomer = left(1, 9, 4_000 * 19, &[4_000]);
        let large = StepCandidate {
            admitted_tokens: 40_000,
            ..left(2, 10, 2_000 * 18, &[2_000])
        };
        let c = vec![leader.clone(), newcomer.clone(), large.clone()];
        let p = plan_step(&c, 32_768, 64, ALIGNED).unwrap();
        assert_eq!(
            (p.layer, p.work.clone(), p.deferred),
            (9, vec![(1, 1)], Some(0))
        );
        // The old aligned rank lets the large one catch up as well (it is furthest behind
        // only if it is the one further back).
        let far_large = StepCandidate {
            layer: 8,
            ..large.clone()
        };
        let c2 = vec![leader.clone(), newcomer.clone(), far_large.clone()];
        assert_eq!(
            step_layer(&c2, 32_768, 64, Rank::ShortestRemainingAligned),
            8
        );
        assert_eq!(step_layer(&c2, 32_768, 64, ALIGNED), 9);
        // Without a request of its size behind it the leader goes first.
        let c = vec![leader.clone(), large];
        let p = plan_step(&c, 32_768, 64, ALIGNED).unwrap();
        assert_eq!((p.layer, p.deferred), (12, None));
        // Too far behind (more than CATCH_UP_LAYERS), or the leader has waited enough.
        let far = left(1, 12 - CATCH_UP_LAYERS - 1, 3_000 * 28, &[3_000]);
        assert_eq!(step_layer(&[leader.clone(), far], 32_768, 64, ALIGNED), 12);
        let patient = StepCandidate {
            deferrals: MAX_DEFERRALS,
            ..leader
        };
        assert_eq!(step_layer(&[patient, newcomer], 32_768, 64, ALIGNED), 12);
        assert_eq!(
            "shortest-unpruned-aligned".parse::<QueueOrder>().unwrap(),
            QueueOrder::new(vec![ALIGNED]).unwrap()
        );
    }

    #[test]
    fn the_next_step_is_predicted_from_the_plan() {
        // A request that completes its layer moves on: the next step is at its next layer.
        let c = vec![cand(0, 3, 0, &[1000])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(predict_next_layer(&c, &p, 28, 4096, 64, LAS), Some(4));
        // Chunks left beyond the budget: the next step stays at the same layer.
        let c = vec![cand(0, 3, 0, &[4000, 4000, 4000])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(p.work, vec![(0, 1)]);
        assert_eq!(predict_next_layer(&c, &p, 28, 4096, 64, LAS), Some(3));
        // After its last layer a request leaves; the next step is another request's layer.
        let c = vec![cand(0, 27, 0, &[100]), cand(1, 9, 500, &[100])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(p.layer, 27);
        assert_eq!(predict_next_layer(&c, &p, 28, 4096, 64, LAS), Some(9));
        // Under LAS the service of this step can hand the next step to someone else.
        let c = vec![cand(0, 0, 0, &[3000]), cand(1, 5, 1000, &[100])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(p.layer, 0);
        assert_eq!(predict_next_layer(&c, &p, 28, 4096, 64, LAS), Some(5));
        // A request moving on runs all its live chunks at the next layer (not just the rest).
        let mut big = cand(0, 2, 0, &[500]);
        big.live_chunk_tokens = vec![4000, 4000, 500];
        let c = vec![big, cand(1, 3, 1, &[100])];
        let p = plan_step(&c, 4096, 64, SRPT).unwrap();
        assert_eq!(predict_next_layer(&c, &p, 28, 4096, 64, SRPT), Some(3));
        assert_eq!(predict_next_layer(&[], &p, 28, 4096, 64, SRPT), None);
    }

    #[test]
    fn shortest_remaining_work_goes_first_whatever_arrived_last() {
        // A small request deep into its layers, a big newcomer at layer 0: under LAS the
        // newcomer (nothing attained) would go first; here the small one does, and the big
        // one rides along only when it is at the same layer.
        let small = StepCandidate {
            attained: 9 * 6000,
            ..left(0, 9, 20 * 6000, &[6000])
        };
        let c = vec![small, left(1, 0, 28 * 90_000, &[8192; 11])];
        let p = plan_step(&c, 32_768, 64, SRPT).unwrap();
        assert_eq!(p.layer, 9);
        assert_eq!(p.work, vec![(0, 1)]);
        let p = plan_step(&c, 32_768, 64, LAS).unwrap();
        assert_eq!(p.layer, 0);
        // Same layer: the small request's chunk first, then the big one's chunks in the
        // rest of the budget.
        let c = vec![
            left(0, 3, 28 * 90_000, &[8192; 11]),
            left(1, 3, 25 * 6000, &[6000]),
        ];
        let p = plan_step(&c, 32_768, 64, SRPT).unwrap();
        assert_eq!(p.work, vec![(1, 1), (0, 3)]);
        // Ties by arrival; the starvation guard still overrides.
        let c = vec![left(5, 0, 100, &[10]), left(2, 1, 100, &[10])];
        assert_eq!(plan_step(&c, 8192, 64, SRPT).unwrap().work, vec![(1, 1)]);
        let mut starved = left(0, 7, 1_000_000, &[4000]);
        starved.idle_steps = 64;
        let c = vec![starved, left(1, 0, 10, &[10])];
        assert_eq!(step_layer(&c, 8192, 64, SRPT), 7);
    }

    #[test]
    fn unpruned_remaining_keeps_a_pruned_large_request_behind_a_small_newcomer() {
        const UNPRUNED: Rank = Rank::ShortestUnprunedRemaining;
        // A large request pruned from 48000 to 2000 live tokens, 10 layers ahead of layer 17,
        // and a small newcomer at layer 0 with 3000 tokens for 28 layers.
        let pruned = StepCandidate {
            admitted_tokens: 48_000,
            ..left(1, 17, 2_000 * 11, &[2_000])
        };
        let small = left(2, 0, 3_000 * 28, &[3_000]);
        assert_eq!(pruned.unpruned_remaining(), 48_000 * 11);
        assert_eq!(small.unpruned_remaining(), 3_000 * 28);
        let cands = [pruned.clone(), small.clone()];
        // Its pruned tokens put the large request first under plain shortest-remaining...
        assert_eq!(step_layer(&cands, 4096, 32, SRPT), 17);
        // ...but its admitted tokens put the small one first.
        let plan = plan_step(&cands, 4096, 32, UNPRUNED).unwrap();
        assert_eq!((plan.layer, plan.work.clone()), (0, vec![(1, 1)]));
        // Part of a layer done counts in proportion: half of its live chunks left at this
        // layer is half a layer of its admitted tokens.
        let half = StepCandidate {
            admitted_tokens: 8_000,
            chunk_tokens: vec![1_000],
            ..left(3, 26, 1_000 + 2_000, &[1_000, 1_000])
        };
        assert_eq!(half.unpruned_remaining(), 4_000 + 8_000);
        // With near-equal sizes it is shortest-remaining: the one further along goes first,
        // and the starvation guard still overrides it.
        let ahead = left(4, 20, 3_000 * 8, &[3_000]);
        let cands = [small.clone(), ahead.clone()];
        assert_eq!(step_layer(&cands, 4096, 32, UNPRUNED), 20);
        let starved = StepCandidate {
            idle_steps: 32,
            ..small
        };
        assert_eq!(step_layer(&[starved, ahead], 4096, 32, UNPRUNED), 0);
        assert_eq!(
            "shortest-unpruned-remaining".parse::<QueueOrder>().unwrap(),
            QueueOrder::new(vec![UNPRUNED]).unwrap()
        );
    }

    /// A job of `docs` documents of `tokens` tokens each.
    fn job(docs: usize, tokens: usize) -> Msg {
        let pair = EncodedPair {
            ids: vec![1; tokens],
            type_ids: vec![0; tokens],
            truncated: false,
        };
        Msg::Job(
            Box::new(Job {
                pairs: vec![pair; docs],
                k: 1,
                chunk_tokens: 4096,
                prune: PruneConfig::default(),
                cancel: Arc::new(AtomicBool::new(false)),
                deadline: None,
                tokenize_seconds: 0.0,
                reply: Box::new(|_| {}),
            }),
            Instant::now(),
        )
    }

    /// Pops the next entry whole: its documents (0 for a cancellation).
    fn next_docs(q: &mut EmbedQueue) -> Option<usize> {
        match q.pop()?.1 {
            Waiting::Job(e) => Some(e.job.pairs.len()),
            Waiting::CancelAll => Some(0),
        }
    }

    #[test]
    fn the_embedder_takes_the_smallest_job_first_and_bounds_the_passes() {
        let mut fifo = EmbedQueue::new(false);
        fifo.push(job(300, 160));
        fifo.push(job(20, 160));
        assert_eq!(next_docs(&mut fifo), Some(300));
        let mut q = EmbedQueue::new(true);
        assert!(q.is_empty() && q.pop().is_none());
        q.push(job(300, 160));
        q.push(job(100, 160));
        q.push(job(20, 160));
        assert_eq!(next_docs(&mut q), Some(20));
        assert_eq!(next_docs(&mut q), Some(100));
        assert_eq!(next_docs(&mut q), Some(300));
        // A large job passed over EMBED_PASSES times goes next, before smaller ones.
        q.push(job(300, 160));
        for _ in 0..EMBED_PASSES {
            q.push(job(20, 160));
            assert_eq!(next_docs(&mut q), Some(20));
        }
        q.push(job(20, 160));
        assert_eq!(next_docs(&mut q), Some(300));
        assert_eq!(next_docs(&mut q), Some(20));
        // A cancellation keeps its place: the jobs before it go first, smallest first, then
        // it, then the jobs after it.
        q.push(job(50, 160));
        q.push(job(10, 160));
        q.push(Msg::CancelAll);
        q.push(job(1, 160));
        assert_eq!(next_docs(&mut q), Some(10));
        assert_eq!(next_docs(&mut q), Some(50));
        assert_eq!(next_docs(&mut q), Some(0));
        assert_eq!(next_docs(&mut q), Some(1));
        assert!(q.is_empty());
    }

    #[test]
    fn a_large_job_is_embedded_a_chunk_at_a_time_between_small_ones() {
        let mut q = EmbedQueue::new(true);
        q.push(job(300, 160));
        // Alone, the large job starts; say its first chunk is embedded and 3 of 100
        // candidates each are left.
        let (place, w, passed) = q.pop().unwrap();
        let Waiting::Job(mut large) = w else {
            panic!("a job")
        };
        large.plan = Some(VecDeque::from(vec![
            (0..100).collect(),
            (100..200).collect(),
            (200..300).collect(),
        ]));
        assert_eq!(large.tokens_left(), 300 * 160);
        q.put_back(place, large, passed);
        // A small job arriving now goes before the large one's next chunk...
        q.push(job(20, 160));
        assert_eq!(next_docs(&mut q), Some(20));
        // ...and the large one goes on where it was, with what it has left.
        let (_, w, _) = q.pop().unwrap();
        let Waiting::Job(large) = w else {
            panic!("a job")
        };
        assert_eq!(large.plan.as_ref().map(VecDeque::len), Some(3));
        // Once it has waited long enough to go first, it keeps going first until done.
        q.put_back(0, large, EMBED_PASSES);
        q.push(job(1, 160));
        assert_eq!(next_docs(&mut q), Some(300));
        assert_eq!(next_docs(&mut q), Some(1));
    }
}
