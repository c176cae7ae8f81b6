//! Admission to the shared pass: arriving jobs are embedded on a thread of their own (a
//! request with hundreds of candidates takes milliseconds to embed, which would otherwise stall
//! every admitted request's step), smallest first and one chunk at a time, and the number of
//! requests holding hidden states is bounded.

use super::pass::Active;
use super::{Counters, Job, Msg};
use crate::engine::request::{ChunkPolicy, RequestRun};
use crate::error::{GratingError, Result};
use crate::models::RerankModel;
use crate::tokenize::EncodedPair;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A job on the embedder thread, embedded into chunks one chunk at a time, so that a small
/// job arriving meanwhile waits for one chunk of a large one, not for all of it.
pub(crate) struct Embedding {
    job: Box<Job>,
    submitted: Instant,
    /// The request, made from the job's pairs at its first chunk.
    run: Option<RequestRun>,
    /// Its slot among the requests holding hidden states, taken at the first chunk.
    slot: Option<HolderSlot>,
    /// When its first chunk started (its engine time counts from here).
    started: Option<Instant>,
}

impl Embedding {
    fn new(job: Box<Job>, submitted: Instant) -> Embedding {
        Embedding {
            job,
            submitted,
            run: None,
            slot: None,
            started: None,
        }
    }

    /// Tokens still to embed.
    fn tokens_left(&self) -> usize {
        match &self.run {
            Some(run) => run.tokens_left_to_embed(),
            None => self.job.pairs.iter().map(EncodedPair::len).sum(),
        }
    }

    /// Its candidates.
    #[cfg(test)]
    fn candidates(&self) -> usize {
        match &self.run {
            Some(run) => run.candidates(),
            None => self.job.pairs.len(),
        }
    }

    /// Embeds the next chunk; true once all are embedded.
    fn embed_next(&mut self, model: &dyn RerankModel) -> Result<bool> {
        self.started.get_or_insert_with(Instant::now);
        let run = match &mut self.run {
            Some(run) => run,
            None => {
                let job = &mut self.job;
                let run = RequestRun::new(
                    std::mem::take(&mut job.pairs),
                    job.k,
                    Some(&job.prune),
                    model.info(),
                    ChunkPolicy {
                        chunk_tokens: job.chunk_tokens,
                        offload: None,
                    },
                    "grating-shared",
                )?;
                self.run.insert(run)
            }
        };
        run.embed_next(model)
    }

    /// Answers the job with `err`: it leaves the engine before admission.
    fn refuse(self, err: GratingError, counters: &Counters) {
        counters.pending.fetch_sub(1, Ordering::SeqCst);
        (self.job.reply)(Err(err));
    }

    /// The embedded request, ready for the scheduler.
    fn into_active(self) -> Result<Active> {
        let started = self.started.unwrap_or_else(Instant::now);
        let Job {
            cancel,
            deadline,
            tokenize_seconds,
            reply,
            ..
        } = *self.job;
        let (Some(mut run), Some(slot)) = (self.run, self.slot) else {
            let err =
                GratingError::Internal("a request was admitted before it was embedded".into());
            reply(Err(GratingError::Internal(err.to_string())));
            return Err(err);
        };
        run.stats_mut().tokenize_seconds = tokenize_seconds;
        Ok(Active::new(
            run,
            cancel,
            deadline,
            reply,
            started,
            started.saturating_duration_since(self.submitted),
            slot,
        ))
    }
}

/// Bounds the requests holding hidden states (embedded and not yet answered): the embedder
/// takes a slot before embedding one, and the slot is given back when its `Active` is dropped.
pub(crate) struct Holders {
    count: Mutex<usize>,
    freed: std::sync::Condvar,
    limit: usize,
}

impl Holders {
    pub(crate) fn new(limit: usize) -> Holders {
        Holders {
            count: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            limit,
        }
    }

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

pub(crate) struct HolderSlot(Arc<Holders>);

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
pub(crate) fn embedder(
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
        let Ok(a) = e.into_active() else {
            counters.pending.fetch_sub(1, Ordering::SeqCst);
            continue;
        };
        if let Err(mpsc::SendError(Ready::Request(mut a))) = tx.send(Ready::Request(Box::new(a))) {
            counters.pending.fetch_sub(1, Ordering::SeqCst);
            a.fail(GratingError::Internal("the scheduler has stopped".into()));
        }
    }
}

/// Chunks of other jobs a job waiting to be embedded may see go before it (jobs with fewer
/// tokens left) before it goes first whatever its size.
const EMBED_PASSES: u32 = 64;

/// What waits on the embedder thread.
enum Waiting {
    Job(Box<Embedding>),
    CancelAll,
}

/// The embedder's queue. With `smallest_first`, the job with the fewest tokens left to embed
/// goes next, one chunk at a time: embedding time grows with tokens (a 300-candidate request
/// took 13-20 ms on the GPU), and a small request should not wait for all of a large one's. A
/// job passed over [`EMBED_PASSES`] times goes first, and a cancellation keeps its place (it
/// waits for the jobs that came before it). Without, jobs go whole, in arrival order.
pub(crate) struct EmbedQueue {
    smallest_first: bool,
    /// (what waits, chunks of others that went before it), in arrival order.
    waiting: VecDeque<(Waiting, u32)>,
}

impl EmbedQueue {
    pub(crate) fn new(smallest_first: bool) -> EmbedQueue {
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
            Msg::Job(job, submitted) => Waiting::Job(Box::new(Embedding::new(job, submitted))),
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
    fn put_back(&mut self, place: usize, e: Box<Embedding>, passed: u32) {
        let place = place.min(self.waiting.len());
        self.waiting.insert(place, (Waiting::Job(e), passed));
    }
}

/// What the embedder hands the scheduler.
pub(crate) enum Ready {
    Request(Box<Active>),
    CancelAll,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::PruneConfig;

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
            Waiting::Job(e) => Some(e.candidates()),
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
        let pairs = std::mem::take(&mut large.job.pairs);
        let chunks = ChunkPolicy {
            chunk_tokens: 100 * 160,
            offload: None,
        };
        let info = crate::models::ModelInfo::for_tests(2);
        let run = RequestRun::new(
            pairs,
            1,
            Some(&PruneConfig::default()),
            &info,
            chunks,
            "test",
        );
        large.run = Some(run.unwrap());
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
        assert_eq!(large.run.as_ref().map(RequestRun::chunks_to_embed), Some(3));
        // Once it has waited long enough to go first, it keeps going first until done.
        q.put_back(0, large, EMBED_PASSES);
        q.push(job(1, 160));
        assert_eq!(next_docs(&mut q), Some(300));
        assert_eq!(next_docs(&mut q), Some(1));
    }
}
