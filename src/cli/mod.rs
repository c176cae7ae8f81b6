//! Subcommands of the `grating` binary. They use the library's public API only.

#[cfg(feature = "server")]
pub mod bench_serve;
pub mod common;
pub mod docs;
pub mod rerank;
#[cfg(feature = "server")]
pub mod serve;
