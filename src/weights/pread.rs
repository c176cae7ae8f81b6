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
                let idx = crate::ops::upload_u32(ids, ids.len(), t.device())?;
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

    #[cfg(test)]
    pub fn resident_bytes(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.data.capacity() * 4)
            .unwrap_or(0)
    }

    /// (hits, misses) so far.
    #[cfg(test)]
    pub fn counters(&self) -> (u64, u64) {
        self.state
            .lock()
            .map(|s| (s.hits, s.misses))
            .unwrap_or((0, 0))
    }

    /// Reads the rows `ids` (sorted, unique) into `out` (`ids.len() x dim`). Nearby rows are
    /// read together: a request's tokens cluster in the vocabulary, and one `pread` per row
    /// cost more than the bytes of the gaps between them.
    fn read_rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let esz = self.entry.dtype.size_in_bytes();
        let row_bytes = self.dim * esz;
        let mut buf = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let first = ids[i];
            let mut j = i + 1;
            while j < ids.len()
                && ids[j] - ids[j - 1] <= ROW_READ_GAP
                && (ids[j] - first + 1) as usize * row_bytes <= ROW_READ_BYTES
            {
                j += 1;
            }
            let span = (ids[j - 1] - first + 1) as usize;
            buf.resize(span * row_bytes, 0);
            let at = self.entry.start + first as u64 * row_bytes as u64;
            self.files.read_at(
                self.entry.file,
                at,
                &mut buf,
                &format!("rows {first}..={} of `{}`", ids[j - 1], self.name),
            )?;
            for (k, &id) in ids[i..j].iter().enumerate() {
                let src = &buf[(id - first) as usize * row_bytes..][..row_bytes];
                let dst = &mut out[(i + k) * self.dim..][..self.dim];
                decode_row(self.entry.dtype, src, dst);
            }
            i = j;
        }
        Ok(())
    }

    /// Rows for `ids`: the unique ids are gathered on the host (misses read in coalesced
    /// ranges), uploaded once, and expanded to one row per id on the device. When the cache
    /// is full, least recently used rows not needed by this request make room; a request
    /// using more unique tokens than the capacity still gets its rows (the overflow is read
    /// but not kept).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(GratingError::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {}",
                self.vocab
            )));
        }
        let d = self.dim;
        let mut unique: Vec<u32> = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let mut table = vec![0f32; unique.len() * d];
        let mut st = self.state.lock().expect("embedding cache lock");
        st.stamp += 1;
        let stamp = st.stamp;
        let mut misses = Vec::new();
        for (u, &id) in unique.iter().enumerate() {
            match st.slots.get_mut(&id) {
                Some(e) => {
                    e.1 = stamp;
                    let s = e.0;
                    table[u * d..(u + 1) * d].copy_from_slice(&st.data[s * d..(s + 1) * d]);
                }
                None => misses.push(u),
            }
        }
        st.hits += (unique.len() - misses.len()) as u64;
        st.misses += misses.len() as u64;
        if !misses.is_empty() {
            let miss_ids: Vec<u32> = misses.iter().map(|&u| unique[u]).collect();
            let mut fresh = vec![0f32; misses.len() * d];
            self.read_rows(&miss_ids, &mut fresh)?;
            // Free slots first, then the least recently used rows this request does not use.
            let free = self.capacity - st.slots.len();
            let mut victims: Vec<(u64, u32)> = Vec::new();
            if misses.len() > free {
                victims = st
                    .slots
                    .iter()
                    .filter(|(_, v)| v.1 != stamp)
                    .map(|(k, v)| (v.1, *k))
                    .collect();
                let want = (misses.len() - free).min(victims.len());
                if want < victims.len() {
                    victims.select_nth_unstable(want);
                }
                victims.truncate(want);
            }
            // A stack: free slots pop first, lowest first, so occupied slots stay 0..len
            // (which is what makes `len..capacity` the free ones), then the victims' slots.
            let mut slots: Vec<usize> = Vec::new();
            for (_, id) in victims {
                if let Some((s, _)) = st.slots.remove(&id) {
                    slots.push(s);
                }
            }
            slots.extend((st.slots.len() + slots.len()..self.capacity).rev());
            for (k, &u) in misses.iter().enumerate() {
                let row = &fresh[k * d..(k + 1) * d];
                table[u * d..(u + 1) * d].copy_from_slice(row);
                if let Some(s) = slots.pop() {
                    if st.data.len() < (s + 1) * d {
                        st.data.resize((s + 1) * d, 0.0);
                    }
                    st.data[s * d..(s + 1) * d].copy_from_slice(row);
                    st.slots.insert(unique[u], (s, stamp));
                }
            }
        }
        drop(st);
        let rows = crate::ops::upload_f32_as(&table, (unique.len(), d), self.dtype, &self.device)?;
        let positions: Vec<u32> = ids
            .iter()
            .map(|id| unique.binary_search(id).unwrap_or(0) as u32)
            .collect();
        let positions = crate::ops::upload_u32(&positions, ids.len(), &self.device)?;
        Ok(rows.index_select(&positions, 0)?)
    }
}

/// Rows of an embedding read by one `pread` may be this many ids apart (the rows between are
/// read and skipped).
const ROW_READ_GAP: u32 = 16;
/// Largest single read of embedding rows.
const ROW_READ_BYTES: usize = 1 << 20;

fn decode_row(dtype: DType, src: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => unreachable!("dtype checked at construction"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor safetensors file: row `i` of a `[vocab, 4]` f32 embedding is
    /// `[i, i + 0.5, -i, 2i]`.
    fn embedding_file(vocab: usize) -> std::path::PathBuf {
        let data: Vec<f32> = (0..vocab)
            .flat_map(|i| {
                let i = i as f32;
                [i, i + 0.5, -i, 2.0 * i]
            })
            .collect();
        let t = Tensor::from_vec(data, (vocab, 4), &Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("grating-rowcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("emb.safetensors");
        candle_core::safetensors::save(&std::collections::HashMap::from([("emb", t)]), &path)
            .unwrap();
        path
    }

    fn check_rows(t: &Tensor, ids: &[u32]) {
        let rows = t.to_vec2::<f32>().unwrap();
        assert_eq!(rows.len(), ids.len());
        for (row, &id) in rows.iter().zip(ids) {
            let i = id as f32;
            assert_eq!(row, &vec![i, i + 0.5, -i, 2.0 * i], "row of id {id}");
        }
    }

    #[test]
    fn row_cache_reads_coalesced_ranges_and_evicts_least_recent_rows() {
        let path = embedding_file(200);
        let files =
            Arc::new(PreadFiles::open(Arc::new(WeightIndex::open(&[path]).unwrap())).unwrap());
        let cache = RowCache::new(files, "emb", &[200, 4], 6, DType::F32, Device::Cpu).unwrap();
        // Repeats, far-apart ids (separate reads) and neighbours (one read).
        let first = [5u32, 3, 5, 150, 4, 3];
        check_rows(&cache.lookup(&first).unwrap(), &first);
        assert_eq!(cache.counters(), (0, 4));
        check_rows(&cache.lookup(&[4, 150]).unwrap(), &[4, 150]);
        assert_eq!(cache.counters(), (2, 4));
        // Four new rows, two free slots: the two least recently used rows (3 and 5; 4 and
        // 150 were used since) make room.
        let second = [60u32, 61, 62, 199];
        check_rows(&cache.lookup(&second).unwrap(), &second);
        assert_eq!(cache.counters(), (2, 8));
        check_rows(&cache.lookup(&[150, 4]).unwrap(), &[150, 4]);
        assert_eq!(cache.counters(), (4, 8));
        // More unique rows than the cache holds: all are returned, the overflow is not kept.
        let wide: Vec<u32> = (100..108).collect();
        check_rows(&cache.lookup(&wide).unwrap(), &wide);
        assert_eq!(cache.counters(), (4, 16));
        check_rows(&cache.lookup(&wide).unwrap(), &wide);
        let (hits, misses) = cache.counters();
        assert!(
            hits > 4 && hits < 12 && hits + misses == 28,
            "{hits} {misses}"
        );
        // Every lookup is right whatever was evicted, and the cache never exceeds its rows.
        for round in 0..20u32 {
            let ids: Vec<u32> = (0..9).map(|k| (round * 37 + k * 11) % 200).collect();
            check_rows(&cache.lookup(&ids).unwrap(), &ids);
            assert!(
                cache.resident_bytes() <= 6 * 4 * 4 * 2,
                "{}",
                cache.resident_bytes()
            );
        }
        assert!(cache.lookup(&[200]).is_err());
    }
}
