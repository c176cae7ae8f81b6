//! `grating synth-model`: a random-weight checkpoint with a published model's configuration.

use anyhow::Result;
use clap::Args;
use grating::synth::{convert, write_model, DiskDtype, Shape};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// qwen3-reranker-0.6b, qwen3-reranker-4b, qwen3-reranker-8b or bge-reranker-v2-m3.
    #[arg(long)]
    pub like: Shape,
    #[arg(long)]
    pub out: PathBuf,
    /// On-disk dtype: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: DiskDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json to ship with the model (default: the real Qwen3 tokenizer in
    /// ../shared/tokenizers/qwen3 for Qwen3 shapes, the XLM-R test fixture's for bge).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let tokenizer = args.tokenizer.clone().unwrap_or_else(|| {
        if args.like.is_qwen3() {
            PathBuf::from("../shared/tokenizers/qwen3/tokenizer.json")
        } else {
            PathBuf::from("tests/fixtures/xlm-roberta-tiny/tokenizer.json")
        }
    });
    let path = write_model(args.like, args.dtype, args.seed, &tokenizer, &args.out)?;
    let bytes = std::fs::metadata(&path)?.len();
    eprintln!(
        "wrote {} ({:.1} MiB); random weights: for speed and memory only",
        path.display(),
        bytes as f64 / 1048576.0
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Target dtype of floating tensors: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: DiskDtype,
}

pub fn run_convert(args: ConvertArgs) -> Result<()> {
    let path = convert(&args.model, &args.out, args.dtype)?;
    let bytes = std::fs::metadata(&path)?.len();
    eprintln!(
        "wrote {} ({:.1} MiB)",
        path.display(),
        bytes as f64 / 1048576.0
    );
    Ok(())
}
