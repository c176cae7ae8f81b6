//! The compute thread count: process-wide, because rayon's global pool and OpenBLAS's thread
//! count are.

/// Sets the number of compute threads for the rayon pool and BLAS. Call once, early; later
/// calls only adjust BLAS.
pub fn set_threads(n: usize) {
    let n = n.max(1);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    #[cfg(feature = "openblas")]
    super::blas::set_threads(n);
}

/// Threads the engine computes with (the rayon pool's size).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
