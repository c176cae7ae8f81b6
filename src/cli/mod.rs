//! Subcommands of the `grating` binary. They use the library's public API only.

pub mod bench;
pub mod calibrate;
pub mod common;
pub mod docs;
pub mod eval;
pub mod rerank;
pub mod synth;
