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

use candle_core::{DType, Device, Tensor};
use common::Req;
use grating::prune::{PruneConfig, PruneMode};
use grating::{EngineOptions, Mode, Reranker, SharedOptions, SharedReranker, WeightsMode};
use std::sync::Arc;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

fn request(n: usize) -> Req {
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
    Req::new("what rate does the bank pay on a deposit", docs)
}

/// Logits in document order.
fn scores(r: &Reranker, req: &Req) -> Vec<f32> {
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
    req.opts.mode = Mode::Full;
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
            req.opts.mode = mode;
            req.opts.prune = Some(PruneConfig {
                mode: PruneMode::Off,
                ..Default::default()
            });
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
        let out = request(8).run(&streamed).unwrap();
        let mem = out.stats.gpu_memory.expect("GPU memory counters on CUDA");
        assert!(mem.peak_used > 0 && mem.device_used >= mem.peak_used);
    }
}

/// The shared pass on the GPU, with resident, streamed and reloaded layers (rebuilt in the
/// compute dtype on the GPU, as resident ones are), answers each of three overlapping
/// requests exactly as it is answered alone.
#[test]
fn shared_pass_on_gpu_equals_alone_with_every_layer_source() {
    for model in models() {
        for (weights, reload_layers) in [
            (WeightsMode::Resident, false),
            (WeightsMode::Stream, false),
            (WeightsMode::Resident, true),
        ] {
            let r = Arc::new(load(&model, gpu(), DType::BF16, weights));
            let shared = SharedReranker::new(
                r.clone(),
                SharedOptions {
                    step_tokens: 1500,
                    chunk_tokens: 600,
                    reload_layers,
                    ..Default::default()
                },
            )
            .unwrap();
            let (mut pending, mut expected) = (Vec::new(), Vec::new());
            for (n, k) in [(30, 5), (12, 2), (40, 10)] {
                let mut req = request(n);
                req.opts.top_k = Some(k);
                req.chunk_tokens = Some(600);
                expected.push(req.run(&r).unwrap());
                pending.push(
                    shared
                        .submit(&req.query, &req.documents, &req.opts, None)
                        .unwrap(),
                );
            }
            for (i, (p, want)) in pending.into_iter().zip(&expected).enumerate() {
                let got = p.wait().unwrap();
                assert_eq!(
                    got.ranked,
                    want.ranked,
                    "{} {weights:?} reload {reload_layers}: request {i}",
                    model.display()
                );
            }
            shared.shutdown();
        }
    }
}

/// Full mode vs grating mode on the GPU: no pruning gives the same scores, exact-order pruning
/// keeps full mode's top K.
#[test]
fn full_and_grating_agree_on_gpu() {
    for model in models() {
        let r = load(&model, gpu(), DType::F32, WeightsMode::Resident);
        let mut req = request(40);
        req.opts.mode = Mode::Full;
        let full = scores(&r, &req);
        req.opts.mode = Mode::Grating;
        req.opts.prune = Some(PruneConfig {
            mode: PruneMode::Off,
            ..Default::default()
        });
        let mono = scores(&r, &req);
        assert!(max_diff(&full, &mono) < 1e-3, "{}", model.display());
        req.opts.top_k = Some(5);
        req.opts.prune = Some(PruneConfig {
            mode: PruneMode::ExactOrder,
            ..Default::default()
        });
        let out = req.run(&r).unwrap();
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
        let out = request(20).run(&r).unwrap();
        peaks.push(out.stats.gpu_memory.unwrap().peak_used);
    }
    eprintln!(
        "peak GPU allocation: resident {} B, streamed {} B",
        peaks[0], peaks[1]
    );
    assert!(peaks[1] < peaks[0], "{peaks:?}");
}

/// Deterministic values in [-2, 2) (a fixed LCG, so failures reproduce).
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// `t` rounded to `dtype` and back, on the CPU: the exact inputs a half-precision GPU run sees.
fn rounded(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

/// The largest absolute element of `t`, as f32 on the CPU.
fn max_abs(t: &Tensor) -> f32 {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (a, b) = (f32_cpu(a), f32_cpu(b));
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// The flash attention kernel and the length-bucketed kernels against the CPU's f32 packed
/// attention on the same (rounded) inputs: every head dim the kernel has, grouped-query and
/// plain heads, causal and not, and sequence lengths around the 64-row tiles (1, 63, 64, 65,
/// 129, 300). Bounds: bf16 0.03, f16 0.005 (the probabilities are rounded to the dtype before
/// the PV product, and so is the output).
#[test]
fn flash_attention_matches_cpu_attention() {
    use grating::ops::{attention_with, AttentionKernel, AttentionShape, SeqLayout};
    let lens = [1usize, 7, 63, 64, 65, 129, 300, 17];
    let mut spans = Vec::new();
    let mut rows = 0;
    for len in lens {
        spans.push((rows, len));
        rows += len;
    }
    let layout = SeqLayout::new(spans);
    for (head_dim, n_heads, n_kv_heads) in [(32, 12, 12), (64, 4, 2), (128, 16, 8)] {
        for causal in [false, true] {
            let shape = AttentionShape {
                n_heads,
                n_kv_heads,
                head_dim,
                causal,
            };
            let width = shape.qkv_width();
            let qkv = Tensor::from_vec(
                pseudo_random(rows * width, head_dim as u64),
                (rows, width),
                &Device::Cpu,
            )
            .unwrap();
            for (dtype, bound) in [(DType::BF16, 0.03f32), (DType::F16, 0.005)] {
                let exact = rounded(&qkv, dtype);
                let reference =
                    attention_with(&exact, &layout, shape, AttentionKernel::Auto).unwrap();
                let on_gpu = qkv.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
                for kernel in [AttentionKernel::Flash, AttentionKernel::Bucketed] {
                    let got = attention_with(&on_gpu, &layout, shape, kernel).unwrap();
                    let d = max_abs_diff(&got, &reference);
                    eprintln!("{kernel:?} dh {head_dim} heads {n_heads}/{n_kv_heads} causal {causal} {dtype:?}: {d:e}");
                    assert!(
                        d <= bound,
                        "{kernel:?} dh {head_dim} causal {causal} {dtype:?}: {d}"
                    );
                }
            }
        }
    }
    // What the kernel cannot run is refused, not miscomputed.
    let shape = AttentionShape {
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 8,
        causal: false,
    };
    let small = Tensor::zeros((rows, shape.qkv_width()), DType::BF16, &gpu()).unwrap();
    assert!(attention_with(&small, &layout, shape, AttentionKernel::Flash).is_err());
}

/// cuBLASLt linear layers (with and without the bias epilogue) and the fused residual add +
/// RMSNorm against the CPU's f32 ops on the same rounded inputs.
#[test]
fn lt_linear_and_fused_norm_match_cpu() {
    use grating::ops::{add_rms_norm, linear};
    let (m, k, n) = (1000, 384, 1152);
    let cpu = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let x = cpu(pseudo_random(m * k, 1), &[m, k]);
    let w = (cpu(pseudo_random(n * k, 2), &[n, k]) * 0.05).unwrap();
    let b = cpu(pseudo_random(n, 3), &[n]);
    for dtype in [DType::BF16, DType::F16] {
        let g = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
        for bias in [None, Some(&b)] {
            let want = linear(
                &rounded(&x, dtype),
                &rounded(&w, dtype),
                bias.map(|b| rounded(b, dtype)).as_ref(),
            )
            .unwrap();
            let got = linear(&g(&x), &g(&w), bias.map(g).as_ref()).unwrap();
            let scale = max_abs(&want);
            let d = max_abs_diff(&got, &want);
            eprintln!(
                "linear {dtype:?} bias {}: {d:e} of max {scale}",
                bias.is_some()
            );
            assert!(d <= 0.01 * scale, "linear {dtype:?}: {d} (max {scale})");
        }
        let gamma = cpu(pseudo_random(k, 4), &[k]);
        let r = cpu(pseudo_random(m * k, 5), &[m, k]);
        let (want, want_sum) = add_rms_norm(
            &rounded(&x, dtype),
            Some(&rounded(&r, dtype)),
            &rounded(&gamma, dtype),
            1e-6,
        )
        .unwrap();
        let (got, got_sum) = add_rms_norm(&g(&x), Some(&g(&r)), &g(&gamma), 1e-6).unwrap();
        let (d, ds) = (max_abs_diff(&got, &want), max_abs_diff(&got_sum, &want_sum));
        eprintln!("add_rms_norm {dtype:?}: out {d:e}, sum {ds:e}");
        // Values up to ~4 (sum) and ~8 (normed x gamma): a few units in the last place.
        assert!(d <= 0.08 && ds <= 0.04, "add_rms_norm {dtype:?}: {d} {ds}");
        let (plain, same) = add_rms_norm(&g(&x), None, &g(&gamma), 1e-6).unwrap();
        let (want_plain, _) =
            add_rms_norm(&rounded(&x, dtype), None, &rounded(&gamma, dtype), 1e-6).unwrap();
        assert!(max_abs_diff(&plain, &want_plain) <= 0.08);
        assert_eq!(max_abs_diff(&same, &g(&x)), 0.0);
    }
}

/// The fused residual add + RMSNorm writes its sum in place into a tensor the op owns; switched
/// to candle's generic ops through the process-wide setting, the same inputs give the same
/// results within rounding. (The setting is restored before any assertion can fail; other
/// tests running meanwhile only take the generic path for a moment, which they tolerate.)
#[test]
fn fused_norm_matches_generic_path_through_the_setting() {
    use grating::ops::{add_rms_norm, set_generic_gpu_paths, GpuPath};
    let (m, k) = (300, 384);
    let cpu = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let x = cpu(pseudo_random(m * k, 11), &[m, k]);
    let r = cpu(pseudo_random(m * k, 12), &[m, k]);
    let gamma = cpu(pseudo_random(k, 13), &[k]);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let g = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
        let (xg, rg, gg) = (g(&x), g(&r), g(&gamma));
        let fused = add_rms_norm(&xg, Some(&rg), &gg, 1e-6).unwrap();
        set_generic_gpu_paths(&GpuPath::parse_list("norm").unwrap());
        let generic = add_rms_norm(&xg, Some(&rg), &gg, 1e-6);
        set_generic_gpu_paths(&[]);
        let generic = generic.unwrap();
        let (d, ds) = (
            max_abs_diff(&fused.0, &generic.0),
            max_abs_diff(&fused.1, &generic.1),
        );
        eprintln!("fused vs generic add_rms_norm {dtype:?}: out {d:e}, sum {ds:e}");
        assert!(d <= 0.08 && ds <= 0.04, "add_rms_norm {dtype:?}: {d} {ds}");
        // The inputs are left as they were.
        assert_eq!(max_abs_diff(&xg, &g(&x)), 0.0);
        assert_eq!(max_abs_diff(&rg, &g(&r)), 0.0);
    }
}

/// Uploads go through a small pool of page-locked buffers; a buffer refilled before its copy
/// reached the device would corrupt an earlier tensor. Many uploads of varying sizes (more
/// than the pool holds, queued behind a long kernel so the copies are still pending), read
/// back after all were queued, must each hold their own data.
#[test]
fn page_locked_uploads_keep_every_tensor_intact() {
    let dev = gpu();
    // A matmul large enough to keep the stream busy while the uploads are queued behind it.
    let big = Tensor::ones((2048, 2048), DType::F32, &dev).unwrap();
    let _busy = big.matmul(&big).unwrap();
    let mut expected: Vec<(Vec<u32>, Tensor)> = Vec::new();
    let mut floats: Vec<(Vec<f32>, DType, Tensor)> = Vec::new();
    for i in 0..40usize {
        let n = 1 + (i * 7919) % 70_000;
        let ints: Vec<u32> = (0..n as u32)
            .map(|k| k.wrapping_mul(2_654_435_761) ^ i as u32)
            .collect();
        let t = grating::ops::upload_u32(&ints, n, &dev).unwrap();
        expected.push((ints, t));
        let dtype = [DType::F32, DType::F16, DType::BF16][i % 3];
        let vals: Vec<f32> = (0..n).map(|k| ((k + i) % 251) as f32 - 125.0).collect();
        let t = grating::ops::upload_f32_as(&vals, (n, 1), dtype, &dev).unwrap();
        floats.push((vals, dtype, t));
    }
    for (ints, t) in &expected {
        assert_eq!(&t.to_vec1::<u32>().unwrap(), ints);
    }
    for (vals, dtype, t) in &floats {
        assert_eq!(t.dtype(), *dtype);
        // Small integers are exact in every float dtype.
        let back: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&back, vals);
    }
    // Empty uploads are empty tensors, not errors.
    assert_eq!(
        grating::ops::upload_u32(&[], 0, &dev).unwrap().elem_count(),
        0
    );
}
