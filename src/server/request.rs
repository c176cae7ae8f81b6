//! The server's rules for a rerank request, whatever shape it came in: what is refused before
//! any work starts, what K is, and how long a sequence may be. Kept apart from execution so
//! the rules can be read (and tested) without an engine.

use super::config::ServerConfig;
use super::error::ApiError;
use crate::tokenize::Truncation;
use axum::http::StatusCode;

/// A rerank request in the engine's terms, whatever shape it came in.
pub(super) struct Prepared {
    pub query: String,
    pub documents: Vec<String>,
    pub top_n: Option<usize>,
    /// Cohere's per-document cap, in document tokens.
    pub max_tokens_per_doc: Option<usize>,
    pub truncate: bool,
    pub truncation: Truncation,
}

impl Prepared {
    /// Refuses what no engine work can answer (an empty query or document list, more documents
    /// than the server allows); otherwise returns K, the number of results to rank.
    pub fn check(&self, cfg: &ServerConfig) -> Result<usize, ApiError> {
        if self.query.trim().is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "empty_input",
                "`query` is empty",
            ));
        }
        if self.documents.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "empty_input",
                "the document list is empty",
            ));
        }
        if self.documents.len() > cfg.max_documents {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_documents",
                format!(
                    "{} documents; the server's limit is {}",
                    self.documents.len(),
                    cfg.max_documents
                ),
            ));
        }
        let n = self.documents.len();
        Ok(self.top_n.filter(|&k| k > 0).unwrap_or(n).min(n))
    }

    /// The longest (query, document) sequence, in tokens: the server's limit, lowered by the
    /// request's per-document cap. Cohere's cap counts document tokens while the engine's
    /// counts the whole sequence, so the query's tokens (counted by `query_tokens`, only when
    /// a cap is set) and the template's are added to it.
    pub fn max_length(
        &self,
        server_limit: usize,
        query_tokens: impl FnOnce(&str) -> usize,
        template_tokens: usize,
    ) -> usize {
        match self.max_tokens_per_doc {
            Some(doc_cap) => {
                server_limit.min(doc_cap.max(1) + query_tokens(&self.query) + template_tokens)
            }
            None => server_limit,
        }
    }
}
