#!/usr/bin/env bash
# All tests: the real-client check (the `cohere` Python package against `grating serve`), the
# Rust test suite (unit, parity, modes, memory, CLI, server), then the Python package's tests
# (scripts/test_python.sh), ending with one total line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test_cohere_client.sh
log=$(mktemp)
pylog=$(mktemp)
trap 'rm -f "$log" "$pylog"' EXIT
cargo test --release 2>&1 | tee "$log"
bash scripts/test_python.sh 2>&1 | tee "$pylog"
awk '/^test result:/ { p += $4; f += $6 } END { printf "rust: %d passed, %d failed\n", p, f }' "$log"
# pytest's closing line, e.g. "41 passed, 2 skipped in 80.1s".
py=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$pylog" | tail -1)
pp=$(echo "$py" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
pf=$(echo "$py" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || echo 0)
echo "python: $pp passed, $pf failed"
awk -v pp="$pp" -v pf="$pf" '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p + pp, f + pf }' "$log"
