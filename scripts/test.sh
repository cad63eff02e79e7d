#!/usr/bin/env bash
# Run the test suite (sets up the environment first; a no-op when it is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
