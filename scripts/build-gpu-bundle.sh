#!/usr/bin/env bash
# build-gpu-bundle.sh — on a CPU machine, build the CUDA `relora` binary and the CUDA test binary
# (tests/cuda.rs) with scripts/build-for-device.sh, and pack them, stripped, into
# gpu-bundle.tar.xz for the GPU machine (which has no Rust toolchain). scripts/gpu-check.sh
# unpacks it there.
#   usage: scripts/build-gpu-bundle.sh [TARGET_DIR]   (default: target-cuda13)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-$PWD/target-cuda13}
bash scripts/build-for-device.sh . "$TARGET" -p relora-cli --features cuda
bash scripts/build-for-device.sh . "$TARGET" -p relora --features cuda --test cuda
rm -rf gpu-bundle && mkdir -p gpu-bundle
cp "$TARGET/release/relora" gpu-bundle/relora
test_bin=$(ls -t "$TARGET"/release/deps/cuda-* | grep -v '\.d$' | head -n 1)
cp "$test_bin" gpu-bundle/cuda-tests
# The NCCL build separately: it needs libnccl.so.2 at load time, and a machine without it must
# still run everything else.
NCCL=1 bash scripts/build-for-device.sh . "$TARGET" -p relora-cli --features nccl
NCCL=1 bash scripts/build-for-device.sh . "$TARGET" -p relora --features nccl --test nccl
cp "$TARGET/release/relora" gpu-bundle/relora-nccl
test_bin=$(ls -t "$TARGET"/release/deps/nccl-* | grep -v '\.d$' | head -n 1)
cp "$test_bin" gpu-bundle/nccl-tests
strip gpu-bundle/relora gpu-bundle/cuda-tests gpu-bundle/relora-nccl gpu-bundle/nccl-tests
tar -C . -cf - gpu-bundle | xz -9e -T0 > gpu-bundle.tar.xz
ls -l gpu-bundle gpu-bundle.tar.xz
