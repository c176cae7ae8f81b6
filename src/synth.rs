//! Random-weight checkpoints with the real configurations of published rerankers, for speed
//! and memory measurements at real shapes without downloading weights. The weights come from
//! a fixed seed and carry no ranking ability: never use them for quality.

use crate::error::{GratingError, Result};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Published model shapes `synth-model --like` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Qwen3Reranker0_6B,
    Qwen3Reranker4B,
    Qwen3Reranker8B,
    BgeRerankerV2M3,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "qwen3-reranker-0.6b" => Shape::Qwen3Reranker0_6B,
            "qwen3-reranker-4b" => Shape::Qwen3Reranker4B,
            "qwen3-reranker-8b" => Shape::Qwen3Reranker8B,
            "bge-reranker-v2-m3" => Shape::BgeRerankerV2M3,
            _ => {
                return Err(format!(
                "unknown shape {s:?} (qwen3-reranker-0.6b, qwen3-reranker-4b, qwen3-reranker-8b, bge-reranker-v2-m3)"
            ))
            }
        })
    }
}

impl Shape {
    /// config.json as the published checkpoint has it (fields the engine reads).
    pub fn config(self) -> serde_json::Value {
        let qwen3 = |hidden: usize, inter: usize, layers: usize, heads: usize, tie: bool| {
            serde_json::json!({
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                "vocab_size": 151669,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "rope_scaling": null,
                "tie_word_embeddings": tie,
                "attention_bias": false,
                "hidden_act": "silu",
                "torch_dtype": "bfloat16",
            })
        };
        match self {
            Shape::Qwen3Reranker0_6B => qwen3(1024, 3072, 28, 16, true),
            Shape::Qwen3Reranker4B => qwen3(2560, 9728, 36, 32, true),
            Shape::Qwen3Reranker8B => qwen3(4096, 12288, 36, 32, false),
            Shape::BgeRerankerV2M3 => serde_json::json!({
                "architectures": ["XLMRobertaForSequenceClassification"],
                "model_type": "xlm-roberta",
                "vocab_size": 250002,
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "intermediate_size": 4096,
                "hidden_act": "gelu",
                "max_position_embeddings": 8194,
                "type_vocab_size": 1,
                "layer_norm_eps": 1e-5,
                "pad_token_id": 1,
                "position_embedding_type": "absolute",
                "id2label": {"0": "LABEL_0"},
                "torch_dtype": "float32",
            }),
        }
    }

    /// Every tensor of the checkpoint: name, shape, and whether it is a norm weight (ones).
    pub fn tensors(self) -> Vec<(String, Vec<usize>, bool)> {
        let cfg = self.config();
        let u = |k: &str| cfg[k].as_u64().expect("config field") as usize;
        let mut t = Vec::new();
        match self {
            Shape::BgeRerankerV2M3 => {
                let (d, i, v) = (u("hidden_size"), u("intermediate_size"), u("vocab_size"));
                let p = "roberta.";
                t.push((
                    format!("{p}embeddings.word_embeddings.weight"),
                    vec![v, d],
                    false,
                ));
                t.push((
                    format!("{p}embeddings.position_embeddings.weight"),
                    vec![u("max_position_embeddings"), d],
                    false,
                ));
                t.push((
                    format!("{p}embeddings.token_type_embeddings.weight"),
                    vec![1, d],
                    false,
                ));
                t.push((format!("{p}embeddings.LayerNorm.weight"), vec![d], true));
                t.push((format!("{p}embeddings.LayerNorm.bias"), vec![d], false));
                for l in 0..u("num_hidden_layers") {
                    let q = format!("{p}encoder.layer.{l}.");
                    for n in ["query", "key", "value"] {
                        t.push((format!("{q}attention.self.{n}.weight"), vec![d, d], false));
                        t.push((format!("{q}attention.self.{n}.bias"), vec![d], false));
                    }
                    t.push((
                        format!("{q}attention.output.dense.weight"),
                        vec![d, d],
                        false,
                    ));
                    t.push((format!("{q}attention.output.dense.bias"), vec![d], false));
                    t.push((
                        format!("{q}attention.output.LayerNorm.weight"),
                        vec![d],
                        true,
                    ));
                    t.push((
                        format!("{q}attention.output.LayerNorm.bias"),
                        vec![d],
                        false,
                    ));
                    t.push((format!("{q}intermediate.dense.weight"), vec![i, d], false));
                    t.push((format!("{q}intermediate.dense.bias"), vec![i], false));
                    t.push((format!("{q}output.dense.weight"), vec![d, i], false));
                    t.push((format!("{q}output.dense.bias"), vec![d], false));
                    t.push((format!("{q}output.LayerNorm.weight"), vec![d], true));
                    t.push((format!("{q}output.LayerNorm.bias"), vec![d], false));
                }
                t.push(("classifier.dense.weight".into(), vec![d, d], false));
                t.push(("classifier.dense.bias".into(), vec![d], false));
                t.push(("classifier.out_proj.weight".into(), vec![1, d], false));
                t.push(("classifier.out_proj.bias".into(), vec![1], false));
            }
            _ => {
                let (d, i, v) = (u("hidden_size"), u("intermediate_size"), u("vocab_size"));
                let dh = u("head_dim");
                let (hq, hkv) = (u("num_attention_heads") * dh, u("num_key_value_heads") * dh);
                t.push(("model.embed_tokens.weight".into(), vec![v, d], false));
                for l in 0..u("num_hidden_layers") {
                    let p = format!("model.layers.{l}.");
                    t.push((format!("{p}input_layernorm.weight"), vec![d], true));
                    t.push((format!("{p}self_attn.q_proj.weight"), vec![hq, d], false));
                    t.push((format!("{p}self_attn.k_proj.weight"), vec![hkv, d], false));
                    t.push((format!("{p}self_attn.v_proj.weight"), vec![hkv, d], false));
                    t.push((format!("{p}self_attn.o_proj.weight"), vec![d, hq], false));
                    t.push((format!("{p}self_attn.q_norm.weight"), vec![dh], true));
                    t.push((format!("{p}self_attn.k_norm.weight"), vec![dh], true));
                    t.push((format!("{p}post_attention_layernorm.weight"), vec![d], true));
                    t.push((format!("{p}mlp.gate_proj.weight"), vec![i, d], false));
                    t.push((format!("{p}mlp.up_proj.weight"), vec![i, d], false));
                    t.push((format!("{p}mlp.down_proj.weight"), vec![d, i], false));
                }
                t.push(("model.norm.weight".into(), vec![d], true));
                if !cfg["tie_word_embeddings"].as_bool().unwrap_or(false) {
                    t.push(("lm_head.weight".into(), vec![v, d], false));
                }
            }
        }
        t
    }

    pub fn is_qwen3(self) -> bool {
        !matches!(self, Shape::BgeRerankerV2M3)
    }
}

/// On-disk dtype of synthetic weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    F16,
    Bf16,
    F32,
}

impl std::str::FromStr for DiskDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(DiskDtype::F16),
            "bf16" => Ok(DiskDtype::Bf16),
            "f32" => Ok(DiskDtype::F32),
            _ => Err(format!("unknown dtype {s:?} (f16, bf16, f32)")),
        }
    }
}

impl From<DiskDtype> for candle_core::DType {
    fn from(d: DiskDtype) -> candle_core::DType {
        match d {
            DiskDtype::F16 => candle_core::DType::F16,
            DiskDtype::Bf16 => candle_core::DType::BF16,
            DiskDtype::F32 => candle_core::DType::F32,
        }
    }
}

/// A tensor whose bytes are generated when the writer asks for them, so a multi-GB checkpoint
/// is written with one tensor in memory at a time.
struct LazyTensor {
    shape: Vec<usize>,
    dtype: DiskDtype,
    seed: u64,
    ones: bool,
}

impl LazyTensor {
    fn values(&self) -> impl Iterator<Item = f32> + '_ {
        let n: usize = self.shape.iter().product();
        let mut s = self.seed | 1;
        (0..n).map(move |_| {
            if self.ones {
                return 1.0;
            }
            // xorshift64*, mapped to a symmetric distribution of std ~0.02.
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let u = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (u - 0.5) * 0.0693 // uniform with std 0.02
        })
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            DiskDtype::F16 => Dtype::F16,
            DiskDtype::Bf16 => Dtype::BF16,
            DiskDtype::F32 => Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut out = Vec::with_capacity(self.data_len());
        match self.dtype {
            DiskDtype::F16 => self
                .values()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
            DiskDtype::Bf16 => self
                .values()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
            DiskDtype::F32 => self
                .values()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n * match self.dtype {
            DiskDtype::F16 | DiskDtype::Bf16 => 2,
            DiskDtype::F32 => 4,
        }
    }
}

/// Writes config.json, model.safetensors and tokenizer.json (copied from `tokenizer`) to `out`.
pub fn write_model(
    shape: Shape,
    dtype: DiskDtype,
    seed: u64,
    tokenizer: &Path,
    out: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    if !tokenizer.is_file() {
        return Err(GratingError::InvalidInput(format!(
            "tokenizer {} not found",
            tokenizer.display()
        )));
    }
    std::fs::copy(tokenizer, out.join("tokenizer.json"))?;
    let cfg = serde_json::to_string_pretty(&shape.config()).expect("config serialises");
    std::fs::write(out.join("config.json"), cfg)?;
    let tensors: Vec<(String, LazyTensor)> = shape
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, ones))| {
            let t = LazyTensor {
                shape,
                dtype,
                seed: seed
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(i as u64 * 0x1000_0001),
                ones,
            };
            (name, t)
        })
        .collect();
    let path = out.join("model.safetensors");
    safetensors::serialize_to_file(tensors, None, &path).map_err(|e| GratingError::WeightFile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(path)
}

/// Copies a model directory with its weights converted to `dtype` (all floating tensors), e.g.
/// an f16 copy half the size for carrying to another machine. Config and tokenizer files are
/// copied as they are.
pub fn convert(src_dir: &Path, out: &Path, dtype: DiskDtype) -> Result<PathBuf> {
    use crate::weights::{ModelFiles, WeightIndex};
    use candle_core::DType;
    let files = ModelFiles::from_dir(src_dir)?;
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(src_dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_file() && !name.ends_with(".safetensors") && name != "model.safetensors.index.json"
        {
            std::fs::copy(&p, out.join(name))?;
        }
    }
    let index = WeightIndex::open(&files.weights)?;
    index.check_complete()?;
    let target = DType::from(dtype);
    let mut tensors = std::collections::HashMap::new();
    for (name, e) in &index.entries {
        let f = std::fs::File::open(&index.files[e.file])?;
        let mut buf = vec![0u8; e.byte_len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, e.start)?;
        let t = candle_core::Tensor::from_raw_buffer(
            &buf,
            e.dtype,
            &e.shape,
            &candle_core::Device::Cpu,
        )?;
        let t = if e.dtype.is_float() {
            t.to_dtype(target)?
        } else {
            t
        };
        tensors.insert(name.clone(), t);
    }
    let path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(path)
}
