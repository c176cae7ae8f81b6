//! `grating bench-serve`: a bounded load benchmark of the server on loopback. For each mode
//! (layer sharing, then one request after another) it starts an in-process server, times every
//! small request the levels will send alone, then runs closed-loop clients at each concurrency
//! with a fixed mix of request sizes (BM25 candidates from the TREC DL19 subset) and prints
//! throughput, p50/p99 latencies, and how much slower each small request was under load than
//! alone.

use super::common::{BatchArgs, ModelArgs};
use super::serve::ServerArgs;
use anyhow::{bail, Context, Result};
use clap::Args;

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
    /// Times each small request of the levels is timed alone (after one untimed warm-up run);
    /// its median is its latency alone. With one run, a single slow run (the machine's noise)
    /// sets a request's latency alone, and the p99 over them is near their maximum.
    #[arg(long, default_value_t = 3)]
    pub alone_runs: usize,
    /// Modes to run: shared, sequential.
    #[arg(long, value_delimiter = ',', default_value = "shared,sequential")]
    pub modes: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the server's self-calibration state (from /info) once a second during the levels
    /// here, one JSON object per line: seconds since the mode's start, requests sent, samples
    /// re-run, measured agreement and its interval, the margin
    /// (`scripts/plot_calibration.py` draws it).
    #[arg(long)]
    pub calibration_trace: Option<PathBuf>,
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
    /// The same small requests' latencies alone (each timed alone before the levels).
    small_alone_p50_ms: f64,
    small_alone_p99_ms: f64,
    /// Per small request: its latency under load over its own latency alone.
    small_slowdown_p50: f64,
    small_slowdown_p99: f64,
    sharing_factor: f64,
    /// Steps that obtained (streamed: read) their layer, and of those, how many found it read
    /// ahead; seconds steps waited for layer reads.
    layer_loads: u64,
    read_ahead_hits: u64,
    stall_seconds: f64,
    /// Seconds the reader threads spent reading those layers (mostly overlapped with
    /// computation); over `layer_loads`, a layer read's duration under this load.
    read_seconds: f64,
    /// Steps run, and tokens times layers computed.
    steps: u64,
    token_layers: u64,
    /// Seconds spent embedding requests (embedder thread), and obtaining layers and running
    /// them (scheduler thread).
    embed_seconds: f64,
    obtain_seconds: f64,
    compute_seconds: f64,
}

/// The mean duration of a streamed layer read, for the progress lines.
fn read_time(read_seconds: f64, loads: u64) -> String {
    if read_seconds > 0.0 && loads > 0 {
        format!("{:.2} ms per layer read", read_seconds * 1e3 / loads as f64)
    } else {
        "no streamed layer reads".to_string()
    }
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
    let data =
        Dl19::load(&args.data).with_context(|| format!("loading {}", args.data.display()))?;
    let reranker = Arc::new(args.model.load(&BatchArgs::default())?);
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
    // Request number j of a level: (query, size slot).
    let request = |j: usize| ((j / args.sizes.len()) % nq, j % args.sizes.len());
    let mut levels = Vec::new();
    let trace: Mutex<Vec<String>> = Mutex::new(Vec::new());
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
        let mode_start = Instant::now();
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
        // Every small request the levels send, timed alone after an untimed run of it (so its
        // embedding rows are as warm as under load, where it has run before).
        let max_total = args
            .concurrency
            .iter()
            .map(|&c| args.requests.max(c))
            .max()
            .unwrap_or(0);
        let small_queries: Vec<usize> = {
            let mut q: Vec<usize> = (0..max_total)
                .map(request)
                .filter(|&(_, slot)| args.sizes[slot] == small)
                .map(|(q, _)| q)
                .collect();
            q.sort_unstable();
            q.dedup();
            q
        };
        let mut alone = vec![f64::NAN; nq];
        let counters = server.state.engine().counters();
        // Engine counters, differenced around the alone runs and each level.
        let snapshot = || {
            [
                counters.steps.load(Ordering::Relaxed),
                counters.request_steps.load(Ordering::Relaxed),
                counters.layer_loads.load(Ordering::Relaxed),
                counters.read_ahead_hits.load(Ordering::Relaxed),
                counters.stall_micros.load(Ordering::Relaxed),
                counters.token_layers.load(Ordering::Relaxed),
                counters.embed_micros.load(Ordering::Relaxed),
                counters.obtain_micros.load(Ordering::Relaxed),
                counters.compute_micros.load(Ordering::Relaxed),
                counters.read_micros.load(Ordering::Relaxed),
            ]
        };
        let delta = |before: [u64; 10]| -> [u64; 10] {
            let after = snapshot();
            std::array::from_fn(|i| after[i].saturating_sub(before[i]))
        };
        let alone_before = snapshot();
        for &q in &small_queries {
            let body = &bodies[q][0];
            send(body)?;
            let mut times: Vec<f64> = Vec::new();
            for _ in 0..args.alone_runs.max(1) {
                times.push(send(body)?.1);
            }
            alone[q] = percentile(&mut times, 50.0);
        }
        let mut all_alone: Vec<f64> = small_queries.iter().map(|&q| alone[q]).collect();
        let [_, _, alone_loads, _, _, _, _, _, _, alone_read] = delta(alone_before);
        eprintln!(
            "[{mode}] {} small requests ({small} candidates) alone: p50 {:.0} ms, p99 {:.0} ms, {}",
            small_queries.len(),
            percentile(&mut all_alone.clone(), 50.0),
            percentile(&mut all_alone, 99.0),
            read_time(alone_read as f64 * 1e-6, alone_loads)
        );
        for &c in &args.concurrency {
            let total = args.requests.max(c);
            let next = AtomicUsize::new(0);
            // (request number, status, latency ms)
            let results: Mutex<Vec<(usize, u16, f64)>> = Mutex::new(Vec::new());
            let before = snapshot();
            let start = Instant::now();
            let limit = Duration::from_secs_f64(args.max_seconds);
            let done = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                let clients: Vec<_> = (0..c)
                    .map(|_| {
                        s.spawn(|| loop {
                            let j = next.fetch_add(1, Ordering::Relaxed);
                            if j >= total || start.elapsed() > limit {
                                break;
                            }
                            let (q, slot) = request(j);
                            let body = &bodies[q][slot];
                            let r = send(body).unwrap_or((0, f64::NAN));
                            results.lock().expect("results").push((j, r.0, r.1));
                        })
                    })
                    .collect();
                if args.calibration_trace.is_some() {
                    s.spawn(|| {
                        while !done.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_secs(1));
                            let sent = next.load(Ordering::Relaxed).min(total);
                            if let Some(line) = calibration_point(addr, mode, c, &mode_start, sent)
                            {
                                trace.lock().expect("trace").push(line);
                            }
                        }
                    });
                }
                for h in clients {
                    let _ = h.join();
                }
                done.store(true, Ordering::Relaxed);
            });
            let secs = start.elapsed().as_secs_f64();
            let [steps, rsteps, loads, hits, stall, token_layers, embed, obtain, compute, read] =
                delta(before);
            let res = results.into_inner().expect("results");
            let ok: Vec<&(usize, u16, f64)> = res.iter().filter(|r| r.1 == 200).collect();
            let mut all: Vec<f64> = ok.iter().map(|r| r.2).collect();
            let small_ok: Vec<(f64, f64)> = ok
                .iter()
                .map(|r| (request(r.0), r.2))
                .filter(|&((_, slot), _)| args.sizes[slot] == small)
                .map(|((q, _), ms)| (ms, alone[q]))
                .collect();
            let mut sm: Vec<f64> = small_ok.iter().map(|r| r.0).collect();
            let mut sm_alone: Vec<f64> = small_ok.iter().map(|r| r.1).collect();
            let mut slowdown: Vec<f64> = small_ok.iter().map(|r| r.0 / r.1).collect();
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
                small_alone_p50_ms: percentile(&mut sm_alone, 50.0),
                small_alone_p99_ms: percentile(&mut sm_alone, 99.0),
                small_slowdown_p50: percentile(&mut slowdown, 50.0),
                small_slowdown_p99: percentile(&mut slowdown, 99.0),
                sharing_factor: if steps > 0 {
                    rsteps as f64 / steps as f64
                } else {
                    0.0
                },
                layer_loads: loads,
                read_ahead_hits: hits,
                stall_seconds: stall as f64 * 1e-6,
                read_seconds: read as f64 * 1e-6,
                steps,
                token_layers,
                embed_seconds: embed as f64 * 1e-6,
                obtain_seconds: obtain as f64 * 1e-6,
                compute_seconds: compute as f64 * 1e-6,
            };
            eprintln!(
                "[{mode}] c={c}: {} ok, {} errors in {secs:.1}s, {:.2} req/s, p50 {:.0} ms, p99 {:.0} ms, small p99 {:.0} ms, {}",
                l.requests, l.errors, l.throughput_rps, l.p50_ms, l.p99_ms, l.small_p99_ms,
                read_time(l.read_seconds, l.layer_loads)
            );
            levels.push(l);
        }
        server.stop()?;
    }
    println!(
        "sizes {:?} (cycled), top_n {}, step tokens {}, queue order {}, weights {}, {} requests per level",
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
        "{:<11} {:>4} {:>5} {:>4} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>6} {:>7} {:>6} {:>7}",
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
        "alone_p50",
        "alone_p99",
        "slow_p50",
        "slow_p99",
        "share",
        "loads",
        "ahead",
        "stall_s"
    );
    for l in &levels {
        println!(
            "{:<11} {:>4} {:>5} {:>4} {:>6.1} {:>7.2} {:>7.0} {:>7.0} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>9.2} {:>9.2} {:>6.2} {:>7} {:>6} {:>7.2}",
            l.mode, l.concurrency, l.requests, l.errors, l.seconds, l.throughput_rps, l.p50_ms, l.p99_ms,
            l.small_p50_ms, l.small_p99_ms, l.small_alone_p50_ms, l.small_alone_p99_ms,
            l.small_slowdown_p50, l.small_slowdown_p99, l.sharing_factor, l.layer_loads,
            l.read_ahead_hits, l.stall_seconds
        );
    }
    for &c in &args.concurrency {
        let get = |m: &str| levels.iter().find(|l| l.mode == m && l.concurrency == c);
        if let (Some(s), Some(q)) = (get("shared"), get("sequential")) {
            println!(
                "c={c}: throughput shared/sequential {:.2}x; small p99 under load / the same requests' p99 alone: shared {:.2}x, sequential {:.2}x; per-request slowdown p99: shared {:.2}x, sequential {:.2}x",
                s.throughput_rps / q.throughput_rps,
                s.small_p99_ms / s.small_alone_p99_ms,
                q.small_p99_ms / q.small_alone_p99_ms,
                s.small_slowdown_p99,
                q.small_slowdown_p99
            );
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&levels)?)?;
    }
    if let Some(p) = &args.calibration_trace {
        let lines = trace.into_inner().expect("trace");
        if lines.is_empty() {
            eprintln!("no self-calibration state to trace (is --calibration-sample 0, or the rule not margin?)");
        }
        std::fs::write(p, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// One line of the calibration trace: the server's /info calibration with the time and the
/// requests sent so far; `None` when the server has no self-calibration.
fn calibration_point(
    addr: std::net::SocketAddr,
    mode: &str,
    concurrency: usize,
    since: &Instant,
    sent: usize,
) -> Option<String> {
    let info = client::get(addr, "/info", &[]).ok()?.json().ok()?;
    let cal = info.get("calibration")?.clone();
    Some(
        serde_json::json!({
            "mode": mode,
            "concurrency": concurrency,
            "seconds": since.elapsed().as_secs_f64(),
            "requests_sent": sent,
            "calibration": cal,
        })
        .to_string(),
    )
}
