#!/usr/bin/env bash
# The GPU check of the CUDA path, in two halves so that the GPU machine needs no Rust:
#
#   scripts/gpu_check.sh build   on any machine with cargo (no GPU needed): installs the CUDA
#                                compiler (scripts/setup_cuda.sh) and builds, in release, the
#                                shared library and the CUDA test binary into target/gpu-bundle
#   scripts/gpu_check.sh run     on the GPU machine, from the repository root, with
#                                target/gpu-bundle carried along: runs the CUDA tests (each test
#                                body on the GPU against the CPU), the reference cases against
#                                PyTorch's CUDA cross_entropy, and the benchmark, in under five
#                                minutes, and writes a short report
#   scripts/gpu_check.sh         both, on a machine with cargo and a GPU
#
# The report goes to $CBCE_GPU_REPORT, else $OUT/gpu_report.md when OUT is set, else
# target/gpu-bundle/gpu_report.md. The reference vectors are $CBCE_REFERENCE_VECTORS, else the
# first of shared/vectors/reference.json, ../shared/vectors/reference.json and the copy that
# `build` puts into the bundle.
# Python is $PYTHON, else python3 (it needs PyTorch with CUDA for the comparison and the
# benchmark). A part that skips for want of a GPU or of PyTorch counts as failed, unless
# CBCE_GPU_CHECK_ALLOW_SKIP=1 (for trying the script on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle

build() {
    # shellcheck source=scripts/setup_cuda.sh
    source scripts/setup_cuda.sh
    export CARGO_TARGET_DIR=target/cuda-release
    cargo build --release --features cuda --lib --quiet
    local tests
    tests="$(cargo test --release --features cuda --test cuda --no-run --message-format=json --quiet |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')"
    mkdir -p "$bundle"
    cp "$CARGO_TARGET_DIR/release/libcbce.so" "$bundle/libcbce.so"
    cp "$tests" "$bundle/cuda-tests"
    # The vectors travel with the bundle too, for a GPU machine that has no shared/ folder.
    local vectors="${CBCE_REFERENCE_VECTORS:-../shared/vectors/reference.json}"
    if [[ -f "$vectors" ]]; then
        cp "$vectors" "$bundle/reference.json"
    fi
    strip --strip-debug "$bundle/libcbce.so" "$bundle/cuda-tests"
    du -sh "$bundle"
    echo "gpu_check: bundle ready; on the GPU machine run: scripts/gpu_check.sh run (carry $bundle)"
}

run() {
    local report="${CBCE_GPU_REPORT:-${OUT:+$OUT/gpu_report.md}}"
    report="${report:-$bundle/gpu_report.md}"
    local logs
    logs="$(dirname "$report")"
    mkdir -p "$logs"
    local vectors="${CBCE_REFERENCE_VECTORS:-}"
    if [[ -z "$vectors" ]]; then
        for candidate in shared/vectors/reference.json ../shared/vectors/reference.json \
            "$bundle/reference.json"; do
            if [[ -f "$candidate" ]]; then
                vectors="$(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate")"
                break
            fi
        done
    fi
    [[ -n "$vectors" && -f "$vectors" ]] || { echo "gpu_check: no reference vectors found" >&2; exit 1; }
    [[ -x "$bundle/cuda-tests" && -f "$bundle/libcbce.so" ]] ||
        { echo "gpu_check: $bundle is missing; run scripts/gpu_check.sh build first" >&2; exit 1; }
    local python="${PYTHON:-python3}"
    local failed=0

    {
        echo "# GPU check of the CUDA path"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
        echo
    } >"$report"

    section() {
        local name="$1" log="$2" status="$3"
        if [[ $status == 0 && "${CBCE_GPU_CHECK_ALLOW_SKIP:-0}" != 1 ]] && grep -q 'skipped' "$log"; then
            status=skipped
        fi
        {
            case "$status" in
            0) echo "## $name: passed" ;;
            skipped) echo "## $name: FAILED (skipped: no usable GPU, or no PyTorch with CUDA)" ;;
            *) echo "## $name: FAILED (exit $status)" ;;
            esac
            echo
            echo '```'
            grep -E "$4" "$log" | tail -n 40 || true
            echo '```'
            echo
        } >>"$report"
        [[ $status == 0 ]] || failed=1
    }

    echo "gpu_check: cuda tests"
    local status=0
    CBCE_REFERENCE_VECTORS="$vectors" timeout 150 "$bundle/cuda-tests" --test-threads 4 \
        >"$logs/gpu_tests.log" 2>&1 || status=$?
    cat "$logs/gpu_tests.log"
    section "CUDA tests (each body on the GPU against the CPU)" "$logs/gpu_tests.log" "$status" \
        '^test |test result|skipped|panicked|FAILED'

    echo "gpu_check: reference cases against PyTorch"
    status=0
    (cd scripts/cuda && timeout 90 "$python" compare_torch.py --lib "../../$bundle/libcbce.so" \
        --vectors "$vectors") >"$logs/gpu_compare.log" 2>&1 || status=$?
    cat "$logs/gpu_compare.log"
    section "Reference cases on CUDA against the vectors and PyTorch's CUDA cross_entropy" \
        "$logs/gpu_compare.log" "$status" 'compare:'

    echo "gpu_check: benchmark"
    status=0
    (cd scripts/cuda && timeout 150 "$python" bench.py --lib "../../$bundle/libcbce.so" \
        --markdown "$(cd "$logs" && pwd)/gpu_bench.md") >"$logs/gpu_bench.log" 2>&1 || status=$?
    cat "$logs/gpu_bench.log"
    section "Benchmark (median of 20 event-timed calls)" "$logs/gpu_bench.log" "$status" 'bench:'
    [[ -f "$logs/gpu_bench.md" ]] && cat "$logs/gpu_bench.md" >>"$report"

    echo "gpu_check: report in $report"
    cat "$report"
    return "$failed"
}

case "${1:-all}" in
build) build ;;
run) run ;;
all) build && run ;;
*)
    echo "usage: scripts/gpu_check.sh [build|run]" >&2
    exit 2
    ;;
esac
