//! Host-to-device copies through a pool of page-locked buffers.

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

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
fn upload_with<T: CudaDType + DeviceRepr + bytemuck::Pod>(
    dev: &CudaDevice,
    len: usize,
    shape: Shape,
    fill: impl FnOnce(&mut [T]),
) -> Result<Tensor> {
    if shape.elem_count() != len {
        bail!("upload: {len} elements for shape {shape:?}");
    }
    // SAFETY: uninitialised until the copy below, which writes all `len` elements (the whole
    // host buffer of len * size_of::<T>() bytes); with len == 0 there is nothing to read, and
    // if the copy fails the slice is dropped unread.
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
fn copy_through_pinned<T: DeviceRepr + bytemuck::Pod>(
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
        None => {
            // Ordinary (cached) page-locked memory: the host writes it element by element.
            // SAFETY: the memory comes back uninitialised; it is zeroed below before any
            // reference to it exists.
            let mut host = unsafe {
                ctx.alloc_pinned_with_flags::<u8>(
                    bytes.next_power_of_two().max(PINNED_MIN_BYTES),
                    0,
                )
            }
            .map_err(pinned_err)?;
            let ptr = host.as_mut_ptr().map_err(pinned_err)?;
            // SAFETY: `ptr` is the start of the `host.len()` bytes just allocated, writable
            // and not yet referenced; no copy uses them yet.
            unsafe { std::ptr::write_bytes(ptr, 0, host.len()) };
            PinnedBuf { host, copied: None }
        }
    };
    if let Some(e) = buf.copied.take() {
        if let Err(err) = e.synchronize() {
            // The last copy out of it may still run: leak the buffer rather than free it.
            std::mem::forget(buf);
            return Err(pinned_err(err));
        }
    }
    let host = buf.host.as_mut_slice().map_err(pinned_err)?;
    // No copy out of the buffer is in flight (waited for above), so it may be rewritten.
    let typed: &mut [T] = bytemuck::try_cast_slice_mut(&mut host[..bytes])
        .map_err(|e| candle_core::Error::Msg(format!("page-locked buffer as elements: {e}")))?;
    fill(typed);
    {
        let (dptr, _record) = dst.device_ptr_mut(&stream);
        // SAFETY: `dptr` is `dst`'s allocation of `len` elements = `bytes` bytes, and the copy
        // is queued on `stream`, the stream its guard `_record` orders it on; the source is
        // page-locked (so the copy is truly asynchronous) and stays allocated and unwritten
        // until the event recorded right after has passed: the pool hands the buffer out again
        // only after waiting for that event, and frees it only after waiting too.
        unsafe { result::memcpy_htod_async(dptr, &host[..bytes], stream.cu_stream()) }
            .map_err(pinned_err)?;
    }
    match stream.record_event(None) {
        Ok(e) => buf.copied = Some(e),
        Err(err) => {
            // Without an event the copy's end is unknown: wait for the whole stream before the
            // buffer can be freed.
            if stream.synchronize().is_err() {
                std::mem::forget(buf);
            }
            return Err(pinned_err(err));
        }
    }
    let mut pool = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    pool.push(buf);
    pool.sort_by_key(|b| b.host.len());
    while pool.len() > PINNED_POOL {
        let small = pool.remove(0);
        if let Some(e) = &small.copied {
            // Freeing page-locked memory under a copy in flight is undefined.
            if let Err(err) = e.synchronize() {
                std::mem::forget(small);
                return Err(pinned_err(err));
            }
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
