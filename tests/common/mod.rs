//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root: where the tests were built, or the working directory when a test
/// binary was carried to another machine (the GPU machine).
pub fn repo_dir() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").is_dir() {
        built
    } else {
        std::env::current_dir().expect("working directory")
    }
}

/// `../shared` beside the repository (or `$GRATING_SHARED_DIR`). In CI (CI=true) its absence
/// fails the test loudly; elsewhere the test is skipped with a printed reason.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("GRATING_SHARED_DIR") {
        Some(d) => PathBuf::from(d),
        None => repo_dir().join("../shared"),
    };
    if dir.join("models").is_dir() {
        return Some(dir);
    }
    if std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
    {
        panic!(
            "CI=true but {} is missing: the shared models and data are required",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: {} not found (tests that need shared models are skipped outside CI)",
        dir.display()
    );
    None
}

/// A model of the shared folder. A partial copy (the GPU machine gets only what fits the
/// transfer) may lack it: that skips with a printed reason, except in CI.
pub fn shared_model(name: &str) -> Option<PathBuf> {
    let dir = shared_dir()?.join("models").join(name);
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI=true but the shared model {} is missing", dir.display());
    }
    eprintln!("SKIPPED: shared model {} not found", dir.display());
    None
}

pub fn fixture(name: &str) -> PathBuf {
    repo_dir().join("tests/fixtures").join(name)
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

/// A query, its documents and how to rank them: what a test sends.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct Req {
    pub query: String,
    pub documents: Vec<String>,
    pub opts: grating::RerankOptions,
    /// Per-request grouping overrides on the reranker's own.
    pub chunk_tokens: Option<usize>,
    pub batch_size: Option<usize>,
    pub offload: bool,
}

#[allow(dead_code)]
impl Req {
    pub fn new(query: impl Into<String>, documents: Vec<String>) -> Req {
        Req {
            query: query.into(),
            documents,
            opts: grating::RerankOptions::default(),
            chunk_tokens: None,
            batch_size: None,
            offload: false,
        }
    }

    /// The options with this request's grouping on `r`'s.
    pub fn options(&self, r: &grating::Reranker) -> grating::RerankOptions {
        let mut e = *r.execution();
        if let Some(c) = self.chunk_tokens {
            e.chunk_tokens = c;
        }
        if let Some(b) = self.batch_size {
            e.batch_size = b;
        }
        e.offload |= self.offload;
        grating::RerankOptions {
            execution: Some(e),
            ..self.opts.clone()
        }
    }

    pub fn run(&self, r: &grating::Reranker) -> grating::Result<grating::RerankOutput> {
        r.rerank(&self.query, &self.documents, &self.options(r))
    }
}

/// `(document index, logit)` of a request's answer, best first.
#[allow(dead_code)]
pub fn ranked(r: &grating::Reranker, req: &Req) -> Vec<(usize, f32)> {
    req.run(r)
        .unwrap()
        .ranked
        .iter()
        .map(|s| (s.index, s.logit))
        .collect()
}

/// The device and dtype the engine tests run on: the CPU in f32 unless `GRATING_TEST_DEVICE`
/// (e.g. `cuda:0`) and `GRATING_TEST_DTYPE` (f32, f16, bf16) say otherwise. The CUDA runs of
/// the parity and mode tests on the GPU machine use these.
pub fn engine_options() -> grating::EngineOptions {
    let device = match std::env::var("GRATING_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") | Ok("") => candle_core::Device::Cpu,
        Ok(d) => {
            let ordinal = d
                .strip_prefix("cuda")
                .map(|r| r.trim_start_matches(':').parse().unwrap_or(0))
                .unwrap_or_else(|| panic!("GRATING_TEST_DEVICE={d:?}: expected cpu or cuda:N"));
            candle_core::Device::new_cuda(ordinal)
                .unwrap_or_else(|e| panic!("GRATING_TEST_DEVICE={d:?} but no CUDA device: {e}"))
        }
    };
    let dtype = std::env::var("GRATING_TEST_DTYPE")
        .ok()
        .map(|d| match d.as_str() {
            "f32" => candle_core::DType::F32,
            "f16" => candle_core::DType::F16,
            "bf16" => candle_core::DType::BF16,
            other => panic!("GRATING_TEST_DTYPE={other:?}: expected f32, f16 or bf16"),
        });
    grating::EngineOptions {
        device,
        dtype,
        ..isolated_options()
    }
}

/// Default options, except that profiles come from (and a server's self-calibration writes
/// to) an empty directory of this test process: profiles saved on this machine must not
/// change what the tests check, and the tests must not leave any behind. Only the built-in
/// profiles apply.
pub fn isolated_options() -> grating::EngineOptions {
    let dir = std::env::temp_dir().join(format!("grating-tests-profiles-{}", std::process::id()));
    grating::EngineOptions {
        profile_dir: Some(dir),
        ..Default::default()
    }
}

/// Allowed |grating - HF| on a logit for the test dtype: `abs + rel * |HF|`. f32 on the CPU
/// agrees to 1e-4 (measured worst 1.7e-5); half precision keeps 8 (bf16) or 11 (f16)
/// mantissa bits per activation, so its bound scales with the logit.
///
/// `GRATING_TEST_WEIGHTS=f16` says the shared models are f16 copies (what travels to the GPU
/// machine): their rounded weights alone move a logit by up to ~3e-3 even in f32 compute,
/// so the f16 bound applies.
pub fn logit_tolerance(reference: f32) -> f32 {
    let f16_weights = std::env::var("GRATING_TEST_WEIGHTS").is_ok_and(|w| w == "f16");
    logit_tolerance_for(test_dtype().as_deref(), on_gpu(), f16_weights, reference)
}

/// [`logit_tolerance`] for an explicit compute dtype (`None`: f32), device and weight copy.
pub fn logit_tolerance_for(
    dtype: Option<&str>,
    gpu: bool,
    f16_weights: bool,
    reference: f32,
) -> f32 {
    let (abs, rel) = match dtype {
        Some("bf16") => (0.15, 0.05),
        Some("f16") => (0.03, 0.01),
        _ if f16_weights => (0.03, 0.01),
        _ if gpu => (1e-3, 1e-4),
        _ => (1e-4, 0.0),
    };
    abs + rel * reference.abs()
}

/// `GRATING_TEST_DTYPE`, if set.
fn test_dtype() -> Option<String> {
    std::env::var("GRATING_TEST_DTYPE").ok()
}

/// Whether `GRATING_TEST_DEVICE` names a GPU.
fn on_gpu() -> bool {
    std::env::var("GRATING_TEST_DEVICE").is_ok_and(|d| d.starts_with("cuda"))
}

/// Allowed difference between two runs of the same model whose batches differ (other
/// batch-mates, chunking, length buckets): exact math on the CPU, but a GPU picks GEMM
/// algorithms by shape, so sums are ordered differently.
pub fn batch_tolerance() -> f32 {
    match test_dtype().as_deref() {
        Some("bf16") => 0.1,
        Some("f16") => 0.02,
        _ if on_gpu() => 1e-3,
        _ => 1e-5,
    }
}

/// Asserts the server's one error shape: `status`, a JSON body with `error_type` and a
/// non-empty `error`, and the request id header.
#[cfg(feature = "server")]
pub fn assert_error(r: &grating::server::client::HttpResponse, status: u16, error_type: &str) {
    assert_eq!(r.status, status, "body: {}", r.text());
    let v = r
        .json()
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", r.text()));
    assert_eq!(v["error_type"], error_type, "{v}");
    assert!(v["error"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    // The same text where Jina/FastAPI-style (`detail`) and Cohere (`message`) clients read it.
    assert_eq!(v["detail"], v["error"], "{v}");
    assert_eq!(v["message"], v["error"], "{v}");
    assert!(r.header("x-request-id").is_some());
}
