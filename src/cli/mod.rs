//! Subcommands of the `grating` binary. They use the library's public API only.

pub mod common;
pub mod docs;
pub mod rerank;
