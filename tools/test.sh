#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Sets up what the tests need on a
# fresh machine, then checks formatting and runs the whole workspace test suite (clippy:
# tools/lint.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# ONNX Runtime for the ort backend tests and the Python ONNX checker (tools/check_onnx.py):
# the PyPI wheel ships libonnxruntime.so (ort's load-dynamic finds it through ORT_DYLIB_PATH).
# On by default (CI included) wherever python3 can make a venv and reach PyPI; CAPT_WITH_PY=0
# turns it off, and a machine without python3/PyPI gets a notice and those tests skip. With
# onnxruntime 1.32 the ort tests of capt-backend-ort, capt-edge and capt-export pass, and the
# exported files pass onnx.checker(full_check) + an onnxruntime session.
venv=.venv-test
if [ -z "${ORT_DYLIB_PATH:-}" ] && [ "${CAPT_WITH_PY:-1}" = 1 ]; then
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || echo "notice: python3 -m venv failed; ort and checker tests will skip"
  fi
  if [ -x "$venv/bin/pip" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check onnxruntime==1.32.0 onnx==1.23.2 numpy==2.4.6 requests==2.32.5 \
      || echo "notice: could not install onnxruntime/onnx from PyPI; ort and checker tests will skip"
  fi
  lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
  if [ -n "$lib" ]; then
    export ORT_DYLIB_PATH="$PWD/$lib"
  fi
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import onnx" 2>/dev/null; then
    export CAPT_PYTHON="$PWD/$venv/bin/python"
  fi
fi
echo "ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-<unset>} CAPT_PYTHON=${CAPT_PYTHON:-<unset>}"

cargo fmt --all --check
# Lint (clippy -D warnings) is `bash tools/lint.sh`; the test gate runs the suite.
cargo test --workspace "$@"

# The CUDA trainer compiled and linked (tools/build-cuda.sh): CUDA 13.0 toolkit wheels from PyPI
# into .venv-cuda (~1.2 GB), a libcuda link stub, `cargo build --release -p capt-train --features
# cuda` in target/cuda, then the binary's CPU path and its no-driver error are checked. No GPU is
# needed or used (tools/gpu-check.sh is the GPU check). CAPT_CUDA_BUILD=0 skips it; where PyPI
# cannot be reached it is skipped with a notice; any other failure fails this command.
if [ "${CAPT_CUDA_BUILD:-1}" != 0 ]; then
  rc=0
  bash tools/build-cuda.sh || rc=$?
  if [ "$rc" = 3 ]; then
    echo "notice: PyPI not reachable: the CUDA build was not checked"
  elif [ "$rc" != 0 ]; then
    exit "$rc"
  fi
fi

# The edge runtime cross-compiled for aarch64 (Jetson / ARM boxes), its tests under qemu-user
# (tools/test-aarch64.sh, tests only here; the release binary is built by the script when run
# by hand). On by default, CI included: cold 20 min on 2 cores while another build shared them
# (85 tests; the native suite above ~11 min), warm ~2 min.
# CAPT_AARCH64=0 skips it; when the cross toolchain can neither be found nor installed (no
# root, no Debian mirror) the step says so and is skipped, so the native suite above still
# gates a machine without apt. A test that fails under qemu fails this command.
if [ "${CAPT_AARCH64:-1}" != 0 ]; then
  # The ONNX Runtime above is an x86_64 library: the emulated tests must not load it.
  env -u ORT_DYLIB_PATH CAPT_AARCH64_SKIP_RELEASE=1 CAPT_AARCH64_SETUP_OPTIONAL=1 \
    bash tools/test-aarch64.sh
fi
