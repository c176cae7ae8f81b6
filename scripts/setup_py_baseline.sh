#!/usr/bin/env bash
# Creates .venv-bench (repo-local) with the pinned Python baseline for the benchmarks:
# torch + sentence-transformers (used on the CPU only). The same venv can run
# scripts/make_fixtures.py (its pins, scripts/requirements-fixtures.txt, are a subset).
# Idempotent: does nothing when the pinned versions are already installed.
#
#   bash scripts/setup_py_baseline.sh          # then: .venv-bench/bin/python scripts/st_baseline.py ...
#   PYTHON=python3.11 bash scripts/setup_py_baseline.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
PYTHON="${PYTHON:-python3}"

TORCH=2.15.0
ST=6.2.0
TRANSFORMERS=5.23.0
TOKENIZERS=0.23.3

check() {
  "$VENV/bin/python" - "$TORCH" "$ST" "$TRANSFORMERS" "$TOKENIZERS" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(zip(["torch", "sentence-transformers", "transformers", "tokenizers"], sys.argv[1:]))
bad = {k: version(k) for k in want if version(k).split("+")[0] != want[k]}
sys.exit(1 if bad else 0)
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "setup_py_baseline: $VENV already has torch $TORCH, sentence-transformers $ST" >&2
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# Plain PyPI torch: the default wheel (with CUDA libraries) also runs on the CPU, which is
# all the baseline uses; a CPU-only index is not reachable from these machines.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==$TORCH" \
  "sentence-transformers==$ST" \
  "transformers==$TRANSFORMERS" \
  "tokenizers==$TOKENIZERS" \
  -r "$ROOT/scripts/requirements-fixtures.txt"

check || { echo "setup_py_baseline: version check failed after install" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, sentence_transformers as st; print('torch', torch.__version__, 'sentence-transformers', st.__version__)" >&2
