#!/usr/bin/env bash
# Install everything the test suite needs (Python packages, PostgreSQL, Chromium) and run it.
# Usage: bash scripts/test.sh [PYTEST ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
need=()
command -v chromium >/dev/null || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "note: ${need[*]} missing and not root: the tests that need them are skipped" >&2
    fi
fi
exec python3 -m pytest "$@"
