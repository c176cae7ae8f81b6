//! Bounded memory: streaming and resident weights give identical scores, hidden-state offload
//! changes nothing but where states wait, the memory budget is honoured or refused clearly,
//! and a truncated weight file fails at the layer it hits.

mod common;

use common::Req;
use grating::prune::{PruneConfig, PruneMode};
use grating::synth::{convert, DiskDtype};
use grating::{EngineOptions, Mode, Reranker, WeightsMode};
use std::path::{Path, PathBuf};

fn opts(weights: WeightsMode) -> EngineOptions {
    EngineOptions {
        weights,
        ..Default::default()
    }
}

fn scores(
    r: &Reranker,
    query: &str,
    docs: &[String],
    mode: Mode,
    offload: bool,
    chunk: usize,
) -> Vec<f32> {
    let mut req = Req::new(query, docs.to_vec());
    req.opts.mode = mode;
    req.offload = offload;
    req.chunk_tokens = Some(chunk);
    req.opts.prune = Some(PruneConfig {
        mode: PruneMode::Off,
        ..Default::default()
    });
    let out = req.run(r).unwrap();
    let mut v = vec![f32::NAN; docs.len()];
    for s in out.ranked {
        v[s.index] = s.logit;
    }
    v
}

fn docs() -> Vec<String> {
    (0..12)
        .map(|i| {
            format!(
                "document {i} about rerankers and {} streaming layers of weights",
                "many ".repeat(i * 3)
            )
        })
        .collect()
}

fn assert_same(a: &[f32], b: &[f32], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 1e-5, "{what}: doc {i}: {x} vs {y}");
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("grating-mem-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn check_streaming_equals_resident(dir: &Path) {
    let m = dir.to_str().unwrap();
    let res = Reranker::load(m, &opts(WeightsMode::Resident)).unwrap();
    let st = Reranker::load(m, &opts(WeightsMode::Stream)).unwrap();
    assert_eq!(st.weights_mode(), WeightsMode::Stream);
    let d = docs();
    for mode in [Mode::Full, Mode::Grating] {
        let a = scores(&res, "streaming rerankers", &d, mode, false, 4096);
        let b = scores(&st, "streaming rerankers", &d, mode, false, 4096);
        assert_same(&a, &b, &format!("{} {mode:?}", dir.display()));
    }
    // Offload with small chunks (several chunks, so read-ahead and write-behind both run).
    let a = scores(&res, "streaming rerankers", &d, Mode::Grating, false, 64);
    let b = scores(&st, "streaming rerankers", &d, Mode::Grating, true, 64);
    assert_same(&a, &b, "offload");
}

#[test]
fn streaming_equals_resident_on_the_shared_model() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    check_streaming_equals_resident(&dir);
}

#[test]
fn streaming_equals_resident_on_synthetic_f16_models() {
    // Random-weight Qwen3 and XLM-R fixtures, converted to f16 on disk as real checkpoints are.
    for fixture in ["qwen3-tiny", "xlm-roberta-tiny"] {
        let out = tmp(&format!("f16-{fixture}"));
        convert(&common::fixture(fixture), &out, DiskDtype::F16).unwrap();
        check_streaming_equals_resident(&out);
    }
}

#[test]
fn embedding_cache_keeps_only_used_rows() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    let o = EngineOptions {
        weights: WeightsMode::Stream,
        embedding_cache_share: 0.01,
        ..Default::default()
    };
    let st = Reranker::load(dir.to_str().unwrap(), &o).unwrap();
    let res = Reranker::load(dir.to_str().unwrap(), &opts(WeightsMode::Resident)).unwrap();
    // More distinct tokens than the cache holds (305 rows): overflow rows are still right.
    let many: Vec<String> = (0..40)
        .map(|i| format!("word{i} alpha{i} beta{} gamma{}", i * 7, i * 13))
        .collect();
    let a = scores(&res, "alpha beta", &many, Mode::Grating, false, 4096);
    let b = scores(&st, "alpha beta", &many, Mode::Grating, false, 4096);
    assert_same(&a, &b, "cache overflow");
    // Repeated requests hit the cache and still agree.
    let b2 = scores(&st, "alpha beta", &many, Mode::Grating, false, 4096);
    assert_same(&a, &b2, "cache reuse");
}

#[test]
fn truncated_weights_fail_at_the_layer_in_streaming_mode() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    let out = tmp("truncated-stream");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    // Keep the header and the first part of the data: some layers are readable, later ones not.
    std::fs::write(out.join("model.safetensors"), &bytes[..bytes.len() * 3 / 4]).unwrap();
    // Resident loading checks the file up front.
    let e = Reranker::load(out.to_str().unwrap(), &opts(WeightsMode::Resident))
        .err()
        .expect("resident load must fail");
    assert!(e.to_string().contains("truncated"), "{e}");
    // Streaming reads only headers at load; the request fails cleanly where the data ends.
    match Reranker::load(out.to_str().unwrap(), &opts(WeightsMode::Stream)) {
        Err(e) => assert!(e.to_string().contains("truncated"), "{e}"),
        Ok(r) => {
            let mut req = Req::new("q", docs());
            req.opts.prune = Some(PruneConfig {
                mode: PruneMode::Off,
                ..Default::default()
            });
            let e = req.run(&r).expect_err("request must fail");
            let msg = e.to_string();
            assert!(
                msg.contains("truncated") && msg.contains("encoder.layer."),
                "{msg}"
            );
            // The engine is still usable for the error path again (no hang, no poisoned state).
            assert!(req.run(&r).is_err());
        }
    }
}

#[test]
fn memory_budget_is_honoured_or_refused() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    let d: Vec<String> = (0..60)
        .map(|i| format!("passage {i} {}", "text about memory budgets ".repeat(20)))
        .collect();
    // Generous: resident weights chosen, no offload needed.
    let rich = EngineOptions {
        weights: WeightsMode::Auto,
        max_memory: Some(8 << 30),
        ..Default::default()
    };
    let r = Reranker::load(dir.to_str().unwrap(), &rich).unwrap();
    assert_eq!(r.weights_mode(), WeightsMode::Resident);
    let mut req = Req::new("memory", d.clone());
    req.opts.top_k = Some(5);
    let out = req.run(&r).unwrap();
    assert!(out.stats.predicted_peak_mib > 0.0);
    assert_eq!(out.stats.offloaded_bytes, 0);
    // Impossible: refused with the minimum named.
    let poor = EngineOptions {
        weights: WeightsMode::Auto,
        max_memory: Some(1 << 20),
        ..Default::default()
    };
    let r = Reranker::load(dir.to_str().unwrap(), &poor).unwrap();
    assert_eq!(
        r.weights_mode(),
        WeightsMode::Stream,
        "a budget below the resident weights streams"
    );
    let e = req.run(&r).expect_err("1 MiB cannot work");
    let msg = e.to_string();
    assert!(
        msg.contains("needs at least") && msg.contains("MiB"),
        "{msg}"
    );
    assert!(e.is_client_error());
}
