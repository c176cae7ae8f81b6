#!/usr/bin/env bash
# All tests: the real-client check (the `cohere` Python package against `grating serve`), then
# the Rust test suite (unit, parity, modes, memory, CLI, server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test_cohere_client.sh
cargo test --release
