//! `grating serve`: a rerank HTTP server speaking the Cohere/Jina and TEI request shapes, with
//! concurrent requests sharing layer steps in one monolithic pass ([`crate::engine::shared`]).
//!
//! Path of a rerank request: the observe middleware gives it a request id, a tracing span and
//! metrics; auth (when a key is set) checks the bearer token in constant time; the handler takes
//! a concurrency permit (none left: 429), reads the body under the size limit (413), parses it
//! itself (malformed JSON 400, wrong shape 422), checks the limits, tokenizes on the blocking
//! pool and submits the pairs to the scheduler, then waits for the answer until the request's
//! deadline (503 `timeout`, and the engine drops the request at its next step).

pub mod api;
pub mod client;
mod docs;
pub mod error;
pub mod metrics;

use crate::engine::scheduler::{QueueOrder, RankedPolicy};
use crate::engine::{sigmoid, RerankOutput};
use crate::prune::{PruneConfig, PruneMode};
use crate::reranker::{RerankOptions, Reranker, SharedOptions, SharedReranker};
use crate::tokenize::Truncation;
use api::*;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use error::{ApiError, ErrorBody};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::Instrument;
use utoipa::OpenApi;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_documents: 1000,
            max_tokens_per_doc: None,
            max_body_bytes: 8 << 20,
            max_concurrent_requests: 64,
            request_timeout: Duration::from_secs(120),
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
        }
    }
}

/// Shared by all handlers.
pub struct AppState {
    engine: SharedReranker,
    cfg: ServerConfig,
    metrics: metrics::Metrics,
    permits: Arc<Semaphore>,
    max_doc_tokens: usize,
    info: Info,
}

impl AppState {
    /// Starts the engine's scheduler for `reranker`.
    pub fn new(reranker: Arc<Reranker>, cfg: ServerConfig) -> crate::Result<Arc<AppState>> {
        let model_max = reranker.info().max_length;
        let max_doc_tokens = cfg.max_tokens_per_doc.unwrap_or(model_max).min(model_max);
        let engine = SharedReranker::new(
            reranker.clone(),
            SharedOptions {
                layer_sharing: cfg.layer_sharing,
                policy: Arc::new(RankedPolicy {
                    order: cfg.queue_order.clone(),
                    starve_after_steps: cfg.starve_after_steps.max(1),
                }),
                step_tokens: cfg.step_tokens,
                max_active: cfg.max_concurrent_requests.max(1),
                cached_layers: cfg.cached_layers.max(1),
                chunk_tokens: cfg.chunk_tokens,
                reload_layers: cfg.reload_layers,
            },
        )?;
        let mi = reranker.info();
        let info = Info {
            model: reranker.model_id().to_string(),
            architecture: mi.architecture.clone(),
            num_layers: mi.num_layers,
            hidden_size: mi.hidden_size,
            max_length: mi.max_length,
            score_kind: serde_json::to_value(mi.score_kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            mode: "grating".into(),
            pruning: match cfg.prune.mode {
                PruneMode::Off => "off",
                PruneMode::TopK => "top-k",
                PruneMode::ExactOrder => "exact-order",
            }
            .into(),
            layer_sharing: cfg.layer_sharing,
            queue_order: cfg.queue_order.clone(),
            step_tokens: cfg.step_tokens,
            cached_layers: cfg.cached_layers,
            starve_after_steps: cfg.starve_after_steps,
            chunk_tokens: cfg.chunk_tokens,
            weights: if cfg.reload_layers {
                "reload"
            } else if reranker.weights_mode() == crate::engine::WeightsMode::Stream {
                "stream"
            } else {
                "resident"
            }
            .into(),
            limits: Limits {
                max_documents: cfg.max_documents,
                max_tokens_per_doc: max_doc_tokens,
                max_body_bytes: cfg.max_body_bytes,
                max_concurrent_requests: cfg.max_concurrent_requests,
                request_timeout_seconds: cfg.request_timeout.as_secs_f64(),
            },
            auth: cfg.api_key.is_some(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        Ok(Arc::new(AppState {
            engine,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1))),
            cfg,
            metrics: metrics::Metrics::default(),
            max_doc_tokens,
            info,
        }))
    }

    pub fn engine(&self) -> &SharedReranker {
        &self.engine
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "grating",
        description = "Top-K reranking with cross-encoders: GRATING's monolithic layer-major forwarding with progressive pruning, shared across concurrent requests."
    ),
    paths(rerank_v1, rerank_v2, rerank_tei, health, info, metrics_text),
    components(schemas(
        CohereRequest, CohereResponse, CohereResult, DocumentInput, DocumentText, Meta, Usage,
        ApiVersion, BilledUnits, GratingStats, TeiRequest, TeiResult, TruncationDirection, Info,
        Limits, Health, ErrorBody
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The request id of the request being handled: the client's `x-request-id` when it sent a
/// sane one, else a fresh random one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Compares in time that depends only on the lengths, so the key cannot be guessed byte by byte
/// from response times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as u64;
    }
    std::hint::black_box(diff) == 0
}

/// The application: routes, auth, body limit, request ids, logs and metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/rerank", post(rerank_v1))
        .route("/v2/rerank", post(rerank_v2))
        .route("/rerank", post(rerank_tei))
        .route("/info", get(info))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(protected)
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs_page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_request_id(s))
        .map(String::from)
        .unwrap_or_else(new_request_id);
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let secs = start.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    span.in_scope(|| {
        if resp.status().is_server_error() {
            tracing::warn!(status, latency_ms = secs * 1e3, "answered");
        } else {
            tracing::info!(status, latency_ms = secs * 1e3, "answered");
        }
    });
    st.metrics.record_request(&endpoint, status, secs);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key (send `Authorization: Bearer <key>`)",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint (see /docs)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint (see /docs)",
    )
}

/// A rerank request in the engine's terms, whatever shape it came in.
struct Prepared {
    query: String,
    documents: Vec<String>,
    top_n: Option<usize>,
    max_tokens_per_doc: Option<usize>,
    truncate: bool,
    truncation: Truncation,
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body exceeds the server's limit",
            )
        } else {
            ApiError::new(e.status(), "invalid_request", e.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_json(&e))
}

async fn run_rerank(
    st: &Arc<AppState>,
    p: Prepared,
) -> Result<(RerankOutput, Vec<String>), ApiError> {
    let arrived = Instant::now();
    let deadline = arrived + st.cfg.request_timeout;
    let _permit = st.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "the server is handling its maximum of {} requests; retry later",
                st.cfg.max_concurrent_requests
            ),
        )
    })?;
    if p.query.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            "`query` is empty",
        ));
    }
    if p.documents.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            "the document list is empty",
        ));
    }
    if p.documents.len() > st.cfg.max_documents {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_documents",
            format!(
                "{} documents; the server's limit is {}",
                p.documents.len(),
                st.cfg.max_documents
            ),
        ));
    }
    let st2 = st.clone();
    let submitted = tokio::task::spawn_blocking(move || {
        let r = st2.engine.reranker();
        let mut max_length = st2.max_doc_tokens;
        if let Some(doc_cap) = p.max_tokens_per_doc {
            // Cohere's cap counts document tokens; the engine's counts the whole sequence.
            let q = r.count_tokens(&p.query).unwrap_or(0);
            max_length = max_length.min(doc_cap.max(1) + q + r.template_tokens());
        }
        let opts = RerankOptions {
            top_k: p.top_n,
            prune: Some(st2.cfg.prune.clone()),
            max_length: Some(max_length),
            truncate: p.truncate,
            truncation: p.truncation,
            ..Default::default()
        };
        let pending = st2
            .engine
            .submit(&p.query, &p.documents, &opts, Some(deadline));
        (pending, p.documents)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("tokenizer task failed: {e}"),
        )
    })?;
    let (pending, documents) = submitted;
    let pending = pending?;
    let submitted = Instant::now();
    // Dropping `pending` unanswered (deadline, client gone) cancels the request in the engine.
    let answer = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), pending).await;
    st.metrics
        .record_engine_time(submitted.elapsed().as_secs_f64());
    match answer {
        Ok(Ok(out)) => Ok((out, documents)),
        Ok(Err(crate::GratingError::Cancelled(m))) if Instant::now() >= deadline => {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the request did not finish within {:?} ({m})",
                    st.cfg.request_timeout
                ),
            ))
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request did not finish within {:?}",
                st.cfg.request_timeout
            ),
        )),
    }
}

fn cohere_response(
    st: &AppState,
    id: String,
    out: RerankOutput,
    docs: Vec<String>,
    with_docs: bool,
    version: &str,
) -> CohereResponse {
    let mut docs: Vec<Option<String>> = docs.into_iter().map(Some).collect();
    let results = out
        .ranked
        .iter()
        .map(|s| CohereResult {
            index: s.index,
            relevance_score: sigmoid(s.logit),
            document: if with_docs {
                docs[s.index].take().map(|text| DocumentText { text })
            } else {
                None
            },
        })
        .collect();
    CohereResponse {
        id,
        model: st.info.model.clone(),
        results,
        meta: Meta {
            api_version: ApiVersion {
                version: version.into(),
            },
            billed_units: BilledUnits { search_units: 1 },
        },
        usage: Usage {
            total_tokens: out.stats.tokens,
            prompt_tokens: out.stats.tokens,
        },
        grating: GratingStats {
            candidates: out.stats.candidates,
            candidate_layers_computed: out.stats.candidate_layers_computed,
            candidate_layers_full: out.stats.candidate_layers_full,
            saved_percent: out.stats.saved_percent,
        },
    }
}

async fn cohere(
    st: Arc<AppState>,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
    version: &str,
) -> Result<Json<CohereResponse>, ApiError> {
    let req: CohereRequest = parse(body)?;
    let with_docs = req.return_documents.unwrap_or(false);
    let p = Prepared {
        query: req.query,
        documents: req
            .documents
            .into_iter()
            .map(DocumentInput::into_text)
            .collect(),
        top_n: req.top_n,
        max_tokens_per_doc: req.max_tokens_per_doc,
        truncate: true,
        truncation: Truncation::Right,
    };
    let (out, docs) = run_rerank(&st, p).await?;
    Ok(Json(cohere_response(
        &st, id.0, out, docs, with_docs, version,
    )))
}

/// Rerank, Cohere v1 / Jina shape.
#[utoipa::path(post, path = "/v1/rerank", request_body = CohereRequest,
    responses(
        (status = 200, description = "Results, best first", body = CohereResponse),
        (status = 400, description = "Malformed JSON, empty query or documents", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many documents, body too large, or an over-long document with truncation off", body = ErrorBody),
        (status = 422, description = "Wrong field types", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
async fn rerank_v1(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CohereResponse>, ApiError> {
    cohere(st, id, body, "1").await
}

/// Rerank, Cohere v2 shape (same fields as v1).
#[utoipa::path(post, path = "/v2/rerank", request_body = CohereRequest,
    responses(
        (status = 200, description = "Results, best first", body = CohereResponse),
        (status = 400, description = "Malformed JSON, empty query or documents", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many documents, body too large", body = ErrorBody),
        (status = 422, description = "Wrong field types", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
async fn rerank_v2(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CohereResponse>, ApiError> {
    cohere(st, id, body, "2").await
}

/// Rerank, Hugging Face TEI shape: a bare array sorted best first.
#[utoipa::path(post, path = "/rerank", request_body = TeiRequest,
    responses(
        (status = 200, description = "Results, best first", body = [TeiResult]),
        (status = 400, description = "Malformed JSON, empty query or texts", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many texts, body too large, or an over-long text with truncate=false", body = ErrorBody),
        (status = 422, description = "Wrong field types", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
async fn rerank_tei(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<TeiResult>>, ApiError> {
    let req: TeiRequest = parse(body)?;
    let p = Prepared {
        query: req.query,
        documents: req.texts,
        top_n: req.top_n,
        max_tokens_per_doc: None,
        truncate: req.truncate.unwrap_or(true),
        truncation: match req.truncation_direction {
            TruncationDirection::Right => Truncation::Right,
            TruncationDirection::Left => Truncation::Left,
        },
    };
    let (out, mut docs) = run_rerank(&st, p).await?;
    Ok(Json(
        out.ranked
            .iter()
            .map(|s| TeiResult {
                index: s.index,
                score: if req.raw_scores {
                    s.logit
                } else {
                    sigmoid(s.logit)
                },
                text: req.return_text.then(|| std::mem::take(&mut docs[s.index])),
            })
            .collect(),
    ))
}

/// Liveness: 200 while the server accepts requests.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Model, architecture, layers, limits and mode.
#[utoipa::path(get, path = "/info", responses((status = 200, body = Info)), security(("bearer" = [])))]
async fn info(State(st): State<Arc<AppState>>) -> Json<Info> {
    Json(st.info.clone())
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")), security(("bearer" = [])))]
async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let in_flight = st.cfg.max_concurrent_requests.max(1) - st.permits.available_permits();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(st.engine.counters(), in_flight),
    )
        .into_response()
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn docs_page() -> Html<String> {
    Html(docs::page(&ApiDoc::openapi()))
}

/// Serves `state` on `listener` until `shutdown` completes; then stops accepting connections,
/// gives in-flight requests `shutdown_grace` to finish, answers the rest with 503 `cancelled`,
/// and stops the engine.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let st = state.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!(
            grace_seconds = st.cfg.shutdown_grace.as_secs_f64(),
            "shutting down: finishing in-flight requests"
        );
        let grace = st.cfg.shutdown_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace over: cancelling in-flight requests");
            st.engine.cancel_all();
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.engine.shutdown()).await;
    tracing::info!("server stopped");
    Ok(())
}

/// A server running on its own thread and runtime (tests, benchmarks).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Binds `addr` (port 0: an ephemeral port) and serves in the background.
    pub fn start(
        reranker: Arc<Reranker>,
        cfg: ServerConfig,
        addr: &str,
        worker_threads: usize,
    ) -> crate::Result<RunningServer> {
        let state = AppState::new(reranker, cfg)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("grating-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    serve(listener, st, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                })
            })?;
        Ok(RunningServer {
            addr: local,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Graceful shutdown, as on SIGTERM; waits for the server to stop.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(valid_request_id("abc-123"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(200)));
        assert_eq!(new_request_id().len(), 32);
    }

    #[test]
    fn documents_accept_strings_and_objects() {
        let r: CohereRequest =
            serde_json::from_str(r#"{"query":"q","documents":["a",{"text":"b"}],"top_n":1,"model":"m","rank_fields":["text"]}"#).unwrap();
        let d: Vec<String> = r
            .documents
            .into_iter()
            .map(DocumentInput::into_text)
            .collect();
        assert_eq!(d, vec!["a", "b"]);
        let e =
            serde_json::from_str::<CohereRequest>(r#"{"query":"q","documents":[1]}"#).unwrap_err();
        assert_eq!(
            ApiError::bad_json(&e).status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let e = serde_json::from_str::<CohereRequest>(r#"{"query":"q","#).unwrap_err();
        assert_eq!(ApiError::bad_json(&e).status, StatusCode::BAD_REQUEST);
    }
}
