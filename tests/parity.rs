//! Parity with HF transformers: final and per-layer logits on real weights (the shared BERT
//! cross-encoders) and on tiny random-weight fixtures of the other architectures.

mod common;

use candle_core::Tensor;
use common::{read_reference, ReferenceRow};
use grating::engine::Reranker;
use grating::models::PackedBatch;
use grating::tokenize::{EncodeOptions, EncodedPair, Truncation};
use std::path::Path;

fn encode_rows(r: &Reranker, rows: &[ReferenceRow]) -> Vec<EncodedPair> {
    rows.iter()
        .map(|row| {
            let opts = EncodeOptions {
                max_length: r.info().max_length,
                truncation: Truncation::Right,
                instruction: row.instruction.clone(),
                truncate: true,
            };
            let mut e = r
                .encoder()
                .encode(&row.query, &[row.document.as_str()], &opts)
                .unwrap();
            let e = e.remove(0);
            if let Some(ids) = &row.input_ids {
                assert_eq!(
                    &e.ids, ids,
                    "token ids differ from HF's for {:?}",
                    row.document
                );
            }
            e
        })
        .collect()
}

/// Runs all rows as ONE packed batch through the layer API, scoring every layer, and checks
/// each value against HF's per-pair (unbatched) reference.
fn check_layerwise(model_dir: &Path) {
    let rows = read_reference(
        &model_dir.join(if model_dir.join("reference.jsonl").exists() {
            "reference.jsonl"
        } else {
            "reference_scores.jsonl"
        }),
    );
    let r = Reranker::load(model_dir.to_str().unwrap(), &common::engine_options()).unwrap();
    let model = r.model();
    let pairs = encode_rows(&r, &rows);
    let batch = PackedBatch::new(
        pairs
            .iter()
            .map(|p| (p.ids.as_slice(), p.type_ids.as_slice())),
    );
    let mut hidden: Tensor = model.embed(&batch).unwrap();
    let mut worst = 0f32;
    for l in 0..model.num_layers() {
        hidden = model.forward_layer(l, &hidden, &batch).unwrap();
        let scores = model.score(&hidden, &batch).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let d = (scores[i] - row.layer_logits[l]).abs();
            worst = worst.max(d);
            assert!(
                d < common::logit_tolerance(row.layer_logits[l]),
                "{}: layer {} row {i}: grating {} vs HF {} (diff {d})",
                model_dir.display(),
                l + 1,
                scores[i],
                row.layer_logits[l]
            );
        }
    }
    // The last layer's score is the model's logit.
    let last = model.score(&hidden, &batch).unwrap();
    for (i, row) in rows.iter().enumerate() {
        assert!((last[i] - row.logit).abs() < common::logit_tolerance(row.logit));
    }
    eprintln!(
        "{}: {} rows x {} layers, worst |diff| {worst:e}",
        model_dir.display(),
        rows.len(),
        model.num_layers()
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
