"""calibrate(): the margin rule fitted out of fold as `grating calibrate` fits it, applied to
later requests and saved as the model's profile."""

from __future__ import annotations

import json
import re

import pytest

import grating

from conftest import candidates, run_cli


@pytest.fixture(scope="module")
def requests(dl19):
    return [candidates(dl19, i, 30) for i in range(12)]


def test_calibrate_matches_the_cli_and_applies(layerwise, grating_bin, tmp_path, requests):
    r = grating.Reranker(layerwise, profile_dir=tmp_path / "p")
    fit = r.calibrate(requests, target_agreement=0.99, top_k=(1, 5), folds=3)

    assert fit.requests == len(requests)
    assert [(row["candidates"], row["k"]) for row in fit.held_out] == [(0, 1), (0, 5)]
    for row in fit.held_out:
        assert 0.0 <= row["agreement"] <= 1.0 and 0.0 < row["compute_share"] <= 1.0
        assert row["requests"] == len(requests)
    cfg = fit.config
    assert cfg["rule"] == "margin" and cfg["mode"] == "top-k"
    assert len(cfg["movement"]) == r.info["num_layers"] - 1
    assert fit.profile_path is None

    # The same requests through the CLI choose the same margin and report the same rows.
    f = tmp_path / "requests.jsonl"
    with open(f, "w", encoding="utf-8") as out:
        for q, docs in requests:
            out.write(json.dumps({"query": q, "documents": docs}) + "\n")
    p = run_cli(
        grating_bin,
        ["calibrate", "--model", layerwise, "--profile-dir", tmp_path / "cli", "--queries", f,
         "--top-k", "1,5", "--folds", "3", "--no-save"],
    )
    margin = float(re.search(r"chosen margin (\S+)", p.stdout).group(1))
    assert margin == pytest.approx(cfg["margin"])
    rows = [l.split() for l in p.stdout.splitlines() if re.match(r"\s*all\s", l)]
    assert len(rows) == 2
    for cli_row, row in zip(rows, fit.held_out):
        assert int(cli_row[1]) == row["k"] and int(cli_row[2]) == row["requests"]
        assert float(cli_row[4]) == pytest.approx(row["agreement"], abs=1e-4)
        assert float(cli_row[7]) == pytest.approx(row["compute_share"], abs=1e-3)

    # apply=True: later requests use the fitted rule.
    now = r.prune_config
    assert now["margin"] == cfg["margin"] and now["movement"] == cfg["movement"]


def test_calibrate_saves_a_profile_later_loads_use(layerwise, tmp_path, requests):
    d = tmp_path / "profiles"
    r = grating.Reranker(layerwise, profile_dir=d)
    fit = r.calibrate(requests, top_k=(1, 5), folds=3, save=True, apply=False)
    assert fit.profile_path is not None
    saved = json.loads(open(fit.profile_path, encoding="utf-8").read())
    assert saved["margin"] == fit.config["margin"] and saved["queries"] == len(requests)
    again = grating.Reranker(layerwise, profile_dir=d)
    assert again.prune_config["margin"] == fit.config["margin"]
    assert again.prune_config["movement"] == fit.config["movement"]
