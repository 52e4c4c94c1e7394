#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite: kernels under the Triton CPU
# interpreter, salad_core, and our nodes inside a real headless ComfyUI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT/tests"
export PYTHONDONTWRITEBYTECODE=1
exec "$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
