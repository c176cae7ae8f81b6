#!/usr/bin/env python3
"""Where the time of a GPU request goes: per-layer compute and weight-stream stalls of
streamed runs, and the stage shares of one resident Qwen3 layer (GRATING_STAGE_PROFILE=1).

Runs after scripts/gpu_bench.py, on the files it left in its --out directory (the synthetic
Qwen3-0.6B and the N-document inputs), on the GPU machine:
  python3 scripts/gpu_profile.py --grating BIN --bench-dir DIR --bert DIR [--n 100]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

QUERY = "what is the daily life of a honey bee colony like"


def rerank(binary, model, docs, mode, weights, chunk, repeats, env=None):
    cmd = [binary, "rerank", "--model", model, "--device", "cuda:0", "--dtype", "bf16",
           "--query", QUERY, "--docs", docs, "--mode", mode, "--weights", weights,
           "--top-k", "10", "--repeats", str(repeats), "--json", "--batch-size", "100000",
           "--chunk-tokens", str(chunk)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout), p.stderr


def summary(name, out):
    runs = out["runs"][1:] or out["runs"]
    r = runs[len(runs) // 2]
    lt = r["layer_timings"]
    secs = [t["seconds"] for t in lt]
    stalls = [t["stall_seconds"] for t in lt]
    print(f"## {name}")
    print(f"total {statistics.median(x['total_seconds'] for x in runs) * 1e3:.1f} ms, "
          f"compute {statistics.median(x['compute_seconds'] for x in runs) * 1e3:.1f} ms, "
          f"tokenize {r['tokenize_seconds'] * 1e3:.1f} ms, stall {r['stall_seconds'] * 1e3:.1f} ms, "
          f"layer steps {len(lt)}, sum of layer seconds {sum(secs) * 1e3:.1f} ms, "
          f"peak {r.get('gpu_memory', {}).get('peak_used', 0) / 2**20:.0f} MiB")
    for t in lt[:3] + lt[-2:]:
        print(f"  layer {t['layer']}: {t['tokens']} tokens, {t['seconds'] * 1e3:.2f} ms, "
              f"stall {t['stall_seconds'] * 1e3:.2f} ms")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grating", required=True)
    ap.add_argument("--bench-dir", required=True)
    ap.add_argument("--bert", required=True)
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    qwen3 = os.path.join(args.bench_dir, "qwen3-0.6b-synth")
    cases = [("bert", args.bert, "full", "resident", 65536),
             ("bert", args.bert, "grating", "stream", 8192),
             ("bert", args.bert, "grating", "stream", 2048),
             ("qwen3", qwen3, "full", "resident", 65536),
             ("qwen3", qwen3, "grating", "stream", 8192)]
    for model, path, mode, weights, chunk in cases:
        docs = os.path.join(args.bench_dir, f"docs-{model}-{args.n}.txt")
        out, _ = rerank(args.grating, path, docs, mode, weights, chunk, 4)
        summary(f"{model} N={args.n} {mode}@{weights}, {chunk}-token chunks", out)
    docs = os.path.join(args.bench_dir, f"docs-qwen3-{args.n}.txt")
    _, err = rerank(args.grating, qwen3, docs, "full", "resident", 65536, 3,
                    {"GRATING_STAGE_PROFILE": "1"})
    print(f"## qwen3 N={args.n} full@resident, stage profile (synchronised)")
    print("\n".join(l for l in err.splitlines() if l.strip()))


if __name__ == "__main__":
    sys.exit(main())
