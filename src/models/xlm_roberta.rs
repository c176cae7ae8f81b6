//! XLM-RoBERTa cross-encoders (`XLMRobertaForSequenceClassification`: BAAI/bge-reranker-base,
//! -large, -v2-m3; also plain RoBERTa): the BERT encoder with RoBERTa's position ids (counted
//! from `pad_token_id + 1`) and a `classifier.dense` + tanh + `classifier.out_proj` head.
//!
//! Mirrors transformers' `models/xlm_roberta/modeling_xlm_roberta.py`.

use super::bert::{encoder_linear_params, ClsHead, Embeddings, EncoderLayer};
use super::{parse_config, LayerBlock, LoadOptions, ModelInfo, PackedBatch, RerankModel, ScoreKind};
use crate::error::{GratingError, Result};
use crate::weights::TensorSource;
use candle_core::Tensor;
use serde::Deserialize;
use std::sync::Arc;

/// config.json of an XLM-R model; the encoder fields are BERT's.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub encoder: super::bert::Config,
}

impl Config {
    /// RoBERTa positions start after the padding index.
    fn position_offset(&self) -> usize {
        self.encoder.pad_token_id + 1
    }
}

pub struct XlmRobertaReranker {
    cfg: Config,
    info: ModelInfo,
    prefix: String,
    embeddings: Embeddings,
    layers: Vec<Arc<dyn LayerBlock>>,
    head: ClsHead,
}

impl XlmRobertaReranker {
    pub fn load(config_text: &str, src: &dyn TensorSource, opts: &LoadOptions) -> Result<Self> {
        let cfg: Config = parse_config(config_text)?;
        cfg.encoder.validate()?;
        let prefix = if src.contains("roberta.embeddings.word_embeddings.weight") {
            "roberta."
        } else {
            ""
        }
        .to_string();
        let offset = cfg.position_offset();
        if cfg.encoder.max_position_embeddings <= offset {
            return Err(GratingError::Config(format!(
                "max_position_embeddings {} leaves no positions after pad_token_id {}",
                cfg.encoder.max_position_embeddings, cfg.encoder.pad_token_id
            )));
        }
        let embeddings = Embeddings::load(src, &format!("{prefix}embeddings."), &cfg.encoder, offset)?;
        let head = ClsHead::load(
            src,
            "classifier.dense",
            "classifier.out_proj",
            cfg.encoder.hidden_size,
        )?;
        let e = &cfg.encoder;
        let info = ModelInfo {
            architecture: "XLMRobertaForSequenceClassification".into(),
            num_layers: e.num_hidden_layers,
            hidden_size: e.hidden_size,
            num_heads: e.num_attention_heads,
            num_kv_heads: e.num_attention_heads,
            head_dim: e.hidden_size / e.num_attention_heads,
            intermediate_size: e.intermediate_size,
            vocab_size: e.vocab_size,
            max_length: e.max_position_embeddings - offset,
            score_kind: ScoreKind::Logit,
            linear_params_per_layer: encoder_linear_params(e),
            causal: false,
        };
        let mut model = XlmRobertaReranker {
            cfg,
            info,
            prefix,
            embeddings,
            layers: Vec::new(),
            head,
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

impl RerankModel for XlmRobertaReranker {
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
            &self.cfg.encoder,
        )?))
    }

    fn layer_prefix(&self, i: usize) -> String {
        format!("{}encoder.layer.{i}.", self.prefix)
    }

    fn score(&self, hidden: &Tensor, batch: &PackedBatch) -> Result<Vec<f32>> {
        self.head.forward(hidden, batch)
    }
}
