#!/usr/bin/env bash
# Tests data-parallel training, and fails if the ranks do not reproduce one process's run:
#   1. installs the library into a temporary prefix (scripts/install.sh);
#   2. builds the MPI example (examples/mpi) against it with CMake's FindMPI, and runs its CTest
#      tests: the program on 2 and 4 ranks under mpiexec on this machine (each run checks that
#      every rank's weights and state equal a single-process run's bit for bit, and its loss and
#      gradients within float32 rounding), and once without the all-reduce of the counts, which
#      must report that the ranks drifted;
#   3. runs the torch.distributed example's tests (examples/python, gloo backend, 2 processes)
#      with .venv's Python, where pytest reports them as skipped without PyTorch, and also with
#      the Python that CBCE_TORCH_PYTHON names, if set (one that has PyTorch and pytest).
# scripts/test.sh runs it; it needs scripts/setup.sh's packages (Open MPI) and .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> distributed: %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

for tool in mpicc mpiexec cmake; do
    command -v "$tool" >/dev/null || fail "$tool not found; scripts/setup.sh installs it"
done
work=$(mktemp -d "${TMPDIR:-/tmp}/cbce-distributed.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

# Open MPI refuses to start as root unless told that it is meant; CI runs as root.
if [[ $(id -u) == 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Containers often forbid the cross-process memory reads of Open MPI's shared-memory transport
# (CMA); without them it copies through shared memory, as it does on its own for small messages.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

step "format of the MPI example"
clang-format --dry-run --Werror examples/mpi/*.c

step "install into a temporary prefix"
scripts/install.sh --prefix "$prefix" --build-dir "$work/build" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; fail "scripts/install.sh"; }

step "MPI example: build with FindMPI, run on 2 and 4 ranks with $(mpiexec --version | head -n 1)"
{ cmake -S examples/mpi -B "$work/mpi" -DCMAKE_PREFIX_PATH="$prefix" &&
    cmake --build "$work/mpi"; } >"$work/mpi.log" 2>&1 \
    || { cat "$work/mpi.log"; fail "building examples/mpi"; }
ctest --test-dir "$work/mpi" --output-on-failure
# What each passing run measured against the single-process run.
grep -h '^mpi_data_parallel: [0-9]* ranks hold' "$work/mpi/Testing/Temporary/LastTest.log"

step "torch.distributed example (gloo, 2 processes)"
export CBCE_LIBRARY="$prefix/lib/libcbce.so"
.venv/bin/python -m pytest -q -ra -p no:cacheprovider examples/python
if [[ -n ${CBCE_TORCH_PYTHON:-} ]]; then
    "$CBCE_TORCH_PYTHON" -m pytest -q -ra -p no:cacheprovider examples/python
fi
