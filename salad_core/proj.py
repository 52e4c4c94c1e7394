"""SALAD's Proj: the full ``nn.Linear(dim, dim)`` or a cheaper rank-r factorisation.

SALAD adds ``G * Proj(O_linear)`` to the sparse attention output.  The full Proj is a dim x dim GEMM
per call (at Wan-14B, dim 5120, about a quarter of a SALAD layer's time); a rank-r Proj is two GEMMs,
dim -> r -> dim, so it costs ``2 r / dim`` of the full one (``dim / (2 r)`` times cheaper: r = 256 at
dim 5120 is 10x cheaper).

:class:`LowRankProj` holds ``down = nn.Linear(dim, rank, bias=False)`` and ``up = nn.Linear(rank, dim)``
(the bias lives on ``up``), ``forward(x) = up(down(x))``.

Zero-init rule (fresh weights must leave the model at sparse-only attention, yet train): a fresh
full Proj has weight and bias 0.  A fresh low-rank Proj has ``up`` weight and bias 0 (so it outputs
exactly 0) and ``down`` a random matrix with orthonormal rows drawn from a generator seeded by ``seed``
(a QR of a Gaussian matrix, signs fixed: the same on every machine).  Zeroing both factors would
freeze them (each one's gradient is the other one times the output gradient); with ``down`` random,
``up`` gets the gradient ``g^T down(x)`` at the first step and ``down`` follows once ``up`` moved.
Orthonormal rows keep ``down(x)`` at the scale of ``x``'s projection onto the r-dimensional subspace.

Helpers: :func:`make_proj` (fresh Proj of a rank), :func:`svd_truncate` (training-free compression of a
trained full Proj), :func:`proj_rank`, :func:`proj_matrix` (the dim x dim matrix a Proj applies) and the
inference helpers the attention code calls: :func:`linear_params` (a module's weights on the activations'
device and dtype, also for the gate), :func:`proj_factors` with :func:`add_factors_` (in place, the hot
path) or :func:`apply_factors`; :func:`proj_bias` / :func:`proj_add_` are the same for one-off callers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LowRankProj", "check_proj_rank", "make_proj", "svd_truncate", "proj_rank", "proj_matrix", "proj_bias",
           "proj_add_", "linear_params", "proj_factors", "apply_factors", "add_factors_", "proj_flops_ratio"]


def _orthonormal_rows(rank: int, dim: int, seed: int) -> Tensor:
    """(rank, dim) fp32 matrix with orthonormal rows (rank <= dim), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    a = torch.randn(dim, rank, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)                         # (dim, rank), orthonormal columns
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).t().contiguous().float()


class LowRankProj(nn.Module):
    """Rank-``rank`` Proj: ``up(down(x))`` with ``down`` (rank x dim, no bias) and ``up`` (dim x rank + bias).

    A new module follows the zero-init rule of the module docstring (output exactly 0, trainable):
    ``up`` = 0, ``down`` orthonormal rows from ``seed``."""

    def __init__(self, dim: int, rank: int, seed: int = 0, device=None, dtype=None, init: bool = True):
        super().__init__()
        dim, rank = int(dim), int(rank)
        if dim < 1 or not 1 <= rank <= dim:
            raise ValueError(f"LowRankProj needs dim >= 1 and 1 <= rank <= dim, got dim {dim}, rank {rank}")
        self.down = nn.Linear(dim, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, dim, device=device, dtype=dtype)
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """The zero-init rule: ``up`` weight and bias 0, ``down`` orthonormal rows from ``seed``."""
        self.up.weight.zero_()
        self.up.bias.zero_()
        self.down.weight.copy_(_orthonormal_rows(self.rank, self.dim, seed))

    @property
    def dim(self) -> int:
        return self.down.in_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def bias(self) -> Tensor:
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"


def check_proj_rank(rank, error: type = ValueError, what: str = "proj_rank") -> int:
    """``rank`` as an int >= 0 (0: the full dim x dim Proj); else raises ``error`` naming ``what`` (the configs
    that take a rank use this; weight files go through weights.normalize_proj_rank, which also reads text)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or int(rank) != rank or rank < 0:
        raise error(f"{what} must be an integer >= 0 (0: full dim x dim Proj), got {rank!r}")
    return int(rank)


def make_proj(dim: int, rank: int = 0, seed: int = 0, device=None, dtype=None, init: bool = True) -> nn.Module:
    """A fresh Proj following the zero-init rule: rank 0 or rank >= dim -> ``nn.Linear(dim, dim)`` with weight
    and bias 0; 1 <= rank < dim -> :class:`LowRankProj` (``up`` = 0, ``down`` orthonormal rows from ``seed``).
    ``init=False``: the same module with uninitialised storage, for a caller that overwrites every tensor (a load
    or a copy: no random init, no QR)."""
    dim, rank = int(dim), int(rank)
    if rank < 0:
        raise ValueError(f"proj rank must be >= 0 (0: full dim x dim Proj), got {rank}")
    if not init:
        full = rank == 0 or rank >= dim
        mod = (nn.Linear(dim, dim, device="meta", dtype=dtype) if full
               else LowRankProj(dim, rank, device="meta", dtype=dtype, init=False))
        return mod.to_empty(device=device if device is not None else "cpu")
    if rank == 0 or rank >= dim:
        lin = nn.Linear(dim, dim, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
        return lin
    return LowRankProj(dim, rank, seed=seed, device=device, dtype=dtype)


def proj_rank(module: nn.Module) -> int:
    """0 for a full ``nn.Linear`` Proj, the rank of a :class:`LowRankProj`."""
    if isinstance(module, LowRankProj):
        return module.rank
    if isinstance(module, nn.Linear):
        return 0
    raise TypeError(f"expected a SALAD Proj (nn.Linear or LowRankProj), got {type(module).__name__}")


@torch.no_grad()
def proj_matrix(module: nn.Module) -> Tensor:
    """The (dim, dim) matrix W the Proj applies (``Proj(x) = x W^T + b``), fp32, on the module's device."""
    if isinstance(module, LowRankProj):
        return module.up.weight.float() @ module.down.weight.float()
    if isinstance(module, nn.Linear):
        return module.weight.float().clone()
    raise TypeError(f"expected a SALAD Proj (nn.Linear or LowRankProj), got {type(module).__name__}")


@torch.no_grad()
def svd_truncate(linear: nn.Module, rank: int) -> LowRankProj:
    """Training-free compression: the :class:`LowRankProj` of rank ``rank`` nearest (Frobenius / spectral norm,
    Eckart-Young) to the trained Proj ``linear`` (an ``nn.Linear(dim, dim)``; a LowRankProj of higher rank is
    truncated further), bias kept.  Truncated SVD ``W = U S V^T`` in fp32 on the weight's device, split
    evenly: ``down = sqrt(S_r) V_r^T``, ``up = U_r sqrt(S_r)`` (balanced factors train well if fine-tuned
    further).  The result has the source's device and dtype."""
    rank = int(rank)
    w = proj_matrix(linear)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"svd_truncate needs a square dim x dim Proj, got weight {tuple(w.shape)}")
    dim = w.shape[0]
    if not 1 <= rank <= dim:
        raise ValueError(f"svd_truncate rank must be 1..{dim} for dim {dim}, got {rank}")
    src = linear.up if isinstance(linear, LowRankProj) else linear
    dtype, device = src.weight.dtype, src.weight.device
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    out = LowRankProj(dim, rank, device=device, dtype=torch.float32)
    out.down.weight.copy_(root[:, None] * vh[:rank])
    out.up.weight.copy_(u[:, :rank] * root[None, :])
    bias = getattr(src, "bias", None)
    if bias is not None:
        out.up.bias.copy_(bias.float())
    else:
        out.up.bias.zero_()
    return out.to(dtype=dtype)


def proj_flops_ratio(dim: int, rank: int) -> float:
    """GEMM work of a rank-``rank`` Proj relative to the full dim x dim one (``2 rank / dim``; 1 for full)."""
    dim, rank = int(dim), int(rank)
    return 1.0 if rank <= 0 or rank >= dim else 2.0 * rank / dim


# ----------------------------------------------------------------------------------------------
# inference helpers (the attention code's Proj GEMM)
# ----------------------------------------------------------------------------------------------

def _check_form(proj: nn.Module, dim: Optional[int], what: str) -> None:
    if isinstance(proj, LowRankProj):
        if dim is not None and proj.dim != dim:
            raise ValueError(f"{what}: a dim-{proj.dim} low-rank Proj cannot take activations of width {dim}")
    elif isinstance(proj, nn.Linear):
        if dim is not None and (proj.in_features != dim or proj.out_features != dim):
            raise ValueError(f"{what}: a {proj.in_features} -> {proj.out_features} Proj cannot take activations "
                             f"of width {dim}")
    else:
        raise TypeError(f"{what}: expected an nn.Linear or LowRankProj Proj, got {type(proj).__name__}")


def linear_params(mod: nn.Module, like: Tensor, what: str = "SALAD weights") -> Tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) of an ``nn.Linear``-like module on ``like``'s device and dtype.

    This is how the SALAD weights follow the activations in every memory mode of the host
    application: fully loaded on the GPU it is a no-op (apart from a dtype cast when the weights
    are stored in another dtype); when the weights were left on the CPU by a partial / low-VRAM
    load, the block's weights are copied for this call only, as ComfyUI's own ops do for offloaded
    layers.  Weights that hold no data (``meta`` tensors) raise a ValueError naming ``what``.
    """
    w = mod.weight
    b = getattr(mod, "bias", None)
    if w.is_meta or (b is not None and b.is_meta):
        raise ValueError(f"{what} are on the 'meta' device (they hold no data: the weight file was never "
                         f"loaded into memory); activations are on {like.device}. Load the weights again.")
    if w.device != like.device or w.dtype != like.dtype:
        nb = w.device.type == "cpu" and like.device.type == "cuda" and w.is_pinned()
        w = w.to(device=like.device, dtype=like.dtype, non_blocking=nb)
        if b is not None:
            b = b.to(device=like.device, dtype=like.dtype, non_blocking=nb)
    return w, b


def proj_factors(proj: nn.Module, like: Tensor, what: str = "SALAD Proj weights"
                 ) -> Tuple[Tuple[Tensor, ...], Optional[Tensor]]:
    """The Proj's GEMM factors and output bias on ``like``'s device and dtype, each weight fetched once
    (:func:`linear_params`: a copy only when they sit elsewhere, e.g. offloaded):
    ``((W,), b)`` for an ``nn.Linear``, ``((down, up), b)`` for a :class:`LowRankProj`."""
    _check_form(proj, like.shape[-1] if like.dim() else None, what)
    if isinstance(proj, LowRankProj):
        down = linear_params(proj.down, like, what)[0]
        up, b = linear_params(proj.up, like, what)
        return (down, up), b
    w, b = linear_params(proj, like, what)
    return (w,), b


def apply_factors(x: Tensor, mats: Sequence[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T + bias`` with W given by :func:`proj_factors` (one GEMM, or down then up for low rank)."""
    for m in mats[:-1]:
        x = F.linear(x, m)
    return F.linear(x, mats[-1], bias)


def add_factors_(out2d: Tensor, o_lin2d: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """``out2d += o_lin2d @ W^T`` in place with W given by :func:`proj_factors`: one ``addmm_`` (full), or
    ``h = o_lin2d @ down^T`` (N, rank) then one ``addmm_`` of ``h @ up^T`` (low rank)."""
    if len(mats) == 2:
        return out2d.addmm_(torch.mm(o_lin2d, mats[0].t()), mats[1].t())
    return out2d.addmm_(o_lin2d, mats[0].t())


def proj_bias(proj: nn.Module, like: Optional[Tensor] = None, what: str = "SALAD Proj weights") -> Optional[Tensor]:
    """The Proj's output bias (``nn.Linear.bias`` / ``LowRankProj.up.bias``), or None.  With ``like``: on its
    device and dtype (see :func:`linear_params`; weights may be offloaded)."""
    _check_form(proj, None, what)
    src = proj.up if isinstance(proj, LowRankProj) else proj
    if like is None or src.bias is None:
        return src.bias
    return linear_params(src, like, what)[1]


def proj_add_(out2d: Tensor, o_lin2d: Tensor, proj: nn.Module, what: str = "SALAD Proj weights") -> Tensor:
    """``out2d += o_lin2d @ W^T`` in place, no bias, no gate (the caller folded G into ``o_lin2d`` and added
    G * bias itself); returns ``out2d``.  out2d (N, dim), o_lin2d (N, dim), same dtype and device; the GEMMs
    run in ``o_lin2d``'s dtype on its device (:func:`proj_factors`, :func:`add_factors_`)."""
    if out2d.ndim != 2 or o_lin2d.ndim != 2 or out2d.shape != o_lin2d.shape:
        raise ValueError(f"{what}: out2d and o_lin2d must both be (N, dim), got {tuple(out2d.shape)} and "
                         f"{tuple(o_lin2d.shape)}")
    if out2d.dtype != o_lin2d.dtype or out2d.device != o_lin2d.device:
        raise ValueError(f"{what}: out2d ({out2d.dtype}, {out2d.device}) and o_lin2d ({o_lin2d.dtype}, "
                         f"{o_lin2d.device}) must share dtype and device")
    return add_factors_(out2d, o_lin2d, proj_factors(proj, o_lin2d, what)[0])
