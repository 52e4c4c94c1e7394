"""Build tiny, random-weight Wan checkpoints that ComfyUI's own UNETLoader detects as Wan.

Run with ComfyUI importable (``--comfyui DIR``); it uses ComfyUI's WanModel class so the
state-dict keys are exactly the real ones.  Weights are random (seeded), so nothing is downloaded.

Variants (all with head_dim 128, as ComfyUI derives heads = dim // 128):
  wan21_t2v_tiny   dim 256 (2 heads), 2 blocks, in/out 16 channels     -> WAN21_T2V
  wan21_i2v_tiny   same, in_dim 36 + img_emb (CLIP-vision projection)  -> WAN21_I2V
  wan22_5b_tiny    dim 256, 2 blocks, in/out 48 channels               -> WAN22_T2V (the 5B family)
  wan21_t2v_tiny_3blk  dim 384 (3 heads), 3 blocks                     -> for "wrong model size" tests

Second family (ComfyUI's LTXVModel; its detection fixes 32 heads, head_dim = to_k rows / 32):
  ltxv_tiny        32 heads x 16 = 512 wide, 2 blocks, 128 latent channels, T5 width 4096 -> LTXV
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

VARIANTS = {
    "wan21_t2v_tiny": dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16),
    "wan21_i2v_tiny": dict(model_type="i2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, out_dim=16),
    "wan22_5b_tiny": dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=48, out_dim=48),
    "wan21_t2v_tiny_3blk": dict(model_type="t2v", dim=384, ffn_dim=512, num_heads=3, num_layers=3,
        in_dim=16, out_dim=16),
}


LTXV_VARIANTS = {
    "ltxv_tiny": dict(in_channels=128, num_attention_heads=32, attention_head_dim=16, cross_attention_dim=512,
                      caption_channels=4096, num_layers=2),
}
LTXV_FULL_SIZE = {  # the real LTX-Video shapes (0.9.x 2B and 13B), for GPU benchmarks (random weights)
    "ltxv_2b": dict(in_channels=128, num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
                    caption_channels=4096, num_layers=28),
    "ltxv_13b": dict(in_channels=128, num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
                     caption_channels=4096, num_layers=48),
}


def _import_comfy(comfyui_dir: str):
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops
    import comfy.ldm.wan.model as wan
    return comfy, wan


FULL_SIZE = {  # the real Wan 2.1 T2V shapes, for GPU benchmarks (random weights)
    "wan21_t2v_1.3b": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
        in_dim=16, out_dim=16),
    "wan21_t2v_14b": dict(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
        in_dim=16, out_dim=16),
}


def random_state_dict(comfyui_dir: str, cfg: dict, seed: int = 0, device="cpu", dtype=None):
    """Seeded random weights for ComfyUI's WanModel with config ``cfg``: exactly its state-dict keys and
    shapes (read from a ``meta`` instance, so no full-size model is ever built), norms at 1, biases small,
    other weights ~ N(0, 1/fan_in) (modulation x0.1).  Drawn in fp32 on ``device``, stored as ``dtype``
    (default fp16) on the CPU."""
    import torch
    comfy, wan = _import_comfy(comfyui_dir)
    model = wan.WanModel(text_dim=4096, operations=comfy.ops.disable_weight_init, device="meta",
                         dtype=torch.float32, **cfg)
    return _random_like(model, seed, device, dtype)


def random_ltxv_state_dict(comfyui_dir: str, cfg: dict, seed: int = 0, device="cpu", dtype=None):
    """As :func:`random_state_dict`, for ComfyUI's LTXVModel (the LTX-Video family) with config ``cfg``."""
    import torch
    comfy, _wan = _import_comfy(comfyui_dir)
    import comfy.ldm.lightricks.model as ltx
    model = ltx.LTXVModel(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32, **cfg)
    return _random_like(model, seed, device, dtype)


def _random_like(model, seed: int, device, dtype):
    """Seeded random tensors with the keys and shapes of ``model``'s state dict (see random_state_dict)."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if "norm" in name and name.endswith("weight") and t.ndim == 1:
            val = torch.ones(t.shape, device=device)
        elif name.endswith("bias"):
            val = torch.randn(t.shape, generator=gen, device=device) * 0.02
        else:
            fan_in = t[0].numel() if t.ndim > 1 else t.numel()
            val = torch.randn(t.shape, generator=gen, device=device) / max(fan_in, 1) ** 0.5
            if "modulation" in name:
                val = val * 0.1
        sd[name] = val.to(dtype or torch.float16).cpu().contiguous()
    return sd


def build_state_dict(comfyui_dir: str, variant: str, seed: int = 0):
    if variant in LTXV_VARIANTS:
        return random_ltxv_state_dict(comfyui_dir, LTXV_VARIANTS[variant], seed)
    return random_state_dict(comfyui_dir, VARIANTS[variant], seed)


def write_variant(comfyui_dir: str, out_dir: Path, variant: str, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{variant}.safetensors"
    if path.exists():
        return path
    sd = build_state_dict(comfyui_dir, variant, seed)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--out", required=True, help="diffusion_models folder to write into")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for v in a.variants:
        p = write_variant(a.comfyui, Path(a.out), v, a.seed)
        print(p)


if __name__ == "__main__":
    main()
