#!/usr/bin/env bash
# Runs on the GPU machine after scripts/device_gpu.sh has unpacked device-assets/ (or with
# GRATING_GPU_BENCH=0 so it only runs the tests): the server load benchmark with streamed
# weights on the GPU, on the Qwen3-Reranker-0.6B-shaped model transformers builds (seed 0).
# GRATING_SERVE_ARGS adds server/bench flags; GRATING_SERVE_TAG names the output files;
# GRATING_SERVE_CONC and GRATING_SERVE_MODES pick concurrency levels and modes; GRATING_SERVE_BIN
# another grating binary (a build from before a change, for a side-by-side comparison).
set -uo pipefail
out="${OUT:-/tmp/grating-gpu-out}"
work=/tmp/grating-gpu
model="$work/qwen3-0.6b-synth"
python3 -c "import sys; sys.path.insert(0, 'scripts'); import gpu_bench; gpu_bench.make_qwen3('$work/qwen3-tokenizer', '$model')" 2>&1 | tail -1
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-$(python3 -c 'import glob,site; print(":".join(sorted({p.rsplit("/",1)[0] for sp in site.getsitepackages() for p in glob.glob(sp+"/nvidia/**/libcublas.so.13", recursive=True)})))')}"
"${GRATING_SERVE_BIN:-$work/bin/grating}" bench-serve --model "$model" --device cuda:0 --weights stream \
  --data "$work/shared/data/trec-dl19-subset" --concurrency "${GRATING_SERVE_CONC:-1,4,16}" --modes "${GRATING_SERVE_MODES:-shared,sequential}" --top-n 10 \
  --requests "${GRATING_SERVE_REQUESTS:-32}" --max-seconds 40 --alone-runs "${GRATING_SERVE_ALONE:-3}" ${GRATING_SERVE_ARGS:-} \
  --json "$out/serve_${GRATING_SERVE_TAG:-gpu}.json" 2>&1 | tee "$out/serve_${GRATING_SERVE_TAG:-gpu}.md"
