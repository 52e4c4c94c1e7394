"""Host wrappers + autograd Functions for the Triton kernels (imports triton on first use)."""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import triton

from . import _triton_kernels as tk
from .options import DEFAULT_OPTIONS, TritonOptions, overridden
from .reference import bias_args, num_blocks

Tensor = torch.Tensor
Means = Tuple[Tensor, Tensor]                       # fp32 block means of k and v, (B*H, nk, D) each
Comp = Union[None, bool, Tuple[Optional[Tensor], Optional[Tensor]]]
Strides = Tuple[int, ...]

# ----------------------------------------------------------------------------------------------
# tuned configs: one checked-in table, read-only
# ----------------------------------------------------------------------------------------------


def _cfg(num_warps: int, num_stages: int, **kwargs: Any) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Best of the sweeps on the H100 for 16-bit inputs (benchmarks/results, Wan-1.3B/480p at 90%
# sparsity for D=128), keyed by (kernel, head dim).  Sparse kernels: BLOCK_N keys per tile
# (BLOCK_M query rows for dk/dv), USE_TMA: host TMA descriptors where the tensors allow them.
# Linear branch: BLOCK_N / BLOCK_M rows per step; PROGRAMS (host side, not a kernel argument): each
# program loops over a chunk of rows so its D x D state is loaded once, and the chunk is sized so
# that about PROGRAMS programs run.
_TUNED_16BIT: Dict[Tuple[str, int], triton.Config] = {
    ("fwd", 64): _cfg(4, 3, BLOCK_N=128, USE_TMA=True),
    ("fwd", 128): _cfg(4, 2, BLOCK_N=64, USE_TMA=True),
    ("bwd_dq", 64): _cfg(4, 3, BLOCK_N=64, USE_TMA=False),
    ("bwd_dq", 128): _cfg(8, 4, BLOCK_N=64, USE_TMA=True),
    ("bwd_dkdv", 64): _cfg(4, 3, BLOCK_N=64, BLOCK_M=64, USE_TMA=False),
    ("bwd_dkdv", 128): _cfg(4, 2, BLOCK_N=64, BLOCK_M=64, USE_TMA=True),
    **{("lin_state", d): _cfg(8, 3, BLOCK_N=128, PROGRAMS=528) for d in (64, 128)},
    **{("lin_apply", d): _cfg(4, 3, BLOCK_M=64, PROGRAMS=1056) for d in (64, 128)},
    **{("lin_bwd", d): _cfg(8, 3, BLOCK_M=64, PROGRAMS=528) for d in (64, 128)},
    # inference passes (kv_pass: tile-order copy + pooling + linear state; q_pass: pooling + linear
    # branch): rows per step and about PROGRAMS programs.  Best of benchmarks/sweep_passes.py on the H200
    # (72 candidates each, Wan-1.3B/14B 480p and the 21x30x30 grid; within 1% of each shape's best):
    # kv_pass 0.337 -> 0.209 ms at 1.3B 480p (the gather alone takes 0.109, index_select 0.114).
    # q_pass at D=128 (second sweep, 64 candidates with the variants, Wan-1.3B/14B 480p): the state as one
    # 16-bit dot operand (S_PARTS 1) and the denominator on the tensor cores (DEN_DOT), 128 rows per step:
    # 0.155 -> 0.103 ms (1.3B), 0.476 -> 0.316 ms (14B); D=64 keeps the first sweep's entry (not re-swept)
    # kv_pass WAVE_FIT (host side): half of PROGRAMS when whole splits per head fill >= 95% of that half (see
    # _wave_fit; sweep of 2026-11-29 on the H200 with 132/264/528 programs: at B*H 12, 264 programs beat 528,
    # 0.209 -> 0.196 ms at 1.3B 480p and 0.147 -> 0.125 ms at 21x30x30; at B*H 40 (Wan 14B) 264 would run
    # 240 programs and lost, 0.628 vs 0.602 ms, so 528 stays there)
    **{("kv_pass", d): _cfg(4, 3, BLOCK_N=64, PROGRAMS=528, WAVE_FIT=True) for d in (64, 128)},
    ("q_pass", 64): _cfg(4, 1, BLOCK_M=64, PROGRAMS=528),
    ("q_pass", 128): _cfg(4, 1, BLOCK_M=128, PROGRAMS=528, S_PARTS=1, DEN_DOT=True),
    # the gate's mean over the tokens of the block input (B, L, dim): not a head-dim kernel, one entry
    **{("token_mean", d): _cfg(4, 3, BLOCK_L=32, BLOCK_C=256, PROGRAMS=1056) for d in (64, 128)},
}
TUNED_D = (64, 128)          # other head dims (16, 32) use the D=128 entries
LONG_L = 65536               # length bucket "long": L >= LONG_L (no long-specific tuning yet)


def _fp32_variant(kernel: str, c: triton.Config) -> triton.Config:
    """fp32 inputs: tiles twice as large, so one pipeline stage for the sparse kernels (at D=128 the
    tuned depths need more than the H100's 227 KB of shared memory) and half the linear-branch
    rows per step (state and apply passes); fp32 tl.dot is TF32 on the GPU."""
    kw = dict(c.kwargs)
    if kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        return _cfg(c.num_warps, 1, **kw)
    if kernel == "lin_state":
        kw["BLOCK_N"] = 64
    elif kernel in ("lin_apply", "q_pass"):
        kw["BLOCK_M"] = 32
    elif kernel == "kv_pass":
        kw["BLOCK_N"] = 32
    return _cfg(c.num_warps, c.num_stages, **kw)


def _build_table() -> Mapping[Tuple[str, int, str, str], triton.Config]:
    table = {}
    for (kernel, d), c in _TUNED_16BIT.items():
        for bucket in ("short", "long"):
            table[(kernel, d, "16bit", bucket)] = c
            table[(kernel, d, "fp32", bucket)] = _fp32_variant(kernel, c)
    return MappingProxyType(table)


# (kernel, D, "16bit" | "fp32", "short" | "long") -> triton.Config.  Read-only: a benchmark that
# compares configs passes them per call (TritonOptions.configs).
CONFIGS = _build_table()


def config_for(kernel: str, D: int, dtype: torch.dtype, L: int,
               opts: TritonOptions = DEFAULT_OPTIONS) -> triton.Config:
    """The config a call uses: opts.configs[kernel] if given, else a surrounding options.config_overrides
    block's, else the table's entry."""
    if kernel in opts.configs:
        return opts.configs[kernel]
    scoped = overridden(kernel)
    if scoped is not None:
        return scoped
    dt = "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"
    return CONFIGS[(kernel, D if D in TUNED_D else 128, dt, "long" if L >= LONG_L else "short")]


def _launch(c: triton.Config) -> Dict[str, int]:
    return dict(num_warps=c.num_warps, num_stages=c.num_stages)


def _use_tma(c: triton.Config, opts: TritonOptions, *ts: Tensor) -> bool:
    want = c.kwargs.get("USE_TMA", False) if opts.tma is None else opts.tma
    return bool(want) and _tma_ok(*ts)


# ----------------------------------------------------------------------------------------------
# buffers and argument checks
# ----------------------------------------------------------------------------------------------

def _empty(*shape: int, device: torch.device, dtype: torch.dtype, poison: bool = False) -> Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    if poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _out(B: int, H: int, L: int, D: int, device: torch.device, dtype: torch.dtype, layout: str,
         poison: bool = False) -> Tensor:
    """A (B,H,L,D) output: contiguous for layout "bhld", a permuted view of a contiguous (B,L,H,D)
    buffer for "blhd" (what a caller working in (B,L,H*D) wants: no transpose copy afterwards)."""
    if layout == "blhd":
        return _empty(B, L, H, D, device=device, dtype=dtype, poison=poison).permute(0, 2, 1, 3)
    if layout != "bhld":
        raise ValueError(f"out_layout must be 'bhld' or 'blhd', got {layout!r}")
    return _empty(B, H, L, D, device=device, dtype=dtype, poison=poison)


def _lastdim_contig(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bhl(x: Tensor) -> Strides:
    """(b, h, l) strides of a (B,H,L,D) tensor (unit stride on D)."""
    return (x.stride(0), x.stride(1), x.stride(2))


def _check_d(D: int) -> None:
    if D not in (16, 32, 64, 128):
        raise ValueError(f"Triton path supports head_dim in (16, 32, 64, 128), got {D}")


def _grid_ok(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")


def _lut_views(idx: Tensor, cnt: Tensor, B: int, H: int, nq: int) -> Tuple[Tensor, Tensor, Strides]:
    """idx/cnt expanded to (B,H,nq,kmax)/(B,H,nq) int32 and the kernels' lut_str tuple."""
    idx = idx.expand(B, H, nq, idx.shape[-1])
    cnt = cnt.expand(B, H, nq)
    if idx.dtype != torch.int32:
        idx = idx.to(torch.int32)
    if cnt.dtype != torch.int32:
        cnt = cnt.to(torch.int32)
    return idx, cnt, tuple(idx.stride()) + tuple(cnt.stride())


def _rowmap(rowmap: Optional[Tensor], L: int, device: torch.device) -> Optional[Tensor]:
    if rowmap is None:
        return None
    if rowmap.shape != (L,):
        raise ValueError(f"rowmap must have shape ({L},), got {tuple(rowmap.shape)}")
    return rowmap.to(device=device, dtype=torch.int32).contiguous()


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _descs(use_tma: bool, *specs: Tuple[Tensor, int]) -> Tuple[Any, ...]:
    """Host TMA descriptors over (B,H,L,D) tensors with blocks [1, 1, rows, D] for each
    (tensor, rows) in specs; without TMA the tensors themselves (the kernels take either)."""
    if not use_tma:
        return tuple(t for t, _ in specs)
    from triton.tools.tensor_descriptor import TensorDescriptor
    return tuple(TensorDescriptor.from_tensor(t, [1, 1, rows, t.shape[-1]]) for t, rows in specs)


def _tma_ok(*ts: Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base and strides (unit last stride)."""
    for t in ts:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------

def pool_blocks(x: Tensor, block: int, rowmap: Optional[Tensor] = None,
                opts: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """(B,H,L,D) -> (B,H,nb,D) fp32 block means; rowmap (L,): pool the rows of x in the order it
    gives (tile position -> row)."""
    _grid_ok(block)
    x = _lastdim_contig(x)
    B, H, L, D = x.shape
    _check_d(D)
    nb = num_blocks(L, block)
    out = _empty(B, H, nb, D, device=x.device, dtype=torch.float32, poison=opts.poison)
    rm = _rowmap(rowmap, L, x.device)
    tk._pool_kernel[(nb, B * H)](x, out, rm if rm is not None else out, _bhl(x), H, L, nb,
                                 BLOCK=block, D=D, GATHER=rm is not None, num_warps=4)
    return out


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
    idx = _empty(B, H, nq, kmax, device=sc.device, dtype=torch.int32)
    cnt = _empty(B, H, nq, device=sc.device, dtype=torch.int32)
    # without forced blocks the kernel never reads AK: pass cnt as a placeholder (no allocation)
    ak = always_kept.to(device=sc.device, dtype=torch.int32).reshape(-1).contiguous() if n_ak else cnt
    nkp = max(16, triton_next_pow2(nk))
    tk._topk_lut_kernel[(nq, B * H)](sc, ak, idx, cnt, nq, nk, k, kmax, n_ak,
                                     NKP=nkp, KMAXP=max(16, triton_next_pow2(kmax)), SHIFT=12,
                                     num_warps=4 if nkp <= 1024 else 8)
    return idx, cnt


def token_mean(x: Tensor, opts: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """(B, L, C) -> (B, C) fp32 mean over L (unit stride on C): split-L partial sums, already divided by L,
    then one torch sum over the splits."""
    B, L, C = x.shape
    c = config_for("token_mean", 128, x.dtype, L, opts)
    bl, bc = c.kwargs["BLOCK_L"], c.kwargs["BLOCK_C"]
    ncol = triton_cdiv(C, bc)
    nsplit, chunk = _splits(L, bl, B * ncol, c.kwargs["PROGRAMS"])
    part = _empty(B, nsplit, C, device=x.device, dtype=torch.float32, poison=opts.poison)
    tk._token_sum_kernel[(ncol, nsplit, B)](x, part, x.stride(0), x.stride(1), L, C, chunk, nsplit, 1.0 / max(1, L),
                                            BLOCK_L=bl, BLOCK_C=bc, **_launch(c))
    return part[:, 0] if nsplit == 1 else part.sum(1)


# ----------------------------------------------------------------------------------------------
# linear attention
# ----------------------------------------------------------------------------------------------

def _splits(n_rows: int, tile: int, bh: int, target: int) -> Tuple[int, int]:
    """(number of splits, rows per split) so that about `target` programs cover bh heads."""
    ntile = max(1, triton_cdiv(n_rows, tile))
    nsplit = max(1, min(ntile, target // max(1, bh)))
    chunk = triton_cdiv(ntile, nsplit) * tile
    return triton_cdiv(n_rows, chunk), chunk


def _wave_fit(bh: int, programs: int, fill: float = 0.95) -> int:
    """About how many programs a split-per-head pass over bh heads should aim at: half of `programs` when
    bh heads times whole splits per head fill at least `fill` of that half, else `programs`.  The table's
    528 is two waves of two CTAs per SM on a 132-SM H100/H200: one full wave is enough to keep the loads in
    flight, and every program also writes a partial D x D state (66 KB at D=128) that a torch sum reads
    back, so one wave halves that traffic; a half-empty wave (Wan 14B: 40 heads, 6 splits, 240 of 264)
    costs more than the partials save."""
    half = programs // 2
    return half if bh <= half and (half // bh) * bh >= fill * half else programs


def kv_pass_programs(c: triton.Config, bh: int) -> int:
    """The program target of a kv_pass config for bh heads: its PROGRAMS, through _wave_fit when WAVE_FIT."""
    return _wave_fit(bh, c.kwargs["PROGRAMS"]) if c.kwargs.get("WAVE_FIT", False) else c.kwargs["PROGRAMS"]


def linear_state(k: Tensor, v: Tensor, opts: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor]:
    """Scaled linear state S' = S / LK (B*H, D, D) fp32 and z' = z / LK (B*H, D) fp32, via split-L
    partial sums + torch reduce.  The 1/LK scale keeps entries O(1) (fp16-safe hi/lo split) and
    cancels in phi(q)S / (phi(q).z + eps) when eps is scaled the same way (eps' = eps / LK)."""
    B, H, LK, D = k.shape
    c = config_for("lin_state", D, k.dtype, LK, opts)
    bn = c.kwargs["BLOCK_N"]
    nsplit, chunk = _splits(LK, bn, B * H, c.kwargs["PROGRAMS"])
    sp = _empty(B * H, nsplit, D, D, device=k.device, dtype=torch.float32, poison=opts.poison)
    zp = _empty(B * H, nsplit, D, device=k.device, dtype=torch.float32, poison=opts.poison)
    tk._linear_state_kernel[(nsplit, B * H)](k, v, sp, zp, _bhl(k), _bhl(v), H, LK, chunk, nsplit,
                                             1.0 / max(1, LK), BLOCK_N=bn, D=D, **_launch(c))
    if nsplit == 1:
        return sp[:, 0], zp[:, 0]
    return sp.sum(1), zp.sum(1)


def _low_precision(dtype: torch.dtype) -> bool:
    """LP: the kernels use the fp32 linear state S as dot operands in q's 16-bit dtype: hi + lo parts (two
    tensor-core dots at ~fp32 accuracy), or one rounded part where a config says S_PARTS 1 (the D=128
    inference Q pass); for fp32 q they use S itself (fp32 dots)."""
    return dtype in (torch.bfloat16, torch.float16)


def _linear_apply(q: Tensor, S: Tensor, z: Tensor, eps: float,
                  layout: str = "bhld", opts: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    B, H, L, D = q.shape
    out = _out(B, H, L, D, q.device, q.dtype, layout, opts.poison)
    c = config_for("lin_apply", D, q.dtype, L, opts)
    bm = c.kwargs["BLOCK_M"]
    nsplit, chunk = _splits(L, bm, B * H, c.kwargs["PROGRAMS"])
    tk._linear_apply_kernel[(nsplit, B * H)](q, S, z, out, _bhl(q), _bhl(out), H, L, chunk, eps,
                                             BLOCK_M=bm, D=D, LP=_low_precision(q.dtype), num_warps=c.num_warps)
    return out


def _linear_bwd(q: Tensor, k: Tensor, v: Tensor, z: Tensor, S: Tensor, do: Tensor,
                eps: float, opts: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients through the scaled formulation (S' = S/LK, z' = z/LK, eps' = eps/LK)."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    do = _lastdim_contig(do)
    c = config_for("lin_bwd", D, q.dtype, L, opts)
    bm = c.kwargs["BLOCK_M"]
    nsplit, chunk = _splits(L, bm, B * H, c.kwargs["PROGRAMS"])
    dq = _empty(B, H, L, D, device=q.device, dtype=q.dtype, poison=opts.poison)
    dsp = _empty(B * H, nsplit, D, D, device=q.device, dtype=torch.float32, poison=opts.poison)
    dzp = _empty(B * H, nsplit, D, device=q.device, dtype=torch.float32, poison=opts.poison)
    tk._linear_bwd_q_kernel[(nsplit, B * H)](q, S, z, do, dq, dsp, dzp, _bhl(q), _bhl(do),
                                             H, L, chunk, nsplit, eps, BLOCK_M=bm, D=D,
                                             LP=_low_precision(q.dtype), num_warps=c.num_warps)
    inv = 1.0 / max(1, LK)
    dS = dsp.sum(1) * inv  # dL/dS' -> dL/d(sum_j phi(k_j) v_j^T)
    dz = dzp.sum(1) * inv
    dk = _empty(B, H, LK, D, device=k.device, dtype=k.dtype, poison=opts.poison)
    dv = _empty(B, H, LK, D, device=v.device, dtype=v.dtype, poison=opts.poison)
    nsk, chk = _splits(LK, bm, B * H, c.kwargs["PROGRAMS"])
    tk._linear_bwd_kv_kernel[(nsk, B * H)](k, v, dS, dz, dk, dv, _bhl(k), _bhl(v), H, LK, chk,
                                           BLOCK_N=bm, D=D, num_warps=c.num_warps)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# inference passes: K and V read once, Q read once
# ----------------------------------------------------------------------------------------------

def kv_pass(k: Tensor, v: Tensor, rowmap: Tensor, block: int, pool_k: bool, pool_v: bool, state: bool,
            opts: TritonOptions = DEFAULT_OPTIONS
            ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One read of k and v (B,H,L,D, the caller's row order): (kt, vt) tile-ordered copies (tile position r =
    row rowmap[r]) as (B,H,L,D) views of contiguous (B,L,H,D) buffers, fp32 block means of kt / vt
    (B,H,nb,D) when pool_k / pool_v, and when `state` the linear state (B*H, D*D + D) fp32: S = relu(k)^T v
    row-major then z = sum relu(k), both divided by L (see linear_state)."""
    _grid_ok(block)
    B, H, L, D = k.shape
    _check_d(D)
    nb = num_blocks(L, block)
    c = config_for("kv_pass", D, k.dtype, L, opts)
    bn = min(c.kwargs["BLOCK_N"], block)
    nsplit, bps = _splits(nb, 1, B * H, kv_pass_programs(c, B * H))
    kt = _out(B, H, L, D, k.device, k.dtype, "blhd", opts.poison)
    vt = _out(B, H, L, D, v.device, v.dtype, "blhd", opts.poison)
    km = _empty(B, H, nb, D, device=k.device, dtype=torch.float32, poison=opts.poison) if pool_k else None
    vm = _empty(B, H, nb, D, device=k.device, dtype=torch.float32, poison=opts.poison) if pool_v else None
    sp = _empty(B * H, nsplit, D * D + D, device=k.device, dtype=torch.float32, poison=opts.poison) if state else None
    rm = _rowmap(rowmap, L, k.device)
    tk._kv_pass_kernel[(nsplit, B * H)](
        k, v, kt, vt, km if pool_k else rm, vm if pool_v else rm, sp if state else rm, rm, _bhl(k), _bhl(v),
        _bhl(kt), _bhl(vt), H, L, nb, bps, nsplit, 1.0 / max(1, L), BLOCK=block, BLOCK_N=bn, D=D,
        POOL_K=pool_k, POOL_V=pool_v, STATE=state, **_launch(c))
    st = None
    if state:
        st = sp[:, 0] if nsplit == 1 else sp.sum(1)
    return kt, vt, km, vm, st


def q_pass(q: Tensor, rowmap: Tensor, block: int, state: Optional[Tensor], eps: float,
           gate_logit: Optional[Tensor], pool: bool, opts: TritonOptions = DEFAULT_OPTIONS, tile_q: bool = False
           ) -> Tuple[Optional[Tensor], ...]:
    """One read of q (B,H,L,D, the caller's row order) in tile order (tile position r = row rowmap[r]):
    (q block means (B,H,nb,D) fp32 when `pool`, the linear branch's output when `state` (from kv_pass) is
    given, times sigmoid(gate_logit[b]) when gate_logit (B,) is given, in q's dtype and row order as a
    (B,H,L,D) view of a contiguous (B,L,H,D) buffer), plus with tile_q a third output: the tile-ordered copy
    of q (the same kind of view).  eps: the branch's denominator epsilon (for the unscaled state; divided by
    L here as the state is)."""
    _grid_ok(block)
    B, H, L, D = q.shape
    _check_d(D)
    nb = num_blocks(L, block)
    linear = state is not None
    if linear and tuple(state.shape) != (B * H, D * D + D):
        raise ValueError(f"linear state must be (B*H, D*D + D) = {(B * H, D * D + D)}, got {tuple(state.shape)}")
    c = config_for("q_pass", D, q.dtype, L, opts)
    bm = min(c.kwargs["BLOCK_M"], block)
    nsplit, bps = _splits(nb, 1, B * H, c.kwargs["PROGRAMS"])
    qm = _empty(B, H, nb, D, device=q.device, dtype=torch.float32, poison=opts.poison) if pool else None
    ol = _out(B, H, L, D, q.device, q.dtype, "blhd", opts.poison) if linear else None
    gl = None
    if linear and gate_logit is not None:
        gl = gate_logit.to(device=q.device, dtype=torch.float32).reshape(B).contiguous()
    qt = _out(B, H, L, D, q.device, q.dtype, "blhd", opts.poison) if tile_q else None
    rm = _rowmap(rowmap, L, q.device)
    st = state.contiguous() if linear else rm
    tk._q_pass_kernel[(nsplit, B * H)](
        q, qm if pool else rm, ol if linear else q, st, gl if gl is not None else rm, rm, qt if tile_q else q,
        _bhl(q), _bhl(ol if linear else q), _bhl(qt if tile_q else q), H, L, nb, bps, float(eps) / max(1, L),
        BLOCK=block, BLOCK_M=bm, D=D, POOL=pool, LINEAR=linear, LP=_low_precision(q.dtype), HAS_GATE=gl is not None,
        S_PARTS=c.kwargs.get("S_PARTS", 2), DEN_DOT=c.kwargs.get("DEN_DOT", False), TILE_Q=tile_q, **_launch(c))
    return (qm, ol, qt) if tile_q else (qm, ol)


def wants_tiled_q(q: Tensor, opts: TritonOptions = DEFAULT_OPTIONS) -> bool:
    """Whether the forward's config for q (B,H,L,D) reads a tile-ordered copy of q on the row-map path
    (config key Q_TILED, with TMA usable): then the caller should have q_pass write one."""
    c = config_for("fwd", q.shape[-1], q.dtype, q.shape[2], opts)
    want = bool(c.kwargs.get("Q_TILED", False))
    return want and (opts.tma is not False) and (opts.tma is True or bool(c.kwargs.get("USE_TMA", False)))


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------

def _comp_means(comp: Comp, k: Tensor, v: Tensor, block: int, opts: TritonOptions = DEFAULT_OPTIONS) -> Means:
    """Block means of k and v for centroid compensation: (B*H, nk, D) fp32 contiguous each.
    comp: True (pool here), or (k_mean, v_mean) (B,H,nk,D) with None for a mean to pool here."""
    km, vm = (None, None) if comp is True else comp
    B, H, LK, D = k.shape
    nk = num_blocks(LK, block)
    km = pool_blocks(k, block, opts=opts) if km is None else km
    vm = pool_blocks(v, block, opts=opts) if vm is None else vm
    out = []
    for m in (km, vm):
        if tuple(m.shape) != (B, H, nk, D):
            raise ValueError(f"block means must be (B,H,nk,D) = {(B, H, nk, D)}, got {tuple(m.shape)}")
        out.append(m.to(device=k.device, dtype=torch.float32).reshape(B * H, nk, D).contiguous())
    return out[0], out[1]


def _centroid_tiles(nk: int, kmax: int, widest: int = 64) -> Dict[str, int]:
    """Centroids per step (BLOCK_C, at most `widest`) and the padded list length (KMAXP)."""
    return dict(BLOCK_C=max(16, min(widest, triton_next_pow2(nk))), KMAXP=max(16, triton_next_pow2(kmax)))


def _gluon_ws_ok(q: Tensor, k: Tensor, v: Tensor, block: int, bn: int, nbuf: int, mode: int = 1) -> bool:
    """Whether the experimental Gluon warp-specialised forward (fwd config key GLUON_WS, kernels/_gluon_ws.py) can
    run this call: a Hopper GPU, a Triton with Gluon's Hopper API, and the shapes and storage it takes."""
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    try:
        from . import _gluon_ws
    except Exception:  # a Triton without triton.experimental.gluon's Hopper API
        return False
    if mode not in _gluon_ws.MODES:
        raise ValueError(f"fwd config key GLUON_WS must be one of {sorted(_gluon_ws.MODES)}, got {mode}")
    return _gluon_ws.usable(q, k, v, block, bn, nbuf, _gluon_ws.MODES[mode]["split"])


def _sparse_fwd(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, block: int, scale: float, *,
                layout: str = "bhld", rowmap: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                gate_logit: Optional[Tensor] = None, comp: Comp = None, opts: TritonOptions = DEFAULT_OPTIONS,
                accumulate_into: Optional[Tensor] = None, q_tiled: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Optional[Means]]:
    """Returns (o, lse, means).  rowmap (L,): q is in the caller's row order; tile position r reads
    q row rowmap[r] and its output is stored at row rowmap[r] (k, v are in tile order).  bias
    ((H*D,) or (B, H*D)) is added to o, times sigmoid(gate_logit[b]) when gate_logit (B,) is given.
    comp: None, True or (k_mean, v_mean): centroid compensation of
    the key blocks each query block skips (see reference.block_sparse_attention_ref); means: the
    fp32 block means it used (for the backward), None without compensation.  accumulate_into: a (B,H,L,D)
    tensor of q's dtype (unit last stride) that already holds a term of the output: the kernel adds its
    result to it in place (one read in the epilogue instead of a separate add) and returns it as o.
    q_tiled (with rowmap): q already in tile order (q_pass's tile_q copy), read with TMA where possible
    instead of gathering q through the row map; the output still goes to the caller's rows."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    nq = num_blocks(L, block)
    nk = num_blocks(LK, block)
    idx, cnt, lut_str = _lut_views(idx, cnt, B, H, nq)
    means = _comp_means(comp, k, v, block, opts) if comp is not None and comp is not False else None
    c = config_for("fwd", D, q.dtype, L, opts)
    bn = min(c.kwargs["BLOCK_N"], block)
    if accumulate_into is not None:   # (shape, dtype and device: checked by kernels.block_sparse_attention_rowmap)
        o = accumulate_into
        if o.stride(-1) != 1:
            raise ValueError(f"accumulate_into must have a unit last stride, got strides {o.stride()}")
    else:
        o = _out(B, H, L, D, q.device, q.dtype, layout, opts.poison)
    lse = _empty(B, H, L, device=q.device, dtype=torch.float32, poison=opts.poison)
    rm = _rowmap(rowmap, L, q.device)
    bias, bias_sb, gl = bias_args(bias, gate_logit, B, H * D, q.device)
    ws_mode = int(c.kwargs.get("GLUON_WS") or 0)
    if (ws_mode and rm is not None and means is None and opts.tma is not False
            and _gluon_ws_ok(q, k, v, block, bn, c.num_stages, ws_mode)):
        from . import _gluon_ws       # (gathers q through the row map itself: q_tiled is not needed)
        _gluon_ws.launch(q, k, v, o, lse, idx, cnt, rm, bias, bias_sb, gl, block, scale * tk.LOG2E, block_n=bn,
                         nbuf=c.num_stages, accumulate=accumulate_into is not None, **_gluon_ws.MODES[ws_mode])
        return o, lse, means
    q_src = q_tiled if (rm is not None and q_tiled is not None) else q
    # with a row map (and no tile-ordered q) q is read with plain loads, so only k and v must meet TMA's rules
    gather_q = rm is not None and q_tiled is None
    use_tma = _use_tma(c, opts, k, v) if gather_q else _use_tma(c, opts, q_src, k, v)
    kd, vd = _descs(use_tma, (k, bn), (v, bn))
    # with a row map q rows are gathered with plain loads: no descriptor for q (host work per call)
    qd = q if gather_q else _descs(use_tma, (q_src, block))[0]
    km, vm = means if means is not None else (lse, lse)

    tk._sparse_fwd_kernel[(nq, B * H)](
        qd, kd, vd, o, lse, idx, cnt, rm if rm is not None else lse, bias if bias is not None else lse,
        gl if gl is not None else lse, km, vm,
        _bhl(q_src), _bhl(k), _bhl(v), _bhl(o), lut_str, H, L, LK, scale * tk.LOG2E, bias_sb,
        BLOCK_M=block, BLOCK_N=bn, D=D, NUM_STAGES=c.num_stages, USE_TMA=use_tma, ROWMAP_IO=rm is not None,
        HAS_BIAS=bias is not None, HAS_GATE=gl is not None, COMPENSATE=means is not None,
        ACCUM=accumulate_into is not None, Q_TILED=rm is not None and q_tiled is not None,
        **_centroid_tiles(nk, idx.shape[-1]), **_launch(c))
    return o, lse, means


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


def _sparse_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, idx: Tensor, cnt: Tensor,
                block: int, scale: float, *, means: Optional[Means] = None,
                opts: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of _sparse_fwd.  means: the forward's centroid block means (compensation): the
    centroids' gradients go to dq directly and, divided by each block's key count, to every key
    and value of the block (the means are pooled from k and v)."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    nq = num_blocks(L, block)
    nk = num_blocks(LK, block)
    idx, cnt, lut_str = _lut_views(idx, cnt, B, H, nq)
    do = _lastdim_contig(do)
    poison = opts.poison
    qk_scale = scale * tk.LOG2E
    delta = _empty(B, H, L, device=q.device, dtype=torch.float32, poison=poison)
    tk._bwd_preprocess_kernel[(triton_cdiv(L, 64), B * H)](o, do, delta, _bhl(o), _bhl(do), H, L,
                                                           BLOCK_M=64, D=D, num_warps=4)
    comp = means is not None
    km, vm = means if comp else (delta, delta)
    tiles = _centroid_tiles(nk, idx.shape[-1])
    dq = _empty(B, H, L, D, device=q.device, dtype=q.dtype, poison=poison)
    c = config_for("bwd_dq", D, q.dtype, L, opts)
    bn = min(c.kwargs["BLOCK_N"], block)
    tma = _use_tma(c, opts, q, k, v, do)
    kd, vd = _descs(tma, (k, bn), (v, bn))
    tk._sparse_bwd_dq_kernel[(nq, B * H)](
        q, kd, vd, do, dq, lse, delta, idx, cnt, km, vm, _bhl(q), _bhl(k), _bhl(v), _bhl(do), lut_str,
        H, L, LK, qk_scale, scale, BLOCK_M=block, BLOCK_N=bn, D=D, NUM_STAGES=c.num_stages, USE_TMA=tma,
        COMPENSATE=comp, **tiles, **_launch(c))
    dkm = dvm = delta
    if comp:
        dkm = _empty(B * H, nk, D, device=q.device, dtype=torch.float32, poison=poison)
        dvm = _empty(B * H, nk, D, device=q.device, dtype=torch.float32, poison=poison)
        bc = _centroid_tiles(nk, idx.shape[-1], widest=32)
        tk._centroid_bwd_kernel[(triton_cdiv(nk, bc["BLOCK_C"]), B * H)](
            q, do, lse, delta, idx, cnt, km, vm, dkm, dvm, _bhl(q), _bhl(do), lut_str, H, L, LK, nq, qk_scale,
            scale, BLOCK=block, BLOCK_M=min(64, block), D=D, **bc, num_warps=4)
    kidx, kcnt = transpose_lut(idx, cnt, B, H, nq, nk)
    c = config_for("bwd_dkdv", D, q.dtype, L, opts)
    bn = min(c.kwargs["BLOCK_N"], block)
    bm = min(c.kwargs["BLOCK_M"], block)
    dk = _empty(B, H, LK, D, device=k.device, dtype=k.dtype, poison=poison)
    dv = _empty(B, H, LK, D, device=v.device, dtype=v.dtype, poison=poison)
    tma = _use_tma(c, opts, q, k, v, do)
    qd, dod = _descs(tma, (q, bm), (do, bm))
    tk._sparse_bwd_dkdv_kernel[(nk * (block // bn), B * H)](
        qd, k, v, dod, dk, dv, lse, delta, kidx, kcnt, dkm, dvm, _bhl(q), _bhl(k), _bhl(v), _bhl(do),
        H, L, LK, nq, qk_scale, scale, BLOCK=block, BLOCK_N=bn, BLOCK_M=bm, D=D, NUM_STAGES=c.num_stages,
        USE_TMA=tma, COMPENSATE=comp, **_launch(c))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# autograd Functions and entry points (called by kernels/__init__.py)
# ----------------------------------------------------------------------------------------------

def _prep(q: Tensor, k: Tensor, v: Tensor, block: int, scale: Optional[float]
          ) -> Tuple[Tensor, Tensor, Tensor, float]:
    _grid_ok(block)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"Triton path: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    _check_d(q.shape[-1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return q, k, v, float(scale)


class _SparseAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, block: int, scale: float,
                layout: str, compensate: bool, opts: TritonOptions) -> Tuple[Tensor, Tensor]:
        o, lse, means = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout, comp=compensate or None,
                                    opts=opts)
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt, *(means or ()))
        ctx.block, ctx.scale, ctx.opts = block, scale, opts
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: Tensor, dlse: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        q, k, v, o, lse, idx, cnt, *means = ctx.saved_tensors
        dq, dk, dv = _sparse_bwd(q, k, v, o, lse, do, idx, cnt, ctx.block, ctx.scale,
                                 means=(means[0], means[1]) if means else None, opts=ctx.opts)
        return dq, dk, dv, None, None, None, None, None, None, None


class _LinearAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, eps: float, layout: str, opts: TritonOptions) -> Tensor:
        S, z = linear_state(k, v, opts)
        eps_s = eps / max(1, k.shape[2])
        o = _linear_apply(q, S, z, eps_s, layout, opts)
        ctx.save_for_backward(q, k, v, z, S)
        ctx.eps, ctx.opts = eps_s, opts
        return o

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> Tuple[Optional[Tensor], ...]:
        q, k, v, z, S = ctx.saved_tensors
        dq, dk, dv = _linear_bwd(q, k, v, z, S, do, ctx.eps, ctx.opts)
        return dq, dk, dv, None, None, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, block: int,
                           scale: Optional[float], layout: str = "bhld", compensate: bool = False,
                           opts: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor]:
    """Differentiable (o, lse); compensate: centroid compensation with the means pooled here (the
    backward sends the centroids' gradients through the means to every key and value)."""
    q, k, v, scale = _prep(q, k, v, block, scale)
    return _SparseAttnFn.apply(q, k, v, idx, cnt, block, scale, layout, bool(compensate), opts)


def block_sparse_attention_rowmap(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, block: int,
                                  scale: Optional[float], rowmap: Tensor, bias: Optional[Tensor] = None,
                                  gate_logit: Optional[Tensor] = None, layout: str = "blhd", comp: Comp = None,
                                  opts: TritonOptions = DEFAULT_OPTIONS,
                                  accumulate_into: Optional[Tensor] = None, q_tiled: Optional[Tensor] = None
                                  ) -> Tensor:
    """Inference only (no autograd; its caller kernels.block_sparse_attention_rowmap runs under
    no_grad, so it is not entered twice): q and the output in the caller's row order, k/v in tile order.
    comp: None | True | (k_mean, v_mean): centroid compensation (see _sparse_fwd); accumulate_into, q_tiled:
    see _sparse_fwd."""
    q, k, v, scale = _prep(q, k, v, block, scale)
    if q_tiled is not None:
        q_tiled = _lastdim_contig(q_tiled)
    o, _, _ = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout, rowmap=rowmap, bias=bias,
                          gate_logit=gate_logit, comp=comp, opts=opts, accumulate_into=accumulate_into,
                          q_tiled=q_tiled)
    return o


@torch.no_grad()
def block_sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, block: int,
                               scale: Optional[float], layout: str = "bhld", comp: Comp = None,
                               opts: TritonOptions = DEFAULT_OPTIONS) -> Tuple[Tensor, Tensor]:
    """Forward only (no autograd Function): (o, lse); comp as in _sparse_fwd."""
    q, k, v, scale = _prep(q, k, v, block, scale)
    o, lse, _ = _sparse_fwd(q, k, v, idx, cnt, block, scale, layout=layout, comp=comp, opts=opts)
    return o, lse


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float, layout: str = "bhld",
                     opts: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    q, k, v, _ = _prep(q, k, v, 16, None)
    return _LinearAttnFn.apply(q, k, v, float(eps), layout, opts)


__all__: Sequence[str] = (
    "CONFIGS", "LONG_L", "TUNED_D", "config_for", "pool_blocks", "token_mean", "topk_lut", "linear_state", "kv_pass",
    "q_pass", "wants_tiled_q",
    "transpose_lut", "block_sparse_attention", "block_sparse_attention_rowmap", "block_sparse_attention_fwd",
    "linear_attention",
)
