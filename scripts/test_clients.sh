#!/usr/bin/env bash
# Uses the library the way its users do, and fails if any of them cannot:
#   1. installs it into a temporary prefix with the documented command (scripts/install.sh),
#      and checks the installed files, the SONAME and its links;
#   2. builds the C and C++ examples in the build tree (without installing) and runs them, and
#      builds one in a project that adds this source tree with add_subdirectory();
#   3. builds them again as an outside project against the installed CMake package, and runs
#      them, and each under valgrind's memcheck;
#   4. builds a C example with pkg-config's flags, linked with the shared library and with the
#      static archive, and runs both;
#   5. runs the Python tests (torch ones only where torch imports) against the installed
#      library, and imports the package as pip installs it;
#   6. runs the Rust examples.
# scripts/test.sh runs it after the Rust tests; it needs scripts/setup.sh's packages and .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> clients: %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

jobs=$(nproc)
work=$(mktemp -d "${TMPDIR:-/tmp}/cbce-clients.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"
version=$(sed -n 's/^version = "\([0-9.]*\)"$/\1/p' Cargo.toml | head -n 1)
major=${version%%.*}
minor=${version#*.}
minor=${minor%%.*}
if [[ $major == 0 ]]; then soname="libcbce.so.0.$minor"; else soname="libcbce.so.$major"; fi

step "format of the C and C++ sources"
clang-format --dry-run --Werror examples/c/*.c examples/c/*.h examples/cpp/*.cpp include/cbce.hpp

step "install into a temporary prefix (scripts/install.sh)"
scripts/install.sh --prefix "$prefix" --build-dir "$work/build" -- \
    -DCBCE_BUILD_EXAMPLES=ON -DCBCE_EXAMPLES_MEMCHECK=OFF >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; fail "scripts/install.sh"; }
for file in "lib/libcbce.so.$version" lib/libcbce.a include/cbce.h include/cbce.hpp \
    lib/pkgconfig/cbce.pc lib/cmake/cbce/cbceConfig.cmake lib/cmake/cbce/cbceConfigVersion.cmake; do
    [[ -f "$prefix/$file" && ! -L "$prefix/$file" ]] || fail "$file is not installed"
done
[[ $(readlink "$prefix/lib/$soname") == "libcbce.so.$version" ]] || fail "$soname link"
[[ $(readlink "$prefix/lib/libcbce.so") == "$soname" ]] || fail "libcbce.so link"
readelf -d "$prefix/lib/libcbce.so.$version" | grep -q "Library soname: \[$soname\]" \
    || fail "the SONAME of libcbce.so.$version is not $soname"
cmp -s include/cbce.h "$prefix/include/cbce.h" || fail "the installed cbce.h differs"
echo "installed libcbce $version (SONAME $soname) into $prefix"

step "examples built in the build tree, without installing"
ctest --test-dir "$work/build" --output-on-failure -j "$jobs"

step "a project that adds the source tree with add_subdirectory()"
parent="$work/parent"
mkdir -p "$parent"
cat >"$parent/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.16)
project(parent LANGUAGES C)
add_subdirectory("$PWD" cbce)
add_executable(training_loop "$PWD/examples/c/training_loop.c" "$PWD/examples/c/support.c")
target_link_libraries(training_loop PRIVATE cbce::cbce m)
EOF
{ cmake -S "$parent" -B "$parent/build" && cmake --build "$parent/build"; } \
    >"$work/parent.log" 2>&1 || { cat "$work/parent.log"; fail "the add_subdirectory() project"; }
"$parent/build/training_loop" >/dev/null
echo "built and ran training_loop against the subdirectory's cbce::cbce"

step "examples built as an outside project against the installed package, and under valgrind"
consumer="$work/consumer"
cmake -S examples -B "$consumer" -DCMAKE_PREFIX_PATH="$prefix" -DCBCE_EXAMPLES_MEMCHECK=ON \
    >"$work/consumer.log" 2>&1 || { cat "$work/consumer.log"; fail "configuring examples/"; }
cmake --build "$consumer" -j "$jobs" >>"$work/consumer.log" 2>&1 \
    || { cat "$work/consumer.log"; fail "building examples/"; }
readelf -d "$consumer/training_loop" | grep -q "NEEDED.*\[$soname\]" \
    || fail "training_loop does not link $soname"
readelf -d "$consumer/training_loop" | grep -q "RUNPATH.*\[$prefix/lib\]" \
    || fail "training_loop does not load the installed library"
ctest --test-dir "$consumer" --output-on-failure -j "$jobs"

step "a C example built with pkg-config, shared and static"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
[[ $(pkg-config --modversion cbce) == "$version" ]] || fail "pkg-config's version of cbce"
libdir=$(pkg-config --variable=libdir cbce)
flags=(-std=c11 -Wall -Wextra -Wpedantic -Werror)
sources=(examples/c/training_loop.c examples/c/support.c)
# shellcheck disable=SC2046 # pkg-config's output is a list of flags
cc "${flags[@]}" $(pkg-config --cflags cbce) "${sources[@]}" -o "$work/pc_shared" \
    $(pkg-config --libs cbce) -lm "-Wl,-rpath,$libdir"
# shellcheck disable=SC2046
cc "${flags[@]}" $(pkg-config --cflags cbce) "${sources[@]}" -o "$work/pc_static" \
    "$libdir/libcbce.a" $(pkg-config --static --libs-only-l cbce | sed 's/-lcbce\b//') -lm
if readelf -d "$work/pc_static" | grep -q "libcbce"; then fail "pc_static needs libcbce.so"; fi
"$work/pc_shared" >/dev/null
"$work/pc_static" >/dev/null
echo "both programs ran and checked their results"

step "python tests against the installed library"
export CBCE_LIBRARY="$prefix/lib/$soname"
.venv/bin/python -m pytest -q -ra -p no:cacheprovider python/tests
cp -r python "$work/python-src"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --target "$work/site" "$work/python-src"
python="$PWD/.venv/bin/python"
(cd "$work" && PYTHONPATH="$work/site" "$python" - <<'EOF'
import os
import numpy as np
import cbce

assert cbce.__file__.startswith(os.environ["PYTHONPATH"]), cbce.__file__
assert cbce.library_path() == os.environ["CBCE_LIBRARY"], cbce.library_path()
result = cbce.ClassBalancedLoss(2).forward(np.zeros((1, 2), np.float32), np.array([1]))
assert abs(float(result.loss) - np.log(2.0)) < 1e-6, result
print(f"pip-installed cbce {cbce.version()} loaded {cbce.library_path()}")
EOF
)

step "rust examples"
cargo run --release --quiet --example segmentation
cargo run --release --quiet --example training_demo >/dev/null
echo "training_demo ran"
