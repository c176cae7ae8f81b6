//! Weight files: sharded checkpoints load and match, and broken ones name the offending tensor.

mod common;

use candle_core::{DType, Device, Tensor};
use common::Req;
use grating::Reranker;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("grating-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A copy of a fixture with its config and tokenizer, and `tensors` as its weights.
fn copy_with(fixture: &str, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let src = common::fixture(fixture);
    let d = tmp(name);
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    candle_core::safetensors::save(tensors, d.join("model.safetensors")).unwrap();
    d
}

fn scores(dir: &Path) -> Vec<f32> {
    let r = Reranker::load(dir.to_str().unwrap(), &common::isolated_options()).unwrap();
    let mut req = Req::new(
        "a query about shards",
        vec![
            "first document".into(),
            "second one, longer than the first".into(),
        ],
    );
    req.opts.mode = grating::Mode::Full;
    let out = req.run(&r).unwrap();
    let mut v = vec![0f32; 2];
    for s in out.ranked {
        v[s.index] = s.logit;
    }
    v
}

fn load_err(dir: &Path) -> String {
    match Reranker::load(dir.to_str().unwrap(), &common::isolated_options()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let tensors = load_tensors(&common::fixture("xlm-roberta-tiny"));
    let d = tmp("sharded");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(common::fixture("xlm-roberta-tiny").join(f), d.join(f)).unwrap();
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let s = i % 2;
        shards[s].insert((*n).clone(), tensors[*n].clone());
        weight_map.insert(
            (*n).clone(),
            format!("model-0000{}-of-00002.safetensors", s + 1).into(),
        );
    }
    for (s, t) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            t,
            d.join(format!("model-0000{}-of-00002.safetensors", s + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let single = scores(&common::fixture("xlm-roberta-tiny"));
    let sharded = scores(&d);
    assert_eq!(single, sharded);

    // A shard named by the index but absent.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut tensors = load_tensors(&common::fixture("xlm-roberta-tiny"));
    tensors
        .remove("roberta.encoder.layer.1.intermediate.dense.weight")
        .unwrap();
    let d = copy_with("xlm-roberta-tiny", "missing", &tensors);
    let e = load_err(&d);
    assert!(
        e.contains("`roberta.encoder.layer.1.intermediate.dense.weight` is missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let mut tensors = load_tensors(&common::fixture("qwen3-tiny"));
    tensors.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        Tensor::zeros((7, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let d = copy_with("qwen3-tiny", "shape", &tensors);
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("[7, 64]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let mut tensors = load_tensors(&common::fixture("qwen3-tiny"));
    let n = tensors["model.norm.weight"].dims()[0];
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::zeros(n, DType::I64, &Device::Cpu).unwrap(),
    );
    let d = copy_with("qwen3-tiny", "dtype", &tensors);
    let e = load_err(&d);
    assert!(
        e.contains("model.norm.weight") && e.contains("dtype"),
        "{e}"
    );
}

#[test]
fn f16_and_bf16_checkpoints_load_and_score_close_to_f32() {
    let f32_scores = scores(&common::fixture("qwen3-tiny"));
    for (name, dt) in [
        ("f16", grating::synth::DiskDtype::F16),
        ("bf16", grating::synth::DiskDtype::Bf16),
    ] {
        let d = tmp(name);
        grating::synth::convert(&common::fixture("qwen3-tiny"), &d, dt).unwrap();
        let s = scores(&d);
        for (a, b) in f32_scores.iter().zip(&s) {
            // Rounded weights: logits of ~20 move by a few hundredths at most.
            assert!(
                (a - b).abs() < 0.05 * a.abs().max(1.0),
                "{name}: {a} vs {b}"
            );
        }
    }
}
