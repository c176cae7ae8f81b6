//! `grating calibrate --scores`: fits the model's score calibration (Platt scaling) on judged
//! (query, document) pairs and random passages of the corpus (negatives: a passage drawn at
//! random is almost never relevant, and a deployed reranker sees many), reports its quality on
//! queries held out of the fit, and saves it beside the pruning profile, where the library, the
//! CLI and the server find it.

use super::calibrate::CalibrateArgs;
use anyhow::{bail, Result};
use grating::eval::dl19::Dl19;
use grating::prune::profile;
use grating::reranker::scores::{self, HeldOut, ScoreCalibration};
use grating::{Mode, RerankOptions, Reranker};
use rand::seq::index::sample;
use rand::SeedableRng;
use std::collections::HashSet;

/// Queries are split into this many folds for the held-out report.
const FOLDS: usize = 5;

/// What a scored pair is.
#[derive(Clone, Copy, PartialEq)]
enum Pair {
    Relevant,
    /// Judged below the relevant grade.
    Judged,
    /// Drawn at random from the corpus, not judged for the query.
    Random,
}

/// One query's scored pairs.
struct Judged {
    logits: Vec<f32>,
    pairs: Vec<Pair>,
}

impl Judged {
    fn relevant(&self) -> impl Iterator<Item = bool> + '_ {
        self.pairs.iter().map(|&p| p == Pair::Relevant)
    }
}

pub fn run(args: &CalibrateArgs, reranker: &Reranker) -> Result<()> {
    if !args.queries.is_dir() {
        bail!(
            "score calibration needs judged data: a TREC DL or BEIR directory (corpus.jsonl, queries.jsonl, and qrels.tsv or qrels/test.tsv), not {}",
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
        // Random passages not judged for this query, the same ones on every run.
        let judged_ids: HashSet<&str> = grades.keys().map(String::as_str).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(judged.len() as u64);
        let random: Vec<usize> = sample(
            &mut rng,
            data.doc_ids.len(),
            args.random_negatives.min(data.doc_ids.len()),
        )
        .into_iter()
        .filter(|&d| !judged_ids.contains(data.doc_ids[d].as_str()))
        .collect();
        let mut pairs: Vec<Pair> = docs
            .iter()
            .map(|&d| {
                if grades[&data.doc_ids[d]] >= args.relevant_grade {
                    Pair::Relevant
                } else {
                    Pair::Judged
                }
            })
            .collect();
        pairs.extend(random.iter().map(|_| Pair::Random));
        let texts: Vec<&str> = docs
            .iter()
            .chain(&random)
            .map(|&d| data.doc_texts[d].as_str())
            .collect();
        let out = reranker.rerank(query, &texts, &opts)?;
        let mut logits = vec![0.0; texts.len()];
        for s in &out.ranked {
            logits[s.index] = s.logit;
        }
        judged.push(Judged { logits, pairs });
    }
    let all_logits: Vec<f32> = judged.iter().flat_map(|j| j.logits.clone()).collect();
    let all_relevant: Vec<bool> = judged.iter().flat_map(|j| j.relevant()).collect();
    let positives = all_relevant.iter().filter(|&&r| r).count();
    let randoms = judged
        .iter()
        .flat_map(|j| &j.pairs)
        .filter(|&&p| p == Pair::Random)
        .count();
    eprintln!(
        "{} pairs from {} queries: {} judged ({} relevant at grade >= {}), {} random passages",
        all_logits.len(),
        judged.len(),
        all_logits.len() - randoms,
        positives,
        args.relevant_grade,
        randoms
    );
    let held_out = held_out_report(&judged)?;
    if let Some(h) = &held_out {
        println!(
            "held out ({} folds by query): log loss {:.4} -> {:.4}, Brier {:.4} -> {:.4} (sigmoid -> calibrated)",
            h.folds, h.log_loss_sigmoid, h.log_loss_calibrated, h.brier_sigmoid, h.brier_calibrated
        );
        println!(
            "held out, calibrated: {:.1}% of relevant pairs above 0.5, {:.1}% of judged non-relevant and {:.1}% of random passages below 0.5 (sigmoid: {:.1}%, {:.1}%, {:.1}%)",
            100.0 * h.relevant_above_half,
            100.0 * h.judged_below_half,
            100.0 * h.random_below_half,
            100.0 * h.sigmoid_relevant_above_half,
            100.0 * h.sigmoid_judged_below_half,
            100.0 * h.sigmoid_random_below_half,
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

/// Fits on all folds but one and measures on that one, for each fold; the losses and shares
/// are over every held-out pair.
fn held_out_report(judged: &[Judged]) -> Result<Option<HeldOut>> {
    if judged.len() < FOLDS {
        return Ok(None);
    }
    // (sigmoid probability, calibrated probability, pair kind) of every held-out pair.
    let mut held = Vec::new();
    for fold in 0..FOLDS {
        let (train, test): (Vec<_>, Vec<_>) = judged
            .iter()
            .enumerate()
            .partition(|(i, _)| i % FOLDS != fold);
        let logits: Vec<f32> = train.iter().flat_map(|(_, j)| j.logits.clone()).collect();
        let relevant: Vec<bool> = train.iter().flat_map(|(_, j)| j.relevant()).collect();
        let (scale, bias) = scores::fit_platt(&logits, &relevant)?;
        for (_, j) in test {
            for (&l, &p) in j.logits.iter().zip(&j.pairs) {
                held.push((
                    scores::sigmoid_probability(l),
                    scores::platt(scale, bias, l),
                    p,
                ));
            }
        }
    }
    let labels: Vec<bool> = held.iter().map(|h| h.2 == Pair::Relevant).collect();
    let sig: Vec<f64> = held.iter().map(|h| h.0).collect();
    let cal: Vec<f64> = held.iter().map(|h| h.1).collect();
    let (log_loss_sigmoid, brier_sigmoid) = scores::log_loss_and_brier(&sig, &labels);
    let (log_loss_calibrated, brier_calibrated) = scores::log_loss_and_brier(&cal, &labels);
    // The share of pairs of `kind` whose probability (`pick`) is on the right side of 0.5.
    let share = |kind: Pair, pick: fn(&(f64, f64, Pair)) -> f64| {
        let of_kind: Vec<f64> = held.iter().filter(|h| h.2 == kind).map(pick).collect();
        let right = of_kind
            .iter()
            .filter(|&&p| (p > 0.5) == (kind == Pair::Relevant))
            .count();
        right as f64 / of_kind.len().max(1) as f64
    };
    Ok(Some(HeldOut {
        folds: FOLDS,
        log_loss_sigmoid,
        log_loss_calibrated,
        brier_sigmoid,
        brier_calibrated,
        relevant_above_half: share(Pair::Relevant, |h| h.1),
        judged_below_half: share(Pair::Judged, |h| h.1),
        random_below_half: share(Pair::Random, |h| h.1),
        sigmoid_relevant_above_half: share(Pair::Relevant, |h| h.0),
        sigmoid_judged_below_half: share(Pair::Judged, |h| h.0),
        sigmoid_random_below_half: share(Pair::Random, |h| h.0),
    }))
}
