#!/usr/bin/env bash
# Builds capt-train with `--features cuda` (release) against the PyPI CUDA toolkit of
# tools/cuda-env.sh, on any x86-64 Linux machine: no GPU, driver or root needed. Prints the
# binary's path on the last line. Its own target dir (target/cuda) keeps the CPU build's cache.
#
#   bash tools/build-cuda.sh             # CUDA 13.0, PTX for compute 8.0+ (see cuda-env.sh)
#   CAPT_CUDA=12.8 bash tools/build-cuda.sh
#
# capt-export and capt-edge have no CUDA build here: export runs on the CPU, and the edge
# runtime reaches the GPU through ONNX Runtime's CUDA/TensorRT providers (`--backend ort`).
#
# Exit 3 = PyPI unreachable (the test command then skips this step with a notice).
set -euo pipefail
cd "$(dirname "$0")/.."

env_lines=$(bash tools/cuda-env.sh) || exit $?
eval "$env_lines"
export CARGO_TARGET_DIR=${CAPT_CUDA_TARGET_DIR:-target/cuda}
# nvcc runs a compile per kernel file in parallel; on a small machine one at a time leaves
# room for rustc and keeps memory in bounds.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}

echo "build-cuda: CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP target=$CARGO_TARGET_DIR" >&2
start=$(date +%s)
cargo build --release -p capt-train --features cuda >&2
bin="$CARGO_TARGET_DIR/release/capt-train"

# The binary must ask for the driver's libcuda.so.1 and the toolkit's versioned libraries
# (found at run time from the GPU machine), never for the stub's path.
needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')
for lib in libcuda.so.1 libcublas.so libcurand.so libcudart.so; do
  case " $needed" in
    *" $lib"*) ;;
    *) echo "build-cuda: $bin does not link $lib (needs: $needed)" >&2; exit 1 ;;
  esac
done
# Without a driver, the binary runs on the CPU, and `--device cuda` gets one line that names
# the driver library (here the link stub stands in for it), not a panic.
stubdir=$(mktemp -d)
trap 'rm -rf "$stubdir"' EXIT
ln -s "$CUDA_ROOT/lib/stubs/libcuda.so" "$stubdir/libcuda.so.1"
export LD_LIBRARY_PATH="$stubdir:$CUDA_ROOT/lib"
"$bin" bench forward --backbone tiny --batch 2 --iters 1 >/dev/null 2>"$stubdir/cpu.err" || {
  echo "build-cuda: $bin failed on the CPU: $(cat "$stubdir/cpu.err")" >&2
  exit 1
}
if "$bin" bench forward --backbone tiny --device cuda >/dev/null 2>"$stubdir/err"; then
  echo "build-cuda: --device cuda succeeded against the link stub" >&2
  exit 1
fi
if ! grep -q "libcuda.so.1" "$stubdir/err" || grep -q "panicked" "$stubdir/err"; then
  echo "build-cuda: --device cuda without a driver should name libcuda.so.1 in one line; got: $(cat "$stubdir/err")" >&2
  exit 1
fi
echo "build-cuda: without a driver: $(cat "$stubdir/err")" >&2
unset LD_LIBRARY_PATH
# The GPU check's plumbing, end to end on the CPU with this binary (tools/gpu-check.sh --smoke:
# toy sizes, ~20 s); CAPT_CUDA_SMOKE=0 skips it.
if [ "${CAPT_CUDA_SMOKE:-1}" != 0 ]; then
  CUDA_LIB_DIRS="$CUDA_ROOT/lib:$stubdir" bash tools/gpu-check.sh --smoke --bin "$bin" \
    --out "$CARGO_TARGET_DIR/gpu-check-smoke.json" >&2 || {
    echo "build-cuda: tools/gpu-check.sh --smoke failed: $CARGO_TARGET_DIR/gpu-check-smoke.json" >&2
    exit 1
  }
fi
# A gzip copy to carry to a GPU machine (the binary is ~65 MB, mostly candle's kernel images;
# compressed ~18 MB): tools/gpu-check.sh takes either.
gzip -c "$bin" >"$bin.gz.tmp" && mv "$bin.gz.tmp" "$bin.gz"
echo "build-cuda: built in $(($(date +%s) - start)) s; needs: $needed; carry $bin or $bin.gz" >&2
echo "$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
