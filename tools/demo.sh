#!/usr/bin/env bash
# The main job (README: "Run the main job"): CAPT end to end on the bundled sample images.
#   1. validate the bundled DTD sample (CoOp layout),
#   2. zero-shot CLIP baseline report,
#   3. tune CAPT (Confusion Bank, SEM, SAM + Diff-Manner Adapter, MGDE),
#   4. evaluate it against the baseline (top-1, macro-F1, confusion heatmap, Correction Rate),
#   5. export it to ONNX (capt-export: classifier, text and image encoders, capt.json),
#   6. classify sample images with capt-edge on tract (the embedded default),
#   7. serve it over HTTP on loopback, classify through the API, and shut down gracefully.
# Uses real weights from models/<name>/ (HF format: config.json + model.safetensors) when
# present, otherwise the small CLIP pretrained here (tests/fixtures/clip/semantic-64, 64 px,
# trained on Caltech101 + DTD train/val images by tools/pretrain_clip.py): its features carry
# real classes, so the accuracies, confusions and heatmap are real, at a small model's level.
# Environment: DATA (CoOp $DATA root, default the bundled DTD-10 sample: 16 train and 8 test
# images per class), DATASET (default dtd), SPLIT_FILE (default the sample's
# split_full_DescribableTextures.json; empty = CoOp's split_zhou file), OUT (default
# runs/demo), EPOCHS (default 10), SHOTS (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-tests/fixtures/coop_full}
DATASET=${DATASET:-dtd}
if [ "$DATA" = tests/fixtures/coop_full ]; then
  SPLIT_FILE=${SPLIT_FILE-split_full_DescribableTextures.json}
else
  SPLIT_FILE=${SPLIT_FILE-}
fi
OUT=${OUT:-runs/demo}
EPOCHS=${EPOCHS:-10}
SHOTS=${SHOTS:-16}
split=()
if [ -n "$SPLIT_FILE" ]; then
  split=(--split-file "$SPLIT_FILE")
fi

backbone=""
for cfg in models/*/config.json; do
  if [ -f "$cfg" ] && [ -f "$(dirname "$cfg")/model.safetensors" ]; then
    backbone=$(dirname "$cfg")
    break
  fi
done
if [ -z "$backbone" ]; then
  backbone=tests/fixtures/clip/semantic-64
  echo "note: no CLIP weights under models/ — using the small CLIP pretrained here ($backbone,"
  echo "      9 M parameters, 64 px). Put an HF CLIP in models/<name>/ for full-size numbers."
else
  echo "using CLIP weights from $backbone"
fi

cargo build --release -p capt-train -p capt-export -p capt-edge
# Where cargo put them (CARGO_TARGET_DIR or build.target-dir may move them off ./target).
release=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
bin=$release/capt-train

# The demo's own output folders start fresh, so the demo can be rerun.
rm -rf "$OUT/zeroshot" "$OUT/capt" "$OUT/capt-eval" "$OUT/export"

echo "== 1/7 data check"
"$bin" data check --dataset "$DATASET" --root "$DATA" "${split[@]}"

echo "== 2/7 zero-shot baseline"
"$bin" zeroshot --dataset "$DATASET" --root "$DATA" "${split[@]}" --backbone "$backbone" --out "$OUT/zeroshot"

echo "== 3/7 CAPT tuning"
"$bin" fit --dataset "$DATASET" --root "$DATA" "${split[@]}" --backbone "$backbone" --method capt \
  --shots "$SHOTS" --epochs "$EPOCHS" --seed 1 --subsample all --out "$OUT/capt"

echo "== 4/7 evaluation against the zero-shot baseline"
"$bin" eval --checkpoint "$OUT/capt" --dataset "$DATASET" --root "$DATA" "${split[@]}" --subsample all \
  --baseline "$OUT/zeroshot/report.json" --out "$OUT/capt-eval"

echo "== 5/7 export to ONNX"
"$release/capt-export" --checkpoint "$OUT/capt" --out "$OUT/export" --force

# A few test images of the dataset, one per class, as its split file lists them.
mapfile -t imgs < <("$bin" data samples --dataset "$DATASET" --root "$DATA" "${split[@]}" --n 3)

echo "== 6/7 classify with capt-edge (tract)"
"$release/capt-edge" classify --model "$OUT/export" --top-k 3 "${imgs[@]}"

echo "== 7/7 serve over HTTP (loopback) and classify through the API"
port=${PORT:-18089}
"$release/capt-edge" serve --model "$OUT/export" --addr "127.0.0.1:$port" > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/v1/model" | python3 -c 'import json,sys; m=json.load(sys.stdin); print("model:", {k: m[k] for k in m if k in ("name", "method", "version", "num_classes", "backend")})'
curl -sf -X POST --data-binary "@${imgs[0]}" -H 'content-type: application/octet-stream' \
  "http://127.0.0.1:$port/v1/classify?top_k=3"
echo
kill -TERM $server
wait $server || true
trap - EXIT

echo
echo "artefacts:"
echo "  zero-shot report : $OUT/zeroshot/report.md"
echo "  CAPT checkpoint  : $OUT/capt/checkpoint (training log: $OUT/capt/log.txt, per epoch: $OUT/capt/log.jsonl)"
echo "  CAPT report      : $OUT/capt-eval/report.md (labelled heatmap: $OUT/capt-eval/heatmap-all.svg)"
echo "  exported model   : $OUT/export (capt.json, classifier.onnx, text_encoder.onnx, image_encoder.onnx)"
echo "  server log       : $OUT/serve.log"
