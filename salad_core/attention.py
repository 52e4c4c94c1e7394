"""SALAD self-attention for Wan video DiTs.

``out = O_sparse + G * proj(O_linear)``

* ``O_sparse``: block-sparse softmax attention over the tile-ordered tokens (see :mod:`.tiling`);
  each query block attends to ``keep_count(n_blocks, sparsity)`` key blocks chosen by a 3-D window
  (``pattern="window"``, nearest block centroids, static per grid) or by pooled q.k scores
  (``pattern="topk"``, input dependent).  A query block always sees its own block and every block
  that holds extra (non-grid) tokens.  ``sparsity == 0`` keeps all blocks, i.e. exact dense
  attention.
* ``O_linear``: non-causal linear attention with a ReLU feature map over *all* tokens.  It is fed
  with the same q, k that Wan passes to attention, i.e. after RMSNorm and Wan's 3-D RoPE; the
  rotary position information therefore enters the linear branch through the rotated q, k (no
  separate positional term).
* ``proj``: per-block ``nn.Linear(dim, dim)`` on the (B, L, heads*D) linear-branch output
  (zero-initialised in fresh weights so an untrained model equals sparse-only attention).
* ``G = sigmoid(gate(mean_tokens(x)))``: one scalar per sample from the block input ``x``
  (B, L, dim) through ``gate = nn.Linear(dim, 1)``.  When ``gate`` or ``x`` is None, G = 1.

Nothing here builds an L x L tensor.
"""
from __future__ import annotations

import contextvars
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import kernels as K
from .options import (BACKENDS, COMPENSATIONS, DEFAULT_BACKEND, DEFAULT_COMPENSATION, DEFAULT_PATTERN,
                      DEFAULT_PRECISION, DEFAULT_SPARSITY, PATTERNS, PRECISIONS)
from .proj import add_factors_, apply_factors, linear_params, proj_factors
from .tiling import DEFAULT_TILE, TileLayout

Tensor = torch.Tensor



@dataclass
class SaladConfig:
    """Settings of SALAD attention.

    sparsity: fraction of key blocks skipped per query block, 0 <= sparsity <= 0.99.
    pattern: "topk" (pooled q.k; the default) or "window" (static 3-D neighbourhood of block
        centroids); see .options.PATTERNS.
    block: attention block size in tokens (default kernels.DEFAULT_BLOCK = 128, what the
        Triton kernels are tuned for).
    tile: 3-D tile (frames, rows, cols) used to re-order tokens; volume should equal ``block``.
    window_scale: divisor of the (frame, row, col) centroid distances for the window pattern;
        a larger value along an axis makes the window reach further along that axis.  Distances
        are in token-grid units, so with the default tile (2, 8, 8) and scale (1, 1, 1) the
        temporally adjacent tile (distance 2) is nearer than a spatially adjacent one (distance
        8); ``window_scale=(2, 8, 8)`` measures in tiles instead (isotropic in tiles).
    backend: "auto" | "triton" | "torch" (passed to the kernels).
    eps: denominator epsilon of the linear branch.
    compensation: "none" (skipped key blocks get no probability mass) or "centroid" (every key
        block a query block skips adds one pseudo-token, its mean key and mean value with logit
        scale*q.kbar + log(n_tokens), to the same softmax; training-free; see
        kernels.reference.block_sparse_attention_ref).
    precision: "bf16" (the activations' 16-bit dtype), "fp8" or "fp8_proj".  "fp8": at inference the sparse
        branch runs the FP8 kernel (kernels/fp8.py: Q.K and P.V in e4m3 with scales) where the card has FP8
        tensor cores; elsewhere, with centroid compensation and under autograd it runs in bf16 (a warning says
        why, once).  "fp8_proj": attention stays bf16 and the full d x d Proj GEMM runs in e4m3 (per-row scales,
        kernels.fp8.linear_fp8) before the sparse kernel, which adds attention to it in its epilogue; a low-rank
        Proj, the torch backend and cards or torch builds without the FP8 GEMM keep the 16-bit GEMM (warned
        once); training (autograd) always uses the 16-bit GEMM.
    """

    sparsity: float = DEFAULT_SPARSITY
    pattern: str = DEFAULT_PATTERN
    block: int = K.DEFAULT_BLOCK
    tile: Tuple[int, int, int] = DEFAULT_TILE
    window_scale: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    backend: str = DEFAULT_BACKEND
    eps: float = 1e-5
    compensation: str = DEFAULT_COMPENSATION
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        try:
            self.sparsity = float(self.sparsity)
        except (TypeError, ValueError) as e:
            raise ValueError(f"SaladConfig.sparsity must be a number, got {self.sparsity!r}") from e
        if not (0.0 <= self.sparsity <= 0.99) or math.isnan(self.sparsity):
            raise ValueError(f"SaladConfig.sparsity must be in [0, 0.99], got {self.sparsity}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"SaladConfig.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SaladConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SaladConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"SaladConfig.compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 16:
            raise ValueError(f"SaladConfig.block must be an int >= 16, got {self.block!r}")
        try:
            tile = tuple(int(t) for t in self.tile)
        except (TypeError, ValueError) as e:
            raise ValueError(f"SaladConfig.tile must be 3 positive ints, got {self.tile!r}") from e
        if len(tile) != 3 or min(tile) < 1:
            raise ValueError(f"SaladConfig.tile must be 3 positive ints, got {self.tile!r}")
        self.tile = tile  # type: ignore[assignment]
        try:
            ws = tuple(float(s) for s in self.window_scale)
        except (TypeError, ValueError) as e:
            raise ValueError(f"SaladConfig.window_scale must be 3 positive numbers, got {self.window_scale!r}") from e
        if len(ws) != 3 or not all(s > 0 and math.isfinite(s) for s in ws):
            raise ValueError(f"SaladConfig.window_scale must be 3 positive numbers, got {self.window_scale!r}")
        self.window_scale = ws  # type: ignore[assignment]
        self.eps = float(self.eps)
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"SaladConfig.eps must be > 0, got {self.eps}")


# ----------------------------------------------------------------------------------------------
# block selection
# ----------------------------------------------------------------------------------------------

def _window_lut(layout: TileLayout, config: SaladConfig) -> Tuple[Tensor, Tensor]:
    """(idx (1,1,nq,kmax), cnt (1,1,nq)) of the window pattern; static per grid, cached."""
    return _window_lut_cached(layout.grid, layout.n_front, layout.n_back, layout.tile, str(layout.device),
                              config.block, config.sparsity, config.window_scale)


@functools.lru_cache(maxsize=32)
def _window_lut_cached(grid, n_front, n_back, tile, device, block, sparsity, window_scale):
    layout = TileLayout.get(grid, n_front, n_back, tile, device)
    coords = layout.block_coords(block)
    extra = layout.extra_blocks(block)
    idx, cnt = K.select_window(coords, coords, sparsity, 1, 1, scale=window_scale,
                               always_kept=extra if extra.numel() else None)
    return idx.contiguous(), cnt.contiguous()


def select_blocks(qh: Tensor, kh: Tensor, layout: TileLayout, config: SaladConfig,
                  q_rowmap: Optional[Tensor] = None, k_pooled: Optional[Tensor] = None,
                  q_pooled: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Block lists for tile-ordered (B,H,L,D) q, k (q in raster order with q_rowmap = layout.perm).
    k_pooled / q_pooled: the fp32 block means of the tile-ordered k / q if the caller has them
    (kernels.pool_blocks, kv_pass, q_pass): top-k then scores the given means instead of pooling again.
    The one selection entry point of both paths (benchmarks/selection_study.py swaps it out)."""
    B, H = qh.shape[:2]
    if config.pattern == "window":
        idx, cnt = _window_lut(layout, config)
        return idx.expand(B, H, *idx.shape[2:]), cnt.expand(B, H, cnt.shape[-1])
    extra = layout.extra_blocks(config.block)
    kept = extra if extra.numel() else None
    if q_pooled is not None and k_pooled is not None:
        return K.topk_from_pooled(q_pooled, k_pooled, config.sparsity, always_kept=kept, backend=config.backend)
    return K.select_topk(qh, kh, config.sparsity, block=config.block, always_kept=kept, backend=config.backend,
                         q_rowmap=q_rowmap, k_pooled=k_pooled)


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------

# optional capture hook: called with a dict of the inputs of salad_self_attention.  Set only
# through trainer.capture (a context manager), so it is scoped to the code inside its ``with``
# (and to that thread / task: a ContextVar, not a module global).
CAPTURE_HOOK: "contextvars.ContextVar[Optional[Callable[[dict], None]]]" = contextvars.ContextVar(
    "salad_capture_hook", default=None)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tuple[int, int, int, int]:
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be (B, L, heads*D); got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    B, L, HD = q.shape
    heads = int(heads)
    if heads < 1 or HD % heads:
        raise ValueError(f"hidden size {HD} is not divisible by heads={heads}")
    return B, L, heads, HD // heads


def _as_blhd(t: Tensor, B: int, L: int, H: int, D: int) -> Tensor:
    """(B,L,H*D) -> (B,L,H,D) view (a copy only if the last dim is strided)."""
    t4 = t.reshape(B, L, H, D)
    return t4 if t4.stride(-1) == 1 else t4.contiguous()


def _heads_view(t: Tensor, B: int, L: int, H: int, D: int) -> Tensor:
    """(B,L,H*D) raster -> (B,H,L,D) raster view (no copy)."""
    return _as_blhd(t, B, L, H, D).permute(0, 2, 1, 3)


def _to_heads_tiled(t: Tensor, layout: TileLayout, B: int, L: int, H: int, D: int) -> Tensor:
    """(B,L,H*D) raster -> (B,H,L,D) *view* of one tile-ordered (B,L,H,D) buffer (one gather)."""
    return _as_blhd(t, B, L, H, D).index_select(1, layout.perm).permute(0, 2, 1, 3)


def _sparse_branch(q: Tensor, kh: Tensor, vh: Tensor, layout: TileLayout, B: int, L: int, H: int, D: int,
                   config: SaladConfig) -> Tensor:
    """Block-sparse branch with autograd: q gathered into tile order, the kernel writes a (B,L,H,D)
    buffer, one index_select back to raster.  kh, vh: tile-ordered views.  Returns (B, L, H*D)."""
    qh = _to_heads_tiled(q, layout, B, L, H, D)
    idx, cnt = select_blocks(qh, kh, layout, config)
    # centroid compensation: the kernels pool k, v themselves (differentiably when grads are needed)
    o_s, _ = K.block_sparse_attention(qh, kh, vh, idx, cnt, block=config.block, scale=1.0 / math.sqrt(D),
                                      backend=config.backend, out_layout="blhd",
                                      compensate=config.compensation == "centroid")
    return o_s.transpose(1, 2).reshape(B, L, H * D).index_select(1, layout.inv_perm)


def _linear_branch(q: Tensor, k: Tensor, v: Tensor, B: int, L: int, H: int, D: int, config: SaladConfig) -> Tensor:
    """ReLU linear attention over all tokens.  Order-free (a sum over all keys, then a per-token
    map), so it runs on the raster-order tensors directly; returns (B, L, H*D) raster."""
    o_l = K.linear_attention(_heads_view(q, B, L, H, D), _heads_view(k, B, L, H, D), _heads_view(v, B, L, H, D),
                             eps=config.eps, backend=config.backend, out_layout="blhd")
    return o_l.transpose(1, 2).reshape(B, L, H * D)


def salad_branches(q: Tensor, k: Tensor, v: Tensor, heads: int, *, grid: Sequence[int],
                   n_front: int = 0, n_back: int = 0, config: Optional[SaladConfig] = None,
                   linear: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """Both branches of SALAD attention, before mixing (autograd-capable).

    Returns ``(o_sparse, o_linear)`` each (B, L, heads*D) in q.dtype, raster order (``o_linear``
    None when ``linear`` is False).
    """
    config = config or SaladConfig()
    B, L, H, D = _check_inputs(q, k, v, heads)
    layout = TileLayout.get(grid, n_front, n_back, config.tile, q.device)
    layout.check_length(L)
    kh = _to_heads_tiled(k, layout, B, L, H, D)
    vh = _to_heads_tiled(v, layout, B, L, H, D)
    o_s = _sparse_branch(q, kh, vh, layout, B, L, H, D, config)
    return o_s, (_linear_branch(q, k, v, B, L, H, D, config) if linear else None)


def _token_mean(x: Tensor, batch: int, backend: str = "torch") -> Tensor:
    """(B, dim) fp32 mean over the tokens of the block input x (B, L, dim), accumulated in fp32 (no fp32
    copy of x); kernels.token_mean without autograd ("triton": its split-L Triton kernel, else torch.mean)."""
    if x.dim() != 3 or x.shape[0] != batch:
        raise ValueError(f"x must be (B={batch}, L, dim), got {tuple(x.shape)}")
    if x.requires_grad:
        return torch.mean(x, dim=1, dtype=torch.float32)
    return K.token_mean(x, backend=backend)


def gate_logit(x: Optional[Tensor], gate: Optional[torch.nn.Module], batch: int,
               what: str = "SALAD gate weights", backend: str = "torch") -> Optional[Tensor]:
    """(B,) fp32 logits of G (inference: the kernels apply the sigmoid); None means G = 1."""
    if gate is None or x is None:
        return None
    xm = _token_mean(x, batch, backend)
    w, b = linear_params(gate, xm, what)
    return F.linear(xm, w, b).reshape(batch)


def gate_value(x: Optional[Tensor], gate: Optional[torch.nn.Module], batch: int,
               what: str = "SALAD gate weights") -> Optional[Tensor]:
    """G (B,1,1) = sigmoid(gate(mean over tokens of x)); None means G = 1.  The gate runs in fp32 on x's
    device (in the parameters' dtype when they are trained)."""
    if gate is None or x is None:
        return None
    if _needs_autograd(gate):
        return torch.sigmoid(gate(_token_mean(x, batch).to(gate.weight.dtype))).reshape(batch, 1, 1)
    return torch.sigmoid(gate_logit(x, gate, batch, what)).reshape(batch, 1, 1)


def mix_branches(o_sparse: Tensor, o_linear: Tensor, proj: torch.nn.Module,
                 G: Optional[Tensor], out_dtype=None) -> Tensor:
    """``o_sparse + G * proj(o_linear)`` in ``out_dtype`` (default o_sparse.dtype).

    Training (grad enabled and proj has trainable parameters): computed in the promoted dtype of
    the activations and the (fp32 master) parameters.  Otherwise the proj (full or low rank) runs in
    the activation dtype on the activations' device (see :func:`proj_factors`).
    """
    out_dtype = out_dtype or o_sparse.dtype
    if _needs_autograd(proj):
        w = next(proj.parameters(), None)   # (a low-rank Proj has no .weight: its first factor's dtype)
        cdt = torch.promote_types(o_linear.dtype, w.dtype) if w is not None else o_linear.dtype
        y = proj(o_linear.to(cdt))
    else:
        y = apply_factors(o_linear, *proj_factors(proj, o_linear, "SALAD Proj weights"))
    if G is not None:
        y = y * G.to(y.dtype)
    if y.dtype == out_dtype and o_sparse.dtype == out_dtype:
        return y.add_(o_sparse) if not y.requires_grad else o_sparse + y
    return (o_sparse.to(y.dtype) + y).to(out_dtype)


def _oom_message(e: BaseException, q: Tensor, heads: int, grid, block_id) -> str:
    """What an out-of-memory error inside SALAD attention tells the user: the call's size and what to change."""
    B, L = (int(s) for s in q.shape[:2])
    D = int(q.shape[-1]) // max(int(heads), 1)
    gib = q.numel() * q.element_size() / 2**30
    where = f" in block {block_id}" if block_id is not None else ""
    cause = str(e).splitlines()[0][:300] if str(e) else "out of memory"
    return (f"SALAD attention{where} ran out of GPU memory on {q.device} at batch {B}, {L:,} tokens "
            f"(latent grid {'x'.join(str(int(g)) for g in grid)}), {heads} heads of {D}, {q.dtype}: q, k and v "
            f"take {gib:.2f} GiB each and SALAD needs about as much again for tile-ordered K/V and its "
            f"output. Use fewer frames or a lower resolution, a smaller batch, or free GPU memory "
            f"(--lowvram / --reserve-vram). ({cause})")


def _name_oom(fn):
    """Re-raise a GPU out-of-memory error inside SALAD attention with the call's size in the message.

    The error stays a ``torch.OutOfMemoryError``, so ComfyUI still treats it as an OOM (it unloads the
    models and the next prompt starts clean).  The call's arguments pass through untouched; the size is
    read only when the error happens.
    """
    @functools.wraps(fn)
    def wrapper(q, k, v, heads, **kw):
        try:
            return fn(q, k, v, heads, **kw)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(_oom_message(e, q, heads, kw.get("grid", ()), kw.get("block_id"))) from e
    return wrapper


@_name_oom
def salad_self_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, *, grid: Sequence[int],
                         n_front: int = 0, n_back: int = 0, x: Optional[Tensor] = None,
                         proj: Optional[torch.nn.Module] = None, gate: Optional[torch.nn.Module] = None,
                         config: Optional[SaladConfig] = None, block_id: Optional[int] = None) -> Tensor:
    """SALAD attention for one Wan self-attention call.

    q, k, v: (B, L, heads*D) as Wan passes them to its attention function (after RMSNorm and
    3-D RoPE), tokens in raster order, L = n_front + F*Hh*Ww + n_back for ``grid = (F, Hh, Ww)``.
    x: block input (B, L, dim) for the gate; proj: nn.Linear(dim, dim) or None (sparse only);
    gate: nn.Linear(dim, 1) or None (G = 1).  proj and gate may sit on another device or dtype
    than the activations (a host that offloads them): they follow q (see :func:`linear_params`).
    ``block_id`` names the block in errors and for the capture hook (see :func:`trainer.capture`).
    Returns (B, L, heads*D) in q.dtype, raster order.
    """
    config = config or SaladConfig()
    hook = CAPTURE_HOOK.get()
    if hook is not None:
        hook(dict(q=q, k=k, v=v, heads=heads, grid=tuple(int(g) for g in grid), n_front=int(n_front),
                  n_back=int(n_back), x=x, block_id=block_id))
    B, L, H, D = _check_inputs(q, k, v, heads)
    layout = TileLayout.get(grid, n_front, n_back, config.tile, q.device)
    layout.check_length(L)
    where = f" of block {block_id}" if block_id is not None else ""
    if _needs_autograd(q, k, v, x, proj, gate):
        kh = _to_heads_tiled(k, layout, B, L, H, D)
        vh = _to_heads_tiled(v, layout, B, L, H, D)
        G = gate_value(x, gate, B, f"SALAD gate weights{where}") if proj is not None else None
        out = _sparse_branch(q, kh, vh, layout, B, L, H, D, config)
        if proj is not None:
            out = mix_branches(out, _linear_branch(q, k, v, B, L, H, D, config), proj, G, out_dtype=out.dtype)
        return out.to(q.dtype)
    return _infer(q, k, v, B, L, H, D, layout, config, x, proj, gate, where)


def _infer(q: Tensor, k: Tensor, v: Tensor, B: int, L: int, H: int, D: int, layout: TileLayout,
           config: SaladConfig, x: Optional[Tensor], proj: Optional[torch.nn.Module],
           gate: Optional[torch.nn.Module], where: str) -> Tensor:
    """Inference: K and V are read once (tile-order copies, k block means for top-k, the linear state), Q
    once (q block means, G * linear branch in raster order); the sparse kernel reads q through the tile
    permutation and writes raster order plus G * proj.bias; the Proj GEMM accumulates into its output (with
    precision "fp8_proj" the order turns: the FP8 Proj GEMM first, the sparse kernel adds attention to it).
    15 kernels per call with gate + Proj, whatever the size (benchmarks/profile_layer.py)."""
    comp = config.compensation == "centroid"
    topk = config.pattern == "topk"
    linear = proj is not None
    rowmap = layout.perm32
    q4, k4, v4 = (_heads_view(t, B, L, H, D) for t in (q, k, v))
    kt, vt, k_mean, v_mean, state = K.kv_pass(k4, v4, rowmap, config.block, pool_k=topk or comp, pool_v=comp,
                                              linear_state=linear, backend=config.backend)
    gl = gate_logit(x, gate, B, f"SALAD gate weights{where}", config.backend) if linear else None
    q_mean = o_lin = q_tiled = None
    # a tile-ordered copy of q, written by the Q pass, where the sparse kernel's config reads q with TMA (Q_TILED)
    fp8 = config.precision == "fp8" and _fp8_usable(q, config)
    tile_q = not fp8 and K.wants_tiled_q(q4, config.block, config.backend)
    if topk or linear or tile_q:
        q_mean, o_lin, *rest = K.q_pass(q4, rowmap, config.block, state=state, eps=config.eps, gate_logit=gl,
                                        pool=topk, backend=config.backend, tile_q=tile_q)
        q_tiled = rest[0] if rest else None
    idx, cnt = select_blocks(q4, kt, layout, config, q_rowmap=rowmap, k_pooled=k_mean, q_pooled=q_mean)
    mats, bias = proj_factors(proj, q, f"SALAD Proj weights{where}") if linear else ((), None)
    bias_gate = gl if bias is not None else None       # the kernels add sigmoid(gl) * bias
    acc = None
    if linear and config.precision == "fp8_proj" and _fp8_proj_usable(q, mats, config):
        # the Proj term first, in FP8, into the output buffer; the sparse kernel adds attention to it
        try:
            acc = K.fp8.linear_fp8(o_lin.transpose(1, 2).reshape(B * L, H * D), mats[0])
            acc = acc.view(B, L, H, D).transpose(1, 2)
            linear, o_lin = False, None          # the Proj term is in acc; free the 16-bit branch output
        except RuntimeError as e:   # a GEMM the support probe did not foresee: the 16-bit GEMM, logged once
            if "out of memory" in str(e).lower():
                raise
            _fallback_ok("fp8_proj", f"the FP8 GEMM failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    if fp8:
        kv8 = K.fp8.quantize_kv_fp8(kt, vt, config.block)
        o = K.fp8.block_sparse_attention_rowmap_fp8(q4, kv8, idx, cnt, rowmap, block=config.block,
                                                    scale=1.0 / math.sqrt(D), bias=bias, gate_logit=bias_gate)
        del kv8
    else:
        o = K.block_sparse_attention_rowmap(q4, kt, vt, idx, cnt, rowmap, block=config.block,
                                            scale=1.0 / math.sqrt(D), bias=bias, gate_logit=bias_gate,
                                            backend=config.backend, compensate=comp, k_mean=k_mean, v_mean=v_mean,
                                            accumulate_into=acc, q_tiled=q_tiled)
    del kt, vt, q_tiled
    out = o.transpose(1, 2).reshape(B, L, H * D)
    if linear:
        add_factors_(out.view(B * L, H * D), o_lin.transpose(1, 2).reshape(B * L, H * D), mats)
    return out.to(q.dtype)


def _needs_autograd(*items) -> bool:
    """Grad mode is on and a tensor or module parameter among ``items`` requires grad."""
    if not torch.is_grad_enabled():
        return False
    for it in items:
        if it is None:
            continue
        if isinstance(it, torch.nn.Module):
            if any(p.requires_grad for p in it.parameters()):
                return True
        elif it.requires_grad:
            return True
    return False


_FP8_WARNED: set = set()


def _fp8_usable(q: Tensor, config: SaladConfig) -> bool:
    """precision="fp8" runs the FP8 kernel when the card, Triton and the settings allow it; otherwise bf16,
    with one warning per reason (logged, never raised: the graph keeps running)."""
    why = None
    if config.compensation != "none":
        why = "centroid compensation has no FP8 kernel"
    elif config.backend == "torch":
        why = "the torch backend has no FP8 kernel"
    elif q.dtype not in (torch.float16, torch.bfloat16):
        why = f"activations are {q.dtype}, not 16-bit"
    else:
        ok, reason = K.fp8.fp8_support(q.device)
        why = None if ok else reason
    return _fallback_ok("fp8", why)


def _fp8_proj_usable(q: Tensor, mats, config: SaladConfig) -> bool:
    """precision="fp8_proj" runs the Proj GEMM in FP8 for a full (d x d) Proj on a card with FP8 tensor cores;
    otherwise the 16-bit GEMM, with one warning per reason."""
    if config.backend == "torch":
        why = "the torch backend runs no Triton kernels (the FP8 GEMM quantises with one)"
    elif len(mats) != 1:
        why = "the Proj is low-rank (its two small GEMMs stay 16-bit)"
    else:
        why = K.fp8.proj_fp8_support(q, mats[0])
    return _fallback_ok("fp8_proj", why)


def _fallback_ok(precision: str, why: Optional[str]) -> bool:
    """True when ``why`` is None; else logs (once per precision and reason) that ``precision`` falls back to
    bf16 and why, and returns False.  Logged, never raised: the graph keeps running."""
    if why is None:
        return True
    if (precision, why) not in _FP8_WARNED:
        _FP8_WARNED.add((precision, why))
        import logging
        what = "attention" if precision == "fp8" else "Proj GEMM"
        logging.getLogger("SALAD").warning("SALAD: precision '%s' falls back to bf16 (%s): %s.", precision, what,
                                           why)
    return False


# ----------------------------------------------------------------------------------------------
# dense reference (tests / distillation targets)
# ----------------------------------------------------------------------------------------------

def dense_reference_attention(q: Tensor, k: Tensor, v: Tensor, heads: int,
                              chunk: int = 4096, scale: Optional[float] = None) -> Tensor:
    """Exact softmax attention, (B, L, heads*D) -> (B, L, heads*D) in q.dtype.

    Query-chunked SDPA: memory is O(chunk x L) per (B, H), never L x L for long sequences.
    """
    B, L, H, D = _check_inputs(q, k, v, heads)
    qh = q.reshape(B, L, H, D).transpose(1, 2)
    kh = k.reshape(B, L, H, D).transpose(1, 2)
    vh = v.reshape(B, L, H, D).transpose(1, 2)
    outs = []
    for s in range(0, L, chunk):
        outs.append(F.scaled_dot_product_attention(qh[:, :, s:s + chunk], kh, vh, scale=scale))
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return o.transpose(1, 2).reshape(B, L, H * D).to(q.dtype)
