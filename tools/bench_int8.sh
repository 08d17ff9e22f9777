#!/usr/bin/env bash
# Integer compute (`capt-export --int8`) against f32, issue 16:
#   accuracy — top-1 agreement and max |d prob| on the 80 DTD-10 test images, for
#     (a) the semantic fixture tuned with CAPT as tools/demo.sh tunes it (16 shots, 10 epochs),
#     (b) a random ViT-B/16-sized CLIP after one CAPT epoch (tools/bench_export.py make-b16);
#   speed — `capt-edge bench --compare`, int8 and f32 interleaved in one process (ratios,
#     not absolute times, are what carries across runs), onnxruntime b1 and b8, tract b1.
# Needs python3 (stdlib) for the comparison; B16_PY=/path/to/python with torch + transformers
# to make the ViT-B/16 (skipped when it cannot). ORT_DYLIB_PATH for the onnxruntime rows.
#   WORK=/tmp/capt-bench-int8 THREADS=2 ITERS=20
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/capt-bench-int8}
THREADS=${THREADS:-2}
ITERS=${ITERS:-20}
B16_PY=${B16_PY:-python3}
mkdir -p "$WORK"
cargo build --release -p capt-train -p capt-export -p capt-edge --features capt-edge/ort
bin=target/release
data=tests/fixtures/coop_full
split=$data/dtd/split_full_DescribableTextures.json
python3 - "$split" "$data/dtd/images" > "$WORK/test-images.txt" <<'PY'
import json, sys, os
for p, _, _ in json.load(open(sys.argv[1]))["test"]:
    print(os.path.join(sys.argv[2], p))
PY
mapfile -t images < "$WORK/test-images.txt"

backends=(tract)
[ -n "${ORT_DYLIB_PATH:-}" ] && backends+=(ort)

# classify DIR BACKEND OUT: JSON Lines with every class's probability.
classify() {
  local classes
  classes=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['class_names']))" "$1/capt.json")
  "$bin/capt-edge" classify --model "$1" --backend "$2" --threads "$THREADS" --json \
    --top-k "$classes" "${images[@]}" > "$3" 2> "$3.log"
}

# agreement NAME F32.jsonl INT8.jsonl
agreement() {
  python3 - "$@" <<'PY'
import json, sys
name, a, b = sys.argv[1:4]
def rows(f):
    out = []
    for line in open(f):
        r = json.loads(line)
        labels = r["top_k"]
        out.append({l["label"]: l["probability"] for l in labels})
    return out
fa, fb = rows(a), rows(b)
agree = sum(max(x, key=x.get) == max(y, key=y.get) for x, y in zip(fa, fb))
dprob = max(abs(x[k] - y[k]) for x, y in zip(fa, fb) for k in x)
print(f"{name}: top-1 agreement {agree}/{len(fa)} ({100 * agree / len(fa):.2f} %), max |d prob| {dprob:.2e}")
PY
}

# 1. The semantic fixture, tuned as the demo tunes it.
sem=$WORK/semantic
if [ ! -f "$sem/run/LATEST" ]; then
  "$bin/capt-train" fit --dataset dtd --root "$data" --split-file split_full_DescribableTextures.json \
    --backbone tests/fixtures/clip/semantic-64 --method capt --shots 16 --epochs 10 --seed 1 \
    --subsample all --out "$sem/run" --no-progress > "$sem.fit.log" 2>&1
fi
models=(semantic)

# 2. A random ViT-B/16-sized CLIP, one CAPT epoch on the small DTD fixture.
b16=$WORK/b16
if [ ! -f "$b16/clip/model.safetensors" ]; then
  "$B16_PY" tools/bench_export.py make-b16 "$b16/clip" > "$WORK/b16.make.log" 2>&1 \
    || echo "note: no ViT-B/16 (B16_PY needs torch + transformers; see $WORK/b16.make.log)"
fi
if [ -f "$b16/clip/model.safetensors" ]; then
  if [ ! -f "$b16/run/LATEST" ]; then
    printf 'method = "capt"\n[bank]\nviews = 1\n[optim]\nepochs = 1\nwarmup_epochs = 0\nbatch_size = 4\n[data]\nshots = 1\n' > "$b16/b16.toml"
    "$bin/capt-train" fit --dataset dtd --root tests/fixtures/coop --backbone "$b16/clip" \
      --config "$b16/b16.toml" --out "$b16/run" --no-progress > "$b16.fit.log" 2>&1
  fi
  models+=(b16)
fi

for m in "${models[@]}"; do
  dir=$WORK/$m
  for p in f32 int8; do
    flags=()
    [ "$p" = int8 ] && flags=(--int8)
    "$bin/capt-export" --checkpoint "$dir/run" --out "$dir/$p" --force --no-progress \
      --no-text-encoder --no-image-encoder "${flags[@]}" | grep -E "int8|classifier" || true
  done
  for be in "${backends[@]}"; do
    classify "$dir/f32" "$be" "$dir/f32.$be.jsonl"
    classify "$dir/int8" "$be" "$dir/int8.$be.jsonl"
    agreement "$m ($be)" "$dir/f32.$be.jsonl" "$dir/int8.$be.jsonl"
  done
done

# Speed: A = int8, B = f32, interleaved.
for m in "${models[@]}"; do
  dir=$WORK/$m
  echo "== $m: int8 (A) vs f32 (B)"
  if [ -n "${ORT_DYLIB_PATH:-}" ]; then
    "$bin/capt-edge" bench --model "$dir/int8" --compare "$dir/f32" --backend ort \
      --threads "$THREADS" --batch 1,8 --iters "$ITERS" 2>/dev/null | sed -n '/compared/,/^b1 p50/p' | grep -v "^b1 p50"
  fi
  "$bin/capt-edge" bench --model "$dir/int8" --compare "$dir/f32" --backend tract \
    --threads "$THREADS" --batch 1 --iters 5 2>/dev/null | sed -n '/compared/,/^b1 p50/p' | grep -v "^b1 p50"
done
