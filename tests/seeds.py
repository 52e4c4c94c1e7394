"""Seeds of random tests: every test says which seed it ran with, and any seed can be replayed.

``SALAD_TEST_SEED=<n>`` replays a run: tests/conftest.py seeds every test's global random
generators with it, and :func:`fresh_seed` (tests that want new random inputs on each run)
returns it instead of a fresh one.  The seed is printed, so pytest shows it with a failure.
"""
from __future__ import annotations

import os
import random
import zlib
from typing import Optional

import torch

ENV = "SALAD_TEST_SEED"


def replay_seed() -> Optional[int]:
    """The seed from ``SALAD_TEST_SEED``, or None when it is not set."""
    v = os.environ.get(ENV, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{ENV} must be an integer seed, got {v!r}") from None


def seed_all(seed: int, what: str = "") -> int:
    """Seed torch (CPU and CUDA), ``random`` and numpy with ``seed`` and print it."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    print(f"[seed {seed}]{' ' + what if what else ''} replay: {ENV}={seed}")
    return seed


def stable_seed(name: str) -> int:
    """A fixed seed for a name (a test id): the same on every run and machine."""
    return zlib.crc32(name.encode()) % 2**31


def fresh_seed(what: str = "") -> int:
    """``SALAD_TEST_SEED`` if set, else a new random seed; seeds everything with it (see :func:`seed_all`)."""
    s = replay_seed()
    return seed_all(int.from_bytes(os.urandom(4), "little") if s is None else s, what)
