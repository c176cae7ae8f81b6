//! The two CBLAS entry points grating uses from the system OpenBLAS (linked in build.rs).

pub const ROW_MAJOR: i32 = 101;
pub const NO_TRANS: i32 = 111;
pub const TRANS: i32 = 112;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    pub fn cblas_sgemm(
        layout: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

pub fn set_threads(n: usize) {
    // SAFETY: the declaration above matches OpenBLAS's `void openblas_set_num_threads(int)`;
    // it takes a plain integer (clamped to i32's range here) and changes only OpenBLAS's own
    // thread-count state, which it synchronises itself.
    unsafe { openblas_set_num_threads(n.min(i32::MAX as usize) as i32) }
}
