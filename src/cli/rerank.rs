//! `grating rerank`: top K of a documents file for one query.

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use super::docs::read_documents;
use anyhow::{bail, Result};
use clap::Args;
use grating::{Mode, Progress, RerankOptions, Truncation};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RerankArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The query.
    #[arg(long)]
    pub query: String,
    /// Candidates: jsonl with {"id","text"} per line, or plain text with one document per line.
    #[arg(long)]
    pub docs: PathBuf,
    /// How many to return (default: all, which also disables pruning).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// full: conventional batches through every layer (the baseline); grating: monolithic
    /// forwarding with pruning.
    #[arg(long, default_value = "grating")]
    pub mode: Mode,
    #[command(flatten)]
    pub prune: PruneArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Maximum tokens per (query, document) sequence (default: the model's).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Which end of a long document to cut: right (keep the start) or left.
    #[arg(long, default_value = "right", value_parser = ["right", "left"])]
    pub truncation_direction: String,
    /// Qwen3-Reranker instruction (the <Instruct> line).
    #[arg(long)]
    pub instruction: Option<String>,
    /// Print raw logits instead of sigmoid scores (P(yes) for Qwen3).
    #[arg(long)]
    pub raw_scores: bool,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print per-request statistics (layers computed, pruning, timings) to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Offload the hidden states of chunks not being computed to a temporary file.
    #[arg(long)]
    pub offload: bool,
    /// First stage: keep only the BM25 top N documents of the file for the query, as a
    /// retrieval pipeline would, before reranking (indices still refer to the file).
    #[arg(long)]
    pub bm25_prefilter: Option<usize>,
    /// Forced pruning schedule for random-weight models, e.g. "10:0.3,16:0.1" (after layer 10
    /// keep 30% of the candidates, after 16 keep 10%).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Run the request this many times on the loaded model (the first run includes warm-up:
    /// GPU kernel loading, allocator growth); with --json every run's stats are in "runs".
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn step(&self, done: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }
}

pub fn run(args: RerankArgs) -> Result<()> {
    let mut batch = args.batch.clone();
    batch.offload = args.offload;
    let docs = read_documents(&args.docs)?;
    // Positions in the file of the documents that are reranked.
    let selected: Vec<usize> = match args.bm25_prefilter {
        Some(n) => {
            let bm = grating::eval::bm25::Bm25::new(docs.iter().map(|d| d.text.as_str()));
            let top: Vec<usize> = bm.top(&args.query, n).into_iter().map(|(i, _)| i).collect();
            if top.is_empty() {
                bail!("no document shares a term with the query (BM25 prefilter found nothing)");
            }
            top
        }
        None => (0..docs.len()).collect(),
    };
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let reranker = args.model.load(&batch)?;
    let texts: Vec<&str> = selected.iter().map(|&i| docs[i].text.as_str()).collect();
    let mut prune = args.prune.config(reranker.prune_config())?;
    if let Some(s) = &args.schedule {
        prune.schedule = super::bench::parse_schedule(s)?;
    }
    let opts = RerankOptions {
        top_k: args.top_k,
        mode: args.mode,
        prune: Some(prune),
        max_length: args.max_length,
        truncation: if args.truncation_direction == "left" {
            Truncation::Left
        } else {
            Truncation::Right
        },
        truncate: true,
        instruction: args.instruction.clone(),
        execution: None,
    };

    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(match opts.mode {
        Mode::Full => "batches",
        Mode::Grating => "layers",
    });
    let mut runs = Vec::with_capacity(args.repeats);
    for _ in 1..args.repeats {
        runs.push(reranker.rerank(&args.query, &texts, &opts)?.stats);
    }
    let out = reranker.rerank_with_progress(&args.query, &texts, &opts, &Bar(bar.clone()))?;
    runs.push(out.stats.clone());
    bar.finish_and_clear();

    let score = |l: f32| {
        if args.raw_scores {
            l
        } else {
            reranker.relevance(l)
        }
    };
    if args.json {
        let results: Vec<serde_json::Value> = out
            .ranked
            .iter()
            .enumerate()
            .map(|(rank, s)| {
                let i = selected[s.index];
                serde_json::json!({
                    "rank": rank + 1,
                    "index": i,
                    "id": docs[i].id,
                    "score": score(s.logit),
                    "logit": s.logit,
                })
            })
            .collect();
        let mut v = serde_json::json!({"results": results, "stats": out.stats});
        if args.repeats > 1 {
            v["runs"] = serde_json::to_value(&runs)?;
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        // The logit beside the score: an uncalibrated sigmoid saturates (1.00000 for a whole
        // top 10), the logit still tells the documents apart.
        println!(
            "{:>5}  {:>6}  {:>10}  {:>9}  {:<20}  text",
            "rank", "index", "score", "logit", "id"
        );
        for (rank, s) in out.ranked.iter().enumerate() {
            let i = selected[s.index];
            let text: String = docs[i].text.chars().take(60).collect();
            println!(
                "{:>5}  {:>6}  {:>10.5}  {:>9.4}  {:<20}  {}",
                rank + 1,
                i,
                score(s.logit),
                s.logit,
                docs[i].id,
                text.replace('\n', " ")
            );
        }
    }
    if args.stats {
        print_stats(&out.stats);
    }
    Ok(())
}

pub fn print_stats(s: &grating::RequestStats) {
    eprintln!(
        "mode {} | {} candidates, {} tokens ({} truncated) | candidate-layers {}/{} ({:.1}% saved)",
        s.mode,
        s.candidates,
        s.tokens,
        s.truncated,
        s.candidate_layers_computed,
        s.candidate_layers_full,
        s.saved_percent
    );
    eprintln!(
        "tokenize {:.3}s, compute {:.3}s, total {:.3}s, {:.1} GFLOP/s, peak RSS {:.0} MiB",
        s.tokenize_seconds, s.compute_seconds, s.total_seconds, s.gflops_per_second, s.peak_rss_mib
    );
    if let Some(g) = &s.gpu_memory {
        eprintln!(
            "GPU memory: peak allocated {:.0} MiB, peak reserved {:.0} MiB, device in use {:.0} MiB",
            g.peak_used as f64 / 1048576.0,
            g.peak_reserved as f64 / 1048576.0,
            g.device_used as f64 / 1048576.0
        );
    }
    for e in &s.prune_events {
        // The margin rule reports the score distance it decided by, the cluster rule its
        // clusters.
        let why = if e.clusters > 0 {
            format!("dispersion {:.4}, {} clusters", e.dispersion, e.clusters)
        } else {
            format!("margin {:.3} logits", e.margin_logits)
        };
        eprintln!(
            "  prune after layer {}: {} live, {why} -> {} accepted, {} dropped",
            e.layer, e.live_before, e.accepted, e.dropped
        );
    }
    for t in &s.layer_timings {
        eprintln!(
            "  layer {:>3}: {:>5} live, {:>7} tokens, {:.4}s (stall {:.4}s)",
            t.layer, t.live_candidates, t.tokens, t.seconds, t.stall_seconds
        );
    }
}
