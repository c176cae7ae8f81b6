//! Self-calibration in the server: which requests are sampled, and the worker that re-runs
//! them without pruning when the server is idle. The policy (what a re-run changes) is the
//! library's [`SelfCalibration`]; this file only schedules and persists.
//!
//! A sampled request is answered as usual; its query, documents and options are queued
//! (a bounded queue: when full, the sample is skipped, never the request). The worker waits
//! until no rerank request is in flight, or, under constant load, until re-runs have taken
//! less than `--calibration-busy-share` ([`DEFAULT_BUSY_SHARE`]) of the wall time since start; it re-runs the sample recording
//! every layer's scores and records how many of the answer's top K the full run confirms.
//! The answer was sent before: a re-run never changes it. A re-run started under load shares
//! the CPU with the requests in flight for its duration (one request's full inference).
//! Whenever the margin changes, the model's profile is rewritten, so a restart continues from
//! what was learned.

use crate::prune::online::{Change, SelfCalibration, Snapshot};
use crate::prune::profile::{self, PruneProfile};
use crate::prune::PruneConfig;
use crate::reranker::{RerankOptions, Reranker};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Samples waiting for idle time; more are skipped.
const QUEUE: usize = 32;
/// Under constant load (no idle moment), re-runs may still take this share of wall time by
/// default, so the estimate keeps following the traffic.
pub const DEFAULT_BUSY_SHARE: f64 = 0.1;

/// One answered request to re-run.
pub(super) struct Sample {
    pub query: String,
    pub documents: Vec<String>,
    pub opts: RerankOptions,
    /// The top K the client got, as document indices.
    pub answered: Vec<usize>,
}

/// What the server was asked for (`grating serve` flags).
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// Agreement to keep.
    pub target: f64,
    /// Share of requests re-run.
    pub sample: f64,
    /// Share of wall time re-runs may take when the server is never idle.
    pub busy_share: f64,
    /// Where learned profiles go.
    pub profile_dir: PathBuf,
}

pub struct Calibrator {
    state: Mutex<SelfCalibration>,
    share: f64,
    requests: AtomicU64,
    queue: SyncSender<Sample>,
    skipped: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Calibrator {
    /// Starts the worker for `reranker`, starting from the rule `base`. `idle` tells the
    /// worker when no request is in flight.
    pub(super) fn start(
        reranker: Arc<Reranker>,
        base: PruneConfig,
        settings: Settings,
        idle: impl Fn() -> bool + Send + 'static,
    ) -> Arc<Calibrator> {
        let (tx, rx) = sync_channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let cal = Arc::new(Calibrator {
            state: Mutex::new(SelfCalibration::new(base, settings.target)),
            share: settings.sample.clamp(0.0, 1.0),
            requests: AtomicU64::new(0),
            queue: tx,
            skipped: AtomicU64::new(0),
            stop: stop.clone(),
        });
        let worker = Arc::downgrade(&cal);
        std::thread::Builder::new()
            .name("grating-self-calibration".into())
            .spawn(move || run_worker(rx, worker, reranker, settings, idle, stop))
            .expect("spawn the self-calibration thread");
        cal
    }

    /// The rule a request runs with now.
    pub(super) fn config(&self) -> PruneConfig {
        self.lock().config().clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().snapshot()
    }

    /// Samples waiting skipped because the queue was full.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Whether the next request is sampled: every request whose arrival count crosses a
    /// multiple of 1/share (deterministic, evenly spread).
    pub(super) fn should_sample(&self) -> bool {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        (n as f64 * self.share).floor() > ((n - 1) as f64 * self.share).floor()
    }

    /// Queues a sample; skipped (and counted) when the worker is behind.
    pub(super) fn offer(&self, s: Sample) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(s) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SelfCalibration> {
        // A panic while holding the lock leaves a consistent state (record() only assigns).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn run_worker(
    rx: Receiver<Sample>,
    cal: std::sync::Weak<Calibrator>,
    reranker: Arc<Reranker>,
    settings: Settings,
    idle: impl Fn() -> bool,
    stop: Arc<AtomicBool>,
) {
    let started = Instant::now();
    let mut spent = 0.0f64;
    while let Ok(sample) = rx.recv() {
        let within_share =
            |spent: f64| spent <= settings.busy_share * started.elapsed().as_secs_f64();
        while !idle() && !within_share(spent) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let span = tracing::info_span!("self_calibration_rerun", docs = sample.documents.len());
        let _g = span.enter();
        let t = Instant::now();
        let rerun = reranker.layer_scores(&sample.query, &sample.documents, &sample.opts);
        spent += t.elapsed().as_secs_f64();
        let scores = match rerun {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "self-calibration re-run failed");
                continue;
            }
        };
        let Some(cal) = cal.upgrade() else { return };
        // Saved under the lock (changes are rare), so whoever sees the new state in /info
        // also finds it on disk.
        let mut st = cal.lock();
        let change = st.record(&sample.answered, &scores);
        if change != Change::None {
            let snap = st.snapshot();
            tracing::info!(
                ?change,
                agreement = snap.agreement,
                margin = snap.margin,
                "self-calibration"
            );
            if let Err(e) = save(&reranker, &settings.profile_dir, &snap) {
                tracing::warn!(error = %e, "cannot save the learned pruning profile");
            }
        }
    }
}

/// Writes what was learned as the model's profile.
fn save(reranker: &Reranker, dir: &std::path::Path, snap: &Snapshot) -> crate::Result<()> {
    let files = reranker.files();
    let p = PruneProfile {
        model: super::state::default_model_name(reranker.model_id()),
        fingerprint: profile::fingerprint(files)?,
        rule: Some(crate::prune::RuleKind::Margin),
        movement: snap.movement.clone(),
        margin: Some(snap.margin),
        threshold: None,
        first_layer: reranker.prune_config().first_layer,
        target_agreement: snap.target_agreement,
        measured_agreement: snap.agreement,
        measured_compute: 0.0,
        top_k: 0,
        queries: snap.samples as usize,
        source: format!(
            "grating serve self-calibration ({} re-runs; window agreement {:.4}, 95% Wilson [{:.4}, {:.4}] over {} top-K members)",
            snap.samples, snap.agreement, snap.agreement_lower, snap.agreement_upper, snap.window_members
        ),
        held_out: Vec::new(),
    };
    profile::save(dir, files, &p)?;
    Ok(())
}
