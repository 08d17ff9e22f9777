#!/usr/bin/env bash
# Load test of `capt-edge serve` on this machine only (127.0.0.1), bounded in time.
#
#   deploy/loadtest.sh [MODEL_DIR] [IMAGE]
#
# Defaults: the committed fixture model and image. Environment knobs:
#   CAPT_EDGE=path/to/capt-edge   binary to use (default: build --release into $CARGO_TARGET_DIR or target/)
#   BACKEND=tract|ort  CONCURRENCY=1,8,32  SECONDS_PER_LEVEL=5  PORT=18080
#   MAX_BATCH=8  MAX_WAIT_MS=0  QUEUE=256  THREADS=0  (for ort also ORT_DYLIB_PATH)
# Prints throughput and p50/p90/p99 per concurrency level, the server overhead at
# concurrency 1, and fails (exit 1) on any non-2xx answer: the queue is sized above 32
# clients, so every request must succeed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL="${1:-$ROOT/tests/fixtures/edge/model}"
IMAGE="${2:-$ROOT/tests/fixtures/edge/images/waves_48x40.jpg}"
PORT="${PORT:-18080}"
BACKEND="${BACKEND:-tract}"
CONCURRENCY="${CONCURRENCY:-1,8,32}"
SECONDS_PER_LEVEL="${SECONDS_PER_LEVEL:-5}"
if [[ -z "${CAPT_EDGE:-}" ]]; then
  cargo build --release -p capt-edge --manifest-path "$ROOT/Cargo.toml" >&2
  CAPT_EDGE="${CARGO_TARGET_DIR:-$ROOT/target}/release/capt-edge"
fi
LOG="$(mktemp)"
"$CAPT_EDGE" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --backend "$BACKEND" \
  --threads "${THREADS:-0}" --max-batch "${MAX_BATCH:-8}" --max-wait-ms "${MAX_WAIT_MS:-0}" \
  --queue-capacity "${QUEUE:-256}" 2>"$LOG" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
"$CAPT_EDGE" loadtest --addr "127.0.0.1:$PORT" --image "$IMAGE" --concurrency "$CONCURRENCY" \
  --seconds "$SECONDS_PER_LEVEL" --wait-ready 120 --fail-on-error || { cat "$LOG" >&2; exit 1; }
