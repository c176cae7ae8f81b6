//! Tensor-level operations the model files are written in.
//!
//! Each op takes candle tensors and picks its implementation: contiguous f32 tensors on the CPU
//! go to the kernels in [`cpu`] (BLAS GEMMs, vectorised element-wise passes, packed attention),
//! anything else (CUDA, Metal, half precision) to candle's generic ops. Model files therefore
//! stay device-agnostic while the CPU hot path avoids candle's single-threaded generic ops.

#[cfg(feature = "openblas")]
pub(crate) mod blas;
pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod profile;

use candle_core::{CpuStorage, DType, Device, Storage, StorageRef, Tensor, D};

pub use cpu::{AttentionShape, RopeTable};

type CResult<T> = candle_core::Result<T>;

/// A read guard on a contiguous f32 CPU tensor's data.
struct CpuView<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl CpuView<'_> {
    fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => unreachable!("CpuView is only built over f32 CPU storage"),
        }
    }
}

fn cpu_view(t: &Tensor) -> Option<CpuView<'_>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        return None;
    }
    Some(CpuView { guard, start, end })
}

/// Whether the fused GPU kernels apply: a contiguous CUDA tensor of a float dtype.
#[cfg(feature = "cuda")]
fn fused_gpu(t: &Tensor) -> bool {
    t.device().is_cuda()
        && t.is_contiguous()
        && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Indices (or other u32 data) as a tensor on `device`. On a GPU the bytes go through
/// page-locked memory, so the upload neither waits for the kernels queued before it nor
/// holds up the ones queued after it for a staging copy.
pub fn upload_u32(
    data: &[u32],
    shape: impl Into<candle_core::Shape>,
    device: &Device,
) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::upload_u32(dev, data, shape.into());
    }
    Tensor::from_slice(data, shape, device)
}

/// `data` as a `dtype` tensor on `device`, converted on the host (on a GPU copied out of
/// page-locked memory, as [`upload_u32`]).
pub fn upload_f32_as(
    data: &[f32],
    shape: impl Into<candle_core::Shape>,
    dtype: DType,
    device: &Device,
) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::upload_f32_as(dev, data, dtype, shape.into());
    }
    Tensor::from_slice(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

fn cpu_tensor(data: Vec<f32>, dims: (usize, usize)) -> CResult<Tensor> {
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// The CPU fast path of a linear layer: the output rows as a plain vector, or `None` when
/// an operand is not a contiguous f32 CPU tensor (the caller then uses candle's ops).
fn linear_cpu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> CResult<Option<(Vec<f32>, usize, usize)>> {
    let (rows, in_dim) = x.dims2()?;
    let (out_dim, w_in) = w.dims2()?;
    if in_dim != w_in {
        candle_core::bail!("linear: input width {in_dim} does not match weight {out_dim}x{w_in}");
    }
    let (Some(xv), Some(wv)) = (cpu_view(x), cpu_view(w)) else {
        return Ok(None);
    };
    let bv = match b.map(cpu_view) {
        Some(None) => return Ok(None),
        Some(Some(v)) => Some(v),
        None => None,
    };
    let mut out = vec![0f32; rows * out_dim];
    cpu::linear(
        xv.slice(),
        rows,
        in_dim,
        wv.slice(),
        out_dim,
        bv.as_ref().map(|v| v.slice()),
        &mut out,
    );
    Ok(Some((out, rows, out_dim)))
}

/// `x [rows, in] · w[out, in]^T + b` (a torch `nn.Linear`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    match linear_cpu(x, w, b)? {
        Some((out, rows, cols)) => cpu_tensor(out, (rows, cols)),
        None => linear_device(x, w, b),
    }
}

/// A linear layer off the CPU fast path: cuBLASLt for half-precision CUDA tensors, candle's
/// matmul otherwise.
fn linear_device(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let same = |t: &Tensor| t.dtype() == x.dtype() && lt_operand(t);
        if same(x) && same(w) && b.is_none_or(same) && gpu_path_enabled(GpuPath::Gemm) {
            return match b {
                Some(b) => x.apply_op3_no_bwd(w, b, &cuda::LtLinear),
                None => x.apply_op2_no_bwd(w, &cuda::LtLinear),
            };
        }
    }
    linear_generic(x, w, b)
}

/// The GPU code paths that can be switched back to candle's generic ops, for comparison:
/// `GRATING_GPU_GENERIC=gemm,attention,norm` (any subset; `all` for every one).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPath {
    /// cuBLASLt linear layers (otherwise candle's cuBLAS matmul).
    Gemm,
    /// Flash attention (otherwise the length-bucketed kernels).
    Attention,
    /// Fused residual add + RMSNorm (otherwise candle's add and norm).
    Norm,
}

#[cfg(feature = "cuda")]
fn gpu_path_enabled(path: GpuPath) -> bool {
    static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let off = OFF.get_or_init(|| {
        std::env::var("GRATING_GPU_GENERIC")
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect()
    });
    let name = match path {
        GpuPath::Gemm => "gemm",
        GpuPath::Attention => "attention",
        GpuPath::Norm => "norm",
    };
    !off.iter().any(|p| p == name || p == "all")
}

/// A contiguous f16/bf16 CUDA tensor (what cuBLASLt and the tensor-core kernels take).
#[cfg(feature = "cuda")]
fn half_gpu(t: &Tensor) -> bool {
    fused_gpu(t) && matches!(t.dtype(), DType::F16 | DType::BF16)
}

/// A [`half_gpu`] tensor starting 256 bytes into an allocation or a multiple of that: the
/// alignment cuBLASLt's algorithm heuristic assumes unless told otherwise.
#[cfg(feature = "cuda")]
fn lt_operand(t: &Tensor) -> bool {
    half_gpu(t) && (t.layout().start_offset() * t.dtype().size_in_bytes()) % 256 == 0
}

/// `gelu(linear(x, w, b))`, fused on the CPU so the wide intermediate exists once.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    match linear_cpu(x, w, b)? {
        Some((mut out, rows, cols)) => {
            cpu::gelu_erf(&mut out);
            cpu_tensor(out, (rows, cols))
        }
        None => {
            let y = linear_device(x, w, b)?;
            #[cfg(feature = "cuda")]
            if fused_gpu(&y) {
                // In place: the intermediate activation exists once.
                y.inplace_op1(&cuda::GeluErf)?;
                return Ok(y);
            }
            gelu(y)
        }
    }
}

fn linear_generic(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Exact (erf) GELU.
pub fn gelu(x: Tensor) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    if let Some(v) = cpu_view(&x) {
        let mut data = v.slice().to_vec();
        drop(v);
        cpu::gelu_erf(&mut data);
        return Tensor::from_vec(data, dims, &Device::Cpu);
    }
    x.gelu_erf()
}

/// `LayerNorm(x + residual)` over the last dimension (post-norm encoders).
pub fn add_layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
) -> CResult<Tensor> {
    let (rows, d) = x.dims2()?;
    let views = (
        cpu_view(x),
        residual.map(cpu_view),
        cpu_view(gamma),
        beta.map(cpu_view),
    );
    if let (Some(xv), r, Some(gv), bt) = views {
        let r_ok = !matches!(r, Some(None));
        let b_ok = !matches!(bt, Some(None));
        if r_ok && b_ok {
            let mut out = vec![0f32; rows * d];
            cpu::add_layer_norm(
                xv.slice(),
                r.as_ref().and_then(|v| v.as_ref().map(|v| v.slice())),
                gv.slice(),
                bt.as_ref().and_then(|v| v.as_ref().map(|v| v.slice())),
                eps as f32,
                &mut out,
            );
            return cpu_tensor(out, (rows, d));
        }
    }
    let sum = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let beta = match beta {
        Some(b) => b.clone(),
        None => gamma.zeros_like()?,
    };
    candle_nn::ops::layer_norm(&sum, gamma, &beta, eps as f32)
}

/// `(RMSNorm(x + residual), x + residual)` over the last dimension (pre-norm decoders). With no
/// residual the second value is `x` itself.
pub fn add_rms_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    eps: f64,
) -> CResult<(Tensor, Tensor)> {
    let (rows, d) = x.dims2()?;
    let rv = residual.map(cpu_view);
    if let (Some(xv), Some(gv)) = (cpu_view(x), cpu_view(gamma)) {
        match rv {
            None => {
                let mut out = vec![0f32; rows * d];
                cpu::add_rms_norm(xv.slice(), None, gv.slice(), eps as f32, None, &mut out);
                return Ok((cpu_tensor(out, (rows, d))?, x.clone()));
            }
            Some(Some(r)) => {
                let mut out = vec![0f32; rows * d];
                let mut sum = vec![0f32; rows * d];
                cpu::add_rms_norm(
                    xv.slice(),
                    Some(r.slice()),
                    gv.slice(),
                    eps as f32,
                    Some(&mut sum),
                    &mut out,
                );
                return Ok((cpu_tensor(out, (rows, d))?, cpu_tensor(sum, (rows, d))?));
            }
            Some(None) => {}
        }
    }
    #[cfg(feature = "cuda")]
    if fused_gpu(x)
        && residual.is_none_or(|r| fused_gpu(r) && r.dtype() == x.dtype() && r.dims() == x.dims())
        && gpu_path_enabled(GpuPath::Norm)
    {
        let gamma = gamma.to_dtype(x.dtype())?;
        // With a residual, every element of the fresh `sum` is written by the kernel before
        // any read; without one the kernel leaves `sum` (x itself) alone.
        let sum = match residual {
            Some(_) => unsafe { Tensor::empty(x.shape(), x.dtype(), x.device())? },
            None => x.clone(),
        };
        let normed = x.apply_op1_no_bwd(&cuda::AddRmsNorm {
            residual,
            gamma: &gamma,
            sum: &sum,
            eps: eps as f32,
        })?;
        return Ok((normed, sum));
    }
    let sum = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let normed = candle_nn::ops::rms_norm(&sum, gamma, eps as f32)?;
    Ok((normed, sum))
}

/// SwiGLU on a fused `[gate | up]` projection of width `2 * inter`.
pub fn silu_mul(gate_up: &Tensor, inter: usize) -> CResult<Tensor> {
    let (rows, w) = gate_up.dims2()?;
    if w != 2 * inter {
        candle_core::bail!("silu_mul: width {w} is not 2 x {inter}");
    }
    if let Some(v) = cpu_view(gate_up) {
        let mut out = vec![0f32; rows * inter];
        cpu::silu_mul(v.slice(), inter, &mut out);
        return cpu_tensor(out, (rows, inter));
    }
    #[cfg(feature = "cuda")]
    if fused_gpu(gate_up) {
        return gate_up.apply_op1_no_bwd(&cuda::SiluMul { inter });
    }
    let gate = gate_up.narrow(1, 0, inter)?;
    let up = gate_up.narrow(1, inter, inter)?;
    candle_nn::ops::silu(&gate)? * up
}

/// Where each packed sequence starts and how long it is, plus per-token positions.
#[derive(Debug, Clone)]
pub struct SeqLayout {
    /// `(first_row, len)` per sequence, in row order.
    pub spans: Vec<(usize, usize)>,
    /// Each row's position within its own sequence, from 0.
    pub positions: Vec<u32>,
    /// Device tensors derived from the spans (gather indices, masks, rotary tables), built at
    /// the first layer and reused by every later one: uploading them per layer would stall
    /// the GPU's queue once per upload.
    pub device_cache: DeviceCache,
}

/// What a [`DeviceCache`] entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheKey {
    /// Per length bucket: gather indices, kept-row indices, additive mask.
    Attention { causal: bool, dtype: DType },
    /// Rotary cos and sin gathered at each row's position, `[rows, 1, half]`.
    Rope { half: usize },
    /// Per length bucket: u32 starts and lengths (the fused GPU attention).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Buckets,
    /// Each row's position, u32 (the fused GPU rotary kernel).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Positions,
    /// (first row, length, first query row) per flash attention query tile, u32.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    FlashTiles,
}

/// Tensors cached per (device, key). Clones share the cache; a layout is rebuilt (with an
/// empty cache) whenever its rows change.
#[derive(Debug, Clone, Default)]
pub struct DeviceCache(std::sync::Arc<std::sync::Mutex<Vec<CacheEntry>>>);

type CacheEntry = ((candle_core::DeviceLocation, CacheKey), Vec<Tensor>);

impl DeviceCache {
    fn get_or_build(
        &self,
        device: &Device,
        key: CacheKey,
        build: impl FnOnce() -> CResult<Vec<Tensor>>,
    ) -> CResult<Vec<Tensor>> {
        let k = (device.location(), key);
        let mut entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = entries.iter().find(|(e, _)| *e == k) {
            return Ok(v.clone());
        }
        let v = build()?;
        entries.push((k, v.clone()));
        Ok(v)
    }
}

impl SeqLayout {
    pub fn new(spans: Vec<(usize, usize)>) -> Self {
        let positions = spans.iter().flat_map(|&(_, len)| 0..len as u32).collect();
        SeqLayout {
            spans,
            positions,
            device_cache: DeviceCache::default(),
        }
    }

    /// The longest sequence's length (its last position plus one).
    pub fn max_len(&self) -> usize {
        self.spans.iter().map(|s| s.1).max().unwrap_or(0)
    }

    pub fn total_rows(&self) -> usize {
        self.spans.last().map(|(s, l)| s + l).unwrap_or(0)
    }
}

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
/// that padding each run to its longest member wastes at most [`BUCKET_PAD_SHARE`]. Candidates
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
    let dev = qkv.device();
    let (dh, h, hkv) = (shape.head_dim, shape.n_heads, shape.n_kv_heads);
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

/// Sets the number of compute threads for the rayon pool and BLAS. Call once, early; later
/// calls only adjust BLAS.
pub fn set_threads(n: usize) {
    let n = n.max(1);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    #[cfg(feature = "openblas")]
    blas::set_threads(n);
}

/// Threads the engine computes with (the rayon pool's size).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_tensor(dims: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fast_paths_match_generic_candle_ops() {
        let x = rand_tensor(&[9, 16], 1);
        let r = rand_tensor(&[9, 16], 2);
        let g = rand_tensor(&[16], 3);
        let b = rand_tensor(&[16], 4);
        let w = rand_tensor(&[24, 16], 5);
        let wb = rand_tensor(&[24], 6);
        assert!(
            max_diff(
                &linear(&x, &w, Some(&wb)).unwrap(),
                &linear_generic(&x, &w, Some(&wb)).unwrap()
            ) < 1e-5
        );
        assert!(max_diff(&gelu(x.clone()).unwrap(), &x.gelu_erf().unwrap()) < 1e-6);
        let ln = add_layer_norm(&x, Some(&r), &g, Some(&b), 1e-12).unwrap();
        let ln_ref = candle_nn::ops::layer_norm(&(&x + &r).unwrap(), &g, &b, 1e-12).unwrap();
        assert!(max_diff(&ln, &ln_ref) < 1e-5);
        let (rn, sum) = add_rms_norm(&x, Some(&r), &g, 1e-6).unwrap();
        let rn_ref = candle_nn::ops::rms_norm(&(&x + &r).unwrap(), &g, 1e-6).unwrap();
        assert!(max_diff(&rn, &rn_ref) < 1e-5);
        assert!(max_diff(&sum, &(&x + &r).unwrap()) < 1e-7);
        let gu = rand_tensor(&[9, 32], 7);
        let sm = silu_mul(&gu, 16).unwrap();
        let sm_ref = (candle_nn::ops::silu(&gu.narrow(1, 0, 16).unwrap()).unwrap()
            * gu.narrow(1, 16, 16).unwrap())
        .unwrap();
        assert!(max_diff(&sm, &sm_ref) < 1e-5);
    }

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
    fn attention_and_rope_fast_paths_match_generic() {
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
