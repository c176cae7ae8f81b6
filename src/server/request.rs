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
    /// Decoder rerankers' `<Instruct>` line (the model's default when `None`).
    pub instruction: Option<String>,
    /// No pruning for this request.
    pub exact: bool,
}

impl Prepared {
    /// Refuses what no engine work can answer (an empty query or document list, more documents
    /// than the server allows, `top_n` 0); otherwise returns K, the number of results to rank.
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
        // 0 is refused as the library and the CLI refuse it, rather than read as "all": one
        // meaning of K everywhere, and "all" already has a spelling (no top_n).
        if self.top_n == Some(0) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "top_n must be at least 1 (omit it to rank every document)",
            ));
        }
        let n = self.documents.len();
        Ok(self.top_n.unwrap_or(n).min(n))
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
            Some(doc_cap) => server_limit.min(
                doc_cap
                    .max(1)
                    .saturating_add(query_tokens(&self.query))
                    .saturating_add(template_tokens),
            ),
            None => server_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(docs: usize, top_n: Option<usize>) -> Prepared {
        Prepared {
            query: "q".into(),
            documents: (0..docs).map(|i| format!("doc {i}")).collect(),
            top_n,
            max_tokens_per_doc: None,
            truncate: true,
            truncation: Truncation::Right,
            instruction: None,
            exact: false,
        }
    }

    #[test]
    fn k_is_top_n_capped_at_the_documents_and_zero_is_refused() {
        let cfg = ServerConfig::default();
        assert_eq!(request(5, None).check(&cfg).unwrap(), 5);
        assert_eq!(request(5, Some(2)).check(&cfg).unwrap(), 2);
        assert_eq!(request(5, Some(9)).check(&cfg).unwrap(), 5);
        let e = request(5, Some(0)).check(&cfg).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.body.error_type, "invalid_request");
        assert!(e.body.error.contains("omit it"), "{}", e.body.error);
    }

    #[test]
    fn the_document_cap_counts_document_tokens() {
        let mut p = request(1, None);
        assert_eq!(p.max_length(512, |_| unreachable!(), 3), 512);
        p.max_tokens_per_doc = Some(16);
        assert_eq!(p.max_length(512, |_| 1, 3), 20);
        p.max_tokens_per_doc = Some(1000);
        assert_eq!(p.max_length(512, |_| 1, 3), 512);
    }
}
