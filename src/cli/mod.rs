//! Subcommands of the `grating` binary. They use the library's public API only.

pub mod bench;
#[cfg(feature = "server")]
pub mod bench_serve;
pub mod calibrate;
pub mod calibrate_scores;
pub mod common;
pub mod docs;
pub mod eval;
pub mod rerank;
#[cfg(feature = "server")]
pub mod serve;
pub mod synth;
