//! Per-request statistics, returned with every answer and printed by `--stats`.

pub use crate::prune::PruneEvent;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, Default)]
pub struct LayerTiming {
    /// 1-based layer.
    pub layer: usize,
    pub live_candidates: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// Time the compute thread waited for this layer's weights (streaming only).
    pub stall_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct RequestStats {
    pub mode: String,
    pub candidates: usize,
    pub tokens: usize,
    pub truncated: usize,
    pub num_layers: usize,
    /// Layers each candidate went through, in document order.
    pub layers_per_candidate: Vec<u16>,
    pub candidate_layers_computed: u64,
    pub candidate_layers_full: u64,
    /// Percent of candidate-layers that pruning saved.
    pub saved_percent: f64,
    pub prune_events: Vec<PruneEvent>,
    pub layer_timings: Vec<LayerTiming>,
    pub flops: f64,
    pub gflops_per_second: f64,
    /// Time the compute thread waited for streamed weights, summed over layers.
    pub stall_seconds: f64,
    /// Bytes of hidden states written to the spill file (0 without offload).
    pub offloaded_bytes: u64,
    pub tokenize_seconds: f64,
    pub compute_seconds: f64,
    pub total_seconds: f64,
    /// Peak resident set of the process so far (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// The memory budget's prediction of this request's peak, MiB (0 without a budget).
    pub predicted_peak_mib: f64,
    /// The GPU allocator's counters over this request (CUDA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<crate::memory::GpuMemory>,
}

impl RequestStats {
    pub fn finish_counts(&mut self) {
        self.candidate_layers_computed = self.layers_per_candidate.iter().map(|&l| l as u64).sum();
        self.candidate_layers_full = (self.candidates * self.num_layers) as u64;
        self.saved_percent = if self.candidate_layers_full > 0 {
            100.0
                * (1.0 - self.candidate_layers_computed as f64 / self.candidate_layers_full as f64)
        } else {
            0.0
        };
        self.gflops_per_second = if self.compute_seconds > 0.0 {
            self.flops / self.compute_seconds / 1e9
        } else {
            0.0
        };
        self.peak_rss_mib = crate::memory::peak_rss_mib().unwrap_or(0.0);
    }
}
