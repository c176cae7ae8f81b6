//! Request and response shapes of the ecosystem's rerank APIs: Cohere/Jina, Hugging Face TEI,
//! and what Infinity, vLLM and LocalAI accept, at every rerank path. Unknown fields are
//! ignored, so clients that send more (`max_chunks_per_doc`, `user`) work unchanged.

use super::lenient;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A document: a plain string, or an object (Cohere v2, Jina): ranked by its `text` field, or
/// by the fields `rank_fields` names.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DocumentInput {
    Text(String),
    Object(DocumentObject),
}

/// A document as a JSON object (its fields as sent).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = Object)]
pub struct DocumentObject(pub serde_json::Map<String, serde_json::Value>);

/// A rerank request in any of the shapes clients send, to any rerank path: Cohere/Jina
/// (`documents`, `top_n`, `return_documents`) or Hugging Face TEI (`texts`, `raw_scores`,
/// `return_text`, `truncate`, `truncation_direction`). The answer takes the shape the body
/// asked for: a Cohere/Jina object for `documents`, TEI's bare array for `texts`. Unknown
/// fields are ignored; booleans may come as `"true"`/`"false"` and counts as whole floats.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RerankRequest {
    /// Accepted for compatibility; the server runs the model it was started with.
    #[serde(default)]
    pub model: Option<String>,
    /// Not empty, nor only spaces (400 `empty_input`).
    #[schema(min_length = 1)]
    pub query: String,
    /// Cohere/Jina: strings or objects. Exactly one of `documents` and `texts` is required,
    /// with at least one document.
    #[serde(default)]
    #[schema(min_items = 1)]
    pub documents: Option<Vec<DocumentInput>>,
    /// TEI: strings.
    #[serde(default)]
    #[schema(min_items = 1)]
    pub texts: Option<Vec<String>>,
    /// K: how many results to return, best first. It is the K that pruning works against;
    /// without it every document is scored and returned; 0 is refused (422).
    #[serde(default, deserialize_with = "lenient::opt_count")]
    #[schema(value_type = Option<u32>)]
    pub top_n: Option<usize>,
    /// Object documents: rank by these fields, joined as `field: value` lines in this order
    /// (default: the `text` field).
    #[serde(default)]
    pub rank_fields: Option<Vec<String>>,
    /// Include each document in its result as it was sent (default false).
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    #[schema(value_type = Option<bool>)]
    pub return_documents: Option<bool>,
    /// TEI's name for `return_documents`.
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    #[schema(value_type = Option<bool>)]
    pub return_text: Option<bool>,
    /// Scores as the model's raw logits instead of sigmoid scores in 0-1 (default false).
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    #[schema(value_type = Option<bool>)]
    pub raw_scores: Option<bool>,
    /// Cut each document to this many tokens (at most the server's per-document limit).
    #[serde(default, deserialize_with = "lenient::opt_count")]
    #[schema(value_type = Option<u32>)]
    pub max_tokens_per_doc: Option<usize>,
    /// Cut over-long documents (default true); false makes an over-long document a 413.
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    #[schema(value_type = Option<bool>)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// Instruction-following (decoder) rerankers such as Qwen3-Reranker: the prompt's
    /// `<Instruct>` line for this request (default: the model's). Cross-encoders have no such
    /// line and ignore it.
    #[serde(default)]
    pub instruction: Option<String>,
    /// Skip pruning for this request: every candidate runs every layer, so the answer equals
    /// full inference (default false).
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    #[schema(value_type = Option<bool>)]
    pub exact: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CohereResult {
    /// Position of the document in the request's `documents`.
    pub index: usize,
    /// The model's calibrated probability of relevance when it has a calibration, else the
    /// sigmoid of its relevance logit (P(yes) for Qwen3 rerankers), in 0-1; the logit itself
    /// with `raw_scores`.
    pub relevance_score: f32,
    /// The document as sent (a string comes back as `{"text": ...}`), with `return_documents`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub document: Option<serde_json::Value>,
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

/// The answer, in the shape the request asked for.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum RerankResponse {
    /// For a body with `documents`.
    Cohere(CohereResponse),
    /// For a body with `texts`: TEI's bare array, best first.
    Tei(Vec<TeiResult>),
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

/// The served model's name, also echoed as `model` in rerank answers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    pub model: String,
    /// The server's self-calibration of pruning, when on: measured agreement with full
    /// inference on re-run samples, its interval, the sample count and the current margin.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub calibration: Option<crate::prune::online::Snapshot>,
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub max_length: usize,
    /// What the raw score is: `logit` or `yes_no_logit`.
    pub score_kind: String,
    /// What `relevance_score`/`score` is: `calibrated` (the model's Platt calibration, a
    /// probability of relevance fitted on judged data) or `sigmoid` (of the raw score).
    pub scores: String,
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
    /// TEI's fields, beside ours, for clients that check them (Dify's TEI plugin reads
    /// `model_type.reranker` before it adds the provider).
    #[serde(flatten)]
    pub tei: TeiInfo,
}

/// The fields of TEI's `/info` that clients read.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TeiInfo {
    /// The served model's name (as `model`).
    pub model_id: String,
    pub model_sha: Option<String>,
    /// The compute dtype: `float32`, `float16` or `bfloat16`.
    pub model_dtype: String,
    pub model_type: TeiModelType,
    pub max_concurrent_requests: usize,
    /// Most tokens of one (query, document) sequence.
    pub max_input_length: usize,
    /// Tokens one layer step computes across requests.
    pub max_batch_tokens: usize,
    /// Most documents in one request.
    pub max_client_batch_size: usize,
    pub tokenization_workers: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TeiModelType {
    pub reranker: TeiClassifier,
}

/// The one relevance label a cross-encoder scores.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TeiClassifier {
    pub id2label: std::collections::BTreeMap<String, String>,
    pub label2id: std::collections::BTreeMap<String, usize>,
}

impl TeiClassifier {
    pub fn single_label() -> TeiClassifier {
        TeiClassifier {
            id2label: [("0".to_string(), "LABEL_0".to_string())].into(),
            label2id: [("LABEL_0".to_string(), 0)].into(),
        }
    }
}

/// `GET /v1/models`, the OpenAI list shape: the one model this server serves.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    /// The served model's name (what rerank answers echo as `model`).
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// When the server started, in Unix seconds.
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}
