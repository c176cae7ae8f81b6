//! The memory budget: predicts a request's peak resident memory from the model's shape and the
//! request's tokens, and picks the chunk size and hidden-state offload that keep the peak under
//! `--max-memory`, or refuses with the minimum the request needs.
//!
//! Predicted peak (bytes):
//!
//! ```text
//! peak = rss_now                               process RSS before the request (weights, caches, runtime)
//!      + W_stream                              streaming only: 2 x largest layer on disk (read buffers)
//!                                                + largest layer in compute dtype (the built layer)
//!                                                + largest tensor in compute dtype (conversion transient)
//!      + E_growth                              streaming only: embedding cache rows not yet filled x D x 4
//!      + H                                     hidden states: 2 x T x D x 4 (all chunks, x2 for repacking),
//!                                                or 4 x C x D x 4 with offload (computing in+out, writing, reading)
//!      + A(C)                                  one chunk's activations: C x a x 4, a = widest live set of
//!                                                per-token floats in a layer, + attention scratch
//!                                                threads x 128 x L_max x 4
//! ```
//! with T the request's tokens, C the chunk's tokens, D the hidden size, L_max the longest
//! sequence.

use super::layers::LayerSource;
use super::{Engine, Grouping};
use crate::error::{GratingError, Result};
use crate::models::ModelInfo;
use crate::tokenize::EncodedPair;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryPlan {
    pub chunk_tokens: usize,
    pub offload: bool,
    pub predicted_peak_bytes: u64,
}

/// Facts the prediction needs beyond the model's shape.
#[derive(Debug, Clone, Copy)]
pub struct BudgetInputs {
    pub rss_now: u64,
    /// Streaming: (largest layer on disk, largest layer in compute dtype, largest tensor in
    /// compute dtype); zero when resident.
    pub stream_bytes: (u64, u64, u64),
    pub embedding_growth: u64,
    pub threads: usize,
    pub dtype_bytes: u64,
}

/// Per-token floats alive at the widest point of a layer.
pub fn activation_floats_per_token(info: &ModelInfo) -> u64 {
    let d = info.hidden_size as u64;
    let i = info.intermediate_size as u64;
    let qkv = ((info.num_heads + 2 * info.num_kv_heads) * info.head_dim) as u64;
    let ctx = (info.num_heads * info.head_dim) as u64;
    let attn = d + 2 * qkv + ctx + d;
    let mlp = 4 * d + 3 * i;
    attn.max(mlp)
}

pub fn predict(
    info: &ModelInfo,
    inp: &BudgetInputs,
    total_tokens: usize,
    max_len: usize,
    chunk: usize,
    offload: bool,
) -> u64 {
    let d = info.hidden_size as u64;
    let b = inp.dtype_bytes;
    let (w_disk, w_built, w_tensor) = inp.stream_bytes;
    let w_stream = if w_disk > 0 {
        2 * w_disk + w_built + w_tensor
    } else {
        0
    };
    let chunk = chunk.max(max_len) as u64;
    let hidden = if offload {
        4 * chunk * d * b
    } else {
        2 * total_tokens as u64 * d * b
    };
    let act = chunk * activation_floats_per_token(info) * b
        + inp.threads as u64 * 128 * max_len as u64 * 4;
    inp.rss_now + w_stream + inp.embedding_growth + hidden + act
}

/// The largest chunk (down to one sequence) and the least offload that fit `budget`.
pub fn plan(
    info: &ModelInfo,
    inp: &BudgetInputs,
    total_tokens: usize,
    max_len: usize,
    wanted_chunk: usize,
    budget: u64,
) -> std::result::Result<MemoryPlan, u64> {
    for offload in [false, true] {
        let mut chunk = wanted_chunk.max(max_len);
        loop {
            let p = predict(info, inp, total_tokens, max_len, chunk, offload);
            if p <= budget {
                return Ok(MemoryPlan {
                    chunk_tokens: chunk,
                    offload,
                    predicted_peak_bytes: p,
                });
            }
            if chunk <= max_len {
                break;
            }
            chunk = (chunk / 2).max(max_len);
        }
    }
    Err(predict(info, inp, total_tokens, max_len, max_len, true))
}

/// Parses sizes like `512MiB`, `2GiB`, `300MB`, `1048576`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1048576.0,
        "mb" => 1e6,
        "g" | "gib" => 1073741824.0,
        "gb" => 1e9,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    Ok((v * mult) as u64)
}

/// The grouping that keeps a request on `engine` under `limit` bytes (the request's own when it
/// fits, else smaller chunks and offload), with the predicted peak in MiB; or a refusal naming
/// the minimum the request needs.
pub(crate) fn plan_request(
    engine: &Engine,
    limit: u64,
    pairs: &[EncodedPair],
    grouping: Grouping,
) -> Result<(Grouping, f64)> {
    let info = engine.model.info();
    let b = engine.dtype.size_in_bytes() as u64;
    let (stream_bytes, embedding_growth) = match &engine.source {
        LayerSource::Stream(s) => {
            let elems = |t: &crate::weights::TensorEntry| t.shape.iter().product::<usize>() as u64;
            let disk = s.plans.iter().map(|p| p.bytes as u64).max().unwrap_or(0);
            let built = s
                .plans
                .iter()
                .map(|p| p.tensors.iter().map(|(_, e)| elems(e)).sum::<u64>())
                .max()
                .unwrap_or(0)
                * b;
            let tensor = s
                .plans
                .iter()
                .flat_map(|p| p.tensors.iter().map(|(_, e)| elems(e)))
                .max()
                .unwrap_or(0)
                * b;
            let growth = (info.vocab_size as f64 * s.cache_share as f64).ceil() as u64
                * info.hidden_size as u64
                * 4;
            ((disk, built, tensor), growth)
        }
        LayerSource::Resident | LayerSource::Reload(_) => ((0, 0, 0), 0),
    };
    let inputs = BudgetInputs {
        rss_now: (crate::memory::rss_mib().unwrap_or(0.0) * 1048576.0) as u64,
        stream_bytes,
        embedding_growth,
        threads: crate::ops::threads(),
        dtype_bytes: b,
    };
    let total: usize = pairs.iter().map(EncodedPair::len).sum();
    let max_len = pairs.iter().map(EncodedPair::len).max().unwrap_or(1);
    match plan(info, &inputs, total, max_len, grouping.chunk_tokens, limit) {
        Ok(p) => Ok((
            Grouping {
                chunk_tokens: p.chunk_tokens,
                offload: p.offload || grouping.offload,
                ..grouping
            },
            p.predicted_peak_bytes as f64 / 1048576.0,
        )),
        Err(min) => Err(GratingError::MemoryBudget(format!(
            "this request needs at least {:.0} MiB ({} candidates, {total} tokens, {} weights) but the budget is {:.0} MiB",
            min as f64 / 1048576.0,
            pairs.len(),
            engine.source.name(),
            limit as f64 / 1048576.0
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ScoreKind;

    fn info() -> ModelInfo {
        ModelInfo {
            architecture: "x".into(),
            num_layers: 4,
            hidden_size: 256,
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 64,
            intermediate_size: 1024,
            vocab_size: 1000,
            max_length: 512,
            score_kind: ScoreKind::Logit,
            linear_params_per_layer: 0,
            causal: false,
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 * 1048576);
        assert_eq!(parse_size("2GiB").unwrap(), 2 * 1073741824);
        assert_eq!(parse_size("300MB").unwrap(), 300_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn plan_shrinks_chunks_then_offloads_then_refuses() {
        let inp = BudgetInputs {
            rss_now: 100 << 20,
            stream_bytes: (0, 0, 0),
            embedding_growth: 0,
            threads: 2,
            dtype_bytes: 4,
        };
        let i = info();
        // Plenty of memory: the wanted chunk.
        let p = plan(&i, &inp, 100_000, 300, 4096, 1 << 40).unwrap();
        assert_eq!((p.chunk_tokens, p.offload), (4096, false));
        // 100 MiB runtime + 195 MiB of hidden states (x2 while repacking) leave no room in
        // 290 MiB even with the smallest chunk: offload.
        let p = plan(&i, &inp, 100_000, 300, 4096, 290 << 20).unwrap();
        assert!(p.offload);
        assert!(p.predicted_peak_bytes <= 290 << 20);
        // In between, smaller chunks suffice.
        let p = plan(&i, &inp, 50_000, 300, 4096, 260 << 20).unwrap();
        assert!(!p.offload && p.chunk_tokens < 4096, "{p:?}");
        // Below the runtime itself: refused, with the minimum.
        let min = plan(&i, &inp, 100_000, 300, 4096, 50 << 20).unwrap_err();
        assert!(min > 100 << 20);
    }
}
