//! Per-sequence self-attention over packed rows: the packed CPU kernel, the tensor-core flash
//! kernel and the length-bucketed GPU kernels, and candle's generic ops over length buckets
//! for everything else.

use super::{cpu, cpu_tensor, cpu_view, upload_f32_as, upload_u32, AttentionShape, CResult};
#[cfg(feature = "cuda")]
use super::{cuda, fused_gpu, gpu_path_enabled, half_gpu, GpuPath};
use super::{CacheKey, SeqLayout};
use candle_core::{DType, Device, Tensor};

/// Per-sequence self-attention over a fused `[T, (H + 2 Hkv) * dh]` projection.
pub fn attention(qkv: &Tensor, layout: &SeqLayout, shape: AttentionShape) -> CResult<Tensor> {
    let (rows, width) = qkv.dims2()?;
    if width != shape.qkv_width() || rows != layout.total_rows() {
        candle_core::bail!(
            "attention: qkv is {rows}x{width}, expected {}x{}",
            layout.total_rows(),
            shape.qkv_width()
        );
    }
    if let Some(v) = cpu_view(qkv) {
        let mut out = vec![0f32; rows * shape.out_width()];
        cpu::attention(v.slice(), &layout.spans, shape, &mut out);
        return cpu_tensor(out, (rows, shape.out_width()));
    }
    #[cfg(feature = "cuda")]
    if fused_gpu(qkv) && shape.n_heads % shape.n_kv_heads.max(1) == 0 {
        if flash_applies(qkv, shape) && gpu_path_enabled(GpuPath::Attention) {
            return attention_flash(qkv, layout, shape);
        }
        return attention_cuda(qkv, layout, shape);
    }
    attention_generic(qkv, layout, shape)
}

/// Which attention implementation [`attention_with`] runs (tests compare them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// What [`attention`] picks for the tensor's device and dtype.
    Auto,
    /// candle's generic ops over length buckets (any device).
    Generic,
    /// The length-bucketed GPU kernels with cuBLAS GEMMs.
    #[cfg(feature = "cuda")]
    Bucketed,
    /// The tensor-core flash kernel (f16/bf16, head dims 32, 64, 128).
    #[cfg(feature = "cuda")]
    Flash,
}

/// [`attention`] with a chosen implementation; an inapplicable choice is an error.
pub fn attention_with(
    qkv: &Tensor,
    layout: &SeqLayout,
    shape: AttentionShape,
    kernel: AttentionKernel,
) -> CResult<Tensor> {
    match kernel {
        AttentionKernel::Auto => attention(qkv, layout, shape),
        AttentionKernel::Generic => attention_generic(qkv, layout, shape),
        #[cfg(feature = "cuda")]
        AttentionKernel::Bucketed => attention_cuda(qkv, layout, shape),
        #[cfg(feature = "cuda")]
        AttentionKernel::Flash => attention_flash(qkv, layout, shape),
    }
}

#[cfg(feature = "cuda")]
fn flash_applies(qkv: &Tensor, shape: AttentionShape) -> bool {
    half_gpu(qkv) && cuda::FLASH_HEAD_DIMS.contains(&shape.head_dim)
}

/// Flash attention straight over the packed rows (see `flash_attn` in kernels.cu). Query
/// tiles are ordered longest sequence first so the costliest blocks start earliest.
#[cfg(feature = "cuda")]
fn attention_flash(qkv: &Tensor, layout: &SeqLayout, shape: AttentionShape) -> CResult<Tensor> {
    if !flash_applies(qkv, shape) {
        candle_core::bail!(
            "flash attention needs a contiguous f16/bf16 CUDA tensor and head dim in {:?}",
            cuda::FLASH_HEAD_DIMS
        );
    }
    if !layout.packs(qkv.dim(0)?) {
        candle_core::bail!("flash attention: the layout's spans do not tile the qkv rows");
    }
    let dev = qkv.device();
    let tile = cuda::FLASH_QUERY_TILE;
    let tiles = layout
        .device_cache
        .get_or_build(dev, CacheKey::FlashTiles, || {
            let mut order: Vec<&(usize, usize)> = layout.spans.iter().collect();
            order.sort_by_key(|s| std::cmp::Reverse(s.1));
            let mut t: Vec<u32> = Vec::new();
            for &&(start, len) in &order {
                for m0 in (0..len).step_by(tile).rev() {
                    t.extend([start as u32, len as u32, m0 as u32]);
                }
            }
            Ok(vec![upload_u32(&t, t.len(), dev)?])
        })?;
    let n_tiles = tiles[0].elem_count() / 3;
    if n_tiles == 0 {
        return Tensor::zeros((0, shape.out_width()), qkv.dtype(), dev);
    }
    qkv.apply_op1_no_bwd(&cuda::FlashAttention {
        tiles: &tiles[0],
        n_tiles,
        n_heads: shape.n_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        causal: shape.causal,
    })
}

/// Padded tokens a length bucket may add, as a share of its real tokens.
const BUCKET_PAD_SHARE: f64 = 0.125;

/// Splits packed sequences (in row order) into contiguous runs whose lengths are close enough
/// that padding each run to its longest member wastes at most `BUCKET_PAD_SHARE`. Candidates
/// arrive sorted by length, so runs are long and padding is near zero.
pub fn length_buckets(spans: &[(usize, usize)]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut begin = 0;
    let (mut real, mut longest) = (0usize, 0usize);
    for (i, &(_, len)) in spans.iter().enumerate() {
        let n = i - begin + 1;
        let l = longest.max(len);
        if i > begin && (n * l) as f64 > (real + len) as f64 * (1.0 + BUCKET_PAD_SHARE) {
            out.push(begin..i);
            begin = i;
            real = len;
            longest = len;
        } else {
            real += len;
            longest = l;
        }
    }
    if begin < spans.len() {
        out.push(begin..spans.len());
    }
    out
}

/// Attention for devices without the packed CPU kernel (CUDA, half precision): sequences are
/// grouped into length buckets, each bucket is padded to its longest member (a few percent,
/// see [`length_buckets`]) and runs as one batched GEMM pair with a masked f32 softmax, and
/// only the real rows are gathered back, in packed order.
fn attention_generic(qkv: &Tensor, layout: &SeqLayout, shape: AttentionShape) -> CResult<Tensor> {
    let dh = shape.head_dim;
    let (h, hkv) = (shape.n_heads, shape.n_kv_heads);
    let width = shape.qkv_width();
    let dev = qkv.device();
    let scale = 1.0 / (dh as f64).sqrt();
    let buckets = length_buckets(&layout.spans);
    let plan = layout.device_cache.get_or_build(
        dev,
        CacheKey::Attention {
            causal: shape.causal,
            dtype: qkv.dtype(),
        },
        || attention_plan(&layout.spans, &buckets, shape.causal, qkv.dtype(), dev),
    )?;
    let mut outs = Vec::with_capacity(buckets.len());
    for (bi, bucket) in buckets.into_iter().enumerate() {
        let spans = &layout.spans[bucket];
        let b = spans.len();
        let lmax = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let (gather, keep, mask) = (&plan[3 * bi], &plan[3 * bi + 1], &plan[3 * bi + 2]);
        let x = qkv.index_select(gather, 0)?.reshape((b, lmax, width))?;
        let heads = |off: usize, n: usize| -> CResult<Tensor> {
            x.narrow(2, off * dh, n * dh)?
                .reshape((b, lmax, n, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (heads(0, h)? * scale)?;
        let mut k = heads(h, hkv)?;
        let mut v = heads(h + hkv, hkv)?;
        if h != hkv {
            k = repeat_kv4(&k, h / hkv)?;
            v = repeat_kv4(&v, h / hkv)?;
        }
        // Scores stay in the compute dtype: the softmax kernel sums in f32.
        let mut att = q.matmul(&k.transpose(2, 3)?)?;
        if mask.elem_count() > 1 {
            att = att.broadcast_add(mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * lmax, h * dh))?;
        let o = if keep.elem_count() != b * lmax {
            o.index_select(keep, 0)?
        } else {
            o
        };
        outs.push(o);
    }
    Tensor::cat(&outs, 0)
}

/// The device tensors of [`attention_generic`]'s buckets, three per bucket: the rows to gather
/// (padding rows repeat the sequence's last row; they are masked as keys and dropped as
/// queries), the rows to keep, and the additive mask (`[lmax, lmax]` causal, `[b, 1, 1, lmax]`
/// key padding, or a single 0 when no mask is needed).
fn attention_plan(
    spans: &[(usize, usize)],
    buckets: &[std::ops::Range<usize>],
    causal: bool,
    dtype: DType,
    dev: &Device,
) -> CResult<Vec<Tensor>> {
    let mut plan = Vec::with_capacity(3 * buckets.len());
    for bucket in buckets {
        let spans = &spans[bucket.clone()];
        let b = spans.len();
        let lmax = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let gather: Vec<u32> = spans
            .iter()
            .flat_map(|&(start, len)| (0..lmax).map(move |p| (start + p.min(len - 1)) as u32))
            .collect();
        let keep: Vec<u32> = spans
            .iter()
            .enumerate()
            .flat_map(|(s, &(_, len))| (0..len).map(move |p| (s * lmax + p) as u32))
            .collect();
        let uneven = spans.iter().any(|s| s.1 != lmax);
        let mask = if causal {
            // Right padding: a real query never reaches a padded key under a causal mask.
            let m: Vec<f32> = (0..lmax)
                .flat_map(|i| (0..lmax).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            upload_f32_as(&m, (lmax, lmax), DType::F32, dev)?
        } else if uneven {
            let m: Vec<f32> = spans
                .iter()
                .flat_map(|&(_, len)| {
                    (0..lmax).map(move |j| if j < len { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            upload_f32_as(&m, (b, 1, 1, lmax), DType::F32, dev)?
        } else {
            Tensor::zeros(1, DType::F32, dev)?
        };
        let (ng, nk) = (gather.len(), keep.len());
        plan.push(upload_u32(&gather, ng, dev)?);
        plan.push(upload_u32(&keep, nk, dev)?);
        plan.push(mask.to_dtype(dtype)?);
    }
    Ok(plan)
}

/// Length-bucketed attention with the fused GPU kernels: per bucket, one kernel packs q, k, v
/// into padded per-head blocks (grouped-query heads stacked along the query axis), cuBLAS runs
/// the two batched GEMMs, one kernel applies the length/causal mask and softmax in place, and
/// one scatters the real rows into the packed output.
#[cfg(feature = "cuda")]
fn attention_cuda(qkv: &Tensor, layout: &SeqLayout, shape: AttentionShape) -> CResult<Tensor> {
    if !layout.packs(qkv.dim(0)?) {
        candle_core::bail!("attention: the layout's spans do not tile the qkv rows");
    }
    let dev = qkv.device();
    let (dh, h, hkv) = (shape.head_dim, shape.n_heads, shape.n_kv_heads);
    if hkv == 0 || h % hkv != 0 {
        candle_core::bail!("attention: {h} query heads do not group over {hkv} kv heads");
    }
    let rep = h / hkv;
    let ranges = length_buckets(&layout.spans);
    let tensors = layout
        .device_cache
        .get_or_build(dev, CacheKey::Buckets, || {
            let mut v = Vec::new();
            for r in &ranges {
                let spans = &layout.spans[r.clone()];
                let starts: Vec<u32> = spans.iter().map(|s| s.0 as u32).collect();
                let lens: Vec<u32> = spans.iter().map(|s| s.1 as u32).collect();
                v.push(upload_u32(&starts, starts.len(), dev)?);
                v.push(upload_u32(&lens, lens.len(), dev)?);
            }
            Ok(v)
        })?;
    let buckets: Vec<cuda::Bucket> = ranges
        .iter()
        .zip(tensors.chunks(2))
        .map(|(r, p)| cuda::Bucket {
            starts: p[0].clone(),
            lens: p[1].clone(),
            b: r.len(),
            lmax: layout.spans[r.clone()]
                .iter()
                .map(|s| s.1)
                .max()
                .unwrap_or(0),
        })
        .collect();
    let out = Tensor::zeros((qkv.dim(0)?, h * dh), qkv.dtype(), dev)?;
    let scale = 1.0 / (dh as f32).sqrt();
    for bucket in &buckets {
        let (b, lmax) = (bucket.b, bucket.lmax);
        let packed = qkv.apply_op1_no_bwd(&cuda::AttnPack {
            bucket,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: dh,
            scale,
        })?;
        let (qn, kn) = (b * h * lmax * dh, b * hkv * lmax * dh);
        let q = packed
            .narrow(0, 0, qn)?
            .reshape((b * hkv, rep * lmax, dh))?;
        let k = packed.narrow(0, qn, kn)?.reshape((b * hkv, lmax, dh))?;
        let v = packed
            .narrow(0, qn + kn, kn)?
            .reshape((b * hkv, lmax, dh))?;
        let scores = q.matmul(&k.t()?)?;
        scores.inplace_op1(&cuda::MaskedSoftmax {
            bucket,
            n_kv_heads: hkv,
            rep,
            causal: shape.causal,
        })?;
        let o = scores.matmul(&v)?;
        out.inplace_op2(
            &o,
            &cuda::AttnUnpack {
                bucket,
                n_heads: h,
                n_kv_heads: hkv,
                head_dim: dh,
            },
        )?;
    }
    Ok(out)
}

/// `[b, hkv, l, dh]` -> `[b, hkv * rep, l, dh]`, each kv head serving `rep` query heads.
fn repeat_kv4(x: &Tensor, rep: usize) -> CResult<Tensor> {
    let (b, n, len, dh) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, n, rep, len, dh))?
        .reshape((b, n * rep, len, dh))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_diff, rand_tensor};

    #[test]
    fn length_buckets_bound_padding_and_keep_order() {
        let spans: Vec<(usize, usize)> = [40, 39, 38, 30, 29, 5, 5, 4, 100]
            .iter()
            .scan(0, |row, &l| {
                let s = (*row, l);
                *row += l;
                Some(s)
            })
            .collect();
        let buckets = length_buckets(&spans);
        // Contiguous, in order, covering every span once.
        assert_eq!(buckets.first().unwrap().start, 0);
        assert_eq!(buckets.last().unwrap().end, spans.len());
        for w in buckets.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for b in &buckets {
            let real: usize = spans[b.clone()].iter().map(|s| s.1).sum();
            let longest = spans[b.clone()].iter().map(|s| s.1).max().unwrap();
            assert!((b.len() * longest) as f64 <= real as f64 * (1.0 + BUCKET_PAD_SHARE) + 1e-9);
        }
        assert_eq!(buckets.len(), 4, "{buckets:?}");
        assert!(length_buckets(&[]).is_empty());
    }

    #[test]
    fn attention_fast_paths_match_generic() {
        for causal in [true, false] {
            let shape = AttentionShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                causal,
            };
            // Several length buckets, uneven lengths inside some of them.
            let layout = SeqLayout::new(vec![
                (0, 3),
                (3, 7),
                (10, 1),
                (11, 7),
                (18, 6),
                (24, 6),
                (30, 2),
            ]);
            let qkv = rand_tensor(&[32, shape.qkv_width()], 9);
            let a = attention(&qkv, &layout, shape).unwrap();
            let b = attention_generic(&qkv, &layout, shape).unwrap();
            assert!(max_diff(&a, &b) < 1e-5, "causal {causal}");
        }
    }
}
