#!/usr/bin/env bash
# Format and lint gate for contributors: rustfmt check and clippy with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The CUDA-only code (cfg(feature = "cuda")), where tools/build-cuda.sh has set up its toolkit:
# release profile in target/cuda, so candle's kernel build is the one build-cuda.sh already ran.
if [ -f .venv-cuda/cuda-"${CAPT_CUDA:-13.0}"/.complete ]; then
  eval "$(bash tools/cuda-env.sh)"
  CARGO_TARGET_DIR=target/cuda cargo clippy --release -p capt-train --features cuda --all-targets -- -D warnings
fi
