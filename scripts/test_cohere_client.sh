#!/usr/bin/env bash
# Real-client test: starts `grating serve` on a loopback port with an API key and calls it
# through the official `cohere` Python package (pinned), v1 and v2 rerank.
# Needs ../shared/models (the shared MiniLM cross-encoder) and PyPI for the first venv setup.
set -euo pipefail
cd "$(dirname "$0")/.."
COHERE_VERSION=7.3.1
VENV=.venv-client
MODEL=../shared/models/minilm-l6-msmarco-distilled
if [ ! -d "$MODEL" ]; then
    echo "missing $MODEL" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c "import cohere, sys; sys.exit(cohere.__version__ != '$COHERE_VERSION')" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "cohere==$COHERE_VERSION"
fi
cargo build --release --quiet
KEY="client-test-$RANDOM$RANDOM"
OUT=$(mktemp)
GRATING_API_KEY="$KEY" ./target/release/grating serve --model "$MODEL" --port 0 >"$OUT" 2>"$OUT.log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; rm -f "$OUT" "$OUT.log"' EXIT
for _ in $(seq 1 200); do
    grep -q "listening on" "$OUT" && break
    kill -0 $PID 2>/dev/null || { cat "$OUT.log" >&2; exit 1; }
    sleep 0.1
done
URL=$(grep -o 'http://[0-9.:]*' "$OUT" | head -1)
[ -n "$URL" ] || { echo "server did not start" >&2; cat "$OUT.log" >&2; exit 1; }
"$VENV/bin/python" scripts/cohere_client_check.py "$URL" "$KEY"
kill -TERM $PID
wait $PID
trap - EXIT
rm -f "$OUT" "$OUT.log"
