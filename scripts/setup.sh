#!/usr/bin/env bash
# Create .venv and install napari-cryoswan into it (idempotent). Usage: scripts/setup.sh [extra]
# extra: "all" (a viewer with Qt, the default) or "test" (adds pytest, pytest-qt, pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-all}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Install torch first and pinned: on these machines torch==2.13.0 is a CPU wheel; anything that
# pulls torch unpinned may download a multi-GB CUDA build instead.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[${extra}]"
