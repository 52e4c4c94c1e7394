#!/usr/bin/env bash
# Set up .venv (first run only), lint under CI, and run the whole test suite: kernels under the
# Triton CPU interpreter, salad_core, and our nodes inside a real headless ComfyUI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
# Lint first under CI (or SALAD_LINT=1): ruff check over the repository, config in pyproject.toml.
# Formatting is not enforced (see [tool.ruff] there).
if [ "${CI:-}" = "true" ] || [ "${SALAD_LINT:-}" = "1" ]; then
  echo "[lint] ruff check" >&2
  (cd "$ROOT" && "$ROOT/.venv/bin/python" -m ruff check --no-cache .)
fi
cd "$ROOT/tests"
export PYTHONDONTWRITEBYTECODE=1
exec "$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
