//! `grating eval`: ranking quality of full and grating modes on a judged collection with BM25
//! candidates (or agreement only, on a jsonl of requests), the agreement of grating's top K
//! with full inference, the compute it saved and its latency against full mode, out of fold
//! by default.

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use anyhow::{bail, Result};
use clap::Args;
use grating::eval::dl19::Dl19;
use grating::eval::metrics::ndcg_at;
use grating::prune::calibrate;
use grating::prune::state::replay;
use grating::prune::{PruneConfig, PruneMode, RuleKind};
use grating::{Mode, RerankOptions, Reranker};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A TREC DL or BEIR directory (corpus.jsonl, queries.jsonl, qrels), or a jsonl file of
    /// {"query", "documents"} requests (agreement with full inference only: no judgments).
    #[arg(long, default_value = "../shared/data/trec-dl19-subset")]
    pub data: PathBuf,
    /// BM25 candidates per query (comma-separated list; requests of a jsonl file are cut to
    /// their first N).
    #[arg(long, value_delimiter = ',', default_value = "20,100")]
    pub candidates: Vec<usize>,
    /// K values (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    pub top_k: Vec<usize>,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Evaluate only the first N queries.
    #[arg(long)]
    pub queries: Option<usize>,
    /// Folds (by query) for out-of-fold numbers: each request is measured with the rule
    /// `grating calibrate` fits on the other folds (nested: the margin is chosen on those
    /// folds too). 0 measures the model's own rule (its profile) on every request, which is
    /// in-sample for the requests the profile was calibrated on.
    #[arg(long, default_value_t = calibrate::DEFAULT_FOLDS)]
    pub folds: usize,
    /// With --folds: the calibration targets (as `grating calibrate`).
    #[arg(long, default_value_t = 0.99)]
    pub target_agreement: f64,
    #[arg(long, default_value_t = 0.9)]
    pub min_agreement: f64,
    /// Only replay the pruning rule on recorded per-layer scores (fast); by default grating
    /// mode also runs for real, must agree with the replay, and is timed against full mode
    /// (alternating, same requests) for the latency ratio.
    #[arg(long)]
    pub replay_only: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One evaluated request: its documents and, for judged collections, their ids and qrels.
struct Request {
    query: String,
    qid: Option<String>,
    docs: Vec<String>,
    doc_ids: Vec<String>,
}

#[derive(serde::Serialize, Default, Clone)]
pub struct Row {
    pub candidates: usize,
    pub k: usize,
    pub queries: usize,
    pub ndcg10_full: f64,
    pub ndcg10_grating: f64,
    pub ndcg10_change: f64,
    pub agreement: f64,
    pub min_agreement: f64,
    pub compute_share: f64,
    /// Grating's total time over full mode's on the same requests (0 with --replay-only).
    pub latency_ratio: f64,
    pub engine_mismatches: usize,
}

fn load_requests(args: &EvalArgs, nmax: usize) -> Result<(Vec<Request>, Option<Dl19>)> {
    if args.data.is_dir() {
        let data = Dl19::load(&args.data)?;
        let reqs = data
            .queries
            .iter()
            .take(args.queries.unwrap_or(usize::MAX))
            .map(|(qid, q)| {
                let idx = data.candidates(q, nmax);
                Request {
                    query: q.clone(),
                    qid: Some(qid.clone()),
                    docs: idx.iter().map(|&d| data.doc_texts[d].clone()).collect(),
                    doc_ids: idx.iter().map(|&d| data.doc_ids[d].clone()).collect(),
                }
            })
            .collect();
        return Ok((reqs, Some(data)));
    }
    let reqs = super::calibrate::read_requests(&args.data, nmax)?
        .into_iter()
        .take(args.queries.unwrap_or(usize::MAX))
        .map(|(q, mut docs)| {
            docs.truncate(nmax);
            let doc_ids = (0..docs.len()).map(|i| i.to_string()).collect();
            Request {
                query: q,
                qid: None,
                docs,
                doc_ids,
            }
        })
        .collect();
    Ok((reqs, None))
}

pub fn run(args: EvalArgs) -> Result<()> {
    let reranker = args.model.load(&BatchArgs::default())?;
    let base = args.prune.config(reranker.prune_config())?;
    if args.folds == 1 {
        bail!("--folds must be 0 (the model's own rule) or at least 2");
    }
    let nmax = *args.candidates.iter().max().unwrap_or(&100);
    let kmax = *args.top_k.iter().max().unwrap_or(&10);
    let (requests, data) = load_requests(&args, nmax)?;
    let requests: Vec<Request> = requests
        .into_iter()
        .filter(|r| r.docs.len() > kmax)
        .collect();
    if requests.is_empty() {
        bail!("no requests with more than {kmax} documents");
    }
    let pairs: Vec<(String, Vec<String>)> = requests
        .iter()
        .map(|r| (r.query.clone(), r.docs.clone()))
        .collect();
    let recs = super::calibrate::record(&reranker, &pairs, None)?;
    // The rule each request is measured with.
    let configs: Vec<PruneConfig> = if args.folds == 0 || base.mode == PruneMode::Off {
        vec![base.clone(); recs.len()]
    } else {
        calibrate::out_of_fold(&recs, args.folds, |train| match base.rule {
            RuleKind::Cluster => calibrate::fit_cluster(
                train,
                &base,
                &calibrate::default_thresholds(),
                &args.top_k,
                args.target_agreement,
            ),
            RuleKind::Margin => {
                calibrate::fit(
                    train,
                    &base,
                    args.target_agreement,
                    args.min_agreement,
                    &args.candidates,
                    &args.top_k,
                    args.folds,
                )
                .config
            }
        })
    };
    // How the nested fit went: the margin (or threshold) each request was measured with.
    let mut chosen: Vec<(String, usize)> = Vec::new();
    for c in &configs {
        let v = match c.rule {
            RuleKind::Margin => format!("margin {}", c.margin),
            RuleKind::Cluster => format!("threshold {}", c.threshold),
        };
        match chosen.iter_mut().find(|x| x.0 == v) {
            Some(x) => x.1 += 1,
            None => chosen.push((v, 1)),
        }
    }
    let chosen = chosen
        .iter()
        .map(|(v, n)| format!("{v} ({n} requests)"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut rows = Vec::new();
    for &n in &args.candidates {
        for &k in &args.top_k {
            let mut row = Row {
                candidates: n,
                k,
                min_agreement: 1.0,
                ..Default::default()
            };
            let (mut computed, mut possible) = (0usize, 0usize);
            let (mut t_full, mut t_grating) = (0.0f64, 0.0f64);
            for (req, (rec, cfg)) in requests.iter().zip(recs.iter().zip(&configs)) {
                let query = &req.query;
                let rec = rec.first(n);
                let n_here = rec.layer_scores[0].len();
                if n_here <= k {
                    continue;
                }
                let rep = replay(cfg, &rec.layer_scores, k);
                let o = calibrate::outcome_of(&rep, &rec, k);
                let ranking = rep.ranking;
                row.agreement += o.agreement;
                row.min_agreement = row.min_agreement.min(o.agreement);
                computed += o.computed;
                possible += o.possible;
                row.queries += 1;
                if let (Some(data), Some(qid)) = (&data, &req.qid) {
                    let qrels = &data.qrels[qid];
                    let last = rec.layer_scores.last().expect("layers");
                    let full = grating::prune::best_first(last);
                    let ids = |v: &[usize]| -> Vec<&str> {
                        v.iter().map(|&i| req.doc_ids[i].as_str()).collect()
                    };
                    let grating: Vec<usize> = ranking.iter().map(|x| x.0).collect();
                    row.ndcg10_full += ndcg_at(&ids(&full), qrels, k.min(10));
                    row.ndcg10_grating += ndcg_at(&ids(&grating), qrels, k.min(10));
                }
                if !args.replay_only {
                    let docs = &req.docs[..n_here];
                    let want: Vec<usize> = ranking.iter().map(|x| x.0).collect();
                    let (tf, tg, got) = time_both(&reranker, query, docs, k, cfg)?;
                    t_full += tf;
                    t_grating += tg;
                    if got != want {
                        tracing::warn!(query = %query, ?got, ?want, "engine and replay disagree");
                        row.engine_mismatches += 1;
                    }
                }
            }
            let q = row.queries.max(1) as f64;
            row.agreement /= q;
            row.ndcg10_full /= q;
            row.ndcg10_grating /= q;
            row.ndcg10_change = row.ndcg10_grating - row.ndcg10_full;
            row.compute_share = computed as f64 / possible.max(1) as f64;
            row.latency_ratio = if t_full > 0.0 {
                t_grating / t_full
            } else {
                0.0
            };
            rows.push(row);
        }
    }
    let rule = if args.folds == 0 {
        format!(
            "{:?} rule as configured (in-sample for its calibration requests)",
            base.rule
        )
    } else {
        format!(
            "{:?} rule fitted out of fold ({} folds by query, target {} / min {})",
            base.rule, args.folds, args.target_agreement, args.min_agreement
        )
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "model": args.model.model, "rule": rule, "chosen": chosen, "prune": base,
                "rows": rows
            }))?
        );
        return Ok(());
    }
    println!(
        "model {} | {rule} | nDCG@10 with linear gains (trec_eval); at K < 10, nDCG@K",
        args.model.model
    );
    println!("rule each request was measured with: {chosen}");
    println!(
        "{:>4} {:>3} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>5} | {:>7} | {:>7} | engine",
        "N", "K", "q", "nDCG", "nDCG", "change", "agree@K", "min", "compute", "latency"
    );
    println!(
        "{:>4} {:>3} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>5} | {:>7} | {:>7} | mismatch",
        "", "", "", "full", "grating", "", "", "", "share", "ratio"
    );
    for r in &rows {
        let judged = data.is_some();
        let f = |v: f64| {
            if judged {
                format!("{v:.4}")
            } else {
                "-".into()
            }
        };
        println!(
            "{:>4} {:>3} {:>4} | {:>8} {:>8} {:>8} | {:>8.4} {:>5.2} | {:>7.3} | {:>7} | {}",
            r.candidates,
            r.k,
            r.queries,
            f(r.ndcg10_full),
            f(r.ndcg10_grating),
            if judged {
                format!("{:+.4}", r.ndcg10_change)
            } else {
                "-".into()
            },
            r.agreement,
            r.min_agreement,
            r.compute_share,
            if args.replay_only {
                "-".to_string()
            } else {
                format!("{:.3}", r.latency_ratio)
            },
            if args.replay_only {
                "-".to_string()
            } else {
                r.engine_mismatches.to_string()
            }
        );
    }
    Ok(())
}

/// Times full mode and grating mode (with `cfg`) on one request, in alternating order so
/// that drift in the machine's speed falls on both; returns their seconds and grating's
/// top-K indices.
fn time_both(
    reranker: &Reranker,
    query: &str,
    docs: &[String],
    k: usize,
    cfg: &PruneConfig,
) -> Result<(f64, f64, Vec<usize>)> {
    let full = RerankOptions::top_k(k).with_mode(Mode::Full);
    let grating = RerankOptions::top_k(k).with_prune(cfg.clone());
    let t = Instant::now();
    reranker.rerank(query, docs, &full)?;
    let tf1 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = reranker.rerank(query, docs, &grating)?;
    let tg1 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    reranker.rerank(query, docs, &grating)?;
    let tg2 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    reranker.rerank(query, docs, &full)?;
    let tf2 = t.elapsed().as_secs_f64();
    Ok((
        tf1 + tf2,
        tg1 + tg2,
        out.ranked.iter().map(|s| s.index).collect(),
    ))
}
