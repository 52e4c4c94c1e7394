"""SALAD attention kernels: block selection, block-sparse attention, linear attention.

Public API (see reference.py for the exact semantics):

* Tensors are (B, H, L, D) views in tile order; any strides for B, H, L (last dim contiguous).
  head_dim D in {64, 128} for the Triton path (torch path: any D).
* Block lists: ``idx`` int32 (B,H,nq,kmax) sorted ascending, duplicate-free in the first ``cnt``
  entries, padded with -1 after ``cnt``; ``cnt`` int32 (B,H,nq).  Both may be expanded views
  (stride 0 over B/H), e.g. from ``select_window``.
* ``block_sparse_attention`` returns ``o`` as a NEW contiguous (B,H,L,D) tensor in q.dtype and
  ``lse`` (B,H,L) fp32 (natural log).
* backend: "auto" -> Triton when the tensors are on CUDA and triton imports, else torch;
  "triton" forces the Triton kernels (on CPU this needs TRITON_INTERPRET=1, for tests);
  "torch" forces the plain-torch path (kernels/reference.py).

Triton is imported lazily: importing this package needs only torch.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import fp8  # noqa: F401  (kernels.fp8: the opt-in FP8 sparse forward; imports without triton)
from . import reference as _ref
from .options import DEFAULT_OPTIONS, TritonOptions, config_overrides  # noqa: F401  (re-exported)
from .reference import (  # noqa: F401  (re-exported)
    DEFAULT_BLOCK,
    PAD_IDX,
    attention_ref,
    block_mask_dense,
    compensated_attention_ref,
    keep_count,
    lut_from_scores,
    masked_attention_ref,
    num_blocks,
    select_window,
)

Tensor = torch.Tensor

__all__ = [
    "DEFAULT_BLOCK", "PAD_IDX", "num_blocks", "keep_count", "pool_blocks", "select_topk",
    "select_window", "block_sparse_attention", "block_sparse_attention_rowmap", "linear_attention",
    "sparse_linear_attention", "kv_pass", "q_pass", "wants_tiled_q", "token_mean", "topk_from_pooled",
    "triton_available", "attention_ref", "masked_attention_ref", "block_mask_dense",
    "compensated_attention_ref", "TritonOptions", "config_overrides",
]

_TRITON_OK: Optional[bool] = None


def _triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401  (must import too)
            _TRITON_OK = True
        except Exception:  # pragma: no cover - depends on environment
            _TRITON_OK = False
    return _TRITON_OK


def triton_available(device) -> bool:
    """True on CUDA with importable triton, or on any device when TRITON_INTERPRET=1."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _triton_importable()
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return _triton_importable()


def _ops():
    from . import _triton_ops  # lazy: imports triton
    return _triton_ops


def _use_triton(t: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available(t.device):
            raise RuntimeError(
                f"backend='triton' requested but Triton is not usable on {t.device} "
                "(needs CUDA + triton, or TRITON_INTERPRET=1)")
        return True
    if backend == "auto":
        return t.is_cuda and _triton_importable()  # = triton_available(t.device) for a CUDA tensor
    raise ValueError(f"unknown backend {backend!r}")


def _triton_shape_ok(D: int, block: int = DEFAULT_BLOCK) -> bool:
    return D in (16, 32, 64, 128) and block >= 16 and (block & (block - 1)) == 0


def _pick(t: Tensor, backend: str, block: int = DEFAULT_BLOCK) -> bool:
    """backend='auto' falls back to torch for shapes the Triton kernels do not cover."""
    use = _use_triton(t, backend)
    if use and backend == "auto" and not _triton_shape_ok(t.shape[-1], block):
        return False
    return use


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (B, H, L, D)")
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"shape mismatch q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")


# ----------------------------------------------------------------------------------------------

def pool_blocks(x: Tensor, block: int = DEFAULT_BLOCK, backend: str = "auto",
                rowmap: Optional[Tensor] = None, triton_options: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """(B,H,L,D) -> (B,H,nb,D) fp32 mean over the valid tokens of each block.
    rowmap (L,) int: pool x's rows in that order (block j = rows rowmap[j*block:(j+1)*block]).
    triton_options: explicit Triton settings (tests, benchmarks; see options.TritonOptions)."""
    if _pick(x, backend, block):
        return _ops().pool_blocks(x, block, rowmap, triton_options)
    if rowmap is not None:
        x = x.index_select(2, rowmap.to(device=x.device, dtype=torch.long))
    return _ref.pool_blocks_ref(x, block)


def topk_from_pooled(pq: Tensor, pk: Tensor, sparsity: float, always_kept: Optional[Tensor] = None,
                     backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """select_topk from block means already pooled (pq (B,H,nq,D), pk (B,H,nk,D) fp32, e.g. from q_pass /
    kv_pass): the same (idx, cnt)."""
    with torch.no_grad():
        scores = torch.matmul(pq, pk.transpose(-1, -2))
        k = keep_count(pk.shape[2], sparsity)
        if _use_triton(pq, backend):
            return _ops().topk_lut(scores, k, always_kept)
        return lut_from_scores(scores, k, always_kept)


def select_topk(q: Tensor, k: Tensor, sparsity: float, block: int = DEFAULT_BLOCK,
                always_kept: Optional[Tensor] = None, backend: str = "auto",
                q_rowmap: Optional[Tensor] = None, k_pooled: Optional[Tensor] = None,
                triton_options: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor]:
    """Top-k key blocks per query block by pooled q.k score (keep_count(nk, sparsity) of them);
    own block and `always_kept` forced.  Returns idx int32 (B,H,nq,kmax) sorted ascending, -1
    padded after cnt; cnt int32 (B,H,nq).  kmax = min(nk, max(k, 1 + len(always_kept))).
    No host sync, no L x L tensor.  q_rowmap: q is in another row order; its tile-order blocks are
    rows q_rowmap[j*block:(j+1)*block] (see block_sparse_attention_rowmap).  k_pooled: pool_blocks(k)
    when the caller already has it (e.g. for centroid compensation), so k is pooled once."""
    with torch.no_grad():
        triton_path = _pick(q, backend, block)
        if triton_path:
            ops = _ops()
            pq = ops.pool_blocks(q, block, q_rowmap, triton_options)
            pk = ops.pool_blocks(k, block, opts=triton_options) if k_pooled is None else k_pooled
        else:
            if q_rowmap is not None:
                q = q.index_select(2, q_rowmap.to(device=q.device, dtype=torch.long))
            pq = _ref.pool_blocks_ref(q, block)
            pk = _ref.pool_blocks_ref(k, block) if k_pooled is None else k_pooled.float()
        # the path chosen once: pooling and top-k run on the same backend
        return topk_from_pooled(pq, pk, sparsity, always_kept, "triton" if triton_path else "torch")


def _as_layout(o: Tensor, out_layout: str) -> Tensor:
    """Reference-path outputs in the requested memory layout (see block_sparse_attention)."""
    if out_layout == "blhd":
        return o.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if out_layout != "bhld":
        raise ValueError(f"out_layout must be 'bhld' or 'blhd', got {out_layout!r}")
    return o


def _grad_needed(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor,
                           block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                           backend: str = "auto", out_layout: str = "bhld", compensate: bool = False,
                           k_mean: Optional[Tensor] = None, v_mean: Optional[Tensor] = None,
                           triton_options: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor]:
    """Softmax attention of each query block over its listed key blocks only.
    Returns (o (B,H,L,D) q.dtype, lse (B,H,L) fp32).  Differentiable in q, k, v.
    out_layout "bhld": o is contiguous; "blhd": o is a (B,H,L,D) view of a contiguous (B,L,H,D)
    buffer, so ``o.transpose(1, 2).reshape(B, L, H*D)`` costs no copy.
    compensate: every key block a query block skips adds one pseudo-token (block-mean key and value,
    logit scale*q.kbar + log(n_tokens)) to the same softmax (reference.block_sparse_attention_ref);
    k_mean / v_mean (B,H,nk,D): precomputed block means (default: pooled here).  Triton with
    gradients: forward and backward kernels when the means are pooled here (the centroids'
    gradients reach every key and value through the means); with given means that need gradients
    the torch reference runs instead (autograd into the means).
    triton_options: explicit Triton settings (tests, benchmarks; see options.TritonOptions)."""
    _check_qkv(q, k, v)
    if _pick(q, backend, block):
        given = k_mean is not None or v_mean is not None
        if not compensate or not given:
            return _ops().block_sparse_attention(q, k, v, idx, cnt, block, scale, out_layout, compensate,
                                                 triton_options)
        if not _grad_needed(q, k, v, k_mean, v_mean):
            return _ops().block_sparse_attention_fwd(q, k, v, idx, cnt, block, scale, out_layout,
                                                     comp=(k_mean, v_mean), opts=triton_options)
    o, lse = _ref.block_sparse_attention_ref(q, k, v, idx, cnt, block, scale, compensate=compensate,
                                             k_mean=k_mean, v_mean=v_mean)
    return _as_layout(o, out_layout), lse


@torch.no_grad()
def block_sparse_attention_rowmap(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, rowmap: Tensor,
                                  block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                                  bias: Optional[Tensor] = None, backend: str = "auto", compensate: bool = False,
                                  k_mean: Optional[Tensor] = None, v_mean: Optional[Tensor] = None,
                                  gate_logit: Optional[Tensor] = None,
                                  triton_options: TritonOptions = DEFAULT_OPTIONS,
                                  accumulate_into: Optional[Tensor] = None, q_tiled: Optional[Tensor] = None
                                  ) -> Tensor:
    """Inference form of block_sparse_attention (no autograd) for callers whose tokens are not in
    tile order: k and v are in tile order, q is in the caller's order, and tile position r is
    caller row rowmap[r] (L,) for both the q read and the output write.  bias ((H*D,) or (B, H*D)),
    if given, is added to every output row, times sigmoid(gate_logit[b]) when gate_logit (B,) is given.
    Returns o (B,H,L,D) in the caller's order, as a view of a
    contiguous (B,L,H,D) buffer, so the tile gather of q and the scatter back cost no extra pass.
    compensate / k_mean / v_mean: centroid compensation as in block_sparse_attention (means of the
    tile-ordered k, v blocks).  accumulate_into: a (B,H,L,D) tensor of q's dtype (unit last stride, e.g. a view
    of a (B,L,H*D) buffer) holding another term of the output; the attention is added to it in place and it
    is returned (the Triton kernel reads it in its epilogue: no separate add).  q_tiled: q already in tile order
    (q_pass's tile_q output, (B,H,L,D)): the Triton kernel then reads q with TMA instead of gathering it
    through the row map (see wants_tiled_q); same result."""
    _check_qkv(q, k, v)
    B, H, L, D = q.shape
    if q_tiled is not None and (tuple(q_tiled.shape) != (B, H, L, D) or q_tiled.dtype != q.dtype
                                or q_tiled.device != q.device):
        raise ValueError(f"q_tiled must be a (B,H,L,D) = {(B, H, L, D)} {q.dtype} tensor on {q.device} (q in tile "
                         f"order), got {tuple(q_tiled.shape)} {q_tiled.dtype} on {q_tiled.device}")
    if accumulate_into is not None and (tuple(accumulate_into.shape) != (B, H, L, D) or accumulate_into.dtype !=
                                        q.dtype or accumulate_into.device != q.device):
        raise ValueError(f"accumulate_into must be a (B,H,L,D) = {(B, H, L, D)} {q.dtype} tensor on {q.device}, "
                         f"got {tuple(accumulate_into.shape)} {accumulate_into.dtype} on {accumulate_into.device}")
    if _pick(q, backend, block):
        return _ops().block_sparse_attention_rowmap(q, k, v, idx, cnt, block, scale, rowmap, bias, gate_logit,
                                                    comp=(k_mean, v_mean) if compensate else None,
                                                    opts=triton_options, accumulate_into=accumulate_into,
                                                    q_tiled=q_tiled)
    rm = rowmap.to(device=q.device, dtype=torch.long)
    q_t = q_tiled if q_tiled is not None else q.index_select(2, rm)
    o_t, _ = _ref.block_sparse_attention_ref(q_t, k, v, idx, cnt, block, scale,
                                             compensate=compensate, k_mean=k_mean, v_mean=v_mean)
    o = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    o[:, rm] = o_t.transpose(1, 2)
    if bias is not None:
        b = bias.to(device=q.device, dtype=torch.float32).reshape(-1, 1, H, D)
        if gate_logit is not None:
            b = b * torch.sigmoid(gate_logit.to(device=q.device, dtype=torch.float32)).reshape(B, 1, 1, 1)
        o = (o.float() + b).to(o.dtype)
    o = o.permute(0, 2, 1, 3)
    if accumulate_into is not None:
        return accumulate_into.add_(o)
    return o


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-5, backend: str = "auto",
                     out_layout: str = "bhld", triton_options: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """Non-causal ReLU linear attention; output (B,H,L,D) in q.dtype (layout as in
    block_sparse_attention). Differentiable."""
    _check_qkv(q, k, v)
    if _pick(q, backend):
        return _ops().linear_attention(q, k, v, eps, out_layout, triton_options)
    return _as_layout(_ref.linear_attention_ref(q, k, v, eps), out_layout)


def sparse_linear_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor,
                            block: int = DEFAULT_BLOCK, scale: Optional[float] = None, eps: float = 1e-5,
                            backend: str = "auto", out_layout: str = "bhld",
                            triton_options: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor]:
    """Returns (o_sparse, o_linear), both (B,H,L,D) in q.dtype (layout as in
    block_sparse_attention): block_sparse_attention and linear_attention on the same q, k, v (what
    SALAD's two branches run). Differentiable."""
    o_s, _ = block_sparse_attention(q, k, v, idx, cnt, block, scale, backend, out_layout,
                                    triton_options=triton_options)
    return o_s, linear_attention(q, k, v, eps, backend, out_layout, triton_options)


def token_mean(x: Tensor, backend: str = "auto", triton_options: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """(B, L, C) -> (B, C) fp32 mean over the L tokens, accumulated in fp32 (the gate's input: the mean of a
    block's input).  Any strides for B and L; a last dim without unit stride is copied first.  No autograd.

    backend "triton" runs one split-L Triton kernel; "auto" keeps ``torch.mean``: on an H200 the kernel took
    0.054 ms against torch.mean's 0.056 ms at Wan-1.3B 480p (0.046 ms at its best config), about 0.01 ms of a
    1.98 ms layer (benchmarks/results/wave8/)."""
    if x.dim() != 3:
        raise ValueError(f"token_mean: x must be (B, L, C), got shape {tuple(x.shape)}")
    with torch.no_grad():
        if backend == "triton" and _use_triton(x, backend) and x.shape[1] > 0 and x.is_floating_point():
            return _ops().token_mean(x if x.stride(-1) == 1 else x.contiguous(), triton_options)
        return _ref.token_mean_ref(x)


def kv_pass(k: Tensor, v: Tensor, rowmap: Tensor, block: int = DEFAULT_BLOCK, pool_k: bool = True,
            pool_v: bool = False, linear_state: bool = True, backend: str = "auto",
            triton_options: TritonOptions = DEFAULT_OPTIONS):
    """Inference: everything SALAD needs from K and V in one read (one kernel on the Triton path).

    k, v: (B,H,L,D) in the caller's row order (any strides, unit last stride); rowmap (L,) int: tile
    position r is row rowmap[r].  Returns ``(kt, vt, k_mean, v_mean, state)``: kt / vt the tile-ordered
    copies as (B,H,L,D) views of contiguous (B,L,H,D) buffers (what block_sparse_attention_rowmap reads);
    k_mean / v_mean fp32 block means of kt / vt (B,H,nb,D) when pool_k / pool_v, else None; state the
    linear branch's state (B*H, D*D + D) fp32 (S = sum relu(k) v^T row-major, then z = sum relu(k), both
    divided by L) when linear_state, else None.  No autograd."""
    _check_qkv(k, k, v)
    with torch.no_grad():
        if _pick(k, backend, block):
            return _ops().kv_pass(k, v, rowmap, block, pool_k, pool_v, linear_state, triton_options)
        return _ref.kv_pass_ref(k, v, rowmap, block, pool_k, pool_v, linear_state)


def q_pass(q: Tensor, rowmap: Tensor, block: int = DEFAULT_BLOCK, state: Optional[Tensor] = None,
           eps: float = 1e-5, gate_logit: Optional[Tensor] = None, pool: bool = True, backend: str = "auto",
           triton_options: TritonOptions = DEFAULT_OPTIONS, tile_q: bool = False) -> Tuple[Optional[Tensor], ...]:
    """Inference: everything SALAD needs from Q in one read (one kernel on the Triton path).

    q: (B,H,L,D) in the caller's row order; rowmap as in kv_pass.  Returns ``(q_mean, o_linear)``: q_mean
    fp32 block means of the tile-ordered q (B,H,nb,D) when pool, else None; o_linear (when ``state`` from
    kv_pass is given) the linear branch relu(q) S / (relu(q).z + eps), times sigmoid(gate_logit[b]) when
    gate_logit (B,) is given, in q's dtype and row order as a (B,H,L,D) view of a contiguous (B,L,H,D)
    buffer; else None.  tile_q: a third output, q in tile order (the same kind of view), for
    block_sparse_attention_rowmap's q_tiled.  No autograd."""
    with torch.no_grad():
        if _pick(q, backend, block):
            return _ops().q_pass(q, rowmap, block, state, eps, gate_logit, pool, triton_options, tile_q)
        return _ref.q_pass_ref(q, rowmap, block, state, eps, gate_logit, pool, tile_q)


def wants_tiled_q(q: Tensor, block: int = DEFAULT_BLOCK, backend: str = "auto",
                  triton_options: TritonOptions = DEFAULT_OPTIONS) -> bool:
    """Whether block_sparse_attention_rowmap would read a tile-ordered copy of q (q_tiled) on this call's path:
    only the Triton path, and only where its forward config asks for one (config key Q_TILED: q read by TMA
    instead of gathered through the row map).  The caller then asks q_pass for the copy (tile_q)."""
    return _pick(q, backend, block) and _ops().wants_tiled_q(q, triton_options)
