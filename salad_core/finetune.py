"""End-to-end SALAD fine-tuning (issue 10): the paper's recipe, resumable, on one device or many.

What trains: the Proj (dim x dim, or rank r: ``FinetuneConfig.proj_rank`` for fresh weights, see
salad_core/proj.py) and gate (dim -> 1) of every block a :class:`SaladWeights` covers.  The
diffusion model itself is frozen; it runs with SALAD active inside its self-attention at the target
sparsity and pattern, so the blocks learn *together*, through the model's own flow-matching loss,
what the sparse branch misses (the layer-wise calibration of :mod:`.trainer` only matches each
block's attention output to dense attention).

This module never imports ComfyUI and knows nothing about Wan internals.  The caller passes

* ``forward(x_noisy, timestep, context) -> prediction``: the frozen model, already wired so that
  its self-attention runs :func:`salad_core.attention.salad_self_attention` with ``proj`` / ``gate``
  taken from the *same* ``weights`` module given to :func:`finetune` (the nodes side builds it
  with ``nodes/patch.py``'s SaladPatch, see ``nodes/finetune.py``);
* ``weights``: fresh (:meth:`SaladWeights.new`, proj = 0: the model starts as sparse-only) or
  calibrated (``load_salad_weights``: calibrate, then fine-tune);
* ``data``: a :class:`PairFolder` (below).

Objective (rectified flow, CONST prediction, as ComfyUI's ``ModelSamplingDiscreteFlow``; the
testbed trainer ``testbed/train.py`` uses the same): for the clean latent ``z0`` (after the
model's ``process_latent_in``), ``t ~ U(0, 1)``, ``sigma = shift t / (1 + (shift - 1) t)``,
``x = (1 - sigma) z0 + sigma noise``, ``loss = MSE(forward(x, sigma * multiplier, ctx), noise - z0)``.
From ComfyUI, ``shift`` / ``multiplier`` come from the model's ``model_sampling``.

Optimiser: AdamW on fp32 master weights, linear warm-up then cosine decay (to ``min_lr_ratio`` x
lr), gradient-norm clipping, bf16 autocast on CUDA (the torch path, fp32, on the CPU).

Gradient checkpointing (``FinetuneConfig.grad_checkpointing``, on by default): the wiring runs each
transformer block through :func:`checkpointed`, so only block inputs are kept and each block is
recomputed in the backward pass.  The base is frozen, but the gradient of block i's proj/gate goes
back through every later block, so without it the step keeps all blocks' activations (the
CLI's ``--no-grad-checkpointing`` is for small models, where it only costs time).

LoRA (``FinetuneConfig.lora_rank`` > 0, off by default): a :class:`LoraSet` on the self-attention
projections (the wiring chooses the targets: q/k/v/o of every block for Wan), trained and
checkpointed with proj/gate, written by :func:`save_lora` as a standard ComfyUI LoRA file
(``diffusion_model.<path>.lora_A.weight``...) that core's LoraLoaderModelOnly loads at strength 1; the
SALAD weight file names it in its ``lora_file`` metadata and stays loadable without it.

Determinism: the data order is a seeded permutation per epoch and every sample's noise, t and
caption dropout are drawn from a generator seeded by ``(seed, global sample index)``; the lr is a
function of the step.  So a step's batch depends on ``(seed, step)`` only, a resumed run sees
exactly what an uninterrupted run sees (bit-for-bit on the CPU), and under DDP each rank takes its
slice of the same global batch (same samples, same noise as one process with that batch).

Data (:class:`PairFolder`): a folder of pair files, one training example each:

* ``<name>.safetensors`` with tensors ``latent`` (C, T, H, W) -- a ComfyUI LATENT row as VAE
  Encode gives it (VAE space; the model's latent transform is applied at training time) -- and
  ``context`` (L, D) -- the text context (``CONDITIONING[0][0][0]``), metadata
  ``salad_pair_version = "1"`` (optional ``caption``, ``source``).  The node "SALAD Save Training
  Pair" writes these (:func:`save_pair`, atomic);
* or a ComfyUI ``.latent`` file (SaveLatent; key ``latent_tensor`` (B, C, T, H, W)) with its
  conditioning next to it: ``<stem>.context.safetensors`` (tensor ``context`` (L, D) or (B, L, D)),
  or a caption ``<stem>.txt`` turned into a context by a ``caption_encoder`` callable (the CLI's
  ``--captions testbed`` uses the testbed's text encoder).

Checkpoint (one safetensors file, written atomically: temp file, fsync, ``os.replace``; every
``ckpt_every`` steps and at the end): the weights (fp32), AdamW's state (exp_avg, exp_avg_sq, step
per parameter), the torch CPU / CUDA RNG states, and JSON metadata with the step (= the data
position: the next global sample index is ``step * batch``), the lr schedule position, the run
config, the data fingerprint and the loss history.  Resuming checks that config and data match.
A NaN / inf loss or gradient norm stops the run *before* the optimiser step with
:class:`NonFiniteLossError`; the last good checkpoint on disk is kept as it was.

Final file: the SALAD weight format (:func:`save_salad_weights`) that SALAD Weights Loader reads,
with ``training_steps``, ``training_data``, ``created_by``, ``pattern``, ``sparsity`` filled in.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the CLI initialises the process group (NCCL on
CUDA, gloo on the CPU); :func:`finetune` wraps the trainable weights in DDP whenever a process
group is initialised, splits each global batch over the ranks and lets rank 0 write checkpoints.

CLI: ``scripts/salad_finetune.py`` (it builds the wired Wan model through ``nodes/finetune.py``;
this module never reaches up into ``nodes`` or ``testbed``).
"""
from __future__ import annotations

import os
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .options import DEFAULT_PATTERN, DEFAULT_SPARSITY, PATTERNS
from .proj import check_proj_rank
from .trainer import warmup_cosine
from .weights import (SaladWeights, atomic_write_safetensors, format_block_spec, load_salad_weights,
                      parse_block_spec, save_salad_weights)

Tensor = torch.Tensor
PAIR_VERSION = "1"
CKPT_VERSION = "1"
FORWARD = Callable[[Tensor, Tensor, Tensor], Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN / inf; nothing was applied, the last checkpoint is kept."""


class FinetuneError(ValueError):
    """Bad input to fine-tuning (data folder, resume mismatch, configuration)."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """steps: optimiser steps in all; batch: *global* batch (split over DDP ranks); lr: peak AdamW
    lr; warmup: linear warm-up steps (None: 5% of steps, at least 1); min_lr_ratio: cosine ends at
    this share of lr; shift / multiplier: the flow schedule (ComfyUI model_sampling; Wan 2.1 T2V:
    shift 8, multiplier 1000); cfg_dropout: share of samples trained with an all-zero context;
    sparsity / pattern / backend: SALAD attention during training (recorded in the output file;
    the caller's wiring must use them too); ckpt_every: steps between checkpoints (0: only at the
    end); autocast: bf16 autocast on CUDA; grad_checkpointing: the wiring recomputes each transformer
    block in the backward pass instead of keeping its activations (see :func:`checkpointed`; on by
    default: the base is frozen, but the backward still walks every block, so without it a Wan 1.3B
    step at 480p keeps every block's activations); lora_rank: rank of the optional LoRA on the
    self-attention projections trained with proj/gate (0: none, see :class:`LoraSet`); proj_rank: the Proj
    form of fresh weights (:func:`make_weights`; 0: full dim x dim, r: rank r, ~dim / (2 r) times cheaper;
    r >= dim: full) -- weights given to start from keep their own form (their rank wins)."""

    steps: int = 1600
    batch: int = 8
    lr: float = 1e-4
    warmup: Optional[int] = None
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    shift: float = 8.0
    multiplier: float = 1000.0
    cfg_dropout: float = 0.0
    seed: int = 0
    sparsity: float = DEFAULT_SPARSITY
    pattern: str = DEFAULT_PATTERN
    backend: str = "auto"
    ckpt_every: int = 100
    log_every: int = 10
    autocast: bool = True
    grad_checkpointing: bool = True
    lora_rank: int = 0
    proj_rank: int = 0

    # keys that define the run: a resumed run must use the same values (grad_checkpointing changes memory and
    # time, not the numbers, so a run may be resumed with it switched)
    RUN_KEYS = ("steps", "batch", "lr", "warmup", "min_lr_ratio", "weight_decay", "betas", "grad_clip", "shift",
                "multiplier", "cfg_dropout", "seed", "sparsity", "pattern", "lora_rank")

    def __post_init__(self):
        self.steps, self.batch = int(self.steps), int(self.batch)
        if self.steps < 1 or self.batch < 1:
            raise FinetuneError(f"steps and batch must be >= 1, got steps={self.steps} batch={self.batch}")
        for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "shift", "multiplier", "cfg_dropout",
                  "sparsity"):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < 0:
                raise FinetuneError(f"{k} must be a finite number >= 0, got {getattr(self, k)!r}")
            setattr(self, k, v)
        if self.lr <= 0 or self.shift <= 0 or self.multiplier <= 0:
            raise FinetuneError("lr, shift and multiplier must be > 0")
        if self.cfg_dropout > 1 or self.sparsity > 0.99 or self.min_lr_ratio > 1:
            raise FinetuneError("cfg_dropout and min_lr_ratio must be <= 1, sparsity <= 0.99")
        if self.pattern not in PATTERNS:
            raise FinetuneError(f"pattern must be {' or '.join(map(repr, PATTERNS))}, got {self.pattern!r}")
        self.warmup = max(1, self.steps // 20) if self.warmup is None else max(0, int(self.warmup))
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.grad_checkpointing = bool(self.grad_checkpointing)
        r = self.lora_rank
        if isinstance(r, bool) or not isinstance(r, (int, float)) or int(r) != r or not 0 <= r <= 1024:
            raise FinetuneError(f"lora_rank must be an integer from 0 (no LoRA) to 1024, got {self.lora_rank!r}")
        self.lora_rank = int(self.lora_rank)
        self.proj_rank = check_proj_rank(self.proj_rank, FinetuneError)
        self.seed, self.ckpt_every = int(self.seed), max(0, int(self.ckpt_every))
        self.log_every = max(1, int(self.log_every))

    def run_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.RUN_KEYS}

    def lr_at(self, step: int) -> float:
        """lr of 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine to min_lr_ratio x lr."""
        return warmup_cosine(step, self.warmup, self.steps, self.lr, self.min_lr_ratio)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def save_pair(path, latent: Tensor, context: Tensor, caption: str = "", source: str = "") -> Path:
    """Write one training pair atomically: ``latent`` (C, T, H, W) in VAE space, ``context`` (L, D)."""
    latent = latent.detach()
    context = context.detach()
    if latent.ndim == 5 and latent.shape[0] == 1:
        latent = latent[0]
    if context.ndim == 3 and context.shape[0] == 1:
        context = context[0]
    if latent.ndim != 4 or context.ndim != 2:
        raise FinetuneError(f"a training pair needs a (C, T, H, W) latent and an (L, D) context; got latent "
                            f"{tuple(latent.shape)}, context {tuple(context.shape)}")
    for n, t in (("latent", latent), ("context", context)):
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise FinetuneError(f"refusing to save a training pair: {n} is not a finite float tensor")
    meta = {"salad_pair_version": PAIR_VERSION, "caption": str(caption)[:4096], "source": str(source)[:4096]}
    tensors = {"latent": latent.float().cpu().contiguous(), "context": context.float().cpu().contiguous()}
    return atomic_write_safetensors(tensors, meta, path)


class PairFolder:
    """The training pairs of ``folder`` (see the module docstring), in sorted file order.

    ``caption_encoder(list of captions) -> (B, L, D)``: needed only for ``.latent`` + ``.txt`` pairs."""

    def __init__(self, folder, caption_encoder: Optional[Callable[[List[str]], Tensor]] = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FinetuneError(f"training data folder {str(folder)!r} does not exist or is not a folder")
        self.caption_encoder = caption_encoder
        self.items: List[tuple] = []          # (kind, path, row, extra)
        problems = []
        for p in sorted(self.folder.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            try:
                if p.suffix == ".safetensors" and not p.name.endswith(".context.safetensors"):
                    with safe_open(str(p), framework="pt", device="cpu") as f:
                        meta, keys = f.metadata() or {}, set(f.keys())
                    if meta.get("salad_pair_version") != PAIR_VERSION or not {"latent", "context"} <= keys:
                        problems.append(f"{p.name}: not a SALAD training pair (needs tensors 'latent' and "
                                        f"'context' and salad_pair_version={PAIR_VERSION})")
                        continue
                    self.items.append(("pair", p, 0, None))
                elif p.suffix == ".latent":
                    with safe_open(str(p), framework="pt", device="cpu") as f:
                        n = f.get_slice("latent_tensor").get_shape()[0]
                    ctx = p.with_name(p.stem + ".context.safetensors")
                    txt = p.with_name(p.stem + ".txt")
                    if ctx.is_file():
                        extra = ("context", ctx)
                    elif txt.is_file():
                        if caption_encoder is None:
                            problems.append(f"{p.name}: its caption {txt.name} needs a caption encoder "
                                            f"(CLI: --captions testbed)")
                            continue
                        extra = ("caption", txt.read_text(encoding="utf-8").strip())
                    else:
                        problems.append(f"{p.name}: no conditioning next to it ({ctx.name} or {txt.name})")
                        continue
                    for r in range(int(n)):
                        self.items.append(("latent", p, r, extra))
            except Exception as e:  # unreadable file: say which
                problems.append(f"{p.name}: {type(e).__name__}: {str(e)[:200]}")
        self.problems = problems
        if not self.items:
            raise FinetuneError(f"no training pairs in {str(self.folder)!r}"
                                + (": " + "; ".join(problems[:5]) if problems else
                                   " (expected *.safetensors pairs from SALAD Save Training Pair, or ComfyUI "
                                   "*.latent files with <name>.context.safetensors or <name>.txt)"))

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """Hash of the item list (names, rows, sizes): resuming on other data is refused."""
        h = hashlib.sha256()
        for kind, p, r, _ in self.items:
            h.update(f"{kind}:{p.name}:{r}:{p.stat().st_size}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{len(self)} latent pairs in {self.folder.name}/ (fingerprint {self.fingerprint()})"

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        """(latent (C, T, H, W) fp32 in VAE space, context (L, D) fp32)."""
        from safetensors import safe_open

        kind, p, r, extra = self.items[i]
        with safe_open(str(p), framework="pt", device="cpu") as f:
            if kind == "pair":
                return f.get_tensor("latent").float(), f.get_tensor("context").float()
            lat = f.get_tensor("latent_tensor")[r].float()
        if extra[0] == "context":
            with safe_open(str(extra[1]), framework="pt", device="cpu") as f:
                c = f.get_tensor("context").float()
            ctx = c[min(r, c.shape[0] - 1)] if c.ndim == 3 else c
        else:
            ctx = self.caption_encoder([extra[1]])[0].float()
        return lat, ctx


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    h = hashlib.blake2b(",".join(str(int(x)) for x in xs).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def data_index(seed: int, position: int, n: int) -> int:
    """Dataset item of global sample ``position``: a seeded permutation per epoch."""
    epoch, j = divmod(int(position), int(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 7, epoch)))
    return int(perm[j])


def time_snr_shift(shift: float, t: Tensor) -> Tensor:
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def flow_example(z0: Tensor, ctx: Tensor, cfg: FinetuneConfig, position: int):
    """(x_noisy, sigma, context, target) of one sample (no batch dim), deterministic in (seed, position)."""
    g = torch.Generator().manual_seed(_mix(cfg.seed, 11, position))
    noise = torch.randn(z0.shape, generator=g, dtype=torch.float32).to(z0.device)
    t = torch.rand((), generator=g)
    drop = bool(torch.rand((), generator=g) < cfg.cfg_dropout)
    sigma = time_snr_shift(cfg.shift, t).to(z0.device)
    x = (1 - sigma) * z0 + sigma * noise
    return x, sigma, (torch.zeros_like(ctx) if drop else ctx), noise - z0


# ----------------------------------------------------------------------------------------------
# gradient checkpointing and LoRA (the wiring installs them; the recipe trains what they hold)
# ----------------------------------------------------------------------------------------------

def checkpointed(forward: Callable) -> Callable:
    """``forward`` (a transformer block's) run under ``torch.utils.checkpoint`` while autograd records:
    its activations are dropped after the forward and recomputed in the backward pass.  Non-reentrant
    (gradients reach parameters that are not inputs, such as proj/gate and LoRA; keyword arguments pass
    through; the RNG state is replayed).  Without grad (sampling, evaluation) it is ``forward`` itself."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    run._salad_checkpointed = forward
    return run


class LoraSet(torch.nn.Module):
    """Low-rank adapters on linear layers of the frozen model, trained with proj/gate (optional).

    ``targets``: ``{module path in the diffusion model: (in_features, out_features)}``, e.g.
    ``"blocks.3.self_attn.q": (1536, 1536)``.  Each target gets ``A`` (rank, in) and ``B`` (out, rank);
    the layer computes ``W x + b + (alpha / rank) B A x``.  ``B`` starts at zero (the model is unchanged
    at step 0), ``A`` uniform in +-1/sqrt(in) from ``seed`` (so a run is reproducible); ``alpha`` defaults
    to ``rank`` (scale 1).  :func:`save_lora` writes ComfyUI's standard LoRA keys
    (``diffusion_model.<path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``), which core's
    LoraLoaderModelOnly merges as ``W + strength (alpha / rank) B A``: the trained layer."""

    def __init__(self, targets: Dict[str, Tuple[int, int]], rank: int, alpha: Optional[float] = None, seed: int = 0):
        super().__init__()
        if int(rank) < 1 or not targets:
            raise FinetuneError(f"a LoRA needs rank >= 1 and at least one target (got rank {rank}, "
                                f"{len(targets)} targets)")
        self.rank = int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.paths: List[str] = sorted(targets)
        self._index = {p: i for i, p in enumerate(self.paths)}
        self.shapes = {p: (int(targets[p][0]), int(targets[p][1])) for p in self.paths}
        self.A = torch.nn.ParameterList()
        self.B = torch.nn.ParameterList()
        for i, p in enumerate(self.paths):
            n_in, n_out = self.shapes[p]
            g = torch.Generator().manual_seed(_mix(seed, 13, i))
            bound = 1.0 / math.sqrt(n_in)
            self.A.append(torch.nn.Parameter((torch.rand(self.rank, n_in, generator=g) * 2 - 1) * bound))
            self.B.append(torch.nn.Parameter(torch.zeros(n_out, self.rank)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, path: str, x: Tensor) -> Tensor:
        """The adapter's addition to the output of the layer at ``path`` for its input ``x``."""
        i = self._index[path]
        a, b = self.A[i], self.B[i]
        h = torch.nn.functional.linear(x, a.to(x.dtype))
        return torch.nn.functional.linear(h, b.to(h.dtype)) * self.scale

    def wrap(self, path: str, forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """A layer forward with this path's adapter added."""
        def run(x, *args, **kwargs):
            return forward(x, *args, **kwargs) + self.delta(path, x)
        return run

    def state_tensors(self) -> Dict[str, Tensor]:
        """``{"<path>.lora_A.weight": A, "<path>.lora_B.weight": B}`` (the parameters themselves)."""
        out = {}
        for i, p in enumerate(self.paths):
            out[f"{p}.lora_A.weight"] = self.A[i]
            out[f"{p}.lora_B.weight"] = self.B[i]
        return out


def save_lora(lora: LoraSet, path, prefix: str = "diffusion_model.", metadata: Optional[dict] = None) -> Path:
    """Write ``lora`` atomically as a ComfyUI LoRA file (keys ``<prefix><path>.lora_A.weight`` (rank, in),
    ``.lora_B.weight`` (out, rank), ``.alpha``; fp32)."""
    tensors = {}
    for name, t in lora.state_tensors().items():
        t = t.detach().float().cpu().contiguous()
        if not torch.isfinite(t).all():
            raise FinetuneError(f"refusing to save {Path(path).name}: LoRA tensor {name} has NaN/Inf values")
        tensors[prefix + name] = t
    for p in lora.paths:
        tensors[f"{prefix}{p}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    meta = {"salad_lora_version": "1", "rank": str(lora.rank), "alpha": str(lora.alpha),
            "targets": str(len(lora.paths))}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return atomic_write_safetensors(tensors, meta, path)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def _param_list(weights: SaladWeights, lora: Optional[LoraSet] = None) -> List[Tuple[str, torch.nn.Parameter]]:
    """Every trained tensor with its checkpoint name: proj/gate, then the LoRA's A/B (``lora.<path>...``)."""
    out = list(weights.state_tensors().items())
    if lora is not None:
        out += [(f"lora.{k}", v) for k, v in lora.state_tensors().items()]
    return out


def save_checkpoint(path, weights: SaladWeights, opt: torch.optim.Optimizer, state: dict,
                    lora: Optional[LoraSet] = None) -> Path:
    """Weights (and LoRA), AdamW state, RNG and ``state`` (JSON) in one safetensors file, atomically."""
    tensors = {}
    for name, p in _param_list(weights, lora):
        tensors[f"w.{name}"] = p.detach().float().cpu().contiguous()
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq", "step"):
            if k in st:
                v = st[k]
                v = v if torch.is_tensor(v) else torch.tensor(float(v))
                tensors[f"opt.{name}.{k}"] = v.detach().float().cpu().contiguous().reshape(v.shape)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"salad_finetune_checkpoint": CKPT_VERSION, "state": json.dumps(state)}
    return atomic_write_safetensors(tensors, meta, path)


def load_checkpoint(path) -> Tuple[dict, Dict[str, Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("salad_finetune_checkpoint") != CKPT_VERSION:
                raise FinetuneError(f"{Path(path).name} is not a SALAD fine-tune checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FinetuneError:
        raise
    except Exception as e:
        raise FinetuneError(f"cannot read checkpoint {Path(path).name}: {type(e).__name__}: {str(e)[:200]}") from None
    return json.loads(meta["state"]), tensors


def _restore(weights: SaladWeights, opt: torch.optim.Optimizer, tensors: Dict[str, Tensor],
             lora: Optional[LoraSet] = None) -> None:
    params = _param_list(weights, lora)
    missing = [n for n, _ in params if f"w.{n}" not in tensors]
    if missing:
        raise FinetuneError(f"checkpoint lacks weights {missing[:4]} (it was made for other blocks or LoRA targets)")
    bad = [n for n, p in params if tuple(tensors[f"w.{n}"].shape) != tuple(p.shape)]
    if bad:
        raise FinetuneError(f"checkpoint tensors {bad[:4]} have other shapes than this run's")
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"w.{n}"].to(device=p.device, dtype=p.dtype))
    sd = opt.state_dict()
    state = {}
    for i, (n, p) in enumerate(params):
        if f"opt.{n}.step" in tensors:
            state[i] = {k: tensors[f"opt.{n}.{k}"].to(p.device) if k != "step" else tensors[f"opt.{n}.{k}"]
                        for k in ("step", "exp_avg", "exp_avg_sq")}
    sd["state"] = state
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed_from_env(device: Optional[str] = None) -> Optional[torch.device]:
    """Under torchrun (WORLD_SIZE > 1): init the process group (NCCL on CUDA, gloo on CPU) and
    return this rank's device; None when not distributed."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


class _Trainable(torch.nn.Module):
    """The trainable weights plus the caller's forward, so DDP sees the parameters it must reduce."""

    def __init__(self, weights: SaladWeights, forward: FORWARD, lora: Optional[LoraSet] = None):
        super().__init__()
        self.weights = weights
        self.lora = lora
        self._forward = forward

    def forward(self, x, t, ctx):
        return self._forward(x, t, ctx)


# ----------------------------------------------------------------------------------------------
# the training run
# ----------------------------------------------------------------------------------------------

def _compatible_state(prev: dict, cfg: FinetuneConfig, weights: SaladWeights, fingerprint: str, ckpt) -> None:
    was = {"lora_rank": 0, **prev["config"]}          # checkpoints from before the LoRA option had none
    diffs = [f"{k}: checkpoint {was.get(k)!r}, now {v!r}" for k, v in cfg.run_dict().items() if was.get(k) != v]
    if int(prev.get("proj_rank", 0)) != weights.proj_rank:   # checkpoints from before the option: full Proj
        diffs.append(f"Proj rank: checkpoint {prev.get('proj_rank', 0)} (0 = full), now {weights.proj_rank}")
    if prev.get("blocks") != format_block_spec(weights.block_ids) or prev.get("dim") != weights.dim:
        diffs.append(f"weights: checkpoint blocks {prev.get('blocks')} dim {prev.get('dim')}, now "
                     f"{format_block_spec(weights.block_ids)} dim {weights.dim}")
    if prev.get("data_fingerprint") != fingerprint:
        diffs.append(f"training data: checkpoint {prev.get('data')}, now fingerprint {fingerprint}")
    if diffs:
        raise FinetuneError(f"cannot resume from {Path(ckpt).name}: the run differs ({'; '.join(diffs)}). Use the "
                            f"same settings and data, or start without resume.")


def finetune(forward: FORWARD, weights: SaladWeights, data: PairFolder, config: FinetuneConfig, *,
             out_path=None, ckpt_path=None, resume: bool = False, device=None,
             latent_transform: Optional[Callable[[Tensor], Tensor]] = None,
             callback: Optional[Callable[[dict], None]] = None, created_by: str = "salad_core.finetune",
             stop_at: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
             lora: Optional[LoraSet] = None, lora_out_path=None) -> dict:
    """Fine-tune ``weights`` (in place) through ``forward``; see the module docstring.

    out_path: final SALAD weight file (written by rank 0; None: not written).  ckpt_path: checkpoint
    file (None: no checkpoints, no resume).  resume: continue from ``ckpt_path`` when it exists.
    latent_transform: VAE-space latent -> model space (ComfyUI: ``model.model.process_latent_in``).
    callback(dict(step, steps, loss, lr, grad_norm, seconds)) after every step (rank 0 only).
    stop_at: end after this many total steps (checkpointing there) without finishing the run
    (tests, time-sliced jobs); no final file is written then.
    lora: a :class:`LoraSet` of rank ``config.lora_rank`` that ``forward``'s wiring already applies,
    trained (and checkpointed) with the weights; lora_out_path: its final ComfyUI LoRA file (rank 0).

    Returns ``dict(weights, path, step, history, resumed_from, lora, lora_path)``.  Raises NonFiniteLossError on a
    NaN / inf loss (nothing applied; the checkpoint on disk stays the last good one)."""
    cfg = config
    dist = _dist()
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist else (1, 0)
    if cfg.batch % world:
        raise FinetuneError(f"the global batch {cfg.batch} must be divisible by the {world} processes")
    local = cfg.batch // world
    if (lora.rank if lora is not None else 0) != cfg.lora_rank:
        raise FinetuneError(f"config.lora_rank is {cfg.lora_rank} but the LoRA passed has rank "
                            f"{lora.rank if lora is not None else 0}")
    device = torch.device(device) if device is not None else next(weights.parameters()).device
    say = log or (lambda m: None)
    weights.to(device=device, dtype=torch.float32)
    weights.requires_grad_(True)
    if lora is not None:
        lora.to(device=device, dtype=torch.float32)
        lora.requires_grad_(True)
    params = [p for _, p in _param_list(weights, lora)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    fingerprint = data.fingerprint()
    prior_steps = int(weights.metadata.get("training_steps", "0") or 0)
    start, history, resumed_from = 0, [], None
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        prev, tensors = load_checkpoint(ckpt_path)
        _compatible_state(prev, cfg, weights, fingerprint, ckpt_path)
        _restore(weights, opt, tensors, lora)
        start, history, prior_steps = int(prev["step"]), list(prev.get("history", [])), int(prev["prior_steps"])
        resumed_from = str(ckpt_path)
        say(f"resumed from {ckpt_path.name} at step {start} of {cfg.steps}")
    elif resume and ckpt_path is not None:
        say(f"no checkpoint at {ckpt_path}: starting at step 0")
    module = _Trainable(weights, forward, lora)
    if dist and world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                     broadcast_buffers=False)
    use_autocast = cfg.autocast and device.type == "cuda"
    end = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))

    def state_now(step: int) -> dict:
        return {"step": step, "data_position": step * cfg.batch, "config": cfg.run_dict(),
                "scheduler": {"kind": "linear warm-up + cosine", "next_step": step, "next_lr": cfg.lr_at(step)},
                "blocks": format_block_spec(weights.block_ids), "dim": weights.dim, "heads": weights.heads,
                "proj_rank": weights.proj_rank,
                "num_blocks": weights.num_blocks, "weights_metadata": dict(weights.metadata),
                "prior_steps": prior_steps, "data_fingerprint": fingerprint, "data": data.describe(),
                "world_size": world, "history": history[-2000:],
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def checkpoint(step: int):
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, weights, opt, state_now(step), lora)
        if dist and world > 1:
            dist.barrier()

    t0 = time.monotonic()
    last_good = start
    for step in range(start, end):
        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        base = step * cfg.batch + rank * local
        groups: Dict[tuple, list] = {}
        for j in range(local):
            pos = base + j
            z0, ctx = data[data_index(cfg.seed, pos, len(data))]
            z0, ctx = z0.to(device), ctx.to(device)
            if latent_transform is not None:
                z0 = latent_transform(z0.unsqueeze(0))[0].float()
            groups.setdefault((tuple(z0.shape), tuple(ctx.shape)), []).append(flow_example(z0, ctx, cfg, pos))
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        keys = list(groups)
        for gi, key in enumerate(keys):
            ex = groups[key]
            x = torch.stack([e[0] for e in ex])
            sigma = torch.stack([e[1] for e in ex]).float()
            c = torch.stack([e[2] for e in ex])
            target = torch.stack([e[3] for e in ex])
            sync = contextlib.nullcontext()
            if isinstance(module, torch.nn.parallel.DistributedDataParallel) and gi < len(keys) - 1:
                sync = module.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    pred = module(x, sigma * cfg.multiplier, c)
                per = ((pred.float() - target) ** 2).flatten(1).mean(dim=1)
                loss = per.sum() / local
                loss.backward()
            loss_sum = loss_sum + loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        stat = torch.stack([loss_sum, gnorm.detach().float().to(device)])
        if dist and world > 1:
            dist.all_reduce(stat)
            stat = stat / world
        lv, gv = stat.tolist()          # the step's one host sync
        if not (math.isfinite(lv) and math.isfinite(gv)):
            where = (f"the last good checkpoint {ckpt_path} (step {last_good}) is kept unchanged"
                     if ckpt_path is not None and last_good > 0 and ckpt_path.exists()
                     else "no checkpoint was written before it")
            raise NonFiniteLossError(
                f"SALAD fine-tune stopped: the {'loss' if not math.isfinite(lv) else 'gradient norm'} is "
                f"{lv if not math.isfinite(lv) else gv} at step {step + 1} (lr {lr:.3g}); the update was NOT "
                f"applied and {where}. Lower the learning rate, check the training data for NaN/inf, or resume "
                f"from the checkpoint.")
        opt.step()
        history.append([step + 1, round(lv, 6)])
        done = step + 1
        if callback is not None and rank == 0:
            callback(dict(step=done, steps=cfg.steps, loss=lv, lr=lr, grad_norm=gv,
                          seconds=time.monotonic() - t0))
        if done % cfg.log_every == 0 or done == end:
            say(f"step {done}/{cfg.steps} loss {lv:.5f} lr {lr:.3g} grad-norm {gv:.3f} "
                f"({time.monotonic() - t0:.1f} s)")
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < end:
            checkpoint(done)
            last_good = done
    step_done = end
    if step_done > start or (ckpt_path is not None and not ckpt_path.exists()):
        checkpoint(step_done)
    weights.requires_grad_(False)
    if lora is not None:
        lora.requires_grad_(False)
    finished = step_done == cfg.steps
    md = weights.metadata
    md["training_steps"] = str(prior_steps + step_done)
    md["training_data"] = (f"SALAD fine-tune (flow matching, shift {cfg.shift:g}): {step_done} steps x batch "
                           f"{cfg.batch} on {data.describe()}; lr {cfg.lr:g}, warm-up {cfg.warmup}, cosine; "
                           f"{world} process(es)")
    if prior_steps:
        md["training_data"] += f"; started from {prior_steps} prior steps"
    md["created_by"] = created_by
    md["pattern"] = cfg.pattern
    md["sparsity"] = str(cfg.sparsity)
    lora_path = None
    if lora is not None:
        md["training_data"] += (f"; trained together with a rank-{lora.rank} LoRA on the self-attention projections"
                                f" ({len(lora.paths)} layers): load that LoRA at strength 1 with these weights")
        if lora_out_path is not None:
            md["lora_file"] = Path(lora_out_path).name
            if finished and rank == 0:
                lora_path = save_lora(lora, lora_out_path, metadata={
                    "base_model": md.get("base_model", "unknown"), "created_by": created_by,
                    "training_steps": md["training_steps"], "salad_weights": Path(out_path).name if out_path else "",
                    "training_data": md["training_data"]})
                say(f"saved {lora_path}")
    path = None
    if out_path is not None and finished and rank == 0:
        path = save_salad_weights(weights, out_path)
        say(f"saved {path}")
    if dist and world > 1:
        dist.barrier()
    return dict(weights=weights, path=path, step=step_done, history=history, resumed_from=resumed_from,
                lora=lora, lora_path=lora_path)


def make_weights(info: dict, cfg: FinetuneConfig, init_weights=None, blocks=None,
                 created_by: str = "salad_core.finetune") -> SaladWeights:
    """Fresh weights for ``info`` (dim, heads, num_blocks, base_model), or calibrated ones (a file or a
    SaladWeights, checked against ``info``) to fine-tune from.  ``blocks`` (spec, list or None = all): the
    blocks to train.  A calibrated file may cover fewer blocks (the calibration keeps only blocks it improved):
    the others are added fresh (proj = 0, the sparse-only start), so calibrate-then-fine-tune trains every
    block; the file's covered blocks outside ``blocks`` are kept as they are (and trained too).  Fresh weights
    get ``cfg.proj_rank``; given weights keep their Proj form (full or their rank, which wins over
    ``cfg.proj_rank``; the blocks added to them get the same form)."""
    if init_weights is not None:
        w = init_weights if isinstance(init_weights, SaladWeights) else load_salad_weights(init_weights)
        w.check_compatible("wan", info["dim"], info["heads"], info["num_blocks"])
        want = (range(w.num_blocks) if blocks is None else
                parse_block_spec(blocks, w.num_blocks) if isinstance(blocks, str) else blocks)
        missing = sorted(set(int(i) for i in want) - set(w.block_ids))
        if not missing:
            return w
        full = SaladWeights.new(w.dim, w.heads, w.num_blocks, blocks=sorted(set(w.block_ids) | set(missing)),
                                proj_rank=w.proj_rank, seed=cfg.seed)
        full.metadata.update(w.metadata)
        full.path = w.path
        dst = full.state_tensors()
        with torch.no_grad():
            for name, t in w.state_tensors().items():
                dst[name].copy_(t.detach().float())
        full._sync_metadata()
        full.metadata["init_blocks"] = format_block_spec(w.block_ids)
        return full
    return SaladWeights.new(info["dim"], info["heads"], info["num_blocks"], blocks=blocks,
                            base_model=info.get("base_model", "unknown"), pattern=cfg.pattern,
                            sparsity=cfg.sparsity, created_by=created_by, proj_rank=cfg.proj_rank, seed=cfg.seed)

