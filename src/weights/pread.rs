//! Positioned reads of weight bytes into owned buffers, and the embedding-row cache.
//!
//! Unlike a memory map, a `pread` into an owned buffer leaves no file pages mapped into the
//! process, and the page cache for the range is dropped after the read, so streamed weights do
//! not accumulate in memory anywhere.

use super::{tensor_from_bytes, TensorEntry, TensorSource, WeightIndex};
use crate::error::{GratingError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

/// Open weight files for positioned reads.
pub struct PreadFiles {
    pub index: Arc<WeightIndex>,
    files: Vec<File>,
    keep_page_cache: bool,
}

impl PreadFiles {
    pub fn open(index: Arc<WeightIndex>) -> Result<PreadFiles> {
        let files = index
            .files
            .iter()
            .map(|p| {
                File::open(p).map_err(|e| GratingError::WeightFile {
                    path: p.clone(),
                    reason: format!("cannot open: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PreadFiles {
            index,
            files,
            keep_page_cache: false,
        })
    }

    /// Leaves read pages in the page cache. Streaming to a GPU bounds GPU memory, not host
    /// memory: the next pass then reads the layers from the cache instead of the disk.
    pub fn keeping_page_cache(mut self) -> Self {
        self.keep_page_cache = true;
        self
    }

    /// Reads `len` bytes at absolute offset `at` of file `file` into `buf`, then drops those
    /// pages from the page cache. A short read (a truncated file) is an error naming `what`.
    pub fn read_at(&self, file: usize, at: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let f = &self.files[file];
        f.read_exact_at(buf, at)
            .map_err(|e| GratingError::WeightFile {
                path: self.index.files[file].clone(),
                reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    format!(
                        "truncated: {what} needs bytes {at}..{} beyond the end of the file",
                        at + buf.len() as u64
                    )
                } else {
                    format!("reading {what}: {e}")
                },
            })?;
        if !self.keep_page_cache {
            drop_cache(f, at, buf.len() as u64);
        }
        Ok(())
    }

    pub fn read_entry(&self, name: &str, e: &TensorEntry, buf: &mut [u8]) -> Result<()> {
        self.read_at(e.file, e.start, buf, &format!("tensor `{name}`"))
    }
}

/// Tells the kernel the range will not be read again soon.
fn drop_cache(f: &File, at: u64, len: u64) {
    // SAFETY: plain advisory syscall on an open descriptor.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            at as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// A `TensorSource` that reads each requested tensor with `pread` (used for the small
/// non-layer tensors of a streaming model).
pub struct PreadSource {
    pub files: Arc<PreadFiles>,
    pub dtype: DType,
    pub device: Device,
    /// Share of the vocabulary the embedding-row cache may hold.
    pub cache_share: f32,
}

impl TensorSource for PreadSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.files.index.entry(name)?;
        let mut buf = vec![0u8; e.byte_len()];
        self.files.read_entry(name, e, &mut buf)?;
        tensor_from_bytes(name, &buf, e, shape, self.dtype, &self.device)
    }
    fn contains(&self, name: &str) -> bool {
        self.files.index.contains(name)
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.files.index.entries.get(name).map(|e| e.shape.clone())
    }
    fn rows(&self, name: &str, shape: &[usize], ids: &[u32]) -> Result<Tensor> {
        let cache = RowCache::new(
            self.files.clone(),
            name,
            shape,
            ids.len(),
            self.dtype,
            self.device.clone(),
        )?;
        cache.lookup(ids)
    }
    fn embedding(&self, name: &str, shape: &[usize]) -> Result<EmbeddingTable> {
        let capacity = ((shape[0] as f64) * self.cache_share as f64).ceil() as usize;
        Ok(EmbeddingTable::Cached(Arc::new(RowCache::new(
            self.files.clone(),
            name,
            shape,
            capacity.max(1),
            self.dtype,
            self.device.clone(),
        )?)))
    }
}

/// An embedding table: all rows in memory, or only the rows requests use.
pub enum EmbeddingTable {
    Resident(Tensor),
    Cached(Arc<RowCache>),
}

impl EmbeddingTable {
    /// Rows `ids` as a `[ids.len(), dim]` tensor.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            EmbeddingTable::Resident(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                Ok(t.index_select(&idx, 0)?)
            }
            EmbeddingTable::Cached(c) => c.lookup(ids),
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            EmbeddingTable::Resident(t) => t.dim(0).unwrap_or(0),
            EmbeddingTable::Cached(c) => c.vocab,
        }
    }

    /// Bytes held in memory now.
    pub fn resident_bytes(&self) -> usize {
        match self {
            EmbeddingTable::Resident(t) => t.elem_count() * t.dtype().size_in_bytes(),
            EmbeddingTable::Cached(c) => c.resident_bytes(),
        }
    }
}

struct CacheState {
    /// token id -> (slot, last use stamp).
    slots: HashMap<u32, (usize, u64)>,
    /// Rows in compute dtype as f32, `capacity x dim`, filled up to `slots.len()`.
    data: Vec<f32>,
    stamp: u64,
    hits: u64,
    misses: u64,
}

/// LRU cache of embedding rows read on demand; the full table is never loaded.
pub struct RowCache {
    files: Arc<PreadFiles>,
    name: String,
    entry: TensorEntry,
    pub vocab: usize,
    pub dim: usize,
    pub capacity: usize,
    dtype: DType,
    device: Device,
    state: Mutex<CacheState>,
}

impl RowCache {
    pub fn new(
        files: Arc<PreadFiles>,
        name: &str,
        shape: &[usize],
        capacity: usize,
        dtype: DType,
        device: Device,
    ) -> Result<RowCache> {
        let entry = files.index.entry(name)?.clone();
        if entry.shape != shape {
            return Err(GratingError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        if !matches!(entry.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(GratingError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{:?}", entry.dtype),
            });
        }
        let (vocab, dim) = (shape[0], shape[1]);
        let capacity = capacity.min(vocab).max(1);
        Ok(RowCache {
            files,
            name: name.to_string(),
            entry,
            vocab,
            dim,
            capacity,
            dtype,
            device,
            state: Mutex::new(CacheState {
                slots: HashMap::new(),
                data: Vec::new(),
                stamp: 0,
                hits: 0,
                misses: 0,
            }),
        })
    }

    pub fn resident_bytes(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.data.capacity() * 4)
            .unwrap_or(0)
    }

    /// (hits, misses) so far.
    pub fn counters(&self) -> (u64, u64) {
        self.state
            .lock()
            .map(|s| (s.hits, s.misses))
            .unwrap_or((0, 0))
    }

    fn read_row(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let esz = self.entry.dtype.size_in_bytes();
        let mut buf = vec![0u8; self.dim * esz];
        let at = self.entry.start + (id as u64) * (self.dim * esz) as u64;
        self.files.read_at(
            self.entry.file,
            at,
            &mut buf,
            &format!("row {id} of `{}`", self.name),
        )?;
        match self.entry.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            _ => unreachable!("dtype checked at construction"),
        }
        Ok(())
    }

    /// Rows for `ids`, reading the unique misses once; least recently used rows are evicted
    /// when the cache is full. A request using more unique tokens than the capacity still gets
    /// its rows (the overflow is read but not kept).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(GratingError::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {}",
                self.vocab
            )));
        }
        let d = self.dim;
        let mut st = self.state.lock().expect("embedding cache lock");
        st.stamp += 1;
        let stamp = st.stamp;
        let mut unique: Vec<u32> = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        // Overflow rows of this request that could not get a slot.
        let mut overflow: HashMap<u32, Vec<f32>> = HashMap::new();
        let mut row = vec![0f32; d];
        for &id in &unique {
            if let Some(e) = st.slots.get_mut(&id) {
                e.1 = stamp;
                st.hits += 1;
                continue;
            }
            st.misses += 1;
            self.read_row(id, &mut row)?;
            let slot = if st.slots.len() < self.capacity {
                let s = st.slots.len();
                st.data.resize((s + 1) * d, 0.0);
                Some(s)
            } else {
                // Evict the least recently used row not needed by this request.
                let victim = st
                    .slots
                    .iter()
                    .filter(|(_, v)| v.1 != stamp)
                    .min_by_key(|(_, v)| v.1)
                    .map(|(k, v)| (*k, v.0));
                victim.map(|(k, s)| {
                    st.slots.remove(&k);
                    s
                })
            };
            match slot {
                Some(s) => {
                    st.data[s * d..(s + 1) * d].copy_from_slice(&row);
                    st.slots.insert(id, (s, stamp));
                }
                None => {
                    overflow.insert(id, row.clone());
                }
            }
        }
        let mut out = Vec::with_capacity(ids.len() * d);
        for id in ids {
            match st.slots.get(id) {
                Some(&(s, _)) => out.extend_from_slice(&st.data[s * d..(s + 1) * d]),
                None => out.extend_from_slice(&overflow[id]),
            }
        }
        drop(st);
        let t = Tensor::from_vec(out, (ids.len(), d), &Device::Cpu)?;
        let t = if self.dtype != DType::F32 {
            t.to_dtype(self.dtype)?
        } else {
            t
        };
        Ok(t.to_device(&self.device)?)
    }
}
