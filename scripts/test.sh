#!/usr/bin/env bash
# Set up the environment and run the whole test suite, slow multi-process tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$VENV/bin/python" -m pytest -q --timeout=1200 "$@"
