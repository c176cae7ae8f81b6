//! `grating calibrate`: chooses the model's pruning rule on sample requests, reports it out
//! of fold (every request is measured with a rule calibrated without its query), and saves it
//! in the model's pruning profile.
//!
//! Each sample request runs once without pruning while every layer's scores are recorded;
//! rules are then evaluated by replaying the engine's own pruning code on those scores (a
//! candidate's score at a layer does not depend on which others are still live, so the
//! replay is exact and a sweep costs one full pass per request). The calibration itself is
//! library code ([`grating::prune::calibrate`]); this file reads requests and prints.

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use grating::eval::dl19::Dl19;
use grating::prune::calibrate::{self, HeldOutRow, Recording};
use grating::prune::profile::{self, PruneProfile};
use grating::prune::{PruneConfig, PruneMode, RuleKind};
use grating::{RerankOptions, Reranker};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sample requests: a TREC DL or BEIR directory (BM25 candidates of its queries) or a
    /// jsonl file with {"query", "documents": [...]} per line (your own traffic: agreement with
    /// full inference needs no judgments).
    #[arg(long)]
    pub queries: PathBuf,
    /// BM25 candidates per query when --queries is a TREC DL directory.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    /// K values the rule must serve (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    pub top_k: Vec<usize>,
    /// Candidates per request to measure at (comma-separated; each request cut to its first N,
    /// BM25 order for TREC directories). Default: 20 and --candidates for a TREC directory,
    /// each request as it is for a jsonl file.
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Mean top-K agreement with full inference the rule must reach, out of fold.
    #[arg(long, default_value_t = 0.99)]
    pub target_agreement: f64,
    /// Lowest per-request top-K agreement the rule may give, out of fold.
    #[arg(long, default_value_t = 0.9)]
    pub min_agreement: f64,
    /// Folds (by query) of the out-of-fold report.
    #[arg(long, default_value_t = calibrate::DEFAULT_FOLDS)]
    pub folds: usize,
    /// Cluster rule: thresholds to try (default: 24 values from 0.01 to 2, log-spaced).
    #[arg(long, value_delimiter = ',')]
    pub thresholds: Vec<f32>,
    /// Use only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Cache of the recorded per-layer scores: read if it exists, else written after recording
    /// (to study other rules without recomputing; `scripts/prune_study.py` reads it).
    #[arg(long)]
    pub scores_cache: Option<PathBuf>,
    /// Only report; do not write the profile.
    #[arg(long)]
    pub no_save: bool,
    /// Fit the model's score calibration (what `relevance_score` means) instead of the pruning
    /// rule: Platt scaling on the judged documents among each query's BM25 candidates
    /// and random passages of the corpus (--queries must be a TREC DL or BEIR directory),
    /// reported on held-out queries.
    #[arg(long)]
    pub scores: bool,
    /// With --scores: judgments of at least this grade count as relevant (TREC DL: 2).
    #[arg(long, default_value_t = 2)]
    pub relevant_grade: u32,
    /// With --scores: passages drawn at random from the corpus per query, scored as
    /// non-relevant (judged pools are mostly relevant; a deployed reranker sees much that is
    /// not).
    #[arg(long, default_value_t = 20)]
    pub random_negatives: usize,
    #[command(flatten)]
    pub prune: PruneArgs,
}

#[derive(serde::Deserialize)]
struct SampleRequest {
    query: String,
    #[serde(alias = "texts", alias = "docs")]
    documents: Vec<String>,
}

/// The sample requests: BM25 candidates of a TREC/BEIR directory's queries, or a jsonl file.
pub fn read_requests(path: &Path, candidates: usize) -> Result<Vec<(String, Vec<String>)>> {
    if path.is_dir() {
        let data = Dl19::load(path)?;
        return Ok(data
            .queries
            .iter()
            .map(|(_, q)| {
                let docs = data
                    .candidates(q, candidates)
                    .into_iter()
                    .map(|d| data.doc_texts[d].clone())
                    .collect();
                (q.clone(), docs)
            })
            .collect());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let s: SampleRequest = serde_json::from_str(l)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?;
            Ok((s.query, s.documents))
        })
        .collect()
}

/// Records (or reads from `cache`) every layer's scores of each request.
pub fn record(
    reranker: &Reranker,
    requests: &[(String, Vec<String>)],
    cache: Option<&Path>,
) -> Result<Vec<Recording>> {
    let scores: Vec<Vec<Vec<f32>>> = match cache {
        Some(p) if p.is_file() => serde_json::from_str(&std::fs::read_to_string(p)?)
            .with_context(|| format!("{}: not a scores cache", p.display()))?,
        _ => {
            eprintln!(
                "recording per-layer scores of {} requests...",
                requests.len()
            );
            let mut recs = Vec::new();
            for (query, docs) in requests {
                recs.push(
                    reranker
                        .layer_scores(query, docs, &RerankOptions::default())?
                        .0,
                );
            }
            if let Some(p) = cache {
                std::fs::write(p, serde_json::to_string(&recs)?)?;
            }
            recs
        }
    };
    if scores.len() != requests.len() {
        bail!(
            "the scores cache holds {} requests, the sample {}",
            scores.len(),
            requests.len()
        );
    }
    Ok(requests
        .iter()
        .zip(scores)
        .map(|((q, _), layer_scores)| Recording {
            query: q.clone(),
            layer_scores,
        })
        .collect())
}

pub fn print_rows(rows: &[HeldOutRow]) {
    println!(
        "{:>5} {:>3} {:>8} | {:>10} {:>6} | {:>7}",
        "N", "K", "requests", "agreement", "min", "compute"
    );
    for r in rows {
        let n = if r.candidates == 0 {
            "all".to_string()
        } else {
            r.candidates.to_string()
        };
        println!(
            "{:>5} {:>3} {:>8} | {:>10.4} {:>6.2} | {:>7.3}",
            n, r.k, r.requests, r.agreement, r.min_agreement, r.compute_share
        );
    }
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let reranker = args.model.load(&BatchArgs::default())?;
    if args.scores {
        return super::calibrate_scores::run(&args, &reranker);
    }
    // A fresh calibration: the default rule (or the one --rule names), not the profile's.
    let mut base = args.prune.config(&PruneConfig::default())?;
    if base.mode == PruneMode::Off {
        bail!("calibration needs pruning on (drop --prune off)");
    }
    base.first_layer = args.prune.first_layer.unwrap_or(1);
    if args.folds < 2 {
        bail!("--folds must be at least 2");
    }
    let ks = &args.top_k;
    if ks.is_empty() || ks.contains(&0) {
        bail!("--top-k needs values of at least 1");
    }
    let kmax = *ks.iter().max().expect("non-empty");
    let requests: Vec<(String, Vec<String>)> = read_requests(&args.queries, args.candidates)?
        .into_iter()
        .filter(|r| r.1.len() > kmax)
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    if requests.is_empty() {
        bail!("no sample requests with more than {kmax} documents");
    }
    let sizes = match (&args.sizes[..], args.queries.is_dir()) {
        ([], true) => {
            let mut v = vec![20.min(args.candidates), args.candidates];
            v.dedup();
            v
        }
        ([], false) => vec![0],
        (s, _) => s.to_vec(),
    };
    let recs = record(&reranker, &requests, args.scores_cache.as_deref())?;
    let source = format!("{} ({} requests)", args.queries.display(), recs.len());
    let (cfg, rows, met) = if base.rule == RuleKind::Cluster {
        let thresholds = if args.thresholds.is_empty() {
            calibrate::default_thresholds()
        } else {
            args.thresholds.clone()
        };
        let pick = |train: &[Recording]| {
            calibrate::fit_cluster(train, &base, &thresholds, ks, args.target_agreement)
        };
        let mut rows = Vec::new();
        for &n in &sizes {
            for &k in ks {
                let set = calibrate::at_size(&recs, n, k);
                let cfgs = calibrate::out_of_fold(&set, args.folds, pick);
                let outs: Vec<_> = set
                    .iter()
                    .zip(&cfgs)
                    .map(|(r, c)| calibrate::outcome(c, r, k))
                    .collect();
                rows.push(calibrate::summarize(n, k, &outs));
            }
        }
        let cfg = pick(&recs);
        let met = cfg.threshold < f32::MAX;
        (cfg, rows, met)
    } else {
        let f = calibrate::fit(
            &recs,
            &base,
            args.target_agreement,
            args.min_agreement,
            &sizes,
            ks,
            args.folds,
        );
        (f.config, f.held_out, f.met)
    };
    println!(
        "out of fold ({} folds by query; each request measured with a rule calibrated on the others):",
        args.folds
    );
    print_rows(&rows);
    match cfg.rule {
        RuleKind::Margin => println!(
            "chosen margin {} (movement per layer: {})",
            cfg.margin,
            cfg.movement
                .iter()
                .map(|m| m.map_or("-".to_string(), |m| format!("{m:.3}")))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        RuleKind::Cluster => println!("chosen threshold {}", cfg.threshold),
    }
    if !met {
        eprintln!(
            "no setting reaches agreement {} (minimum {}) at every N and K; the profile keeps the safest",
            args.target_agreement, args.min_agreement
        );
    }
    if !args.no_save {
        let worst = rows
            .iter()
            .min_by(|a, b| a.agreement.total_cmp(&b.agreement))
            .expect("rows");
        let p = PruneProfile {
            model: args.model.model.clone(),
            fingerprint: profile::fingerprint(reranker.files())?,
            rule: Some(cfg.rule),
            movement: if cfg.rule == RuleKind::Margin {
                cfg.movement.clone()
            } else {
                Vec::new()
            },
            margin: (cfg.rule == RuleKind::Margin).then_some(cfg.margin),
            threshold: (cfg.rule == RuleKind::Cluster).then_some(cfg.threshold),
            first_layer: cfg.first_layer,
            target_agreement: args.target_agreement,
            measured_agreement: worst.agreement,
            measured_compute: worst.compute_share,
            top_k: kmax,
            queries: recs.len(),
            source,
            held_out: rows.clone(),
        };
        let dir = args
            .model
            .profile_dir
            .clone()
            .unwrap_or_else(profile::default_profile_dir);
        let path = profile::save(&dir, reranker.files(), &p)?;
        println!("profile written to {}", path.display());
    }
    Ok(())
}
