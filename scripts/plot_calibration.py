#!/usr/bin/env python3
"""Draws a self-calibration trace written by `grating bench-serve --calibration-trace FILE`.

Usage: python3 scripts/plot_calibration.py TRACE.jsonl OUT.png
Top: the measured top-K agreement of the current window with its 95% Wilson interval, and the
target. Bottom: the margin (movement units). x: re-runs recorded (samples). Needs matplotlib.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    if not rows:
        sys.exit(f"{sys.argv[1]}: empty trace")
    cal = [r["calibration"] for r in rows]
    x = [c["samples"] for c in cal]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    top.plot(x, [c["agreement"] for c in cal], label="window agreement")
    top.fill_between(
        x,
        [c["agreement_lower"] for c in cal],
        [c["agreement_upper"] for c in cal],
        alpha=0.25,
        label="95% Wilson interval",
    )
    top.axhline(cal[0]["target_agreement"], color="k", ls="--", lw=1, label="target")
    top.set_ylabel("top-K agreement")
    top.set_ylim(max(0.9, min(c["agreement_lower"] for c in cal) - 0.005), 1.0005)
    top.legend(loc="lower right")
    bottom.step(x, [c["margin"] for c in cal], where="post")
    bottom.set_ylabel("margin (movement units)")
    bottom.set_xlabel("sampled requests re-run")
    fig.suptitle("grating serve self-calibration")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
