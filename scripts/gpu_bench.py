#!/usr/bin/env python3
"""GPU benchmark: grating (full and grating mode, resident and streamed weights) against HF
transformers, side by side in one run on identical weights and inputs.

Models:
  * the shared BERT cross-encoder (AutoModelForSequenceClassification);
  * a Qwen3-Reranker-0.6B-shaped Qwen3ForCausalLM built by transformers from its config with
    a fixed seed and saved, scored the published way (yes/no logits of the last token, left
    padding). grating reads the very files transformers saved.

Inputs: N documents (N in --sizes) cut from TREC DL19 passages to lengths drawn uniformly from
[128, 384] tokens (about 256 on average), one query. Each system runs the request --repeats
times after one warm-up; the median latency is reported (tokenization included on both sides)
with the peak GPU memory the allocator held (torch.cuda.max_memory_allocated; grating's pool
high-water mark), weights included.

Usage (on the GPU machine; scripts/device_gpu.sh calls it):
  python3 scripts/gpu_bench.py --grating BIN --bert DIR --qwen3-tokenizer DIR \
      --data DIR --out DIR [--sizes 20,100] [--repeats 5]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import transformers
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Qwen3Config,
                          Qwen3ForCausalLM)

QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on "
                "the Query and the Instruct provided. Note that the answer can only be \"yes\" or "
                "\"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_qwen3(tokenizer_dir, out_dir, seed=0):
    """The Qwen3-Reranker-0.6B shape, random weights from a fixed seed, saved in bf16."""
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    cfg = Qwen3Config(
        vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, torch_dtype="bfloat16")
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_inputs(data_dir, tok, n, seed):
    """One query and n documents of 128..384 tokens (by `tok`), cut from DL19 passages."""
    rng = random.Random(seed)
    passages = [json.loads(l)["text"] for l in open(os.path.join(data_dir, "corpus.jsonl"))]
    queries = [json.loads(l)["text"] for l in open(os.path.join(data_dir, "queries.jsonl"))]
    query = queries[seed % len(queries)]
    docs = []
    for _ in range(n):
        target = rng.randint(128, 384)
        ids = []
        while len(ids) < target:
            ids += tok(passages[rng.randrange(len(passages))] + " ", add_special_tokens=False)["input_ids"]
        docs.append(tok.decode(ids[:target]).strip())
    return query, docs


def cuda_time(fn, repeats):
    fn()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated(), out


def hf_bert(model_dir, query, docs, repeats):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    pad = {}

    def run():
        with torch.inference_mode():
            enc = tok([query] * len(docs), docs, padding=True, truncation=True, max_length=512,
                      return_tensors="pt")
            real = int(enc["attention_mask"].sum())
            pad["share"] = 1 - real / enc["attention_mask"].numel()
            pad["tokens"] = real
            enc = {k: v.cuda(non_blocking=True) for k, v in enc.items()}
            return model(**enc).logits[:, 0].float().cpu()

    lat, peak, scores = cuda_time(run, repeats)
    del model
    torch.cuda.empty_cache()
    return lat, peak, scores.tolist(), pad


def hf_qwen3(model_dir, query, docs, repeats):
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = Qwen3ForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    yes = tok.convert_tokens_to_ids("yes")
    no = tok.convert_tokens_to_ids("no")
    prefix = tok.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix = tok.encode(QWEN3_SUFFIX, add_special_tokens=False)
    max_len = 8192
    pad = {}

    def run():
        with torch.inference_mode():
            texts = [f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {query}\n<Document>: {d}"
                     for d in docs]
            enc = tok(texts, padding=False, truncation="longest_first",
                      return_attention_mask=False, max_length=max_len - len(prefix) - len(suffix))
            enc["input_ids"] = [prefix + ids + suffix for ids in enc["input_ids"]]
            enc = tok.pad(enc, padding=True, return_tensors="pt", max_length=max_len)
            real = int(enc["attention_mask"].sum())
            pad["share"] = 1 - real / enc["attention_mask"].numel()
            pad["tokens"] = real
            enc = {k: v.cuda(non_blocking=True) for k, v in enc.items()}
            last = model(**enc).logits[:, -1, :]
            return (last[:, yes] - last[:, no]).float().cpu()

    lat, peak, scores = cuda_time(run, repeats)
    del model
    torch.cuda.empty_cache()
    return lat, peak, scores.tolist(), pad


def grating(binary, model_dir, query, docs_path, mode, weights, top_k, repeats, extra,
            stream_chunk, env=None):
    # Resident: one batch / one chunk per layer, as a GPU wants large GEMMs. Streamed: the
    # memory-bounded configuration, smaller chunks (--stream-chunk-tokens).
    chunk = "65536" if weights == "resident" else str(stream_chunk)
    cmd = [binary, "rerank", "--model", model_dir, "--device", "cuda:0", "--dtype", "bf16",
           "--query", query, "--docs", docs_path, "--mode", mode, "--weights", weights,
           "--top-k", str(top_k), "--repeats", str(repeats + 1), "--json", "--raw-scores",
           "--batch-size", "100000", "--chunk-tokens", chunk] + extra
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr}")
    out = json.loads(p.stdout)
    runs = out["runs"][1:]
    lat = statistics.median(r["total_seconds"] for r in runs)
    compute = statistics.median(r["compute_seconds"] for r in runs)
    peak = max(r["gpu_memory"]["peak_used"] for r in out["runs"])
    return {"latency": lat, "compute": compute, "peak": peak, "flops": runs[0]["flops"],
            "saved_percent": runs[0]["saved_percent"],
            "top": [r["index"] for r in out["results"]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grating", required=True)
    ap.add_argument("--bert", required=True)
    ap.add_argument("--qwen3-tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="20,100")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the GPU (H100 SXM: 989; H200: 989)")
    ap.add_argument("--models", default="bert,qwen3")
    ap.add_argument("--stream-chunk-tokens", type=int, default=8192,
                    help="chunk size of the streamed-weights contenders")
    ap.add_argument("--no-generic-row", action="store_true",
                    help="skip the full-mode row that runs candle's generic GPU ops instead of "
                         "grating's kernels (GRATING_GPU_GENERIC=all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    log(f"GPU {gpu}, torch {torch.__version__}, transformers {transformers.__version__}")
    qwen3_dir = make_qwen3(args.qwen3_tokenizer, os.path.join(args.out, "qwen3-0.6b-synth"))
    models = {"bert": (args.bert, hf_bert, []),
              # Random weights give flat scores; a forced schedule stands in for the pruning a
              # trained model's dispersion would trigger (as in the CPU benchmarks).
              "qwen3": (qwen3_dir, hf_qwen3, ["--schedule", "10:0.3,16:0.1"])}
    rows = []
    for name in args.models.split(","):
        model_dir, hf_fn, prune_extra = models[name]
        tok = AutoTokenizer.from_pretrained(model_dir)
        for n in [int(s) for s in args.sizes.split(",")]:
            query, docs = make_inputs(args.data, tok, n, seed=n)
            docs_path = os.path.join(args.out, f"docs-{name}-{n}.txt")
            with open(docs_path, "w") as f:
                f.write("\n".join(d.replace("\n", " ") for d in docs) + "\n")
            hf_lat, hf_peak, hf_scores, pad = hf_fn(model_dir, query, docs, args.repeats)
            hf_top = sorted(range(n), key=lambda i: -hf_scores[i])[:args.top_k]
            log(f"{name} N={n}: HF {hf_lat * 1e3:.1f} ms, peak {hf_peak / 2**30:.2f} GiB, "
                f"padding {pad['share'] * 100:.0f}%")
            base = {"model": name, "n": n, "hf_ms": hf_lat * 1e3, "hf_peak_mib": hf_peak / 2**20,
                    "hf_padding_percent": pad["share"] * 100, "real_tokens": pad["tokens"]}
            contenders = [("full", "resident", [], None),
                          ("grating", "resident", prune_extra, None),
                          ("grating", "stream", prune_extra, None),
                          ("full", "stream", [], None)]
            if not args.no_generic_row:
                # The same binary with cuBLASLt GEMMs, flash attention and the fused norm
                # switched back to candle's cuBLAS matmul, bucketed attention and generic ops.
                contenders.append(("full", "resident", [], {"GRATING_GPU_GENERIC": "all"}))
            for mode, weights, extra, env in contenders:
                g = grating(args.grating, model_dir, query, docs_path, mode, weights,
                            args.top_k, args.repeats, extra, args.stream_chunk_tokens, env)
                row = dict(base)
                useful_tflops = g["flops"] / g["compute"] / 1e12
                row.update({
                    "contender": f"{mode}@{weights}" + (" (generic ops)" if env else ""),
                    "grating_ms": g["latency"] * 1e3, "grating_compute_ms": g["compute"] * 1e3,
                    "latency_ratio": g["latency"] / hf_lat,
                    "grating_peak_mib": g["peak"] / 2**20, "peak_ratio": g["peak"] / hf_peak,
                    "useful_tflops": useful_tflops,
                    "peak_share_percent": 100 * useful_tflops / args.peak_tflops,
                    "saved_percent": g["saved_percent"],
                    "top_k_overlap_with_hf": len(set(g["top"]) & set(hf_top)) / args.top_k,
                })
                log(f"  {row['contender']:>31}: {row['grating_ms']:.1f} ms "
                    f"({row['latency_ratio']:.3f}x HF), peak {row['grating_peak_mib']:.0f} MiB "
                    f"({row['peak_ratio']:.3f}x), {useful_tflops:.0f} TFLOP/s useful, "
                    f"top-{args.top_k} overlap {row['top_k_overlap_with_hf']:.1f}")
                rows.append(row)
    meta = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "repeats": args.repeats, "peak_tflops": args.peak_tflops,
            "stream_chunk_tokens": args.stream_chunk_tokens}
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("| model | N | contender | HF ms | grating ms | ratio | HF peak MiB | grating peak MiB "
          "| ratio | useful TFLOP/s | % of bf16 peak | HF padding | saved | top-10 = HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['n']} | {r['contender']} | {r['hf_ms']:.1f} | "
              f"{r['grating_ms']:.1f} | {r['latency_ratio']:.3f} | {r['hf_peak_mib']:.0f} | "
              f"{r['grating_peak_mib']:.0f} | {r['peak_ratio']:.3f} | {r['useful_tflops']:.0f} | "
              f"{r['peak_share_percent']:.1f} | {r['hf_padding_percent']:.0f}% | "
              f"{r['saved_percent']:.0f}% | {r['top_k_overlap_with_hf']:.1f} |")


if __name__ == "__main__":
    main()
