//! Parity with HF transformers: final and per-layer logits on real weights (the shared BERT
//! cross-encoders) and on tiny random-weight fixtures of the other architectures.

mod common;

use common::read_reference;
use grating::{RerankOptions, Reranker};
use std::path::Path;

/// Scores every row after every layer through the public API (the engine's request state
/// machine in recording mode: chunked, packed, layer-major) and checks each value against HF's
/// per-pair (unbatched) reference, and the token ids where the reference has them.
fn check_layerwise(model_dir: &Path) {
    let rows = read_reference(
        &model_dir.join(if model_dir.join("reference.jsonl").exists() {
            "reference.jsonl"
        } else {
            "reference_scores.jsonl"
        }),
    );
    let r = Reranker::load(model_dir.to_str().unwrap(), &common::engine_options()).unwrap();
    let num_layers = r.info().num_layers;
    let mut worst = 0f32;
    for (i, row) in rows.iter().enumerate() {
        let opts = RerankOptions {
            instruction: row.instruction.clone(),
            ..Default::default()
        };
        let docs = [row.document.as_str()];
        if let Some(ids) = &row.input_ids {
            let e = r.encode(&row.query, &docs, &opts).unwrap();
            assert_eq!(
                &e[0].ids, ids,
                "token ids differ from HF's for {:?}",
                row.document
            );
        }
        let (layers, _) = r.layer_scores(&row.query, &docs, &opts).unwrap();
        assert_eq!(layers.len(), num_layers);
        for (l, scores) in layers.iter().enumerate() {
            let d = (scores[0] - row.layer_logits[l]).abs();
            worst = worst.max(d);
            assert!(
                d < common::logit_tolerance(row.layer_logits[l]),
                "{}: layer {} row {i}: grating {} vs HF {} (diff {d})",
                model_dir.display(),
                l + 1,
                scores[0],
                row.layer_logits[l]
            );
        }
        // The last layer's score is the model's logit.
        let last = layers[num_layers - 1][0];
        assert!((last - row.logit).abs() < common::logit_tolerance(row.logit));
    }
    eprintln!(
        "{}: {} rows x {num_layers} layers, worst |diff| {worst:e}",
        model_dir.display(),
        rows.len(),
    );
}

#[test]
fn bert_distilled_matches_hf_at_every_layer() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-distilled") else {
        return;
    };
    check_layerwise(&dir);
}

#[test]
fn bert_layerwise_matches_hf_at_every_layer() {
    let Some(dir) = common::shared_model("minilm-l6-msmarco-layerwise") else {
        return;
    };
    check_layerwise(&dir);
}

#[test]
fn xlm_roberta_fixture_matches_hf_at_every_layer() {
    check_layerwise(&common::fixture("xlm-roberta-tiny"));
}

#[test]
fn qwen3_fixture_matches_hf_at_every_layer() {
    check_layerwise(&common::fixture("qwen3-tiny"));
}

#[test]
fn qwen3_untied_fixture_matches_hf_at_every_layer() {
    check_layerwise(&common::fixture("qwen3-tiny-untied"));
}
