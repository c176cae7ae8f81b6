#!/usr/bin/env bash
# Installs what grating needs to build (the system OpenBLAS for CPU GEMMs) and builds the
# release binary at target/release/grating.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/*/libopenblas.so >/dev/null 2>&1 && ! ls /usr/lib/libopenblas.so >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libopenblas-dev >/dev/null
fi
cargo build --release --quiet
echo "built target/release/grating" >&2
