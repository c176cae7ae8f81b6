//! Tensor-level operations the model files are written in.
//!
//! Each op takes candle tensors and picks its implementation: contiguous f32 tensors on the CPU
//! go to the kernels in `cpu` (BLAS GEMMs, vectorised element-wise passes, packed attention),
//! anything else (CUDA, Metal, half precision) to candle's generic ops. Model files therefore
//! stay device-agnostic while the CPU hot path avoids candle's single-threaded generic ops.
//!
//! This file holds what every op shares (the packed-sequence layout, the device predicates
//! that pick a path, the upload helpers); each family of ops lives in its own module.

// Every unsafe block in ops states why it is sound (the crate-wide setting may come later).
#![warn(clippy::undocumented_unsafe_blocks)]

mod attention;
#[cfg(feature = "openblas")]
pub(crate) mod blas;
pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod gpu_paths;
mod linear;
mod norm;
pub mod profile;
mod rope;
mod threads;

use candle_core::{CpuStorage, DType, Device, Storage, StorageRef, Tensor};

pub use attention::{attention, attention_with, length_buckets, AttentionKernel};
pub use cpu::{AttentionShape, RopeTable};
#[cfg(feature = "cuda")]
use gpu_paths::gpu_path_enabled;
pub use gpu_paths::{set_generic_gpu_paths, GpuPath};
pub use linear::{gelu, linear, linear_gelu, silu_mul};
pub use norm::{add_layer_norm, add_rms_norm};
pub use profile::set_stage_profile;
pub use rope::{linear_qk_norm_rope, qk_norm_rope};
pub use threads::{set_threads, threads};

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

    /// Whether the spans tile rows `0..rows` in order, without gaps or overlaps: what the GPU
    /// attention kernels rely on to stay within the rows and to write every output row.
    pub fn packs(&self, rows: usize) -> bool {
        let mut next = 0;
        for &(start, len) in &self.spans {
            if start != next {
                return false;
            }
            next += len;
        }
        next == rows
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    pub fn rand_tensor(dims: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
}
