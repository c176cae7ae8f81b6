"""Every error path: the caller's mistakes are ValueError (or TypeError for a wrong type), the
engine's failures GratingError, with the CLI's messages."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

import grating
from grating import GratingError, InvalidRequestError

from conftest import candidates, run_cli, write_docs


def cli_error(grating_bin, args) -> str:
    p = run_cli(grating_bin, args, check=False)
    assert p.returncode != 0, p.stdout
    return p.stderr


def test_exception_classes():
    assert issubclass(InvalidRequestError, ValueError)
    assert issubclass(InvalidRequestError, GratingError)
    assert not issubclass(GratingError, ValueError)
    e = pickle.loads(pickle.dumps(InvalidRequestError("invalid input: x", "limit_exceeded")))
    assert isinstance(e, InvalidRequestError) and e.kind == "limit_exceeded"
    assert str(e) == "invalid input: x"


def test_missing_model_is_a_grating_error_with_the_cli_message(grating_bin, tmp_path, profile_dir):
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    with pytest.raises(GratingError) as e:
        grating.Reranker(missing, profile_dir=profile_dir)
    assert not isinstance(e.value, ValueError)
    assert e.value.kind == "model_files"
    stderr = cli_error(
        grating_bin,
        ["rerank", "--model", missing, "--query", "q", "--docs", write_docs(tmp_path / "d.jsonl", ["a"])],
    )
    assert str(e.value) in stderr


def test_broken_weights_are_a_grating_error(layerwise, tmp_path, profile_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(layerwise):
        if name != "model.safetensors":
            shutil.copy(layerwise / name, broken / name)
    with open(layerwise / "model.safetensors", "rb") as src:
        (broken / "model.safetensors").write_bytes(src.read(4096))
    with pytest.raises(GratingError) as e:
        grating.Reranker(broken, profile_dir=profile_dir)
    assert not isinstance(e.value, ValueError)
    assert e.value.kind == "model_files"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weights": "everywhere"}, 'unknown weights mode "everywhere" (resident, stream, auto)'),
        ({"device": "tpu"}, 'invalid device "tpu" (cpu, cuda or cuda:N)'),
        ({"device": "cuda:x"}, 'invalid device "cuda:x" (cpu, cuda or cuda:N)'),
        ({"dtype": "f64"}, 'unknown dtype "f64" (f16, bf16, f32)'),
        ({"max_memory": "lots"}, 'invalid size "lots"'),
        ({"max_memory": "3 parsecs"}, "unknown size unit"),
        ({"threads": 0}, "invalid input: thread counts must be positive"),
        ({"embedding_cache": 2.0}, "invalid input: embedding cache share must be in [0, 1]"),
        ({"chunk_tokens": 0}, "invalid input: batch size and chunk tokens must be positive"),
        ({"threads": -1}, "threads must be positive"),
    ],
)
def test_bad_load_options_are_value_errors(layerwise, profile_dir, kwargs, message):
    with pytest.raises(ValueError) as e:
        grating.Reranker(layerwise, profile_dir=profile_dir, **kwargs)
    assert message in str(e.value)


def test_cuda_without_a_cuda_build(layerwise, profile_dir):
    with pytest.raises(ValueError, match="no CUDA support"):
        grating.Reranker(layerwise, profile_dir=profile_dir, device="cuda")


def test_wrong_types_are_type_errors(reranker):
    with pytest.raises(TypeError):
        reranker.rank("q", "a single string is not a list")
    with pytest.raises(TypeError):
        reranker.rank("q", ["fine", 3])
    with pytest.raises(TypeError):
        reranker.rank(None, ["doc"])
    with pytest.raises(TypeError):
        reranker.rank("q", ["doc"], top_k="3")
    with pytest.raises(TypeError):
        reranker.predict([("q", "d"), ("only one",)])
    with pytest.raises(TypeError):
        reranker.predict("q")
    with pytest.raises(TypeError):
        grating.Reranker(42)
    with pytest.raises(TypeError):
        reranker.calibrate([("q", "not a list")])


def test_request_errors_match_the_cli(reranker, grating_bin, layerwise, profile_dir, tmp_path):
    docs = ["Paris is the capital of France.", "Berlin has many museums."]
    f = write_docs(tmp_path / "docs.jsonl", docs)
    base = ["rerank", "--model", layerwise, "--profile-dir", profile_dir, "--docs", f]

    cases = [
        (lambda: reranker.rank("   ", docs), [*base, "--query", "   "], "invalid_request"),
        (lambda: reranker.rank("q", docs, top_k=0), [*base, "--query", "q", "--top-k", "0"], "invalid_request"),
    ]
    for call, args, kind in cases:
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.kind == kind
        assert str(e.value) in cli_error(grating_bin, args)

    too_long = grating.Reranker(layerwise, profile_dir=profile_dir, max_length=100_000)
    with pytest.raises(ValueError) as e:
        too_long.rank("q", docs)
    assert e.value.kind == "limit_exceeded"
    assert str(e.value) in cli_error(grating_bin, [*base, "--query", "q", "--max-length", "100000"])


def test_empty_document_list(reranker):
    with pytest.raises(ValueError, match="the document list is empty") as e:
        reranker.rank("q", [])
    assert e.value.kind == "invalid_request"
    with pytest.raises(ValueError, match="top_k must be positive"):
        reranker.rank("q", ["d"], top_k=-1)


def test_memory_budget_refusal_matches_the_cli(layerwise, grating_bin, profile_dir, dl19, tmp_path):
    query, docs = candidates(dl19, 0, 100)
    f = write_docs(tmp_path / "docs.jsonl", docs)
    tiny = grating.Reranker(layerwise, profile_dir=profile_dir, max_memory="16MiB")
    with pytest.raises(ValueError) as e:
        tiny.rank(query, docs, top_k=10)
    assert e.value.kind == "memory_budget"
    stderr = cli_error(
        grating_bin,
        ["rerank", "--model", layerwise, "--profile-dir", profile_dir, "--docs", f,
         "--query", query, "--top-k", "10", "--max-memory", "16MiB"],
    )
    # The minimum counts the process's resident memory, which differs between the two
    # processes; the rest of the message is the CLI's.
    import re

    def norm(m: str) -> str:
        return re.sub(r"at least \d+ MiB", "at least N MiB", m)

    assert str(e.value).startswith("memory budget: this request needs at least")
    assert norm(str(e.value)) in norm(stderr)


def test_predict_argument_errors(reranker):
    with pytest.raises(ValueError, match="batch size and chunk tokens must be positive"):
        reranker.predict([("q", "d")], batch_size=0)
    with pytest.raises(ValueError, match="the query is empty"):
        reranker.predict([("", "d")])


def test_calibrate_argument_errors(reranker):
    reqs = [("q", ["a", "b", "c"])]
    with pytest.raises(ValueError, match="folds must be at least 2"):
        reranker.calibrate(reqs, folds=1)
    with pytest.raises(ValueError, match="top_k needs values of at least 1"):
        reranker.calibrate(reqs, top_k=(0, 1))
    with pytest.raises(ValueError, match="no sample requests with more than 10 documents"):
        reranker.calibrate(reqs)
    with pytest.raises(ValueError, match=r"target_agreement must be in \(0, 1\]"):
        reranker.calibrate(reqs, top_k=(1,), target_agreement=1.5)


def test_parse_size():
    assert grating.parse_size("512MiB") == 512 * 1024 * 1024
    with pytest.raises(ValueError):
        grating.parse_size("big")
    with pytest.raises(TypeError):
        grating.parse_size(5)
