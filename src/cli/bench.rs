//! `grating bench`: latency and peak memory of execution modes measured side by side in one
//! run, on the same model, inputs and threads.
//!
//! Each contender runs in its own worker process (so each has its own peak RSS), and the
//! requests are interleaved between contenders, query by query and repeat by repeat, with the
//! contender order rotated, so machine noise hits all of them alike. Contenders: `full` and
//! `grating` (this binary's modes) and `st` (sentence-transformers' CrossEncoder.predict in
//! PyTorch, through scripts/st_baseline.py in .venv-bench).

use super::common::{BatchArgs, ModelArgs, PruneArgs};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use grating::eval::dl19::Dl19;
use grating::eval::metrics::{ndcg_at, topk_agreement};
use grating::{Mode, RerankOptions};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// TREC DL directory: requests are BM25 candidates of its judged queries. Without it,
    /// synthetic requests of --doc-tokens-long documents are used (for random-weight models).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Candidates per request.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Contenders, comma-separated: full, grating, st; `full@stream` / `grating@resident`
    /// override --weights for one contender.
    #[arg(long, value_delimiter = ',', default_value = "full,grating")]
    pub compare: Vec<String>,
    /// Timed repeats of each request per contender (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Use only the first N requests.
    #[arg(long)]
    pub queries: Option<usize>,
    /// Synthetic requests: how many.
    #[arg(long, default_value_t = 4)]
    pub synthetic_requests: usize,
    /// Synthetic requests: words per document (about one token each).
    #[arg(long, default_value_t = 256)]
    pub doc_tokens: usize,
    /// Forced pruning schedule for random-weight models, e.g. "10:0.3,16:0.1" (after layer 10
    /// keep 30% of the candidates, after 16 keep 10%).
    #[arg(long)]
    pub schedule: Option<String>,
    #[command(flatten)]
    pub prune: PruneArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Python interpreter with torch and sentence-transformers, for the `st` contender.
    #[arg(long, default_value = ".venv-bench/bin/python")]
    pub python: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One request as the workers receive it.
#[derive(Serialize, Deserialize, Clone)]
pub struct WorkItem {
    pub qid: String,
    pub query: String,
    pub docs: Vec<String>,
    pub top_k: usize,
}

/// A worker's answer to one request.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct WorkResult {
    pub qid: String,
    pub seconds: f64,
    /// Ranked candidate indices (the top K, or all for `st`).
    #[serde(default)]
    pub ranking: Vec<usize>,
    #[serde(default)]
    pub scores: Vec<f32>,
    #[serde(default)]
    pub candidate_layers: u64,
    #[serde(default)]
    pub candidate_layers_full: u64,
    #[serde(default)]
    pub flops: f64,
    #[serde(default)]
    pub stall_seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct WorkerEnd {
    peak_rss_mib: f64,
}

/// `grating bench-worker`: serves WorkItems from stdin in one mode (internal to `bench`).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub mode: Mode,
    #[command(flatten)]
    pub prune: PruneArgs,
    #[arg(long)]
    pub schedule: Option<String>,
    #[command(flatten)]
    pub batch: BatchArgs,
}

fn weights_arg(w: grating::WeightsMode) -> &'static str {
    match w {
        grating::WeightsMode::Resident => "resident",
        grating::WeightsMode::Stream => "stream",
        grating::WeightsMode::Auto => "auto",
    }
}

pub fn parse_schedule(s: &str) -> Result<Vec<(usize, f32)>> {
    s.split(',')
        .map(|part| {
            let (l, f) = part
                .split_once(':')
                .ok_or_else(|| anyhow!("schedule entry {part:?} is not LAYER:FRACTION"))?;
            let l: usize = l
                .trim()
                .parse()
                .with_context(|| format!("schedule layer {l:?}"))?;
            let f: f32 = f
                .trim()
                .parse()
                .with_context(|| format!("schedule fraction {f:?}"))?;
            if !(0.0..=1.0).contains(&f) || l == 0 {
                bail!("schedule entry {part:?}: layer from 1, fraction in [0, 1]");
            }
            Ok((l, f))
        })
        .collect()
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let reranker = args.model.load(&args.batch)?;
    let mut prune = args.prune.config(reranker.prune_config())?;
    if let Some(s) = &args.schedule {
        prune.schedule = parse_schedule(s)?;
    }
    let base = RerankOptions {
        mode: args.mode,
        prune: Some(prune),
        ..Default::default()
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let item: WorkItem = serde_json::from_str(&line)?;
        let opts = RerankOptions {
            top_k: Some(item.top_k),
            ..base.clone()
        };
        let t = std::time::Instant::now();
        let res = reranker.rerank(&item.query, &item.docs, &opts)?;
        let seconds = t.elapsed().as_secs_f64();
        let r = WorkResult {
            qid: item.qid,
            seconds,
            ranking: res.ranked.iter().map(|s| s.index).collect(),
            scores: res.ranked.iter().map(|s| s.logit).collect(),
            candidate_layers: res.stats.candidate_layers_computed,
            candidate_layers_full: res.stats.candidate_layers_full,
            flops: res.stats.flops,
            stall_seconds: res
                .stats
                .layer_timings
                .iter()
                .map(|t| t.stall_seconds)
                .sum(),
        };
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
        out.flush()?;
    }
    let end = WorkerEnd {
        peak_rss_mib: grating::memory::peak_rss_mib().unwrap_or(0.0),
    };
    writeln!(out, "{}", serde_json::to_string(&end)?)?;
    Ok(())
}

struct Worker {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn spawn(name: &str, mut cmd: Command) -> Result<Worker> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start contender {name}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Ok(Worker {
            name: name.to_string(),
            child,
            stdin,
            stdout,
        })
    }

    fn send(&mut self, item: &WorkItem) -> Result<WorkResult> {
        let stdin = self.stdin.as_mut().expect("open stdin");
        writeln!(stdin, "{}", serde_json::to_string(item)?)?;
        stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("contender {} exited early", self.name);
        }
        serde_json::from_str(&line)
            .with_context(|| format!("contender {} answered {line:?}", self.name))
    }

    fn finish(mut self) -> Result<f64> {
        drop(self.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let end: WorkerEnd = serde_json::from_str(&line)
            .with_context(|| format!("contender {} end {line:?}", self.name))?;
        let _ = self.child.wait();
        Ok(end.peak_rss_mib)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Synthetic requests for models without meaningful text: documents of `words` pseudo-words.
fn synthetic_items(n_requests: usize, n_docs: usize, words: usize, k: usize) -> Vec<WorkItem> {
    let vocab = [
        "alpha", "river", "stone", "market", "signal", "forest", "engine", "copper", "harbor",
        "lantern", "meadow", "vector", "summit", "canvas", "orbit", "thunder",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n_requests)
        .map(|r| WorkItem {
            qid: format!("synthetic-{r}"),
            query: "which passage talks about the copper engine near the harbor".into(),
            docs: (0..n_docs)
                .map(|_| {
                    (0..words)
                        .map(|_| vocab[(next() % vocab.len() as u64) as usize])
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect(),
            top_k: k,
        })
        .collect()
}

pub fn run(args: BenchArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let threads = args.model.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let (items, data) = match &args.data {
        Some(dir) => {
            let data = Dl19::load(dir)?;
            let items: Vec<WorkItem> = data
                .queries
                .iter()
                .take(args.queries.unwrap_or(usize::MAX))
                .map(|(qid, q)| WorkItem {
                    qid: qid.clone(),
                    query: q.clone(),
                    docs: data
                        .candidates(q, args.candidates)
                        .into_iter()
                        .map(|d| data.doc_texts[d].clone())
                        .collect(),
                    top_k: args.top_k,
                })
                .collect();
            (items, Some(data))
        }
        None => (
            synthetic_items(
                args.synthetic_requests,
                args.candidates,
                args.doc_tokens,
                args.top_k,
            ),
            None,
        ),
    };
    if items.is_empty() {
        bail!("no requests");
    }
    let mut workers = Vec::new();
    for name in &args.compare {
        // `mode@weights` picks the weights mode per contender (e.g. grating@stream).
        let (mode, weights) = match name.split_once('@') {
            Some((m, w)) => (
                m,
                w.parse::<grating::WeightsMode>().map_err(|e| anyhow!(e))?,
            ),
            None => (name.as_str(), args.model.weights),
        };
        let cmd = match mode {
            "full" | "grating" => {
                let mut c = Command::new(&exe);
                c.arg("bench-worker")
                    .args(["--model", &args.model.model, "--device", &args.model.device])
                    .args(["--threads", &threads.to_string(), "--mode", mode])
                    .args(["--weights", weights_arg(weights)])
                    .args(["--embedding-cache", &args.model.embedding_cache.to_string()]);
                if let Some(m) = args.model.max_memory {
                    c.args(["--max-memory", &m.to_string()]);
                }
                if let Some(b) = args.batch.batch_size {
                    c.args(["--batch-size", &b.to_string()]);
                }
                if let Some(t) = args.batch.chunk_tokens {
                    c.args(["--chunk-tokens", &t.to_string()]);
                }
                if let Some(d) = args.model.dtype {
                    c.args(["--dtype", &format!("{d:?}").to_lowercase()]);
                }
                c.args(args.prune.to_args());
                if let Some(s) = &args.schedule {
                    c.args(["--schedule", s]);
                }
                c
            }
            "st" => {
                if !args.python.exists() {
                    bail!(
                        "{} not found: run scripts/setup_py_baseline.sh first",
                        args.python.display()
                    );
                }
                let mut c = Command::new(&args.python);
                c.arg("scripts/st_baseline.py")
                    .args([
                        "--model",
                        &args.model.model,
                        "--threads",
                        &threads.to_string(),
                    ])
                    .args([
                        "--batch-size",
                        &args.batch.batch_size.unwrap_or(32).to_string(),
                        "--serve",
                    ]);
                c
            }
            other => bail!(
                "unknown contender {other:?} (full, grating, st; optionally @resident or @stream)"
            ),
        };
        workers.push(Worker::spawn(name, cmd)?);
    }
    // Warm-up: one untimed request per contender.
    for w in workers.iter_mut() {
        w.send(&items[0])?;
    }
    let nw = workers.len();
    let mut results: Vec<Vec<Vec<WorkResult>>> = vec![vec![Vec::new(); items.len()]; nw];
    for (qi, item) in items.iter().enumerate() {
        for rep in 0..args.repeats.max(1) {
            for j in 0..nw {
                let wi = (j + rep + qi) % nw;
                let r = workers[wi].send(item)?;
                results[wi][qi].push(r);
            }
        }
        eprint!("\r{}/{} requests", qi + 1, items.len());
    }
    eprintln!();
    let mut peaks = Vec::new();
    for w in workers {
        peaks.push(w.finish()?);
    }
    report(&args, &items, data.as_ref(), &results, &peaks, threads)
}

#[derive(Serialize)]
struct ContenderSummary {
    name: String,
    median_seconds: f64,
    mean_seconds: f64,
    peak_rss_mib: f64,
    candidate_layer_share: f64,
    gflops_per_second: f64,
    agreement_with_full: Option<f64>,
    ndcg10: Option<f64>,
    latency_ratio_to_full: Option<f64>,
    latency_ratio_to_st: Option<f64>,
    stall_seconds_mean: f64,
}

fn report(
    args: &BenchArgs,
    items: &[WorkItem],
    data: Option<&Dl19>,
    results: &[Vec<Vec<WorkResult>>],
    peaks: &[f64],
    threads: usize,
) -> Result<()> {
    let full_i = args
        .compare
        .iter()
        .position(|c| c == "full" || c.starts_with("full@"));
    let st_i = args.compare.iter().position(|c| c == "st");
    let per_query_median = |wi: usize| -> Vec<f64> {
        results[wi]
            .iter()
            .map(|reps| median(&mut reps.iter().map(|r| r.seconds).collect::<Vec<_>>()))
            .collect()
    };
    let medians: Vec<Vec<f64>> = (0..args.compare.len()).map(per_query_median).collect();
    let ranking_of = |wi: usize, qi: usize| -> Vec<usize> {
        let r = &results[wi][qi][0];
        if args.compare[wi] == "st" {
            // st returns all scores in document order.
            let mut idx: Vec<usize> = (0..r.scores.len()).collect();
            idx.sort_by(|&a, &b| r.scores[b].total_cmp(&r.scores[a]).then(a.cmp(&b)));
            idx
        } else {
            r.ranking.clone()
        }
    };
    let mut summaries = Vec::new();
    for (wi, name) in args.compare.iter().enumerate() {
        let m = &medians[wi];
        let sum: f64 = m.iter().sum();
        let ratio_to = |other: Option<usize>| {
            other
                .filter(|&o| o != wi)
                .map(|o| sum / medians[o].iter().sum::<f64>())
        };
        let (cl, clf, flops, stall) =
            results[wi]
                .iter()
                .fold((0u64, 0u64, 0f64, 0f64), |acc, reps| {
                    let r = &reps[0];
                    (
                        acc.0 + r.candidate_layers,
                        acc.1 + r.candidate_layers_full,
                        acc.2 + r.flops,
                        acc.3 + r.stall_seconds,
                    )
                });
        let agreement = full_i.filter(|&f| f != wi).map(|f| {
            items
                .iter()
                .enumerate()
                .map(|(qi, it)| topk_agreement(&ranking_of(wi, qi), &ranking_of(f, qi), it.top_k))
                .sum::<f64>()
                / items.len() as f64
        });
        let ndcg = data.map(|d| {
            items
                .iter()
                .enumerate()
                .map(|(qi, it)| {
                    let cands = d.candidates(&it.query, args.candidates);
                    let ids: Vec<&str> = ranking_of(wi, qi)
                        .iter()
                        .map(|&i| d.doc_ids[cands[i]].as_str())
                        .collect();
                    ndcg_at(&ids, &d.qrels[&it.qid], 10)
                })
                .sum::<f64>()
                / items.len() as f64
        });
        summaries.push(ContenderSummary {
            name: name.clone(),
            median_seconds: median(&mut m.clone()),
            mean_seconds: sum / m.len() as f64,
            peak_rss_mib: peaks[wi],
            candidate_layer_share: if clf > 0 { cl as f64 / clf as f64 } else { 1.0 },
            gflops_per_second: if flops > 0.0 { flops / sum / 1e9 } else { 0.0 },
            agreement_with_full: agreement,
            ndcg10: ndcg,
            latency_ratio_to_full: ratio_to(full_i),
            latency_ratio_to_st: ratio_to(st_i),
            stall_seconds_mean: stall / items.len() as f64,
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "model": args.model.model, "requests": items.len(), "candidates": args.candidates,
                "top_k": args.top_k, "repeats": args.repeats, "threads": threads, "contenders": summaries,
            }))?
        );
        return Ok(());
    }
    println!(
        "model {} | {} requests x {} candidates, K={} | {} repeats, median kept | {} threads",
        args.model.model,
        items.len(),
        args.candidates,
        args.top_k,
        args.repeats,
        threads
    );
    println!(
        "{:<8} {:>10} {:>10} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "mode",
        "median s",
        "mean s",
        "peak MiB",
        "cl-share",
        "GFLOP/s",
        "agree@K",
        "nDCG@10",
        "vs full",
        "vs st",
        "stall s"
    );
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    for s in &summaries {
        println!(
            "{:<8} {:>10.4} {:>10.4} {:>9.0} {:>8.3} {:>8.1} {:>9} {:>8} {:>8} {:>8} {:>8.4}",
            s.name,
            s.median_seconds,
            s.mean_seconds,
            s.peak_rss_mib,
            s.candidate_layer_share,
            s.gflops_per_second,
            opt(s.agreement_with_full, 4),
            opt(s.ndcg10, 4),
            opt(s.latency_ratio_to_full, 3),
            opt(s.latency_ratio_to_st, 3),
            s.stall_seconds_mean
        );
    }
    println!("vs full / vs st: total (sum over requests) of per-request median latency, as a ratio; cl-share: candidate-layers computed / N x layers");
    Ok(())
}
