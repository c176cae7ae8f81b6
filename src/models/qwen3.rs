//! Qwen3 rerankers: `Qwen3ForCausalLM` checkpoints used as Qwen3-Reranker-0.6B/4B/8B (score =
//! logit(yes) - logit(no) at the last token), and `Qwen3ForSequenceClassification` conversions
//! (a `score` head at the last token). Pre-norm decoder layers with GQA, per-head q/k RMSNorm,
//! rotary embeddings and a causal mask; packed sequences need no padding mask.
//!
//! Mirrors transformers' `models/qwen3/modeling_qwen3.py`. Only the two LM-head rows the score
//! needs are kept, so the 151k x hidden head never becomes resident.

use super::{
    check_labels, gather_rows, head_labels, parse_config, relevance_logits, LayerBlock,
    LoadOptions, ModelInfo, PackedBatch, RerankModel, ScoreKind,
};
use crate::error::{GratingError, Result};
use crate::ops::{self, AttentionShape, RopeTable};
use crate::weights::{EmbeddingTable, TensorSource};
use candle_core::Tensor;
use serde::Deserialize;
use std::sync::Arc;

/// config.json of a Qwen3 model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_act() -> String {
    "silu".into()
}

/// The published Qwen3-Reranker template's default maximum length.
pub const DEFAULT_MAX_LENGTH: usize = 8192;

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn validate(&self) -> Result<()> {
        if self.hidden_act != "silu" {
            return Err(GratingError::Config(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                self.hidden_act
            )));
        }
        if let Some(s) = &self.rope_scaling {
            if !s.is_null() {
                return Err(GratingError::Config(format!(
                    "rope_scaling {s} is not supported"
                )));
            }
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0
        {
            return Err(GratingError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(GratingError::Config(
                "head_dim must be even for RoPE".into(),
            ));
        }
        Ok(())
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim(),
            causal: true,
        }
    }
}

struct DecoderLayer {
    input_norm: Tensor,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    q_norm: Tensor,
    k_norm: Tensor,
    o_w: Tensor,
    post_norm: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    shape: AttentionShape,
    inter: usize,
    eps: f64,
    rope: Arc<RopeTable>,
    span: tracing::Span,
}

impl DecoderLayer {
    fn load(
        src: &dyn TensorSource,
        prefix: &str,
        cfg: &Config,
        rope: Arc<RopeTable>,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let dh = cfg.head_dim();
        let hq = cfg.num_attention_heads * dh;
        let hkv = cfg.num_key_value_heads * dh;
        let i = cfg.intermediate_size;
        let g = |n: &str, shape: &[usize]| src.get(&format!("{prefix}{n}"), shape);
        let qkv_w = Tensor::cat(
            &[
                g("self_attn.q_proj.weight", &[hq, d])?,
                g("self_attn.k_proj.weight", &[hkv, d])?,
                g("self_attn.v_proj.weight", &[hkv, d])?,
            ],
            0,
        )?;
        let qkv_b = if cfg.attention_bias {
            Some(Tensor::cat(
                &[
                    g("self_attn.q_proj.bias", &[hq])?,
                    g("self_attn.k_proj.bias", &[hkv])?,
                    g("self_attn.v_proj.bias", &[hkv])?,
                ],
                0,
            )?)
        } else {
            None
        };
        let gate_up_w = Tensor::cat(
            &[
                g("mlp.gate_proj.weight", &[i, d])?,
                g("mlp.up_proj.weight", &[i, d])?,
            ],
            0,
        )?;
        Ok(DecoderLayer {
            input_norm: g("input_layernorm.weight", &[d])?,
            qkv_w,
            qkv_b,
            q_norm: g("self_attn.q_norm.weight", &[dh])?,
            k_norm: g("self_attn.k_norm.weight", &[dh])?,
            o_w: g("self_attn.o_proj.weight", &[d, hq])?,
            post_norm: g("post_attention_layernorm.weight", &[d])?,
            gate_up_w,
            down_w: g("mlp.down_proj.weight", &[d, i])?,
            shape: cfg.attention_shape(),
            inter: i,
            eps: cfg.rms_norm_eps,
            rope,
            span: tracing::debug_span!("decoder_layer", prefix),
        })
    }
}

impl LayerBlock for DecoderLayer {
    fn forward(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Tensor> {
        let _enter = self.span.enter();
        ops::profile::begin(hidden);
        let (x, _) = ops::add_rms_norm(hidden, None, &self.input_norm, self.eps)?;
        ops::profile::mark("norm", &x);
        let qkv = ops::linear_qk_norm_rope(
            &x,
            &self.qkv_w,
            self.qkv_b.as_ref(),
            self.shape,
            &self.q_norm,
            &self.k_norm,
            self.eps,
            &batch.layout,
            &self.rope,
        )?;
        drop(x);
        ops::profile::mark("rope", &qkv);
        let ctx = ops::attention(&qkv, &batch.layout, self.shape)?;
        drop(qkv);
        ops::profile::mark("attention", &ctx);
        let attn = ops::linear(&ctx, &self.o_w, None)?;
        drop(ctx);
        ops::profile::mark("o_proj", &attn);
        let (x, h1) = ops::add_rms_norm(&attn, Some(hidden), &self.post_norm, self.eps)?;
        drop(attn);
        ops::profile::mark("norm", &x);
        let gate_up = ops::linear(&x, &self.gate_up_w, None)?;
        ops::profile::mark("gate_up", &gate_up);
        let act = ops::silu_mul(&gate_up, self.inter)?;
        drop(gate_up);
        drop(x);
        ops::profile::mark("silu_mul", &act);
        let down = ops::linear(&act, &self.down_w, None)?;
        ops::profile::mark("down", &down);
        let out = (down + h1)?;
        ops::profile::mark("residual", &out);
        Ok(out)
    }
}

/// Final norm then a `[labels, hidden]` projection of the last token.
struct LastTokenHead {
    norm: Tensor,
    proj: Tensor,
    eps: f64,
}

pub struct Qwen3Reranker {
    cfg: Config,
    info: ModelInfo,
    prefix: String,
    embed_tokens: EmbeddingTable,
    layers: Vec<Arc<dyn LayerBlock>>,
    head: LastTokenHead,
    rope: Arc<RopeTable>,
}

impl Qwen3Reranker {
    pub fn load(
        config_text: &str,
        architecture: &str,
        src: &dyn TensorSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg: Config = parse_config(config_text)?;
        cfg.validate()?;
        let d = cfg.hidden_size;
        let prefix = if src.contains("model.embed_tokens.weight") {
            "model."
        } else {
            ""
        }
        .to_string();
        let embed_name = format!("{prefix}embed_tokens.weight");
        let embed_tokens = src.embedding(&embed_name, &[cfg.vocab_size, d])?;
        let norm = src.get(&format!("{prefix}norm.weight"), &[d])?;
        let (proj, score_kind) = if architecture == "Qwen3ForSequenceClassification" {
            let labels = head_labels(src, "score.weight")?;
            check_labels(labels)?;
            (src.get("score.weight", &[labels, d])?, ScoreKind::Logit)
        } else {
            let (yes, no) = opts.yes_no_ids.ok_or_else(|| {
                GratingError::Tokenizer(
                    "the tokenizer has no single tokens \"yes\" and \"no\", which the Qwen3-Reranker head reads"
                        .into(),
                )
            })?;
            for id in [yes, no] {
                if id as usize >= cfg.vocab_size {
                    return Err(GratingError::Tokenizer(format!(
                        "yes/no token id {id} outside the vocabulary of {}",
                        cfg.vocab_size
                    )));
                }
            }
            // Only the "yes" and "no" rows of the LM head are ever needed.
            let head_name = if src.contains("lm_head.weight") && !cfg.tie_word_embeddings {
                "lm_head.weight".to_string()
            } else {
                embed_name.clone()
            };
            (
                src.rows(&head_name, &[cfg.vocab_size, d], &[yes, no])?,
                ScoreKind::YesNoLogit,
            )
        };
        let max_length = cfg.max_position_embeddings.min(DEFAULT_MAX_LENGTH);
        let rope = Arc::new(RopeTable::new(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.max_position_embeddings.min(crate::HARD_MAX_TOKENS),
        ));
        let dh = cfg.head_dim();
        let info = ModelInfo {
            architecture: architecture.to_string(),
            num_layers: cfg.num_hidden_layers,
            hidden_size: d,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: dh,
            intermediate_size: cfg.intermediate_size,
            vocab_size: cfg.vocab_size,
            max_length,
            score_kind,
            linear_params_per_layer: d
                * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
                * dh
                + cfg.num_attention_heads * dh * d
                + 3 * d * cfg.intermediate_size,
            causal: true,
        };
        let mut model = Qwen3Reranker {
            head: LastTokenHead {
                norm,
                proj,
                eps: cfg.rms_norm_eps,
            },
            cfg,
            info,
            prefix,
            embed_tokens,
            layers: Vec::new(),
            rope,
        };
        if opts.resident_layers {
            for i in 0..model.info.num_layers {
                let l = model.load_layer(i, src)?;
                model.layers.push(l);
            }
        }
        Ok(model)
    }
}

impl RerankModel for Qwen3Reranker {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, batch: &PackedBatch) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = batch.input_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(GratingError::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        let longest = batch.layout.max_len();
        if longest > self.rope.max_positions() {
            return Err(GratingError::LimitExceeded(format!(
                "sequence of {longest} tokens exceeds the model's {} positions",
                self.rope.max_positions()
            )));
        }
        self.embed_tokens.lookup(&batch.input_ids)
    }

    fn layer(&self, i: usize) -> Result<Arc<dyn LayerBlock>> {
        self.layers.get(i).cloned().ok_or_else(|| {
            GratingError::InvalidInput(format!("layer {i} is not resident in this model"))
        })
    }

    fn load_layer(&self, i: usize, src: &dyn TensorSource) -> Result<Arc<dyn LayerBlock>> {
        Ok(Arc::new(DecoderLayer::load(
            src,
            &self.layer_prefix(i),
            &self.cfg,
            self.rope.clone(),
        )?))
    }

    fn layer_prefix(&self, i: usize) -> String {
        format!("{}layers.{i}.", self.prefix)
    }

    fn score(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Vec<f32>> {
        let last = gather_rows(hidden, &batch.last_rows())?;
        let (normed, _) = ops::add_rms_norm(&last, None, &self.head.norm, self.head.eps)?;
        let out = ops::linear(&normed, &self.head.proj, None)?;
        match self.info.score_kind {
            ScoreKind::YesNoLogit => {
                let rows: Vec<Vec<f32>> = out
                    .to_dtype(candle_core::DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?
                    .to_vec2()?;
                Ok(rows.into_iter().map(|r| r[0] - r[1]).collect())
            }
            ScoreKind::Logit => relevance_logits(&out),
        }
    }
}
