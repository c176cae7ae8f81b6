//! `grating serve`: the rerank HTTP server (see `grating::server`).

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use grating::server::{AppState, ServerConfig};
use grating::{QueueOrder, Reranker};
use std::sync::Arc;
use std::time::Duration;

/// Server flags shared by `serve` and `bench-serve`.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Most documents in one request (413 beyond).
    #[arg(long, default_value_t = 1000)]
    pub max_documents: usize,
    /// Most tokens of one (query, document) sequence (default: the model's maximum). Longer
    /// ones are cut, or refused with 413 when a TEI request sets truncate=false.
    #[arg(long)]
    pub max_tokens_per_doc: Option<usize>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Rerank requests handled at once; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent_requests: usize,
    /// Per-request deadline in seconds; later answers are 503 `timeout`.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Tokens per chunk of one request's hidden states (bounds activation memory).
    #[arg(long, default_value_t = grating::DEFAULT_CHUNK_TOKENS)]
    pub chunk_tokens: usize,
    /// Tokens one layer step computes, shared by the requests in it (the fairness budget).
    #[arg(long, default_value_t = grating::scheduler::DEFAULT_STEP_TOKENS)]
    pub step_tokens: usize,
    /// Who gets each layer step first: the request with the least work done so far
    /// (least-attained), with the least work left (shortest-remaining), with the least work
    /// left counted as if nothing were pruned (shortest-unpruned-remaining), the layer the
    /// most requests wait at (most-shared), a cheap request catching up with the leader
    /// (shortest-remaining-aligned), a request of the leader's size catching up with it under
    /// shortest-unpruned-remaining (shortest-unpruned-aligned), or a comma-separated list of
    /// them that steps take in turn (alternating = shortest-remaining,least-attained).
    #[arg(long, default_value = "shortest-unpruned-aligned")]
    pub queue_order: QueueOrder,
    /// Steps a request with work may be passed over before it goes first whatever the queue
    /// order (the starvation guard).
    #[arg(long, default_value_t = grating::scheduler::DEFAULT_STARVE_AFTER_STEPS)]
    pub starve_after_steps: u32,
    /// Layers the scheduler keeps built between steps (streamed or reloaded weights): steps
    /// that alternate between two layers then read neither again.
    #[arg(long, default_value_t = grating::scheduler::DEFAULT_CACHED_LAYERS)]
    pub cached_layers: usize,
    /// Run requests one after another instead of sharing layer steps between them.
    #[arg(long)]
    pub no_layer_sharing: bool,
    /// Rebuild a layer from the memory-mapped checkpoint whenever a step needs one that is not
    /// built, standing in for weight streaming (CPU, f32 only).
    #[arg(long)]
    pub reload_layers: bool,
    /// Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// The model's name in answers, /info and /v1/models (default: a hub id as given, a local
    /// directory's last component; never the full path).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Self-calibration: the mean top-K agreement with full inference that pruning must keep
    /// on re-run samples (the margin widens at once below it, narrows slowly above it).
    #[arg(long, default_value_t = 0.99)]
    pub target_agreement: f64,
    /// Self-calibration: share of requests re-run without pruning, in idle time only, to
    /// measure the agreement (0 turns it off; it runs only with the margin rule).
    #[arg(long, default_value_t = 0.05)]
    pub calibration_sample: f64,
    /// Self-calibration: share of wall time re-runs may take when the server is never idle
    /// (they otherwise wait for idle moments).
    #[arg(long, default_value_t = grating::server::calibration::DEFAULT_BUSY_SHARE)]
    pub calibration_busy_share: f64,
}

impl ServerArgs {
    pub fn config(&self, reranker: &Reranker, api_key: Option<String>) -> Result<ServerConfig> {
        if self.chunk_tokens == 0 || self.step_tokens == 0 || self.cached_layers == 0 {
            bail!("--chunk-tokens, --step-tokens and --cached-layers must be positive");
        }
        if self.max_documents == 0 || self.max_concurrent_requests == 0 {
            bail!("--max-documents and --max-concurrent-requests must be positive");
        }
        let positive = self.request_timeout.is_finite() && self.request_timeout > 0.0;
        let grace_ok = self.shutdown_grace.is_finite() && self.shutdown_grace >= 0.0;
        if !positive || !grace_ok {
            bail!("--request-timeout must be positive and --shutdown-grace non-negative");
        }
        Ok(ServerConfig {
            max_documents: self.max_documents,
            max_tokens_per_doc: self.max_tokens_per_doc,
            max_body_bytes: self.max_body_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            request_timeout: Duration::from_secs_f64(self.request_timeout),
            served_model_name: self.served_model_name.clone(),
            // Surrounding spaces are not part of a key (headers are trimmed); a blank key is
            // refused when the server starts, never read as "no auth".
            api_key: api_key.map(|k| k.trim().to_string()),
            chunk_tokens: self.chunk_tokens,
            prune: self.prune.config(reranker.prune_config())?,
            layer_sharing: !self.no_layer_sharing,
            queue_order: self.queue_order.clone(),
            cached_layers: self.cached_layers,
            starve_after_steps: self.starve_after_steps.max(1),
            step_tokens: self.step_tokens,
            reload_layers: self.reload_layers,
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace),
            target_agreement: self.target_agreement,
            calibration_sample: self.calibration_sample,
            calibration_busy_share: self.calibration_busy_share,
            profile_dir: None,
        })
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Address to bind; loopback unless you mean to expose the server.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on every endpoint but /health, /docs and
    /// /openapi.json.
    #[arg(long, env = "GRATING_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Threads for HTTP and JSON (compute has its own).
    #[arg(long, default_value_t = 2)]
    pub http_threads: usize,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let reranker = Arc::new(args.model.load(&BatchArgs::default())?);
    let cfg = args.server.config(&reranker, args.api_key.clone())?;
    let state = AppState::new(reranker, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.http_threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot bind {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, model = %args.model.model, "listening");
        // One line on stdout for scripts that started us on port 0.
        println!("grating listening on http://{local}");
        grating::server::serve(listener, state, shutdown_signal()).await?;
        Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}
