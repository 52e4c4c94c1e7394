"""How the kernel test files run Triton (test_kernels.py, test_passes.py, test_fp8.py).

Call :func:`use_interpreter_without_cuda` before the kernels are first imported: on a machine without
CUDA it selects Triton's CPU interpreter (TRITON_INTERPRET=1, unless the environment already says), so
the same tests run the kernels on CPU; on a GPU they run compiled.
"""
from __future__ import annotations

import os
from pathlib import Path


def use_interpreter_without_cuda() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch
        cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        cuda = False
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover
        return False


def kernel_device():
    """cuda for compiled kernels, cpu under the interpreter (or without CUDA)."""
    import torch
    compiled = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    return torch.device("cuda" if compiled else "cpu")


def ptxas_bundled() -> bool:
    """Triton ships its NVIDIA backend with ptxas, so kernels can be compiled for sm90 without a GPU.  Found
    without importing triton: an import before use_interpreter_without_cuda() (e.g. a skipif evaluated while
    an earlier test file is collected) would fix Triton's mode before the interpreter is chosen."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):   # a broken install, or a spec-less stand-in in sys.modules
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    locations = spec.submodule_search_locations
    return any((Path(loc) / "backends" / "nvidia" / "bin" / "ptxas").exists() for loc in locations)
