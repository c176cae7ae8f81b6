#!/usr/bin/env python3
"""Compares pruning rules on recorded per-layer scores, out of fold.

Input: score caches written by `grating calibrate --scores-cache FILE` (a JSON list of requests,
each `[layer][candidate]` logits, candidates in BM25 order). Every rule is calibrated on the
other folds' queries and measured on the held-out fold; candidates' scores do not depend on
which others are live, so replaying a rule on recorded scores is exactly what the engine does.

Usage: python3 scripts/prune_study.py layerwise=CACHE [distilled=CACHE ...] [--folds 5]
Prints, per model, N and K: mean and minimum top-K agreement with full inference and the
share of candidate-layers computed, for each rule. Research only (numpy); the rule chosen
lives in src/prune/.
"""
import argparse
import json

import numpy as np


def ranks_desc(x):
    order = np.argsort(-x, kind="stable")
    r = np.empty(len(x), int)
    r[order] = np.arange(len(x))
    return r


def replay(S, K, drop_fn, accept_fn=None):
    """Sequential replay: S is [layers][N]; drop_fn(layer, live_scores, slots) -> bool mask of
    live candidates to drop; accept_fn likewise for accepts. Returns (topk set, computed)."""
    L, N = S.shape
    live = np.ones(N, bool)
    accepted = []
    computed = 0
    for l in range(L):
        computed += live.sum()
        if l == L - 1:
            break
        slots = K - len(accepted)
        idx = np.flatnonzero(live)
        if slots <= 0 or len(idx) <= slots:
            continue
        s = S[l, idx]
        acc = accept_fn(l, s, slots) if accept_fn else np.zeros(len(idx), bool)
        if acc.sum() > slots:
            acc[:] = False
        if acc.any():
            order = idx[acc][np.argsort(-s[acc], kind="stable")]
            accepted.extend(order.tolist())
            live[idx[acc]] = False
        slots = K - len(accepted)
        idx2 = np.flatnonzero(live)
        if slots <= 0 or len(idx2) <= slots:
            continue
        s2 = S[l, idx2]
        dr = drop_fn(l, s2, slots)
        # Never drop below the open slots.
        if (~dr).sum() < slots:
            keep = np.argsort(-s2, kind="stable")[:slots]
            dr = np.ones(len(idx2), bool)
            dr[keep] = False
        live[idx2[dr]] = False
    final = np.flatnonzero(live)
    rest = final[np.argsort(-S[-1, final], kind="stable")]
    got = (accepted + rest.tolist())[:K]
    return set(got), computed


def truth(S, K):
    return set(np.argsort(-S[-1], kind="stable")[:K].tolist())


# ---- nonconformity scores on full trajectories (what calibration measures) ----

def kth(s, K):
    return np.sort(s)[::-1][K - 1]


def spread(s):
    q75, q25 = np.percentile(s, [75, 25])
    return max(float(np.std(s)), 1e-6), max(q75 - q25, 1e-6)


def stats_for(S, K):
    """Per layer: deepest rank of a true top-K member; largest gap below the K-th best of a
    true member in logits, in request std units; largest lead above the (K+1)-th of a
    non-member (same units)."""
    L, N = S.shape
    tk = np.array(sorted(truth(S, K)))
    non = np.setdiff1d(np.arange(N), tk)
    out = []
    for l in range(L - 1):
        s = S[l]
        r = ranks_desc(s)
        sk = kth(s, K)
        sk1 = kth(s, K + 1) if N > K else sk
        sd, iqr = spread(s)
        gap = sk - s[tk].min()
        lead = (s[non].max() - sk1) if len(non) else -np.inf
        out.append(dict(depth=r[tk].max() + 1, gap=gap, gap_sd=gap / sd, lead=lead, lead_sd=lead / sd))
    return out


def rules(train, K, N, L, margin):
    """Builds drop/accept functions from training requests."""
    st = [stats_for(S, K) for S in train]
    per = lambda key: np.array([[x[l][key] for l in range(L - 1)] for x in st])
    depth = per("depth").max(0)
    gap = per("gap").max(0)
    gap_sd = per("gap_sd").max(0)
    lead_sd = per("lead_sd").max(0)
    lead = per("lead").max(0)

    def depth_drop(l, s, slots):
        m = int(np.ceil(depth[l] * margin))
        r = ranks_desc(s)
        return r >= max(m, slots)

    def gap_drop(l, s, slots):
        return s < kth(s, slots) - gap[l] * margin

    def gapsd_drop(l, s, slots):
        sd, _ = spread(s)
        return s < kth(s, slots) - gap_sd[l] * margin * sd

    def leadsd_accept(l, s, slots):
        if len(s) <= slots:
            return np.zeros(len(s), bool)
        sd, _ = spread(s)
        return s > kth(s, slots + 1) + lead_sd[l] * margin * sd

    def lead_accept(l, s, slots):
        if len(s) <= slots:
            return np.zeros(len(s), bool)
        return s > kth(s, slots + 1) + lead[l] * margin

    def hybrid_drop(l, s, slots):
        return depth_drop(l, s, slots) & gapsd_drop(l, s, slots)

    # The movement-margin rule (grating's default, src/prune/margin.rs): the unit is the 99th
    # percentile of |(s_L - s_l) - median over the request (s_L - s_l)| over each training
    # request's final top 20, pooled; unlike the rules above it is a quantile of many movements, not the maximum
    # of a few requests' extremes.
    mv = movement(train, L)

    def movement_drop(l, s, slots):
        return s < kth(s, slots) - mv[l] * margin

    def movement_accept(l, s, slots):
        if len(s) <= slots:
            return np.zeros(len(s), bool)
        return s > kth(s, slots + 1) + mv[l] * margin

    return {
        "depth": (depth_drop, None),
        "gap-logit": (gap_drop, None),
        "gap-sd": (gapsd_drop, None),
        "gap-sd+accept": (gapsd_drop, leadsd_accept),
        "depth+accept-sd": (depth_drop, leadsd_accept),
        "gap-logit+accept": (gap_drop, lead_accept),
        "depth|gap-sd": (hybrid_drop, None),
        "movement": (movement_drop, None),
        "movement+accept": (movement_drop, movement_accept),
    }


def movement(train, L, top=20, q=0.99):
    out = []
    for l in range(L - 1):
        m = []
        for S in train:
            best = np.argsort(-S[-1], kind="stable")[:top]
            d = S[-1] - S[l]
            m.extend(np.abs(d[best] - np.median(d)).tolist())
        out.append(float(np.quantile(m, q)))
    return out


def evaluate(reqs, K, folds, margin):
    n = len(reqs)
    fold_of = np.arange(n) % folds
    L = reqs[0].shape[0]
    res = {}
    for f in range(folds):
        train = [reqs[i] for i in range(n) if fold_of[i] != f]
        test = [reqs[i] for i in range(n) if fold_of[i] == f]
        N = reqs[0].shape[1]
        for name, (d, a) in rules(train, K, N, L, margin).items():
            for S in test:
                got, comp = replay(S, K, d, a)
                agr = len(got & truth(S, K)) / K
                res.setdefault(name, []).append((agr, comp / S.size))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--margin", type=float, default=1.0)
    args = ap.parse_args()
    for spec in args.caches:
        name, path = spec.split("=", 1)
        allreqs = [np.array(r, dtype=np.float64) for r in json.load(open(path))]
        for N in (20, 100):
            reqs = [S[:, :N] for S in allreqs if S.shape[1] >= N]
            for K in (1, 5, 10):
                res = evaluate(reqs, K, args.folds, args.margin)
                for rule, v in res.items():
                    a = np.array(v)
                    print(f"{name:10} N={N:3} K={K:2} {rule:18} agree {a[:,0].mean():.4f} min {a[:,0].min():.2f} compute {a[:,1].mean():.3f}")


if __name__ == "__main__":
    main()
