//! The one error shape every endpoint answers with: `{"error", "error_type", "detail",
//! "message"}` (the same text under the names Cohere, Jina and FastAPI-style clients read), with
//! a status that tells a client whether retrying can help (4xx: change the request; 429/503:
//! try again later, 429 with `Retry-After`; 500: the engine or the model failed, reported and
//! logged).

use crate::error::GratingError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the offending field or limit.
    pub error: String,
    /// A stable machine-readable kind. The request's fault (4xx): invalid_json,
    /// invalid_request, empty_input, tokenizer, too_many_documents, document_too_long,
    /// memory_budget, payload_too_large, unsupported_media_type, unauthorized, not_found, method_not_allowed. Retry
    /// later (429/503): overloaded, timeout, cancelled, not_ready. The server's or the model's fault
    /// (500): internal, non_finite_score, model_files, backend, io.
    pub error_type: String,
    /// `error` again, where Jina's and FastAPI-style clients look for it.
    pub detail: String,
    /// `error` again, where Cohere's clients look for it.
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &str, error: impl Into<String>) -> ApiError {
        let error = error.into();
        ApiError {
            status,
            body: ErrorBody {
                detail: error.clone(),
                message: error.clone(),
                error,
                error_type: error_type.into(),
            },
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn bad_json(e: &serde_json::Error) -> ApiError {
        ApiError::bad_json_at(".", e)
    }

    /// A body that failed to parse at `path` (`.` for the whole body, else the field, e.g.
    /// `documents[2]`), named in the message.
    pub fn bad_json_at(path: &str, e: &serde_json::Error) -> ApiError {
        use serde_json::error::Category;
        match e.classify() {
            // Well-formed JSON of the wrong shape: a missing field or a wrong type.
            Category::Data if path == "." => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.to_string(),
            ),
            Category::Data => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("{path}: {e}"),
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
    /// The caller's faults are 4xx (change the request); a shutdown is 503 (retry elsewhere or
    /// later); everything else is the engine's or the model's fault, a 500 that is logged,
    /// with the library's stable `error_type` so clients and dashboards can tell faults apart.
    fn from(e: GratingError) -> ApiError {
        let msg = e.to_string();
        if e.is_client_error() {
            let (status, error_type) = match e {
                // Over-long documents are the only length limit a request can exceed here.
                GratingError::LimitExceeded(_) => {
                    (StatusCode::PAYLOAD_TOO_LARGE, "document_too_long")
                }
                GratingError::MemoryBudget(_) => (StatusCode::PAYLOAD_TOO_LARGE, e.error_type()),
                _ => (StatusCode::UNPROCESSABLE_ENTITY, e.error_type()),
            };
            return ApiError::new(status, error_type, msg);
        }
        if let GratingError::Cancelled(_) = e {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.error_type(), msg);
        }
        let error_type = e.error_type();
        tracing::error!(error = %msg, error_type, "engine fault");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error_type, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(e: GratingError) -> (u16, String) {
        let a = ApiError::from(e);
        (a.status.as_u16(), a.body.error_type)
    }

    #[test]
    fn every_error_carries_its_text_three_ways_and_429_says_when_to_retry() {
        let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", "busy").retry_after(1);
        assert_eq!(
            (
                e.body.error.as_str(),
                e.body.detail.as_str(),
                e.body.message.as_str()
            ),
            ("busy", "busy", "busy")
        );
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
        let r = ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "x").into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }

    #[test]
    fn client_errors_are_4xx_and_engine_faults_5xx() {
        let s = |x: &str| x.to_string();
        assert_eq!(
            mapped(GratingError::InvalidInput(s("x"))),
            (422, s("invalid_request"))
        );
        assert_eq!(
            mapped(GratingError::LimitExceeded(s("x"))),
            (413, s("document_too_long"))
        );
        assert_eq!(
            mapped(GratingError::MemoryBudget(s("x"))),
            (413, s("memory_budget"))
        );
        assert_eq!(
            mapped(GratingError::Tokenizer(s("x"))),
            (422, s("tokenizer"))
        );
        assert_eq!(
            mapped(GratingError::Cancelled(s("x"))),
            (503, s("cancelled"))
        );
        assert_eq!(
            mapped(GratingError::NonFiniteScore { document: 3 }),
            (500, s("non_finite_score"))
        );
        assert_eq!(
            mapped(GratingError::WeightFile {
                path: "m.safetensors".into(),
                reason: s("truncated")
            }),
            (500, s("model_files"))
        );
        assert_eq!(
            mapped(GratingError::Config(s("x"))),
            (500, s("model_files"))
        );
        assert_eq!(mapped(GratingError::Internal(s("x"))), (500, s("internal")));
        assert_eq!(
            mapped(GratingError::Io(std::io::Error::other("x"))),
            (500, s("io"))
        );
        assert_eq!(
            mapped(GratingError::Backend(candle_core::Error::Msg(s("x")))),
            (500, s("backend"))
        );
    }
}
