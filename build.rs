fn main() {
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_some() {
        println!("cargo:rustc-link-lib=openblas");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels();
    }
}

/// Compiles src/ops/kernels.cu to PTX for compute capability 8.0 (bf16 needs it), which the
/// driver JIT-compiles for the GPU at hand (Ampere, Ada, Hopper).
fn compile_kernels() {
    println!("cargo:rerun-if-changed=src/ops/kernels.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args([
            "-ptx",
            "-O3",
            "-std=c++17",
            "-arch=compute_80",
            "src/ops/kernels.cu",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (needed by the cuda feature): {e}"));
    assert!(status.success(), "nvcc failed on src/ops/kernels.cu");
}
