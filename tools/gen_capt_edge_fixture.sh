#!/usr/bin/env bash
# Regenerates tests/fixtures/edge/capt: a real CAPT model exported by capt-export (tiny CLIP
# of tests/fixtures/clip/tiny-hf, 2 epochs on the DTD sample), used by capt-edge's tests
# (classify on a CAPT export, add-class / remove-class through the CLI). ~0.8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p capt-train -p capt-export
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target/debug/capt-train fit --dataset dtd --root tests/fixtures/coop --backbone tests/fixtures/clip/tiny-hf \
  --config tests/fixtures/train/tiny.toml --out "$work/run" --seed 1 --no-progress
target/debug/capt-export --checkpoint "$work/run" --out tests/fixtures/edge/capt --force
