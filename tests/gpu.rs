//! CUDA-only checks, built with `--features cuda` and run on the GPU machine
//! (`scripts/device_gpu.sh`). Without a GPU they fail: a CUDA build is only tested where one is.
//!
//! The CPU engine's parity and mode suites are compiled into this binary too (one binary
//! travels to the GPU machine, not three), and run on the GPU through `GRATING_TEST_DEVICE`
//! and `GRATING_TEST_DTYPE`.
#![cfg(feature = "cuda")]
// parity.rs and modes.rs each declare `mod common;` for their own binaries; included here they
// load it again, which is intended.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "modes.rs"]
mod modes;
#[path = "parity.rs"]
mod parity;

use candle_core::{DType, Device};
use grating::engine::{EngineOptions, Mode, RerankRequest, Reranker, WeightsMode};
use grating::prune::{PruneConfig, PruneMode};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

fn request(n: usize) -> RerankRequest {
    let words = [
        "river", "bank", "loan", "water", "flow", "credit", "interest", "fish", "boat", "rate",
        "deposit", "stream", "current", "account", "mortgage", "bridge",
    ];
    let docs = (0..n)
        .map(|i| {
            // Lengths from 3 to 40 words, so several length buckets form.
            (0..3 + (i * 7) % 38)
                .map(|j| words[(i * 5 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    RerankRequest::new("what rate does the bank pay on a deposit", docs)
}

/// Logits in document order.
fn scores(r: &Reranker, req: &RerankRequest) -> Vec<f32> {
    let mut v = vec![f32::NAN; req.documents.len()];
    for (i, logit) in common::ranked(r, req) {
        v[i] = logit;
    }
    v
}

fn load(model: &std::path::Path, device: Device, dtype: DType, weights: WeightsMode) -> Reranker {
    let opts = EngineOptions {
        device,
        dtype: Some(dtype),
        weights,
        ..Default::default()
    };
    Reranker::load(model.to_str().unwrap(), &opts).unwrap()
}

fn models() -> Vec<std::path::PathBuf> {
    let mut m = vec![
        common::fixture("qwen3-tiny"),
        common::fixture("xlm-roberta-tiny"),
    ];
    if let Some(d) = common::shared_model("minilm-l6-msmarco-distilled") {
        m.push(d);
    }
    m
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Every dtype on the GPU against the CPU's f32 scores, full mode, 24 documents of uneven
/// length. The bounds are the parity tolerances of `common::logit_tolerance` for each dtype.
#[test]
fn gpu_scores_match_cpu_in_every_dtype() {
    let mut req = request(24);
    req.mode = Mode::Full;
    for model in models() {
        let cpu = scores(
            &load(&model, Device::Cpu, DType::F32, WeightsMode::Resident),
            &req,
        );
        for (dtype, name) in [
            (DType::F32, "f32"),
            (DType::F16, "f16"),
            (DType::BF16, "bf16"),
        ] {
            let g = scores(&load(&model, gpu(), dtype, WeightsMode::Resident), &req);
            for (i, (c, x)) in cpu.iter().zip(&g).enumerate() {
                assert!(
                    (c - x).abs() <= common::logit_tolerance_for(Some(name), true, false, *c),
                    "{} {dtype:?} doc {i}: cpu {c} gpu {x}",
                    model.display()
                );
            }
            eprintln!(
                "{} {dtype:?}: worst |gpu - cpu| {:e}",
                model.display(),
                max_diff(&cpu, &g)
            );
        }
    }
}

/// Layers streamed through pinned memory and the copy stream give the scores of resident
/// layers, in both modes, and the allocator counters are reported.
#[test]
fn streamed_layers_on_gpu_equal_resident_layers() {
    for model in models() {
        let resident = load(&model, gpu(), DType::BF16, WeightsMode::Resident);
        let streamed = load(&model, gpu(), DType::BF16, WeightsMode::Stream);
        for mode in [Mode::Full, Mode::Grating] {
            let mut req = request(30);
            req.mode = mode;
            req.prune = PruneConfig {
                mode: PruneMode::Off,
                ..Default::default()
            };
            let a = scores(&resident, &req);
            let b = scores(&streamed, &req);
            assert!(
                max_diff(&a, &b) < 1e-3,
                "{} {mode:?}: resident {a:?} vs streamed {b:?}",
                model.display()
            );
            // Twice through the same stream object: the staging buffers are reused.
            assert!(max_diff(&b, &scores(&streamed, &req)) < 1e-6);
        }
        let out = streamed.rerank(&request(8), None).unwrap();
        let mem = out.stats.gpu_memory.expect("GPU memory counters on CUDA");
        assert!(mem.peak_used > 0 && mem.device_used >= mem.peak_used);
    }
}

/// Full mode vs grating mode on the GPU: no pruning gives the same scores, exact-order pruning
/// keeps full mode's top K.
#[test]
fn full_and_grating_agree_on_gpu() {
    for model in models() {
        let r = load(&model, gpu(), DType::F32, WeightsMode::Resident);
        let mut req = request(40);
        req.mode = Mode::Full;
        let full = scores(&r, &req);
        req.mode = Mode::Grating;
        req.prune = PruneConfig {
            mode: PruneMode::Off,
            ..Default::default()
        };
        let mono = scores(&r, &req);
        assert!(max_diff(&full, &mono) < 1e-3, "{}", model.display());
        req.top_k = Some(5);
        req.prune = PruneConfig {
            mode: PruneMode::ExactOrder,
            ..Default::default()
        };
        let out = r.rerank(&req, None).unwrap();
        let mut order: Vec<usize> = (0..full.len()).collect();
        order.sort_by(|&a, &b| full[b].total_cmp(&full[a]));
        let got: Vec<usize> = out.ranked.iter().map(|s| s.index).collect();
        assert_eq!(got, order[..5].to_vec(), "{}", model.display());
    }
}

/// The streamed model's peak GPU allocation stays below the resident one's on the shared
/// BERT model (its embedding table alone is half of its weights).
#[test]
fn streaming_lowers_peak_gpu_memory() {
    let Some(model) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    let mut peaks = Vec::new();
    for weights in [WeightsMode::Resident, WeightsMode::Stream] {
        let r = load(&model, gpu(), DType::BF16, weights);
        grating::memory::reset_gpu_peak(r.device());
        let out = r.rerank(&request(20), None).unwrap();
        peaks.push(out.stats.gpu_memory.unwrap().peak_used);
    }
    eprintln!(
        "peak GPU allocation: resident {} B, streamed {} B",
        peaks[0], peaks[1]
    );
    assert!(peaks[1] < peaks[0], "{peaks:?}");
}
