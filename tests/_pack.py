"""Make the repository root importable as a package without running its ComfyUI entry point.

ComfyUI imports this pack by its folder name and runs ``__init__.py`` (which registers nodes and
therefore needs ``comfy``).  Unit tests, benchmarks and the CLI only need ``kernels`` and
``salad_core``; they register the root under the fixed name ``salad_pack`` and then use the same
relative imports as the pack itself (``salad_pack.salad_core`` imports ``..kernels``).

:func:`bootstrap` is the one test set-up (tests/conftest.py calls it; a test file run as a script
calls it itself): test helpers and benchmark modules importable by name, the root registered.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "salad_pack"
#: folders whose modules tests import by bare name (tests/ first)
IMPORT_DIRS = (ROOT / "tests", ROOT / "benchmarks")


def register(name: str = PACK_NAME) -> str:
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod = importlib.util.module_from_spec(spec)
        mod.__path__ = [str(ROOT)]
        mod.__file__ = None
        sys.modules[name] = mod
    return name


def bootstrap() -> str:
    """Put :data:`IMPORT_DIRS` on ``sys.path`` (once, in that order of priority) and register the
    root as :data:`PACK_NAME`; returns the package name."""
    for d in reversed(IMPORT_DIRS):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    return register()
