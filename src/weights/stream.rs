//! Overlapped layer streaming: an I/O thread reads the next layer's tensors with `pread` into
//! one of two reusable buffers while the compute thread runs the current layer; a buffer goes
//! back to the I/O thread as soon as its layer is built, and is refilled with the layer after
//! next. At most two layers' raw bytes plus the layer being computed are ever in memory.

use super::plan::LayerPlan;
use super::pread::PreadFiles;
use super::{tensor_from_bytes, TensorEntry, TensorSource};
use crate::error::{GratingError, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

/// A reusable buffer a layer's bytes are read into.
enum Staging {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Gpu(Box<super::gpu_stage::GpuStaging>),
}

struct Loaded {
    layer: usize,
    buf: Staging,
    /// How long the reader took to read (and queue the upload of) the layer's bytes.
    read_seconds: f64,
}

/// Largest single `pread` of a parallel layer read.
const READ_PIECE: usize = 4 << 20;

/// Reader threads for a layer bound for a GPU unless configured. A layer read from the page
/// cache is a memory copy that one thread does at a few GB/s, slower than the upload and than a
/// layer's kernels on a large GPU; the host's cores are otherwise idle there. (On the CPU they
/// compute, so host-bound layers are read by one thread.)
pub fn default_gpu_read_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Reads `plan`'s tensors, in file order, into `buf`, split into contiguous parts read by
/// `threads` threads at once.
fn read_plan(files: &PreadFiles, plan: &LayerPlan, buf: &mut [u8], threads: usize) -> Result<()> {
    let mut pieces: Vec<(&str, &TensorEntry, u64, &mut [u8])> = Vec::new();
    let mut rest = buf;
    for (name, e) in &plan.tensors {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(e.byte_len());
        rest = tail;
        let mut at = 0u64;
        for piece in mine.chunks_mut(READ_PIECE) {
            let len = piece.len() as u64;
            pieces.push((name.as_str(), e, at, piece));
            at += len;
        }
    }
    let read = |group: &mut [(&str, &TensorEntry, u64, &mut [u8])]| -> Result<()> {
        for (name, e, at, piece) in group.iter_mut() {
            files.read_at(e.file, e.start + *at, piece, &format!("tensor `{name}`"))?;
        }
        Ok(())
    };
    if threads <= 1 || pieces.len() < 2 {
        return read(&mut pieces);
    }
    let per = pieces.len().div_ceil(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = pieces
            .chunks_mut(per)
            .map(|group| s.spawn(move || read(group)))
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(GratingError::Internal("layer reader panicked".into())))
        })
    })
}

/// Fills one staging buffer with `plan` (and, on a GPU, queues its upload).
fn fill(
    files: &PreadFiles,
    plan: &LayerPlan,
    buf: &mut Staging,
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] read_threads: usize,
    #[cfg(feature = "cuda")] link: Option<&super::gpu_stage::GpuLink>,
) -> Result<()> {
    match buf {
        Staging::Host(v) => {
            v.resize(plan.bytes, 0);
            read_plan(files, plan, v, 1)
        }
        #[cfg(feature = "cuda")]
        Staging::Gpu(g) => {
            read_plan(files, plan, g.host_mut(plan.bytes)?, read_threads.max(1))?;
            let link = link.ok_or_else(|| {
                GratingError::Internal("GPU staging buffer without a GPU link".into())
            })?;
            g.upload(link)
        }
    }
}

/// Serves one layer's tensors out of its read buffer.
struct BufferSource<'a> {
    plan: &'a LayerPlan,
    buf: &'a [u8],
    dtype: DType,
    device: &'a Device,
}

impl TensorSource for BufferSource<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.plan.get_with(name, |off, e| {
            tensor_from_bytes(
                name,
                &self.buf[off..off + e.byte_len()],
                e,
                shape,
                self.dtype,
                self.device,
            )
        })
    }
    fn contains(&self, name: &str) -> bool {
        self.plan.locate(name).is_some()
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.plan.shape_of(name)
    }
}

/// One pass of streamed layers in a fixed order.
pub struct LayerStream {
    plans: Arc<Vec<LayerPlan>>,
    ready: Receiver<Result<Loaded>>,
    free: Sender<Staging>,
    dtype: DType,
    device: Device,
    #[cfg(feature = "cuda")]
    link: Option<super::gpu_stage::GpuLink>,
    read_seconds: f64,
}

impl LayerStream {
    /// Starts reading `order` ahead with two buffers (`read_threads` read a GPU-bound layer).
    pub fn start(
        files: Arc<PreadFiles>,
        plans: Arc<Vec<LayerPlan>>,
        order: Vec<usize>,
        dtype: DType,
        device: Device,
        read_threads: usize,
    ) -> LayerStream {
        let (ready_tx, ready) = channel::<Result<Loaded>>();
        let (free, free_rx) = channel::<Staging>();
        let max = plans.iter().map(|p| p.bytes).max().unwrap_or(0);
        #[cfg(feature = "cuda")]
        let link = match super::gpu_stage::GpuLink::for_device(&device) {
            Ok(link) => link,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                None
            }
        };
        // Two buffers (one being read while the other is used), one for a single layer.
        for _ in 0..order.len().clamp(1, 2) {
            #[cfg(feature = "cuda")]
            if let Some(link) = &link {
                match link.staging(max) {
                    Ok(g) => {
                        let _ = free.send(Staging::Gpu(Box::new(g)));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                continue;
            }
            let _ = free.send(Staging::Host(Vec::with_capacity(max)));
        }
        let io_plans = plans.clone();
        #[cfg(feature = "cuda")]
        let io_link = link.clone();
        // Detached: see the Drop impl.
        let _reader = std::thread::Builder::new()
            .name("grating-layer-io".into())
            .spawn(move || {
                for layer in order {
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let t = Instant::now();
                    let result = fill(
                        &files,
                        &io_plans[layer],
                        &mut buf,
                        read_threads,
                        #[cfg(feature = "cuda")]
                        io_link.as_ref(),
                    );
                    let failed = result.is_err();
                    let msg = result.map(|_| Loaded {
                        layer,
                        buf,
                        read_seconds: t.elapsed().as_secs_f64(),
                    });
                    if ready_tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawn layer I/O thread");
        LayerStream {
            plans,
            ready,
            free,
            dtype,
            device,
            #[cfg(feature = "cuda")]
            link,
            read_seconds: 0.0,
        }
    }

    /// Seconds the reader spent reading the layers delivered so far (not the time the
    /// compute thread waited for them: most of a read overlaps computation).
    pub fn read_seconds(&self) -> f64 {
        self.read_seconds
    }

    /// Waits for layer `layer` (the next in the order) and has `build` make it from the layer's
    /// tensors (the caller knows the architecture; the store only serves bytes). Returns what
    /// `build` made and the seconds the caller waited for the bytes.
    pub fn next_with<L>(
        &mut self,
        layer: usize,
        build: impl FnOnce(&dyn TensorSource) -> Result<L>,
    ) -> Result<(L, f64)> {
        let t = Instant::now();
        let loaded = match self.ready.recv() {
            Ok(r) => r?,
            Err(_) => {
                return Err(GratingError::WeightFile {
                    path: Default::default(),
                    reason: format!("layer {layer}: the weight reader stopped"),
                })
            }
        };
        let stall = t.elapsed().as_secs_f64();
        if loaded.layer != layer {
            return Err(GratingError::Internal(format!(
                "streamed layer {} arrived when {layer} was expected",
                loaded.layer
            )));
        }
        self.read_seconds += loaded.read_seconds;
        let mut buf = loaded.buf;
        let block = match &mut buf {
            Staging::Host(bytes) => {
                let src = BufferSource {
                    plan: &self.plans[layer],
                    buf: bytes,
                    dtype: self.dtype,
                    device: &self.device,
                };
                build(&src)?
            }
            #[cfg(feature = "cuda")]
            Staging::Gpu(g) => {
                let link = self.link.as_ref().ok_or_else(|| {
                    GratingError::Internal("GPU staging buffer without a GPU link".into())
                })?;
                g.await_upload(link)?;
                let src = super::gpu_stage::StagedSource {
                    link,
                    staging: g,
                    plan: &self.plans[layer],
                    dtype: self.dtype,
                };
                let block = build(&src)?;
                g.release(link)?;
                block
            }
        };
        // The bytes are now converted into the layer's tensors: the buffer can take layer + 2.
        let _ = self.free.send(buf);
        Ok((block, stall))
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        // Closing the free channel ends the reader at its next wait. A read in flight is not
        // waited for: it finishes on its own, its send fails and its buffer goes back to the
        // pool (a scheduler that changed its mind about the next layer must not stall on it).
        let (dead, _) = channel();
        self.free = dead;
    }
}
