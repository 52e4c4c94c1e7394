"""What a model family must provide so that SALAD can patch it (the adapter seam).

``nodes/patch.py`` is family-blind: it clones the ModelPatcher, wraps every owned block's
self-attention forward (so that, for the duration of that call only, SALAD sits on top of
``transformer_options["optimized_attention_override"]``), keeps the sigma window, the stats, the
weight patchers and the series semantics.  Everything that depends on how a model is built comes
from a :class:`ModelFamily` subclass, one file per family beside this one:

* **recognise the model** -- :meth:`ModelFamily.matches` on the ComfyUI diffusion model;
* **head layout** -- :meth:`ModelFamily.blocks`, :meth:`ModelFamily.dim_heads` (model width and
  attention heads; SALAD's Proj is dim x dim, its gate dim -> 1) and a ``base_model`` name;
* **its self-attention calls** -- :meth:`ModelFamily.self_attn_key` (the object-patch key of block
  ``i``'s self-attention forward, whose first argument is the block input ``x`` that feeds the gate)
  and :attr:`ModelFamily.options_position` (where that forward takes ``transformer_options`` when
  it is passed positionally).  Its attention must reach ComfyUI's ``optimized_attention`` with
  ``transformer_options`` and q, k, v as (B, L, heads * head_dim), self-attention only (k, v from
  the same tokens as q);
* **its token grid** -- :meth:`ModelFamily.install_recorder` adds the object patches / wrappers
  that see each forward's latent and report what they saw with ``recorder.record(...)``;
* **its extra tokens** -- :meth:`ModelFamily.token_layout` turns (sequence length, what was
  recorded, the call's transformer_options) into the video token grid plus the number of non-grid
  tokens before (``n_front``) and after (``n_back``) the video tokens, or a decline reason.

Nothing here imports ComfyUI; the families touch only the model object they are given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Optional, Protocol, Sequence, Tuple, Union

import torch

from ...salad_core.tiling import grid_from_latent_shape

Grid = Tuple[int, int, int]
# (grid, n_front, n_back) of one attention call, or the reason SALAD hands the call on
Layout = Union[Tuple[Grid, int, int], str]


@dataclass(frozen=True)
class FamilyInfo:
    """What the nodes and the weight-file checks need to know about one patched model."""
    family: str            # the weight files' ``model_family`` ("wan", "ltxv")
    label: str             # for messages, e.g. "Wan 2.1 / 2.2"
    dim: int               # model width: the Proj is dim x dim, the gate dim -> 1
    heads: int
    num_blocks: int
    base_model: str        # default ``base_model`` of weights trained on it
    model_type: str

    def as_dict(self) -> dict:
        return asdict(self)


class ModelFamily:
    """One ComfyUI model family, bound to one diffusion model (``family = Cls(diffusion_model)``)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    options_position: ClassVar[int] = 0   # index of transformer_options among the forward's args after x

    def __init__(self, diffusion_model: torch.nn.Module):
        self.dm = diffusion_model

    # -- recognise ------------------------------------------------------------------------------
    @classmethod
    def matches(cls, diffusion_model: Any) -> bool:
        raise NotImplementedError

    # -- head layout ----------------------------------------------------------------------------
    def blocks(self) -> Sequence[torch.nn.Module]:
        raise NotImplementedError

    def dim_heads(self) -> Tuple[int, int]:
        raise NotImplementedError

    def base_model_name(self, model: Any, dim: int, num_blocks: int) -> str:
        return f"{self.name}-{type(model.model).__name__.lower()}-dim{dim}-{num_blocks}blocks"

    def info(self, model: Any) -> FamilyInfo:
        """``model``: the ComfyUI ModelPatcher whose diffusion model this family is bound to."""
        dim, heads = self.dim_heads()
        n = len(self.blocks())
        return FamilyInfo(family=self.name, label=self.label, dim=int(dim), heads=int(heads), num_blocks=n,
                          base_model=self.base_model_name(model, int(dim), n),
                          model_type=str(getattr(model.model, "model_type", None)))

    def patch_size(self) -> Tuple[int, int, int]:
        """(t, h, w) latent cells per token."""
        raise NotImplementedError

    def latent_grid(self, t: int, h: int, w: int) -> Grid:
        """Token grid of a latent with t frames of h x w."""
        return grid_from_latent_shape(t, h, w, self.patch_size())

    # -- self-attention calls -------------------------------------------------------------------
    def self_attn_key(self, block: int) -> str:
        raise NotImplementedError

    # -- token grid and extra tokens ------------------------------------------------------------
    def install_recorder(self, patcher: Any, recorder: "Recorder", key: str) -> None:
        """Add to ``patcher`` (the SALAD clone) what reports each forward's grid to ``recorder``;
        ``key``: the key to file wrappers / callbacks under."""
        raise NotImplementedError

    def token_layout(self, L: int, seen: Any, transformer_options: dict) -> Layout:
        raise NotImplementedError


class Recorder(Protocol):
    """The side of SaladPatch a family's grid hooks talk to (see nodes/patch.py SaladPatch.record)."""

    def record(self, seen: Any, first_of_forward: bool = True) -> None: ...


def grid_extras(grid: Optional[Sequence[int]], L: int, extras_in_front: bool) -> Layout:
    """Layout of a sequence of ``L`` tokens holding the video ``grid`` plus ``L - F*H*W`` extra tokens,
    all before or all after the video tokens."""
    if grid is None:
        return "no_grid"
    g = tuple(int(s) for s in grid)
    extra = int(L) - g[0] * g[1] * g[2]
    if extra < 0:
        return "grid_mismatch"
    return (g, extra, 0) if extras_in_front else (g, 0, extra)
