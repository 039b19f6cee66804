#!/usr/bin/env bash
# Runs every test of the project, after installing what they need (scripts/setup.sh).
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup"
scripts/setup.sh

step "rust: formatting"
cargo fmt --check

step "rust: lints"
cargo clippy --all-targets --quiet -- -D warnings

step "rust: unit, api, c-abi and reference-vector tests"
cargo test --quiet

step "clients: install, C and C++ examples (CTest, valgrind), pkg-config, Python, Rust examples"
scripts/test_clients.sh

step "reliability: C ABI under sanitizers and valgrind, examples under sanitizers, bounded fuzz"
scripts/test_reliability.sh

step "distributed: the MPI example on 2 and 4 ranks, the torch.distributed example (skipped without torch)"
scripts/test_distributed.sh

step "cuda: PyPI toolchain, build and lints of the cuda feature (kernels for sm_80 and sm_90), its tests"
scripts/check_cuda.sh
