//! `grating calibrate --scores`: fits the model's score calibration (Platt scaling) on judged
//! (query, document) pairs, reports its quality on queries held out of the fit, and saves it
//! beside the pruning profile, where the library, the CLI and the server find it.

use super::calibrate::CalibrateArgs;
use anyhow::{bail, Result};
use grating::eval::dl19::Dl19;
use grating::prune::profile;
use grating::reranker::scores::{self, HeldOut, ScoreCalibration};
use grating::{Mode, RerankOptions, Reranker};

/// Queries are split into this many folds for the held-out report.
const FOLDS: usize = 5;

/// One query's judged candidates: their logits and whether each is relevant.
struct Judged {
    logits: Vec<f32>,
    relevant: Vec<bool>,
}

pub fn run(args: &CalibrateArgs, reranker: &Reranker) -> Result<()> {
    if !args.queries.is_dir() {
        bail!(
            "score calibration needs judged data: a TREC DL directory (corpus.jsonl, queries.jsonl, qrels.tsv), not {}",
            args.queries.display()
        );
    }
    let data = Dl19::load(&args.queries)?;
    // Every judged document among each query's BM25 candidates: what the reranker sees in
    // use, with a known answer. Scored in full mode, so every logit is the last layer's.
    let opts = RerankOptions::default().with_mode(Mode::Full);
    let mut judged = Vec::new();
    let limit = args.limit.unwrap_or(usize::MAX);
    for (qid, query) in data.queries.iter().take(limit) {
        let Some(grades) = data.qrels.get(qid) else {
            continue;
        };
        let docs: Vec<usize> = data
            .candidates(query, args.candidates)
            .into_iter()
            .filter(|&d| grades.contains_key(&data.doc_ids[d]))
            .collect();
        if docs.is_empty() {
            continue;
        }
        let texts: Vec<&str> = docs.iter().map(|&d| data.doc_texts[d].as_str()).collect();
        let out = reranker.rerank(query, &texts, &opts)?;
        let mut logits = vec![0.0; docs.len()];
        for s in &out.ranked {
            logits[s.index] = s.logit;
        }
        let relevant = docs
            .iter()
            .map(|&d| grades[&data.doc_ids[d]] >= args.relevant_grade)
            .collect();
        judged.push(Judged { logits, relevant });
    }
    let all_logits: Vec<f32> = judged.iter().flat_map(|j| j.logits.clone()).collect();
    let all_relevant: Vec<bool> = judged.iter().flat_map(|j| j.relevant.clone()).collect();
    let positives = all_relevant.iter().filter(|&&r| r).count();
    eprintln!(
        "{} judged pairs ({} relevant at grade >= {}) from {} queries",
        all_logits.len(),
        positives,
        args.relevant_grade,
        judged.len()
    );
    let held_out = held_out_report(&judged)?;
    if let Some(h) = &held_out {
        println!(
            "held out ({} folds by query): log loss {:.4} -> {:.4}, Brier {:.4} -> {:.4} (sigmoid -> calibrated)",
            h.folds, h.log_loss_sigmoid, h.log_loss_calibrated, h.brier_sigmoid, h.brier_calibrated
        );
    } else {
        println!("too few queries for a held-out report (need {FOLDS})");
    }
    let (scale, bias) = scores::fit_platt(&all_logits, &all_relevant)?;
    println!("fitted on every query: score = sigmoid({scale:.5} * logit + {bias:.5})");
    if scale <= 0.0 {
        bail!(
            "the model's logits do not rise with relevance on this data (fitted scale {scale:.4}): \
             a calibration would score its own top results lowest, so none is saved"
        );
    }
    let calibration = ScoreCalibration {
        model: reranker.model_id().to_string(),
        fingerprint: profile::fingerprint(reranker.files())?,
        method: "platt".into(),
        scale,
        bias,
        relevant_grade: args.relevant_grade,
        pairs: all_logits.len(),
        positives,
        queries: judged.len(),
        data: args.queries.display().to_string(),
        held_out,
    };
    if args.no_save {
        return Ok(());
    }
    let dir = args
        .model
        .profile_dir
        .clone()
        .unwrap_or_else(profile::default_profile_dir);
    let path = scores::save(&dir, reranker.files(), &calibration)?;
    println!("saved {}", path.display());
    Ok(())
}

/// Fits on all folds but one and measures on that one, for each fold; the losses are means
/// over every held-out pair.
fn held_out_report(judged: &[Judged]) -> Result<Option<HeldOut>> {
    if judged.len() < FOLDS {
        return Ok(None);
    }
    let (mut probs_sigmoid, mut probs_calibrated, mut labels) =
        (Vec::new(), Vec::new(), Vec::new());
    for fold in 0..FOLDS {
        let (train, test): (Vec<_>, Vec<_>) = judged
            .iter()
            .enumerate()
            .partition(|(i, _)| i % FOLDS != fold);
        let logits: Vec<f32> = train.iter().flat_map(|(_, j)| j.logits.clone()).collect();
        let relevant: Vec<bool> = train.iter().flat_map(|(_, j)| j.relevant.clone()).collect();
        let (scale, bias) = scores::fit_platt(&logits, &relevant)?;
        for (_, j) in test {
            for (&l, &r) in j.logits.iter().zip(&j.relevant) {
                probs_sigmoid.push(scores::sigmoid_probability(l));
                probs_calibrated.push(1.0 / (1.0 + (-(scale * l as f64 + bias)).exp()));
                labels.push(r);
            }
        }
    }
    let (log_loss_sigmoid, brier_sigmoid) = scores::log_loss_and_brier(&probs_sigmoid, &labels);
    let (log_loss_calibrated, brier_calibrated) =
        scores::log_loss_and_brier(&probs_calibrated, &labels);
    Ok(Some(HeldOut {
        folds: FOLDS,
        log_loss_sigmoid,
        log_loss_calibrated,
        brier_sigmoid,
        brier_calibrated,
    }))
}
