//! Measures f32 GEMM throughput of candle's built-in matmul against the system OpenBLAS, at
//! the shapes of a MiniLM layer, to choose the CPU GEMM path by measurement.
use candle_core::{Device, Tensor};
use std::time::Instant;

extern "C" {
    fn cblas_sgemm(
        layout: i32, ta: i32, tb: i32, m: i32, n: i32, k: i32, alpha: f32, a: *const f32,
        lda: i32, b: *const f32, ldb: i32, beta: f32, c: *mut f32, ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(m, k, n) in &[(4096usize, 384usize, 1536usize), (4096, 1536, 384), (4096, 384, 384), (256, 32, 256)] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let flops = 2.0 * (m * n * k) as f64;
        let wt = w.t()?;
        let _ = a.matmul(&wt)?;
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps { let _ = a.matmul(&wt)?; }
        let candle = flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
        let av: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let mut c = vec![0f32; m * n];
        unsafe { openblas_set_num_threads(2) };
        let t = Instant::now();
        for _ in 0..reps {
            unsafe { cblas_sgemm(101, 111, 112, m as i32, n as i32, k as i32, 1.0, av.as_ptr(), k as i32, wv.as_ptr(), k as i32, 0.0, c.as_mut_ptr(), n as i32) };
        }
        let blas = flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("m={m} k={k} n={n}: candle {candle:.1} GFLOP/s, openblas {blas:.1} GFLOP/s");
    }
    Ok(())
}
