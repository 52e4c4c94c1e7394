"""ComfyUI nodes for the SALAD testbed (procedural videos, caption encoder, linear PCA codec).

Thin adapters over ``testbed/``: the codec maps video frames to a 16-channel Wan 2.1 latent
(B, 16, frames/ft, size/fs, size/fs) and back; the caption encoder gives Wan's (1, 512, 4096)
text context.  All of it is deterministic and runs on the CPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..testbed.codec import PatchPCACodec

CATEGORY = "SALAD/testbed"
# class name suffix -> display name suffix ("SALADTestbedCaption" is shown as "SALAD Testbed Caption")
NODES = {"Caption": "Caption", "EmptyLatent": "Empty Latent", "Decode": "Decode", "Encode": "Encode",
         "ProceduralVideo": "Procedural Video"}


def _node(description: str, *, returns: tuple, tooltips: tuple, function: str, names: tuple | None = None):
    """Class decorator: the ComfyUI node attributes every testbed node declares, in one place."""
    def wrap(cls):
        cls.DESCRIPTION, cls.CATEGORY, cls.RETURN_TYPES = description, CATEGORY, returns
        cls.OUTPUT_TOOLTIPS, cls.FUNCTION = tooltips, function
        if names:
            cls.RETURN_NAMES = names
        return cls
    return wrap


def _codec() -> PatchPCACodec:
    from ..testbed.codec import load_codec
    return load_codec()


@_node(("Encodes a testbed caption (e.g. 'a red square moves left, the camera pans right') into Wan "
       "text conditioning with the testbed's fixed, weight-free encoder. Use it instead of a "
       "CLIP Text Encode for the SALAD testbed model."),
       returns=("CONDITIONING",),
       tooltips=("Conditioning holding a (1, 512, 4096) context: one token per clause, then zeros.",),
       function="encode")
class SALADTestbedCaption:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {"required": {"caption": ("STRING", {
            "multiline": True, "default": "a red square moves left, the camera pans right",
            "tooltip": "Clauses separated by ',' or 'and', each 'a [spinning] <colour> <shape> <motion> "
                       "[then turns <colour>]' or 'the camera pans left|right'. Colours: red green blue yellow "
                       "cyan magenta white; shapes: square circle triangle; motions: moves left|right|up|down, "
                       "bounces, stays, circles. Other words are ignored; empty = unconditional."})}}

    def encode(self, caption: str) -> tuple[list]:
        from ..testbed.text import caption_context
        return ([[caption_context([caption]), {}]],)


@_node("An all-zero latent of the testbed codec's shape, to sample the testbed model into.",
       returns=("LATENT",),
       tooltips=("Latent (batch, 16, frames/ft, size/fs, size/fs) of zeros.",),
       function="generate")
class SALADTestbedEmptyLatent:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        c = _codec()
        return {"required": {
            "frames": ("INT", {"default": 16 * c.ft, "min": c.ft, "max": 4096, "step": c.ft,
                               "tooltip": f"Video frames; a multiple of the codec's ft={c.ft} "
                                          f"(the standard clip is {16 * c.ft})."}),
            "size": ("INT", {"default": 32 * c.fs, "min": c.fs, "max": 4096, "step": c.fs,
                             "tooltip": f"Width = height in pixels; a multiple of the codec's fs={c.fs} "
                                        f"(the standard clip is {32 * c.fs})."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "Number of videos in the batch."}),
        }}

    def generate(self, frames: int, size: int, batch_size: int) -> tuple[dict[str, torch.Tensor]]:
        c = _codec()
        if frames % c.ft or size % c.fs:
            raise ValueError(f"SALAD Testbed Empty Latent: frames must be a multiple of {c.ft} and size of {c.fs}")
        return ({"samples": torch.zeros(batch_size, c.channels, frames // c.ft, size // c.fs, size // c.fs)},)


@_node("Decodes a testbed latent to video frames with the testbed's linear PCA codec (no VAE needed).",
       returns=("IMAGE",),
       tooltips=("All frames of all videos, (batch*frames, H, W, 3), as VAE Decode gives for video.",),
       function="decode")
class SALADTestbedDecode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {"required": {"samples": ("LATENT", {"tooltip": "A 16-channel testbed latent (B, 16, T, h, w)."})}}

    def decode(self, samples: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        x = samples["samples"]
        if x.ndim != 5 or x.shape[1] != 16:
            raise ValueError(f"SALAD Testbed Decode: expected a (B, 16, T, h, w) latent, got {tuple(x.shape)}")
        v = _codec().decode(x.float().cpu())
        return (v.reshape(-1, *v.shape[2:]),)


@_node("Encodes video frames (one clip) into a testbed latent with the testbed's linear PCA codec.",
       returns=("LATENT",),
       tooltips=("Latent (1, 16, frames/ft, H/fs, W/fs) in ComfyUI's raw Wan 2.1 latent space.",),
       function="encode")
class SALADTestbedEncode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {"required": {"pixels": ("IMAGE", {
            "tooltip": "The frames of one video, in order; the frame count must be a multiple of the codec's "
                       "ft and height/width multiples of its fs."})}}

    def encode(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor]]:
        c = _codec()
        n, h, w, _ = pixels.shape
        if n % c.ft or h % c.fs or w % c.fs:
            raise ValueError(f"SALAD Testbed Encode: {n} frames of {h}x{w}: frames must be a multiple of "
                             f"{c.ft} and height/width multiples of {c.fs}")
        return ({"samples": c.encode(pixels[..., :3].float().cpu().unsqueeze(0))},)


@_node("Renders one procedural testbed clip (coloured shapes moving on a dark background) and its caption.",
       returns=("IMAGE", "STRING"),
       tooltips=("The clip's frames (frames, size, size, 3).", "The caption that describes the clip."),
       function="render", names=("frames", "caption"))
class SALADTestbedProceduralVideo:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 63 - 1,
                             "tooltip": "Picks the clip (objects, motions, background); same seed, same clip."}),
            "frames": ("INT", {"default": 64, "min": 1, "max": 4096,
                               "tooltip": "Frames to render; the motion always spans the whole clip."}),
            "size": ("INT", {"default": 128, "min": 8, "max": 4096, "step": 8,
                             "tooltip": "Width = height in pixels."}),
        }}

    def render(self, seed: int, frames: int, size: int) -> tuple[torch.Tensor, str]:
        from ..testbed.data import render, sample_specs
        spec = sample_specs(seed, 1)[0]
        return (render([spec], frames, size)[0], spec.caption)
