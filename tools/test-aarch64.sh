#!/usr/bin/env bash
# Cross-builds the edge stack for aarch64-unknown-linux-gnu (Jetson, ARM servers) with
# Debian's cross toolchain, runs its tests under qemu-user, and builds the release
# `capt-edge` binary for aarch64 (printing its size).
#
#   bash tools/test-aarch64.sh                 # tests + release binary
#   bash tools/test-aarch64.sh --no-default-features   # extra args go to `cargo test`
#                                                     # (this one: tract only, no ort backend)
#   CAPT_AARCH64_SKIP_RELEASE=1 bash tools/test-aarch64.sh   # tests only
#
# Needs a Debian/Ubuntu host; installs (once, with apt, as root or through sudo)
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user, and the rustup target.
# No binfmt_misc needed: cargo runs test binaries through the runner below, and the tests
# that spawn the `capt-edge` binary read the same runner variable (crates/capt-edge/tests/cli.rs).
# Honours CARGO_TARGET_DIR. Cold target dir, 2 busy cores: ~55 min (tests ~35-40 of which
# ~75 s emulated, release ~16); warm: ~2 min. Measured times in docs/edge-arm.md.
set -euo pipefail
cd "$(dirname "$0")/.."

triple=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
[ -e "$sysroot/lib/libc.so.6" ] && [ -e "$sysroot/include/stdio.h" ] || need+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
# With CAPT_AARCH64_SETUP_OPTIONAL=1 (the test command), a toolchain that cannot be set up
# skips the whole step with a notice instead of failing it; the tests themselves always gate.
setup_failed() {
  echo "notice: aarch64 step SKIPPED: $1" >&2
  if [ "${CAPT_AARCH64_SETUP_OPTIONAL:-0}" = 1 ]; then exit 0; fi
  exit 1
}
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "installing ${need[*]}"
  { "${sudo[@]}" apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"; } \
    || setup_failed "could not apt-get install ${need[*]} (needs root or sudo and a Debian mirror); install them and rerun tools/test-aarch64.sh"
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
  rustup target add "$triple" \
    || setup_failed "could not add the rust target $triple (rustup target add $triple)"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
# C and assembly of the -sys crates (mozjpeg-sys, tract-linalg's kernels) go through `cc`.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

start=$(date +%s)
cargo test --target "$triple" \
  -p capt-core -p capt-backend -p capt-backend-tract -p capt-edge "$@"
echo "aarch64 tests under qemu: $(( $(date +%s) - start )) s"

if [ "${CAPT_AARCH64_SKIP_RELEASE:-0}" != 1 ]; then
  start=$(date +%s)
  cargo build --release --target "$triple" -p capt-edge --bin capt-edge
  bin="${CARGO_TARGET_DIR:-target}/$triple/release/capt-edge"
  echo "aarch64 release build: $(( $(date +%s) - start )) s"
  file "$bin" 2>/dev/null || true
  echo "capt-edge ($triple, release): $(stat -c %s "$bin") bytes ($(du -h "$bin" | cut -f1))"
  # Smoke: the optimised emulated binary classifies the fixture images on tract.
  qemu-aarch64 -L "$sysroot" "$bin" --version
  qemu-aarch64 -L "$sysroot" "$bin" classify --backend tract --top-k 1 \
    --model tests/fixtures/edge/model tests/fixtures/edge/images
fi
