"""The package against the CLI on the shared models: same top K (same documents, same order),
scores within 1e-5, the same pruning work, and full inference's every score."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import candidates, run_cli, write_docs

TOL = 1e-5


def cli_rerank(grating_bin, model, profile_dir, query, docs_file, *extra):
    p = run_cli(
        grating_bin,
        [
            "rerank",
            "--model", model,
            "--profile-dir", profile_dir,
            "--query", query,
            "--docs", docs_file,
            "--json",
            *extra,
        ],
    )
    return json.loads(p.stdout)


@pytest.mark.parametrize("query_index,n,k", [(0, 100, 10), (3, 60, 5), (7, 40, 1)])
def test_rank_matches_the_cli(
    reranker, grating_bin, layerwise, profile_dir, dl19, tmp_path, query_index, n, k
):
    query, docs = candidates(dl19, query_index, n)
    f = write_docs(tmp_path / "docs.jsonl", docs)
    cli = cli_rerank(grating_bin, layerwise, profile_dir, query, f, "--top-k", k)
    got = reranker.rank(query, docs, top_k=k, return_documents=True)

    assert len(got) == k
    assert [r["corpus_id"] for r in got] == [r["index"] for r in cli["results"]]
    for g, c in zip(got, cli["results"]):
        assert abs(g["score"] - c["score"]) <= TOL, (g, c)
        assert g["text"] == docs[g["corpus_id"]]

    full = reranker.rerank(query, docs, top_k=k)
    assert [r.corpus_id for r in full.results] == [r["index"] for r in cli["results"]]
    for g, c in zip(full.results, cli["results"]):
        assert abs(g.logit - c["logit"]) <= 1e-4, (g, c)
        assert abs(reranker.relevance(g.logit) - g.score) <= 1e-7
    # The same pruning decisions: the same work.
    assert full.candidate_layers_computed == cli["stats"]["candidate_layers_computed"]
    assert full.candidate_layers_full == cli["stats"]["candidate_layers_full"]
    assert len(full.prune_events) == len(cli["stats"]["prune_events"])
    # The layerwise model has a built-in profile: K < N prunes.
    assert full.candidate_layers_computed < full.candidate_layers_full
    assert full.stats["candidates"] == n
    assert full.peak_rss_mib > 0


def test_exact_is_full_inference(reranker, grating_bin, layerwise, profile_dir, dl19, tmp_path):
    query, docs = candidates(dl19, 1, 80)
    f = write_docs(tmp_path / "docs.jsonl", docs)
    cli = cli_rerank(grating_bin, layerwise, profile_dir, query, f, "--top-k", 10, "--prune", "off")
    exact = reranker.rerank(query, docs, top_k=10, exact=True)
    assert [r.corpus_id for r in exact.results] == [r["index"] for r in cli["results"]]
    for g, c in zip(exact.results, cli["results"]):
        assert abs(g.score - c["score"]) <= TOL
    assert exact.candidate_layers_computed == exact.candidate_layers_full
    # Without pruning the order is the final scores' order.
    scores = [r.score for r in exact.results]
    assert scores == sorted(scores, reverse=True)
    assert exact.prune_events == []

    # And it equals predict (full mode), score for score.
    scores = reranker.predict([(query, d) for d in docs])
    logits = reranker.predict([(query, d) for d in docs], activation=False)
    # By logit: a sigmoid saturates to 1.0 for the best documents, the logits still differ.
    order = np.argsort(-logits, kind="stable")[:10]
    assert list(order) == [r.corpus_id for r in exact.results]
    for r in exact.results:
        assert abs(scores[r.corpus_id] - r.score) <= TOL


def test_predict_matches_cli_full_mode(
    reranker, grating_bin, layerwise, profile_dir, dl19, tmp_path
):
    query, docs = candidates(dl19, 2, 50)
    f = write_docs(tmp_path / "docs.jsonl", docs)
    cli = cli_rerank(grating_bin, layerwise, profile_dir, query, f, "--mode", "full")
    by_index = {r["index"]: r for r in cli["results"]}
    assert len(by_index) == len(docs)

    scores = reranker.predict([(query, d) for d in docs], batch_size=16)
    logits = reranker.predict([(query, d) for d in docs], activation=False)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    assert scores.shape == (len(docs),)
    for i in range(len(docs)):
        assert abs(float(scores[i]) - by_index[i]["score"]) <= TOL
        assert abs(float(logits[i]) - by_index[i]["logit"]) <= 1e-4

    # rank() without top_k (nothing pruned) agrees with predict.
    ranked = reranker.rank(query, docs)
    assert [r["corpus_id"] for r in ranked] == [r["index"] for r in cli["results"]]

    # A callable activation gets the logits; one pair gives one score.
    doubled = reranker.predict([(query, d) for d in docs[:3]], activation=lambda x: 2 * x)
    assert np.allclose(doubled, 2 * logits[:3], atol=1e-4)
    one = reranker.predict((query, docs[0]))
    assert abs(float(one) - float(scores[0])) <= TOL


def test_predict_groups_pairs_by_query(reranker, dl19):
    """Pairs of several queries, interleaved: each score is the one its query alone gets."""
    q1, d1 = candidates(dl19, 4, 12)
    q2, d2 = candidates(dl19, 5, 12)
    pairs = [p for ab in zip([(q1, d) for d in d1], [(q2, d) for d in d2]) for p in ab]
    mixed = reranker.predict(pairs, batch_size=5)
    alone1 = reranker.predict([(q1, d) for d in d1])
    alone2 = reranker.predict([(q2, d) for d in d2])
    assert np.allclose(mixed[0::2], alone1, atol=TOL)
    assert np.allclose(mixed[1::2], alone2, atol=TOL)
    assert reranker.predict([]).shape == (0,)
    assert reranker.predict([], convert_to_numpy=False) == []


def test_distilled_model_matches_the_cli(distilled, grating_bin, profile_dir, dl19, tmp_path):
    import grating

    r = grating.Reranker(distilled, profile_dir=profile_dir, weights="stream")
    assert r.weights == "stream"
    query, docs = candidates(dl19, 6, 60)
    f = write_docs(tmp_path / "docs.jsonl", docs)
    cli = cli_rerank(grating_bin, distilled, profile_dir, query, f, "--top-k", 5, "--weights", "stream")
    got = r.rank(query, docs, top_k=5)
    assert [g["corpus_id"] for g in got] == [c["index"] for c in cli["results"]]
    for g, c in zip(got, cli["results"]):
        assert abs(g["score"] - c["score"]) <= TOL


def test_memory_budget_matches_the_cli(layerwise, grating_bin, profile_dir, dl19, tmp_path):
    """Under a budget requests take the budget-planned path (no shared pass)."""
    import grating

    r = grating.Reranker(layerwise, profile_dir=profile_dir, max_memory="2GiB")
    assert not r.shared
    query, docs = candidates(dl19, 8, 60)
    f = write_docs(tmp_path / "docs.jsonl", docs)
    cli = cli_rerank(grating_bin, layerwise, profile_dir, query, f, "--top-k", 10, "--max-memory", "2GiB")
    got = r.rerank(query, docs, top_k=10)
    assert [g.corpus_id for g in got.results] == [c["index"] for c in cli["results"]]
    for g, c in zip(got.results, cli["results"]):
        assert abs(g.score - c["score"]) <= TOL
    assert got.stats["predicted_peak_mib"] > 0
    assert got.candidate_layers_computed == cli["stats"]["candidate_layers_computed"]
