#!/usr/bin/env python3
"""grating's Python package against sentence-transformers' CrossEncoder, in one process, on
the same model, candidates and threads (issue 19's proof):

- ``rank(top_k=10)``: grating's ``Reranker.rank`` vs ``CrossEncoder.rank``;
- ``predict``: grating's ``Reranker.predict`` vs ``CrossEncoder.predict`` (every score).

Candidates: DL19 queries, the BM25 top N of the corpus for each (a small Okapi BM25 written
here, k1=0.9, b=0.4 on lowercased word tokens, as Pyserini's defaults; not the CLI's BM25).
Latency: every query is timed for both libraries in alternating order, repeated; the ratio
of the medians is printed with the spread of the per-query ratios (noise). Peak memory: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over each library's phase
(for sentence-transformers its import with torch, then for each its load and one pass over
the requests), above the RSS at the phase's start; grating runs first, before torch exists.

Needs a Python with both packages, e.g. the benchmark venv:

    bash scripts/setup_py_baseline.sh
    .venv-bench/bin/pip install ./python
    .venv-bench/bin/python scripts/bench_python.py --threads 2

The DL19 data is read where it lies (../shared/data/trec-dl19-subset), never copied.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- BM25 ------------------------------------------------------------------------------------

TOKEN = re.compile(r"\w+")


def tokens(text: str):
    return TOKEN.findall(text.lower())


class Bm25:
    def __init__(self, texts, k1=0.9, b=0.4):
        self.k1, self.b = k1, b
        self.tf = [Counter(tokens(t)) for t in texts]
        self.len = [sum(c.values()) for c in self.tf]
        self.avg = sum(self.len) / max(1, len(self.len))
        df = Counter()
        for c in self.tf:
            df.update(c.keys())
        n = len(texts)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def top(self, query, n):
        q = [t for t in set(tokens(query)) if t in self.idf]
        scores = []
        for i, c in enumerate(self.tf):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * self.len[i] / self.avg)
            for t in q:
                f = c.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            if s > 0:
                scores.append((s, i))
        scores.sort(key=lambda x: (-x[0], x[1]))
        return [i for _, i in scores[:n]]


# -- memory ----------------------------------------------------------------------------------


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- main ------------------------------------------------------------------------------------


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/minilm-l6-msmarco-layerwise"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/trec-dl19-subset"))
    ap.add_argument("--queries", type=int, default=20, help="DL19 queries used (0: all)")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import grating
    import numpy as np

    corpus = read_jsonl(Path(args.data) / "corpus.jsonl")
    queries = read_jsonl(Path(args.data) / "queries.jsonl")
    if args.queries:
        queries = queries[: args.queries]
    texts = [d["text"] for d in corpus]
    bm = Bm25(texts)
    requests = [(q["text"], [texts[i] for i in bm.top(q["text"], args.candidates)]) for q in queries]
    requests = [r for r in requests if len(r[1]) > args.top_k]
    log(f"{len(requests)} requests, {sum(len(d) for _, d in requests)} candidates; threads {args.threads}")

    # Memory: each library's phase alone (load + one pass over the requests).
    gc.collect()
    can_reset = reset_peak()
    before_g = status_mib("VmRSS")
    g = grating.Reranker(args.model, threads=args.threads)
    for q, d in requests:
        g.rank(q, d, top_k=args.top_k)
        g.predict([(q, x) for x in d], batch_size=args.batch_size)
    peak_g = status_mib("VmHWM") - before_g

    # sentence-transformers (and torch) are imported only now, so the import's memory counts
    # for them and not for grating.
    gc.collect()
    reset_peak()
    before_st = status_mib("VmRSS")
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(args.threads)
    st = CrossEncoder(args.model, device="cpu")
    for q, d in requests:
        st.rank(q, d, top_k=args.top_k, batch_size=args.batch_size)
        st.predict([(q, x) for x in d], batch_size=args.batch_size)
    peak_st = status_mib("VmHWM") - before_st

    # Latency: alternating order per query, repeated.
    timings = {k: [] for k in ("g_rank", "st_rank", "g_predict", "st_predict")}
    agree = []
    for rep in range(args.repeats):
        for qi, (q, d) in enumerate(requests):
            pairs = [(q, x) for x in d]
            calls = [
                ("g_rank", lambda: g.rank(q, d, top_k=args.top_k)),
                ("st_rank", lambda: st.rank(q, d, top_k=args.top_k, batch_size=args.batch_size)),
                ("g_predict", lambda: g.predict(pairs, batch_size=args.batch_size)),
                ("st_predict", lambda: st.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)),
            ]
            if (rep + qi) % 2:
                calls = [calls[1], calls[0], calls[3], calls[2]]
            out = {}
            for name, fn in calls:
                t = time.perf_counter()
                out[name] = fn()
                timings[name].append(time.perf_counter() - t)
            if rep == 0:
                gt = {r["corpus_id"] for r in out["g_rank"]}
                stt = {r["corpus_id"] for r in out["st_rank"]}
                agree.append(len(gt & stt) / args.top_k)
                # predict's orders (each library's own activation; both monotone in the logit).
                gp = np.argsort(-np.asarray(out["g_predict"]), kind="stable")[: args.top_k]
                sp = np.argsort(-np.asarray(out["st_predict"]), kind="stable")[: args.top_k]
                timings.setdefault("predict_agreement", []).append(len(set(gp) & set(sp)) / args.top_k)

    def ratio(a, b):
        per = [x / y for x, y in zip(timings[a], timings[b])]
        q = statistics.quantiles(per, n=4) if len(per) >= 4 else [min(per), statistics.median(per), max(per)]
        return statistics.median(timings[a]) / statistics.median(timings[b]), q[0], q[-1]

    r_rank = ratio("g_rank", "st_rank")
    r_pred = ratio("g_predict", "st_predict")
    med = {k: statistics.median(v) * 1000 for k, v in timings.items() if k != "predict_agreement"}
    print(f"model {args.model}; {len(requests)} DL19 queries x BM25 top {args.candidates}; "
          f"threads {args.threads}; batch {args.batch_size}; {args.repeats} repeats")
    print(f"grating {grating.__version__}; torch {torch.__version__}")
    print(f"{'':<22}{'grating ms':>12}{'ST ms':>10}{'ratio':>8}   per-query ratio IQR")
    print(f"{'rank(top_k=%d)' % args.top_k:<22}{med['g_rank']:>12.1f}{med['st_rank']:>10.1f}"
          f"{r_rank[0]:>8.3f}   {r_rank[1]:.3f}-{r_rank[2]:.3f}")
    print(f"{'predict':<22}{med['g_predict']:>12.1f}{med['st_predict']:>10.1f}"
          f"{r_pred[0]:>8.3f}   {r_pred[1]:.3f}-{r_pred[2]:.3f}")
    note = "" if can_reset else " (VmHWM could not be reset: later phases include earlier peaks)"
    print(f"peak RSS above the phase's start: grating {peak_g:.0f} MiB, ST {peak_st:.0f} MiB, "
          f"ratio {peak_g / peak_st:.3f}{note}")
    print(f"top-{args.top_k} agreement grating rank vs ST rank: mean {statistics.mean(agree):.4f}; "
          f"top-{args.top_k} agreement of the predict scores: {statistics.mean(timings['predict_agreement']):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ms": med, "rank_ratio": r_rank, "predict_ratio": r_pred,
                       "peak_rss_mib": {"grating": peak_g, "st": peak_st},
                       "agreement": statistics.mean(agree)}, f, indent=1)


if __name__ == "__main__":
    main()
