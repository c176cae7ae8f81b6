//! Request and response shapes of the ecosystem's rerank APIs: Cohere/Jina (`/v1/rerank`,
//! `/v2/rerank`) and Hugging Face TEI (`/rerank`). Unknown fields are ignored, so clients that
//! send more (`model`, `rank_fields`, `max_chunks_per_doc`) work unchanged.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A document: a plain string, or an object with a `text` field (Cohere v2 and Jina).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DocumentInput {
    Text(String),
    Object { text: String },
}

impl DocumentInput {
    pub fn into_text(self) -> String {
        match self {
            DocumentInput::Text(t) | DocumentInput::Object { text: t } => t,
        }
    }
}

/// The Cohere/Jina rerank request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CohereRequest {
    /// Accepted for compatibility; the server runs the model it was started with.
    #[serde(default)]
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<DocumentInput>,
    /// K: how many results to return, best first. It is the K that pruning works against;
    /// without it every document is scored and returned; 0 is refused (422).
    #[serde(default)]
    pub top_n: Option<usize>,
    /// Include each document's text in its result (default false).
    #[serde(default)]
    pub return_documents: Option<bool>,
    /// Cut each document to this many tokens (at most the server's per-document limit).
    #[serde(default)]
    pub max_tokens_per_doc: Option<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DocumentText {
    pub text: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CohereResult {
    /// Position of the document in the request's `documents`.
    pub index: usize,
    /// sigmoid of the model's relevance logit (P(yes) for Qwen3 rerankers), in 0-1.
    pub relevance_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentText>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApiVersion {
    pub version: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BilledUnits {
    pub search_units: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Meta {
    pub api_version: ApiVersion,
    pub billed_units: BilledUnits,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens of all (query, document) sequences after truncation.
    pub total_tokens: usize,
    pub prompt_tokens: usize,
}

/// Statistics of GRATING's work on this request (an extension of the Cohere shape).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GratingStats {
    pub candidates: usize,
    pub candidate_layers_computed: u64,
    pub candidate_layers_full: u64,
    /// Percent of candidate-layers that pruning saved.
    pub saved_percent: f64,
}

/// The Cohere/Jina rerank response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CohereResponse {
    /// The request id (also in the `x-request-id` header).
    pub id: String,
    pub model: String,
    /// Best first.
    pub results: Vec<CohereResult>,
    pub meta: Meta,
    pub usage: Usage,
    pub grating: GratingStats,
}

/// Which end of a document TEI's `truncate` cuts.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema, Default)]
pub enum TruncationDirection {
    #[default]
    #[serde(alias = "right", alias = "RIGHT")]
    Right,
    #[serde(alias = "left", alias = "LEFT")]
    Left,
}

/// The Hugging Face TEI rerank request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TeiRequest {
    pub query: String,
    pub texts: Vec<String>,
    /// Return raw logits instead of sigmoid scores (default false).
    #[serde(default)]
    pub raw_scores: bool,
    /// Include each text in its result (default false).
    #[serde(default)]
    pub return_text: bool,
    /// Cut texts longer than the limit (default true); false makes an over-long text a 413.
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// grating extension: K for pruning; without it every text is scored (TEI's behaviour);
    /// 0 is refused (422).
    #[serde(default)]
    pub top_n: Option<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TeiResult {
    pub index: usize,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Limits {
    pub max_documents: usize,
    pub max_tokens_per_doc: usize,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout_seconds: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    pub model: String,
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub max_length: usize,
    /// What the raw score is: `logit` or `yes_no_logit`.
    pub score_kind: String,
    /// Execution mode: `grating` (monolithic forwarding with pruning).
    pub mode: String,
    pub pruning: String,
    pub layer_sharing: bool,
    /// Queue order of layer steps: `least-attained`, `shortest-remaining`,
    /// `shortest-unpruned-remaining`, `shortest-remaining-aligned`, `shortest-unpruned-aligned`,
    /// `most-shared`, or a
    /// comma-separated list that steps take in turn.
    #[schema(value_type = String)]
    pub queue_order: crate::engine::scheduler::QueueOrder,
    pub step_tokens: usize,
    /// Layers the scheduler keeps built between steps.
    pub cached_layers: usize,
    /// Steps a request may be passed over before it goes first.
    pub starve_after_steps: u32,
    pub chunk_tokens: usize,
    /// Where layer weights come from at each step: `resident`, `stream` or `reload`.
    pub weights: String,
    pub limits: Limits,
    pub auth: bool,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}
