//! Which GPU code paths run grating's own kernels and which fall back to candle's generic ops.
//!
//! The choice is process-wide, like the thread count: it exists to compare the two
//! implementations of a whole run (a benchmark, a numerics check), so every model, request and
//! thread of the process must see the same kernels. The ops consult it once per call on the hot
//! path, hence one atomic load rather than a lock.

use std::sync::atomic::{AtomicU8, Ordering};

/// A GPU code path that can be switched back to candle's generic ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPath {
    /// cuBLASLt linear layers (otherwise candle's cuBLAS matmul).
    Gemm,
    /// Flash attention (otherwise the length-bucketed kernels).
    Attention,
    /// Fused residual add + RMSNorm (otherwise candle's add and norm).
    Norm,
}

impl GpuPath {
    /// Every path, in the order the list syntax names them.
    pub const ALL: [GpuPath; 3] = [GpuPath::Gemm, GpuPath::Attention, GpuPath::Norm];

    /// The name used in a path list.
    pub fn name(self) -> &'static str {
        match self {
            GpuPath::Gemm => "gemm",
            GpuPath::Attention => "attention",
            GpuPath::Norm => "norm",
        }
    }

    /// Parses a comma-separated list such as `gemm,attention,norm` (any subset, any case,
    /// spaces allowed) or `all`; an empty list names no path. An unknown name is an error, so a
    /// typo does not silently leave the fast path on.
    pub fn parse_list(list: &str) -> Result<Vec<GpuPath>, String> {
        let mut out = Vec::new();
        for item in list.split(',').map(|p| p.trim().to_ascii_lowercase()) {
            let paths: &[GpuPath] = match item.as_str() {
                "" => &[],
                "all" => &GpuPath::ALL,
                name => match GpuPath::ALL.iter().find(|p| p.name() == name) {
                    Some(p) => std::slice::from_ref(p),
                    None => {
                        return Err(format!(
                            "unknown GPU path {name:?} (expected gemm, attention, norm or all)"
                        ))
                    }
                },
            };
            for &p in paths {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Bits of the paths switched to candle's generic ops; none by default.
static GENERIC: AtomicU8 = AtomicU8::new(0);

/// Runs `paths` through candle's generic ops instead of grating's kernels, for the whole
/// process, from the next op on (an empty slice restores every fast path). Without a call all
/// fast paths are on. Set it before the first forward pass: a pass in flight may see the
/// change between two layers.
pub fn set_generic_gpu_paths(paths: &[GpuPath]) {
    let bits = paths.iter().fold(0, |acc, p| acc | p.bit());
    GENERIC.store(bits, Ordering::Relaxed);
}

/// Whether `path` runs grating's own kernel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn gpu_path_enabled(path: GpuPath) -> bool {
    GENERIC.load(Ordering::Relaxed) & path.bit() == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_list_accepts_the_variable_syntax() {
        use GpuPath::*;
        assert_eq!(GpuPath::parse_list(""), Ok(vec![]));
        assert_eq!(GpuPath::parse_list("all"), Ok(vec![Gemm, Attention, Norm]));
        assert_eq!(GpuPath::parse_list(" Norm, gemm ,"), Ok(vec![Norm, Gemm]));
        assert_eq!(
            GpuPath::parse_list("gemm,attention,norm"),
            Ok(vec![Gemm, Attention, Norm])
        );
        assert!(GpuPath::parse_list("gemm,flash").is_err());
    }

    #[test]
    fn setting_switches_paths() {
        // The only test touching the global: it restores the default before returning.
        assert!(GpuPath::ALL.iter().all(|&p| gpu_path_enabled(p)));
        set_generic_gpu_paths(&[GpuPath::Norm]);
        assert!(!gpu_path_enabled(GpuPath::Norm));
        assert!(gpu_path_enabled(GpuPath::Gemm) && gpu_path_enabled(GpuPath::Attention));
        set_generic_gpu_paths(&[]);
        assert!(GpuPath::ALL.iter().all(|&p| gpu_path_enabled(p)));
    }
}
