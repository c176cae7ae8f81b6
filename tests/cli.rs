//! The `grating` binary on real files: it ranks, and bad input gets a clear message and a
//! non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn grating(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grating"))
        .args(args)
        .env(
            "GRATING_PROFILE_DIR",
            std::env::temp_dir().join("grating-test-profiles-none"),
        )
        .output()
        .expect("run grating")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts a clean failure whose message contains `needle`.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("grating-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model() -> Option<String> {
    common::shared_model("minilm-l6-msmarco-distilled").map(|p| p.to_str().unwrap().to_string())
}

#[test]
fn reranks_jsonl_and_plain_text_with_json_output() {
    let Some(m) = model() else { return };
    let d = tmp("ok");
    let jsonl = d.join("docs.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\":\"a\",\"text\":\"Paris is the capital of France.\"}\n{\"id\":\"b\",\"text\":\"Bananas are yellow.\"}\n{\"id\":\"c\",\"text\":\"France's capital city is Paris, on the Seine.\"}\n",
    )
    .unwrap();
    let o = grating(&[
        "rerank",
        "--model",
        &m,
        "--query",
        "capital of france",
        "--docs",
        jsonl.to_str().unwrap(),
        "--top-k",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"a") && ids.contains(&"c"), "{ids:?}");
    assert_eq!(results[0]["rank"], 1);
    let s0 = results[0]["score"].as_f64().unwrap();
    assert!(s0 > 0.0 && s0 < 1.0, "sigmoid scores are in (0, 1): {s0}");
    assert!(v["stats"]["candidates"].as_u64() == Some(3));

    let txt = d.join("docs.txt");
    std::fs::write(
        &txt,
        "Bananas are yellow.\nParis is the capital of France.\n",
    )
    .unwrap();
    let o = grating(&[
        "rerank",
        "--model",
        &m,
        "--query",
        "capital of france",
        "--docs",
        txt.to_str().unwrap(),
        "--raw-scores",
        "--json",
        "--mode",
        "full",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["results"][0]["index"], 1);
    assert!(
        v["results"][0]["score"].as_f64().unwrap() > 1.0,
        "raw logits are not squashed"
    );
}

#[test]
fn bad_documents_files_fail_cleanly() {
    let Some(m) = model() else { return };
    let d = tmp("bad");
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    fails_with(
        &grating(&[
            "rerank",
            "--model",
            &m,
            "--query",
            "q",
            "--docs",
            empty.to_str().unwrap(),
        ]),
        "no documents",
    );

    let bad_utf8 = d.join("bad.txt");
    std::fs::write(&bad_utf8, b"fine line\nbroken \xff\xfe line\n").unwrap();
    fails_with(
        &grating(&[
            "rerank",
            "--model",
            &m,
            "--query",
            "q",
            "--docs",
            bad_utf8.to_str().unwrap(),
        ]),
        "invalid UTF-8 on line 2",
    );

    let ok = d.join("ok.txt");
    std::fs::write(&ok, "some document\n").unwrap();
    fails_with(
        &grating(&[
            "rerank",
            "--model",
            &m,
            "--query",
            "   ",
            "--docs",
            ok.to_str().unwrap(),
        ]),
        "query is empty",
    );
    fails_with(
        &grating(&[
            "rerank",
            "--model",
            &m,
            "--query",
            "q",
            "--docs",
            d.join("missing.txt").to_str().unwrap(),
        ]),
        "cannot read",
    );
    let bad_json = d.join("bad.jsonl");
    std::fs::write(&bad_json, "{\"id\": 1}\n").unwrap();
    fails_with(
        &grating(&[
            "rerank",
            "--model",
            &m,
            "--query",
            "q",
            "--docs",
            bad_json.to_str().unwrap(),
        ]),
        "line 1",
    );
}

#[test]
fn huge_document_is_truncated_and_scored() {
    let Some(m) = model() else { return };
    let d = tmp("huge");
    let f = d.join("docs.txt");
    let huge: String = "reranking engines score passages against queries ".repeat(2100); // > 100k chars
    assert!(huge.len() > 100_000);
    std::fs::write(&f, format!("{huge}\nshort passage about engines\n")).unwrap();
    let o = grating(&[
        "rerank",
        "--model",
        &m,
        "--query",
        "reranking engine",
        "--docs",
        f.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["stats"]["truncated"], 1);
    assert!(v["stats"]["tokens"].as_u64().unwrap() <= 512 + 20);
}

/// A copy of the model directory (weights linked, not copied) with `edit` applied.
fn model_copy(name: &str, edit: impl FnOnce(&Path)) -> Option<PathBuf> {
    let src = common::shared_model("minilm-l6-msmarco-distilled")?;
    let d = tmp(name);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::os::unix::fs::symlink(src.join(f), d.join(f)).unwrap();
    }
    edit(&d);
    Some(d)
}

#[test]
fn bad_models_fail_cleanly() {
    let docs = tmp("docs-for-models").join("d.txt");
    std::fs::write(&docs, "a document\n").unwrap();
    let run = |dir: &Path| {
        grating(&[
            "rerank",
            "--model",
            dir.to_str().unwrap(),
            "--query",
            "q",
            "--docs",
            docs.to_str().unwrap(),
        ])
    };

    let Some(unknown) = model_copy("unknown-arch", |d| {
        std::fs::remove_file(d.join("config.json")).unwrap();
        std::fs::write(
            d.join("config.json"),
            r#"{"architectures": ["MysteryForSequenceClassification"], "model_type": "mystery"}"#,
        )
        .unwrap();
    }) else {
        return;
    };
    fails_with(
        &run(&unknown),
        "unsupported architecture \"MysteryForSequenceClassification\"",
    );

    let Some(truncated) = model_copy("truncated", |d| {
        let src = std::fs::read(d.join("model.safetensors")).unwrap();
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        std::fs::write(d.join("model.safetensors"), &src[..src.len() / 2]).unwrap();
    }) else {
        return;
    };
    fails_with(&run(&truncated), "truncated");

    let Some(no_weights) = model_copy("no-weights", |d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap()
    }) else {
        return;
    };
    fails_with(&run(&no_weights), "no model.safetensors");

    let Some(garbage) = model_copy("garbage", |d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        std::fs::write(
            d.join("model.safetensors"),
            b"this is not a safetensors file at all",
        )
        .unwrap();
    }) else {
        return;
    };
    fails_with(&run(&garbage), "model.safetensors");

    fails_with(
        &run(Path::new("/nonexistent/model/dir")),
        "no such directory",
    );
}

#[test]
fn memory_budget_bounds_the_measured_peak() {
    let Some(m) = model() else { return };
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let corpus = shared.join("data/trec-dl19-subset/corpus.jsonl");
    // The BM25 top 300 of the corpus for one query, under a memory budget.
    let rerank = |budget: &str, extra: &[&str]| {
        let mut args = vec![
            "rerank",
            "--model",
            &m,
            "--docs",
            corpus.to_str().unwrap(),
            "--bm25-prefilter",
            "300",
            "--query",
            "what is a monotonic function",
            "--max-memory",
            budget,
        ];
        args.extend_from_slice(extra);
        grating(&args)
    };
    for budget_mib in [100u64, 150, 400] {
        let budget = format!("{budget_mib}MiB");
        let o = rerank(&budget, &["--top-k", "5", "--json"]);
        assert!(o.status.success(), "{budget}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let peak = v["stats"]["peak_rss_mib"].as_f64().unwrap();
        assert!(
            peak <= budget_mib as f64,
            "{budget}: measured peak {peak} MiB"
        );
        assert_eq!(v["results"].as_array().unwrap().len(), 5);
    }
    let o = rerank("20MiB", &[]);
    fails_with(&o, "needs at least");
}

#[test]
fn calibration_writes_a_profile_that_rerank_uses() {
    let Some(m) = common::shared_model("minilm-l6-msmarco-layerwise")
        .map(|p| p.to_str().unwrap().to_string())
    else {
        return;
    };
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let profiles = tmp("profiles");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_grating"))
            .args(args)
            .env("GRATING_PROFILE_DIR", &profiles)
            .env("GRATING_LOG", "info")
            .output()
            .unwrap()
    };
    let data = shared.join("data/trec-dl19-subset");
    let cache = tmp("profile-cache").join("scores.json");
    let calibrate = |extra: &[&str]| {
        let mut a = vec![
            "calibrate",
            "--model",
            &m,
            "--queries",
            data.to_str().unwrap(),
            "--candidates",
            "40",
            "--limit",
            "10",
            "--top-k",
            "1,5",
            "--folds",
            "2",
            "--target-agreement",
            "0.9",
            "--scores-cache",
            cache.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = run(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        let files: Vec<_> = std::fs::read_dir(&profiles).unwrap().collect();
        assert_eq!(files.len(), 1, "one profile for the model");
        let p: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap(),
        )
        .unwrap();
        (String::from_utf8_lossy(&o.stdout).to_string(), p)
    };
    // The paper's cluster rule: a threshold from the list, reported out of fold.
    let (out, p) = calibrate(&["--rule", "cluster", "--thresholds", "0.05,0.15,0.3,5"]);
    assert!(
        out.contains("out of fold") && out.contains("chosen threshold"),
        "{out}"
    );
    let t = p["threshold"].as_f64().unwrap();
    assert!(
        [0.05, 0.15, 0.3, 5.0].iter().any(|x| (x - t).abs() < 1e-6),
        "{p}"
    );
    // The default margin rule (from the recorded scores, not recomputed): movement per layer
    // and a margin, with the out-of-fold rows at N = 20, 40 and K = 1, 5.
    let (out, p) = calibrate(&[]);
    assert!(out.contains("chosen margin"), "{out}");
    assert_eq!(p["rule"], "margin", "{p}");
    assert_eq!(p["movement"].as_array().unwrap().len(), 5, "{p}");
    assert!(p["margin"].as_f64().unwrap() > 0.0);
    let rows = p["held_out"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{p}");
    for r in rows {
        assert_eq!(r["requests"], 10, "{r}");
    }
    assert!(p["source"].as_str().unwrap().contains("10 requests"), "{p}");
    // A later run of the same model picks the profile up.
    let docs = tmp("profile-docs").join("d.txt");
    std::fs::write(&docs, "one passage\nanother passage\nthird passage\n").unwrap();
    let o = run(&[
        "rerank",
        "--model",
        &m,
        "--query",
        "passage",
        "--docs",
        docs.to_str().unwrap(),
        "--top-k",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The saved profile wins over the built-in one (the log names its source).
    assert!(
        stderr(&o).contains("using calibrated pruning profile")
            && stderr(&o).contains("10 requests"),
        "{}",
        stderr(&o)
    );
}

/// `grating calibrate --scores` on a small judged collection written here, with the committed
/// XLM-R fixture (random weights, so the judgments are made from its own scores: the best
/// passage of each query is relevant): it fits and saves a rising Platt calibration with a
/// held-out report, and `rerank` then reports calibrated scores (the ranking unchanged) where it
/// reported the sigmoid. Judgments that contradict the model are refused, not saved.
#[test]
fn calibrated_scores_are_fitted_saved_and_used() {
    let model = common::fixture("xlm-roberta-tiny");
    let model = model.to_str().unwrap();
    let d = tmp("score-calibration");
    let topics = [
        ("water", "water boils at one hundred degrees"),
        ("paris", "paris is the capital of france"),
        ("panda", "the giant panda eats bamboo"),
        ("rust", "rust is a systems programming language"),
        ("moon", "the moon orbits the earth"),
        ("tea", "green tea comes from camellia leaves"),
    ];
    let (mut corpus, mut queries) = (String::new(), Vec::new());
    for (name, text) in topics {
        // Every passage shares "about" with every query, so all 12 are BM25 candidates.
        corpus += &format!("{{\"_id\": \"{name}-a\", \"text\": \"about {name}: {text}\"}}\n");
        corpus +=
            &format!("{{\"_id\": \"{name}-b\", \"text\": \"a note about {name} and more\"}}\n");
        queries.push(format!("what about {name}"));
    }
    let corpus_file = d.join("corpus.jsonl");
    std::fs::write(&corpus_file, &corpus).unwrap();
    let corpus_file = corpus_file.to_str().unwrap();
    let rerank = |query: &str, profile_dir: &str| {
        let o = grating(&[
            "rerank",
            "--model",
            model,
            "--query",
            query,
            "--docs",
            corpus_file,
            "--json",
            "--profile-dir",
            profile_dir,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["results"].as_array().unwrap().clone()
    };
    let none = d.join("no-profiles");
    let none = none.to_str().unwrap();
    // Judged collections: every passage judged for every query, the model's best (or, to be
    // refused, its worst) passage relevant.
    let judged = |name: &str, pick_best: bool| {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("corpus.jsonl"), &corpus).unwrap();
        let (mut qs, mut qrels) = (String::new(), String::new());
        for (t, q) in queries.iter().enumerate() {
            qs += &format!("{{\"_id\": \"q{t}\", \"text\": \"{q}\"}}\n");
            let ranked = rerank(q, none);
            let chosen = if pick_best { 0 } else { ranked.len() - 1 };
            for (i, r) in ranked.iter().enumerate() {
                let grade = if i == chosen { 3 } else { 0 };
                qrels += &format!("q{t}\t{}\t{grade}\n", r["id"].as_str().unwrap());
            }
        }
        std::fs::write(dir.join("queries.jsonl"), qs).unwrap();
        std::fs::write(dir.join("qrels.tsv"), qrels).unwrap();
        dir
    };
    let profiles = d.join("profiles");
    let profiles = profiles.to_str().unwrap();
    let calibrate = |data: &Path| {
        grating(&[
            "calibrate",
            "--scores",
            "--model",
            model,
            "--queries",
            data.to_str().unwrap(),
            "--candidates",
            "12",
            "--profile-dir",
            profiles,
        ])
    };

    let o = calibrate(&judged("judged", true));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("held out (5 folds"), "{out}");
    let file = std::fs::read_dir(profiles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".scores.json"))
        .expect("a saved calibration");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let (scale, bias) = (c["scale"].as_f64().unwrap(), c["bias"].as_f64().unwrap());
    assert!(scale > 0.0 && bias.is_finite(), "{c}");
    assert_eq!(
        (c["pairs"].as_u64(), c["positives"].as_u64()),
        (Some(72), Some(6)),
        "{c}"
    );
    assert_eq!(c["queries"], 6);

    let calibrated = rerank(&queries[0], profiles);
    let plain = rerank(&queries[0], none);
    assert_eq!(calibrated.len(), 12);
    for (c, p) in calibrated.iter().zip(&plain) {
        assert_eq!(c["index"], p["index"], "calibration changed the ranking");
        let logit = c["logit"].as_f64().unwrap();
        let want = 1.0 / (1.0 + (-(scale * logit + bias)).exp());
        assert!((c["score"].as_f64().unwrap() - want).abs() < 1e-5, "{c}");
        let sigmoid = 1.0 / (1.0 + (-logit).exp());
        assert!((p["score"].as_f64().unwrap() - sigmoid).abs() < 1e-5, "{p}");
    }

    // Judgments against the model's own order, and data without judgments, are refused.
    std::fs::remove_file(&file).unwrap();
    fails_with(&calibrate(&judged("inverted", false)), "do not rise");
    assert!(!file.exists(), "a refused calibration was saved");
    fails_with(&calibrate(Path::new(corpus_file)), "judged data");
}
