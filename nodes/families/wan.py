"""Wan 2.1 / 2.2 (ComfyUI ``comfy.ldm.wan.model.WanModel`` and its variants: T2V, I2V, 5B, VACE, ...).

* self-attention: ``blocks.{i}.self_attn.forward(x, freqs, transformer_options)``; it calls
  ``optimized_attention(q, k, v, heads, transformer_options=...)`` with (B, L, heads*128) tensors;
  cross-attention (``cross_attn``) runs after it has returned.
* token grid: ``patch_embedding`` (Conv3d, patch 1x2x2) turns the latent into (B, dim, F, H/2, W/2);
  the first call of each forward is recorded (ComfyUI >= 0.5 also passes
  ``transformer_options["grid_sizes"]``, which wins when present).
* extra tokens: a reference-image latent (models with ``ref_conv``) sits *before* the video
  tokens; anything else after them (context latents of newer ComfyUI versions).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch

from .base import Layout, ModelFamily, Recorder, grid_extras

PATCH_EMBEDDING = "diffusion_model.patch_embedding.forward"


class WanFamily(ModelFamily):
    name = "wan"
    label = "Wan 2.1 / 2.2 (WanModel and its variants)"
    options_position = 1          # self_attn.forward(x, freqs, transformer_options)

    def __init__(self, diffusion_model: torch.nn.Module):
        super().__init__(diffusion_model)
        self.has_ref_conv = getattr(diffusion_model, "ref_conv", None) is not None

    @classmethod
    def matches(cls, diffusion_model: Any) -> bool:
        blocks = getattr(diffusion_model, "blocks", None)
        return (blocks is not None and hasattr(diffusion_model, "patch_embedding") and len(blocks) > 0
                and all(hasattr(b, "self_attn") for b in blocks))

    def blocks(self) -> Sequence[torch.nn.Module]:
        return self.dm.blocks

    def dim_heads(self) -> Tuple[int, int]:
        attn = self.dm.blocks[0].self_attn
        return int(getattr(self.dm, "dim", 0) or attn.dim), int(getattr(self.dm, "num_heads", 0) or attn.num_heads)

    def patch_size(self) -> Tuple[int, int, int]:
        return tuple(int(p) for p in getattr(self.dm, "patch_size", (1, 2, 2)))  # type: ignore[return-value]

    def self_attn_key(self, block: int) -> str:
        return f"diffusion_model.blocks.{block}.self_attn.forward"

    def install_recorder(self, patcher: Any, recorder: Recorder, key: str) -> None:
        prev = patcher.get_model_object(PATCH_EMBEDDING)
        patcher.add_object_patch(PATCH_EMBEDDING, grid_recording_forward(recorder, prev))

    def token_layout(self, L: int, seen: Any, transformer_options: dict) -> Layout:
        g = transformer_options.get("grid_sizes") if transformer_options else None
        return grid_extras(g if g is not None else seen, L, extras_in_front=self.has_ref_conv)


def grid_recording_forward(recorder: Recorder, prev_forward: Callable) -> Callable:
    """``patch_embedding.forward`` that reports the (F, H, W) token grid of its output."""
    def forward(x, *args, **kwargs):
        out = prev_forward(x, *args, **kwargs)
        if out.ndim == 5:
            recorder.record(tuple(int(s) for s in out.shape[2:]))
        return out
    return forward
