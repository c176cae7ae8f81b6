//! The rerank endpoints: every rerank path takes every request shape (Cohere/Jina `documents`
//! or TEI `texts`) through one parser, turns it into a [`Prepared`] request, and answers in the
//! shape the body asked for. The body is taken as bytes and parsed here so that malformed JSON
//! (400) and a wrong shape (422, naming the field) get the server's error body, not axum's.

use super::super::api::*;
use super::super::error::{ApiError, ErrorBody};
use super::super::execute::run_rerank;
use super::super::middleware::RequestId;
use super::super::request::Prepared;
use super::super::state::AppState;
use crate::engine::RerankOutput;
use crate::tokenize::Truncation;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::Value;
use std::sync::Arc;

fn parse(body: Result<Bytes, BytesRejection>) -> Result<RerankRequest, ApiError> {
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
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let req: RerankRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_json_at(&path, e.inner())
    })?;
    de.end().map_err(|e| ApiError::bad_json(&e))?;
    Ok(req)
}

/// How to answer: the shape the body was in, and what it asked to get back.
struct Answer {
    /// `None` for TEI's bare array, else the Cohere API version to report.
    cohere_version: Option<&'static str>,
    raw_scores: bool,
    /// The documents to echo, as sent (strings as `{"text": ...}` in the Cohere shape).
    echo: Option<Vec<Value>>,
}

impl Answer {
    /// The logit itself with `raw_scores`, else the server's 0-1 score of it.
    fn score(&self, st: &AppState, logit: f32) -> f32 {
        if self.raw_scores {
            logit
        } else {
            st.relevance(logit)
        }
    }
}

/// The text a document is ranked by: a string as is; an object's `text` field, or the fields
/// `rank_fields` names joined as `field: value` lines.
fn document_text(
    i: usize,
    doc: &DocumentInput,
    rank_fields: Option<&[String]>,
) -> Result<String, ApiError> {
    let fields = match doc {
        DocumentInput::Text(t) => return Ok(t.clone()),
        DocumentInput::Object(DocumentObject(fields)) => fields,
    };
    let as_text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let missing = |name: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("documents[{i}] has no `{name}` field"),
        )
    };
    match rank_fields {
        Some(names) if !names.is_empty() => names
            .iter()
            .map(|n| {
                let v = fields.get(n).ok_or_else(|| missing(n))?;
                Ok(format!("{n}: {}", as_text(v)))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|lines| lines.join("\n")),
        _ => match fields.get("text") {
            Some(v) => Ok(as_text(v)),
            None => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "documents[{i}] has no `text` field (name the fields to rank in `rank_fields`)"
                ),
            )),
        },
    }
}

/// The engine's request and how to answer it, from a body in either shape.
fn interpret(req: RerankRequest, version: &'static str) -> Result<(Prepared, Answer), ApiError> {
    let with_docs = req.return_documents.or(req.return_text).unwrap_or(false);
    let (documents, answer) = match (req.documents, req.texts) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "send either `documents` (Cohere/Jina) or `texts` (TEI), not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "missing field `documents` (or TEI's `texts`)",
            ))
        }
        (None, Some(texts)) => (
            texts,
            Answer {
                cohere_version: None,
                raw_scores: req.raw_scores.unwrap_or(false),
                echo: None,
            },
        ),
        (Some(docs), None) => {
            let rank_fields = req.rank_fields.as_deref();
            let texts = docs
                .iter()
                .enumerate()
                .map(|(i, d)| document_text(i, d, rank_fields))
                .collect::<Result<Vec<_>, _>>()?;
            let echo = with_docs.then(|| {
                docs.into_iter()
                    .map(|d| match d {
                        DocumentInput::Text(t) => serde_json::json!({ "text": t }),
                        DocumentInput::Object(DocumentObject(fields)) => Value::Object(fields),
                    })
                    .collect()
            });
            let answer = Answer {
                cohere_version: Some(version),
                raw_scores: req.raw_scores.unwrap_or(false),
                echo,
            };
            (texts, answer)
        }
    };
    let prepared = Prepared {
        query: req.query,
        documents,
        top_n: req.top_n,
        max_tokens_per_doc: req.max_tokens_per_doc,
        truncate: req.truncate.unwrap_or(true),
        truncation: match req.truncation_direction {
            TruncationDirection::Right => Truncation::Right,
            TruncationDirection::Left => Truncation::Left,
        },
        instruction: req.instruction.filter(|i| !i.trim().is_empty()),
        exact: req.exact.unwrap_or(false),
    };
    Ok((prepared, answer))
}

fn cohere_response(
    st: &AppState,
    id: String,
    out: RerankOutput,
    mut answer: Answer,
    version: &str,
) -> CohereResponse {
    let mut echo: Vec<Option<Value>> = answer
        .echo
        .take()
        .map(|docs| docs.into_iter().map(Some).collect())
        .unwrap_or_default();
    let results = out
        .ranked
        .iter()
        .map(|s| CohereResult {
            index: s.index,
            relevance_score: answer.score(st, s.logit),
            document: echo.get_mut(s.index).and_then(Option::take),
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

fn tei_response(
    st: &AppState,
    out: RerankOutput,
    mut docs: Vec<String>,
    answer: &Answer,
    with_text: bool,
) -> Vec<TeiResult> {
    out.ranked
        .iter()
        .map(|s| TeiResult {
            index: s.index,
            score: answer.score(st, s.logit),
            text: with_text.then(|| std::mem::take(&mut docs[s.index])),
        })
        .collect()
}

/// Every rerank path: parse, run, answer in the body's shape.
async fn rerank(
    st: Arc<AppState>,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
    version: &'static str,
) -> Result<Json<RerankResponse>, ApiError> {
    let req = parse(body)?;
    let with_text = req.return_text.or(req.return_documents).unwrap_or(false);
    let (prepared, answer) = interpret(req, version)?;
    let (out, docs) = run_rerank(&st, prepared).await?;
    Ok(Json(match answer.cohere_version {
        Some(v) => RerankResponse::Cohere(cohere_response(&st, id.0, out, answer, v)),
        None => RerankResponse::Tei(tei_response(&st, out, docs, &answer, with_text)),
    }))
}

/// Rerank (Cohere v1 / Jina reports API version 1). Takes either request shape and answers in
/// it: `documents` gets the Cohere/Jina object, `texts` TEI's bare array.
#[utoipa::path(post, path = "/v1/rerank", request_body = RerankRequest,
    responses(
        (status = 200, description = "Results, best first, in the request's shape", body = RerankResponse),
        (status = 400, description = "Malformed JSON, empty query or documents, a document without the field to rank", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many documents, body too large, or an over-long document with truncation off", body = ErrorBody),
        (status = 422, description = "Wrong field types, both or neither of documents and texts, or top_n 0", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests (Retry-After says when to retry)", body = ErrorBody),
        (status = 500, description = "An engine or model fault (error_type names it)", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rerank_v1(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank(st, id, body, "1").await
}

/// Rerank (Cohere v2 reports API version 2); the same request shapes as `/v1/rerank`.
#[utoipa::path(post, path = "/v2/rerank", request_body = RerankRequest,
    responses(
        (status = 200, description = "Results, best first, in the request's shape", body = RerankResponse),
        (status = 400, description = "Malformed JSON, empty query or documents, a document without the field to rank", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many documents, body too large, or an over-long document with truncation off", body = ErrorBody),
        (status = 422, description = "Wrong field types, both or neither of documents and texts, or top_n 0", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests (Retry-After says when to retry)", body = ErrorBody),
        (status = 500, description = "An engine or model fault (error_type names it)", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rerank_v2(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank(st, id, body, "2").await
}

/// Rerank at the root path (TEI, Infinity, vLLM, LocalAI); the same request shapes as
/// `/v1/rerank`.
#[utoipa::path(post, path = "/rerank", request_body = RerankRequest,
    responses(
        (status = 200, description = "Results, best first, in the request's shape", body = RerankResponse),
        (status = 400, description = "Malformed JSON, empty query or documents, a document without the field to rank", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many documents, body too large, or an over-long document with truncation off", body = ErrorBody),
        (status = 422, description = "Wrong field types, both or neither of documents and texts, or top_n 0", body = ErrorBody),
        (status = 429, description = "Too many concurrent requests (Retry-After says when to retry)", body = ErrorBody),
        (status = 500, description = "An engine or model fault (error_type names it)", body = ErrorBody),
        (status = 503, description = "Timed out or cancelled by shutdown", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rerank_root(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank(st, id, body, "1").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<RerankRequest, ApiError> {
        parse(Ok(Bytes::from(json.to_string())))
    }

    fn texts(json: &str) -> Result<Vec<String>, ApiError> {
        interpret(body(json)?, "1").map(|(p, _)| p.documents)
    }

    #[test]
    fn documents_accept_strings_objects_and_rank_fields() {
        assert_eq!(
            texts(r#"{"query":"q","documents":["a",{"text":"b","id":7}],"model":"m"}"#).unwrap(),
            vec!["a", "b"]
        );
        let t = texts(
            r#"{"query":"q","documents":[{"title":"T","year":2020,"text":"x"}],"rank_fields":["title","year"]}"#,
        )
        .unwrap();
        assert_eq!(t, vec!["title: T\nyear: 2020"]);
        // A missing field is a 400 naming it.
        let e = texts(r#"{"query":"q","documents":["a",{"body":"b"}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.body.error.contains("documents[1]") && e.body.error.contains("`text`"));
        let e = texts(r#"{"query":"q","documents":[{"text":"b"}],"rank_fields":["title"]}"#)
            .unwrap_err();
        assert!(e.body.error.contains("`title`"), "{}", e.body.error);
    }

    #[test]
    fn one_parser_for_both_shapes_and_clear_errors() {
        let (p, a) = interpret(
            body(r#"{"query":"q","texts":["a"],"raw_scores":"true"}"#).unwrap(),
            "2",
        )
        .unwrap();
        assert_eq!(p.documents, vec!["a"]);
        assert!(a.cohere_version.is_none() && a.raw_scores);
        let (_, a) = interpret(
            body(r#"{"query":"q","documents":["a"],"return_documents":"true","top_n":1.0}"#)
                .unwrap(),
            "2",
        )
        .unwrap();
        assert_eq!(a.cohere_version, Some("2"));
        assert_eq!(a.echo.unwrap(), vec![serde_json::json!({"text": "a"})]);
        for (json, status) in [
            (r#"{"query":"q","texts":["a"],"documents":["a"]}"#, 422),
            (r#"{"query":"q"}"#, 422),
            (r#"{"query":"q","documents":[1]}"#, 422),
            (
                r#"{"query":"q","documents":["a"],"max_tokens_per_doc":18446744073709551611}"#,
                422,
            ),
            (r#"{"query":"q","documents":["a"],"top_n":2.5}"#, 422),
            (r#"{"query":"q","#, 400),
            (r#"{"query":"q","documents":["a"]} trailing"#, 400),
        ] {
            let e = body(json)
                .and_then(|r| interpret(r, "1"))
                .err()
                .unwrap_or_else(|| panic!("{json} accepted"));
            assert_eq!(e.status.as_u16(), status, "{json}: {}", e.body.error);
        }
        // A wrong field is named.
        let e = body(r#"{"query":"q","documents":["a"],"max_tokens_per_doc":-3}"#)
            .err()
            .unwrap();
        assert!(
            e.body.error.starts_with("max_tokens_per_doc"),
            "{}",
            e.body.error
        );
    }
}
