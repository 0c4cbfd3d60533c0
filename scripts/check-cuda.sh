#!/usr/bin/env bash
# check-cuda.sh — on a CPU machine (no GPU needed), check the CUDA and NCCL code that CI does
# not build: builds the `nccl` (= CUDA + NCCL) `relora` binary with scripts/build-for-device.sh
# (which installs the CUDA 13.0 toolkit from PyPI wheels on first use), runs clippy with
# `-D warnings` on every target with those features, and compiles the fused-op kernels
# (src/ops/kernels.cu) with NVRTC through the library's unit test, which needs libnvrtc but no
# GPU. Run it after changing CUDA code; the GPU checks themselves are scripts/gpu-check.sh.
#   usage: scripts/check-cuda.sh [TARGET_DIR]   (default: target-cuda13)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-$PWD/target-cuda13}
NCCL=1 bash scripts/build-for-device.sh . "$TARGET" -p relora-cli --features nccl

# The environment build-for-device.sh builds with.
P=${CUDA13_WORK:-$HOME/.cache/cuda13-toolkit}/cuda-13.0
export NVCC=$P/bin/nvcc CUDA_HOME=$P CUDA_PATH=$P CUDA_ROOT=$P CUDA_TOOLKIT_ROOT_DIR=$P
export PATH=$P/bin:$PATH CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$P/lib:$P/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
unset CUDNN_LIB

echo ">> clippy, features cuda + nccl, all targets"
cargo clippy --release --target-dir "$TARGET" -p relora-cli -p relora \
  --features relora-cli/nccl --all-targets -- -D warnings

echo ">> NVRTC compiles src/ops/kernels.cu"
test_bin=$(cargo test --release --target-dir "$TARGET" -p relora --features cuda --lib --no-run \
  --message-format=json |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | tail -n 1)
[ -n "$test_bin" ] || { echo "check-cuda: the library's CUDA test binary was not built" >&2; exit 1; }
# The test binary links libcuda.so.1, which a machine without a driver lacks: the toolkit's stub
# satisfies the loader (NVRTC never calls the driver).
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
ln -s "$P/lib/stubs/libcuda.so" "$stub/libcuda.so.1"
LD_LIBRARY_PATH="$stub:$P/lib" "$test_bin" --exact ops::cuda::tests::kernels_compile_with_nvrtc
echo ">> CUDA check passed"
