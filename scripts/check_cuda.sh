#!/usr/bin/env bash
# The CUDA path's CI step, on a machine without a GPU: installs the CUDA 13.0 compiler from
# PyPI (scripts/setup_cuda.sh), checks the kernels' formatting, builds the `cuda` feature (nvcc
# compiles every kernel and ptxas assembles it for sm_80 and sm_90), lints it, and runs its
# tests, whose GPU twins report that they were skipped. The GPU itself is exercised by
# scripts/gpu_check.sh on a machine that has one.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cuda: toolchain from PyPI"
# shellcheck source=scripts/setup_cuda.sh
source scripts/setup_cuda.sh
# Locally, a target folder of its own, so that building the feature does not hold up the
# default build; in CI (CI=true) the default one, whose dependencies the earlier steps built.
if [[ -n "${CBCE_CUDA_TARGET_DIR:-}" ]]; then
    export CARGO_TARGET_DIR="$CBCE_CUDA_TARGET_DIR"
elif [[ "${CI:-}" != true ]]; then
    export CARGO_TARGET_DIR=target/cuda
fi

step "cuda: kernel formatting"
clang-format --dry-run --Werror kernels/*.cu kernels/*.cuh

step "cuda: build (nvcc, ptxas for sm_80 and sm_90)"
cargo build --features cuda --quiet

step "cuda: lints"
cargo clippy --features cuda --all-targets --quiet -- -D warnings

step "cuda: tests without a driver (fatbin contents, cpu twins, skipped cuda twins)"
cargo test --features cuda --quiet --lib --test cuda --test c_api --test header

step "cuda: tests with a stub driver that loads but has no device"
LD_LIBRARY_PATH="$CUDA_PATH/lib64/stubs" cargo test --features cuda --quiet --test cuda --test c_api
