//! Element-wise and per-row kernels: SwiGLU, GELU, q/k norm + rotary, residual + RMSNorm.

use super::{check_u32, linear_launch, no_cpu, view, Operand};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp1, InplaceOp3, Layout, Result, Shape,
    Storage, Tensor,
};
use std::sync::Mutex;

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
            // SAFETY: uninitialised until the launch below, which writes all of it: the
            // kernel's grid-stride loop stores `out[i]` for every i < rows * inter.
            let dst = unsafe { dev.alloc::<T>(rows * inter)? };
            let f = kernel!(dev, "silu_mul", s.dtype());
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&dst);
            candle_core::builder_arg!(b, rows as u32, inter as u32);
            // SAFETY: the arguments match kernels.cu's `silu_mul(const T *gu, T *out,
            // uint32_t rows, uint32_t inter)`; `src` holds rows * 2 * inter elements and `dst`
            // rows * inter (the shape is checked below), so the kernel's reads
            // `gu[r * 2 * inter + j]`, `gu[.. + inter + j]` and write `out[i]`, i < rows *
            // inter, stay in bounds, and its 32-bit indices do not wrap (`check_u32`).
            unsafe { b.launch(linear_launch(rows * inter)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        check_u32("silu_mul", l.shape().elem_count())?;
        let (rows, width) = l.shape().dims2()?;
        if self.inter == 0 || width != 2 * self.inter {
            bail!("silu_mul: width {width} is not 2 x {}", self.inter);
        }
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
            // SAFETY: the arguments match kernels.cu's `gelu_erf_inplace(T *x, uint32_t n)`;
            // `x` is the tensor's own n = z - a contiguous elements, held mutably for the op, and
            // the grid-stride loop touches `x[i]` for i < n only (n fits 32 bits: `check_u32`).
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
            // SAFETY: uninitialised until the launch below, which writes all of it: one warp
            // per (row, head) for every row < rows and head < nh + 2 nkv (grid covers rows *
            // heads warps), v heads copying lanes i < dh and q/k heads writing `y[i]` and
            // `y[i + dh / 2]` for every i < dh / 2 (dh is even: checked below).
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
            let half = op.head_dim / 2;
            if qg.len() != op.head_dim
                || kg.len() != op.head_dim
                || pos.len() != rows
                || cos.len() != sin.len()
                || cos.len() % half != 0
            {
                bail!(
                    "qk_norm_rope: operands do not match {rows} rows of head dim {}",
                    op.head_dim
                );
            }
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
            // SAFETY: the arguments match kernels.cu's `qk_norm_rope(const T *qkv, T *out,
            // const float *cos_t, const float *sin_t, const uint32_t *pos, const T *q_gamma,
            // const T *k_gamma, int nh, int nkv, int dh, float eps, int64_t rows)`. qkv and out
            // hold rows * heads * dh elements (checked below), the gammas dh and `pos` one per
            // row (checked above); the tables are `[max_pos, dh / 2]` and every position is
            // below max_pos: `ops::qk_norm_rope` refuses a layout longer than the table and
            // builds the positions from that layout. 256 threads are the 8 warps per block the
            // kernel's item index assumes.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        let heads = self.n_heads + 2 * self.n_kv_heads;
        let (rows, width) = l.shape().dims2()?;
        if width != heads * self.head_dim {
            bail!(
                "qk_norm_rope: width {width} is not {heads} heads of {}",
                self.head_dim
            );
        }
        check_u32("qk_norm_rope", (rows * heads).div_ceil(8))?;
        if self.head_dim % 2 != 0 || self.head_dim == 0 {
            bail!("qk_norm_rope: head dim {} unsupported", self.head_dim);
        }
        let out = dispatch!(s.dtype(), "qk_norm_rope", run, self, s, l)?;
        Ok((out, l.shape().clone()))
    }
}

/// The residual (read) and the sum (written in place) of a residual add + RMSNorm.
type ResidualSum<'a> = (
    (&'a CudaStorage, &'a Layout),
    (&'a mut CudaStorage, &'a Layout),
);

/// Launches `add_rms_norm` over the rows of `x` (last dimension `d`): the normalised rows go
/// to a fresh tensor, returned; with a residual, `x + residual` is also stored into `sum`.
fn add_rms_norm<T: CudaDType + DeviceRepr>(
    x: (&CudaStorage, &Layout),
    residual: Option<ResidualSum<'_>>,
    gamma: &Tensor,
    eps: f32,
) -> Result<CudaStorage> {
    let (s, l) = x;
    let dev = s.device().clone();
    let n = l.shape().elem_count();
    let d = *l.dims().last().unwrap_or(&0);
    if d == 0 || gamma.elem_count() != d {
        bail!("add_rms_norm: weight does not match the rows");
    }
    // One block per row: the row count is the grid's x dimension.
    check_u32("add_rms_norm rows", n / d)?;
    let xv = view::<T>(s, l)?;
    let gamma = Operand::of(gamma);
    let gamma = gamma.view::<T>()?;
    let f = kernel!(&dev, "add_rms_norm", s.dtype());
    // SAFETY: uninitialised until the launch below, which writes all of it: one block per row
    // (grid n / d), each block's threads stride over the row's d columns and store every
    // `out[row * d + j]` (kernels.cu `add_rms_norm`, last loop).
    let out = unsafe { dev.alloc::<T>(n)? };
    let mut b = f.builder();
    b.arg(&xv);
    let mut views = None;
    if let Some(((rs, rl), (ss, sl))) = residual {
        let rv = view::<T>(rs, rl)?;
        let Some((a, z)) = sl.contiguous_offsets() else {
            bail!("add_rms_norm: sum must be contiguous")
        };
        let sv = ss.as_cuda_slice_mut::<T>()?.slice_mut(a..z);
        if rv.len() != n || sv.len() != n {
            bail!("add_rms_norm: operand sizes differ");
        }
        views = Some((rv, sv));
    }
    // A null residual (and sum) pointer tells the kernel there is none; it then reads x alone
    // and never touches `sum`.
    let null: u64 = 0;
    match &mut views {
        Some((rv, sv)) => {
            b.arg(&*rv);
            b.arg(&gamma);
            b.arg(&out);
            b.arg(sv);
        }
        None => {
            b.arg(&null);
            b.arg(&gamma);
            b.arg(&out);
            b.arg(&null);
        }
    }
    candle_core::builder_arg!(b, d as i32, eps);
    let cfg = LaunchConfig {
        grid_dim: ((n / d) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match kernels.cu's `add_rms_norm(const T *x, const T *res,
    // const T *gamma, T *out, T *sum, int d, float eps)` in order and type; x, residual, sum
    // and out hold n = rows * d elements and gamma d (checked above), so the kernel's indices
    // `row * d + j` (row < n / d, j < d) and `j` stay in bounds; 256 threads make the 8 warp
    // sums its shared array of 32 expects; with null res/sum it reads neither.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// RMSNorm with `gamma` of the rows of the tensor it is applied to (no residual).
pub struct RmsNorm<'a> {
    pub gamma: &'a Tensor,
    pub eps: f32,
}

impl CustomOp1 for RmsNorm<'_> {
    gpu_only_op1!("grating-rms-norm");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.gamma;
        let run = |x| match s.dtype() {
            DType::F32 => add_rms_norm::<f32>(x, None, g, self.eps),
            DType::F16 => add_rms_norm::<half::f16>(x, None, g, self.eps),
            DType::BF16 => add_rms_norm::<half::bf16>(x, None, g, self.eps),
            d => bail!("add_rms_norm: no GPU kernel for {d:?}"),
        };
        Ok((run((s, l))?, l.shape().clone()))
    }
}

/// `x + residual` written in place into the tensor the op is applied to (`sum`, which the
/// caller owns), then RMSNorm with `gamma`; the normalised rows come back through
/// [`AddRmsNorm::take_normed`]. One kernel writes both, and a candle op has one mutable
/// storage, so the second output is handed over here rather than written through a shared
/// reference.
pub struct AddRmsNorm<'a> {
    pub gamma: &'a Tensor,
    pub eps: f32,
    normed: Mutex<Option<CudaStorage>>,
}

impl<'a> AddRmsNorm<'a> {
    pub fn new(gamma: &'a Tensor, eps: f32) -> Self {
        AddRmsNorm {
            gamma,
            eps,
            normed: Mutex::new(None),
        }
    }

    /// The normalised rows of the last run, as a tensor of `shape`.
    pub fn take_normed(&self, shape: &Shape) -> Result<Tensor> {
        let taken = self.normed.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(storage) = taken else {
            bail!("add_rms_norm: the op has not run")
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape.clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

impl InplaceOp3 for AddRmsNorm<'_> {
    fn name(&self) -> &'static str {
        "grating-add-rms-norm"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("add_rms_norm is a GPU kernel")
    }
    fn cuda_fwd(
        &self,
        sum: &mut CudaStorage,
        sl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        if sum.dtype() != x.dtype() || r.dtype() != x.dtype() || sl.dims() != xl.dims() {
            bail!("add_rms_norm: operands differ in dtype or shape");
        }
        let (g, eps) = (self.gamma, self.eps);
        let normed = match x.dtype() {
            DType::F32 => add_rms_norm::<f32>((x, xl), Some(((r, rl), (sum, sl))), g, eps),
            DType::F16 => add_rms_norm::<half::f16>((x, xl), Some(((r, rl), (sum, sl))), g, eps),
            DType::BF16 => add_rms_norm::<half::bf16>((x, xl), Some(((r, rl), (sum, sl))), g, eps),
            d => bail!("add_rms_norm: no GPU kernel for {d:?}"),
        }?;
        *self.normed.lock().unwrap_or_else(|p| p.into_inner()) = Some(normed);
        Ok(())
    }
}
