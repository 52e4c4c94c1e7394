"""LTX-Video (ComfyUI ``comfy.ldm.lightricks.model.LTXVModel``: LTXV 2B / 13B, 0.9.x).

Why this family is the second one: its attention path is the one that fits SALAD as Wan's does.
Each ``transformer_blocks.{i}`` has its own self-attention module ``attn1`` (and a separate
cross-attention ``attn2`` called after ``attn1`` has returned), ``attn1`` calls
``optimized_attention(q, k, v, heads, transformer_options=...)`` with (B, L, heads*head_dim) tensors
over video tokens only, and the token order is the latent's raster order (patch 1x1x1).  (HunyuanVideo
runs joint text+video attention with ``skip_reshape`` (B, H, L, D) tensors in double/single blocks,
Cosmos passes ``skip_reshape``/``skip_output_reshape`` layouts: both would need a second call form.)

* self-attention: ``transformer_blocks.{i}.attn1.forward(x, context=None, mask=None, pe=None, ...,
  transformer_options=...)``; ``x`` is the block's normalised, modulated input (the gate's input).
  A self-attention mask (newer ComfyUI's guide attenuation) goes through ``optimized_attention_masked``
  and is handed on (reason ``mask``).
* token grid: a ``DIFFUSION_MODEL`` wrapper sees the latent (B, 128, F, H, W) of every forward and
  its ``keyframe_idxs``; the grid is (F, H, W) over the patchifier's patch size.
* extra tokens: keyframe / guide latents (LTXVAddGuide) are appended after the video tokens,
  ``keyframe_idxs.shape[2]`` of them; they are ``n_back`` extras, the rest is ``(frames, H, W)``.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch

from .base import Layout, ModelFamily, Recorder


class LTXVFamily(ModelFamily):
    name = "ltxv"
    label = "LTX-Video (LTXVModel)"
    options_position = 3          # attn1.forward(x, context, mask, pe, transformer_options) on ComfyUI 0.3.x

    @classmethod
    def matches(cls, diffusion_model: Any) -> bool:
        blocks = getattr(diffusion_model, "transformer_blocks", None)
        return (blocks is not None and hasattr(diffusion_model, "patchifier")
                and hasattr(diffusion_model, "patchify_proj") and len(blocks) > 0
                and all(hasattr(b, "attn1") and hasattr(b, "attn2") for b in blocks)
                # LTX-2's audio-video blocks (newer ComfyUI's LTXAVModel) run video and audio streams
                # through one forward: not this adapter's token rule, so not claimed
                and not any(hasattr(b, "audio_attn1") for b in blocks))

    def blocks(self) -> Sequence[torch.nn.Module]:
        return self.dm.transformer_blocks

    def dim_heads(self) -> Tuple[int, int]:
        attn = self.dm.transformer_blocks[0].attn1
        return int(getattr(self.dm, "inner_dim", 0) or attn.heads * attn.dim_head), int(attn.heads)

    def base_model_name(self, model: Any, dim: int, num_blocks: int) -> str:
        return f"ltxv-dim{dim}-{num_blocks}blocks"

    def patch_size(self) -> Tuple[int, int, int]:
        return tuple(int(p) for p in getattr(self.dm.patchifier, "patch_size", (1, 1, 1)))  # type: ignore

    def self_attn_key(self, block: int) -> str:
        return f"diffusion_model.transformer_blocks.{block}.attn1.forward"

    def install_recorder(self, patcher: Any, recorder: Recorder, key: str) -> None:
        import comfy.patcher_extension as pe
        patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, key, self.grid_wrapper(recorder))

    def grid_wrapper(self, recorder: Recorder):
        """DIFFUSION_MODEL wrapper: LTXVModel.forward(x, timestep, context, attention_mask, frame_rate,
        transformer_options, keyframe_idxs, ...) reaches it as ``executor(x, ...)``."""
        def wrapper(executor, x, *args, **kwargs):
            kf = args[5] if len(args) > 5 else kwargs.get("keyframe_idxs")
            seen = None
            if torch.is_tensor(x) and x.ndim == 5:
                n_guide = int(kf.shape[2]) if torch.is_tensor(kf) and kf.ndim >= 3 else 0
                seen = (self.latent_grid(*x.shape[2:]), n_guide)
            recorder.record(seen, first_of_forward=False)
            return executor(x, *args, **kwargs)
        return wrapper

    def token_layout(self, L: int, seen: Any, transformer_options: dict) -> Layout:
        if seen is None:
            return "no_grid"
        (frames, h, w), n_guide = seen
        video = int(L) - n_guide
        if video <= 0 or video % (h * w) or video // (h * w) > frames:
            return "grid_mismatch"
        return (video // (h * w), h, w), 0, n_guide
