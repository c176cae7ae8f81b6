//! The Qwen3-Reranker template with the real Qwen3 tokenizer gives HF's ids.

mod common;

use grating::tokenize::{EncodeOptions, PairEncoder, PromptTemplate, Truncation};

#[derive(serde::Deserialize)]
struct Case {
    instruction: String,
    query: String,
    document: String,
    input_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Cases {
    yes_id: u32,
    no_id: u32,
    cases: Vec<Case>,
}

#[test]
fn real_qwen3_tokenizer_template_matches_hf() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let enc = PairEncoder::from_file(
        &shared.join("tokenizers/qwen3/tokenizer.json"),
        PromptTemplate::Qwen3Reranker,
    )
    .unwrap();
    let text = std::fs::read_to_string(common::fixture("qwen3-template-ids.json")).unwrap();
    let cases: Cases = serde_json::from_str(&text).unwrap();
    assert_eq!(enc.yes_no_ids, Some((cases.yes_id, cases.no_id)));
    assert_eq!(enc.yes_no_ids, Some((9693, 2152)));
    for c in &cases.cases {
        let opts = EncodeOptions {
            max_length: 8192,
            truncation: Truncation::Right,
            instruction: Some(c.instruction.clone()),
            truncate: true,
        };
        let got = enc.encode(&c.query, &[c.document.as_str()], &opts).unwrap();
        assert_eq!(got[0].ids, c.input_ids, "document {:?}", c.document);
    }
}

#[test]
fn long_documents_are_cut_to_the_maximum_length() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let enc = PairEncoder::from_file(
        &shared.join("tokenizers/qwen3/tokenizer.json"),
        PromptTemplate::Qwen3Reranker,
    )
    .unwrap();
    let doc = "word ".repeat(20_000);
    let opts = EncodeOptions {
        max_length: 300,
        truncation: Truncation::Right,
        instruction: None,
        truncate: true,
    };
    let got = enc.encode("q", &[doc.as_str()], &opts).unwrap();
    assert_eq!(got[0].ids.len(), 300);
    assert!(got[0].truncated);
    // The template's assistant suffix survives truncation.
    assert_eq!(&got[0].ids[got[0].ids.len() - 1..], &[271]);
    let strict = EncodeOptions {
        truncate: false,
        ..opts
    };
    assert!(enc.encode("q", &[doc.as_str()], &strict).is_err());
}
