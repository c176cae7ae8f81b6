//! Settings that hold for the whole process, not one reranker: the compute thread pool and the
//! accelerator kernel switches. Kernels are chosen per process, as the thread count is, so
//! these are applied once, at load, from the options a caller gave.

use super::EngineOptions;
use crate::error::Result;

/// Applies `opts`' process-wide settings.
pub(super) fn apply(opts: &EngineOptions) -> Result<()> {
    if let Some(n) = opts.threads {
        crate::ops::set_threads(n);
    }
    if let Some(paths) = &opts.generic_gpu_paths {
        crate::ops::set_generic_gpu_paths(paths);
    }
    if let Some(on) = opts.stage_profile {
        crate::ops::set_stage_profile(on);
    }
    Ok(())
}
