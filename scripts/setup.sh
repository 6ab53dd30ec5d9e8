#!/usr/bin/env bash
# Install ditquant into the active Python environment.
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh --test   # plus the test tools
# A torch that is already installed (e.g. a CUDA build) is kept. Where there is none, torch==2.13.0 is installed
# first, so that pip never resolves an unpinned torch to the multi-GB CUDA wheels by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".${extras}"
"$PY" -c "import torch, ditquant; print(f'ditquant {ditquant.__version__} with torch {torch.__version__}')"
