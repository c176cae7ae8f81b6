//! `grating._grating`: the native half of the Python package. It only translates: Python
//! arguments into the main crate's public options (the same mapping as the CLI's flags, see
//! `src/cli/common.rs` and `src/cli/rerank.rs`), calls the library with the GIL released, and
//! hands back plain values (tuples, lists, JSON text for the structured reports). The Python
//! half (`grating/__init__.py`) shapes those into the sentence-transformers-like API.

use grating::prune::calibrate::{self, Recording};
use grating::prune::profile::{self, PruneProfile};
use grating::prune::{PruneConfig, PruneMode, RuleKind, DEFAULT_MAX_CLUSTERS, DEFAULT_SSE_RATIO};
use grating::{
    EngineOptions, Execution, GratingError, Mode, Progress, RerankOptions, RerankOutput, Reranker,
    SharedOptions, SharedReranker, Truncation, WeightsMode,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// A library error as the package's exception: `grating.errors.InvalidRequestError` (a
/// `ValueError`) for what the caller can fix, `grating.errors.GratingError` otherwise; the
/// message is the error's display text, as the CLI prints it, and `kind` its `error_type`.
fn py_err(py: Python<'_>, e: &GratingError) -> PyErr {
    let class = if e.is_client_error() {
        "InvalidRequestError"
    } else {
        "GratingError"
    };
    match py
        .import("grating.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((e.to_string(), e.error_type())))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(import_failed) => import_failed,
    }
}

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// The CLI's `--device`: cpu, cuda or cuda:N (`src/cli/common.rs`).
fn parse_device(s: &str) -> PyResult<candle_core::Device> {
    if s == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let invalid = || value_error(format!("invalid device {s:?} (cpu, cuda or cuda:N)"));
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(invalid)?,
        None => return Err(invalid()),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(value_error(format!(
            "device {s:?} requested but this build has no CUDA support (build with --features cuda)"
        )));
    }
    candle_core::Device::new_cuda(ordinal)
        .map_err(|e| PyErr::new::<pyo3::exceptions::PyRuntimeError, _>(e.to_string()))
}

fn parse_truncation(s: &str) -> PyResult<Truncation> {
    match s {
        "right" => Ok(Truncation::Right),
        "left" => Ok(Truncation::Left),
        _ => Err(value_error(format!(
            "unknown truncation direction {s:?} (right, left)"
        ))),
    }
}

/// The CLI's pruning flags at their defaults over `base` (`PruneArgs::config`), with `exact`
/// as `--prune off`: the top K of full inference, nothing pruned.
fn request_prune(base: &PruneConfig, exact: bool) -> PruneConfig {
    PruneConfig {
        max_clusters: DEFAULT_MAX_CLUSTERS,
        sse_ratio: DEFAULT_SSE_RATIO,
        mode: if exact {
            PruneMode::Off
        } else {
            PruneMode::TopK
        },
        ..base.clone()
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| value_error(e.to_string()))
}

/// Reports finished (query, document) pairs to a Python callable, `callback(n_new)`, taking
/// the GIL only for the call.
struct PairProgress<'a> {
    callback: &'a Py<PyAny>,
    pairs: usize,
    reported: AtomicUsize,
}

impl PairProgress<'_> {
    fn advance_to(&self, done: usize) {
        let before = self.reported.swap(done, Ordering::Relaxed);
        if done > before {
            Python::with_gil(|py| {
                // A failing progress callback must not fail the computation.
                let _ = self.callback.call1(py, (done - before,));
            });
        }
    }
}

impl Progress for PairProgress<'_> {
    fn step(&self, done: usize, total: usize) {
        if let Some(pairs) = (self.pairs * done).checked_div(total) {
            self.advance_to(pairs);
        }
    }
}

/// A loaded model, with the shared layer pass that concurrent `rank`/`rerank` calls join.
#[pyclass(frozen, name = "NativeReranker", module = "grating._grating")]
struct NativeReranker {
    reranker: Arc<Reranker>,
    /// The shared pass (as `grating serve` runs): `None` under a memory budget, where each
    /// request is planned to the budget by `Reranker::rerank` and requests run one at a time.
    shared: Option<SharedReranker>,
    /// Serializes requests when there is no shared pass.
    one_at_a_time: Mutex<()>,
    /// A rule set by `calibrate(apply=True)`, replacing the reranker's own.
    calibrated: RwLock<Option<PruneConfig>>,
    device: String,
}

impl NativeReranker {
    fn base_prune(&self) -> PruneConfig {
        self.calibrated
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| self.reranker.prune_config().clone())
    }

    fn options(
        &self,
        top_k: Option<usize>,
        exact: bool,
        max_length: Option<usize>,
        truncation: &str,
        instruction: Option<String>,
    ) -> PyResult<RerankOptions> {
        Ok(RerankOptions {
            top_k,
            mode: Mode::Grating,
            prune: Some(request_prune(&self.base_prune(), exact)),
            max_length,
            truncation: parse_truncation(truncation)?,
            truncate: true,
            instruction,
            execution: None,
        })
    }

    /// Runs `f` on the reranker without the shared pass, one request at a time when there is a
    /// memory budget to keep.
    fn direct<T>(&self, f: impl FnOnce(&Reranker) -> grating::Result<T>) -> grating::Result<T> {
        let _one = self.shared.is_none().then(|| {
            self.one_at_a_time
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        });
        f(&self.reranker)
    }
}

/// A ranked candidate as Python gets it: (document index, logit, relevance score).
type RankedRow = (usize, f32, f32);

fn rows(reranker: &Reranker, out: &RerankOutput) -> Vec<RankedRow> {
    out.ranked
        .iter()
        .map(|s| (s.index, s.logit, reranker.relevance(s.logit)))
        .collect()
}

#[pymethods]
impl NativeReranker {
    #[new]
    #[pyo3(signature = (
        model,
        device = "cpu",
        weights = "auto",
        max_memory = None,
        threads = None,
        dtype = None,
        profile_dir = None,
        batch_size = None,
        chunk_tokens = None,
        offload = false,
        spill_dir = None,
        embedding_cache = 0.1,
        shared = true,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: String,
        device: &str,
        weights: &str,
        max_memory: Option<u64>,
        threads: Option<usize>,
        dtype: Option<&str>,
        profile_dir: Option<PathBuf>,
        batch_size: Option<usize>,
        chunk_tokens: Option<usize>,
        offload: bool,
        spill_dir: Option<PathBuf>,
        embedding_cache: f32,
        shared: bool,
    ) -> PyResult<Self> {
        let weights: WeightsMode = weights.parse().map_err(value_error)?;
        let dtype = match dtype {
            Some(d) => Some(
                d.parse::<grating::synth::DiskDtype>()
                    .map_err(value_error)?
                    .into(),
            ),
            None => None,
        };
        // As the CLI: all cores unless told.
        let threads = threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let opts = EngineOptions {
            device: parse_device(device)?,
            dtype,
            weights,
            embedding_cache_share: embedding_cache,
            max_memory,
            threads: Some(threads),
            batch_size,
            chunk_tokens,
            offload,
            profile_dir,
            spill_dir,
            ..Default::default()
        };
        let reranker = py
            .allow_threads(|| Reranker::load(&model, &opts))
            .map_err(|e| py_err(py, &e))?;
        let reranker = Arc::new(reranker);
        let shared = if shared && max_memory.is_none() {
            let opts = SharedOptions {
                chunk_tokens: reranker.execution().chunk_tokens,
                ..Default::default()
            };
            Some(SharedReranker::new(reranker.clone(), opts).map_err(|e| py_err(py, &e))?)
        } else {
            None
        };
        Ok(NativeReranker {
            reranker,
            shared,
            one_at_a_time: Mutex::new(()),
            calibrated: RwLock::new(None),
            device: device.to_string(),
        })
    }

    /// Top K (or every document) for `query`, best first, as (index, logit, relevance) rows,
    /// with the request's stats as JSON.
    #[pyo3(signature = (query, documents, top_k = None, exact = false, max_length = None, truncation = "right", instruction = None))]
    #[allow(clippy::too_many_arguments)]
    fn rerank(
        &self,
        py: Python<'_>,
        query: String,
        documents: Vec<String>,
        top_k: Option<usize>,
        exact: bool,
        max_length: Option<usize>,
        truncation: &str,
        instruction: Option<String>,
    ) -> PyResult<(Vec<RankedRow>, String)> {
        let opts = self.options(top_k, exact, max_length, truncation, instruction)?;
        let out = py
            .allow_threads(|| match &self.shared {
                Some(shared) => shared.rerank_blocking(&query, &documents, &opts),
                None => self.direct(|r| r.rerank(&query, &documents, &opts)),
            })
            .map_err(|e| py_err(py, &e))?;
        Ok((rows(&self.reranker, &out), to_json(&out.stats)?))
    }

    /// Logits (or, with `relevance`, relevance scores) of every (query, document) pair by full
    /// inference, in the pairs' order. Pairs are grouped by query (one request per distinct
    /// query, in first-seen order); `progress(n)` is told of finished pairs.
    #[pyo3(signature = (pairs, batch_size = None, max_length = None, truncation = "right", instruction = None, relevance = false, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn predict(
        &self,
        py: Python<'_>,
        pairs: Vec<(String, String)>,
        batch_size: Option<usize>,
        max_length: Option<usize>,
        truncation: &str,
        instruction: Option<String>,
        relevance: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<f32>> {
        let mut order: Vec<&str> = Vec::new();
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, (q, _)) in pairs.iter().enumerate() {
            groups
                .entry(q.as_str())
                .or_insert_with(|| {
                    order.push(q.as_str());
                    Vec::new()
                })
                .push(i);
        }
        let execution = batch_size.map(|b| Execution {
            batch_size: b,
            ..*self.reranker.execution()
        });
        let opts = RerankOptions {
            top_k: None,
            mode: Mode::Full,
            prune: None,
            max_length,
            truncation: parse_truncation(truncation)?,
            truncate: true,
            instruction,
            execution,
        };
        let total = pairs.len();
        let result = py.allow_threads(|| {
            let mut logits = vec![f32::NAN; total];
            for q in &order {
                let members = &groups[q];
                let docs: Vec<&str> = members.iter().map(|&i| pairs[i].1.as_str()).collect();
                let out = match &progress {
                    Some(cb) => {
                        let bar = PairProgress {
                            callback: cb,
                            pairs: docs.len(),
                            reported: AtomicUsize::new(0),
                        };
                        let out = self.direct(|r| r.rerank_with_progress(q, &docs, &opts, &bar))?;
                        bar.advance_to(docs.len());
                        out
                    }
                    None => self.direct(|r| r.rerank(q, &docs, &opts))?,
                };
                for s in &out.ranked {
                    logits[members[s.index]] = if relevance {
                        self.reranker.relevance(s.logit)
                    } else {
                        s.logit
                    };
                }
            }
            Ok::<_, GratingError>(logits)
        });
        result.map_err(|e| py_err(py, &e))
    }

    /// Calibrates the margin rule on `requests` as `grating calibrate` does on a jsonl of
    /// requests: each recorded once without pruning, the margin chosen out of fold. Returns the
    /// report as JSON; `save` writes the model's profile, `apply` makes later requests use the
    /// rule.
    #[pyo3(signature = (requests, target_agreement = 0.99, min_agreement = 0.9, top_k = vec![1, 5, 10], sizes = vec![0], folds = 5, save = false, apply = true, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn calibrate(
        &self,
        py: Python<'_>,
        requests: Vec<(String, Vec<String>)>,
        target_agreement: f64,
        min_agreement: f64,
        top_k: Vec<usize>,
        sizes: Vec<usize>,
        folds: usize,
        save: bool,
        apply: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        if folds < 2 {
            return Err(value_error("folds must be at least 2"));
        }
        if top_k.is_empty() || top_k.contains(&0) {
            return Err(value_error("top_k needs values of at least 1"));
        }
        if !(target_agreement > 0.0 && target_agreement <= 1.0) {
            return Err(value_error("target_agreement must be in (0, 1]"));
        }
        let sizes = if sizes.is_empty() { vec![0] } else { sizes };
        let kmax = *top_k.iter().max().expect("non-empty");
        let requests: Vec<(String, Vec<String>)> =
            requests.into_iter().filter(|r| r.1.len() > kmax).collect();
        if requests.is_empty() {
            return Err(value_error(format!(
                "no sample requests with more than {kmax} documents"
            )));
        }
        let recorded = py.allow_threads(|| {
            let mut recs = Vec::with_capacity(requests.len());
            for (query, docs) in &requests {
                let layer_scores = self
                    .direct(|r| r.layer_scores(query, docs, &RerankOptions::default()))?
                    .0;
                recs.push(Recording {
                    query: query.clone(),
                    layer_scores,
                });
                if let Some(cb) = &progress {
                    Python::with_gil(|py| {
                        let _ = cb.call1(py, (1,));
                    });
                }
            }
            Ok::<_, GratingError>(recs)
        });
        let recs = recorded.map_err(|e| py_err(py, &e))?;
        // A fresh calibration from the default rule, as the CLI's (not the profile's).
        let base = PruneConfig {
            first_layer: 1,
            ..PruneConfig::default()
        };
        let fit = py.allow_threads(|| {
            calibrate::fit(
                &recs,
                &base,
                target_agreement,
                min_agreement,
                &sizes,
                &top_k,
                folds,
            )
        });
        let mut saved = None;
        if save {
            let worst = fit
                .held_out
                .iter()
                .min_by(|a, b| a.agreement.total_cmp(&b.agreement))
                .expect("rows");
            let files = self.reranker.files();
            let p = PruneProfile {
                model: self.reranker.model_id().to_string(),
                fingerprint: profile::fingerprint(files).map_err(|e| py_err(py, &e))?,
                rule: Some(RuleKind::Margin),
                movement: fit.config.movement.clone(),
                margin: Some(fit.config.margin),
                threshold: None,
                first_layer: fit.config.first_layer,
                target_agreement,
                measured_agreement: worst.agreement,
                measured_compute: worst.compute_share,
                top_k: kmax,
                queries: recs.len(),
                source: format!("grating (Python) calibrate ({} requests)", recs.len()),
                held_out: fit.held_out.clone(),
            };
            let path = profile::save(self.reranker.profile_dir(), files, &p)
                .map_err(|e| py_err(py, &e))?;
            saved = Some(path.display().to_string());
        }
        if apply {
            *self
                .calibrated
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Some(fit.config.clone());
        }
        // Each part serialized on its own: through `json!` the f32s would become f64 digits
        // that differ from the profile's and `prune_json`'s.
        Ok(format!(
            r#"{{"config": {}, "held_out": {}, "met": {}, "requests": {}, "profile_path": {}}}"#,
            to_json(&fit.config)?,
            to_json(&fit.held_out)?,
            fit.met,
            recs.len(),
            to_json(&saved)?,
        ))
    }

    /// The 0-1 relevance score of a logit (the model's calibration, else the sigmoid).
    fn relevance(&self, logit: f32) -> f32 {
        self.reranker.relevance(logit)
    }

    /// Whether `relevance` is the model's fitted calibration (else the plain sigmoid).
    #[getter]
    fn score_calibrated(&self) -> bool {
        self.reranker.score_calibration().is_some()
    }

    #[getter]
    fn model_id(&self) -> &str {
        self.reranker.model_id()
    }

    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    #[getter]
    fn weights(&self) -> &'static str {
        match self.reranker.weights_mode() {
            WeightsMode::Resident => "resident",
            WeightsMode::Stream => "stream",
            WeightsMode::Auto => "auto",
        }
    }

    #[getter]
    fn profile_dir(&self) -> String {
        self.reranker.profile_dir().display().to_string()
    }

    /// Whether concurrent requests share the layer pass.
    #[getter]
    fn shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The model's shape facts (`ModelInfo`) as JSON.
    fn info_json(&self) -> PyResult<String> {
        to_json(self.reranker.info())
    }

    /// The pruning rule requests use now, as JSON.
    fn prune_json(&self) -> PyResult<String> {
        to_json(&request_prune(&self.base_prune(), false))
    }
}

/// Bytes of a size such as `512MiB` (the CLI's `--max-memory`).
#[pyfunction]
fn parse_size(s: &str) -> PyResult<u64> {
    grating::parse_size(s).map_err(value_error)
}

#[pymodule]
fn _grating(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeReranker>()?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
