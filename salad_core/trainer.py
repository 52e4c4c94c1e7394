"""Making SALAD weights: layer-wise distillation toward dense attention.

No public SALAD weights exist, so each covered self-attention block gets its ``proj`` and
``gate`` trained on captured inputs of that block (q, k, v after RMSNorm + RoPE, the block input
x and the token grid) so that SALAD output matches exact dense attention::

    loss = || o_sparse + G(x) * proj(o_linear) - dense(q, k, v) ||^2 / || dense(q, k, v) ||^2

Everything else is frozen, so ``o_sparse``, ``o_linear``, ``dense`` and ``mean_tokens(x)`` are
computed once per sample (in fp32) and the optimisation only runs the tiny proj/gate layers; a
step costs one (tokens x dim x dim) matmul (two tokens x dim x rank ones for a rank-r Proj, see
salad_core/proj.py).  Blocks are trained one after another, each with its own AdamW (fp32 master
copies of its parameters), linear warm-up + cosine learning rate and gradient-norm clipping.

Capturing: :class:`SampleStore` holds samples (plain dicts); :func:`capture` is a context
manager that records every call of :func:`salad_self_attention` (which passes its ``block_id``)
into a store, so the node side only has to run the model once with the capture active.
Stores can be saved to / loaded from a single safetensors file (never pickle).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import attention as _attn
from .attention import SaladConfig, dense_reference_attention, mix_branches, salad_branches
from .options import DEFAULT_PATTERN, DEFAULT_SPARSITY
from .proj import check_proj_rank
from .weights import SaladWeights, atomic_write_safetensors, format_block_spec

Tensor = torch.Tensor

_SAMPLE_TENSORS = ("q", "k", "v", "x")


class SampleStore:
    """List of captured samples.  Each sample is a dict with keys
    ``q, k, v`` (B, L, heads*D), ``x`` (B, L, dim) or None, ``heads``, ``grid`` (F, Hh, Ww),
    ``n_front``, ``n_back``, ``block_id`` (int or None).

    ``max_per_block`` caps the samples kept per block (later ones are dropped; use ``every`` in
    :func:`capture` to spread them over a sampling run).  ``dtype`` (e.g. torch.bfloat16) casts
    stored tensors to save memory; None keeps the incoming dtype.  Tensors are stored detached on
    ``device`` (CPU by default).
    """

    def __init__(self, samples: Optional[Iterable[dict]] = None, max_per_block: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device="cpu"):
        self.samples: List[dict] = []
        self.max_per_block = max_per_block
        self.dtype = dtype
        self.device = torch.device(device)
        self._counts: Dict[Optional[int], int] = {}
        for s in samples or []:
            self.add(**s)

    def _t(self, t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.detach()
        if self.dtype is not None:
            t = t.to(self.dtype)
        return t.to(self.device).clone() if t.device == self.device else t.to(self.device)

    def add(self, q: Tensor, k: Tensor, v: Tensor, heads: int, grid: Sequence[int], n_front: int = 0,
            n_back: int = 0, x: Optional[Tensor] = None, block_id: Optional[int] = None, **extra) -> bool:
        """Store one sample; returns False when ``max_per_block`` is reached for that block."""
        bid = None if block_id is None else int(block_id)
        n = self._counts.get(bid, 0)
        if self.max_per_block is not None and n >= self.max_per_block:
            return False
        self.samples.append(dict(q=self._t(q), k=self._t(k), v=self._t(v), x=self._t(x), heads=int(heads),
                                 grid=tuple(int(g) for g in grid), n_front=int(n_front), n_back=int(n_back),
                                 block_id=bid))
        self._counts[bid] = n + 1
        return True

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def block_ids(self) -> List[Optional[int]]:
        return sorted({s["block_id"] for s in self.samples}, key=lambda b: -1 if b is None else b)

    def for_block(self, block_id: Optional[int]) -> List[dict]:
        return [s for s in self.samples if s["block_id"] == block_id]

    def split(self, holdout: float = 0.2, seed: int = 0):
        """(train_store, heldout_store), split per block, deterministic for a seed."""
        g = torch.Generator().manual_seed(int(seed))
        tr, ho = SampleStore(dtype=self.dtype, device=self.device), SampleStore(dtype=self.dtype, device=self.device)
        for b in self.block_ids():
            ss = self.for_block(b)
            order = torch.randperm(len(ss), generator=g).tolist()
            # at least one held-out call per block once there are two (round(0.25 * 2) would give none)
            n_ho = max(1, int(round(holdout * len(ss)))) if len(ss) > 1 and holdout > 0 else 0
            n_ho = min(n_ho, len(ss) - 1) if len(ss) > 1 else 0
            for j, i in enumerate(order):
                (ho if j < n_ho else tr).samples.append(ss[i])
        return tr, ho

    # ----------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write all samples to one safetensors file (atomic)."""
        path = Path(path)
        tensors, index = {}, []
        for n, s in enumerate(self.samples):
            for key in _SAMPLE_TENSORS:
                if s.get(key) is not None:
                    tensors[f"samples.{n}.{key}"] = s[key].detach().cpu().contiguous()
            index.append({k: (list(v) if k == "grid" else v) for k, v in s.items() if k not in _SAMPLE_TENSORS})
        meta = {"salad_samples_version": "1", "index": json.dumps(index)}
        return atomic_write_safetensors(tensors, meta, path)

    @classmethod
    def load(cls, path, device="cpu") -> "SampleStore":
        from safetensors import safe_open

        store = cls(device=device)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("salad_samples_version") != "1":
                raise ValueError(f"{Path(path).name} is not a SALAD sample file")
            names = set(f.keys())
            for n, info in enumerate(json.loads(meta["index"])):
                ts = {k: (f.get_tensor(f"samples.{n}.{k}") if f"samples.{n}.{k}" in names else None)
                      for k in _SAMPLE_TENSORS}
                store.add(**ts, **info)
        return store


@contextlib.contextmanager
def capture(store: SampleStore, blocks: Optional[Iterable[int]] = None, every: int = 1):
    """Record the inputs of every :func:`salad_self_attention` call made inside the ``with``
    (only blocks in ``blocks`` if given; only every ``every``-th call per block).  With
    nested captures the inner one records, the outer one resumes after it.  The hook is a
    context variable (:data:`attention.CAPTURE_HOOK`), so it is seen only by calls made in this
    thread / task inside the ``with``."""
    wanted = None if blocks is None else {int(b) for b in blocks}
    seen: Dict[Optional[int], int] = {}
    every = max(1, int(every))

    def hook(d: dict) -> None:
        b = d.get("block_id")
        if wanted is not None and b not in wanted:
            return
        n = seen.get(b, 0)
        seen[b] = n + 1
        if n % every == 0:
            store.add(**d)

    token = _attn.CAPTURE_HOOK.set(hook)
    try:
        yield store
    finally:
        _attn.CAPTURE_HOOK.reset(token)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def _resolve_block(s: dict, weights: SaladWeights) -> int:
    b = s.get("block_id")
    if b is None:
        if len(weights.block_ids) != 1:
            raise ValueError("a sample without block_id can only be used with weights covering exactly "
                             f"one block; these cover {format_block_spec(weights.block_ids)}")
        return weights.block_ids[0]
    return int(b)


def _samples_list(samples) -> List[dict]:
    if isinstance(samples, SampleStore):
        return list(samples.samples)
    return list(samples)


@torch.no_grad()
def _features(s: dict, config: SaladConfig, device) -> dict:
    """fp32 (o_sparse, o_linear, dense target, mean x) of one sample, raster order, on device.

    The two SALAD branches are computed in the sample's own dtype (what the model computes at
    inference, e.g. bf16 through the Triton kernels); the dense target in fp32."""
    q, k, v = (s[n].to(device=device) for n in ("q", "k", "v"))
    o_s, o_l = salad_branches(q, k, v, s["heads"], grid=s["grid"], n_front=s.get("n_front", 0),
                              n_back=s.get("n_back", 0), config=config, linear=True)
    q, k, v = q.float(), k.float(), v.float()
    tgt = dense_reference_attention(q, k, v, s["heads"])
    x = s.get("x")
    xm = x.to(device=device, dtype=torch.float32).mean(dim=1) if x is not None else None
    return dict(o_s=o_s.float(), o_l=o_l.float(), tgt=tgt.float(), xm=xm)


def _config_for(weights: SaladWeights, config: Optional[SaladConfig], sparsity, pattern) -> SaladConfig:
    if config is None:
        md = weights.metadata
        config = SaladConfig(sparsity=float(md.get("sparsity", DEFAULT_SPARSITY)) if sparsity is None else sparsity,
                             pattern=md.get("pattern", DEFAULT_PATTERN) if pattern is None else pattern)
    else:
        kw = {}
        if sparsity is not None:
            kw["sparsity"] = sparsity
        if pattern is not None:
            kw["pattern"] = pattern
        if kw:
            config = SaladConfig(**{**config.__dict__, **kw})
    return config


def _setup(samples, weights: SaladWeights, config, sparsity, pattern, device, who: str):
    """(config, list of samples, device) shared by train_salad and relative_error."""
    config = _config_for(weights, config, sparsity, pattern)
    samples = _samples_list(samples)
    if not samples:
        raise ValueError(f"{who} needs at least one sample")
    device = torch.device(device) if device is not None else next(iter(weights.parameters())).device
    return config, samples, device


def _salad_out(xm: Optional[Tensor], o_s: Tensor, o_l: Tensor, proj: nn.Module, gate: nn.Module) -> Tensor:
    """o_sparse + G(xm) * proj(o_linear) in fp32, from one sample's precomputed features."""
    G = torch.sigmoid(gate(xm)).reshape(-1, 1, 1) if xm is not None else None
    return mix_branches(o_s, o_l, proj, G, out_dtype=torch.float32)


def warmup_cosine(step: int, warmup: int, steps: int, peak: float = 1.0, floor: float = 0.0) -> float:
    """Learning rate of 0-based ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine
    decay to ``floor`` x ``peak`` at ``steps`` (and there after).  Shared by :class:`TrainConfig` (as a
    multiplier, peak 1) and ``finetune.FinetuneConfig.lr_at``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_salad` optimises each block (its own AdamW on fp32 copies of proj and gate).

    steps: optimisation steps *per block*.  lr, weight_decay: AdamW.  grad_clip: gradient-norm
    clipping (0 or None: off).  warmup: linear warm-up steps before the cosine decay to 0 (None:
    steps // 20, at least 1).  batch_size: samples averaged per step.  tokens_per_step: random
    token subset per sample and step (None: all tokens; the loss is per token, so subsampling is
    unbiased).  log_every: steps between history entries and callback calls.  seed: makes the
    sampling deterministic (None: nondeterministic).  proj_rank: the Proj form of *fresh* weights made for
    a run (:meth:`fresh_weights`; 0: full dim x dim, r: rank r, see salad_core/proj.py); weights passed to
    :func:`train_salad` keep their own form (their rank wins).
    """

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    warmup: Optional[int] = None
    batch_size: int = 1
    tokens_per_step: Optional[int] = None
    log_every: int = 50
    seed: Optional[int] = 0
    proj_rank: int = 0

    def __post_init__(self) -> None:
        steps = int(self.steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "proj_rank", check_proj_rank(self.proj_rank))

    def fresh_weights(self, dim: int, heads: int, num_blocks: int, **new_kwargs) -> SaladWeights:
        """:meth:`SaladWeights.new` with this config's ``proj_rank`` (a rank >= dim means the full Proj) and the
        low-rank ``down`` init seeded by ``seed``; ``new_kwargs``: blocks, base_model, pattern, ..."""
        return SaladWeights.new(dim, heads, num_blocks, proj_rank=self.proj_rank,
                                seed=0 if self.seed is None else int(self.seed), **new_kwargs)

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 20) if self.warmup is None else max(0, int(self.warmup))

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step`` in [0, steps): linear warm-up, then cosine decay."""
        return warmup_cosine(step, self.warmup_steps, self.steps)

    def generator(self) -> torch.Generator:
        """The random source of sample and token picks (seeded unless ``seed`` is None)."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(self.seed))
        return gen

    @classmethod
    def of(cls, train: Optional["TrainConfig"], overrides: dict) -> "TrainConfig":
        """``train`` (default: TrainConfig()) with ``overrides`` (field names) replaced."""
        if train is not None and not isinstance(train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown training setting(s) {', '.join(unknown)}; "
                            f"TrainConfig has {', '.join(sorted(names))}")
        return dataclasses.replace(train if train is not None else cls(), **overrides)


#: callback(step, mean loss since the last call, learning rate) of :func:`train_block`
StepLog = Callable[[int, float, float], None]


def _group_by_block(samples: List[dict], weights: SaladWeights) -> Dict[int, List[dict]]:
    """Samples per block id; every block must be covered by ``weights``."""
    by_block: Dict[int, List[dict]] = {}
    for s in samples:
        b = _resolve_block(s, weights)
        if not weights.has_block(b):
            raise ValueError(f"sample for block {b} but the weights cover {format_block_spec(weights.block_ids)}")
        by_block.setdefault(b, []).append(s)
    return by_block


def _fp32_copies(weights: SaladWeights, block: int, device) -> Tuple[nn.Module, nn.Module]:
    """fp32 copies of one block's proj and gate on ``device`` (the weights stay untouched)."""
    proj = copy.deepcopy(weights.proj_for(block)).to(device=device, dtype=torch.float32)
    gate = copy.deepcopy(weights.gate_for(block)).to(device=device, dtype=torch.float32)
    return proj, gate


@torch.no_grad()
def _copy_parameters(pairs: Iterable[Tuple[nn.Module, nn.Module]]) -> None:
    """Copy every (destination, source) module's parameters, cast to the destination's device and dtype.  The
    two modules must have the same parameters (a full and a low-rank Proj do not: ValueError)."""
    for dst, src in pairs:
        pds, pss = list(dst.parameters()), list(src.parameters())
        if [p.shape for p in pds] != [p.shape for p in pss]:
            raise ValueError(f"cannot copy {type(src).__name__} parameters {[tuple(p.shape) for p in pss]} into "
                             f"{type(dst).__name__} {[tuple(p.shape) for p in pds]}")
        for pd, ps in zip(pds, pss):
            pd.copy_(ps.to(device=pd.device, dtype=pd.dtype))


def _step_loss(feats: List[dict], train: TrainConfig, gen: torch.Generator, device, proj: nn.Module,
               gate: nn.Module) -> Tensor:
    """One step's loss: mean relative squared error to dense attention over ``batch_size`` random samples
    (each on ``tokens_per_step`` random tokens when set)."""
    pick = torch.randint(len(feats), (train.batch_size,), generator=gen).tolist()
    loss = 0.0
    for i in pick:
        f = feats[i]
        o_s, o_l, tgt = f["o_s"], f["o_l"], f["tgt"]
        if train.tokens_per_step is not None and train.tokens_per_step < o_s.shape[1]:
            sel = torch.randint(o_s.shape[1], (int(train.tokens_per_step),), generator=gen).to(device)
            o_s, o_l, tgt = o_s[:, sel], o_l[:, sel], tgt[:, sel]
        out = _salad_out(f["xm"], o_s, o_l, proj, gate)
        loss = loss + ((out - tgt) ** 2).sum() / (tgt ** 2).sum().clamp_min(1e-12)
    return loss / len(pick)


def _optimiser_step(loss: Tensor, opt: torch.optim.Optimizer, sched, params: List[nn.Parameter],
                    grad_clip: Optional[float]) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def train_block(feats: List[dict], proj: nn.Module, gate: nn.Module, train: TrainConfig, gen: torch.Generator,
                device, log: Optional[StepLog] = None) -> List[Tuple[int, float]]:
    """Optimise one block's fp32 ``proj`` and ``gate`` in place on its precomputed features (see
    :func:`_features`).  Returns the history ``[(step, mean loss), ...]``, one entry per ``log_every`` steps
    and one at the last step; ``log`` is called with each entry and the learning rate."""
    params = list(proj.parameters()) + list(gate.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_factor)
    every = max(1, int(train.log_every))
    hist: List[Tuple[int, float]] = []
    run: List[float] = []
    for step in range(train.steps):
        loss = _step_loss(feats, train, gen, device, proj, gate)
        _optimiser_step(loss, opt, sched, params, train.grad_clip)
        run.append(float(loss.detach()))
        if (step + 1) % every == 0 or step == train.steps - 1:
            avg = sum(run) / len(run)
            run = []
            hist.append((step + 1, avg))
            if log is not None:
                log(step + 1, avg, sched.get_last_lr()[0])
    return hist


def _record_training(weights: SaladWeights, train: TrainConfig, config: SaladConfig, samples: List[dict],
                     blocks: Iterable[int], training_data: Optional[str]) -> None:
    """Update the weights' metadata: training_steps += steps, training_data, pattern, sparsity."""
    md = weights.metadata
    md["training_steps"] = str(int(md.get("training_steps", "0") or 0) + train.steps)
    if training_data is None:
        grids = sorted({tuple(s["grid"]) for s in samples})
        training_data = (f"{len(samples)} captured samples, blocks {format_block_spec(blocks)}, "
                         f"grids {', '.join('x'.join(map(str, g)) for g in grids[:8])}")
    md["training_data"] = str(training_data)
    md["pattern"] = config.pattern
    md["sparsity"] = str(config.sparsity)


def train_salad(samples, weights: SaladWeights, train: Optional[TrainConfig] = None, *,
                config: Optional[SaladConfig] = None, sparsity: Optional[float] = None, pattern: Optional[str] = None,
                callback: Optional[Callable[[dict], None]] = None, device=None, training_data: Optional[str] = None,
                **train_settings) -> dict:
    """Distil proj + gate of every block that has samples toward dense attention.

    samples: SampleStore or list of sample dicts (see :class:`SampleStore`).  train: the
    :class:`TrainConfig`; ``train_settings`` (its field names: steps, lr, seed, batch_size, ...)
    override single fields.  sparsity / pattern: attention settings to train for (default: the
    weights' metadata; ``config`` may give the full :class:`SaladConfig`).  callback(dict) is
    called every ``log_every`` steps with block, step, steps, loss, lr.

    Blocks are trained one after another (:func:`train_block`), each from its own fp32 copies,
    written back into ``weights`` (same dtype/device as before).  The Proj keeps the form ``weights`` have
    (full or rank r: ``train.proj_rank`` only applies to weights made by :meth:`TrainConfig.fresh_weights`).
    Updates the metadata (training_steps += steps, training_data, pattern, sparsity).  Returns ``{"history": {block:
    [(step, loss), ...]}, "final_loss": {block: loss}, "blocks": [...], "config": SaladConfig}``.
    """
    train = TrainConfig.of(train, train_settings)
    config, samples, device = _setup(samples, weights, config, sparsity, pattern, device, "train_salad")
    by_block = _group_by_block(samples, weights)
    gen = train.generator()
    history: Dict[int, List[Tuple[int, float]]] = {}
    for b in sorted(by_block):
        feats = [_features(s, config, device) for s in by_block[b]]
        proj, gate = _fp32_copies(weights, b, device)
        log = None if callback is None else functools.partial(_callback_dict, callback, b, train.steps)
        history[b] = train_block(feats, proj, gate, train, gen, device, log)
        _copy_parameters(((weights.proj_for(b), proj), (weights.gate_for(b), gate)))
        del feats
    _record_training(weights, train, config, samples, by_block, training_data)
    return dict(history=history, final_loss={b: h[-1][1] for b, h in history.items()}, blocks=sorted(by_block),
                config=config)


def _callback_dict(callback: Callable[[dict], None], block: int, steps: int, step: int, loss: float,
                   lr: float) -> None:
    callback(dict(block=block, step=step, steps=steps, loss=loss, lr=lr))


@torch.no_grad()
def relative_error(samples, weights: SaladWeights, config: Optional[SaladConfig] = None, device=None) -> dict:
    """Mean relative L2 error ||o - dense|| / ||dense|| over samples of sparse-only attention
    (proj = 0) and of SALAD with the given weights (sparse-only for blocks they do not cover).  Returns
    ``{"sparse_only": float, "salad": float, "n": int, "per_sample": [(sparse, salad), ...],
    "sample_blocks": [block of each per_sample entry], "per_block": {block: {"sparse_only", "salad", "n"}}}``."""
    config, samples, device = _setup(samples, weights, config, None, None, device, "relative_error")
    per, blocks = [], []
    for s in samples:
        b = _resolve_block(s, weights)
        f = _features(s, config, device)
        if weights.has_block(b):
            out = _salad_out(f["xm"], f["o_s"], f["o_l"], *_fp32_copies(weights, b, device))
        else:  # a block the weights do not cover runs sparse-only (as at inference)
            out = f["o_s"]
        tn = f["tgt"].norm().clamp_min(1e-12)
        per.append((float((f["o_s"] - f["tgt"]).norm() / tn), float((out - f["tgt"]).norm() / tn)))
        blocks.append(b)
        del f
    per_block: Dict[int, dict] = {}
    for b in sorted(set(blocks)):
        pb = [p for p, bb in zip(per, blocks) if bb == b]
        per_block[b] = dict(sparse_only=sum(p[0] for p in pb) / len(pb), salad=sum(p[1] for p in pb) / len(pb),
                            n=len(pb))
    return dict(sparse_only=sum(p[0] for p in per) / len(per), salad=sum(p[1] for p in per) / len(per),
                n=len(per), per_sample=per, sample_blocks=blocks, per_block=per_block)


# ----------------------------------------------------------------------------------------------
# keeping only what helps, and saying so
# ----------------------------------------------------------------------------------------------

#: a trained block is kept only when it lowers its held-out error by at least this fraction; the
#: held-out calls both choose and report, so a tiny "gain" is more likely noise than help (and a
#: dropped block also skips the linear branch at inference).
MIN_GAIN = 0.005


def subset_weights(weights: SaladWeights, keep: Iterable[int]) -> SaladWeights:
    """A copy of ``weights`` covering only blocks ``keep`` (same metadata, ``blocks`` updated)."""
    keep = sorted(set(int(b) for b in keep))
    out = SaladWeights(weights.dim, weights.heads, weights.num_blocks, keep, metadata=dict(weights.metadata),
                       path=weights.path, proj_rank=weights.proj_rank, init=False)
    p0 = next(iter(weights.parameters()), None)
    if p0 is not None:
        out.to(device=p0.device, dtype=p0.dtype)
    for b in keep:
        _copy_parameters(((out.proj_for(b), weights.proj_for(b)), (out.gate_for(b), weights.gate_for(b))))
    return out


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def keep_improved_blocks(weights: SaladWeights, heldout: dict, trained_blocks: Optional[Iterable[int]] = None,
                         min_gain: float = MIN_GAIN) -> dict:
    """Per block, keep the trained Proj/gate only where the held-out recordings say they beat
    sparse-only attention (relative error lower by at least ``min_gain``); every other block is
    dropped from the weights, i.e. runs sparse-only (no linear branch) at inference.

    heldout: :func:`relative_error` of the trained ``weights`` on held-out samples.
    trained_blocks: blocks that were trained (default: ``weights.block_ids``); a trained block
    with no held-out sample cannot be checked and is dropped.

    Returns a dict: ``weights`` (a :func:`subset_weights` copy with the kept blocks and metadata
    ``block_errors`` / ``heldout_error``, or None when no block is kept), ``kept``, ``dropped``,
    ``unchecked`` (block lists), ``per_block`` {block: (sparse_only, trained, kept)}, ``before``
    and ``after`` (mean held-out error over all held-out calls: sparse-only, and with the returned
    weights), ``trained_after`` (with all trained weights, before choosing), ``n``."""
    trained = sorted(set(int(b) for b in (weights.block_ids if trained_blocks is None else trained_blocks)))
    pb = heldout["per_block"]
    per_block, kept, dropped = {}, [], []
    for b in sorted(pb):
        so, tr = pb[b]["sparse_only"], pb[b]["salad"]
        ok = b in trained and tr < so * (1.0 - float(min_gain))
        per_block[b] = (so, tr, ok)
        (kept if ok else dropped).append(b)
    unchecked = [b for b in trained if b not in pb]
    final = [sal if per_block[b][2] else so for (so, sal), b in zip(heldout["per_sample"], heldout["sample_blocks"])]
    n = len(final)
    before = heldout["sparse_only"]
    after = sum(final) / n if n else before
    out_w = None
    if kept:
        out_w = subset_weights(weights, kept)
        md = out_w.metadata
        md["block_errors"] = json.dumps({str(b): [_sig(v[0]), _sig(v[1])] for b, v in per_block.items()},
                                        separators=(",", ":"))
        md["heldout_error"] = (f"sparse-only {before:.4f} -> SALAD {after:.4f} over {n} held-out calls; "
                               f"block_errors = [sparse-only, trained] per block; trained blocks not listed "
                               f"in 'blocks' run sparse-only")
    return dict(weights=out_w, kept=kept, dropped=dropped, unchecked=unchecked, per_block=per_block,
                before=before, after=after, trained_after=heldout["salad"], n=n,
                num_trained=len(trained), min_gain=float(min_gain))



def train_and_select(store: SampleStore, weights: SaladWeights, train: TrainConfig, config: SaladConfig, *,
                     holdout: float = 0.25, device=None, callback: Optional[Callable[[dict], None]] = None,
                     source: Optional[str] = None) -> dict:
    """The whole SALAD Train Weights run after recording: hold out a ``holdout`` share of each
    block's calls (seeded by ``train.seed``), train on the rest (:func:`train_salad` on ``device``),
    measure sparse-only and trained held-out error (:func:`relative_error`) and keep only the blocks
    that improved (:func:`keep_improved_blocks`, whose dict is returned, plus ``training``: the
    :func:`train_salad` result).  ``weights`` end on the CPU.  source: where the calls come from,
    for the ``training_data`` metadata ("<n> calls <source>")."""
    train_set, held = store.split(holdout, seed=0 if train.seed is None else train.seed)
    weights.to(device)
    res = train_salad(train_set, weights, train, config=config, callback=callback, device=device,
                      training_data=None if source is None else f"{len(train_set)} calls {source}")
    if len(held):
        heldout = relative_error(held, weights, device=device)  # sparse-only and trained, per block
    else:  # nothing could be held out: nothing can be shown to help
        heldout = dict(sparse_only=0.0, salad=0.0, n=0, per_sample=[], sample_blocks=[], per_block={})
    weights.to("cpu")
    return dict(keep_improved_blocks(weights, heldout, trained_blocks=res["blocks"]), training=res)

def change_words(before: float, after: float) -> str:
    """'better by 12.3%' / 'worse by 4.5%' / 'no change' (never a negative percentage)."""
    if before <= 0:
        return "no change" if after == before else ("worse" if after > before else "better")
    pct = 100.0 * (before - after) / before
    if abs(pct) < 0.05:
        return "no change"
    return f"better by {pct:.1f}%" if pct > 0 else f"worse by {-pct:.1f}%"


def training_report(result: dict, sparsity: float, pattern: str, saved_path=None) -> List[tuple]:
    """The report of :func:`keep_improved_blocks` as ``[(level, line), ...]`` (level 'info' or
    'warning'), headline first; the node joins the lines for its output and logs each."""
    before, after, n = result["before"], result["after"], result["n"]
    kept, dropped, unchecked = result["kept"], result["dropped"], result["unchecked"]
    m = result["num_trained"]
    lines: List[tuple] = []
    where = f"({n} held-out calls, sparsity {sparsity}, {pattern})"
    if not kept:
        lines.append(("warning", f"WARNING: SALAD training did not help: no block's held-out error went down by at "
                                 f"least {100 * result['min_gain']:g}%, so NO weight file was saved and no weights "
                                 f"are output (Apply SALAD Attention runs sparse-only without them). With all "
                                 f"trained weights: {change_words(before, result['trained_after'])} "
                                 f"({before:.4f} -> {result['trained_after']:.4f})."))
        if n:
            lines.append(("info", f"held-out relative error vs dense attention {where}: sparse-only {before:.4f} -> "
                                  f"SALAD {after:.4f} (no gain: kept sparse-only for {m} of {m} blocks)"))
        else:
            lines.append(("info", f"no held-out calls to measure with (no gain shown: kept sparse-only for {m} of "
                                  f"{m} blocks)"))
    else:
        lines.append(("info", f"SALAD weights: {change_words(before, after)} than sparse-only. Held-out relative "
                              f"error vs dense attention {where}: sparse-only {before:.4f} -> SALAD {after:.4f}"))
        if dropped or unchecked:
            lines.append(("info", f"no gain: kept sparse-only for {len(dropped) + len(unchecked)} of {m} blocks "
                                  f"({format_block_spec(dropped + unchecked)}); trained weights kept for "
                                  f"{len(kept)} of {m} blocks ({format_block_spec(kept)})"))
        else:
            lines.append(("info", f"trained weights kept for all {m} blocks"))
    if unchecked:
        lines.append(("info", f"blocks {format_block_spec(unchecked)} had no held-out recording to check them "
                              f"(record more steps or raise samples_per_block); they run sparse-only"))
    if saved_path is not None:
        lines.append(("info", f"SALAD weights saved to {saved_path}"))
    rows = [f"{b}: {so:.4f} -> {tr:.4f} {'kept' if ok else 'sparse-only'}"
            for b, (so, tr, ok) in result["per_block"].items()]
    if rows:
        lines.append(("info", "per block, held-out error sparse-only -> trained: " + "; ".join(rows)))
    return lines


# ----------------------------------------------------------------------------------------------
# recording memory
# ----------------------------------------------------------------------------------------------

GiB = 1024 ** 3


def _gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def recording_bytes(tokens: int, dim: int, num_blocks: int, calls_per_block: int, batch: int = 1,
                    qkv_dim: Optional[int] = None, bytes_per_value: int = 2) -> int:
    """CPU bytes the recordings take: per recorded call, q, k, v (qkv_dim = heads*head_dim each,
    default dim) and the block input x (dim) for every token of every batch row, in fp16."""
    qkv_dim = int(dim if qkv_dim is None else qkv_dim)
    return int(tokens) * (3 * qkv_dim + int(dim)) * int(bytes_per_value) * int(batch) * int(num_blocks) * \
        int(calls_per_block)


def training_work_bytes(tokens: int, dim: int, calls_per_block: int, batch: int = 1) -> int:
    """Extra bytes while one block trains (its fp32 o_sparse, o_linear and dense target per call);
    only lands in RAM when training runs on the CPU."""
    return int(tokens) * int(dim) * 4 * 3 * int(batch) * int(calls_per_block)


def check_recording_memory(latent_thw: Sequence[int], patch: Sequence[int], dim: int, num_blocks: int,
                           calls_per_block: int, batch: int, available_bytes: int, *, qkv_dim: Optional[int] = None,
                           train_on_cpu: bool = False, margin_fraction: float = 0.15,
                           margin_bytes: int = 2 * GiB, vae_scale: Sequence[int] = (4, 8, 8)) -> dict:
    """Would recording (and training) fit in ``available_bytes`` of free RAM?  Pure: pass the
    free-RAM figure in (the node uses ``psutil.virtual_memory().available``).

    latent_thw: latent frames, height, width; patch: the model's (t, h, w) patch size, so tokens =
    ceil(T/pt) * ceil(H/ph) * ceil(W/pw).  A margin of ``max(margin_bytes, margin_fraction *
    available)`` is left free.  vae_scale (t, h, w) only turns latent sizes into video sizes in
    the message (Wan 2.1: 4, 8, 8; Wan 2.2 5B: 4, 16, 16).

    Returns ``{"ok", "need", "usable", "tokens", "suggest_latent": (T, H, W) or None, "message"}``;
    message is empty when ok, else says what to use instead."""
    T, H, W = (int(v) for v in latent_thw)
    pt, ph, pw = (max(1, int(p)) for p in patch)

    def tokens_of(t, h, w):
        return -(-t // pt) * -(-h // ph) * -(-w // pw)

    def need_of(tok):
        n = recording_bytes(tok, dim, num_blocks, calls_per_block, batch, qkv_dim)
        if train_on_cpu:
            n += training_work_bytes(tok, dim, calls_per_block, batch)
        return n

    tokens = tokens_of(T, H, W)
    need = need_of(tokens)
    avail = max(0, int(available_bytes))
    usable = max(0, avail - max(int(margin_bytes), int(margin_fraction * avail)))
    res = dict(ok=need <= usable, need=need, usable=usable, available=avail, tokens=tokens, suggest_latent=None,
               message="")
    if res["ok"]:
        return res
    # suggest: same frames and aspect ratio, smaller height/width (down to 4 patches a side), then fewer frames
    per_token = need_of(1)
    max_tokens = usable // per_token if per_token else 0
    sug = None
    if max_tokens >= 1:
        r = math.sqrt(max_tokens / tokens)
        h = max(ph, int(H * r) // ph * ph)
        w = max(pw, int(W * r) // pw * pw)
        min_side = 4
        if h // ph < min_side or w // pw < min_side:
            h, w = min(H, min_side * ph), min(W, min_side * pw)
        t = T
        while t > 1 and tokens_of(t, h, w) > max_tokens:
            t -= 1
        if tokens_of(t, h, w) <= max_tokens:
            sug = (t, h, w)
    vt, vh, vw = (int(v) for v in vae_scale)

    def video(t, h, w):
        return f"{(t - 1) * vt + 1} frames at {w * vw}x{h * vh}"

    msg = (f"SALAD Train Weights: recording would need about {_gib(need)} of RAM (latent {T}x{H}x{W} "
           f"(frames x height x width) = {tokens:,} tokens x {num_blocks} blocks x {calls_per_block} recorded calls "
           f"per block x batch {batch}; q, k, v and block input in fp16"
           f"{' plus the fp32 training features of one block, as training runs on the CPU' if train_on_cpu else ''}"
           f") but only {_gib(usable)} is free to use ({_gib(avail)} available, keeping a margin). ")
    if sug is not None:
        msg += (f"Use a smaller latent, at most {sug[0]}x{sug[1]}x{sug[2]} (frames x height x width, about "
                f"{video(*sug)}; now {video(T, H, W)}), or lower samples_per_block.")
    else:
        msg += "Even the smallest latent would not fit: lower samples_per_block or free memory."
    res.update(suggest_latent=sug, message=msg)
    return res
