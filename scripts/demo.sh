#!/usr/bin/env bash
# Set up .venv (first run only) and run the demo workflow headless in ComfyUI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
