//! candle custom ops over the fused kernels of `kernels.cu` (compiled to PTX by build.rs).
//! Each op works on contiguous CUDA tensors of f32, f16 or bf16; the callers in `ops` check
//! that and otherwise use candle's generic ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp1, InplaceOp2, Layout, Result, Shape,
    Storage, Tensor,
};

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

/// `silu(gate) * up` over a `[rows, 2 * inter]` projection.
pub struct SiluMul {
    pub inter: usize,
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "grating-silu-mul"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }
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
    fn name(&self) -> &'static str {
        "grating-qk-norm-rope"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }
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
                op.eps
            );
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, heads as u32, 1),
                block_dim: ((op.head_dim / 2) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        if self.head_dim % 2 != 0 || self.head_dim > 1024 {
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
    fn name(&self) -> &'static str {
        "grating-attn-pack"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }
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
