//! Per-model pruning profiles: what `grating calibrate` measured, saved where later runs of the
//! same model find it. A profile is keyed by the model's config.json and weight-file sizes, so a
//! different checkpoint in the same directory does not inherit it.

use crate::error::{GratingError, Result};
use crate::weights::ModelFiles;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PruneProfile {
    pub model: String,
    pub fingerprint: String,
    pub threshold: f32,
    pub first_layer: usize,
    pub target_agreement: f64,
    /// Top-K agreement with full inference measured at this threshold.
    pub measured_agreement: f64,
    /// Share of candidate-layers computed at this threshold.
    pub measured_compute: f64,
    pub top_k: usize,
    pub queries: usize,
}

/// A short stable hash (FNV-1a) of the model's config and weight sizes.
pub fn fingerprint(files: &ModelFiles) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(&std::fs::read(&files.config)?);
    for w in &files.weights {
        eat(&std::fs::metadata(w)?.len().to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// Where profiles live unless the caller names a directory: `$XDG_CACHE_HOME/grating/profiles`,
/// else `~/.cache/grating/profiles` (the platform's cache convention; grating's own settings
/// come in as options, never from its own environment variables).
pub fn default_profile_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("grating").join("profiles")
}

/// The profile file of this model in `dir`.
pub fn profile_path(dir: &Path, files: &ModelFiles) -> Result<PathBuf> {
    Ok(dir.join(format!("{}.json", fingerprint(files)?)))
}

/// The saved profile for this model in `dir`, if any.
pub fn load(dir: &Path, files: &ModelFiles) -> Result<Option<PruneProfile>> {
    let path = profile_path(dir, files)?;
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    let p: PruneProfile = serde_json::from_str(&text).map_err(|e| GratingError::ModelFiles {
        path: path.clone(),
        reason: format!("invalid pruning profile: {e}"),
    })?;
    Ok(Some(p))
}

pub fn save(dir: &Path, files: &ModelFiles, profile: &PruneProfile) -> Result<PathBuf> {
    let path = profile_path(dir, files)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(profile).expect("profile serialises");
    std::fs::write(&path, text)?;
    Ok(path)
}
