"""Making SALAD weights: layer-wise distillation toward dense attention.

No public SALAD weights exist, so each covered self-attention block gets its ``proj`` and
``gate`` trained on captured inputs of that block (q, k, v after RMSNorm + RoPE, the block input
x and the token grid) so that SALAD output matches exact dense attention::

    loss = || o_sparse + G(x) * proj(o_linear) - dense(q, k, v) ||^2 / || dense(q, k, v) ||^2

Everything else is frozen, so ``o_sparse``, ``o_linear``, ``dense`` and ``mean_tokens(x)`` are
computed once per sample (in fp32) and the optimisation only runs the tiny proj/gate layers; a
step costs one (tokens x dim x dim) matmul.  Blocks are trained one after another, each with its
own AdamW (fp32 master copies of its parameters), linear warm-up + cosine learning rate and
gradient-norm clipping.

Capturing: :class:`SampleStore` holds samples (plain dicts); :func:`capture` is a context
manager that records every call of :func:`salad_self_attention` (which passes its ``block_id``)
into a store, so the node side only has to run the model once with the capture active.
Stores can be saved to / loaded from a single safetensors file (never pickle).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from . import attention as _attn
from .attention import SaladConfig, dense_reference_attention, mix_branches, salad_branches
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
            n_ho = int(round(holdout * len(ss))) if len(ss) > 1 else 0
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
    (only blocks in ``blocks`` if given; only every ``every``-th call per block).  Not
    re-entrant; restores the previous hook on exit."""
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

    prev = _attn._CAPTURE_HOOK
    _attn._CAPTURE_HOOK = hook
    try:
        yield store
    finally:
        _attn._CAPTURE_HOOK = prev


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
        config = SaladConfig(sparsity=float(weights.metadata.get("sparsity", 0.9)) if sparsity is None else sparsity,
                             pattern=weights.metadata.get("pattern", "window") if pattern is None else pattern)
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


def _salad_out(xm: Optional[Tensor], o_s: Tensor, o_l: Tensor, proj, gate) -> Tensor:
    """o_sparse + G(xm) * proj(o_linear) in fp32, from one sample's precomputed features."""
    G = torch.sigmoid(gate(xm)).reshape(-1, 1, 1) if xm is not None else None
    return mix_branches(o_s, o_l, proj, G, out_dtype=torch.float32)


def train_salad(samples, weights: SaladWeights, steps: int = 300, lr: float = 1e-3,
                sparsity: Optional[float] = None, pattern: Optional[str] = None, log_every: int = 50,
                callback: Optional[Callable[[dict], None]] = None, *, config: Optional[SaladConfig] = None,
                seed: Optional[int] = 0, weight_decay: float = 0.0, grad_clip: float = 1.0,
                warmup: Optional[int] = None, batch_size: int = 1, tokens_per_step: Optional[int] = None,
                device=None, training_data: Optional[str] = None) -> dict:
    """Distil proj + gate of every block that has samples toward dense attention.

    samples: SampleStore or list of sample dicts (see :class:`SampleStore`).
    steps: optimisation steps *per block*.  sparsity / pattern: attention settings to train for
    (default: the weights' metadata; ``config`` may give the full :class:`SaladConfig`).
    batch_size: samples averaged per step.  tokens_per_step: random token subset per step (None =
    all tokens; the loss is per-token so subsampling is unbiased).  seed: makes sampling
    deterministic (None = nondeterministic).  callback(dict) is called every ``log_every``
    steps with block, step, loss, lr.

    Updates ``weights`` in place (same dtype/device as before) and its metadata
    (training_steps += steps, training_data, pattern, sparsity).  Returns
    ``{"history": {block: [(step, loss), ...]}, "final_loss": {block: loss}, "blocks": [...],
    "config": SaladConfig}``.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config, samples, device = _setup(samples, weights, config, sparsity, pattern, device, "train_salad")
    by_block: Dict[int, List[dict]] = {}
    for s in samples:
        b = _resolve_block(s, weights)
        if not weights.has_block(b):
            raise ValueError(f"sample for block {b} but the weights cover {format_block_spec(weights.block_ids)}")
        by_block.setdefault(b, []).append(s)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else torch.Generator()
    if seed is None:
        gen.seed()
    warmup = max(1, steps // 20) if warmup is None else max(0, int(warmup))
    history: Dict[int, list] = {}
    final: Dict[int, float] = {}

    def lr_at(step: int) -> float:  # step in [0, steps)
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    for b in sorted(by_block):
        feats = [_features(s, config, device) for s in by_block[b]]
        proj_dst, gate_dst = weights.proj_for(b), weights.gate_for(b)
        proj = copy.deepcopy(proj_dst).to(device=device, dtype=torch.float32)
        gate = copy.deepcopy(gate_dst).to(device=device, dtype=torch.float32)
        params = list(proj.parameters()) + list(gate.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        hist, run = [], []
        for step in range(steps):
            pick = torch.randint(len(feats), (batch_size,), generator=gen).tolist()
            loss = 0.0
            for i in pick:
                f = feats[i]
                o_s, o_l, tgt = f["o_s"], f["o_l"], f["tgt"]
                if tokens_per_step is not None and tokens_per_step < o_s.shape[1]:
                    sel = torch.randint(o_s.shape[1], (int(tokens_per_step),), generator=gen).to(device)
                    o_s, o_l, tgt = o_s[:, sel], o_l[:, sel], tgt[:, sel]
                out = _salad_out(f["xm"], o_s, o_l, proj, gate)
                loss = loss + ((out - tgt) ** 2).sum() / (tgt ** 2).sum().clamp_min(1e-12)
            loss = loss / len(pick)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            lv = float(loss.detach())
            run.append(lv)
            if (step + 1) % max(1, int(log_every)) == 0 or step == steps - 1:
                avg = sum(run) / len(run)
                run = []
                hist.append((step + 1, avg))
                if callback is not None:
                    callback(dict(block=b, step=step + 1, steps=steps, loss=avg, lr=sched.get_last_lr()[0]))
        with torch.no_grad():
            for dst, src in ((proj_dst, proj), (gate_dst, gate)):
                for pd, ps in zip(dst.parameters(), src.parameters()):
                    pd.copy_(ps.to(device=pd.device, dtype=pd.dtype))
        history[b] = hist
        final[b] = hist[-1][1]
        del feats

    md = weights.metadata
    md["training_steps"] = str(int(md.get("training_steps", "0") or 0) + steps)
    if training_data is None:
        grids = sorted({tuple(s["grid"]) for s in samples})
        training_data = (f"{len(samples)} captured samples, blocks {format_block_spec(by_block)}, "
                         f"grids {', '.join('x'.join(map(str, g)) for g in grids[:8])}")
    md["training_data"] = str(training_data)
    md["pattern"] = config.pattern
    md["sparsity"] = str(config.sparsity)
    return dict(history=history, final_loss=final, blocks=sorted(by_block), config=config)


@torch.no_grad()
def relative_error(samples, weights: SaladWeights, config: Optional[SaladConfig] = None, device=None) -> dict:
    """Mean relative L2 error ||o - dense|| / ||dense|| over samples of sparse-only attention
    (proj = 0) and of SALAD with the given weights.  Returns
    ``{"sparse_only": float, "salad": float, "n": int, "per_sample": [(sparse, salad), ...]}``."""
    config, samples, device = _setup(samples, weights, config, None, None, device, "relative_error")
    per = []
    for s in samples:
        b = _resolve_block(s, weights)
        f = _features(s, config, device)
        proj = copy.deepcopy(weights.proj_for(b)).to(device=device, dtype=torch.float32)
        gate = copy.deepcopy(weights.gate_for(b)).to(device=device, dtype=torch.float32)
        out = _salad_out(f["xm"], f["o_s"], f["o_l"], proj, gate)
        tn = f["tgt"].norm().clamp_min(1e-12)
        per.append((float((f["o_s"] - f["tgt"]).norm() / tn), float((out - f["tgt"]).norm() / tn)))
    return dict(sparse_only=sum(p[0] for p in per) / len(per), salad=sum(p[1] for p in per) / len(per),
                n=len(per), per_sample=per)
