//! Prometheus metrics, rendered by hand in the text exposition format. One registry per server
//! (no process-global recorder), so several servers in one process, as in the tests, keep
//! separate counts.

use crate::engine::scheduler::Counters;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// Latency bucket bounds in seconds (from 5 ms to 2 minutes).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    queue_wait: Histogram,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, seconds: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *g.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        g.latency
            .entry(endpoint.to_string())
            .or_default()
            .observe(seconds);
    }

    /// Time from submitting a tokenized request to the engine until it answered: queueing plus
    /// compute, without HTTP, JSON and tokenization.
    pub fn record_engine_time(&self, seconds: f64) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_wait
            .observe(seconds);
    }

    pub fn render(
        &self,
        engine: &Counters,
        in_flight: usize,
        calibration: Option<&super::calibration::Calibrator>,
    ) -> String {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::new();
        if let Some(c) = calibration {
            let snap = c.snapshot();
            for (name, help, value) in [
                ("grating_calibration_agreement", "Top-K members of sampled answers confirmed by full re-runs, over the current window.", snap.agreement),
                ("grating_calibration_agreement_lower", "Lower end of its 95% Wilson interval.", snap.agreement_lower),
                ("grating_calibration_agreement_upper", "Upper end of its 95% Wilson interval.", snap.agreement_upper),
                ("grating_calibration_target", "The agreement self-calibration keeps.", snap.target_agreement),
                ("grating_calibration_window_members", "Top-K members in the current window.", snap.window_members as f64),
                ("grating_calibration_samples_total", "Sampled requests re-run without pruning.", snap.samples as f64),
                ("grating_calibration_skipped_total", "Samples skipped because the re-run queue was full.", c.skipped() as f64),
                ("grating_prune_margin", "The margin rule's current margin, in movement units.", snap.margin as f64),
            ] {
                let _ = writeln!(s, "# HELP {name} {help}");
                let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
                let _ = writeln!(s, "# TYPE {name} {kind}");
                let _ = writeln!(s, "{name} {value}");
            }
        }
        let _ = writeln!(
            s,
            "# HELP grating_requests_total HTTP requests by endpoint and status."
        );
        let _ = writeln!(s, "# TYPE grating_requests_total counter");
        for ((ep, st), n) in &g.requests {
            let _ = writeln!(
                s,
                "grating_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP grating_request_duration_seconds HTTP request latency."
        );
        let _ = writeln!(s, "# TYPE grating_request_duration_seconds histogram");
        for (ep, h) in &g.latency {
            write_hist(
                &mut s,
                "grating_request_duration_seconds",
                &format!("endpoint=\"{ep}\","),
                h,
            );
        }
        let _ = writeln!(s, "# HELP grating_engine_seconds Queueing plus compute time of rerank requests in the engine.");
        let _ = writeln!(s, "# TYPE grating_engine_seconds histogram");
        write_hist(&mut s, "grating_engine_seconds", "", &g.queue_wait);
        drop(g);
        let gauge = |s: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        gauge(
            &mut s,
            "grating_requests_in_flight",
            "Rerank requests being handled.",
            in_flight as f64,
        );
        gauge(
            &mut s,
            "grating_queue_depth",
            "Requests waiting for admission into the shared pass.",
            engine.pending.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut s,
            "grating_requests_active",
            "Requests admitted into the shared pass.",
            engine.active.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut s,
            "grating_candidate_layers_computed_total",
            "Candidate-layers computed for finished requests.",
            engine.candidate_layers_computed.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "grating_candidate_layers_saved_total",
            "Candidate-layers that pruning saved for finished requests.",
            engine.candidate_layers_saved.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "grating_layer_steps_total",
            "Layer steps run; each obtains one layer's weights once.",
            engine.steps.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "grating_request_layer_steps_total",
            "Requests served summed over layer steps (divided by steps: the sharing factor).",
            engine.request_steps.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "grating_token_layers_total",
            "Tokens run through a layer.",
            engine.token_layers.load(Ordering::Relaxed),
        );
        if let Some(p) = crate::memory::peak_rss_mib() {
            gauge(
                &mut s,
                "grating_peak_rss_bytes",
                "Peak resident set size of the process.",
                (p * 1048576.0).round(),
            );
        }
        if let Some(p) = crate::memory::rss_mib() {
            gauge(
                &mut s,
                "grating_rss_bytes",
                "Resident set size of the process.",
                (p * 1048576.0).round(),
            );
        }
        s
    }
}

fn write_hist(s: &mut String, name: &str, labels: &str, h: &Histogram) {
    for (i, &b) in BUCKETS.iter().enumerate() {
        let c = h.counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(s, "{name}_bucket{{{labels}le=\"{b}\"}} {c}");
    }
    let _ = writeln!(s, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", h.count);
    let l = labels.trim_end_matches(',');
    let _ = writeln!(s, "{name}_sum{{{l}}} {}", h.sum);
    let _ = writeln!(s, "{name}_count{{{l}}} {}", h.count);
}
