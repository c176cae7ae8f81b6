//! The `grating` command line: rerank, evaluate, calibrate and benchmark.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "grating", version, about = "Fast, memory-bounded top-K selection with cross-encoder rerankers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rank a documents file against one query and print the top K.
    Rerank(cli::rerank::RerankArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GRATING_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Rerank(a) => cli::rerank::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
