//! What `grating serve` can be told, in one plain struct so the CLI, the benchmark and the
//! tests build the same server.

use crate::engine::scheduler::QueueOrder;
use crate::prune::PruneConfig;
use std::time::Duration;

/// Everything `grating serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most documents in one request (413 beyond).
    pub max_documents: usize,
    /// Most tokens of one (query, document) sequence; longer ones are cut, or refused with 413
    /// when the request turns truncation off. At most the model's maximum.
    pub max_tokens_per_doc: Option<usize>,
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Rerank requests handled at once (429 beyond): admitted or waiting in the engine.
    pub max_concurrent_requests: usize,
    /// Deadline of one request from its arrival (503 `timeout` after it).
    pub request_timeout: Duration,
    /// The model's name in answers, `/info` and `/v1/models` (default: a hub id as given, a
    /// local directory's last component).
    pub served_model_name: Option<String>,
    /// Bearer token required on every endpoint except /health, /docs and /openapi.json.
    pub api_key: Option<String>,
    pub chunk_tokens: usize,
    pub prune: PruneConfig,
    /// Share layer steps across concurrent requests (false: one request after another).
    pub layer_sharing: bool,
    /// Who gets each layer step first (the fairness policy).
    pub queue_order: QueueOrder,
    pub step_tokens: usize,
    /// Layers the scheduler keeps built between steps.
    pub cached_layers: usize,
    /// Steps a request may be passed over before it goes first (the starvation guard).
    pub starve_after_steps: u32,
    /// Rebuild a layer from the memory-mapped checkpoint whenever a step needs one that is not
    /// built (a stand-in for weight streaming, kept for comparison).
    pub reload_layers: bool,
    /// After a shutdown signal, in-flight requests get this long to finish; then they are
    /// cancelled and answered with 503 `cancelled`.
    pub shutdown_grace: Duration,
    /// Self-calibration: the mean top-K agreement with full inference pruning must keep.
    pub target_agreement: f64,
    /// Self-calibration: the share of requests re-run without pruning (in idle time) to
    /// measure it; 0 turns self-calibration off. It runs only with the margin rule.
    pub calibration_sample: f64,
    /// Self-calibration: the share of wall time re-runs may take when the server is never
    /// idle (re-runs otherwise wait for idle moments).
    pub calibration_busy_share: f64,
    /// Where the learned profile is written (default: where the model's profile was read from,
    /// [`crate::Reranker::profile_dir`]).
    pub profile_dir: Option<std::path::PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_documents: 1000,
            max_tokens_per_doc: None,
            max_body_bytes: 8 << 20,
            max_concurrent_requests: 64,
            request_timeout: Duration::from_secs(120),
            served_model_name: None,
            api_key: None,
            chunk_tokens: crate::engine::DEFAULT_CHUNK_TOKENS,
            prune: PruneConfig::default(),
            layer_sharing: true,
            queue_order: QueueOrder::default(),
            step_tokens: crate::engine::scheduler::DEFAULT_STEP_TOKENS,
            cached_layers: crate::engine::scheduler::DEFAULT_CACHED_LAYERS,
            starve_after_steps: crate::engine::scheduler::DEFAULT_STARVE_AFTER_STEPS,
            reload_layers: false,
            shutdown_grace: Duration::from_secs(30),
            target_agreement: 0.99,
            calibration_sample: 0.05,
            calibration_busy_share: super::calibration::DEFAULT_BUSY_SHARE,
            profile_dir: None,
        }
    }
}
