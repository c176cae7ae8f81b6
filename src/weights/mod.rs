//! Weight files: locating a model (local directory or hub id), indexing its safetensors
//! shards, and handing tensors to the model files by name with dtype and shape checks.
//!
//! The index keeps each tensor's absolute byte range, so the same index serves the resident
//! store (memory map, read once at load) and the streaming store (positioned reads per layer).

#[cfg(feature = "cuda")]
pub mod gpu_stage;
pub mod plan;
pub mod pread;
pub mod stream;

use crate::error::{GratingError, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
pub use pread::{EmbeddingTable, PreadFiles, PreadSource};
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The files of one model in HF layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Resolves `model` as a local directory, or else as a hub id through the local HF cache
    /// (downloading what is missing).
    pub fn resolve(model: &str) -> Result<ModelFiles> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.exists() {
            return Err(GratingError::ModelFiles {
                path: path.to_path_buf(),
                reason: "is not a directory (expected an HF model directory)".into(),
            });
        }
        if model.starts_with('.') || model.starts_with('/') || model.split('/').count() != 2 {
            return Err(GratingError::ModelFiles {
                path: path.to_path_buf(),
                reason: "no such directory, and not a hub id of the form owner/name".into(),
            });
        }
        Self::from_hub(model)
    }

    pub fn from_dir(dir: &Path) -> Result<ModelFiles> {
        let err = |reason: String| GratingError::ModelFiles {
            path: dir.to_path_buf(),
            reason,
        };
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(err("config.json not found".into()));
        }
        let tokenizer = dir.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(err("tokenizer.json not found".into()));
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(dir, &index)?
        } else {
            return Err(err(
                "no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)"
                    .into(),
            ));
        };
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            weights,
        })
    }

    fn from_hub(id: &str) -> Result<ModelFiles> {
        let hub_err = |e: hf_hub::api::sync::ApiError| GratingError::ModelFiles {
            path: PathBuf::from(id),
            reason: format!("hub: {e}"),
        };
        let api = hf_hub::api::sync::Api::new().map_err(hub_err)?;
        let repo = api.model(id.to_string());
        let config = repo.get("config.json").map_err(hub_err)?;
        repo.get("tokenizer.json").map_err(hub_err)?;
        match repo.get("model.safetensors") {
            Ok(_) => {}
            Err(_) => {
                let index = repo.get("model.safetensors.index.json").map_err(hub_err)?;
                let dir = index.parent().unwrap_or(Path::new(".")).to_path_buf();
                for name in shard_names(&index)? {
                    repo.get(&name).map_err(hub_err)?;
                }
                return Self::from_dir(&dir);
            }
        }
        let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_dir(&dir)
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| GratingError::WeightFile {
            path: index.to_path_buf(),
            reason: format!("invalid index json: {e}"),
        })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| GratingError::WeightFile {
            path: index.to_path_buf(),
            reason: "no weight_map".into(),
        })?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = shard_names(index)?
        .into_iter()
        .map(|n| dir.join(n))
        .collect();
    for f in &files {
        if !f.is_file() {
            return Err(GratingError::WeightFile {
                path: f.clone(),
                reason: "shard listed in model.safetensors.index.json is missing".into(),
            });
        }
    }
    Ok(files)
}

/// Where a tensor's bytes live.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn byte_len(&self) -> usize {
        (self.end - self.start) as usize
    }
}

/// Tensor name -> location over all shards, read from the safetensors headers only.
#[derive(Debug, Clone)]
pub struct WeightIndex {
    pub files: Vec<PathBuf>,
    pub file_lens: Vec<u64>,
    pub entries: HashMap<String, TensorEntry>,
}

fn candle_dtype(name: &str, d: Dtype) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::U32 => DType::U32,
        Dtype::U8 => DType::U8,
        other => {
            return Err(GratingError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

impl WeightIndex {
    pub fn open(files: &[PathBuf]) -> Result<WeightIndex> {
        let mut entries = HashMap::new();
        let mut file_lens = Vec::new();
        for (fi, path) in files.iter().enumerate() {
            let ferr = |reason: String| GratingError::WeightFile {
                path: path.clone(),
                reason,
            };
            let mut f = File::open(path).map_err(|e| ferr(format!("cannot open: {e}")))?;
            let len = f.metadata()?.len();
            file_lens.push(len);
            let mut n8 = [0u8; 8];
            f.read_exact(&mut n8)
                .map_err(|_| ferr(format!("truncated: {len} bytes, no safetensors header")))?;
            let n = u64::from_le_bytes(n8);
            if n > 100 * 1024 * 1024 || 8 + n > len {
                return Err(ferr(format!(
                    "truncated or not safetensors: header of {n} bytes in a {len}-byte file"
                )));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header)
                .map_err(|e| ferr(format!("cannot read header: {e}")))?;
            let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| ferr(format!("invalid safetensors header: {e}")))?;
            let data_start = 8 + n;
            for (name, v) in raw {
                if name == "__metadata__" {
                    continue;
                }
                let info: TensorInfo = serde_json::from_value(v)
                    .map_err(|e| ferr(format!("tensor `{name}`: invalid header entry: {e}")))?;
                let dtype = candle_dtype(&name, info.dtype)?;
                let (s, e) = info.data_offsets;
                let expect = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
                if e < s || e - s != expect {
                    return Err(ferr(format!(
                        "tensor `{name}`: byte range {s}..{e} does not match shape {:?} {:?}",
                        info.shape, dtype
                    )));
                }
                entries.insert(
                    name,
                    TensorEntry {
                        file: fi,
                        dtype,
                        shape: info.shape,
                        start: data_start + s as u64,
                        end: data_start + e as u64,
                    },
                );
            }
        }
        Ok(WeightIndex {
            files: files.to_vec(),
            file_lens,
            entries,
        })
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.entries
            .get(name)
            .ok_or_else(|| GratingError::MissingTensor {
                name: name.to_string(),
            })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Checks that every tensor's bytes lie inside its file (a truncated download otherwise
    /// fails later, mid-request, with a confusing error).
    pub fn check_complete(&self) -> Result<()> {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        for name in names {
            let e = &self.entries[name];
            if e.end > self.file_lens[e.file] {
                return Err(GratingError::WeightFile {
                    path: self.files[e.file].clone(),
                    reason: format!(
                        "truncated: tensor `{name}` needs bytes {}..{} but the file has {} bytes",
                        e.start, e.end, self.file_lens[e.file]
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Gives the model files their tensors by name, checked for shape, in the compute dtype on the
/// compute device.
pub trait TensorSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;

    /// Rows `ids` of the 2-D tensor `name` (e.g. the two LM-head rows a yes/no head needs),
    /// without materialising the rest where the source can avoid it.
    fn rows(&self, name: &str, shape: &[usize], ids: &[u32]) -> Result<Tensor> {
        let t = self.get(name, shape)?;
        let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
        Ok(t.index_select(&idx, 0)?)
    }

    /// An embedding table: resident by default, row-cached by streaming sources.
    fn embedding(&self, name: &str, shape: &[usize]) -> Result<EmbeddingTable> {
        Ok(EmbeddingTable::Resident(self.get(name, shape)?))
    }
}

/// Checks that checkpoint tensor `name` has the shape the model expects and a float dtype.
pub fn check_entry(name: &str, entry: &TensorEntry, expected: &[usize]) -> Result<()> {
    if entry.shape != expected {
        return Err(GratingError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: entry.shape.clone(),
        });
    }
    if !matches!(entry.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(GratingError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        });
    }
    Ok(())
}

/// Builds a tensor from its on-disk bytes, converting to `dtype` on `device`.
pub fn tensor_from_bytes(
    name: &str,
    bytes: &[u8],
    entry: &TensorEntry,
    expected: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    check_entry(name, entry, expected)?;
    let t = Tensor::from_raw_buffer(bytes, entry.dtype, &entry.shape, &Device::Cpu)?;
    let t = if entry.dtype != dtype {
        t.to_dtype(dtype)?
    } else {
        t
    };
    Ok(t.to_device(device)?)
}

/// All weights memory-mapped; tensors are copied out (and converted) when a model loads.
pub struct MmapSource {
    pub index: WeightIndex,
    maps: Vec<Mmap>,
    pub dtype: DType,
    pub device: Device,
}

impl MmapSource {
    pub fn open(index: WeightIndex, dtype: DType, device: Device) -> Result<MmapSource> {
        index.check_complete()?;
        let mut maps = Vec::new();
        for path in &index.files {
            let f = File::open(path)?;
            // SAFETY: the file is opened read-only; a concurrent truncation by another process
            // is outside what any mmap-based loader can defend against.
            let m = unsafe { Mmap::map(&f) }.map_err(|e| GratingError::WeightFile {
                path: path.clone(),
                reason: format!("cannot map: {e}"),
            })?;
            maps.push(m);
        }
        Ok(MmapSource {
            index,
            maps,
            dtype,
            device,
        })
    }

    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.index.entry(name)?;
        Ok(&self.maps[e.file][e.start as usize..e.end as usize])
    }
}

impl MmapSource {
    /// Releases the mapped pages of a tensor once it has been copied out, so loading does not
    /// keep the whole file in the resident set next to the converted weights.
    fn release(&self, e: &TensorEntry) {
        let page = 4096;
        let start = (e.start as usize).div_ceil(page) * page;
        let end = (e.end as usize) / page * page;
        if end > start {
            // SAFETY: the map is read-only and private to this source; nothing holds references
            // into the released range (the tensor was copied out). Pages are re-read from the
            // file if touched again.
            let _ = unsafe {
                self.maps[e.file].unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

impl TensorSource for MmapSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.index.entry(name)?;
        let t = tensor_from_bytes(name, self.bytes(name)?, e, shape, self.dtype, &self.device)?;
        self.release(e);
        Ok(t)
    }
    fn rows(&self, name: &str, shape: &[usize], ids: &[u32]) -> Result<Tensor> {
        let e = self.index.entry(name)?;
        if e.shape != shape || shape.len() != 2 {
            return Err(GratingError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        let row_bytes = shape[1] * e.dtype.size_in_bytes();
        let all = self.bytes(name)?;
        let mut picked = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            if id as usize >= shape[0] {
                return Err(GratingError::InvalidInput(format!(
                    "row {id} outside `{name}` ({} rows)",
                    shape[0]
                )));
            }
            picked.extend_from_slice(&all[id as usize * row_bytes..(id as usize + 1) * row_bytes]);
        }
        let sub = TensorEntry {
            shape: vec![ids.len(), shape[1]],
            ..e.clone()
        };
        tensor_from_bytes(name, &picked, &sub, &sub.shape, self.dtype, &self.device)
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains(name)
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.index.entries.get(name).map(|e| e.shape.clone())
    }
}
