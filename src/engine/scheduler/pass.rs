//! The shared pass itself: one scheduler thread that admits embedded requests and runs steps,
//! each one layer over chunks of the requests at that layer (see the module docs of
//! [`super`]), driving each request's state machine exactly as the single-request loop does.

use super::admission::{HolderSlot, Ready};
use super::policy::{predict_next_layer, StepCandidate};
use super::{Counters, Reply, SharedOptions};
use crate::engine::layers::{LayerProvider, LayerSource};
use crate::engine::request::RequestRun;
use crate::engine::RerankOutput;
use crate::error::{GratingError, Result};
use crate::models::{LayerBlock, RerankModel};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An admitted request: its state machine and what the scheduler knows of it.
pub(crate) struct Active {
    run: RequestRun,
    seq: u64,
    cancel: Arc<AtomicBool>,
    deadline: Option<Instant>,
    reply: Option<Reply>,
    idle_steps: u32,
    deferrals: u32,
    /// When its embedding started (its engine time counts from here).
    admitted: Instant,
    /// How long it waited for the embedder.
    queued: Duration,
    done: bool,
    _slot: HolderSlot,
}

impl Active {
    pub(crate) fn new(
        run: RequestRun,
        cancel: Arc<AtomicBool>,
        deadline: Option<Instant>,
        reply: Reply,
        admitted: Instant,
        queued: Duration,
        slot: HolderSlot,
    ) -> Active {
        Active {
            run,
            seq: 0,
            cancel,
            deadline,
            reply: Some(reply),
            idle_steps: 0,
            deferrals: 0,
            admitted,
            queued,
            done: false,
            _slot: slot,
        }
    }

    fn log_done(&self, ok: bool) {
        tracing::debug!(
            target: "grating::step",
            seq = self.seq,
            candidates = self.run.candidates(),
            layer = self.run.layer(),
            ok,
            engine_ms = self.admitted.elapsed().as_secs_f64() * 1e3,
            "request done"
        );
    }

    /// Answers with the request's ranking (its top K is decided).
    fn answer(&mut self, counters: &Counters) {
        let result = self.run.finish().map(|mut out| {
            let stats = &mut out.stats;
            stats.total_seconds = self.admitted.elapsed().as_secs_f64() + stats.tokenize_seconds;
            counters
                .candidate_layers_computed
                .fetch_add(stats.candidate_layers_computed, Ordering::Relaxed);
            counters.candidate_layers_saved.fetch_add(
                stats
                    .candidate_layers_full
                    .saturating_sub(stats.candidate_layers_computed),
                Ordering::Relaxed,
            );
            out
        });
        self.respond(result);
    }

    /// Answers with `err` and releases its hidden states.
    pub(crate) fn fail(&mut self, err: GratingError) {
        self.respond(Err(err));
    }

    fn respond(&mut self, result: Result<RerankOutput>) {
        self.log_done(result.is_ok());
        self.done = true;
        self.run.release();
        if let Some(r) = self.reply.take() {
            r(result);
        }
    }

    /// Runs `f` on its state machine; an error or a panic answers it with an error (the other
    /// requests go on) and gives None.
    fn guarded<T>(
        &mut self,
        doing: &str,
        f: impl FnOnce(&mut RequestRun) -> Result<T>,
    ) -> Option<T> {
        let err = match catch_unwind(AssertUnwindSafe(|| f(&mut self.run))) {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => e,
            Err(_) => GratingError::Internal(format!("panic while {doing}")),
        };
        tracing::error!(error = %err, "request failed inside the engine");
        self.fail(err);
        None
    }
}

/// The scheduler thread's state: the admitted requests and the layers they run on.
pub(crate) struct Scheduler {
    model: Arc<dyn RerankModel>,
    opts: SharedOptions,
    counters: Arc<Counters>,
    /// Where steps obtain layers; it keeps the last `cached_layers` built, so a step at a layer
    /// a recent step used (a request whose chunks exceed one step, or orders that take turns)
    /// reads nothing, and it reads the predicted next step's layer ahead.
    layers: LayerProvider,
    streamed: bool,
    /// Embedded requests waiting for admission.
    pending: VecDeque<Box<Active>>,
    active: Vec<Active>,
    next_seq: u64,
    open: bool,
    cancelled: Arc<AtomicBool>,
    /// Steps planned so far (orders that take turns count them).
    steps: u64,
}

impl Scheduler {
    pub(crate) fn new(
        model: Arc<dyn RerankModel>,
        source: LayerSource,
        opts: SharedOptions,
        counters: Arc<Counters>,
        cancelled: Arc<AtomicBool>,
    ) -> Self {
        let streamed = matches!(source, LayerSource::Stream(_));
        let keep = opts.cached_layers.max(1);
        Scheduler {
            layers: LayerProvider::new(model.clone(), source, keep),
            streamed,
            model,
            opts,
            counters,
            pending: VecDeque::new(),
            active: Vec::new(),
            next_seq: 0,
            open: true,
            cancelled,
            steps: 0,
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Ready>) {
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
        let shutting_down = || GratingError::Cancelled("the server is shutting down".into());
        for mut a in self.pending.drain(..) {
            self.counters.pending.fetch_sub(1, Ordering::SeqCst);
            a.fail(shutting_down());
        }
        for a in &mut self.active {
            a.fail(shutting_down());
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
                a.fail(GratingError::Cancelled(
                    "deadline exceeded or cancelled".into(),
                ));
                false
            } else {
                true
            }
        });
        for a in &mut self.active {
            if expired(&a.cancel, a.deadline) {
                a.fail(GratingError::Cancelled(
                    "deadline exceeded or cancelled".into(),
                ));
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
                candidates = a.run.candidates(),
                // Nothing but the embedding has been computed yet.
                embed_us = (a.run.stats_mut().compute_seconds * 1e6) as u64,
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
                let run = &a.run;
                let live_chunk_tokens = run.live_chunk_tokens();
                let chunk_tokens = live_chunk_tokens[run.chunks_done_at_layer()..].to_vec();
                let live: usize = live_chunk_tokens.iter().sum();
                let later = num_layers.saturating_sub(run.layer() + 1);
                StepCandidate {
                    seq: a.seq,
                    layer: run.layer(),
                    attained: run.attained(),
                    remaining: (chunk_tokens.iter().sum::<usize>() + live * later) as u64,
                    // Packed chunks hold every token of every candidate, no padding.
                    admitted_tokens: run.admitted_tokens() as u64,
                    idle_steps: a.idle_steps,
                    deferrals: a.deferrals,
                    chunk_tokens,
                    live_chunk_tokens,
                }
            })
            .collect();
        let policy = self.opts.policy.clone();
        let Some(plan) = policy.plan(&cands, budget, self.steps) else {
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
        let next = self.streamed.then(|| {
            predict_next_layer(
                &cands,
                &plan,
                num_layers,
                budget,
                policy.as_ref(),
                self.steps,
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
            let ran = self.active[i].guarded("running a layer", |run| {
                let before = run.attained();
                let complete = run.run_chunks(model.as_ref(), layer.as_ref(), n)?;
                counters
                    .token_layers
                    .fetch_add(run.attained() - before, Ordering::Relaxed);
                Ok(complete)
            });
            if ran == Some(true) {
                completed.push(i);
            }
        }
        for i in completed {
            let a = &mut self.active[i];
            let decided = a.guarded("scoring a layer", |run| {
                run.complete_layer(model.as_ref(), 0.0, 0.0)?;
                Ok(run.is_done())
            });
            if decided == Some(true) {
                a.answer(counters);
            }
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
                policy = %policy.describe(),
                step = self.steps - 1,
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
        let before = self.layers.counters();
        let (block, _) = self.layers.get(l)?;
        if let Some(next) = next {
            self.layers.expect(&[next]);
        }
        let after = self.layers.counters();
        let c = &self.counters;
        c.layer_loads
            .fetch_add(after.loads - before.loads, Ordering::Relaxed);
        c.read_ahead_hits.fetch_add(
            after.read_ahead_hits - before.read_ahead_hits,
            Ordering::Relaxed,
        );
        c.stall_micros.fetch_add(
            ((after.stall_seconds - before.stall_seconds) * 1e6) as u64,
            Ordering::Relaxed,
        );
        c.read_micros.fetch_add(
            ((after.read_seconds - before.read_seconds) * 1e6) as u64,
            Ordering::Relaxed,
        );
        Ok(block)
    }

    /// Answers the requests of a step whose layer could not be obtained with the same error.
    fn fail(&mut self, which: &[usize], e: GratingError) {
        tracing::error!(error = %e, requests = which.len(), "a step's layer could not be obtained");
        for &i in which {
            self.active[i].fail(e.replicate());
        }
    }
}
