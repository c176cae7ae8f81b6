//! Linear layers through cuBLASLt.

use super::{no_cpu, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys as lt_sys};
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

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
    // The attribute is a uint64_t.
    let workspace_limit = LT_WORKSPACE_BYTES as u64;
    let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
    let pref = LtGuard(pref, lt::destroy_matmul_pref);
    // SAFETY: `pref.0` is a live preference (created above, destroyed when `pref` drops at the
    // end of this function); the value pointer and size describe a u64 local that outlives the
    // call, which copies it.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace_limit) as *const _ as *const _,
            std::mem::size_of_val(&workspace_limit),
        )
    }
    .map_err(|e| lt_err("preference", e))?;
    // SAFETY: cublasLtMatmulHeuristicResult_t holds a u64 array, a usize, an f32, an int array
    // and a cublasStatus_t whose 0 is CUBLAS_STATUS_SUCCESS: all-zero bytes are a valid value
    // (and the call below overwrites it).
    let mut results: [lt_sys::cublasLtMatmulHeuristicResult_t; 1] = [unsafe { std::mem::zeroed() }];
    let mut found = 0i32;
    // SAFETY: the handle is live (held by the caller's `LtHandle`), the descriptor and the
    // three layouts are live (their guards outlive this call in `lt_linear`), `pref.0` too;
    // `results` has room for the 1 result requested and `found` is a writable i32.
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

// SAFETY: a cuBLASLt handle is an opaque library context that NVIDIA documents as usable
// from any host thread (cuBLAS's thread-safety rules: calls may share a handle as long as its
// configuration is not changed concurrently). This one is never reconfigured after creation:
// every matmul passes its own stream, workspace and descriptors. The algorithm cache, the only
// mutable field, is behind its Mutex.
unsafe impl Send for LtHandle {}
// SAFETY: as for `Send`: shared use only issues calls that take all their state as arguments.
unsafe impl Sync for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: `handle` came from `create_handle` in `lt_handle`, is owned by this value
        // alone (the field is private and never copied out), and is destroyed exactly once,
        // here; the last `Arc` is gone, so no GEMM of this process is still being issued
        // through it (queued GEMMs do not use the handle once issued).
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// Destroys a cuBLASLt descriptor when dropped. Built only right after a successful create,
/// with that create's destroy function; `.0` is used only while the guard lives.
struct LtGuard<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), lt::CublasError>);

impl<T: Copy> Drop for LtGuard<T> {
    fn drop(&mut self) {
        // SAFETY: `self.1` is the destroy function matching the create that produced `self.0`
        // (each `LtGuard(..)` in this file pairs them), the descriptor is destroyed once, here,
        // and no copy of it is used after the guard is gone.
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
    // The algorithm heuristic assumes 256-byte aligned operands (see `ops::lt_operand`).
    let aligned = |l: &Layout| (l.start_offset() * dtype.size_in_bytes()) % 256 == 0;
    if !aligned(x.1) || !aligned(w.1) || b.is_some_and(|b| !aligned(b.1)) {
        bail!("cuBLASLt linear: operands must start 256-byte aligned");
    }
    // SAFETY: uninitialised until the GEMM below writes all of it: D is the out_dim x m
    // column-major matrix with leading dimension out_dim, i.e. every element, and beta = 0 so
    // C (the same buffer) is not read. With m == 0 no GEMM runs and the tensor has no elements,
    // so nothing of the one-row buffer is ever read.
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
    // Callers pass a pointer to a local of the attribute's type and its size.
    let set = |attr: lt_sys::cublasLtMatmulDescAttributes_t, ptr: *const std::ffi::c_void, n| {
        // SAFETY: `desc.0` is live (its guard outlives the closure); each call below passes a
        // pointer to a live local and that local's size, which the call copies: an i32 for
        // TRANSA (cublasOperation_t), the epilogue enum (a C enum, 4 bytes), and the bias
        // device pointer (8 bytes, as the `void *` attribute).
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
        // SAFETY: scratch space that only cuBLASLt uses; it never needs initial contents and
        // nothing here reads it.
        let workspace = unsafe { dev.alloc::<u8>(choice.workspace.max(1))? };
        let (wsp, _ws_sync) = workspace.device_ptr(&stream);
        // SAFETY: handle, descriptor and layouts are live (their owners outlive the call); the
        // layouts describe exactly the buffers passed: A = w, k x out_dim (ld k), B = x, k x m
        // (ld k), C = D = out, out_dim x m (ld out_dim), the element counts checked above; the
        // bias (when set) holds out_dim elements (checked above); alpha and beta are f32 host
        // scalars as CUBLAS_COMPUTE_32F with a CUDA_R_32F scale type expects, beta = 0 so C is
        // not read; the workspace holds `choice.workspace` bytes; every device pointer is used
        // on `stream`, the stream their sync guards were taken on, and the guards live until
        // the GEMM is queued. The operands are 256-byte aligned as the heuristic assumed
        // (checked above).
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
