#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: system packages with apt-get (only
# those missing) and Python packages into .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use; each capability adds its own here.
packages=(cmake pkg-config valgrind g++ binutils clang-format gcc openmpi-bin libopenmpi-dev)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
