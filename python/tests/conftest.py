"""Shared fixtures: the shared models and DL19 data (``../shared`` beside the repository), the
``grating`` CLI binary the package is compared with, and a loaded reranker.

What the tests need and cannot find fails the run when ``CI=true`` (CI must test it) and is
skipped with the reason printed otherwise (run pytest with ``-rs`` to see it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

# No telemetry from the frameworks under test (these machines reach no analytics service).
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("GRATING_SHARED", REPO.parent / "shared"))
LAYERWISE = SHARED / "models" / "minilm-l6-msmarco-layerwise"
DISTILLED = SHARED / "models" / "minilm-l6-msmarco-distilled"
DL19 = SHARED / "data" / "trec-dl19-subset"


def _target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


GRATING_BIN = Path(os.environ.get("GRATING_BIN", _target_dir() / "release" / "grating"))


def require(path: Path, what: str) -> Path:
    """`path`, or a failure under CI and a skip (reason printed) elsewhere."""
    if path.exists():
        return path
    msg = f"{what} not found at {path}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} (CI=true: the tests must run)", pytrace=False)
    print(f"SKIP: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def layerwise() -> Path:
    return require(LAYERWISE, "the shared layerwise model")


@pytest.fixture(scope="session")
def distilled() -> Path:
    return require(DISTILLED, "the shared distilled model")


@pytest.fixture(scope="session")
def grating_bin() -> Path:
    return require(GRATING_BIN, "the grating CLI (cargo build --release)")


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory) -> Path:
    """An empty profile directory: the CLI and the package both see only the built-in
    profiles, whatever the user's cache holds."""
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="session")
def reranker(layerwise, profile_dir):
    import grating

    return grating.Reranker(layerwise, profile_dir=profile_dir)


def _read_jsonl(path: Path) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def dl19() -> Dict[str, object]:
    """DL19 queries, corpus and judgments (read in place, never copied)."""
    require(DL19, "the shared DL19 subset")
    queries = _read_jsonl(DL19 / "queries.jsonl")
    corpus = _read_jsonl(DL19 / "corpus.jsonl")
    qrels: Dict[str, List[str]] = {}
    with open(DL19 / "qrels.tsv", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                qrels.setdefault(parts[0], []).append(parts[1])
    return {"queries": queries, "corpus": corpus, "qrels": qrels}


def candidates(dl19, query_index: int, n: int) -> Tuple[str, List[str]]:
    """A query and `n` candidates: its judged documents in the corpus, then the corpus in
    order (a deterministic mix of relevant and unrelated passages)."""
    q = dl19["queries"][query_index]
    by_id = {d["_id"]: d["text"] for d in dl19["corpus"]}
    docs = [by_id[i] for i in dl19["qrels"].get(q["_id"], []) if i in by_id][: n // 2]
    for d in dl19["corpus"]:
        if len(docs) >= n:
            break
        if d["text"] not in docs:
            docs.append(d["text"])
    return q["text"], docs


def write_docs(path: Path, docs: Sequence[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    return path


def run_cli(grating_bin: Path, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [str(grating_bin), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"grating {' '.join(map(str, args))} failed:\n{p.stderr}")
    return p
