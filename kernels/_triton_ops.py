"""Host wrappers + autograd Functions for the Triton kernels (imports triton on first use)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _triton_kernels as tk
from .reference import num_blocks

Tensor = torch.Tensor

# Tunables (the benchmark may overwrite them after a sweep).  Keyed by head dim.
# D=128 values: best of the sweep on the H100 (benchmarks/results, Wan-1.3B/480p at 90% sparsity).
FWD_CFG = {64: dict(BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
           128: dict(BLOCK_N=64, num_warps=4, num_stages=2, tma=True)}
BWD_DQ_CFG = {64: dict(BLOCK_N=64, num_warps=4, num_stages=3),
              128: dict(BLOCK_N=64, num_warps=8, num_stages=4, tma=True)}
BWD_DKDV_CFG = {64: dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=3),
                128: dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, tma=True)}
# Linear branch: K-side state pass (BLOCK_N rows per step) and Q-side apply pass (APPLY_BM rows),
# each program looping over a chunk of rows so the D x D state is loaded once per program;
# the number of programs is about *_target_programs.
LIN_CFG = dict(BLOCK_N=128, num_warps=8, target_programs=528,
               APPLY_BM=64, apply_warps=4, apply_target_programs=1056)
# Master switches for host TMA tensor-descriptor loads (used where the config says "tma": True and
# the tensors meet TMA's 16-byte alignment rules; otherwise the pointer kernels run).
FWD_USE_TMA = True
BWD_USE_TMA = True
# Long sequences (L >= LONG_L) may use their own forward config (measured on the 14B/720p shape).
LONG_L = 65536
FWD_CFG_LONG: dict = {}
# Fuse the linear branch's Q side into the sparse epilogue.  Measured slower on the H100 (the
# epilogue's two 128x128x128 dots + S loads cost more than a separate pass), so off by default.
FUSE_LINEAR_EPILOGUE = False
# Tests set POISON = True: every output buffer the kernels write is pre-filled with NaN so that
# unwritten elements are caught.
POISON = False


def _empty(*shape, device, dtype):
    t = torch.empty(*shape, device=device, dtype=dtype)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _out(B: int, H: int, L: int, D: int, device, dtype, layout: str) -> Tensor:
    """A (B,H,L,D) output: contiguous for layout "bhld", a permuted view of a contiguous (B,L,H,D)
    buffer for "blhd" (what a caller working in (B,L,H*D) wants: no transpose copy afterwards)."""
    if layout == "blhd":
        return _empty(B, L, H, D, device=device, dtype=dtype).permute(0, 2, 1, 3)
    if layout != "bhld":
        raise ValueError(f"out_layout must be 'bhld' or 'blhd', got {layout!r}")
    return _empty(B, H, L, D, device=device, dtype=dtype)


def _lastdim_contig(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_d(D: int) -> None:
    if D not in (16, 32, 64, 128):
        raise ValueError(f"Triton path supports head_dim in (16, 32, 64, 128), got {D}")


def _grid_ok(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")


def _lut_views(idx: Tensor, cnt: Tensor, B: int, H: int, nq: int):
    idx = idx.expand(B, H, nq, idx.shape[-1])
    cnt = cnt.expand(B, H, nq)
    if idx.dtype != torch.int32:
        idx = idx.to(torch.int32)
    if cnt.dtype != torch.int32:
        cnt = cnt.to(torch.int32)
    return idx, cnt


# ----------------------------------------------------------------------------------------------

def pool_blocks(x: Tensor, block: int, rowmap: Optional[Tensor] = None) -> Tensor:
    """rowmap (L,) int32: pool the rows of x in the order rowmap gives (tile position -> row)."""
    _grid_ok(block)
    x = _lastdim_contig(x)
    B, H, L, D = x.shape
    _check_d(D)
    nb = num_blocks(L, block)
    out = _empty(B, H, nb, D, device=x.device, dtype=torch.float32)
    rm = _rowmap(rowmap, L, x.device)
    tk._pool_kernel[(nb, B * H)](x, out, rm if rm is not None else out, x.stride(0), x.stride(1), x.stride(2),
                                 H, L, nb, BLOCK=block, D=D, GATHER=rm is not None, num_warps=4)
    return out


def _rowmap(rowmap: Optional[Tensor], L: int, device) -> Optional[Tensor]:
    if rowmap is None:
        return None
    if rowmap.shape != (L,):
        raise ValueError(f"rowmap must have shape ({L},), got {tuple(rowmap.shape)}")
    return rowmap.to(device=device, dtype=torch.int32).contiguous()


def topk_lut(scores: Tensor, k: int, always_kept: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused top-k + sort + LUT (Triton).  Same semantics as reference.lut_from_scores; ties go to
    the lower index.  Falls back to the torch path for nk > 4096."""
    B, H, nq, nk = scores.shape
    if nk > 4096:
        from .reference import lut_from_scores
        return lut_from_scores(scores, k, always_kept)
    n_ak = 0 if always_kept is None else int(always_kept.numel())
    kmax = min(nk, max(k, 1 + n_ak))
    sc = scores.float().contiguous()
    ak = (always_kept.to(device=sc.device, dtype=torch.int32).reshape(-1).contiguous() if n_ak
          else torch.zeros(1, device=sc.device, dtype=torch.int32))
    idx = _empty(B, H, nq, kmax, device=sc.device, dtype=torch.int32)
    cnt = _empty(B, H, nq, device=sc.device, dtype=torch.int32)
    nkp = max(16, triton_next_pow2(nk))
    tk._topk_lut_kernel[(nq, B * H)](sc, ak, idx, cnt, nq, nk, k, kmax, n_ak,
                                     NKP=nkp, KMAXP=max(16, triton_next_pow2(kmax)), SHIFT=12,
                                     num_warps=4 if nkp <= 1024 else 8)
    return idx, cnt


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _splits(n_rows: int, tile: int, bh: int, target: Optional[int] = None) -> Tuple[int, int]:
    ntile = max(1, triton_cdiv(n_rows, tile))
    target = LIN_CFG["target_programs"] if target is None else target
    nsplit = max(1, min(ntile, target // max(1, bh)))
    chunk = triton_cdiv(ntile, nsplit) * tile
    return triton_cdiv(n_rows, chunk), chunk


def linear_state(k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """Scaled linear state S' = S / LK (B*H, D, D) fp32 and z' = z / LK (B*H, D) fp32, via split-L
    partial sums + torch reduce.  The 1/LK scale keeps entries O(1) (fp16-safe hi/lo split) and
    cancels in phi(q)S / (phi(q).z + eps) when eps is scaled the same way (eps' = eps / LK)."""
    B, H, LK, D = k.shape
    bn = LIN_CFG["BLOCK_N"] if k.element_size() < 4 else 64   # fp32 tiles: half the rows (shared memory)
    nsplit, chunk = _splits(LK, bn, B * H)
    sp = _empty(B * H, nsplit, D, D, device=k.device, dtype=torch.float32)
    zp = _empty(B * H, nsplit, D, device=k.device, dtype=torch.float32)
    tk._linear_state_kernel[(nsplit, B * H)](k, v, sp, zp, k.stride(0), k.stride(1), k.stride(2),
                                             v.stride(0), v.stride(1), v.stride(2), H, LK, chunk, nsplit,
                                             1.0 / max(1, LK), BLOCK_N=bn, D=D, num_warps=LIN_CFG["num_warps"])
    if nsplit == 1:
        return sp[:, 0], zp[:, 0]
    return sp.sum(1), zp.sum(1)


def _lin_operands(S: Tensor, dtype) -> Tuple[Tensor, Tensor, bool]:
    """S (fp32) -> (hi, lo, LP): for 16-bit q, S = hi + lo with both in q's dtype (two tensor-core
    dots at ~fp32 accuracy); for fp32 q, S itself (fp32 dots)."""
    if dtype in (torch.bfloat16, torch.float16):
        hi = S.to(dtype)
        lo = (S - hi.float()).to(dtype)
        return hi.contiguous(), lo.contiguous(), True
    S = S.contiguous()
    return S, S, False


def _linear_apply(q: Tensor, SH: Tensor, SLO: Tensor, LP: bool, z: Tensor, eps: float,
                  layout: str = "bhld") -> Tensor:
    B, H, L, D = q.shape
    out = _out(B, H, L, D, q.device, q.dtype, layout)
    block_m = LIN_CFG["APPLY_BM"] if q.element_size() < 4 else 32
    nsplit, chunk = _splits(L, block_m, B * H, LIN_CFG["apply_target_programs"])
    tk._linear_apply_kernel[(nsplit, B * H)](q, SH, SLO, z, out, q.stride(0), q.stride(1), q.stride(2),
                                             out.stride(0), out.stride(1), out.stride(2), H, L, chunk, eps, BLOCK_M=block_m, D=D, LP=LP,
                                             num_warps=LIN_CFG["apply_warps"])
    return out


def _linear_bwd(q, k, v, z, SH, SLO, LP, do, eps, acc=None):
    """Gradients through the scaled formulation (S' = S/LK, z' = z/LK, eps' = eps/LK).
    acc: optional (dq, dk, dv) contiguous buffers the linear-branch gradients are added into."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    do = _lastdim_contig(do)
    bm = 64
    nsplit, chunk = _splits(L, bm, B * H)
    dq = _empty(B, H, L, D, device=q.device, dtype=q.dtype) if acc is None else acc[0]
    dsp = _empty(B * H, nsplit, D, D, device=q.device, dtype=torch.float32)
    dzp = _empty(B * H, nsplit, D, device=q.device, dtype=torch.float32)
    tk._linear_bwd_q_kernel[(nsplit, B * H)](q, SH, SLO, z, do, dq, dsp, dzp,
                                             q.stride(0), q.stride(1), q.stride(2),
                                             do.stride(0), do.stride(1), do.stride(2),
                                             H, L, chunk, nsplit, eps, BLOCK_M=bm, D=D, LP=LP,
                                             ACCUM=acc is not None, num_warps=8)
    inv = 1.0 / max(1, LK)
    dS = dsp.sum(1) * inv  # dL/dS' -> dL/d(sum_j phi(k_j) v_j^T)
    dz = dzp.sum(1) * inv
    if acc is None:
        dk = _empty(B, H, LK, D, device=k.device, dtype=k.dtype)
        dv = _empty(B, H, LK, D, device=v.device, dtype=v.dtype)
    else:
        dk, dv = acc[1], acc[2]
    nsk, chk = _splits(LK, bm, B * H)
    tk._linear_bwd_kv_kernel[(nsk, B * H)](k, v, dS, dz, dk, dv,
                                           k.stride(0), k.stride(1), k.stride(2),
                                           v.stride(0), v.stride(1), v.stride(2),
                                           H, LK, chk, BLOCK_N=bm, D=D, ACCUM=acc is not None, num_warps=8)
    return dq, dk, dv


def _comp_means(comp, k: Tensor, v: Tensor, block: int) -> Tuple[Tensor, Tensor]:
    """Block means of k and v for centroid compensation: (B*H, nk, D) fp32 contiguous each.
    comp: True (pool here), or (k_mean, v_mean) (B,H,nk,D) with None for a mean to pool here."""
    km, vm = (None, None) if comp is True else comp
    B, H, LK, D = k.shape
    nk = num_blocks(LK, block)
    km = pool_blocks(k, block) if km is None else km
    vm = pool_blocks(v, block) if vm is None else vm
    out = []
    for m in (km, vm):
        if tuple(m.shape) != (B, H, nk, D):
            raise ValueError(f"block means must be (B,H,nk,D) = {(B, H, nk, D)}, got {tuple(m.shape)}")
        out.append(m.to(device=k.device, dtype=torch.float32).reshape(B * H, nk, D).contiguous())
    return out[0], out[1]


def _sparse_fwd(q, k, v, idx, cnt, block, scale, lin=None, eps=1e-5, layout="bhld", rowmap=None, bias=None,
                comp=None):
    """lin: None or (SH, SLO, LP, z) -> also writes the linear branch output in the epilogue.
    rowmap (L,): q is in the caller's row order; tile position r reads q row rowmap[r] and its
    output is stored at row rowmap[r] (k, v are in tile order).  bias (B, H*D) fp32 is added to o.
    comp: None, True or (k_mean, v_mean): centroid compensation of the key blocks each query block
    skips (see reference.block_sparse_attention_ref); forward only (no backward kernel)."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    nq = num_blocks(L, block)
    nk = num_blocks(LK, block)
    idx, cnt = _lut_views(idx, cnt, B, H, nq)
    if comp is not None and comp is not False:
        km, vm = _comp_means(comp, k, v, block)
        cflags = dict(COMPENSATE=True, BLOCK_C=max(16, min(64, triton_next_pow2(nk))),
                      KMAXP=max(16, triton_next_pow2(idx.shape[-1])))
    else:
        km = vm = None
        cflags = dict(COMPENSATE=False)
    cfg = FWD_CFG_LONG.get(D) if L >= LONG_L and D in FWD_CFG_LONG else FWD_CFG.get(D, FWD_CFG[128])
    bn = min(cfg["BLOCK_N"], block)
    o = _out(B, H, L, D, q.device, q.dtype, layout)
    lse = _empty(B, H, L, device=q.device, dtype=torch.float32)
    fuse = lin is not None
    ol = _out(B, H, L, D, q.device, q.dtype, layout) if fuse else o
    out_strides = (o.stride(0), o.stride(1), o.stride(2))
    rm = _rowmap(rowmap, L, q.device)
    if bias is not None:
        bias = bias.to(device=q.device, dtype=torch.float32).reshape(B, H * D).contiguous()
    extra = (rm if rm is not None else lse, bias if bias is not None else lse,
             bias.stride(0) if bias is not None else 0)
    flags = dict(GATHER_Q=rm is not None, SCATTER_O=rm is not None, HAS_BIAS=bias is not None)
    SH, SLO, LP, zx = lin if fuse else (lse, lse, False, lse)
    use_tma = FWD_USE_TMA and cfg.get("tma", False) and _tma_ok(q, k, v)
    common = dict(BLOCK_M=block, BLOCK_N=bn, SPLIT=block // bn, D=D, FUSE_LINEAR=fuse, LP=LP,
                  NUM_STAGES=_stages(cfg, q), num_warps=cfg["num_warps"], num_stages=_stages(cfg, q))
    lut_strides = (idx.stride(0), idx.stride(1), idx.stride(2), idx.stride(3),
                   cnt.stride(0), cnt.stride(1), cnt.stride(2))
    qd, kd, vd = _descs(use_tma, (q, block), (k, bn), (v, bn))
    tk._sparse_fwd_kernel[(nq, B * H)](
        q, k, v, o, lse, idx, cnt, qd, kd, vd, SH, SLO, zx, ol, *extra,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *out_strides, *lut_strides,
        H, L, LK, scale * tk.LOG2E, eps, km if km is not None else lse, vm if vm is not None else lse, nk,
        USE_TMA=use_tma, **common, **flags, **cflags)
    return o, lse, (ol if fuse else None)


def _descs(use_tma: bool, *specs):
    """Host TMA descriptors over (B,H,L,D) tensors with blocks [1, 1, rows, D] for each
    (tensor, rows) in specs; without TMA the tensors themselves stand in (the kernels' USE_TMA
    switch then never touches them)."""
    if not use_tma:
        return tuple(t for t, _ in specs)
    from triton.tools.tensor_descriptor import TensorDescriptor
    return tuple(TensorDescriptor.from_tensor(t, [1, 1, rows, t.shape[-1]]) for t, rows in specs)


def _stages(cfg: dict, q: Tensor) -> int:
    """Pipeline depth: the tuned value for 16-bit inputs; 1 for fp32, whose tiles are twice as large
    (at D=128 the tuned depths need more than the H100's 227 KB of shared memory)."""
    return cfg["num_stages"] if q.element_size() < 4 else 1


def _tma_ok(*ts) -> bool:
    """TMA descriptors need 16-byte aligned base and strides (unit last stride)."""
    for t in ts:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


def transpose_lut(idx: Tensor, cnt: Tensor, B: int, H: int, nq: int, nk: int) -> Tuple[Tensor, Tensor]:
    """(B,H,nq,kmax) q->k lists -> contiguous (B*H, nk, nq) k->q lists (ascending) + counts (B*H, nk).
    GPU-only ops (scatter + cumsum), no host sync; memory B*H*nk*nq."""
    kmax = idx.shape[-1]
    slot = torch.arange(kmax, device=idx.device, dtype=torch.int32)
    ok = (slot < cnt[..., None]) & (idx >= 0)
    tgt = torch.where(ok, idx, torch.full_like(idx, nk)).long().reshape(B * H, nq, kmax)
    bm = torch.zeros(B * H, nq, nk + 1, dtype=torch.int32, device=idx.device)
    bm.scatter_(2, tgt, 1)
    bmT = bm[:, :, :nk].transpose(1, 2)  # (BH, nk, nq)
    pos = torch.cumsum(bmT, dim=2, dtype=torch.int32) - 1
    kcnt = (pos[:, :, -1] + 1).contiguous()
    pos = torch.where(bmT > 0, pos, torch.full_like(pos, nq)).long()
    kidx = torch.full((B * H, nk, nq + 1), -1, dtype=torch.int32, device=idx.device)
    src = torch.arange(nq, device=idx.device, dtype=torch.int32).expand(B * H, nk, nq)
    kidx.scatter_(2, pos, src)
    return kidx[:, :, :nq].contiguous(), kcnt


def _sparse_bwd(q, k, v, o, lse, do, idx, cnt, block, scale):
    B, H, L, D = q.shape
    LK = k.shape[2]
    nq = num_blocks(L, block)
    nk = num_blocks(LK, block)
    idx, cnt = _lut_views(idx, cnt, B, H, nq)
    do = _lastdim_contig(do)
    delta = _empty(B, H, L, device=q.device, dtype=torch.float32)
    tk._bwd_preprocess_kernel[(triton_cdiv(L, 64), B * H)](o, do, delta, o.stride(0), o.stride(1), o.stride(2),
                                                           do.stride(0), do.stride(1), do.stride(2),
                                                           H, L, BLOCK_M=64, D=D, num_warps=4)
    dq = _empty(B, H, L, D, device=q.device, dtype=q.dtype)
    cfg = BWD_DQ_CFG.get(D, BWD_DQ_CFG[128])
    bn = min(cfg["BLOCK_N"], block)
    tma = BWD_USE_TMA and cfg.get("tma", False) and _tma_ok(q, k, v, do)
    kd, vd = _descs(tma, (k, bn), (v, bn))
    tk._sparse_bwd_dq_kernel[(nq, B * H)](
        q, k, v, do, dq, lse, delta, idx, cnt, kd, vd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2), idx.stride(3), cnt.stride(0), cnt.stride(1), cnt.stride(2),
        H, L, LK, scale * tk.LOG2E, scale,
        BLOCK_M=block, BLOCK_N=bn, SPLIT=block // bn, D=D, NUM_STAGES=_stages(cfg, q), USE_TMA=tma,
        num_warps=cfg["num_warps"], num_stages=_stages(cfg, q))
    kidx, kcnt = transpose_lut(idx, cnt, B, H, nq, nk)
    cfg = BWD_DKDV_CFG.get(D, BWD_DKDV_CFG[128])
    bn = min(cfg["BLOCK_N"], block)
    bm = min(cfg["BLOCK_M"], block)
    dk = _empty(B, H, LK, D, device=k.device, dtype=k.dtype)
    dv = _empty(B, H, LK, D, device=v.device, dtype=v.dtype)
    tma = BWD_USE_TMA and cfg.get("tma", False) and _tma_ok(q, k, v, do)
    qd, dod = _descs(tma, (q, bm), (do, bm))
    tk._sparse_bwd_dkdv_kernel[(nk * (block // bn), B * H)](
        q, k, v, do, dk, dv, lse, delta, kidx, kcnt, qd, dod,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, L, LK, nq, nk, scale * tk.LOG2E, scale,
        BLOCK=block, BLOCK_N=bn, BLOCK_M=bm, D=D, NUM_STAGES=_stages(cfg, q), USE_TMA=tma,
        num_warps=cfg["num_warps"], num_stages=_stages(cfg, q))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------

def _prep(q, k, v, block, scale):
    _grid_ok(block)
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    _check_d(q.shape[-1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return q, k, v, float(scale)


class _SparseAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, block, scale, layout):
        o, lse, _ = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout)
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt)
        ctx.block, ctx.scale = block, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, idx, cnt = ctx.saved_tensors
        dq, dk, dv = _sparse_bwd(q, k, v, o, lse, do, idx, cnt, ctx.block, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


class _LinearAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eps, layout):
        S, z = linear_state(k, v)
        SH, SLO, LP = _lin_operands(S, q.dtype)
        eps_s = eps / max(1, k.shape[2])
        o = _linear_apply(q, SH, SLO, LP, z, eps_s, layout)
        ctx.save_for_backward(q, k, v, z, SH, SLO)
        ctx.eps, ctx.LP = eps_s, LP
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, z, SH, SLO = ctx.saved_tensors
        dq, dk, dv = _linear_bwd(q, k, v, z, SH, SLO, ctx.LP, do, ctx.eps)
        return dq, dk, dv, None, None


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, block, scale, eps, layout):
        S, z = linear_state(k, v)
        SH, SLO, LP = _lin_operands(S, q.dtype)
        eps_s = eps / max(1, k.shape[2])
        if FUSE_LINEAR_EPILOGUE:
            o, lse, ol = _sparse_fwd(q, k, v, idx, cnt, block, scale, (SH, SLO, LP, z), eps_s, layout=layout)
        else:
            o, lse, _ = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout)
            ol = _linear_apply(q, SH, SLO, LP, z, eps_s, layout)
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt, z, SH, SLO)
        ctx.block, ctx.scale, ctx.eps, ctx.LP = block, scale, eps_s, LP
        return o, ol

    @staticmethod
    def backward(ctx, do_s, do_l):
        q, k, v, o, lse, idx, cnt, z, SH, SLO = ctx.saved_tensors
        dq = dk = dv = None
        if do_s is not None:
            dq, dk, dv = _sparse_bwd(q, k, v, o, lse, do_s, idx, cnt, ctx.block, ctx.scale)
        if do_l is not None:
            # accumulate the linear-branch gradients into the sparse ones inside the kernels
            dq, dk, dv = _linear_bwd(q, k, v, z, SH, SLO, ctx.LP, do_l, ctx.eps,
                                     acc=None if dq is None else (dq, dk, dv))
        return dq, dk, dv, None, None, None, None, None, None


def block_sparse_attention(q, k, v, idx, cnt, block, scale, layout="bhld"):
    q, k, v, scale = _prep(q, k, v, block, scale)
    return _SparseAttnFn.apply(q, k, v, idx, cnt, block, scale, layout)


@torch.no_grad()
def block_sparse_attention_rowmap(q, k, v, idx, cnt, block, scale, rowmap, bias=None, layout="blhd", comp=None):
    """Inference only (no autograd): q and the output in the caller's row order, k/v in tile order.
    comp: None | True | (k_mean, v_mean): centroid compensation (see _sparse_fwd)."""
    q, k, v, scale = _prep(q, k, v, block, scale)
    o, _, _ = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout, rowmap=rowmap, bias=bias, comp=comp)
    return o


@torch.no_grad()
def block_sparse_attention_fwd(q, k, v, idx, cnt, block, scale, layout="bhld", comp=None):
    """Forward only (no autograd Function): (o, lse); comp as in _sparse_fwd."""
    q, k, v, scale = _prep(q, k, v, block, scale)
    o, lse, _ = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout, comp=comp)
    return o, lse


def linear_attention(q, k, v, eps, layout="bhld"):
    q, k, v, _ = _prep(q, k, v, 16, None)
    return _LinearAttnFn.apply(q, k, v, float(eps), layout)


def sparse_linear_attention(q, k, v, idx, cnt, block, scale, eps, layout="bhld"):
    q, k, v, scale = _prep(q, k, v, block, scale)
    return _SparseLinearFn.apply(q, k, v, idx, cnt, block, scale, float(eps), layout)
