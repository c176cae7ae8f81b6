//! BERT cross-encoders (`BertForSequenceClassification`, e.g. cross-encoder/ms-marco-MiniLM):
//! post-norm encoder layers; score = classifier(tanh(pooler(CLS))).
//!
//! Mirrors transformers' `models/bert/modeling_bert.py`. The encoder layer and embeddings here
//! are shared with the RoBERTa family (`xlm_roberta.rs`), which differs only in names, position
//! ids and head.

use super::{
    check_labels, gather_rows, head_labels, parse_config, relevance_logits, LayerBlock,
    LoadOptions, ModelInfo, PackedBatch, RerankModel, ScoreKind,
};
use crate::error::{GratingError, Result};
use crate::ops::{self, AttentionShape};
use crate::weights::{EmbeddingTable, TensorSource};
use candle_core::Tensor;
use serde::Deserialize;
use std::sync::Arc;

/// config.json of a BERT model (the fields the forward pass uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

impl Config {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.hidden_act != "gelu" {
            return Err(GratingError::Config(format!(
                "hidden_act {:?} is not supported (only \"gelu\")",
                self.hidden_act
            )));
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return Err(GratingError::Config(format!(
                    "position_embedding_type {p:?} is not supported (only \"absolute\")"
                )));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(GratingError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    pub(crate) fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_attention_heads,
            head_dim: self.hidden_size / self.num_attention_heads,
            causal: false,
        }
    }
}

/// Loads `{prefix}weight` and `{prefix}bias` of a LayerNorm, accepting the old `gamma`/`beta`
/// names some checkpoints still carry.
pub(crate) fn layer_norm_params(
    src: &dyn TensorSource,
    prefix: &str,
    d: usize,
) -> Result<(Tensor, Tensor)> {
    let pick = |new: &str, old: &str| {
        let n = format!("{prefix}{new}");
        if src.contains(&n) {
            n
        } else {
            format!("{prefix}{old}")
        }
    };
    Ok((
        src.get(&pick("weight", "gamma"), &[d])?,
        src.get(&pick("bias", "beta"), &[d])?,
    ))
}

/// Word + position + token-type embeddings, then LayerNorm.
pub(crate) struct Embeddings {
    word: EmbeddingTable,
    position: Tensor,
    token_type: Option<Tensor>,
    ln_w: Tensor,
    ln_b: Tensor,
    eps: f64,
    /// First position id (RoBERTa counts from padding_idx + 1).
    position_offset: usize,
}

impl Embeddings {
    pub(crate) fn load(
        src: &dyn TensorSource,
        prefix: &str,
        cfg: &Config,
        position_offset: usize,
    ) -> Result<Embeddings> {
        let d = cfg.hidden_size;
        let tt = format!("{prefix}token_type_embeddings.weight");
        let token_type = if src.contains(&tt) {
            Some(src.get(&tt, &[cfg.type_vocab_size, d])?)
        } else {
            None
        };
        let (ln_w, ln_b) = layer_norm_params(src, &format!("{prefix}LayerNorm."), d)?;
        Ok(Embeddings {
            word: src.embedding(
                &format!("{prefix}word_embeddings.weight"),
                &[cfg.vocab_size, d],
            )?,
            position: src.get(
                &format!("{prefix}position_embeddings.weight"),
                &[cfg.max_position_embeddings, d],
            )?,
            token_type,
            ln_w,
            ln_b,
            eps: cfg.layer_norm_eps,
            position_offset,
        })
    }

    pub(crate) fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let dev = self.position.device();
        let vocab = self.word.rows();
        if let Some(bad) = batch.input_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(GratingError::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        let max_pos = self.position.dim(0)?;
        let positions: Vec<u32> = batch
            .layout
            .positions
            .iter()
            .map(|p| p + self.position_offset as u32)
            .collect();
        if let Some(p) = positions.iter().max() {
            if *p as usize >= max_pos {
                return Err(GratingError::LimitExceeded(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    *p as usize + 1 - self.position_offset,
                    max_pos - self.position_offset
                )));
            }
        }
        let n = batch.num_tokens();
        let pos = Tensor::from_slice(&positions, n, dev)?;
        let mut x = (self.word.lookup(&batch.input_ids)? + self.position.index_select(&pos, 0)?)?;
        if let Some(tt) = &self.token_type {
            let types = Tensor::from_slice(&batch.type_ids, n, dev)?;
            x = (x + tt.index_select(&types, 0)?)?;
        }
        Ok(ops::add_layer_norm(
            &x,
            None,
            &self.ln_w,
            Some(&self.ln_b),
            self.eps,
        )?)
    }
}

/// One post-norm encoder layer with fused QKV.
pub(crate) struct EncoderLayer {
    qkv_w: Tensor,
    qkv_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln1_w: Tensor,
    ln1_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    ln2_w: Tensor,
    ln2_b: Tensor,
    shape: AttentionShape,
    eps: f64,
    span: tracing::Span,
}

impl EncoderLayer {
    pub(crate) fn load(src: &dyn TensorSource, prefix: &str, cfg: &Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let g = |n: &str, shape: &[usize]| src.get(&format!("{prefix}{n}"), shape);
        let qkv_w = Tensor::cat(
            &[
                g("attention.self.query.weight", &[d, d])?,
                g("attention.self.key.weight", &[d, d])?,
                g("attention.self.value.weight", &[d, d])?,
            ],
            0,
        )?;
        let qkv_b = Tensor::cat(
            &[
                g("attention.self.query.bias", &[d])?,
                g("attention.self.key.bias", &[d])?,
                g("attention.self.value.bias", &[d])?,
            ],
            0,
        )?;
        let (ln1_w, ln1_b) =
            layer_norm_params(src, &format!("{prefix}attention.output.LayerNorm."), d)?;
        let (ln2_w, ln2_b) = layer_norm_params(src, &format!("{prefix}output.LayerNorm."), d)?;
        Ok(EncoderLayer {
            qkv_w,
            qkv_b,
            out_w: g("attention.output.dense.weight", &[d, d])?,
            out_b: g("attention.output.dense.bias", &[d])?,
            ln1_w,
            ln1_b,
            up_w: g("intermediate.dense.weight", &[i, d])?,
            up_b: g("intermediate.dense.bias", &[i])?,
            down_w: g("output.dense.weight", &[d, i])?,
            down_b: g("output.dense.bias", &[d])?,
            ln2_w,
            ln2_b,
            shape: cfg.attention_shape(),
            eps: cfg.layer_norm_eps,
            span: tracing::debug_span!("encoder_layer", prefix),
        })
    }
}

impl LayerBlock for EncoderLayer {
    fn forward(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Tensor> {
        let _enter = self.span.enter();
        let qkv = ops::linear(hidden, &self.qkv_w, Some(&self.qkv_b))?;
        let ctx = ops::attention(&qkv, &batch.layout, self.shape)?;
        drop(qkv);
        let attn = ops::linear(&ctx, &self.out_w, Some(&self.out_b))?;
        drop(ctx);
        let h1 = ops::add_layer_norm(
            &attn,
            Some(hidden),
            &self.ln1_w,
            Some(&self.ln1_b),
            self.eps,
        )?;
        drop(attn);
        let up = ops::linear_gelu(&h1, &self.up_w, Some(&self.up_b))?;
        let down = ops::linear(&up, &self.down_w, Some(&self.down_b))?;
        drop(up);
        Ok(ops::add_layer_norm(
            &down,
            Some(&h1),
            &self.ln2_w,
            Some(&self.ln2_b),
            self.eps,
        )?)
    }
}

/// Linear params of one encoder layer (QKV, output, FFN up and down).
pub(crate) fn encoder_linear_params(cfg: &Config) -> usize {
    let d = cfg.hidden_size;
    4 * d * d + 2 * d * cfg.intermediate_size
}

/// dense + tanh then a projection to the labels, on the CLS row.
pub(crate) struct ClsHead {
    dense_w: Tensor,
    dense_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
}

impl ClsHead {
    pub(crate) fn load(
        src: &dyn TensorSource,
        dense: &str,
        out: &str,
        d: usize,
    ) -> Result<ClsHead> {
        let labels = head_labels(src, &format!("{out}.weight"))?;
        check_labels(labels)?;
        Ok(ClsHead {
            dense_w: src.get(&format!("{dense}.weight"), &[d, d])?,
            dense_b: src.get(&format!("{dense}.bias"), &[d])?,
            out_w: src.get(&format!("{out}.weight"), &[labels, d])?,
            out_b: src.get(&format!("{out}.bias"), &[labels])?,
        })
    }

    pub(crate) fn forward(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Vec<f32>> {
        let cls = gather_rows(hidden, &batch.first_rows())?;
        let pooled = ops::linear(&cls, &self.dense_w, Some(&self.dense_b))?.tanh()?;
        let out = ops::linear(&pooled, &self.out_w, Some(&self.out_b))?;
        relevance_logits(&out)
    }
}

pub struct BertReranker {
    cfg: Config,
    info: ModelInfo,
    prefix: String,
    embeddings: Embeddings,
    layers: Vec<Arc<dyn LayerBlock>>,
    head: ClsHead,
}

impl BertReranker {
    pub fn load(config_text: &str, src: &dyn TensorSource, opts: &LoadOptions) -> Result<Self> {
        let cfg: Config = parse_config(config_text)?;
        cfg.validate()?;
        // Checkpoints saved from BertForSequenceClassification carry `bert.`; bare ones do not.
        let prefix = if src.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        }
        .to_string();
        let embeddings = Embeddings::load(src, &format!("{prefix}embeddings."), &cfg, 0)?;
        let head = ClsHead::load(
            src,
            &format!("{prefix}pooler.dense"),
            "classifier",
            cfg.hidden_size,
        )?;
        let mut model = BertReranker {
            info: ModelInfo {
                architecture: "BertForSequenceClassification".into(),
                num_layers: cfg.num_hidden_layers,
                hidden_size: cfg.hidden_size,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_attention_heads,
                head_dim: cfg.hidden_size / cfg.num_attention_heads,
                intermediate_size: cfg.intermediate_size,
                vocab_size: cfg.vocab_size,
                max_length: cfg.max_position_embeddings,
                score_kind: ScoreKind::Logit,
                linear_params_per_layer: encoder_linear_params(&cfg),
                causal: false,
            },
            cfg,
            prefix,
            embeddings,
            layers: Vec::new(),
            head,
        };
        if opts.resident_layers {
            for i in 0..model.cfg.num_hidden_layers {
                let l = model.load_layer(i, src)?;
                model.layers.push(l);
            }
        }
        Ok(model)
    }
}

impl RerankModel for BertReranker {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, batch: &PackedBatch) -> Result<Tensor> {
        self.embeddings.forward(batch)
    }

    fn layer(&self, i: usize) -> Result<Arc<dyn LayerBlock>> {
        self.layers.get(i).cloned().ok_or_else(|| {
            GratingError::InvalidInput(format!("layer {i} is not resident in this model"))
        })
    }

    fn load_layer(&self, i: usize, src: &dyn TensorSource) -> Result<Arc<dyn LayerBlock>> {
        Ok(Arc::new(EncoderLayer::load(
            src,
            &self.layer_prefix(i),
            &self.cfg,
        )?))
    }

    fn layer_prefix(&self, i: usize) -> String {
        format!("{}encoder.layer.{i}.", self.prefix)
    }

    fn score(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Vec<f32>> {
        self.head.forward(hidden, batch)
    }
}
