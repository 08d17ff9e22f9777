#!/usr/bin/env bash
# Export benchmark at ViT-B/16 size (issue "capt-export"): random B/16 CLIP (HF format), a short
# CAPT run on the bundled DTD sample, `capt-export` time and file sizes (f32 / f16 / int8),
# parity of the exported classifier with `capt-train eval` (the capt-export test suite does the
# same on the tiny model), capt-edge latency (tract, and ort when ORT_DYLIB_PATH is set), and
# python onnxruntime timings of classifier.onnx vs the bare image encoder exported from PyTorch.
#   PY=/path/to/python (torch, transformers, onnx, onnxruntime)  WORK=/tmp/capt-bench-export
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/tmp/capt-bench-export}
mkdir -p "$WORK"
cargo build --release -p capt-train -p capt-export -p capt-edge
bin=target/release
b16=$WORK/clip-b16
[ -f "$b16/model.safetensors" ] || "$PY" tools/bench_export.py make-b16 "$b16"
if [ ! -f "$WORK/run/LATEST" ]; then
  cat > "$WORK/b16.toml" <<'TOML'
method = "capt"
[bank]
views = 1
[optim]
epochs = 1
warmup_epochs = 0
batch_size = 4
[data]
shots = 1
TOML
  "$bin/capt-train" fit --dataset dtd --root tests/fixtures/coop --backbone "$b16" \
    --config "$WORK/b16.toml" --out "$WORK/run" --no-progress
fi
# Parity with capt-train eval (and text-encoder parity, f16/int8 agreement) at ViT-B/16 size.
# (int8 compute against f32, accuracy and speed: tools/bench_int8.sh.)
CAPT_EXPORT_BACKBONE="$(cd "$b16" && pwd)" cargo test --release -p capt-export --test export -- \
  --nocapture --test-threads 1 classifier_matches text_encoder_reproduces f16_and_int8 2>&1 \
  | grep -E "max|agreement|test result|panicked"
for p in f32 f16 int8 int8-weights; do
  flags="--precision f32"
  [ "$p" = f16 ] && flags="--precision f16"
  [ "$p" = int8 ] && flags="--int8"
  [ "$p" = int8-weights ] && flags="--int8 weights"
  /usr/bin/time -f "export $p: %e s wall, %M KB peak RSS" \
    "$bin/capt-export" --checkpoint "$WORK/run" --out "$WORK/export-$p" --force $flags
done
"$bin/capt-edge" bench --model "$WORK/export-f32" --backend tract --batch 1,8 --threads 2
if [ -n "${ORT_DYLIB_PATH:-}" ]; then
  "$bin/capt-edge" bench --model "$WORK/export-f32" --backend ort --batch 1,8 --threads 2
fi
"$PY" tools/bench_export.py time "$WORK/export-f32" --backbone "$b16" --threads 2
