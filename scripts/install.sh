#!/usr/bin/env bash
# Install quanttune (editable) with torch pinned first, so that no dependency pulls another torch.
# Usage: bash scripts/install.sh [EXTRAS]    e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
extras=${1:-}
"$PY" -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
