//! Per-model pruning profiles: the rule `grating calibrate` chose and what it measured, saved
//! where later runs of the same model find it (or shipped for the models grating knows). A
//! profile is keyed by the model's config.json and weight-file sizes, so a different
//! checkpoint in the same directory does not inherit it.

use super::calibrate::HeldOutRow;
use super::{PruneConfig, RuleKind};
use crate::error::{GratingError, Result};
use crate::weights::ModelFiles;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PruneProfile {
    pub model: String,
    pub fingerprint: String,
    /// Absent in profiles written before the margin rule: those carry a cluster threshold.
    #[serde(default)]
    pub rule: Option<RuleKind>,
    /// Margin rule: the per-layer movement unit (see [`super::margin`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub movement: Vec<Option<f32>>,
    /// Margin rule: the margin chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f32>,
    /// Cluster rule: the dispersion threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    pub first_layer: usize,
    pub target_agreement: f64,
    /// Mean top-K agreement with full inference measured on held-out requests (the worst
    /// (N, K) of the report).
    pub measured_agreement: f64,
    /// Share of candidate-layers computed there.
    pub measured_compute: f64,
    /// Largest K the profile was calibrated for.
    pub top_k: usize,
    pub queries: usize,
    /// Where the calibration requests came from.
    #[serde(default)]
    pub source: String,
    /// The out-of-fold report it was chosen on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_out: Vec<HeldOutRow>,
}

impl PruneProfile {
    /// The rule this profile describes.
    pub fn config(&self) -> PruneConfig {
        let cluster = self.rule == Some(RuleKind::Cluster)
            || (self.rule.is_none() && self.threshold.is_some());
        let mut cfg = if cluster {
            PruneConfig {
                threshold: self.threshold.unwrap_or(super::DEFAULT_THRESHOLD),
                ..PruneConfig::cluster()
            }
        } else {
            PruneConfig::margin(
                self.movement.clone(),
                self.margin.unwrap_or(super::DEFAULT_MARGIN),
            )
        };
        cfg.first_layer = self.first_layer.max(1);
        cfg
    }
}

/// Profiles shipped with grating for models whose files it knows (the two shared MiniLM
/// cross-encoders), calibrated on DL19 by `grating calibrate`; a user's own profile wins.
const BUILT_IN: [&str; 2] = [
    include_str!("builtin/minilm-l6-msmarco-layerwise.json"),
    include_str!("builtin/minilm-l6-msmarco-distilled.json"),
];

/// The built-in profile with this fingerprint, if any.
pub fn built_in(fingerprint: &str) -> Option<PruneProfile> {
    BUILT_IN
        .iter()
        .filter_map(|t| serde_json::from_str::<PruneProfile>(t).ok())
        .find(|p| p.fingerprint == fingerprint)
}

/// A short stable hash (FNV-1a) of the model's config and of its weights: each file's size,
/// its first 64 KiB (the safetensors header) and 16 evenly spaced 4 KiB samples of its data.
/// Checkpoints of one architecture share config and sizes, so the samples are what tells a
/// fine-tune from its base; reading 130 KiB per file keeps this cheap for any model size.
pub fn fingerprint(files: &ModelFiles) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(&std::fs::read(&files.config)?);
    for w in &files.weights {
        let mut f = std::fs::File::open(w)?;
        let len = f.metadata()?.len();
        eat(&len.to_le_bytes());
        let mut read_at = |offset: u64, size: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; size.min(len.saturating_sub(offset) as usize)];
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut buf)?;
            Ok(buf)
        };
        eat(&read_at(0, 64 * 1024)?);
        for i in 1..=16u64 {
            eat(&read_at(len / 17 * i, 4096)?);
        }
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

/// The profile for this model: the one saved in `dir`, else a built-in one, if any.
pub fn load(dir: &Path, files: &ModelFiles) -> Result<Option<PruneProfile>> {
    let path = profile_path(dir, files)?;
    if !path.is_file() {
        return Ok(built_in(&fingerprint(files)?));
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
