//! The one error shape every endpoint answers with: `{"error": "...", "error_type": "..."}`,
//! with a status that tells a client whether retrying can help (4xx: change the request;
//! 429/503: try again later).

use crate::error::GratingError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the offending field or limit.
    pub error: String,
    /// A stable machine-readable kind: invalid_json, invalid_request, empty_input,
    /// too_many_documents, document_too_long, payload_too_large, unauthorized, overloaded,
    /// timeout, cancelled, not_found, internal.
    pub error_type: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &str, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.into(),
                error_type: error_type.into(),
            },
        }
    }

    pub fn bad_json(e: &serde_json::Error) -> ApiError {
        use serde_json::error::Category;
        match e.classify() {
            // Well-formed JSON of the wrong shape: a missing field or a wrong type.
            Category::Data => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.to_string(),
            ),
            _ => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("malformed JSON: {e}"),
            ),
        }
    }
}

impl From<GratingError> for ApiError {
    fn from(e: GratingError) -> ApiError {
        let msg = e.to_string();
        match e {
            GratingError::InvalidInput(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", msg)
            }
            GratingError::LimitExceeded(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "document_too_long", msg)
            }
            GratingError::MemoryBudget(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "memory_budget", msg)
            }
            GratingError::Tokenizer(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "tokenizer", msg)
            }
            GratingError::Cancelled(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled", msg)
            }
            _ => {
                tracing::error!(error = %msg, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}
