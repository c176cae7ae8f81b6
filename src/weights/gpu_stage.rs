//! The GPU side of layer streaming: the I/O thread reads a layer into pinned (page-locked)
//! host memory and copies it to a device staging buffer on a stream of its own, so the copy
//! overlaps the current layer's kernels on the compute stream. The compute thread then builds
//! the layer's tensors out of the staging buffer with device-to-device copies.
//!
//! Synchronisation is explicit, with events: the compute stream waits for a layer's upload
//! before reading it, and the copy stream waits until the compute stream has read a staging
//! buffer before overwriting it; the host waits for an upload out of a pinned buffer to finish
//! before refilling it.

use super::plan::LayerPlan;
use super::{check_entry, TensorEntry, TensorSource};
use crate::error::{GratingError, Result};
use candle_core::cuda::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, DriverError, PinnedHostSlice,
};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, DeviceLocation, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// Staging buffers and copy streams outlive a pass: the server starts a one-layer stream per
/// step, and page-locked allocations, device buffers and streams cost milliseconds to create.
/// At most this many idle staging pairs are kept per process.
const POOL_LIMIT: usize = 4;

struct Buffers {
    location: DeviceLocation,
    host: PinnedHostSlice<u8>,
    blob: CudaSlice<u8>,
    /// Recorded on the compute stream once the last layer was copied out of `blob`.
    consumed: Option<CudaEvent>,
    /// Recorded on the copy stream after the last upload out of `host`.
    upload_done: Option<CudaEvent>,
}

static POOL: Mutex<Vec<Buffers>> = Mutex::new(Vec::new());
static LINKS: Mutex<Vec<(DeviceLocation, GpuLink)>> = Mutex::new(Vec::new());

fn driver(e: DriverError) -> GratingError {
    GratingError::Backend(candle_core::Error::Msg(format!("CUDA driver: {e}")))
}

/// The two streams layer streaming uses on one GPU.
#[derive(Clone)]
pub struct GpuLink {
    device: CudaDevice,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
}

impl GpuLink {
    /// `None` for a CPU device.
    pub fn for_device(device: &Device) -> Result<Option<GpuLink>> {
        let Device::Cuda(dev) = device else {
            return Ok(None);
        };
        let mut links = LINKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, l)) = links.iter().find(|(loc, _)| *loc == device.location()) {
            return Ok(Some(l.clone()));
        }
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        // Streams are ordered by the events below; cudarc's per-allocation event tracking
        // (which turns on once a second stream exists) would add two events to every tensor
        // candle allocates.
        // SAFETY: from here on this module orders the two streams itself: a staging device
        // buffer is allocated on the copy stream and first used there (the upload), the
        // compute stream reads it only after `await_upload` waits for the upload's event, and
        // the copy stream rewrites it only after waiting for the `consumed` event recorded on
        // the compute stream; the tensors copied out of it live on the compute stream alone.
        // A buffer freed for good (the pool is full) is freed in the copy stream's order after
        // that stream waits for `consumed` (see `GpuStaging`'s `Drop`).
        unsafe { ctx.disable_event_tracking() };
        let copy = ctx.new_stream().map_err(driver)?;
        let link = GpuLink {
            device: dev.clone(),
            compute,
            copy,
        };
        links.push((device.location(), link.clone()));
        Ok(Some(link))
    }

    /// A staging pair (pinned host buffer, device buffer) of at least `bytes`, from the pool
    /// when one is idle.
    pub fn staging(&self, bytes: usize) -> Result<GpuStaging> {
        let bytes = bytes.max(1);
        let location = Device::Cuda(self.device.clone()).location();
        {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            let fits = |b: &Buffers| b.location == location && b.blob.len() >= bytes;
            let upload_finished =
                |b: &Buffers| b.upload_done.as_ref().is_none_or(|e| e.is_complete());
            // A buffer whose last upload has finished, returned longest ago. The one returned
            // last is often still being copied to the GPU (a layer goes back to the pool as
            // soon as its tensors are queued): refilling it would wait for that copy. With
            // fewer than two fitting buffers idle a new one is made (once); with two, the
            // older copy ends first.
            let pick = pool
                .iter()
                .position(|b| fits(b) && upload_finished(b))
                .or_else(|| {
                    (pool.iter().filter(|b| fits(b)).count() >= 2)
                        .then(|| pool.iter().position(fits))
                        .flatten()
                });
            if let Some(i) = pick {
                return Ok(GpuStaging {
                    buffers: Some(pool.remove(i)),
                    uploaded: None,
                    reading: None,
                });
            }
        }
        // Ordinary (cached) page-locked memory: the reader writes it through the page cache
        // copy, which write-combined memory would slow down.
        // SAFETY: the bytes come back uninitialised and are zeroed below before any reference
        // to them exists.
        let mut host = unsafe { self.copy.context().alloc_pinned_with_flags::<u8>(bytes, 0) }
            .map_err(driver)?;
        let start = host.as_mut_ptr().map_err(driver)?;
        // SAFETY: `start` points to the `bytes` bytes just allocated, which nothing else uses
        // yet (no copy has been queued out of them). Zeroed once per pooled buffer, so that
        // `host_mut` never hands out a slice over uninitialised bytes.
        unsafe { std::ptr::write_bytes(start, 0, bytes) };
        // SAFETY: uninitialised until `upload` copies the whole host buffer (the same `bytes`)
        // into it; tensors are read out of it only after `await_upload`.
        let blob = unsafe { self.copy.alloc::<u8>(bytes) }.map_err(driver)?;
        Ok(GpuStaging {
            buffers: Some(Buffers {
                location,
                host,
                blob,
                consumed: None,
                upload_done: None,
            }),
            uploaded: None,
            reading: None,
        })
    }
}

/// One layer's bytes on their way to the GPU. Dropping it returns its buffers to the pool
/// (with the event a reuse must wait for).
pub struct GpuStaging {
    buffers: Option<Buffers>,
    /// Recorded on the copy stream after the upload.
    uploaded: Option<CudaEvent>,
    /// The compute stream, from `await_upload` until `release`: reads of the device buffer
    /// may be queued on it.
    reading: Option<Arc<CudaStream>>,
}

impl Drop for GpuStaging {
    fn drop(&mut self) {
        let Some(mut b) = self.buffers.take() else {
            return;
        };
        // Dropped between `await_upload` and `release` (building the layer failed): the
        // reads queued so far still count for whoever writes or frees the buffer next.
        if let Some(compute) = self.reading.take() {
            match compute.record_event(None) {
                Ok(e) => b.consumed = Some(e),
                Err(_) => {
                    let _ = compute.synchronize();
                }
            }
        }
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_LIMIT {
            pool.push(b);
            return;
        }
        drop(pool);
        // Freed for good. The device buffer is freed in its (copy) stream's order, so that
        // stream first waits for the compute stream's reads; the pinned host buffer waits for
        // the upload out of it on its own before it is freed.
        if let Some(e) = &b.consumed {
            if b.blob.stream().wait(e).is_err() {
                let _ = e.synchronize();
            }
        }
    }
}

impl GpuStaging {
    fn buffers(&self) -> &Buffers {
        self.buffers
            .as_ref()
            .expect("staging buffers present until drop")
    }

    fn buffers_mut(&mut self) -> &mut Buffers {
        self.buffers
            .as_mut()
            .expect("staging buffers present until drop")
    }

    /// The host bytes to fill, once the previous upload out of them has finished.
    pub fn host_mut(&mut self, len: usize) -> Result<&mut [u8]> {
        let s = self.buffers_mut().host.as_mut_slice().map_err(driver)?;
        if len > s.len() {
            return Err(GratingError::Internal(format!(
                "layer of {len} bytes does not fit its {} byte staging buffer",
                s.len()
            )));
        }
        Ok(&mut s[..len])
    }

    /// Queues the upload of the host bytes on the copy stream, after the compute stream is
    /// done with the previous contents of the device buffer.
    pub fn upload(&mut self, link: &GpuLink) -> Result<()> {
        let b = self.buffers_mut();
        if let Some(e) = b.consumed.take() {
            link.copy.wait(&e).map_err(driver)?;
        }
        link.copy
            .memcpy_htod(&b.host, &mut b.blob)
            .map_err(driver)?;
        b.upload_done = Some(link.copy.record_event(None).map_err(driver)?);
        self.uploaded = Some(link.copy.record_event(None).map_err(driver)?);
        Ok(())
    }

    /// Makes the compute stream wait for the upload.
    pub fn await_upload(&mut self, link: &GpuLink) -> Result<()> {
        if let Some(e) = self.uploaded.take() {
            link.compute.wait(&e).map_err(driver)?;
        }
        self.reading = Some(link.compute.clone());
        Ok(())
    }

    /// Marks the device buffer as read by everything queued so far on the compute stream.
    pub fn release(&mut self, link: &GpuLink) -> Result<()> {
        self.buffers_mut().consumed = Some(link.compute.record_event(None).map_err(driver)?);
        self.reading = None;
        Ok(())
    }

    fn tensor_at<T: DeviceRepr + candle_core::cuda::CudaDType>(
        &self,
        link: &GpuLink,
        offset: usize,
        entry: &TensorEntry,
    ) -> Result<Tensor> {
        let elems: usize = entry.shape.iter().product();
        let view = self.buffers().blob.slice(offset..offset + entry.byte_len());
        // SAFETY: `T` is f16, bf16 or f32, for which every bit pattern is a valid value; the
        // view is only a byte source of a device-to-device copy, so its alignment does not
        // matter, and `transmute` itself refuses a view shorter than `elems` elements.
        let typed = unsafe { view.transmute::<T>(elems) }
            .ok_or_else(|| GratingError::Internal("staging view shorter than its tensor".into()))?;
        let owned = link.compute.clone_dtod(&typed).map_err(driver)?;
        let storage = CudaStorage::wrap_cuda_slice(owned, link.device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            entry.shape.clone(),
            BackpropOp::none(),
            false,
        ))
    }
}

/// Serves one streamed layer's tensors out of its device staging buffer.
pub struct StagedSource<'a> {
    pub link: &'a GpuLink,
    pub staging: &'a GpuStaging,
    pub plan: &'a LayerPlan,
    pub dtype: DType,
}

impl TensorSource for StagedSource<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.plan.get_with(name, |off, e| {
            check_entry(name, e, shape)?;
            let t = match e.dtype {
                DType::F16 => self.staging.tensor_at::<half::f16>(self.link, off, e)?,
                DType::BF16 => self.staging.tensor_at::<half::bf16>(self.link, off, e)?,
                _ => self.staging.tensor_at::<f32>(self.link, off, e)?,
            };
            Ok(if e.dtype != self.dtype {
                t.to_dtype(self.dtype)?
            } else {
                t
            })
        })
    }
    fn contains(&self, name: &str) -> bool {
        self.plan.locate(name).is_some()
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.plan.shape_of(name)
    }
}
