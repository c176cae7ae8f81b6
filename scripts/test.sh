#!/usr/bin/env bash
# All tests: the real-client check (the `cohere` Python package against `grating serve`), then
# the Rust test suite (unit, parity, modes, memory, CLI, server), ending with one total line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test_cohere_client.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "rust: %d passed, %d failed\n", p, f }' "$log"
