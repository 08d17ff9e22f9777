#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU and driver but no Rust and no network: checks the
# CUDA build of capt-train (built elsewhere by tools/build-cuda.sh and carried along with the
# repository's fixtures) and writes one JSON file.
#
#   bash tools/gpu-check.sh [--dry-run] [--bin PATH] [--out FILE] [--python PY]
#
# --bin defaults to target/cuda/release/capt-train, or its .gz next to it (a path ending in .gz
# is unpacked to a temporary folder first).
# --smoke: run every check on the CPU at toy sizes (tiny model, a few steps), comparing CPU with
# CPU: tests this script's plumbing on a machine without a GPU (CI does), measures nothing.
#
# Checks (thresholds in the JSON next to each number):
#   forward_f32 / forward_bf16  CLIP towers of the semantic fixture on CUDA vs CPU f32:
#                               normalised features, max |diff| <= 1e-4 (f32), <= 2e-2 (bf16)
#   fit_f32                     a 2-epoch CAPT fit (DTD-10 fixture) on CUDA vs CPU: per-epoch
#                               loss within 1e-3
#   fit_bf16                    the same fit on CUDA with a bf16 backbone vs CUDA f32: loss
#                               within 2 % (learned tensors and optimizer state stay f32)
#   train_step                  ViT-B/16 text tower, 100 classes: CoOp/CAPT ms per step on the
#                               GPU, and PyTorch eager's CoOp step on the same GPU as the anchor
#   throughput_f32 / _bf16      images/s of the ViT-B/16 image encoder (random weights), batch 64
# Libraries: the binary links libcuda.so.1 (the driver's), and the toolkit's libcudart,
# libcublas(Lt), libcurand and libnvrtc of the CUDA major it was built with; they are looked up
# in $CUDA_LIB_DIRS, the Python's site-packages/nvidia/*/lib (a PyTorch install has them),
# /usr/local/cuda/lib64 and the driver's folders.
# --dry-run: parse the arguments, find the binary, the libraries and the GPU, write the JSON
# (status "dry-run") and run nothing; "no GPU" is reported, not an error. Exit: 0 = all checks
# pass (or dry run), 1 = a check failed, 2 = cannot run (no binary, no GPU, missing library).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
smoke=0
bin=target/cuda/release/capt-train
out=gpu-check.json
py=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --smoke) smoke=1 ;;
    --bin) bin=${2:?--bin needs a path}; shift ;;
    --out) out=${2:?--out needs a path}; shift ;;
    --python) py=${2:?--python needs an interpreter}; shift ;;
    -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "gpu-check: $*" >&2; }

# Results are lines of JSON in $work/results; the last step assembles them into $out.
note() { printf '%s\n' "$1" >>"$work/results"; }
finish() {
  local status=$1
  "$py" - "$work/results" "$out" "$status" "$(($(date +%s) - start))" <<'EOF'
import json, os, sys
doc = {"status": sys.argv[3], "seconds": int(sys.argv[4]), "setup": {}, "checks": {}}
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        section = r.pop("section")
        if section == "setup":
            doc["setup"].update(r)
        else:
            doc["checks"][section] = r
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(doc, f, indent=2)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
  say "wrote $out (status $status)"
}
json_str() { "$py" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

if ! command -v "$py" >/dev/null; then
  echo "gpu-check: $py not found: the script needs python3 (pass --python)" >&2
  exit 2
fi
: >"$work/results"

# --- the binary ---------------------------------------------------------------------------
# tools/build-cuda.sh also writes a gzip copy (a third of the size) for carrying.
if [ ! -e "$bin" ] && [ -f "$bin.gz" ]; then
  bin="$bin.gz"
fi
if [ -f "$bin" ] && [ "${bin%.gz}" != "$bin" ]; then
  gunzip -c "$bin" >"$work/capt-train" && chmod +x "$work/capt-train" && bin="$work/capt-train"
fi
if [ ! -x "$bin" ]; then
  say "no capt-train binary at $bin: build it with bash tools/build-cuda.sh and carry target/cuda/release/capt-train (or pass --bin)"
  note "{\"section\":\"setup\",\"binary\":$(json_str "$bin"),\"binary_found\":false}"
  finish "cannot-run"
  exit 2
fi
note "{\"section\":\"setup\",\"binary\":$(json_str "$bin"),\"binary_found\":true}"

# --- the libraries ---------------------------------------------------------------------------
dirs=()
IFS=: read -r -a user_dirs <<<"${CUDA_LIB_DIRS:-}"
for d in "${user_dirs[@]}"; do [ -n "$d" ] && dirs+=("$d"); done
while IFS= read -r d; do dirs+=("$d"); done < <("$py" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            print(d)
EOF
)
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && dirs+=("$d")
done
# The loader's default folders are searched anyway; naming them in LD_LIBRARY_PATH would put
# the system's libraries before a Python's own (a pyenv python then loads Debian's libpython).
system_dirs=(/usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu)
libpath=$(IFS=:; echo "${dirs[*]}")
if [ -n "$libpath" ]; then
  export LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
missing=()
cuda_build=false
if command -v ldd >/dev/null; then
  deps=$(ldd "$bin" 2>/dev/null || true)
  while IFS= read -r lib; do missing+=("$lib"); done < <(awk '/not found/ {print $1}' <<<"$deps")
  grep -q 'libcuda\.so' <<<"$deps" && cuda_build=true
fi
if [ "$cuda_build" = false ]; then
  say "$bin does not link libcuda: not a CUDA build (bash tools/build-cuda.sh makes one)"
fi
note "{\"section\":\"setup\",\"cuda_build\":$cuda_build}"
msgs=()
for lib in "${missing[@]}"; do
  # One line per library: the version wanted and what the search found instead.
  stem=${lib%%.so*}
  found=$(for d in "${dirs[@]}" "${system_dirs[@]}"; do ls "$d/$stem".so.* 2>/dev/null; done | xargs -r -n1 basename | sort -u | tr '\n' ' ')
  if [ "$lib" = libcuda.so.1 ]; then
    msg="$lib (the NVIDIA driver) not found${found:+; found $found}: install the driver or add its folder to CUDA_LIB_DIRS"
  else
    msg="$lib (wanted by this build) not found${found:+; found only $found (another CUDA major: rebuild with tools/build-cuda.sh for it)}; searched $((${#dirs[@]} + ${#system_dirs[@]})) folders (CUDA_LIB_DIRS adds more)"
  fi
  say "$msg"
  msgs+=("$msg")
done
missing_json=$("$py" -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${msgs[@]}")
note "{\"section\":\"setup\",\"library_dirs\":$("$py" -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${dirs[@]}"),\"missing_libraries\":$missing_json}"

# --- the GPU ----------------------------------------------------------------------------------
gpu=""
if command -v nvidia-smi >/dev/null; then
  gpu=$(nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>/dev/null | head -n1)
fi
if [ -z "$gpu" ]; then
  say "no GPU: nvidia-smi $(command -v nvidia-smi >/dev/null && echo 'lists none' || echo 'not found')"
  note '{"section":"setup","gpu":null,"gpu_note":"no GPU: nvidia-smi not found or lists no GPU"}'
else
  say "GPU: $gpu"
  note "{\"section\":\"setup\",\"gpu\":$(json_str "$gpu")}"
fi
if [ "$dry" = 1 ]; then
  finish "dry-run"
  exit 0
fi
# Sizes of the checks: the real ones, or toys on the CPU (--smoke).
dev=cuda big=b16 classes=100 steps=10 fbatch=64 fiters=10
if [ "$smoke" = 1 ]; then
  dev=cpu big=tiny classes=10 steps=2 fbatch=8 fiters=1
  note '{"section":"setup","smoke":true}'
else
  if [ -z "$gpu" ]; then
    finish "no-gpu"
    exit 2
  fi
  if [ ${#missing[@]} -gt 0 ] || [ "$cuda_build" = false ]; then
    finish "cannot-run"
    exit 2
  fi
fi

# --- the checks ----------------------------------------------------------------------------------
failed=0
run() { # name, then the command; stdout's last JSON line is kept in $work/<name>.json
  local name=$1
  shift
  say "$name: $*"
  if ! "$@" >"$work/$name.out" 2>"$work/$name.err"; then
    say "$name failed: $(tail -n 3 "$work/$name.err" | tr '\n' ' ')"
    note "{\"section\":\"$name\",\"pass\":false,\"error\":$(json_str "$(tail -n 5 "$work/$name.err")")}"
    failed=1
    return 1
  fi
  { grep '^{' "$work/$name.out" || true; } | tail -n1 >"$work/$name.json"
}
judge() { # name, python expression over `r` (the JSON) giving (pass, extra dict)
  "$py" - "$work/$1.json" "$1" "$2" >>"$work/results" <<'EOF' || failed=1
import json, sys
r = json.load(open(sys.argv[1]))
ok, extra = eval(sys.argv[3], {"r": r})
r.update(extra)
r["pass"] = bool(ok)
r["section"] = sys.argv[2]
print(json.dumps(r))
sys.exit(0 if ok else 1)
EOF
}

sem=tests/fixtures/clip/semantic-64
for dt in f32 bf16; do
  tol=$([ "$dt" = f32 ] && echo 1e-4 || echo 2e-2)
  run "forward_$dt" "$bin" bench forward --backbone $sem --device $dev --dtype $dt --batch 16 --iters 3 &&
    judge "forward_$dt" "(max(r['image_max_abs_diff'], r['text_max_abs_diff']) <= $tol, {'tolerance': $tol})"
done

fit() { # out, device, dtype
  "$bin" fit --dataset dtd --root tests/fixtures/coop_full --split-file split_full_DescribableTextures.json \
    --backbone $sem --method capt --epochs 2 --shots 16 --seed 1 --subsample base --no-progress \
    --out "$1" --device "$2" --dtype "$3"
}
losses() { "$py" -c 'import json,sys; print(json.dumps([json.loads(l)["loss"] for l in open(sys.argv[1])]))' "$1/log.jsonl"; }
if run fit_cpu fit "$work/fit-cpu" cpu f32 && run fit_cuda fit "$work/fit-cuda" $dev f32; then
  echo "{\"cpu\": $(losses "$work/fit-cpu"), \"cuda\": $(losses "$work/fit-cuda")}" >"$work/fit_f32.json"
  judge fit_f32 "(max(abs(a-b) for a,b in zip(r['cpu'], r['cuda'])) <= 1e-3, {'max_abs_diff': max(abs(a-b) for a,b in zip(r['cpu'], r['cuda'])), 'tolerance': 1e-3})"
  if run fit_cuda_bf16 fit "$work/fit-cuda-bf16" $dev bf16; then
    echo "{\"f32\": $(losses "$work/fit-cuda"), \"bf16\": $(losses "$work/fit-cuda-bf16")}" >"$work/fit_bf16.json"
    judge fit_bf16 "(max(abs(a-b)/abs(a) for a,b in zip(r['f32'], r['bf16'])) <= 0.02, {'max_rel_diff': max(abs(a-b)/abs(a) for a,b in zip(r['f32'], r['bf16'])), 'tolerance': 0.02})"
  fi
fi

torch_args=()
if "$py" -c "import torch, sys; sys.exit(0 if '$dev' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; then
  torch_args=(--torch "$py")
else
  say "PyTorch for --device $dev not importable by $py: train_step runs without its anchor"
fi
run train_step "$bin" bench train-step --size $big --classes $classes --steps $steps --device $dev ${torch_args[@]+"${torch_args[@]}"} &&
  judge train_step "(True, {'candle_coop_over_torch': r['train_step'][0]['ms_per_step'] / r['torch'][0]['ms_per_step_truncated'] if r['torch'] else None})"

for dt in f32 bf16; do
  run "throughput_$dt" "$bin" bench forward --backbone $big --device $dev --dtype $dt --batch $fbatch --iters $fiters &&
    judge "throughput_$dt" "(True, {})"
done

if [ "$failed" = 0 ]; then finish "pass"; else finish "fail"; fi
exit "$failed"
