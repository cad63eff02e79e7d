#!/usr/bin/env bash
# Every CUDA path of quantkit in one command, on a bare offline GPU machine (scripts/gpu_check.py says what it
# checks; ../shared/gpu/README.md how the sample and the wheels get there). At most 8 minutes by default.
# Usage: scripts/gpu_check.sh [--dry-run] [--out DIR]
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout "${QK_GPU_CHECK_TIMEOUT:-480}" "$python" scripts/gpu_check.py "$@"
