//! Qwen3's q/k RMSNorm and rotary embedding on a fused qkv projection (with the projection
//! itself fused in on the CPU).

use super::{cpu, cpu_tensor, cpu_view, linear, linear::linear_cpu, profile, upload_u32};
#[cfg(feature = "cuda")]
use super::{cuda, fused_gpu};
use super::{AttentionShape, CResult, CacheKey, RopeTable, SeqLayout};
use candle_core::{Tensor, D};

/// The fused QKV projection followed by Qwen3's q/k norm and rotary embedding, done in place
/// on the CPU so the projection exists once.
#[allow(clippy::too_many_arguments)]
pub fn linear_qk_norm_rope(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    shape: AttentionShape,
    q_gamma: &Tensor,
    k_gamma: &Tensor,
    eps: f64,
    layout: &SeqLayout,
    rope: &RopeTable,
) -> CResult<Tensor> {
    let in_table = layout.max_len() <= rope.max_positions();
    if let (Some(qg), Some(kg), true) = (cpu_view(q_gamma), cpu_view(k_gamma), in_table) {
        if let Some((mut out, rows, cols)) = linear_cpu(x, w, b)? {
            if cols == shape.qkv_width() && layout.positions.len() == rows {
                cpu::qk_norm_rope(
                    &mut out,
                    shape,
                    Some(qg.slice()),
                    Some(kg.slice()),
                    eps as f32,
                    &layout.positions,
                    rope,
                );
                return cpu_tensor(out, (rows, cols));
            }
        }
    }
    let qkv = linear(x, w, b)?;
    profile::mark("qkv", &qkv);
    qk_norm_rope(qkv, shape, Some(q_gamma), Some(k_gamma), eps, layout, rope)
}

/// Qwen3's per-head q/k RMSNorm followed by rotary embedding, on a fused qkv projection
/// whose rows are laid out by `layout`.
pub fn qk_norm_rope(
    qkv: Tensor,
    shape: AttentionShape,
    q_gamma: Option<&Tensor>,
    k_gamma: Option<&Tensor>,
    eps: f64,
    layout: &SeqLayout,
    rope: &RopeTable,
) -> CResult<Tensor> {
    let (rows, width) = qkv.dims2()?;
    if layout.max_len() > rope.max_positions() {
        candle_core::bail!(
            "position {} beyond the rotary table ({})",
            layout.max_len() - 1,
            rope.max_positions()
        );
    }
    let qg = q_gamma.map(cpu_view);
    let kg = k_gamma.map(cpu_view);
    if !matches!(qg, Some(None)) && !matches!(kg, Some(None)) {
        if let Some(v) = cpu_view(&qkv) {
            let mut data = v.slice().to_vec();
            drop(v);
            cpu::qk_norm_rope(
                &mut data,
                shape,
                qg.as_ref().and_then(|g| g.as_ref().map(|g| g.slice())),
                kg.as_ref().and_then(|g| g.as_ref().map(|g| g.slice())),
                eps as f32,
                &layout.positions,
                rope,
            );
            return cpu_tensor(data, (rows, width));
        }
    }
    #[cfg(feature = "cuda")]
    if let (true, Some(qg), Some(kg)) = (fused_gpu(&qkv), q_gamma, k_gamma) {
        let dev = qkv.device();
        let (cos, sin) = rope.on_device(dev)?;
        let pos = layout
            .device_cache
            .get_or_build(dev, CacheKey::Positions, || {
                Ok(vec![upload_u32(
                    &layout.positions,
                    layout.positions.len(),
                    dev,
                )?])
            })?;
        return qkv.apply_op1_no_bwd(&cuda::QkNormRope {
            n_heads: shape.n_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            eps: eps as f32,
            cos,
            sin,
            positions: pos[0].clone(),
            q_gamma: qg.to_dtype(qkv.dtype())?,
            k_gamma: kg.to_dtype(qkv.dtype())?,
        });
    }
    qk_norm_rope_generic(&qkv, shape, q_gamma, k_gamma, eps, layout, rope)
}

fn qk_norm_rope_generic(
    qkv: &Tensor,
    shape: AttentionShape,
    q_gamma: Option<&Tensor>,
    k_gamma: Option<&Tensor>,
    eps: f64,
    layout: &SeqLayout,
    rope: &RopeTable,
) -> CResult<Tensor> {
    let rows = qkv.dim(0)?;
    let dh = shape.head_dim;
    let half = dh / 2;
    let dev = qkv.device();
    // Gathered once per layout on the device, then reused by every layer.
    let tables = layout
        .device_cache
        .get_or_build(dev, CacheKey::Rope { half }, || {
            let (cos_table, sin_table) = rope.on_device(dev)?;
            let pos = upload_u32(&layout.positions, rows, dev)?;
            Ok(vec![
                cos_table.index_select(&pos, 0)?.reshape((rows, 1, half))?,
                sin_table.index_select(&pos, 0)?.reshape((rows, 1, half))?,
            ])
        })?;
    let cos = tables[0].to_dtype(qkv.dtype())?;
    let sin = tables[1].to_dtype(qkv.dtype())?;
    let part = |off: usize, n: usize, gamma: Option<&Tensor>| -> CResult<Tensor> {
        let mut x = qkv.narrow(1, off * dh, n * dh)?.reshape((rows, n, dh))?;
        if let Some(g) = gamma {
            x = candle_nn::ops::rms_norm(&x.contiguous()?, g, eps as f32)?;
        }
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[a, b], D::Minus1)?.reshape((rows, n * dh))
    };
    let q = part(0, shape.n_heads, q_gamma)?;
    let k = part(shape.n_heads, shape.n_kv_heads, k_gamma)?;
    let v = qkv.narrow(
        1,
        (shape.n_heads + shape.n_kv_heads) * dh,
        shape.n_kv_heads * dh,
    )?;
    Tensor::cat(&[q, k, v], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_diff, rand_tensor};

    #[test]
    fn rope_fast_path_matches_generic() {
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            causal: true,
        };
        let qkv = rand_tensor(&[11, shape.qkv_width()], 9);
        let rope = RopeTable::new(8, 10000.0, 16);
        let layout = SeqLayout::new(vec![(0, 3), (3, 7), (10, 1)]);
        let qg = rand_tensor(&[8], 10);
        let kg = rand_tensor(&[8], 11);
        let fast = qk_norm_rope(
            qkv.clone(),
            shape,
            Some(&qg),
            Some(&kg),
            1e-6,
            &layout,
            &rope,
        )
        .unwrap();
        let slow =
            qk_norm_rope_generic(&qkv, shape, Some(&qg), Some(&kg), 1e-6, &layout, &rope).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-5);
    }
}
