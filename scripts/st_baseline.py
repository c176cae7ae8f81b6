#!/usr/bin/env python3
"""sentence-transformers CrossEncoder baseline for grating's benchmarks (CPU).

    .venv-bench/bin/python scripts/st_baseline.py --model DIR --requests FILE \
        [--threads N] [--batch-size B] [--repeats R] [--max-length L]

FILE is jsonl, one request per line: {"qid": str, "query": str, "docs": [str, ...]}.

With --serve instead of --requests it is a `grating bench` contender: it reads one request per
line from stdin, answers each with {"qid", "seconds": float, "scores": [...]} at once, and at
end of input prints {"peak_rss_mib": float}.

stdout gets exactly one JSON line per request,
    {"qid": ..., "seconds": [wall seconds per repeat], "scores": [raw logits, doc order]}
and one last line {"peak_rss_mib": float}. Everything else goes to stderr.
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory (HF layout)")
    ap.add_argument("--requests", help="jsonl file of requests")
    ap.add_argument("--serve", action="store_true", help="answer requests from stdin, one per line")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()

    out = sys.stdout
    # Libraries may print; keep stdout for our JSON lines only.
    with contextlib.redirect_stdout(sys.stderr):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import CrossEncoder

        torch.set_num_threads(args.threads)
        # Inter-op threads can only be set once, before any parallel work; one is enough here.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)

        if not args.serve and not args.requests:
            log("need --requests FILE or --serve")
            return 2
        requests = []
        if args.requests:
            with open(args.requests, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        requests.append(json.loads(line))
            if not requests:
                log("no requests")
                return 2

        t0 = time.perf_counter()
        model = CrossEncoder(args.model, max_length=args.max_length, device="cpu", local_files_only=True)
        model.eval()
        log(f"loaded {args.model} in {time.perf_counter() - t0:.2f}s; threads={torch.get_num_threads()} "
            f"batch={args.batch_size} max_length={args.max_length} repeats={args.repeats}")
        identity = torch.nn.Identity()

        def score(query, docs):
            with torch.inference_mode():
                s = model.predict(
                    [(query, d) for d in docs],
                    batch_size=args.batch_size,
                    activation_fn=identity,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                )
            return [float(x) for x in s.reshape(len(docs), -1)[:, 0]]

        if args.serve:
            for line in sys.stdin:
                if not line.strip():
                    continue
                req = json.loads(line)
                t0 = time.perf_counter()
                scores = score(req["query"], req["docs"])
                seconds = time.perf_counter() - t0
                out.write(json.dumps({"qid": req["qid"], "seconds": seconds, "scores": scores}) + "\n")
                out.flush()
            requests = []
        else:
            first = requests[0]
            t0 = time.perf_counter()
            score(first["query"], first["docs"])
            log(f"warm-up on {first['qid']}: {time.perf_counter() - t0:.3f}s")

        for req in requests:
            seconds = []
            scores = None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                scores = score(req["query"], req["docs"])
                seconds.append(time.perf_counter() - t0)
            out.write(json.dumps({"qid": req["qid"], "seconds": seconds, "scores": scores}) + "\n")
            out.flush()

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux -> MiB
    out.write(json.dumps({"peak_rss_mib": rss}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
