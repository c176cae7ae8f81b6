//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` beside the repository. In CI (CI=true) its absence fails the test loudly;
/// elsewhere the test is skipped with a printed reason.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if dir.join("models").is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false) {
        panic!("CI=true but {} is missing: the shared models and data are required", dir.display());
    }
    eprintln!("SKIPPED: {} not found (tests that need shared models are skipped outside CI)", dir.display());
    None
}

pub fn shared_model(name: &str) -> Option<PathBuf> {
    shared_dir().map(|d| d.join("models").join(name))
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[derive(serde::Deserialize, Debug, Clone)]
pub struct ReferenceRow {
    pub query: String,
    #[serde(alias = "passage")]
    pub document: String,
    pub logit: f32,
    pub layer_logits: Vec<f32>,
    #[serde(default)]
    pub instruction: Option<String>,
    #[serde(default)]
    pub input_ids: Option<Vec<u32>>,
}

pub fn read_reference(path: &std::path::Path) -> Vec<ReferenceRow> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("reference row"))
        .collect()
}
