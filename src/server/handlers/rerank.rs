//! The rerank endpoints: each turns its request shape into a [`Prepared`] request and the
//! engine's answer back into its response shape. The body is taken as bytes and parsed here so
//! that malformed JSON (400) and a wrong shape (422) get the server's error body, not axum's.

use super::super::api::*;
use super::super::error::{ApiError, ErrorBody};
use super::super::execute::run_rerank;
use super::super::middleware::RequestId;
use super::super::request::Prepared;
use super::super::state::AppState;
use crate::engine::{sigmoid, RerankOutput};
use crate::tokenize::Truncation;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use std::sync::Arc;

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
        (status = 422, description = "Wrong field types, or top_n 0", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests", body = ErrorBody),
        (status = 500, description = "An engine or model fault (error_type names it)", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rerank_v1(
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
        (status = 422, description = "Wrong field types, or top_n 0", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests", body = ErrorBody),
        (status = 500, description = "An engine or model fault (error_type names it)", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rerank_v2(
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
        (status = 422, description = "Wrong field types, or top_n 0", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests", body = ErrorBody),
        (status = 500, description = "An engine or model fault (error_type names it)", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rerank_tei(
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

#[cfg(test)]
mod tests {
    use super::*;

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
