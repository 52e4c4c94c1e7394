"""Make the repository root importable as a package without running its ComfyUI entry point.

ComfyUI imports this pack by its folder name and runs ``__init__.py`` (which registers nodes and
therefore needs ``comfy``).  Unit tests, benchmarks and the CLI only need ``kernels`` and
``salad_core``; they register the root under the fixed name ``salad_pack`` and then use the same
relative imports as the pack itself (``salad_pack.salad_core`` imports ``..kernels``).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "salad_pack"


def register(name: str = PACK_NAME) -> str:
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod = importlib.util.module_from_spec(spec)
        mod.__path__ = [str(ROOT)]
        mod.__file__ = None
        sys.modules[name] = mod
    return name
