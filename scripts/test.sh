#!/usr/bin/env bash
# Set up everything on a fresh machine (system packages, .venv) and run the whole test suite
# headless under Xvfb. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-packages.sh
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
