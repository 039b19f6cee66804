#!/usr/bin/env bash
# Builds libcbce (cargo, release profile) and installs it into a prefix with its headers, its
# pkg-config file and its CMake package, through the top-level CMakeLists.txt.
#
# Usage: scripts/install.sh --prefix DIR [--build-dir DIR] [-- EXTRA CMAKE ARGUMENTS]
#   --prefix DIR     where to install (DIR/lib, DIR/include); required
#   --build-dir DIR  CMake's build directory (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

prefix=""
build_dir="build"
while (($#)); do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --build-dir) build_dir="${2:?--build-dir needs a directory}"; shift 2 ;;
        --) shift; break ;;
        -h | --help) usage ;;
        *) echo "install: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ -n "$prefix" ]] || usage

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_INSTALL_PREFIX=$prefix" "$@"
cmake --build "$build_dir"
cmake --install "$build_dir" --prefix "$prefix"
