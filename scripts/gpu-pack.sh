#!/usr/bin/env bash
# Builds the CUDA binary (if needed) and packs it for a GPU machine: stripped and xz-compressed
# (about 9 MB instead of 186 MB) into .gpu/xtask.xz, which scripts/gpu-check.sh accepts directly.
# Usage: bash scripts/gpu-pack.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(bash scripts/cuda-toolchain.sh)"
cargo build --release -p xtask --features cuda
mkdir -p .gpu
strip -o .gpu/xtask "$CARGO_TARGET_DIR/release/xtask"
xz -6 -T2 -f .gpu/xtask
ls -la .gpu/xtask.xz
