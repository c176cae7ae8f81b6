//! Which path goes to which handler, which of them need the API key, and the JSON answers for
//! unknown paths and methods (so every response of the server has the one error shape).

use super::error::ApiError;
use super::handlers::{meta, rerank};
use super::middleware::{auth, json_only, observe};
use super::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// The application: routes, auth, body limit, request ids, logs and metrics.
pub fn router(state: Arc<AppState>) -> Router {
    // Every rerank path takes every request shape; clients that append a slash to their base
    // URL reach the same handlers.
    let rerank = Router::new()
        .route("/v1/rerank", post(rerank::rerank_v1))
        .route("/v1/rerank/", post(rerank::rerank_v1))
        .route("/v2/rerank", post(rerank::rerank_v2))
        .route("/v2/rerank/", post(rerank::rerank_v2))
        .route("/rerank", post(rerank::rerank_root))
        .route("/rerank/", post(rerank::rerank_root))
        .route_layer(middleware::from_fn_with_state(state.clone(), json_only));
    let protected = Router::new()
        .merge(rerank)
        .route("/v1/models", get(meta::models))
        .route("/info", get(meta::info))
        .route("/metrics", get(meta::metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(protected)
        .route("/health", get(meta::health))
        .route("/ready", get(meta::ready))
        .route("/openapi.json", get(meta::openapi_json))
        .route("/docs", get(meta::docs_page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
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
