//! The `grating` command line: rerank, evaluate, calibrate and benchmark.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "grating",
    version,
    about = "Fast, memory-bounded top-K selection with cross-encoder rerankers"
)]
struct Cli {
    /// Log as JSON lines (one object per event, with span fields such as request_id).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rank a documents file against one query and print the top K.
    Rerank(cli::rerank::RerankArgs),
    /// Evaluate grating against full inference out of fold: agreement, nDCG, compute share and
    /// latency ratio, on a TREC DL / BEIR directory or a jsonl of requests.
    Eval(cli::eval::EvalArgs),
    /// Calibrate the pruning rule on sample requests (reported out of fold) and save it as the
    /// model's profile; or, with --scores, what the model's scores mean.
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Measure latency and peak memory of modes side by side in one run.
    Bench(cli::bench::BenchArgs),
    /// Write a random-weight checkpoint with a published reranker's configuration.
    SynthModel(cli::synth::SynthArgs),
    /// Copy a model with its weights converted to another dtype (e.g. an f16 copy).
    Convert(cli::synth::ConvertArgs),
    /// Internal: one benchmark contender serving requests on stdin.
    #[command(hide = true)]
    BenchWorker(cli::bench::WorkerArgs),
    /// Serve the Cohere/Jina (/v1/rerank, /v2/rerank) and TEI (/rerank) APIs over HTTP.
    #[cfg(feature = "server")]
    Serve(cli::serve::ServeArgs),
    /// Load benchmark of the server on loopback: layer sharing against one-at-a-time.
    #[cfg(feature = "server")]
    BenchServe(cli::bench_serve::BenchServeArgs),
}

fn main() {
    let cli = Cli::parse();
    // The server logs each request at info; the batch commands stay quiet unless asked.
    let default_level = match &cli.command {
        #[cfg(feature = "server")]
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRATING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let result = match cli.command {
        Command::Rerank(a) => cli::rerank::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Calibrate(a) => cli::calibrate::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::BenchWorker(a) => cli::bench::worker(a),
        Command::SynthModel(a) => cli::synth::run(a),
        Command::Convert(a) => cli::synth::run_convert(a),
        #[cfg(feature = "server")]
        Command::Serve(a) => cli::serve::run(a),
        #[cfg(feature = "server")]
        Command::BenchServe(a) => cli::bench_serve::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
