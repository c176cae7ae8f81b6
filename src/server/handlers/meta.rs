//! The endpoints around reranking: liveness, the server's description, metrics and the API
//! documentation.

use super::super::api::{Health, Info, ModelCard, ModelList};
use super::super::docs;
use super::super::error::ApiError;
use super::super::openapi::ApiDoc;
use super::super::state::AppState;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use utoipa::OpenApi;

/// Readiness: 200 while new rerank requests will be served; 503 `not_ready` once a shutdown
/// has begun or the engine has stopped (while liveness, `/health`, stays 200).
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, body = Health),
    (status = 503, description = "Shutting down, or the engine stopped", body = super::super::error::ErrorBody)))]
pub(crate) async fn ready(State(st): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    match st.not_ready() {
        None => Ok(Json(Health {
            status: "ready".into(),
        })),
        Some(why) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            why,
        )),
    }
}

/// Liveness: 200 while the server process answers.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Model, architecture, layers, limits and mode.
#[utoipa::path(get, path = "/info", responses((status = 200, body = Info)), security(("bearer" = [])))]
pub(crate) async fn info(State(st): State<Arc<AppState>>) -> Json<Info> {
    let mut info = st.info.clone();
    info.calibration = st.calibrator.as_ref().map(|c| c.snapshot());
    Json(info)
}

/// The served model, in the OpenAI list shape (for clients that discover models first).
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)), security(("bearer" = [])))]
pub(crate) async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: st.info.model.clone(),
            object: "model".into(),
            created: st.started_unix,
            owned_by: "grating".into(),
        }],
    })
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")), security(("bearer" = [])))]
pub(crate) async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics
            .render(st.counters(), st.in_flight(), st.calibrator.as_deref()),
    )
        .into_response()
}

pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub(crate) async fn docs_page() -> Html<String> {
    Html(docs::page(&ApiDoc::openapi()))
}
