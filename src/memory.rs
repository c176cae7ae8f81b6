//! Process memory readings (Linux /proc), for stats and benchmarks.

fn status_kib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
}

/// Peak resident set size (VmHWM) in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    status_kib("VmHWM:").map(|k| k / 1024.0)
}

/// Current resident set size (VmRSS) in MiB.
pub fn rss_mib() -> Option<f64> {
    status_kib("VmRSS:").map(|k| k / 1024.0)
}

/// GPU memory as the allocator sees it. candle allocates through the device's default
/// stream-ordered memory pool, whose counters give an exact high-water mark (the analogue of
/// PyTorch's `max_memory_allocated`), unlike sampling `cuMemGetInfo` between kernels.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GpuMemory {
    /// Peak bytes in use by allocations since the last reset.
    pub peak_used: u64,
    /// Peak bytes the pool held from the driver since the last reset.
    pub peak_reserved: u64,
    /// Bytes in use on the whole device now (`cuMemGetInfo`), context and libraries included.
    pub device_used: u64,
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::GpuMemory;
    use candle_core::cuda::cudarc::driver::sys;
    use candle_core::Device;

    /// The device's default memory pool (the one candle allocates from) and its context.
    fn pool(
        device: &Device,
    ) -> Option<(
        sys::CUmemoryPool,
        std::sync::Arc<candle_core::cuda::cudarc::driver::CudaContext>,
    )> {
        let Device::Cuda(dev) = device else {
            return None;
        };
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a writable CUmemoryPool out-parameter and `cu_device()` the device
        // of the context made current just above.
        let rc = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some((pool, ctx))
    }

    fn attr(pool: sys::CUmemoryPool, a: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: `pool` is the device's default pool (it lives as long as the context), and
        // both attributes read here (USED_MEM_HIGH, RESERVED_MEM_HIGH) are cuuint64_t, which
        // `v` is.
        let rc = unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut _) };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub fn read(device: &Device) -> Option<GpuMemory> {
        let (pool, ctx) = pool(device)?;
        let (free, total) = ctx.mem_get_info().ok()?;
        Some(GpuMemory {
            peak_used: attr(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            )?,
            peak_reserved: attr(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            )?,
            device_used: (total - free) as u64,
        })
    }

    pub fn keep_pool(device: &Device) {
        if let Some((pool, _)) = pool(device) {
            let mut keep: u64 = u64::MAX;
            // SAFETY: `pool` is the device's default pool; RELEASE_THRESHOLD is a cuuint64_t,
            // which `keep` is, and the call only reads it.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut _,
                )
            };
        }
    }

    pub fn reset(device: &Device) {
        if let Some((pool, _)) = pool(device) {
            // The high-water marks can only be reset to zero (they restart from current use).
            for a in [
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero: u64 = 0;
                // SAFETY: `pool` is the device's default pool; both high-water attributes are
                // cuuint64_t, which `zero` is, and the call only reads it.
                unsafe { sys::cuMemPoolSetAttribute(pool, a, &mut zero as *mut u64 as *mut _) };
            }
        }
    }
}

/// The GPU allocator's counters for `device`; `None` on the CPU or without the `cuda` feature.
pub fn gpu_memory(device: &candle_core::Device) -> Option<GpuMemory> {
    #[cfg(feature = "cuda")]
    {
        gpu::read(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Lets the GPU allocator keep freed memory for reuse instead of returning it to the driver at
/// every synchronisation (each layer's score readback is one), which made the next layer's
/// allocations map fresh memory. Peak memory is unchanged: the pool never holds more than its
/// high-water mark.
pub fn keep_gpu_pool(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    gpu::keep_pool(device);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Restarts the GPU high-water marks (per request or per benchmark run).
pub fn reset_gpu_peak(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    gpu::reset(device);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}
