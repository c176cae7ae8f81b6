"""The package's facts and smaller behaviours: properties, stats, the progress bar, top_k
bounds, and the installed package's typing files."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest

import grating

from conftest import candidates


def test_facts(reranker, layerwise):
    assert reranker.model == str(layerwise)
    assert reranker.device == "cpu" and reranker.weights == "resident" and reranker.shared
    info = reranker.info
    assert info["num_layers"] == 6 and info["max_length"] > 0
    cfg = reranker.prune_config
    assert cfg["rule"] == "margin" and cfg["mode"] == "top-k" and cfg["movement"]
    assert isinstance(reranker.score_calibrated, bool)
    assert 0.0 < reranker.relevance(0.0) < 1.0
    assert reranker.relevance(2.0) > reranker.relevance(1.0)
    assert "Reranker(model=" in repr(reranker)
    assert grating.__version__


def test_rerank_stats(reranker, dl19):
    query, docs = candidates(dl19, 12, 50)
    r = reranker.rerank(query, docs, top_k=3, return_documents=True)
    assert len(r.results) == 3
    assert all(x.text == docs[x.corpus_id] for x in r.results)
    s = r.stats
    # The shared pass (concurrent requests share layer steps) reports its own mode name.
    assert s["mode"] == "grating-shared" and s["candidates"] == 50 and s["tokens"] > 50
    assert len(s["layers_per_candidate"]) == 50
    assert sum(s["layers_per_candidate"]) == r.candidate_layers_computed
    assert r.candidate_layers_full == 50 * 6
    assert 0 <= r.saved_percent < 100 and r.total_seconds > 0 and r.peak_rss_mib > 0
    for e in r.prune_events:
        assert {"layer", "live_before", "accepted", "dropped"} <= set(e)
    # exact=True is full inference's top 3.
    exact = reranker.rerank(query, docs, top_k=3, exact=True)
    full = reranker.predict([(query, d) for d in docs], activation=False)
    assert [x.corpus_id for x in exact.results] == np.argsort(-full, kind="stable")[:3].tolist()
    assert exact.saved_percent == 0


def test_top_k_beyond_the_documents(reranker):
    got = reranker.rank("capital of France", ["Paris is the capital of France.", "Bananas."], top_k=10)
    assert [g["corpus_id"] for g in got] == [0, 1]
    assert set(got[0]) == {"corpus_id", "score"}


def test_progress_bar(reranker, dl19, capsys):
    pytest.importorskip("tqdm", reason="the [progress] extra is not installed")
    query, docs = candidates(dl19, 13, 40)
    reranker.predict([(query, d) for d in docs], batch_size=8, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "predict" in err and "40/40" in err
    reranker.predict([(query, d) for d in docs], show_progress_bar=False)
    assert "40/40" not in capsys.readouterr().err


def test_typing_files_are_installed():
    files = importlib.resources.files("grating")
    assert files.joinpath("py.typed").is_file()
    assert files.joinpath("_grating.pyi").is_file()
    assert "def rerank" in files.joinpath("_grating.pyi").read_text()
