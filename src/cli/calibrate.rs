//! `grating calibrate`: finds the lowest dispersion threshold whose top-K agreement with full
//! inference meets a target on sample requests, and saves it in the model's pruning profile.
//!
//! Each sample request runs once without pruning while every layer's scores are recorded;
//! each threshold is then evaluated by replaying the engine's own pruning rule on those scores
//! (a candidate's score at a layer does not depend on which others are still live, so the
//! replay is exact and a sweep costs one full pass per request).

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use grating::eval::dl19::Dl19;
use grating::eval::metrics::topk_agreement;
use grating::prune::profile::{self, PruneProfile};
use grating::prune::state::replay;
use grating::prune::{PruneConfig, PruneMode};
use grating::RerankOptions;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sample requests: a TREC DL or BEIR directory (BM25 candidates of its queries) or a
    /// jsonl file with {"query", "documents": [...]} per line.
    #[arg(long)]
    pub queries: PathBuf,
    /// BM25 candidates per query when --queries is a TREC DL directory.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Mean top-K agreement with full inference the threshold must reach.
    #[arg(long, default_value_t = 0.99)]
    pub target_agreement: f64,
    /// Thresholds to try (default: 24 values from 0.01 to 2, log-spaced).
    #[arg(long, value_delimiter = ',')]
    pub thresholds: Vec<f32>,
    /// Use only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Cache of the recorded per-layer scores: read if it exists, else written after recording
    /// (to sweep other rule parameters without recomputing).
    #[arg(long)]
    pub scores_cache: Option<PathBuf>,
    /// Only report; do not write the profile.
    #[arg(long)]
    pub no_save: bool,
    /// Fit the model's score calibration (what `relevance_score` means) instead of the pruning
    /// threshold: Platt scaling on the judged documents among each query's BM25 candidates
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepRow {
    pub threshold: f32,
    pub agreement: f64,
    pub min_agreement: f64,
    pub compute_share: f64,
}

/// Replays `cfg` at each threshold over recorded `[request][layer][candidate]` scores.
pub fn sweep(
    recs: &[Vec<Vec<f32>>],
    k: usize,
    base: &PruneConfig,
    thresholds: &[f32],
) -> Vec<SweepRow> {
    thresholds
        .iter()
        .map(|&t| {
            let cfg = PruneConfig {
                threshold: t,
                ..base.clone()
            };
            let (mut agree, mut min_a, mut computed, mut possible) = (0.0, 1.0f64, 0usize, 0usize);
            for ls in recs {
                let last = ls.last().expect("layers");
                let mut full: Vec<usize> = (0..last.len()).collect();
                full.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
                let rep = replay(&cfg, ls, k);
                let got: Vec<usize> = rep.ranking.iter().map(|x| x.0).collect();
                let a = topk_agreement(&got, &full, k);
                agree += a;
                min_a = min_a.min(a);
                computed += rep.layers_per_candidate.iter().sum::<usize>();
                possible += last.len() * ls.len();
            }
            SweepRow {
                threshold: t,
                agreement: agree / recs.len().max(1) as f64,
                min_agreement: min_a,
                compute_share: computed as f64 / possible.max(1) as f64,
            }
        })
        .collect()
}

pub fn default_thresholds() -> Vec<f32> {
    (0..24)
        .map(|i| 0.01f32 * (200f32).powf(i as f32 / 23.0))
        .collect()
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let reranker = args.model.load(&BatchArgs::default())?;
    if args.scores {
        return super::calibrate_scores::run(&args, &reranker);
    }
    let mut base = args.prune.config(reranker.prune_config())?;
    if base.mode == PruneMode::Off {
        bail!("calibration needs pruning on (drop --prune off)");
    }
    if let Some(f) = args.prune.first_layer {
        base.first_layer = f;
    } else {
        base.first_layer = 1;
    }
    // (query, documents) of each sample request.
    let requests: Vec<(String, Vec<String>)> = if args.queries.is_dir() {
        let data = Dl19::load(&args.queries)?;
        data.queries
            .iter()
            .map(|(_, q)| {
                let docs = data
                    .candidates(q, args.candidates)
                    .into_iter()
                    .map(|d| data.doc_texts[d].clone())
                    .collect();
                (q.clone(), docs)
            })
            .filter(|r: &(String, Vec<String>)| r.1.len() > args.top_k)
            .collect()
    } else {
        let text = std::fs::read_to_string(&args.queries)
            .with_context(|| format!("cannot read {}", args.queries.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                let s: SampleRequest = serde_json::from_str(l)
                    .with_context(|| format!("{} line {}", args.queries.display(), i + 1))?;
                Ok((s.query, s.documents))
            })
            .collect::<Result<_>>()?
    };
    let requests: Vec<(String, Vec<String>)> = requests
        .into_iter()
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    if requests.is_empty() {
        bail!("no sample requests with more than {} documents", args.top_k);
    }
    let recs: Vec<Vec<Vec<f32>>> = match &args.scores_cache {
        Some(p) if p.is_file() => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        _ => {
            eprintln!(
                "recording per-layer scores of {} requests...",
                requests.len()
            );
            let mut recs = Vec::new();
            for (query, docs) in &requests {
                recs.push(
                    reranker
                        .layer_scores(query, docs, &RerankOptions::default())?
                        .0,
                );
            }
            if let Some(p) = &args.scores_cache {
                std::fs::write(p, serde_json::to_string(&recs)?)?;
            }
            recs
        }
    };
    let thresholds = if args.thresholds.is_empty() {
        default_thresholds()
    } else {
        args.thresholds.clone()
    };
    let rows = sweep(&recs, args.top_k, &base, &thresholds);
    println!(
        "{:>10} {:>10} {:>8} {:>8}",
        "threshold", "agreement", "min", "compute"
    );
    for r in &rows {
        println!(
            "{:>10.4} {:>10.4} {:>8.2} {:>8.3}",
            r.threshold, r.agreement, r.min_agreement, r.compute_share
        );
    }
    // Agreement is not monotone in the threshold in general: take the lowest threshold from
    // which every higher one also meets the target.
    let mut chosen: Option<&SweepRow> = None;
    for r in rows.iter().rev() {
        if r.agreement >= args.target_agreement {
            chosen = Some(r);
        } else {
            break;
        }
    }
    let (threshold, agreement, compute) = match chosen {
        Some(r) => (r.threshold, r.agreement, r.compute_share),
        None => {
            eprintln!(
                "no threshold reaches agreement {}; the profile disables pruning",
                args.target_agreement
            );
            (f32::MAX, 1.0, 1.0)
        }
    };
    println!("chosen threshold {threshold} (agreement {agreement:.4}, compute share {compute:.3}, first layer {})", base.first_layer);
    if !args.no_save {
        let p = PruneProfile {
            model: args.model.model.clone(),
            fingerprint: profile::fingerprint(reranker.files())?,
            threshold,
            first_layer: base.first_layer,
            target_agreement: args.target_agreement,
            measured_agreement: agreement,
            measured_compute: compute,
            top_k: args.top_k,
            queries: recs.len(),
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
