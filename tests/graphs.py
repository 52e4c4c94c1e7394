"""API-format prompt builders for the tiny Wan models used in tests and the demo."""
from __future__ import annotations

import copy


def t2v_prompt(unet_name: str, *, salad: dict | None = None, weights_name: str | None = None, steps: int = 2,
               seed: int = 1, cfg: float = 3.0, channels: int = 16, frames: int = 5, height: int = 16,
               width: int = 16, prefix: str = "salad_test", sampler: str = "euler", scheduler: str = "simple",
               preview: bool = False) -> dict:
    """UNETLoader -> [Apply SALAD Attention] -> KSampler -> SaveLatent on a tiny Wan.

    ``salad``: None for no SALAD node, else the Apply SALAD Attention widget values to use.
    """
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "SALADTest_Conditioning", "inputs": {"seed": 11, "tokens": 16, "dim": 4096}},
        "3": {"class_type": "SALADTest_Conditioning", "inputs": {"seed": 12, "tokens": 16, "dim": 4096}},
        "4": {"class_type": "SALADTest_EmptyLatentVideo",
              "inputs": {"channels": channels, "frames": frames, "height": height, "width": width,
                         "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                         "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
    if salad is not None:
        inputs = dict(sparsity=0.9, pattern="topk", start_percent=0.0, end_percent=1.0, dense_blocks="",
                      backend="auto", min_tokens=0, verbose=True)
        inputs.update(salad)
        inputs["model"] = ["1", 0]
        p["5"] = {"class_type": "SALADApplyAttention", "inputs": inputs}
        p["6"]["inputs"]["model"] = ["5", 0]
        if weights_name is not None:
            p["8"] = {"class_type": "SALADWeightsLoader", "inputs": {"weights_name": weights_name}}
            p["5"]["inputs"]["salad_weights"] = ["8", 0]
    if preview:
        p["9"] = {"class_type": "SALADTest_LatentPreview", "inputs": {"samples": ["6", 0],
                                                                      "filename_prefix": prefix + "_preview"}}
    return copy.deepcopy(p)
