//! candle custom ops over the fused kernels of `kernels.cu` (compiled to PTX by build.rs).
//! Each op works on contiguous CUDA tensors of f32, f16 or bf16; the callers in `ops` check
//! that and otherwise use candle's generic ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys as lt_sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp1,
    InplaceOp2, Layout, Result, Shape, Storage, Tensor,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "grating_kernels";

/// Loads kernel `name` for `dtype` (the module is loaded once per device).
macro_rules! kernel {
    ($dev:expr, $name:expr, $dtype:expr) => {{
        let suffix = match $dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            d => bail!("{}: no GPU kernel for {d:?}", $name),
        };
        $dev.get_or_load_custom_func(&format!("{}_{suffix}", $name), MODULE, PTX)?
    }};
}

/// A grid-stride launch over `n` elements.
fn linear_launch(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 30) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("GPU kernel input must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// A captured operand (indices, tables, weights): its storage stays read-locked while
/// [`Operand::view`]s of it are in use.
struct Operand<'a> {
    storage: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Operand<'a> {
    fn of(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Operand { storage, layout }
    }

    fn view<T: CudaDType + DeviceRepr>(&self) -> Result<CudaView<'_, T>> {
        match &*self.storage {
            Storage::Cuda(s) => view::<T>(s, self.layout),
            _ => bail!("GPU kernel operand is not on the GPU"),
        }
    }
}

macro_rules! dispatch {
    ($dtype:expr, $name:literal, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            d => bail!("{}: no GPU kernel for {d:?}", $name),
        }
    };
}

/// The kernels index with 32-bit integers.
fn check_u32(what: &str, n: usize) -> Result<()> {
    if n >= u32::MAX as usize {
        bail!("{what}: {n} elements exceed the fused GPU kernels' 32-bit indexing; use a smaller --chunk-tokens")
    }
    Ok(())
}

fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is a GPU kernel")
}

/// The `name` and the refusing `cpu_fwd` of a GPU-only [`CustomOp1`].
macro_rules! gpu_only_op1 {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            no_cpu($name)
        }
    };
}

/// `silu(gate) * up` over a `[rows, 2 * inter]` projection.
pub struct SiluMul {
    pub inter: usize,
}

impl CustomOp1 for SiluMul {
    gpu_only_op1!("grating-silu-mul");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            s: &CudaStorage,
            l: &Layout,
            inter: usize,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let rows = l.shape().elem_count() / (2 * inter);
            let src = view::<T>(s, l)?;
            let dst = unsafe { dev.alloc::<T>(rows * inter)? };
            let f = kernel!(dev, "silu_mul", s.dtype());
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&dst);
            candle_core::builder_arg!(b, rows as u32, inter as u32);
            unsafe { b.launch(linear_launch(rows * inter)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        check_u32("silu_mul", l.shape().elem_count())?;
        let rows = l.shape().elem_count() / (2 * self.inter);
        let out = dispatch!(s.dtype(), "silu_mul", run, s, l, self.inter)?;
        Ok((out, Shape::from((rows, self.inter))))
    }
}

/// Exact (erf) GELU in place.
pub struct GeluErf;

impl InplaceOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "grating-gelu-erf"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("gelu_erf_inplace is a GPU kernel")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        fn run<T: CudaDType + DeviceRepr>(s: &mut CudaStorage, l: &Layout) -> Result<()> {
            let dev = s.device().clone();
            let dtype = s.dtype();
            let Some((a, z)) = l.contiguous_offsets() else {
                bail!("gelu: input must be contiguous")
            };
            let f = kernel!(&dev, "gelu_erf_inplace", dtype);
            let x = s.as_cuda_slice_mut::<T>()?;
            let mut x = x.slice_mut(a..z);
            let mut b = f.builder();
            b.arg(&mut x);
            candle_core::builder_arg!(b, (z - a) as u32);
            unsafe { b.launch(linear_launch(z - a)) }.w()?;
            Ok(())
        }
        check_u32("gelu", l.shape().elem_count())?;
        dispatch!(s.dtype(), "gelu_erf_inplace", run, s, l)
    }
}

/// Qwen3's q/k RMSNorm and rotary embedding on a fused `[rows, (nh + 2 nkv) * dh]`
/// projection; `positions` (u32 per row) index the f32 `[max_pos, dh / 2]` tables.
pub struct QkNormRope {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub cos: Tensor,
    pub sin: Tensor,
    pub positions: Tensor,
    pub q_gamma: Tensor,
    pub k_gamma: Tensor,
}

impl CustomOp1 for QkNormRope {
    gpu_only_op1!("grating-qk-norm-rope");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &QkNormRope,
            s: &CudaStorage,
            l: &Layout,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let n = l.shape().elem_count();
            let heads = op.n_heads + 2 * op.n_kv_heads;
            let rows = n / (heads * op.head_dim);
            let src = view::<T>(s, l)?;
            let dst = unsafe { dev.alloc::<T>(n)? };
            let f = kernel!(dev, "qk_norm_rope", s.dtype());
            let (cos, sin, pos) = (
                Operand::of(&op.cos),
                Operand::of(&op.sin),
                Operand::of(&op.positions),
            );
            let (qg, kg) = (Operand::of(&op.q_gamma), Operand::of(&op.k_gamma));
            let (cos, sin, pos) = (cos.view::<f32>()?, sin.view::<f32>()?, pos.view::<u32>()?);
            let (qg, kg) = (qg.view::<T>()?, kg.view::<T>()?);
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&dst);
            b.arg(&cos);
            b.arg(&sin);
            b.arg(&pos);
            b.arg(&qg);
            b.arg(&kg);
            candle_core::builder_arg!(
                b,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                op.head_dim as i32,
                op.eps,
                rows as i64
            );
            // One warp per (row, head), eight per block.
            let cfg = LaunchConfig {
                grid_dim: ((rows * heads).div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        if self.head_dim % 2 != 0 {
            bail!("qk_norm_rope: head dim {} unsupported", self.head_dim);
        }
        let out = dispatch!(s.dtype(), "qk_norm_rope", run, self, s, l)?;
        Ok((out, l.shape().clone()))
    }
}

/// One length bucket's geometry: `starts`/`lens` are u32 device tensors of `b` sequences.
#[derive(Clone)]
pub struct Bucket {
    pub starts: Tensor,
    pub lens: Tensor,
    pub b: usize,
    pub lmax: usize,
}

/// Packs a bucket's q (scaled), k, v out of the fused projection into one flat tensor:
/// q `[b, nkv, rep, lmax, dh]`, then k and v `[b, nkv, lmax, dh]`.
pub struct AttnPack<'a> {
    pub bucket: &'a Bucket,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl CustomOp1 for AttnPack<'_> {
    gpu_only_op1!("grating-attn-pack");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &AttnPack<'_>,
            s: &CudaStorage,
            l: &Layout,
            total: usize,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let bk = op.bucket;
            let src = view::<T>(s, l)?;
            let dst = unsafe { dev.alloc::<T>(total)? };
            let f = kernel!(dev, "attn_pack", s.dtype());
            let width = (op.n_heads + 2 * op.n_kv_heads) * op.head_dim;
            let (starts, lens) = (Operand::of(&bk.starts), Operand::of(&bk.lens));
            let (starts, lens) = (starts.view::<u32>()?, lens.view::<u32>()?);
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&dst);
            b.arg(&starts);
            b.arg(&lens);
            candle_core::builder_arg!(
                b,
                bk.b as i32,
                bk.lmax as i32,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                op.head_dim as i32,
                op.scale
            );
            unsafe { b.launch(linear_launch(bk.b * bk.lmax * width)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        let total =
            (self.n_heads + 2 * self.n_kv_heads) * self.bucket.b * self.bucket.lmax * self.head_dim;
        check_u32("attention bucket", total)?;
        let out = dispatch!(s.dtype(), "attn_pack", run, self, s, l, total)?;
        Ok((out, Shape::from(total)))
    }
}

/// In-place masked softmax over a bucket's scores `[b * nkv, rep * lmax, lmax]`.
pub struct MaskedSoftmax<'a> {
    pub bucket: &'a Bucket,
    pub n_kv_heads: usize,
    pub rep: usize,
    pub causal: bool,
}

impl InplaceOp1 for MaskedSoftmax<'_> {
    fn name(&self) -> &'static str {
        "grating-masked-softmax"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("masked softmax is a GPU kernel")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &MaskedSoftmax<'_>,
            s: &mut CudaStorage,
            l: &Layout,
        ) -> Result<()> {
            let dev = s.device().clone();
            let dtype = s.dtype();
            let bk = op.bucket;
            let rows = bk.b * op.n_kv_heads * op.rep * bk.lmax;
            if l.shape().elem_count() != rows * bk.lmax || !l.is_contiguous() {
                bail!("masked softmax: scores do not match the bucket");
            }
            let f = kernel!(&dev, "masked_softmax", dtype);
            let offset = l.start_offset();
            let scores = s.as_cuda_slice_mut::<T>()?;
            let mut scores = scores.slice_mut(offset..offset + rows * bk.lmax);
            let lens = Operand::of(&bk.lens);
            let lens = lens.view::<u32>()?;
            let mut b = f.builder();
            b.arg(&mut scores);
            b.arg(&lens);
            candle_core::builder_arg!(
                b,
                rows as i64,
                op.n_kv_heads as i32,
                op.rep as i32,
                bk.lmax as i32,
                op.causal as i32
            );
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
        dispatch!(s.dtype(), "masked_softmax", run, self, s, l)
    }
}

/// Scatters a bucket's attention output `[b * nkv, rep * lmax, dh]` into the packed rows of
/// the `[rows, nh * dh]` tensor it is applied to.
pub struct AttnUnpack<'a> {
    pub bucket: &'a Bucket,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl InplaceOp2 for AttnUnpack<'_> {
    fn name(&self) -> &'static str {
        "grating-attn-unpack"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("attention unpack is a GPU kernel")
    }
    fn cuda_fwd(
        &self,
        out: &mut CudaStorage,
        lo: &Layout,
        o: &CudaStorage,
        l: &Layout,
    ) -> Result<()> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &AttnUnpack<'_>,
            out: &mut CudaStorage,
            lo: &Layout,
            o: &CudaStorage,
            l: &Layout,
        ) -> Result<()> {
            let dev = out.device().clone();
            let dtype = out.dtype();
            let bk = op.bucket;
            let f = kernel!(&dev, "attn_unpack", dtype);
            let src = view::<T>(o, l)?;
            let Some((a, z)) = lo.contiguous_offsets() else {
                bail!("attention output must be contiguous")
            };
            let dst = out.as_cuda_slice_mut::<T>()?;
            let mut dst = dst.slice_mut(a..z);
            let (starts, lens) = (Operand::of(&bk.starts), Operand::of(&bk.lens));
            let (starts, lens) = (starts.view::<u32>()?, lens.view::<u32>()?);
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&mut dst);
            b.arg(&starts);
            b.arg(&lens);
            candle_core::builder_arg!(
                b,
                bk.b as i32,
                bk.lmax as i32,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                op.head_dim as i32
            );
            unsafe { b.launch(linear_launch(bk.b * bk.lmax * op.n_heads * op.head_dim)) }.w()?;
            Ok(())
        }
        if out.dtype() != o.dtype() {
            bail!("attention unpack: dtype mismatch");
        }
        dispatch!(out.dtype(), "attn_unpack", run, self, out, lo, o, l)
    }
}

/// `x + residual` stored into `sum` (a fresh tensor of x's shape that only this op writes),
/// then RMSNorm with `gamma`; the op's output is the normalised rows. Without a residual,
/// `sum` is not touched.
pub struct AddRmsNorm<'a> {
    pub residual: Option<&'a Tensor>,
    pub gamma: &'a Tensor,
    pub sum: &'a Tensor,
    pub eps: f32,
}

impl CustomOp1 for AddRmsNorm<'_> {
    gpu_only_op1!("grating-add-rms-norm");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &AddRmsNorm<'_>,
            s: &CudaStorage,
            l: &Layout,
            d: usize,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let n = l.shape().elem_count();
            let x = view::<T>(s, l)?;
            let out = unsafe { dev.alloc::<T>(n)? };
            let f = kernel!(dev, "add_rms_norm", s.dtype());
            let (gamma, sum) = (Operand::of(op.gamma), Operand::of(op.sum));
            let residual = op.residual.map(Operand::of);
            let (gamma, sum) = (gamma.view::<T>()?, sum.view::<T>()?);
            let residual = residual.as_ref().map(|r| r.view::<T>()).transpose()?;
            if sum.len() != n || residual.as_ref().is_some_and(|r| r.len() != n) {
                bail!("add_rms_norm: operand sizes differ");
            }
            let mut b = f.builder();
            b.arg(&x);
            // A null residual pointer tells the kernel there is none.
            let null: u64 = 0;
            match &residual {
                Some(r) => b.arg(r),
                None => b.arg(&null),
            };
            b.arg(&gamma);
            b.arg(&out);
            b.arg(&sum);
            candle_core::builder_arg!(b, d as i32, op.eps);
            let cfg = LaunchConfig {
                grid_dim: ((n / d) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let d = *l.dims().last().unwrap_or(&0);
        if d == 0 || self.gamma.elem_count() != d {
            bail!("add_rms_norm: weight does not match the rows");
        }
        let out = dispatch!(s.dtype(), "add_rms_norm", run, self, s, l, d)?;
        Ok((out, l.shape().clone()))
    }
}

/// Head dimensions the flash attention kernel is instantiated for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Query rows per flash attention block (the tile table's granularity).
pub const FLASH_QUERY_TILE: usize = 64;

/// Flash attention over the packed sequences of a fused qkv projection, into packed
/// `[rows, nh * dh]` output. `tiles` is a u32 device tensor of (first row, length, first query
/// row) per query tile of [`FLASH_QUERY_TILE`] rows.
pub struct FlashAttention<'a> {
    pub tiles: &'a Tensor,
    pub n_tiles: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl CustomOp1 for FlashAttention<'_> {
    gpu_only_op1!("grating-flash-attention");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &FlashAttention<'_>,
            s: &CudaStorage,
            l: &Layout,
            rows: usize,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let f = kernel!(dev, format!("flash_attn_d{}", op.head_dim), s.dtype());
            let src = view::<T>(s, l)?;
            let out = unsafe { dev.alloc::<T>(rows * op.n_heads * op.head_dim)? };
            let tiles = Operand::of(op.tiles);
            let tiles = tiles.view::<u32>()?;
            let scale_log2 = std::f32::consts::LOG2_E / (op.head_dim as f32).sqrt();
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&out);
            b.arg(&tiles);
            candle_core::builder_arg!(
                b,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                scale_log2,
                op.causal as i32
            );
            let cfg = LaunchConfig {
                grid_dim: (op.n_tiles as u32, op.n_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        if !FLASH_HEAD_DIMS.contains(&self.head_dim) || self.n_heads % self.n_kv_heads != 0 {
            bail!("flash attention: head dim {} unsupported", self.head_dim);
        }
        // The kernel loads 16-byte chunks of k and v rows.
        if (l.start_offset() * s.dtype().size_in_bytes()) % 16 != 0 {
            bail!("flash attention: qkv is not 16-byte aligned");
        }
        if self.n_tiles == 0 || self.n_tiles >= u32::MAX as usize || self.n_heads > 65535 {
            bail!("flash attention: {} query tiles", self.n_tiles);
        }
        let rows = l.dims()[0];
        let out = match s.dtype() {
            DType::F16 => run::<half::f16>(self, s, l, rows)?,
            DType::BF16 => run::<half::bf16>(self, s, l, rows)?,
            d => bail!("flash attention: no kernel for {d:?}"),
        };
        Ok((out, Shape::from((rows, self.n_heads * self.head_dim))))
    }
}

/// cuBLASLt's scratch space, allocated per GEMM from the device's stream-ordered pool (so it
/// exists only while a GEMM runs and counts in the reported peak). 1 MiB is PyTorch's
/// long-standing cuBLASLt default; the large-M GEMMs of a reranker keep their fast kernels.
const LT_WORKSPACE_BYTES: usize = 1 << 20;

/// (m, n, k, dtype, with bias) of a GEMM.
type GemmKey = (u64, u64, u64, DType, bool);

/// An algorithm and the workspace it asked for.
#[derive(Clone, Copy)]
struct LtChoice {
    algo: lt_sys::cublasLtMatmulAlgo_t,
    workspace: usize,
}

/// The heuristic's algorithm for the described GEMM within [`LT_WORKSPACE_BYTES`]. (Timing
/// its other candidates was tried: on an H100 they ran the four Qwen3-0.6B projections within
/// 3% of its first pick, at 755-777 TFLOP/s.)
fn lt_heuristic(
    handle: lt_sys::cublasLtHandle_t,
    desc: lt_sys::cublasLtMatmulDesc_t,
    [a, b, c]: [lt_sys::cublasLtMatrixLayout_t; 3],
) -> Result<LtChoice> {
    let workspace_limit = LT_WORKSPACE_BYTES;
    let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
    let pref = LtGuard(pref, lt::destroy_matmul_pref);
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace_limit) as *const _ as *const _,
            std::mem::size_of_val(&workspace_limit),
        )
    }
    .map_err(|e| lt_err("preference", e))?;
    // Plain data, filled in by the call.
    let mut results: [lt_sys::cublasLtMatmulHeuristicResult_t; 1] = [unsafe { std::mem::zeroed() }];
    let mut found = 0i32;
    unsafe {
        lt_sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            a,
            b,
            c,
            c,
            pref.0,
            results.len() as i32,
            results.as_mut_ptr(),
            &mut found,
        )
    }
    .result()
    .map_err(|e| lt_err("heuristic", e))?;
    match results.first() {
        Some(r) if found > 0 && r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {
            Ok(LtChoice {
                algo: r.algo,
                workspace: r.workspaceSize,
            })
        }
        _ => bail!("cuBLASLt has no algorithm for this GEMM"),
    }
}

/// A cuBLASLt handle for one device and the algorithm the heuristic picked per GEMM shape
/// (querying it costs more than a small GEMM).
struct LtHandle {
    handle: lt_sys::cublasLtHandle_t,
    algos: Mutex<HashMap<GemmKey, LtChoice>>,
}

// cuBLASLt handles may be shared between threads; the work is ordered by the device's stream.
unsafe impl Send for LtHandle {}
unsafe impl Sync for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// Destroys a cuBLASLt descriptor when dropped.
struct LtGuard<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), lt::CublasError>);

impl<T: Copy> Drop for LtGuard<T> {
    fn drop(&mut self) {
        unsafe {
            let _ = (self.1)(self.0);
        }
    }
}

fn lt_err(what: &str, e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// The handle of `dev`. Entries of devices that were dropped (their cuBLAS handle is gone)
/// are released here, so creating devices over and over does not accumulate handles.
fn lt_handle(dev: &CudaDevice) -> Result<Arc<LtHandle>> {
    type Entry = (DeviceId, Weak<CudaBlas>, Arc<LtHandle>);
    static HANDLES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    handles.retain(|(_, alive, _)| alive.strong_count() > 0);
    if let Some((_, _, h)) = handles.iter().find(|(id, _, _)| *id == dev.id()) {
        return Ok(h.clone());
    }
    let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
    let h = Arc::new(LtHandle {
        handle,
        algos: Mutex::new(HashMap::new()),
    });
    handles.push((dev.id(), Arc::downgrade(&dev.cublas_handle()), h.clone()));
    Ok(h)
}

/// `x [.., in] · w[out, in]^T (+ b)` through cuBLASLt, as PyTorch issues its linear layers:
/// candle's strided-batched cuBLAS call reached a quarter of PyTorch's throughput on some
/// shapes. f16 and bf16 only (cuBLASLt would run f32 in TF32); f32 accumulation, the bias in
/// the epilogue. Operands must start 256-byte aligned (the heuristic assumes it).
pub struct LtLinear;

fn lt_linear<T: CudaDType + DeviceRepr>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let dev = x.0.device();
    let dtype = x.0.dtype();
    let data_type = match dtype {
        DType::F16 => lt_sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => lt_sys::cudaDataType_t::CUDA_R_16BF,
        d => bail!("cuBLASLt linear: {d:?} is not f16/bf16"),
    };
    let (out_dim, k) = w.1.shape().dims2()?;
    let dims = x.1.dims();
    if dims.last() != Some(&k) || k == 0 || out_dim == 0 {
        bail!("linear: input {dims:?} does not match weight {out_dim}x{k}");
    }
    let m = x.1.shape().elem_count() / k;
    let xv = view::<T>(x.0, x.1)?;
    let wv = view::<T>(w.0, w.1)?;
    let bv = match b {
        Some((s, l)) if l.shape().elem_count() == out_dim => Some(view::<T>(s, l)?),
        Some(_) => bail!("linear: bias does not match weight {out_dim}x{k}"),
        None => None,
    };
    let mut out = unsafe { dev.alloc::<T>(m.max(1) * out_dim)? };
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap() = out_dim;
    if m == 0 {
        return Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(shape),
        ));
    }
    let lt = lt_handle(dev)?;
    let stream = dev.cuda_stream();
    // Row-major y[m, out] = x[m, k] · w[out, k]^T is, column-major, y^T (out x m) =
    // op(A) B with A = w read as a k x out matrix and transposed, B = x read as k x m.
    let layout = |rows: usize, cols: usize, ld: usize| -> Result<LtGuard<_>> {
        let l = lt::create_matrix_layout(data_type, rows as u64, cols as u64, ld as i64)
            .map_err(|e| lt_err("layout", e))?;
        Ok(LtGuard(l, lt::destroy_matrix_layout))
    };
    let (a_l, b_l, c_l) = (
        layout(k, out_dim, k)?,
        layout(k, m, k)?,
        layout(out_dim, m, out_dim)?,
    );
    let desc = lt::create_matmul_desc(
        lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        lt_sys::cudaDataType_t::CUDA_R_32F,
    )
    .map_err(|e| lt_err("descriptor", e))?;
    let desc = LtGuard(desc, lt::destroy_matmul_desc);
    let set = |attr: lt_sys::cublasLtMatmulDescAttributes_t, ptr: *const std::ffi::c_void, n| {
        unsafe { lt::set_matmul_desc_attribute(desc.0, attr, ptr, n) }
            .map_err(|e| lt_err("attribute", e))
    };
    let trans: i32 = 1; // CUBLAS_OP_T
    set(
        lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
        (&trans) as *const _ as *const _,
        std::mem::size_of_val(&trans),
    )?;
    let (bias_ptr, _bias_sync) = match &bv {
        Some(v) => {
            let (p, g) = v.device_ptr(&stream);
            (Some(p), Some(g))
        }
        None => (None, None),
    };
    if let Some(p) = &bias_ptr {
        let epilogue = lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue) as *const _ as *const _,
            std::mem::size_of_val(&epilogue),
        )?;
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            p as *const _ as *const _,
            std::mem::size_of_val(p),
        )?;
    }
    let key = (
        m as u64,
        out_dim as u64,
        k as u64,
        dtype,
        bias_ptr.is_some(),
    );
    let cached = lt
        .algos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .copied();
    let choice = match cached {
        Some(c) => c,
        None => {
            let c = lt_heuristic(lt.handle, desc.0, [a_l.0, b_l.0, c_l.0])?;
            let mut algos = lt.algos.lock().unwrap_or_else(|p| p.into_inner());
            // Row counts vary per batch; a long-running server must not grow this forever.
            if algos.len() >= 4096 {
                algos.clear();
            }
            algos.insert(key, c);
            c
        }
    };
    {
        let (alpha, beta) = (1f32, 0f32);
        let (wp, _w_sync) = wv.device_ptr(&stream);
        let (xp, _x_sync) = xv.device_ptr(&stream);
        let (yp, _y_sync) = out.device_ptr_mut(&stream);
        // Freed (stream-ordered) right after the GEMM is queued.
        let workspace = unsafe { dev.alloc::<u8>(choice.workspace.max(1))? };
        let (wsp, _ws_sync) = workspace.device_ptr(&stream);
        unsafe {
            lt::matmul(
                lt.handle,
                desc.0,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                wp as *const _,
                a_l.0,
                xp as *const _,
                b_l.0,
                yp as *const _,
                c_l.0,
                yp as *mut _,
                c_l.0,
                &choice.algo,
                wsp as *mut _,
                choice.workspace,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| lt_err("matmul", e))?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(shape),
    ))
}

fn lt_dispatch(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    if w.0.dtype() != x.0.dtype() || b.is_some_and(|b| b.0.dtype() != x.0.dtype()) {
        bail!("linear: operand dtypes differ");
    }
    match x.0.dtype() {
        DType::F16 => lt_linear::<half::f16>(x, w, b),
        DType::BF16 => lt_linear::<half::bf16>(x, w, b),
        d => bail!("cuBLASLt linear: {d:?} is not f16/bf16"),
    }
}

impl CustomOp2 for LtLinear {
    fn name(&self) -> &'static str {
        "grating-lt-linear"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu("grating-lt-linear")
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        lt_dispatch((xs, xl), (ws, wl), None)
    }
}

impl CustomOp3 for LtLinear {
    fn name(&self) -> &'static str {
        "grating-lt-linear-bias"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu("grating-lt-linear")
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        lt_dispatch((xs, xl), (ws, wl), Some((bs, bl)))
    }
}

/// A page-locked buffer that small host-to-device copies go through, and the event recorded
/// after the last copy out of it (a refill waits for that copy).
struct PinnedBuf {
    host: PinnedHostSlice<u8>,
    copied: Option<CudaEvent>,
}

/// Idle page-locked buffers, smallest first. A copy out of pageable memory makes the driver
/// wait for everything queued on the stream before it starts (and then stage the bytes
/// itself), so every index or embedding upload used to stall the uploading thread until the
/// GPU ran dry, and hold the other thread's kernels up behind it.
static PINNED: Mutex<Vec<PinnedBuf>> = Mutex::new(Vec::new());
/// At most this many idle buffers are kept; smaller ones are given back first.
const PINNED_POOL: usize = 8;
/// Buffers are allocated in powers of two from this size (page-locking costs milliseconds).
const PINNED_MIN_BYTES: usize = 64 << 10;

fn pinned_err(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA driver: {e}"))
}

/// A `len`-element tensor of `shape` on `dev` whose elements `fill` writes on the host; the
/// copy goes out of page-locked memory on the device's stream, so it neither waits for the
/// queued kernels nor makes them wait for a staging copy.
fn upload_with<T: CudaDType + DeviceRepr + Copy>(
    dev: &CudaDevice,
    len: usize,
    shape: Shape,
    fill: impl FnOnce(&mut [T]),
) -> Result<Tensor> {
    if shape.elem_count() != len {
        bail!("upload: {len} elements for shape {shape:?}");
    }
    let mut dst = unsafe { dev.alloc::<T>(len)? };
    if len > 0 {
        copy_through_pinned(dev, &mut dst, fill)?;
    }
    let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// Fills a pooled page-locked buffer with `fill` and queues its copy into all of `dst`.
fn copy_through_pinned<T: DeviceRepr + Copy>(
    dev: &CudaDevice,
    dst: &mut CudaSlice<T>,
    fill: impl FnOnce(&mut [T]),
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, DevicePtrMut};
    let stream = dev.cuda_stream();
    let len = dst.len();
    let bytes = len * std::mem::size_of::<T>();
    let ctx = stream.context().clone();
    let taken = {
        let mut pool = PINNED.lock().unwrap_or_else(|p| p.into_inner());
        pool.iter()
            .position(|b| Arc::ptr_eq(b.host.context(), &ctx) && b.host.len() >= bytes)
            .map(|i| pool.remove(i))
    };
    let mut buf = match taken {
        Some(b) => b,
        None => PinnedBuf {
            // Ordinary (cached) page-locked memory: the host writes it element by element.
            host: unsafe {
                ctx.alloc_pinned_with_flags::<u8>(
                    bytes.next_power_of_two().max(PINNED_MIN_BYTES),
                    0,
                )
            }
            .map_err(pinned_err)?,
            copied: None,
        },
    };
    if let Some(e) = buf.copied.take() {
        e.synchronize().map_err(pinned_err)?;
    }
    let host = buf.host.as_mut_slice().map_err(pinned_err)?;
    if (host.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        bail!("page-locked buffer is not aligned for its elements");
    }
    // SAFETY: the buffer holds at least `bytes` bytes, is aligned for `T` (checked), no copy
    // out of it is in flight (waited for above), and `T` is a plain number type.
    let typed = unsafe { std::slice::from_raw_parts_mut(host.as_mut_ptr() as *mut T, len) };
    fill(typed);
    {
        let (dptr, _record) = dst.device_ptr_mut(&stream);
        // SAFETY: `dst` holds `len` elements; the source stays alive and untouched until the
        // event recorded below has passed.
        unsafe { result::memcpy_htod_async(dptr, &host[..bytes], stream.cu_stream()) }
            .map_err(pinned_err)?;
    }
    buf.copied = Some(stream.record_event(None).map_err(pinned_err)?);
    let mut pool = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    pool.push(buf);
    pool.sort_by_key(|b| b.host.len());
    while pool.len() > PINNED_POOL {
        let small = pool.remove(0);
        if let Some(e) = &small.copied {
            // Freeing page-locked memory under a copy in flight is undefined.
            e.synchronize().map_err(pinned_err)?;
        }
    }
    Ok(())
}

/// `data` as a u32 tensor of `shape` on `dev`, copied out of page-locked memory.
pub fn upload_u32(dev: &CudaDevice, data: &[u32], shape: Shape) -> Result<Tensor> {
    upload_with::<u32>(dev, data.len(), shape, |out| out.copy_from_slice(data))
}

/// `data` converted to `dtype` on the host, as a tensor of `shape` on `dev`, copied out of
/// page-locked memory (half the bytes of an f32 upload for f16/bf16, and no conversion kernel).
pub fn upload_f32_as(dev: &CudaDevice, data: &[f32], dtype: DType, shape: Shape) -> Result<Tensor> {
    let n = data.len();
    match dtype {
        DType::F32 => upload_with::<f32>(dev, n, shape, |out| out.copy_from_slice(data)),
        DType::F16 => upload_with::<half::f16>(dev, n, shape, |out| {
            for (o, &x) in out.iter_mut().zip(data) {
                *o = half::f16::from_f32(x);
            }
        }),
        DType::BF16 => upload_with::<half::bf16>(dev, n, shape, |out| {
            for (o, &x) in out.iter_mut().zip(data) {
                *o = half::bf16::from_f32(x);
            }
        }),
        d => bail!("upload: {d:?} is not a float type the engine computes in"),
    }
}
