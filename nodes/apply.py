"""Apply SALAD Attention node: MODEL (+ SALAD_WEIGHTS) -> patched MODEL."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..salad_core.options import (BACKENDS, COMPENSATIONS, DEFAULT_BACKEND, DEFAULT_COMPENSATION,
                                  DEFAULT_MIN_TOKENS, DEFAULT_PATTERN, DEFAULT_PRECISION, DEFAULT_SPARSITY,
                                  DEFAULT_START_PERCENT, PATTERNS, PRECISIONS, clip)
from .blocks import parse_block_list
from .loader import SALAD_WEIGHTS
from .patch import PatchOptions, apply_salad, model_info

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher



def _number(name: str, value: Any) -> float:
    """A finite float for a FLOAT input; NaN / inf / text (possible through the API) are named."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v):
        raise ValueError(f"Apply SALAD Attention: {name} must be a finite number, got {clip(value)}")
    return v


class SALADApplyAttention:
    DESCRIPTION = ("Makes a Wan 2.1 / 2.2 or LTX-Video model's self-attention sparse (SALAD: block-sparse "
                   "attention over 3-D video tiles plus a gated linear-attention branch). Returns a patched copy; "
                   "the input model is left as it was. Without SALAD weights it runs sparse attention only. Two of "
                   "these nodes in series: the later one wins for the blocks it covers (its weights and settings); "
                   "blocks it leaves dense (dense_blocks) keep the earlier node's SALAD.")
    CATEGORY = "model/patch/SALAD"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with SALAD attention. Connect it where the original model went (KSampler).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Wan 2.1 / 2.2 model (T2V, I2V, 5B, 14B high- or low-noise) or an "
                                               "LTX-Video model; LoRA'd and GGUF models work."}),
                "sparsity": ("FLOAT", {"default": DEFAULT_SPARSITY, "min": 0.0, "max": 0.99, "step": 0.01,
                                       "display": "slider",
                                       "tooltip": "Share of key blocks each query block skips. 0.9 = 90% skipped. "
                                                  "Measured at 0.9 per model call that runs sparse (H200): Wan2.1-1.3B "
                                                  "2.12x at 832x480x81, 2.53x at 121 frames, 3.20x at 720p, "
                                                  "1.41x at 33 frames; Wan 14B 1.71x at 480p, 2.56x at 720p. "
                                                  "The gain depends on model and video size. 0 = exact dense "
                                                  "attention."}),
                "pattern": (list(PATTERNS), {"default": DEFAULT_PATTERN,
                                       "tooltip": "topk: keep the key blocks with the highest pooled q.k score, "
                                                  "per head and step. window: keep the key blocks nearest in space "
                                                  "and time (a 3-D sliding window; static, slightly cheaper)."}),
                "start_percent": ("FLOAT", {"default": DEFAULT_START_PERCENT, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Sampling before this point keeps dense attention. "
                                                       "Default 0.2: the layout-forming first steps stay exact "
                                                       "(on our testbed +4.7 dB PSNR vs dense at 0.9). 0 = "
                                                       "sparse from the first step: faster, lower quality."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Sampling after this point (1 = last step) keeps dense "
                                                     "attention."}),
                "dense_blocks": ("STRING", {"default": "", "multiline": False,
                                            "tooltip": "Transformer blocks that stay dense, e.g. '0,1,28-29' "
                                                       "(negative numbers count from the end). Empty = none."}),
                "backend": (list(BACKENDS), {"default": DEFAULT_BACKEND,
                                       "tooltip": "auto: Triton kernels on NVIDIA GPUs, PyTorch elsewhere. "
                                                  "triton: require the Triton kernels. torch: PyTorch reference "
                                                  "path (same math, slower)."}),
            },
            "optional": {
                "salad_weights": (SALAD_WEIGHTS, {"tooltip": "Gate and linear-branch weights from SALAD Weights "
                                                             "Loader. Without them: sparse attention only."}),
                "min_tokens": ("INT", {"default": DEFAULT_MIN_TOKENS, "min": 0, "max": 1_000_000, "step": 256,
                                       "tooltip": "Sequences shorter than this many tokens stay dense. Short "
                                                  "clips gain nothing: Wan2.1-1.3B at 832x480x17 (7,800 tokens) "
                                                  "ran no faster than dense. An API prompt that leaves this "
                                                  "input out gets 0 (as before)."}),
                "verbose": ("BOOLEAN", {"default": False,
                                        "tooltip": "Log which blocks ran SALAD and why calls were handed on."}),
                "compensation": (list(COMPENSATIONS), {"default": DEFAULT_COMPENSATION,
                                                 "tooltip": "Stand-in for the key blocks a query block skips. none: "
                                                            "they get no attention. centroid: each skipped block "
                                                            "counts as one token (its mean key and mean value, "
                                                            "weighted by its token count), so no attention weight "
                                                            "is simply dropped. Training-free; works with or "
                                                            "without SALAD weights."}),
                "precision": (list(PRECISIONS), {"default": DEFAULT_PRECISION,
                                           "tooltip": "bf16 (recommended): sparse attention in the model's "
                                                      "16-bit dtype. fp8 (experimental): Q.K and P.V on FP8 "
                                                      "tensor cores; measured on an H200 it is NOT faster "
                                                      "(0.86x the bf16 kernel) and adds ~5% error per "
                                                      "attention call (-0.09 dB PSNR on our testbed; README, "
                                                      "Speed). fp8_proj: bf16 attention, the SALAD Proj GEMM "
                                                      "in FP8 (~2% error on that correction term only, no "
                                                      "measurable change on our testbed); pays off on big "
                                                      "models: Wan 14B 720p 2.56x -> 2.60x on an H200. "
                                                      "Cards without FP8, backend torch, centroid "
                                                      "compensation (fp8) and low-rank Proj weights (fp8_proj) "
                                                      "fall back to bf16 (logged)."}),
            },
        }

    def apply(self, model: ModelPatcher, sparsity: float, pattern: str, start_percent: float, end_percent: float,
              dense_blocks: str, backend: str, salad_weights: ModelPatcher | None = None, min_tokens: int = 0,
              verbose: bool = False, compensation: str = "none",
              precision: str = DEFAULT_PRECISION) -> tuple[ModelPatcher]:
        sparsity = _number("sparsity", sparsity)
        start_percent = _number("start_percent", start_percent)
        end_percent = _number("end_percent", end_percent)
        if not 0.0 <= sparsity <= 0.99:
            raise ValueError(f"Apply SALAD Attention: sparsity must be in [0, 0.99], got {sparsity}")
        if pattern not in PATTERNS:
            raise ValueError(f"Apply SALAD Attention: pattern must be one of {list(PATTERNS)}, got {clip(pattern)}")
        if backend not in BACKENDS:
            raise ValueError(f"Apply SALAD Attention: backend must be one of {list(BACKENDS)}, got {clip(backend)}")
        if compensation not in COMPENSATIONS:
            raise ValueError(f"Apply SALAD Attention: compensation must be one of {list(COMPENSATIONS)}, got "
                             f"{clip(compensation)}")
        if precision not in PRECISIONS:
            raise ValueError(f"Apply SALAD Attention: precision must be one of {list(PRECISIONS)}, got "
                             f"{clip(precision)}")
        if not 0.0 <= start_percent <= 1.0 or not 0.0 <= end_percent <= 1.0:
            raise ValueError(f"Apply SALAD Attention: start_percent and end_percent must be in [0, 1], got "
                             f"start_percent={start_percent}, end_percent={end_percent}")
        if start_percent > end_percent:
            raise ValueError(f"Apply SALAD Attention: start_percent ({start_percent}) is after end_percent "
                             f"({end_percent}); need start_percent <= end_percent")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"Apply SALAD Attention: min_tokens must be a whole number >= 0, got {clip(min_tokens)}")
        if not isinstance(dense_blocks, str):
            raise ValueError(f"Apply SALAD Attention: dense_blocks must be text such as '0,1,28-29', got "
                             f"{clip(dense_blocks)}")
        if backend == "triton":
            from ..kernels import triton_available
            import comfy.model_management as mm
            dev = mm.get_torch_device()
            if not triton_available(dev):
                raise RuntimeError(f"Apply SALAD Attention: backend 'triton' needs an NVIDIA GPU with Triton; "
                                   f"this ComfyUI runs on {dev}. Choose 'auto' or 'torch'.")
        num_blocks = model_info(model, "Apply SALAD Attention")["num_blocks"]
        try:
            dense = parse_block_list(dense_blocks, num_blocks)
        except ValueError as e:
            raise ValueError(f"Apply SALAD Attention: {e}") from None
        opts = PatchOptions(sparsity=float(sparsity), pattern=pattern, start_percent=float(start_percent),
                            end_percent=float(end_percent), dense_blocks=frozenset(dense), backend=backend,
                            min_tokens=int(min_tokens), verbose=bool(verbose), compensation=compensation,
                            precision=precision)
        return (apply_salad(model, opts, salad_weights),)
