#!/usr/bin/env bash
# The main job (README: "Run the main job"): CAPT end to end on the bundled sample images.
#   1. validate the bundled DTD sample (CoOp layout),
#   2. zero-shot CLIP baseline report,
#   3. tune CAPT (Confusion Bank, SEM, SAM + Diff-Manner Adapter, MGDE),
#   4. evaluate it against the baseline (top-1, macro-F1, confusion heatmap, Correction Rate).
# Uses real weights from models/<name>/ (HF format: config.json + model.safetensors) when
# present, otherwise the small generated CLIP of the real architecture in tests/fixtures/clip.
# Environment: DATA (CoOp $DATA root, default the bundled sample), DATASET (default dtd),
# OUT (default runs/demo), EPOCHS (default 2), SHOTS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-tests/fixtures/coop}
DATASET=${DATASET:-dtd}
OUT=${OUT:-runs/demo}
EPOCHS=${EPOCHS:-2}
SHOTS=${SHOTS:-2}

backbone=""
for cfg in models/*/config.json; do
  if [ -f "$cfg" ] && [ -f "$(dirname "$cfg")/model.safetensors" ]; then
    backbone=$(dirname "$cfg")
    break
  fi
done
if [ -z "$backbone" ]; then
  backbone=tests/fixtures/clip/tiny-hf
  echo "note: no CLIP weights under models/ — using the generated small CLIP ($backbone);"
  echo "      its accuracy is meaningless, the pipeline is real. Put an HF CLIP in models/<name>/ for real numbers."
else
  echo "using CLIP weights from $backbone"
fi

cargo build --release -p capt-train
bin=target/release/capt-train

echo "== 1/4 data check"
"$bin" data check --dataset "$DATASET" --root "$DATA"

echo "== 2/4 zero-shot baseline"
"$bin" zeroshot --dataset "$DATASET" --root "$DATA" --backbone "$backbone" --out "$OUT/zeroshot"

echo "== 3/4 CAPT tuning"
"$bin" fit --dataset "$DATASET" --root "$DATA" --backbone "$backbone" --method capt \
  --shots "$SHOTS" --epochs "$EPOCHS" --seed 1 --subsample all --out "$OUT/capt"

echo "== 4/4 evaluation against the zero-shot baseline"
"$bin" eval --checkpoint "$OUT/capt" --dataset "$DATASET" --root "$DATA" --subsample all \
  --baseline "$OUT/zeroshot/report.json" --out "$OUT/capt-eval"

echo
echo "artefacts:"
echo "  zero-shot report : $OUT/zeroshot/report.md"
echo "  CAPT checkpoint  : $OUT/capt (training log: $OUT/capt/train.jsonl)"
echo "  CAPT report      : $OUT/capt-eval/report.md (heatmap: $OUT/capt-eval/confusion.png)"
