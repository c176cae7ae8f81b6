//! candle custom ops over the fused kernels of `kernels.cu` (compiled to PTX by build.rs),
//! cuBLASLt linear layers, and uploads through page-locked memory. Each op works on
//! contiguous CUDA tensors of f32, f16 or bf16; the callers in `ops` check that and otherwise
//! use candle's generic ops.
//!
//! This file holds what the ops share: kernel loading, launch shapes, operand views, dtype
//! dispatch.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CpuStorage, CudaStorage, Layout, Result, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "grating_kernels";

/// Loads kernel `name` for `dtype` (the module is loaded once per device).
macro_rules! kernel {
    ($dev:expr, $name:expr, $dtype:expr) => {{
        let suffix = match $dtype {
            candle_core::DType::F32 => "f32",
            candle_core::DType::F16 => "f16",
            candle_core::DType::BF16 => "bf16",
            d => bail!("{}: no GPU kernel for {d:?}", $name),
        };
        $dev.get_or_load_custom_func(
            &format!("{}_{suffix}", $name),
            $crate::ops::cuda::MODULE,
            $crate::ops::cuda::PTX,
        )?
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
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
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

mod attention;
mod cublaslt;
mod elementwise;
mod upload;

pub use attention::{
    AttnPack, AttnUnpack, Bucket, FlashAttention, MaskedSoftmax, FLASH_HEAD_DIMS, FLASH_QUERY_TILE,
};
pub use cublaslt::LtLinear;
pub use elementwise::{AddRmsNorm, GeluErf, QkNormRope, RmsNorm, SiluMul};
pub use upload::{upload_f32_as, upload_u32};
