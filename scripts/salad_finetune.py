"""Command line for SALAD fine-tuning (issue 10): the recipe is :mod:`salad_core.finetune`; this script
only parses arguments, builds the wired model through a provider (default: ComfyUI's WanModel via
``nodes/finetune.py``; ComfyUI from ``--comfyui DIR`` or ``COMFYUI_DIR``) and runs it.  It lives outside
the product floors so that ``salad_core`` never reaches up into ``nodes`` or ``testbed``.

    python scripts/salad_finetune.py --model wan.safetensors --data pairs/ --out salad_ft.safetensors \\
        --steps 1600 --batch 8 --lr 1e-4 --sparsity 0.9 --pattern topk [--init-weights calib.safetensors]
    python scripts/salad_finetune.py ... --resume                   # continue from --ckpt
    python scripts/salad_finetune.py ... --lora-rank 16             # + LoRA on self-attn q/k/v/o (--lora-out)
    python scripts/salad_finetune.py ... --proj-rank 256            # fresh weights with a rank-256 Proj
    python scripts/salad_finetune.py ... --no-grad-checkpointing    # keep activations (small models: faster)
    torchrun --nproc-per-node 2 scripts/salad_finetune.py ...        # DDP (NCCL / gloo), global batch split
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _pack import PACK_NAME as PACK, register  # noqa: E402

register()

import torch  # noqa: E402

from salad_pack.salad_core.finetune import (FinetuneConfig, LoraSet, NonFiniteLossError, PairFolder,  # noqa: E402
                                            _dist, finetune, init_distributed_from_env, make_weights)
from salad_pack.salad_core.weights import format_block_spec  # noqa: E402


DEFAULT_PROVIDER = "nodes.finetune:cli_provider"
#: FinetuneConfig fields that are plain ``--name`` options of the same type and default
CONFIG_OPTIONS = ("steps", "batch", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "shift",
                  "multiplier", "cfg_dropout", "seed", "sparsity", "pattern", "backend", "ckpt_every", "log_every")


def _load_provider(spec: str):
    mod, _, fn = spec.partition(":")
    pkg = PACK
    top = mod.split(".")[0]
    name = f"{pkg}.{mod}" if top in ("nodes", "salad_core", "testbed", "benchmarks") else mod
    if top == "nodes" and f"{pkg}.nodes" not in sys.modules:
        # the nodes package's __init__ registers ComfyUI nodes (imports comfy before the provider has
        # put ComfyUI on sys.path): load its submodules without running it, as tests/_pack.py does for the root
        spec = importlib.machinery.ModuleSpec(f"{pkg}.nodes", None, is_package=True)
        m = importlib.util.module_from_spec(spec)
        m.__path__ = [str(ROOT / "nodes")]
        sys.modules[f"{pkg}.nodes"] = m
    return getattr(importlib.import_module(name), fn)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="SALAD fine-tuning (see salad_core/finetune.py)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusion model file (ComfyUI's diffusion_models format)")
    ap.add_argument("--data", required=True, help="folder of training pairs")
    ap.add_argument("--out", required=True, help="final SALAD weight file (.safetensors)")
    ap.add_argument("--ckpt", help="checkpoint file (default: <out>.ckpt)")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt if it exists")
    ap.add_argument("--init-weights", help="start from this (calibrated) SALAD weight file")
    ap.add_argument("--blocks", default=None, help="blocks to train, e.g. 0-29 (default: all)")
    ap.add_argument("--comfyui", help="ComfyUI directory (default COMFYUI_DIR, else the test harness's copy)")
    ap.add_argument("--provider", default=DEFAULT_PROVIDER, help="module:function that builds the wired model")
    ap.add_argument("--captions", choices=["none", "testbed"], default="none",
                    help="encoder for .latent + .txt pairs")
    ap.add_argument("--device", default=None)
    ap.add_argument("--stop-at", type=int, default=None, help="end after this many total steps (no final file)")
    d = FinetuneConfig()
    for k in CONFIG_OPTIONS:
        default = getattr(d, k) if k != "warmup" else None
        typ = type(default) if default is not None else int
        ap.add_argument(f"--{k.replace('_', '-')}", type=typ, default=default)
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--no-grad-checkpointing", action="store_true",
                    help="keep every block's activations for the backward pass instead of recomputing them "
                         "(faster, far more memory; fine for small models such as the testbed)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="also train a LoRA of this rank on the self-attention q/k/v/o projections (0: none)")
    ap.add_argument("--proj-rank", type=int, default=0,
                    help="Proj form of fresh weights: 0 = full dim x dim, r > 0 = rank r (~dim/(2r) times cheaper; "
                         "r >= dim: full). With --init-weights their own rank wins")
    ap.add_argument("--lora-out", default=None,
                    help="the LoRA file (ComfyUI LoraLoaderModelOnly format; default <out stem>_lora.safetensors)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    dev = init_distributed_from_env(a.device)
    device = dev or torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = _dist()
    rank = dist.get_rank() if dist else 0

    def log(msg):
        if rank == 0:
            print(f"[salad finetune] {msg}", flush=True)

    cfg = FinetuneConfig(**{k: getattr(a, k) for k in CONFIG_OPTIONS},
                         autocast=not a.no_autocast, grad_checkpointing=not a.no_grad_checkpointing,
                         lora_rank=a.lora_rank, proj_rank=a.proj_rank)
    handle = _load_provider(a.provider)(model=a.model, device=device, comfyui=a.comfyui)
    enc = None
    if a.captions == "testbed":
        from salad_pack.testbed.text import caption_context as enc
    data = PairFolder(a.data, caption_encoder=enc)
    weights = make_weights(handle["info"], cfg, a.init_weights, a.blocks, created_by="scripts/salad_finetune.py")
    weights.to(device)
    lora = lora_out = None
    if cfg.lora_rank:
        lora = LoraSet(handle["lora_targets"], cfg.lora_rank, seed=cfg.seed)
        lora_out = a.lora_out or str(Path(a.out).with_name(Path(a.out).stem + "_lora.safetensors"))
    forward = handle["wire"](weights, cfg, lora) if lora is not None else handle["wire"](weights, cfg)
    log(f"{handle['info'].get('base_model')}: training blocks {format_block_spec(weights.block_ids)} on "
        f"{data.describe()}, {cfg.steps} steps x batch {cfg.batch} ({dist.get_world_size() if dist else 1} "
        f"process(es)), sparsity {cfg.sparsity} {cfg.pattern}, shift {cfg.shift}, gradient checkpointing "
        f"{'on' if cfg.grad_checkpointing else 'off'}" + (f", LoRA rank {cfg.lora_rank}" if lora else "")
        + (f", rank-{weights.proj_rank} Proj" if weights.proj_rank else ""))
    ckpt = a.ckpt or (a.out + ".ckpt")
    try:
        res = finetune(forward, weights, data, cfg, out_path=a.out, ckpt_path=ckpt, resume=a.resume, device=device,
                       latent_transform=handle.get("latent_transform"), log=log, stop_at=a.stop_at,
                       created_by="scripts/salad_finetune.py", lora=lora, lora_out_path=lora_out)
    except NonFiniteLossError as e:
        log(str(e))
        return 3
    finally:
        if dist:
            dist.destroy_process_group()
    log(f"done at step {res['step']}" + (f": {res['path']}" if res["path"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
