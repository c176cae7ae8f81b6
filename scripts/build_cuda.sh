#!/usr/bin/env bash
# Builds `grating --features cuda` on a machine without a GPU, reproducibly, and packs what the
# GPU machine needs (the binary, the CUDA test binaries, an f16 copy of the shared BERT model)
# into device-assets/ (git-ignored), small enough to travel with the device tool (64 MiB).
#
# The CUDA toolkit comes from NVIDIA's PyPI wheels, pinned to the 13.0 series because the GPU
# machine's driver is CUDA 13.0 and PTX from a newer nvcc does not load there. The CUDA
# libraries (cuBLAS, cuRAND, NVRTC, cudart, the driver) are linked by soname and loaded at run
# time from the GPU machine; libcuda is only needed at link time, so a stub generated from the
# symbol list of the bindings stands in for it here.
#
# Usage: bash scripts/build_cuda.sh [--no-pack | --clippy]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
toolchain="$root/.cuda-toolchain"
cuda="$toolchain/nvidia/cu13"
# sm_90: the H100/H200 the device tool lends.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if [ ! -x "$cuda/bin/nvcc" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$toolchain" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-runtime==13.0.88 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi

# Unversioned names for the linker, and the link-time driver stub.
linklib="$toolchain/linklib"
mkdir -p "$linklib"
for lib in cublas cublasLt curand nvrtc cudart; do
  so=$(cd "$cuda/lib" && ls "lib$lib.so."* | grep -v alt | sort | head -1)
  ln -sf "$cuda/lib/$so" "$linklib/lib$lib.so"
done
if [ ! -f "$linklib/libcuda.so" ]; then
  cudarc_src=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"))')
  cudarc_dir=$(dirname "$cudarc_src")
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc_dir/src/driver/sys/mod.rs" | sort -u |
    awk '{print "void " $4 "(void) {}"}' >"$linklib/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$linklib/libcuda.so" "$linklib/cuda_stub.c"
fi

export PATH="$cuda/bin:$PATH"
export CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export LIBRARY_PATH="$linklib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$linklib"
export CARGO_TARGET_DIR="$root/target/cuda"
nvcc --version | tail -2

if [ "${1:-}" = "--clippy" ]; then
  exec cargo clippy --release --no-default-features --features cuda,server --all-targets -- -D warnings
fi

# No OpenBLAS: the GPU machine does not have it (CPU f32 GEMMs fall back to the gemm crate).
cargo build --release --no-default-features --features cuda,server --bin grating
cargo test --release --no-default-features --features cuda,server --no-run --test gpu 2>&1 |
  tee "$CARGO_TARGET_DIR/test-build.log"

[ "${1:-}" = "--no-pack" ] && exit 0

# Pack for the device: stripped binaries, xz-compressed.
assets="$root/device-assets"
rm -rf "$assets" && mkdir -p "$assets/bin"
cp "$CARGO_TARGET_DIR/release/grating" "$assets/bin/grating"
exe=$(grep -o "target/cuda/release/deps/gpu-[0-9a-f]*" "$CARGO_TARGET_DIR/test-build.log" | tail -1)
cp "$root/$exe" "$assets/bin/test-gpu"
strip "$assets/bin/"*
tar -C "$assets" -cJf "$assets/bin.tar.xz" bin && rm -rf "$assets/bin"
# An f16 copy of each shared model the GPU tests use (87 MB of f32 would not travel).
for model in minilm-l6-msmarco-distilled; do
  src="$root/../shared/models/$model"
  [ -d "$src" ] || continue
  "$CARGO_TARGET_DIR/release/grating" convert --model "$src" --dtype f16 --out "$assets/models/$model" 2>/dev/null ||
    target/release/grating convert --model "$src" --dtype f16 --out "$assets/models/$model"
  cp "$src"/reference_scores.jsonl "$assets/models/$model/" 2>/dev/null || true
done
# The Qwen3 tokenizer (for the synthetic Qwen3-0.6B the GPU benchmark builds) and the DL19
# passages the benchmark cuts its documents from.
mkdir -p "$assets/qwen3-tokenizer"
xz -T2 -9 -c "$root/../shared/tokenizers/qwen3/tokenizer.json" >"$assets/qwen3-tokenizer/tokenizer.json.xz"
cp "$root/../shared/tokenizers/qwen3/tokenizer_config.json" "$assets/qwen3-tokenizer/"
tar -C "$root/../shared/data" -cJf "$assets/dl19.tar.xz" trec-dl19-subset
du -sh "$assets"
