#!/usr/bin/env bash
# Set up .venv if needed, then open napari with the plugin and a bundled sample map in 3-D.
# Extra arguments (map files) are opened too.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
exec .venv/bin/python -m napari_cryoswan "$@"
