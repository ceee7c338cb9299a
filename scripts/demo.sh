#!/usr/bin/env bash
# Set up the environment and run the main job: `gigamamba demo` on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$VENV/bin/gigamamba" demo "$@"
