//! Hidden-state offload for requests whose hidden states would not fit the memory budget:
//! chunks not being computed live in an unlinked temporary file; while one chunk computes,
//! the previous one is written out and the next one read back, so at most three chunks are in
//! memory at a time.

use crate::error::{GratingError, Result};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// An append-only scratch file, removed when dropped (it is unlinked on creation).
pub(crate) struct SpillFile {
    file: File,
    end: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// Where a chunk's hidden states are.
pub(crate) enum Hidden {
    Resident(Tensor),
    Spilled { at: u64, rows: usize, dim: usize },
}

impl SpillFile {
    /// A scratch file in `dir` (the system's temporary directory when `None`).
    pub(crate) fn new(dir: Option<&std::path::Path>) -> Result<SpillFile> {
        let dir = dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
        let file = tempfile::tempfile_in(&dir).map_err(|e| {
            GratingError::Io(std::io::Error::new(
                e.kind(),
                format!("spill file in {}: {e}", dir.display()),
            ))
        })?;
        Ok(SpillFile {
            file,
            end: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// Writes `t` (`[rows, dim]`) to a fresh region and returns its handle.
    pub(crate) fn spill(&self, t: &Tensor) -> Result<Hidden> {
        let (rows, dim) = t.dims2()?;
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes: &[u8] = bytemuck::cast_slice(&v);
        let at = self.end.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.file.write_all_at(bytes, at)?;
        self.bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(Hidden::Spilled { at, rows, dim })
    }

    pub(crate) fn load(
        &self,
        at: u64,
        rows: usize,
        dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut v = vec![0f32; rows * dim];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
        self.file.read_exact_at(bytes, at)?;
        let t = Tensor::from_vec(v, (rows, dim), &Device::Cpu)?;
        let t = if dtype != DType::F32 {
            t.to_dtype(dtype)?
        } else {
            t
        };
        Ok(t.to_device(device)?)
    }
}

impl Hidden {
    /// The resident tensor (schedulers that never offload).
    pub(crate) fn resident(&self) -> Result<&Tensor> {
        match self {
            Hidden::Resident(t) => Ok(t),
            Hidden::Spilled { .. } => {
                Err(GratingError::Internal("hidden states are offloaded".into()))
            }
        }
    }

    /// The tensor, read back from `spill` if it was offloaded.
    pub(crate) fn get(
        &self,
        spill: Option<&SpillFile>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match self {
            Hidden::Resident(t) => Ok(t.clone()),
            Hidden::Spilled { at, rows, dim } => match spill {
                Some(s) => s.load(*at, *rows, *dim, dtype, device),
                None => Err(GratingError::Internal(
                    "hidden states were offloaded without a spill file".into(),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_round_trips() {
        let s = SpillFile::new(None).unwrap();
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::arange(100f32, 106.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let ha = s.spill(&a).unwrap();
        let hb = s.spill(&b).unwrap();
        let back = |h: &Hidden| -> Vec<f32> {
            h.get(Some(&s), DType::F32, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (back_a, back_b) = (back(&ha), back(&hb));
        assert_eq!(back_a, (0..12).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(back_b, (100..106).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(s.bytes_written.load(Ordering::Relaxed), 18 * 4);
    }
}
