#!/usr/bin/env bash
# Runs on the GPU machine (through the device tool) from the repository root, with
# device-assets/ (made by scripts/build_cuda.sh) carried along: the CUDA tests in f32, f16 and
# bf16, then the benchmark against HF transformers. Logs and results go to $OUT.
# GRATING_GPU_TESTS=0 skips the tests, GRATING_GPU_BENCH=0 the benchmark (only unpacking then).
set -uo pipefail
out="${OUT:-/tmp/grating-gpu-out}"
mkdir -p "$out"
assets=device-assets
work=/tmp/grating-gpu
rm -rf "$work" && mkdir -p "$work/shared/models" "$work/shared/data" "$work/qwen3-tokenizer"
tar -C "$work" -xJf "$assets/bin.tar.xz"
tar -C "$work/shared/data" -xJf "$assets/dl19.tar.xz"
cp -r "$assets/models/"* "$work/shared/models/"
xz -dc "$assets/qwen3-tokenizer/tokenizer.json.xz" >"$work/qwen3-tokenizer/tokenizer.json"
cp "$assets/qwen3-tokenizer/tokenizer_config.json" "$work/qwen3-tokenizer/"

# The CUDA libraries the binaries link by soname come from the machine's PyTorch wheels.
libdirs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
ldd "$work/bin/grating" | grep -E "cuda|cublas|curand|nvrtc|not found" | tee -a "$out/gpu.txt"

export GRATING_SHARED_DIR="$work/shared" GRATING_TEST_WEIGHTS=f16
status=0
run_tests() { # dtype, log name, filters...
  local dtype=$1 name=$2
  shift 2
  echo "== tests on cuda:0, $dtype" | tee "$out/$name.log"
  GRATING_TEST_DEVICE=cuda:0 GRATING_TEST_DTYPE=$dtype "$work/bin/test-gpu" --test-threads 1 --nocapture "$@" \
    2>&1 | tee -a "$out/$name.log" | grep -E "^test |test result|worst|panicked|SKIPPED|peak GPU"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
if [ "${GRATING_GPU_TESTS:-1}" = 1 ]; then
  run_tests f32 tests-f32
  run_tests f16 tests-f16 parity::
  run_tests bf16 tests-bf16 parity::
fi

if [ "${GRATING_GPU_BENCH:-1}" = 1 ]; then
  PYTHONUNBUFFERED=1 python3 scripts/gpu_bench.py --grating "$work/bin/grating" \
    --bert "$work/shared/models/minilm-l6-msmarco-distilled" \
    --qwen3-tokenizer "$work/qwen3-tokenizer" --data "$work/shared/data/trec-dl19-subset" \
    --out "$work/bench" ${GRATING_GPU_BENCH_ARGS:-} | tee "$out/gpu_bench.md" || status=1
  cp "$work/bench/gpu_bench.json" "$out/" 2>/dev/null
fi
exit $status
