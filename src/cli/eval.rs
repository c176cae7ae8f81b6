//! `grating eval`: ranking quality of full and grating modes on TREC DL 2019 with BM25
//! candidates, the agreement of grating's top K with full inference, and the compute it saved.

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use anyhow::{bail, Result};
use clap::Args;
use grating::eval::dl19::Dl19;
use grating::eval::metrics::{ndcg_at, precision_at, topk_agreement};
use grating::prune::state::replay;
use grating::prune::PruneConfig;
use grating::{RerankOptions, Reranker};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// TREC DL directory (corpus.jsonl, queries.jsonl, qrels.tsv).
    #[arg(long, default_value = "../shared/data/trec-dl19-subset")]
    pub data: PathBuf,
    /// BM25 candidates per query (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "20,100")]
    pub candidates: Vec<usize>,
    /// K values (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    pub top_k: Vec<usize>,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Evaluate only the first N judged queries.
    #[arg(long)]
    pub queries: Option<usize>,
    /// Only replay the pruning rule on recorded per-layer scores (fast); by default grating mode
    /// also runs for real and must agree with the replay.
    #[arg(long)]
    pub replay_only: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Per-layer scores of every candidate of every judged query, with the doc ids.
pub struct Recorded {
    pub qid: String,
    pub query: String,
    pub doc_idx: Vec<usize>,
    pub layer_scores: Vec<Vec<f32>>,
}

pub fn record(
    reranker: &Reranker,
    data: &Dl19,
    n: usize,
    limit: Option<usize>,
) -> Result<Vec<Recorded>> {
    let mut out = Vec::new();
    for (qid, query) in data.queries.iter().take(limit.unwrap_or(usize::MAX)) {
        let doc_idx = data.candidates(query, n);
        if doc_idx.is_empty() {
            continue;
        }
        let docs: Vec<&str> = doc_idx
            .iter()
            .map(|&d| data.doc_texts[d].as_str())
            .collect();
        let (layer_scores, _) = reranker.layer_scores(query, &docs, &RerankOptions::default())?;
        out.push(Recorded {
            qid: qid.clone(),
            query: query.clone(),
            doc_idx,
            layer_scores,
        });
    }
    Ok(out)
}

#[derive(serde::Serialize, Default, Clone)]
pub struct Row {
    pub candidates: usize,
    pub k: usize,
    pub queries: usize,
    pub ndcg10_full: f64,
    pub ndcg_k_full: f64,
    pub ndcg_k_grating: f64,
    pub p_at_k_full: f64,
    pub p_at_k_grating: f64,
    pub agreement: f64,
    pub min_agreement: f64,
    pub compute_share: f64,
    pub engine_mismatches: usize,
}

/// Metrics of the pruning rule `cfg` replayed on recorded scores.
pub fn score_rows(data: &Dl19, recs: &[Recorded], n: usize, k: usize, cfg: &PruneConfig) -> Row {
    let mut row = Row {
        candidates: n,
        k,
        min_agreement: 1.0,
        ..Default::default()
    };
    let mut computed = 0usize;
    let mut possible = 0usize;
    for r in recs {
        let qrels = &data.qrels[&r.qid];
        let last = r.layer_scores.last().expect("at least one layer");
        let mut full: Vec<usize> = (0..r.doc_idx.len()).collect();
        full.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
        let rep = replay(cfg, &r.layer_scores, k);
        let grating: Vec<usize> = rep.ranking.iter().map(|x| x.0).collect();
        let ids = |v: &[usize]| -> Vec<&str> {
            v.iter()
                .map(|&i| data.doc_ids[r.doc_idx[i]].as_str())
                .collect()
        };
        let (fi, gi) = (ids(&full), ids(&grating));
        let kk = k.min(10);
        row.ndcg10_full += ndcg_at(&fi, qrels, 10);
        row.ndcg_k_full += ndcg_at(&fi, qrels, kk);
        row.ndcg_k_grating += ndcg_at(&gi, qrels, kk);
        row.p_at_k_full += precision_at(&fi, qrels, k);
        row.p_at_k_grating += precision_at(&gi, qrels, k);
        let a = topk_agreement(&grating, &full, k);
        row.agreement += a;
        row.min_agreement = row.min_agreement.min(a);
        computed += rep.layers_per_candidate.iter().sum::<usize>();
        possible += r.doc_idx.len() * r.layer_scores.len();
        row.queries += 1;
    }
    let q = row.queries.max(1) as f64;
    for v in [
        &mut row.ndcg10_full,
        &mut row.ndcg_k_full,
        &mut row.ndcg_k_grating,
        &mut row.p_at_k_full,
        &mut row.p_at_k_grating,
        &mut row.agreement,
    ] {
        *v /= q;
    }
    row.compute_share = computed as f64 / possible.max(1) as f64;
    row
}

pub fn run(args: EvalArgs) -> Result<()> {
    if !args.data.join("qrels.tsv").is_file() {
        bail!(
            "{}: not a TREC DL directory (no qrels.tsv)",
            args.data.display()
        );
    }
    let data = Dl19::load(&args.data)?;
    let reranker = args.model.load(&BatchArgs::default())?;
    let cfg = args.prune.config(reranker.prune_config())?;
    let mut rows = Vec::new();
    for &n in &args.candidates {
        let recs = record(&reranker, &data, n, args.queries)?;
        for &k in &args.top_k {
            let mut row = score_rows(&data, &recs, n, k, &cfg);
            if !args.replay_only {
                row.engine_mismatches = check_engine(&reranker, &data, &recs, k, &cfg)?;
            }
            rows.push(row);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({"model": args.model.model, "prune": cfg, "rows": rows})
            )?
        );
        return Ok(());
    }
    println!(
        "model {} | prune {:?}, threshold {}, first layer {} | nDCG uses linear gains (trec_eval)",
        args.model.model, cfg.mode, cfg.threshold, cfg.first_layer
    );
    println!(
        "{:>4} {:>3} {:>4} | {:>9} | {:>9} {:>9} | {:>7} {:>7} | {:>9} {:>7} | {:>7} | engine",
        "N", "K", "q", "nDCG@10", "nDCG@K", "nDCG@K", "P@K", "P@K", "agree@K", "min", "compute",
    );
    println!(
        "{:>4} {:>3} {:>4} | {:>9} | {:>9} {:>9} | {:>7} {:>7} | {:>9} {:>7} | {:>7} | mismatch",
        "", "", "", "full", "full", "grating", "full", "grating", "", "", "share"
    );
    for r in &rows {
        println!(
            "{:>4} {:>3} {:>4} | {:>9.4} | {:>9.4} {:>9.4} | {:>7.4} {:>7.4} | {:>9.4} {:>7.2} | {:>7.3} | {}",
            r.candidates, r.k, r.queries, r.ndcg10_full, r.ndcg_k_full, r.ndcg_k_grating, r.p_at_k_full, r.p_at_k_grating, r.agreement, r.min_agreement, r.compute_share,
            if args.replay_only { "-".to_string() } else { r.engine_mismatches.to_string() }
        );
    }
    Ok(())
}

/// Runs grating mode for real on each recorded query and counts queries whose top K differs
/// from the replayed decision (it never should: both use the same rule on the same scores).
fn check_engine(
    reranker: &Reranker,
    data: &Dl19,
    recs: &[Recorded],
    k: usize,
    cfg: &PruneConfig,
) -> Result<usize> {
    let mut mismatches = 0;
    for r in recs {
        let docs: Vec<&str> = r
            .doc_idx
            .iter()
            .map(|&d| data.doc_texts[d].as_str())
            .collect();
        let opts = RerankOptions::top_k(k).with_prune(cfg.clone());
        let out = reranker.rerank(&r.query, &docs, &opts)?;
        let got: Vec<usize> = out.ranked.iter().map(|s| s.index).collect();
        let want: Vec<usize> = replay(cfg, &r.layer_scores, k)
            .ranking
            .iter()
            .map(|x| x.0)
            .collect();
        if got != want {
            tracing::warn!(qid = %r.qid, ?got, ?want, "engine and replay disagree");
            mismatches += 1;
        }
    }
    Ok(mismatches)
}
