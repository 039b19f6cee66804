#!/usr/bin/env bash
# Reliability checks beyond `cargo test` (README, "Reliability"):
#   1. tests/c/abi_check.c, a C program that drives the C ABI with valid and hostile arguments
#      and from eight threads, linked with the static library: plain, under AddressSanitizer
#      and UndefinedBehaviorSanitizer (with LeakSanitizer), and under valgrind's memcheck;
#   2. the C and C++ examples (examples/, built by the top-level CMake project) under
#      AddressSanitizer and UndefinedBehaviorSanitizer (scripts/test_clients.sh runs them under
#      valgrind);
#   3. the bounded fuzz test tests/fuzz_ffi.rs with a larger budget than `cargo test` gives it:
#      CBCE_FUZZ_CASES (default 100000) within CBCE_FUZZ_SECONDS (default 150), seed
#      CBCE_FUZZ_SEED (default 0x7e57);
#   4. with CBCE_NIGHTLY_CHECKS=1 and a nightly toolchain (with the miri and rust-src
#      components): Miri over the crate's unit tests, and under ThreadSanitizer, with std
#      rebuilt instrumented, the concurrency test and the C ABI check.
# scripts/test.sh runs it after the other tests; it needs gcc, valgrind and cmake.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> reliability: %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

out=target/reliability
mkdir -p "$out"
jobs=$(nproc)

step "format of tests/c"
clang-format --dry-run --Werror tests/c/*.c

step "C ABI check against the static library (debug build, with debug assertions)"
cargo build --quiet --lib
library=target/debug/libcbce.a
cflags=(-std=c11 -Wall -Wextra -Wpedantic -Werror -g -Iinclude)
system_libraries=(-lpthread -ldl -lm -lrt)
gcc "${cflags[@]}" tests/c/abi_check.c "$library" "${system_libraries[@]}" -o "$out/abi_check"
"$out/abi_check"

step "C ABI check under AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer"
gcc "${cflags[@]}" -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=all tests/c/abi_check.c "$library" "${system_libraries[@]}" \
    -o "$out/abi_check_asan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "$out/abi_check_asan"

step "C ABI check under valgrind's memcheck"
valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect "$out/abi_check"

if [[ -f examples/CMakeLists.txt ]] && command -v cmake >/dev/null; then
    step "C and C++ examples under AddressSanitizer and UndefinedBehaviorSanitizer"
    sanitize="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
    build="$out/examples-asan"
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCBCE_BUILD_EXAMPLES=ON \
        -DCBCE_EXAMPLES_MEMCHECK=OFF -DCMAKE_C_FLAGS="$sanitize" -DCMAKE_CXX_FLAGS="$sanitize" \
        -DCMAKE_EXE_LINKER_FLAGS="$sanitize" >"$out/examples-asan.log" 2>&1 \
        || { cat "$out/examples-asan.log"; fail "configuring the examples with sanitizers"; }
    cmake --build "$build" -j "$jobs" >>"$out/examples-asan.log" 2>&1 \
        || { cat "$out/examples-asan.log"; fail "building the examples with sanitizers"; }
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        ctest --test-dir "$build" --output-on-failure -j "$jobs" -LE memcheck
fi

step "bounded fuzz of the exported functions"
CBCE_FUZZ_CASES=${CBCE_FUZZ_CASES:-100000} CBCE_FUZZ_SECONDS=${CBCE_FUZZ_SECONDS:-150} \
    CBCE_FUZZ_SEED=${CBCE_FUZZ_SEED:-0x7e57} \
    cargo test --quiet --test fuzz_ffi -- --nocapture

if [[ ${CBCE_NIGHTLY_CHECKS:-0} == 1 ]]; then
    if ! cargo +nightly --version >/dev/null 2>&1; then
        fail "CBCE_NIGHTLY_CHECKS=1 but there is no nightly toolchain"
    fi
    host=$(rustc -vV | sed -n 's/^host: //p')

    step "nightly: Miri over the unit tests"
    # Tree Borrows: under Stacked Borrows Miri stops first in crossbeam-epoch, a rayon
    # dependency. No leak check: rayon's global pool threads live until the process exits
    # (see the README's Reliability section).
    miri_flags="-Zmiri-tree-borrows -Zmiri-ignore-leaks"
    MIRIFLAGS="${MIRIFLAGS:-$miri_flags}" cargo +nightly miri test --lib --target-dir target/miri

    step "nightly: the concurrency test under ThreadSanitizer, std rebuilt instrumented"
    tsan=(env RUSTFLAGS=-Zsanitizer=thread cargo +nightly)
    flags=(-Zbuild-std --target "$host" --target-dir target/sanitize-thread)
    TSAN_OPTIONS=halt_on_error=1 "${tsan[@]}" test "${flags[@]}" --test concurrency

    step "nightly: the C ABI check under ThreadSanitizer, C and Rust both instrumented"
    # gcc's own libtsan lacks entry points that rustc's instrumentation calls, so the program
    # is linked with rustc's ThreadSanitizer runtime instead.
    "${tsan[@]}" rustc "${flags[@]}" --quiet --lib --crate-type staticlib
    runtime="$(rustc +nightly --print sysroot)/lib/rustlib/$host/lib/librustc-nightly_rt.tsan.a"
    gcc "${cflags[@]}" -O1 -fsanitize=thread -c tests/c/abi_check.c -o "$out/abi_check_tsan.o"
    gcc "$out/abi_check_tsan.o" "target/sanitize-thread/$host/debug/libcbce.a" \
        -Wl,--whole-archive "$runtime" -Wl,--no-whole-archive "${system_libraries[@]}" -lstdc++ \
        -o "$out/abi_check_tsan"
    TSAN_OPTIONS=halt_on_error=1 "$out/abi_check_tsan"
else
    echo "(Miri and ThreadSanitizer need a nightly toolchain: run with CBCE_NIGHTLY_CHECKS=1)"
fi
