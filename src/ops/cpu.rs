//! f32 CPU kernels for the hot path, on plain slices.
//!
//! candle's generic CPU ops are single-threaded and call libm per element; a reranker layer
//! spends its time in GEMMs, attention and a few element-wise passes, so those get kernels
//! here: GEMMs through BLAS (or the `gemm` crate), element-wise work vectorised (AVX2+FMA
//! chosen at run time) and split over the rayon pool.

use candle_core::Tensor;
use rayon::prelude::*;

/// Rows handed to one rayon task in element-wise kernels: enough work to amortise scheduling.
const ROWS_PER_TASK_MIN_ELEMS: usize = 16 * 1024;

fn rows_per_task(row_len: usize) -> usize {
    (ROWS_PER_TASK_MIN_ELEMS / row_len.max(1)).max(1)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `pub fn $name` that runs `$body` compiled for AVX2+FMA when the CPU has it, and for
/// the baseline target otherwise. The body is written once, as plain loops LLVM vectorises.
macro_rules! vectorised {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                if has_avx2_fma() {
                    // SAFETY: the CPU supports the enabled features (checked at run time).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// exp(x) to about 2 ulp over the range softmax and sigmoid use, branch-free so that it
/// vectorises (libm's expf is a call per element).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    let n = t.round();
    let f = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // exp(f) on |f| <= ln2/2 by a degree-6 Taylor/minimax polynomial.
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (0.166_666_67
                    + f * (0.041_666_668 + f * (0.008_333_334 + f * 0.001_388_889)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// erf(x), Abramowitz-Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_7) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * fast_exp(-a * a);
    y.copysign(x)
}

vectorised! {
    /// `x = gelu(x)` with the exact (erf) form BERT and XLM-R use.
    pub fn gelu_erf_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            let u = *v;
            *v = 0.5 * u * (1.0 + fast_erf(u * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(ROWS_PER_TASK_MIN_ELEMS)
        .for_each(gelu_erf_slice);
}

vectorised! {
    /// One row of LayerNorm over `x + residual`, written to `out`.
    pub fn add_layer_norm_row(
        x: &[f32],
        residual: Option<&[f32]>,
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
        out: &mut [f32],
    ) {
        match residual {
            Some(r) => {
                for ((o, a), b) in out.iter_mut().zip(x).zip(r) {
                    *o = a + b;
                }
            }
            None => out.copy_from_slice(x),
        }
        let n = out.len() as f32;
        let mean = out.iter().sum::<f32>() / n;
        let var = out.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        match beta {
            Some(b) => {
                for ((o, g), bb) in out.iter_mut().zip(gamma).zip(b) {
                    *o = (*o - mean) * inv * g + bb;
                }
            }
            None => {
                for (o, g) in out.iter_mut().zip(gamma) {
                    *o = (*o - mean) * inv * g;
                }
            }
        }
    }
}

/// LayerNorm(x + residual) row-wise; `x`, `residual` and `out` are `[rows, gamma.len()]`.
pub fn add_layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    let d = gamma.len();
    let rpt = rows_per_task(d) * d;
    out.par_chunks_mut(rpt)
        .enumerate()
        .for_each(|(ci, out_chunk)| {
            let start = ci * rpt;
            for (ri, o) in out_chunk.chunks_mut(d).enumerate() {
                let s = start + ri * d;
                let xr = &x[s..s + d];
                let rr = residual.map(|r| &r[s..s + d]);
                add_layer_norm_row(xr, rr, gamma, beta, eps, o);
            }
        });
}

vectorised! {
    /// RMSNorm of one row: `out = x / rms(x) * gamma`.
    pub fn rms_norm_row(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let ms = x.iter().map(|v| v * v).sum::<f32>() / n;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in out.iter_mut().zip(x).zip(gamma) {
            *o = v * inv * g;
        }
    }
}

/// RMSNorm(x + residual) row-wise. When `residual` is given, the sum is also written to
/// `sum_out` (the new residual stream), so the pre-norm decoder does one pass per sub-layer.
pub fn add_rms_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    eps: f32,
    sum_out: Option<&mut [f32]>,
    out: &mut [f32],
) {
    let d = gamma.len();
    let rpt = rows_per_task(d) * d;
    match (residual, sum_out) {
        (Some(r), Some(sum)) => {
            out.par_chunks_mut(rpt)
                .zip(sum.par_chunks_mut(rpt))
                .enumerate()
                .for_each(|(ci, (oc, sc))| {
                    let start = ci * rpt;
                    for (ri, (o, s)) in oc.chunks_mut(d).zip(sc.chunks_mut(d)).enumerate() {
                        let off = start + ri * d;
                        add_slices(&x[off..off + d], &r[off..off + d], s);
                        rms_norm_row(s, gamma, eps, o);
                    }
                });
        }
        _ => {
            out.par_chunks_mut(rpt).enumerate().for_each(|(ci, oc)| {
                let start = ci * rpt;
                for (ri, o) in oc.chunks_mut(d).enumerate() {
                    let off = start + ri * d;
                    rms_norm_row(&x[off..off + d], gamma, eps, o);
                }
            });
        }
    }
}

#[inline(always)]
fn add_slices(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

vectorised! {
    /// SwiGLU on one row of a fused `[gate | up]` projection: `out = silu(gate) * up`.
    pub fn silu_mul_row(gate_up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (gate, up) = gate_up.split_at(n);
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + fast_exp(-g)) * u;
        }
    }
}

pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    let rpt = rows_per_task(inter);
    out.par_chunks_mut(rpt * inter)
        .enumerate()
        .for_each(|(ci, oc)| {
            let start = ci * rpt;
            for (ri, o) in oc.chunks_mut(inter).enumerate() {
                let row = start + ri;
                silu_mul_row(&gate_up[row * 2 * inter..(row + 1) * 2 * inter], o);
            }
        });
}

vectorised! {
    /// In-place softmax of one attention row: scale, optional causal cut at `valid` columns.
    pub fn softmax_row(row: &mut [f32], scale: f32, valid: usize) {
        let (live, masked) = row.split_at_mut(valid);
        let mut max = f32::NEG_INFINITY;
        for v in live.iter() {
            max = max.max(*v);
        }
        let mut sum = 0.0f32;
        for v in live.iter_mut() {
            let e = fast_exp((*v - max) * scale);
            *v = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for v in live.iter_mut() {
            *v *= inv;
        }
        for v in masked.iter_mut() {
            *v = 0.0;
        }
    }
}

/// C[m, n] = A[m, k] * W[n, k]^T (+ bias), row-major, BLAS-threaded.
pub fn linear(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    c: &mut [f32],
) {
    // Checked in release builds too: the GEMM below reads and writes through raw pointers
    // sized by these numbers.
    assert_eq!(a.len(), m * k, "linear: input is not {m}x{k}");
    assert_eq!(w.len(), n * k, "linear: weight is not {n}x{k}");
    assert_eq!(c.len(), m * n, "linear: output is not {m}x{n}");
    assert!(
        bias.is_none_or(|b| b.len() == n),
        "linear: bias is not {n} wide"
    );
    assert!(
        [m, n, k].iter().all(|&d| d <= i32::MAX as usize),
        "linear: {m}x{n}x{k} exceeds BLAS's 32-bit sizes"
    );
    if m == 0 {
        return;
    }
    let beta = match bias {
        Some(b) => {
            c.par_chunks_mut(n * rows_per_task(n))
                .for_each(|rows| rows.chunks_mut(n).for_each(|r| r.copy_from_slice(b)));
            1.0
        }
        None => 0.0,
    };
    sgemm_a_bt(a, m, k, w, n, beta, c);
}

#[cfg(feature = "openblas")]
fn sgemm_a_bt(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, beta: f32, c: &mut [f32]) {
    // SAFETY: `a`, `w` and `c` hold m*k, n*k and m*n floats (asserted in `linear`, the only
    // caller), which row-major m x k, n x k (read transposed) and m x n matrices with leading
    // dimensions k, k and n span exactly; the sizes fit i32 (asserted); `c` is the only
    // mutable borrow, so nothing else reads it during the call.
    unsafe {
        crate::ops::blas::cblas_sgemm(
            crate::ops::blas::ROW_MAJOR,
            crate::ops::blas::NO_TRANS,
            crate::ops::blas::TRANS,
            m as i32,
            n as i32,
            k as i32,
            1.0,
            a.as_ptr(),
            k as i32,
            w.as_ptr(),
            k as i32,
            beta,
            c.as_mut_ptr(),
            n as i32,
        )
    }
}

#[cfg(not(feature = "openblas"))]
fn sgemm_a_bt(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, beta: f32, c: &mut [f32]) {
    // SAFETY: `a`, `w` and `c` hold m*k, n*k and m*n floats (asserted in `linear`, the only
    // caller); the strides describe row-major a (row stride k), w read transposed (k x n with
    // column stride k) and c (row stride n), so every access stays inside its slice, and `c`
    // is the only mutable borrow.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// Geometry of fused-QKV attention over packed sequences.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionShape {
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    pub fn out_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Query rows processed together: bounds the score scratch at ROW_BLOCK x seq_len.
const ROW_BLOCK: usize = 128;

/// The output pointer shared by [`attention`]'s tasks.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only [`attention`] builds one, over an `out` it borrows mutably for the whole
// parallel loop; its tasks write disjoint (sequence rows, head) blocks of it (the spans are
// asserted not to overlap) and nothing reads it until the loop ends.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared between the tasks only to write disjoint blocks.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Scaled dot-product attention of each packed sequence with itself (no padding anywhere).
/// `qkv` is `[T, qkv_width]` laid out `[q heads | k heads | v heads]`; `seqs` holds
/// `(start_row, len)` per sequence; `out` is `[T, out_width]`.
pub fn attention(qkv: &[f32], seqs: &[(usize, usize)], shape: AttentionShape, out: &mut [f32]) {
    let dh = shape.head_dim;
    let rs = shape.qkv_width();
    let od = shape.out_width();
    // Checked in release builds too: the tasks below write through a shared raw pointer, so
    // their blocks must lie inside `out` and must not overlap.
    assert!(
        shape.n_kv_heads > 0 && shape.n_heads % shape.n_kv_heads == 0 && dh > 0,
        "attention: {shape:?} does not group query heads over kv heads"
    );
    let rows = qkv.len() / rs;
    assert!(
        qkv.len() == rows * rs && out.len() == rows * od,
        "attention: qkv and out are not {rows} rows"
    );
    let mut next = 0;
    for &(start, len) in seqs {
        assert!(
            start >= next,
            "attention: sequences overlap or are out of order"
        );
        next = start + len;
    }
    assert!(
        next <= rows,
        "attention: sequences run past the {rows} rows"
    );
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let k_off = shape.n_heads * dh;
    let v_off = k_off + shape.n_kv_heads * dh;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|&(start, len)| (0..shape.n_heads).map(move |h| (start, len, h)))
        .collect();
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, &(start, len, h)| {
            let kvh = h / group;
            let q_base = qkv[start * rs + h * dh..].as_ptr();
            let k_base = qkv[start * rs + k_off + kvh * dh..].as_ptr();
            let v_base = qkv[start * rs + v_off + kvh * dh..].as_ptr();
            let mut r0 = 0;
            while r0 < len {
                let rb = ROW_BLOCK.min(len - r0);
                // Causal rows never look past their own position.
                let cols = if shape.causal { r0 + rb } else { len };
                scratch.resize(rb * cols, 0.0);
                // SAFETY: `scratch` holds rb x cols floats (resized above); q rows r0..r0 + rb and
                // k rows 0..cols (cols <= len) of this sequence lie inside `qkv`, since the
                // sequence's rows start + len do (asserted above), read with row stride rs from
                // offsets h * dh and k_off + kvh * dh, dh columns each.
                unsafe {
                    gemm::gemm(
                        rb,
                        cols,
                        dh,
                        scratch.as_mut_ptr(),
                        1,
                        cols as isize,
                        false,
                        q_base.add(r0 * rs),
                        1,
                        rs as isize,
                        k_base,
                        rs as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (i, row) in scratch.chunks_mut(cols).enumerate() {
                    let valid = if shape.causal { r0 + i + 1 } else { cols };
                    softmax_row(row, scale, valid);
                }
                // SAFETY: the destination is rows start + r0 .. start + r0 + rb, columns h * dh ..
                // h * dh + dh of `out` (stride od), inside `out` because the sequence's rows
                // are (asserted above), and written by this task alone: tasks differ in
                // sequence (disjoint rows, asserted) or head (disjoint columns); v rows 0..cols
                // of the sequence lie inside `qkv`, and `scratch` holds rb x cols floats.
                unsafe {
                    gemm::gemm(
                        rb,
                        dh,
                        cols,
                        out_ptr.get().add((start + r0) * od + h * dh),
                        1,
                        od as isize,
                        false,
                        scratch.as_ptr(),
                        1,
                        cols as isize,
                        v_base,
                        1,
                        rs as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                r0 += rb;
            }
        });
}

/// Rotary embedding tables: `cos[pos * half + i]`, `sin[...]` for `i < head_dim / 2`.
#[derive(Debug, Default)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// `[max_pos, half]` copies of the tables on the last non-CPU device asked for.
    on_device: std::sync::Mutex<Option<(candle_core::DeviceLocation, Tensor, Tensor)>>,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        // Frequencies in f32 as HF computes them, angles in f64 to stay exact at long positions.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        for p in 0..max_pos {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable {
            half,
            cos,
            sin,
            on_device: Default::default(),
        }
    }

    /// The cos and sin tables as `[max_positions, half]` f32 tensors on `device`, uploaded once.
    pub fn on_device(&self, device: &candle_core::Device) -> candle_core::Result<(Tensor, Tensor)> {
        let mut slot = self.on_device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((loc, c, s)) = slot.as_ref() {
            if *loc == device.location() {
                return Ok((c.clone(), s.clone()));
            }
        }
        let shape = (self.max_positions(), self.half);
        let c = Tensor::from_slice(&self.cos, shape, device)?;
        let s = Tensor::from_slice(&self.sin, shape, device)?;
        *slot = Some((device.location(), c.clone(), s.clone()));
        Ok((c, s))
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

/// Per-head RMSNorm of q and k (Qwen3's q_norm / k_norm) followed by rotary embedding, in
/// place on a fused `[T, qkv_width]` buffer. `positions[t]` is the position of row t.
pub fn qk_norm_rope(
    qkv: &mut [f32],
    shape: AttentionShape,
    q_gamma: Option<&[f32]>,
    k_gamma: Option<&[f32]>,
    eps: f32,
    positions: &[u32],
    rope: &RopeTable,
) {
    let dh = shape.head_dim;
    let rs = shape.qkv_width();
    let heads = shape.n_heads + shape.n_kv_heads;
    let rpt = rows_per_task(rs);
    qkv.par_chunks_mut(rs * rpt)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut tmp = vec![0f32; dh];
            for (ri, row) in chunk.chunks_mut(rs).enumerate() {
                let pos = positions[ci * rpt + ri] as usize;
                let cos = &rope.cos[pos * rope.half..(pos + 1) * rope.half];
                let sin = &rope.sin[pos * rope.half..(pos + 1) * rope.half];
                for h in 0..heads {
                    let x = &mut row[h * dh..(h + 1) * dh];
                    let gamma = if h < shape.n_heads { q_gamma } else { k_gamma };
                    if let Some(g) = gamma {
                        rms_norm_row(x, g, eps, &mut tmp);
                        x.copy_from_slice(&tmp);
                    }
                    rope_row(x, cos, sin);
                }
            }
        });
}

vectorised! {
    /// Rotate-half RoPE of one head vector.
    pub fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        let (a, b) = x.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
    }

    #[test]
    fn fast_erf_matches_reference_points() {
        // erf values from the standard tables.
        for (x, e) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!(
                (fast_erf(x) - e).abs() < 3e-7,
                "erf({x})={} vs {e}",
                fast_erf(x)
            );
        }
    }

    #[test]
    fn softmax_row_is_normalised_and_masks() {
        let mut row = vec![1.0, 2.0, 3.0, 100.0];
        softmax_row(&mut row, 1.0, 3);
        assert_eq!(row[3], 0.0);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f32 = e.iter().sum();
        for i in 0..3 {
            assert!((row[i] - e[i] / s).abs() < 1e-6);
        }
    }

    fn naive_attention(qkv: &[f32], seqs: &[(usize, usize)], sh: AttentionShape) -> Vec<f32> {
        let dh = sh.head_dim;
        let rs = sh.qkv_width();
        let total: usize = seqs.iter().map(|s| s.1).sum();
        let mut out = vec![0f32; total * sh.out_width()];
        let group = sh.n_heads / sh.n_kv_heads;
        for &(start, len) in seqs {
            for h in 0..sh.n_heads {
                let kvh = h / group;
                for i in 0..len {
                    let q = &qkv[(start + i) * rs + h * dh..][..dh];
                    let lim = if sh.causal { i + 1 } else { len };
                    let mut w: Vec<f64> = (0..lim)
                        .map(|j| {
                            let k = &qkv[(start + j) * rs + sh.n_heads * dh + kvh * dh..][..dh];
                            q.iter()
                                .zip(k)
                                .map(|(a, b)| (*a as f64) * (*b as f64))
                                .sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                        .collect();
                    let m = w.iter().cloned().fold(f64::MIN, f64::max);
                    w.iter_mut().for_each(|v| *v = (*v - m).exp());
                    let s: f64 = w.iter().sum();
                    for d in 0..dh {
                        let mut acc = 0f64;
                        for (j, wj) in w.iter().enumerate() {
                            let v = qkv[(start + j) * rs
                                + (sh.n_heads + sh.n_kv_heads) * dh
                                + kvh * dh
                                + d];
                            acc += wj / s * v as f64;
                        }
                        out[(start + i) * sh.out_width() + h * dh + d] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_for_ragged_gqa_and_causal() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for causal in [false, true] {
            let sh = AttentionShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                causal,
            };
            // Lengths straddle the row block so the blocked path is exercised.
            let lens = [1usize, 5, 130, 17];
            let mut seqs = vec![];
            let mut t = 0;
            for l in lens {
                seqs.push((t, l));
                t += l;
            }
            let qkv: Vec<f32> = (0..t * sh.qkv_width())
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let mut out = vec![0f32; t * sh.out_width()];
            attention(&qkv, &seqs, sh, &mut out);
            let want = naive_attention(&qkv, &seqs, sh);
            let worst = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "causal={causal} worst {worst}");
        }
    }

    #[test]
    fn linear_adds_bias_and_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = vec![0.5, -1.0, 2.0];
        let mut c = vec![0f32; m * n];
        linear(&a, m, k, &w, n, Some(&b), &mut c);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum::<f32>() + b[j];
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
