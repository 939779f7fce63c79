#!/usr/bin/env bash
# Set up everything meshd needs on a fresh Debian 12 machine, as root: system packages
# (Consul from bullseye, pinned), a virtualenv in .venv, and the project with its test extras.
# Idempotent: a second run changes nothing and is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
if [ ! -x .venv/bin/pip ]; then
    # Also a venv that a failed run left half made (python, but no pip): start again.
    rm -rf .venv
    python3 -m venv .venv
fi
stamp=.venv/.meshd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
