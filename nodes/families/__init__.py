"""Model families SALAD can patch, one adapter per file (see base.py for what an adapter provides).

Adding a family: write ``nodes/families/<name>.py`` with a :class:`~.base.ModelFamily` subclass,
add it to :data:`FAMILIES`, add a tiny fixture of ComfyUI's own model class to
``tests/make_fixtures.py`` and a real-graph test beside ``tests/test_families.py``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Type

from .base import FamilyInfo, ModelFamily
from .ltxv import LTXVFamily
from .wan import WanFamily

FAMILIES: tuple = (WanFamily, LTXVFamily)


def family_for(diffusion_model: Any, families: Sequence[Type[ModelFamily]] = FAMILIES) -> Optional[ModelFamily]:
    """The first family in ``families`` that recognises ``diffusion_model``, bound to it; else None."""
    for cls in families:
        if cls.matches(diffusion_model):
            return cls(diffusion_model)
    return None


def supported(families: Sequence[Type[ModelFamily]] = FAMILIES) -> str:
    """'A, B or C' over the families' labels, for error messages."""
    labels = [f.label for f in families]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


__all__ = ["FAMILIES", "FamilyInfo", "LTXVFamily", "ModelFamily", "WanFamily", "family_for", "supported"]
