//! Model files, one per architecture, behind a layer-wise API: `embed`, one `layer` at a time,
//! and a `score` head that works on the output of any layer. The engine decides the order in
//! which layers and candidates run; the model files only know the math and tensor names.

pub mod bert;
pub mod qwen3;
pub mod xlm_roberta;

use crate::error::{GratingError, Result};
use crate::ops::SeqLayout;
use crate::weights::{ModelFiles, TensorSource};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::sync::Arc;

/// Token ids of several sequences laid end to end (no padding), with their layout.
#[derive(Debug, Clone)]
pub struct PackedBatch {
    pub input_ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Spans and per-token positions.
    pub layout: SeqLayout,
}

impl PackedBatch {
    pub fn new<'a>(seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> PackedBatch {
        let (mut input_ids, mut type_ids, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for (ids, types) in seqs {
            spans.push((input_ids.len(), ids.len()));
            input_ids.extend_from_slice(ids);
            if types.len() == ids.len() {
                type_ids.extend_from_slice(types);
            } else {
                type_ids.extend(std::iter::repeat_n(0, ids.len()));
            }
        }
        PackedBatch {
            input_ids,
            type_ids,
            layout: SeqLayout::new(spans),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Row of the first token of each sequence (the CLS row of encoders).
    pub fn first_rows(&self) -> Vec<u32> {
        self.layout.spans.iter().map(|(s, _)| *s as u32).collect()
    }

    /// Row of the last token of each sequence (what a decoder's head reads).
    pub fn last_rows(&self) -> Vec<u32> {
        self.layout
            .spans
            .iter()
            .map(|(s, l)| (s + l - 1) as u32)
            .collect()
    }
}

/// What an architecture's score means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// A relevance logit from a classification head; `sigmoid` gives a 0-1 score.
    Logit,
    /// logit(yes) - logit(no) of a causal LM; `sigmoid` gives P(yes).
    YesNoLogit,
}

/// Shape facts the engine and the front ends need, without model internals.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Default maximum tokens per (query, document) sequence.
    pub max_length: usize,
    pub score_kind: ScoreKind,
    /// Weights of the linear layers of one transformer layer (for FLOP accounting).
    pub linear_params_per_layer: usize,
    pub causal: bool,
}

impl ModelInfo {
    /// A small encoder's shape, for unit tests that plan work without a model.
    #[cfg(test)]
    pub(crate) fn for_tests(num_layers: usize) -> ModelInfo {
        ModelInfo {
            architecture: "BertForSequenceClassification".into(),
            num_layers,
            hidden_size: 32,
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 8,
            intermediate_size: 64,
            vocab_size: 100,
            max_length: 512,
            score_kind: ScoreKind::Logit,
            linear_params_per_layer: 4 * 32 * 32 + 2 * 32 * 64,
            causal: false,
        }
    }

    /// FLOPs of one layer on one sequence of `len` tokens: the linear layers plus the two
    /// attention products (causal attention counts half).
    pub fn layer_flops(&self, len: usize) -> f64 {
        let l = len as f64;
        let lin = 2.0 * l * self.linear_params_per_layer as f64;
        let attn = 4.0 * l * l * (self.num_heads * self.head_dim) as f64;
        lin + if self.causal { attn / 2.0 } else { attn }
    }
}

/// One transformer layer with its weights, ready to run on packed hidden states.
pub trait LayerBlock: Send + Sync {
    fn forward(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Tensor>;
}

/// The layer-wise model API the engine drives.
pub trait RerankModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Token ids -> hidden states `[tokens, hidden]` of layer 0.
    fn embed(&self, batch: &PackedBatch) -> Result<Tensor>;

    /// The resident weights of layer `i` (errors if the model was loaded without them).
    fn layer(&self, i: usize) -> Result<Arc<dyn LayerBlock>>;

    /// Builds layer `i` from tensors supplied by `src` (used by weight streaming).
    fn load_layer(&self, i: usize, src: &dyn TensorSource) -> Result<Arc<dyn LayerBlock>>;

    /// The name prefix shared by all tensors of layer `i` in the checkpoint (and by no other
    /// tensor), so a streaming store can read a layer ahead without knowing the architecture.
    fn layer_prefix(&self, i: usize) -> String;

    /// The model's own head on the hidden states of any layer: one logit per sequence.
    fn score(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Vec<f32>>;

    fn num_layers(&self) -> usize {
        self.info().num_layers
    }
}

/// Supported `architectures[0]` values of config.json.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "BertForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "RobertaForSequenceClassification",
    "Qwen3ForCausalLM",
    "Qwen3ForSequenceClassification",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    XlmRoberta,
    Qwen3,
}

impl Architecture {
    /// Decoder rerankers read a chat prompt; encoders the tokenizer's pair template.
    pub fn uses_chat_prompt(self) -> bool {
        self == Architecture::Qwen3
    }
}

#[derive(Deserialize)]
struct ArchitecturesField {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
}

/// Reads `architectures` from config.json and maps it onto a model file.
pub fn detect_architecture(config_text: &str) -> Result<(Architecture, String)> {
    let f: ArchitecturesField = serde_json::from_str(config_text)
        .map_err(|e| GratingError::Config(format!("invalid JSON: {e}")))?;
    let name = match f.architectures.as_ref().and_then(|a| a.first()) {
        Some(n) => n.clone(),
        None => {
            return Err(GratingError::Config(format!(
                "no `architectures` entry (model_type {:?}); supported: {}",
                f.model_type,
                SUPPORTED_ARCHITECTURES.join(", ")
            )))
        }
    };
    let arch = match name.as_str() {
        "BertForSequenceClassification" => Architecture::Bert,
        "XLMRobertaForSequenceClassification" | "RobertaForSequenceClassification" => {
            Architecture::XlmRoberta
        }
        "Qwen3ForCausalLM" | "Qwen3ForSequenceClassification" => Architecture::Qwen3,
        _ => {
            return Err(GratingError::UnsupportedArchitecture {
                found: name,
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            })
        }
    };
    Ok((arch, name))
}

/// How a model is loaded: whether the layers are read into memory now (resident) or later, one
/// at a time, by a streaming store. (Dtype and device are the tensor source's.)
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub resident_layers: bool,
    /// Token ids of "yes" and "no" for yes/no heads, from the tokenizer.
    pub yes_no_ids: Option<(u32, u32)>,
}

/// Loads the model named by `files` with `src` supplying non-layer (and, when resident, layer)
/// tensors.
pub fn load_model(
    files: &ModelFiles,
    src: &dyn TensorSource,
    opts: &LoadOptions,
) -> Result<Arc<dyn RerankModel>> {
    let text = std::fs::read_to_string(&files.config)?;
    let (arch, name) = detect_architecture(&text)?;
    Ok(match arch {
        Architecture::Bert => Arc::new(bert::BertReranker::load(&text, src, opts)?),
        Architecture::XlmRoberta => {
            Arc::new(xlm_roberta::XlmRobertaReranker::load(&text, src, opts)?)
        }
        Architecture::Qwen3 => Arc::new(qwen3::Qwen3Reranker::load(&text, &name, src, opts)?),
    })
}

/// Parses a config.json into an architecture's `Config`, naming the file in errors.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| GratingError::Config(e.to_string()))
}

/// The number of labels of a classification head, from its weight's shape.
pub(crate) fn head_labels(src: &dyn TensorSource, name: &str) -> Result<usize> {
    match src.shape_of(name) {
        Some(s) if s.len() == 2 => Ok(s[0]),
        Some(s) => Err(GratingError::ShapeMismatch {
            name: name.into(),
            expected: vec![0, 0],
            found: s,
        }),
        None => Err(GratingError::MissingTensor { name: name.into() }),
    }
}

/// Turns a `[n, labels]` head output into one relevance logit per row: the logit itself for one
/// label, `l1 - l0` (whose sigmoid is softmax's P(label 1)) for two.
pub(crate) fn relevance_logits(out: &Tensor) -> Result<Vec<f32>> {
    let out = out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let rows: Vec<Vec<f32>> = out.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|r| if r.len() == 2 { r[1] - r[0] } else { r[0] })
        .collect())
}

pub(crate) fn check_labels(n: usize) -> Result<()> {
    if n == 1 || n == 2 {
        Ok(())
    } else {
        Err(GratingError::Config(format!(
            "classification head has {n} labels; a reranker has 1 (a relevance logit) or 2"
        )))
    }
}

/// Gathers rows `rows` of `hidden` (`[T, D]`).
pub(crate) fn gather_rows(hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let idx = crate::ops::upload_u32(rows, rows.len(), hidden.device())?;
    Ok(hidden.index_select(&idx, 0)?)
}
