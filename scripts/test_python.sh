#!/usr/bin/env bash
# The Python package's tests: builds and installs `./python` (PyO3 + maturin, abi3) with the
# framework extras into a virtualenv under target/, then runs pytest (python/tests): the
# package against the CLI on the shared models, every error path, threads, and the LangChain,
# LlamaIndex and Haystack adapters in pipelines of those frameworks.
# Needs ../shared (the shared models and DL19 data), PyPI for the first setup, and the CLI at
# target/release/grating (built here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${GRATING_PYENV:-target/pyenv}
# One target directory for the CLI and the bindings: the bindings reuse the CLI's build of the
# engine and its dependencies (same features and release profile).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

cargo build --release --quiet
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
fi
# The frameworks pinned (tests/constraints.txt) so a run tests what was tested before.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c python/tests/constraints.txt \
    "./python[langchain,llamaindex,haystack,progress,test]"
"$VENV/bin/python" -c "import grating; print('grating', grating.__version__, 'installed', file=__import__('sys').stderr)"
# From outside the source folder, so the installed package (not python/grating) is tested.
cd python/tests
"$ROOT/$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"
