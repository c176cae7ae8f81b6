//! `grating bench-serve`: a bounded load benchmark of the server on loopback. For each mode
//! (layer sharing, then one request after another) it starts an in-process server, measures a
//! small request alone, then runs closed-loop clients at each concurrency with a fixed mix of
//! request sizes (BM25 candidates from the TREC DL19 subset) and prints throughput and p50/p99
//! latencies.

use super::common::ModelArgs;
use super::serve::ServerArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use grating::engine::Reranker;
use grating::eval::dl19::Dl19;
use grating::server::{client, RunningServer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// The TREC DL19 subset directory (corpus.jsonl, queries.jsonl, qrels.tsv).
    #[arg(long)]
    pub data: PathBuf,
    /// Candidates per request, cycled through in this order (the first is the "small" one).
    #[arg(long, value_delimiter = ',', default_value = "20,100,20,300")]
    pub sizes: Vec<usize>,
    /// Concurrency levels (closed-loop clients).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// top_n of every request.
    #[arg(long, default_value_t = 10)]
    pub top_n: usize,
    /// Requests per concurrency level (at least the concurrency).
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Upper bound on one level's duration in seconds (no new requests after it).
    #[arg(long, default_value_t = 120.0)]
    pub max_seconds: f64,
    /// Times the small request is run alone to get its reference latency.
    #[arg(long, default_value_t = 5)]
    pub alone_runs: usize,
    /// Modes to run: shared, sequential.
    #[arg(long, value_delimiter = ',', default_value = "shared,sequential")]
    pub modes: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Level {
    mode: String,
    concurrency: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    throughput_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    small_p50_ms: f64,
    small_p99_ms: f64,
    small_alone_p50_ms: f64,
    sharing_factor: f64,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    if args.sizes.is_empty() || args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--sizes and --concurrency need positive values");
    }
    let opts = args.model.engine_options()?;
    let data =
        Dl19::load(&args.data).with_context(|| format!("loading {}", args.data.display()))?;
    let reranker = Arc::new(Reranker::load(&args.model.model, &opts)?);
    // One body per (query, size): BM25 top-`size` passages of the query.
    let max_size = *args.sizes.iter().max().unwrap_or(&1);
    let bodies: Vec<Vec<String>> = data
        .queries
        .iter()
        .map(|(_, q)| {
            let cands = data.candidates(q, max_size);
            args.sizes
                .iter()
                .map(|&n| {
                    let docs: Vec<&str> = cands
                        .iter()
                        .take(n)
                        .map(|&d| data.doc_texts[d].as_str())
                        .collect();
                    serde_json::json!({"query": q, "documents": docs, "top_n": args.top_n})
                        .to_string()
                })
                .collect()
        })
        .collect();
    let nq = bodies.len();
    let small = args.sizes[0];
    let mut levels = Vec::new();
    for mode in &args.modes {
        let mut server_args = args.server.clone();
        server_args.no_layer_sharing = match mode.as_str() {
            "shared" => false,
            "sequential" => true,
            m => bail!("unknown mode {m:?} (shared, sequential)"),
        };
        let cfg = server_args.config(&reranker, None)?;
        let server = RunningServer::start(reranker.clone(), cfg, "127.0.0.1:0", 2)?;
        let addr = server.addr;
        let send = |body: &str| -> Result<(u16, f64)> {
            let t = Instant::now();
            let r = client::request(
                addr,
                "POST",
                "/v1/rerank",
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )?;
            Ok((r.status, t.elapsed().as_secs_f64() * 1e3))
        };
        // Warm-up (each request the alone runs use, so that embedding rows and layers are as
        // warm as under load), then the small request alone.
        for body in bodies.iter().take(args.alone_runs.max(1)) {
            send(&body[0])?;
        }
        let mut alone: Vec<f64> = Vec::new();
        for i in 0..args.alone_runs.max(1) {
            alone.push(send(&bodies[i % nq][0])?.1);
        }
        let alone_p50 = percentile(&mut alone, 50.0);
        eprintln!("[{mode}] small request ({small} candidates) alone: p50 {alone_p50:.0} ms");
        for &c in &args.concurrency {
            let total = args.requests.max(c);
            let next = AtomicUsize::new(0);
            let results: Mutex<Vec<(usize, u16, f64)>> = Mutex::new(Vec::new());
            let counters = server.state.engine().counters();
            let steps0 = counters.steps.load(Ordering::Relaxed);
            let rsteps0 = counters.request_steps.load(Ordering::Relaxed);
            let start = Instant::now();
            let limit = Duration::from_secs_f64(args.max_seconds);
            std::thread::scope(|s| {
                for _ in 0..c {
                    s.spawn(|| loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        if j >= total || start.elapsed() > limit {
                            break;
                        }
                        let size_slot = j % args.sizes.len();
                        let body = &bodies[(j / args.sizes.len()) % nq][size_slot];
                        let r = send(body).unwrap_or((0, f64::NAN));
                        results.lock().expect("results").push((size_slot, r.0, r.1));
                    });
                }
            });
            let secs = start.elapsed().as_secs_f64();
            let res = results.into_inner().expect("results");
            let ok: Vec<&(usize, u16, f64)> = res.iter().filter(|r| r.1 == 200).collect();
            let mut all: Vec<f64> = ok.iter().map(|r| r.2).collect();
            let mut sm: Vec<f64> = ok
                .iter()
                .filter(|r| args.sizes[r.0] == small)
                .map(|r| r.2)
                .collect();
            let steps = counters.steps.load(Ordering::Relaxed) - steps0;
            let rsteps = counters.request_steps.load(Ordering::Relaxed) - rsteps0;
            let l = Level {
                mode: mode.clone(),
                concurrency: c,
                requests: ok.len(),
                errors: res.len() - ok.len(),
                seconds: secs,
                throughput_rps: ok.len() as f64 / secs,
                p50_ms: percentile(&mut all, 50.0),
                p99_ms: percentile(&mut all, 99.0),
                small_p50_ms: percentile(&mut sm, 50.0),
                small_p99_ms: percentile(&mut sm, 99.0),
                small_alone_p50_ms: alone_p50,
                sharing_factor: if steps > 0 {
                    rsteps as f64 / steps as f64
                } else {
                    0.0
                },
            };
            eprintln!(
                "[{mode}] c={c}: {} ok, {} errors in {secs:.1}s, {:.2} req/s, p50 {:.0} ms, p99 {:.0} ms, small p99 {:.0} ms",
                l.requests, l.errors, l.throughput_rps, l.p50_ms, l.p99_ms, l.small_p99_ms
            );
            levels.push(l);
        }
        server.stop()?;
    }
    println!(
        "sizes {:?} (cycled), top_n {}, step tokens {}, queue order {:?}, weights {}, {} requests per level",
        args.sizes,
        args.top_n,
        args.server.step_tokens,
        args.server.queue_order,
        if args.server.reload_layers {
            "reloaded per step".to_string()
        } else {
            format!("{:?}", reranker.weights_mode()).to_lowercase()
        },
        args.requests
    );
    println!(
        "{:<11} {:>4} {:>5} {:>4} {:>7} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10} {:>7}",
        "mode",
        "conc",
        "ok",
        "err",
        "secs",
        "req/s",
        "p50_ms",
        "p99_ms",
        "small_p50",
        "small_p99",
        "small_alone",
        "share"
    );
    for l in &levels {
        println!(
            "{:<11} {:>4} {:>5} {:>4} {:>7.1} {:>8.2} {:>8.0} {:>8.0} {:>10.0} {:>10.0} {:>10.0} {:>7.2}",
            l.mode, l.concurrency, l.requests, l.errors, l.seconds, l.throughput_rps, l.p50_ms, l.p99_ms,
            l.small_p50_ms, l.small_p99_ms, l.small_alone_p50_ms, l.sharing_factor
        );
    }
    for &c in &args.concurrency {
        let get = |m: &str| levels.iter().find(|l| l.mode == m && l.concurrency == c);
        if let (Some(s), Some(q)) = (get("shared"), get("sequential")) {
            println!(
                "c={c}: throughput shared/sequential {:.2}x; small p99 / small alone: shared {:.2}x, sequential {:.2}x",
                s.throughput_rps / q.throughput_rps,
                s.small_p99_ms / s.small_alone_p50_ms,
                q.small_p99_ms / q.small_alone_p50_ms
            );
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&levels)?)?;
    }
    Ok(())
}
