"""The README's "Use it from Python" snippets, run as written (from the repository root, where
their ../shared paths point)."""

from __future__ import annotations

import os
import re

import pytest

from conftest import LAYERWISE, REPO, require


def python_blocks() -> list:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_snippets_run(capsys):
    require(LAYERWISE, "the shared layerwise model")
    pytest.importorskip("langchain_core", reason="the [langchain] extra is not installed")
    pytest.importorskip("llama_index.core", reason="the [llamaindex] extra is not installed")
    blocks = python_blocks()
    assert len(blocks) == 3, "the README's Python section changed: update this test"
    here = os.getcwd()
    os.chdir(REPO)
    try:
        scope: dict = {}
        for code in blocks:
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(here)
    out = capsys.readouterr().out.splitlines()
    # rank's list, predict's array, the stats line, two LangChain and two LlamaIndex lines.
    assert out[0].startswith("[{'corpus_id': ")
    assert "candidate-layers" in out[-5]
    monotonic = [l for l in out[-4:] if "onoton" in l]
    assert len(monotonic) == 4, out[-4:]
