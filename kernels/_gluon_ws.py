"""Hopper (sm90) block-sparse attention forward with explicit warp specialisation, written in Gluon.
EXPERIMENTAL and off by default (fwd config key GLUON_WS): compiled for sm90 on the CPU, not yet run on a GPU.

Why: the Triton kernel (_triton_kernels._sparse_fwd_kernel) keeps the H200's tensor pipe 55% busy; a quarter of
its stall samples wait at the block-wide barriers before each TMA refill and another quarter on the wgmma results
(benchmarks/results/wave6/).  FlashAttention-3 removes both with warp specialisation.  Triton 3.6's automatic
pass did not work on this kernel (128-row programs stalled, 64-row ones ran at half speed, 3 stages gave NaNs;
benchmarks/results/wave8/), so this kernel states the partitions itself:

- the default partition (num_warps of the launch, 4) is the producer: it walks the query block's key list and
  issues the TMA loads of each step's K and V tile into a ring of NBUF buffers (mbarriers `kready` / `vready`),
  waiting until both consumers have released a buffer (`kempty` / `vempty`, two arrivals each);
- two worker partitions of one warpgroup each are the consumers, rows 0-63 and 64-127 of the 128-row query block:
  per step scores (async wgmma, q from shared memory), online softmax, P.V (async wgmma, P from registers), each
  releasing a buffer as soon as its wgmma has read it.  They share every K/V tile and never wait for each other,
  so one warpgroup's softmax can run under the other's wgmma (FlashAttention-3's two-warpgroup schedule, left to
  the warp scheduler instead of named barriers).

Each consumer's per-warpgroup `mbarrier.arrive` is preceded by Gluon's own partition-wide sync (one warpgroup),
so a buffer is released only after all 128 threads of that warpgroup finished their wgmma on it.

Scope: the inference call (row map in, bias and gate, accumulate_into; no centroid compensation), 16-bit q/k/v,
head dim 64 or 128, block 128 and BLOCK_N dividing it, K/V in (B,H,L,D)- or (B,L,H,D)-contiguous storage.
Anything else runs the Triton kernel.  The LSE is written like the Triton kernel's.  Gluon has no CPU
interpreter: the CPU tests compile it for sm90 (benchmarks/kernel_codegen.py); its results are checked against
the plain-torch reference on the GPU only (tests/test_kernels.py).  What to test first on a GPU, each case in a
child process with a time limit: that it finishes (every mbarrier phase), then that it matches, then speed.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

_LN2 = gl.constexpr(0.6931471805599453)
HALF_ROWS = 64                  # rows per consumer warpgroup (one wgmma M)
HALF = gl.constexpr(HALF_ROWS)


@gluon.jit
def _step_start(idx_base, sik, t, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of step t: BLOCK_N-key sub-tile t % (BLOCK/BLOCK_N) of listed block t // (BLOCK/BLOCK_N)."""
    SPLIT: gl.constexpr = BLOCK // BLOCK_N
    kb = gl.load(idx_base + (t // SPLIT) * sik)
    return kb * BLOCK + (t % SPLIT) * BLOCK_N


@gluon.jit
def _producer(kd, vd, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt, row0, col,
              BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, NBUF: gl.constexpr):
    """TMA loads of every step's K and V tile into ring buffer t % NBUF, once both consumers released it (a
    fresh barrier passes the wait for the phase before its first)."""
    for t in range(nt):
        s = t % NBUF
        free_phase = ((t // NBUF) & 1) ^ 1
        start = _step_start(idx_base, sik, t, BLOCK, BLOCK_N)
        mbarrier.wait(kempty.index(s), free_phase)
        mbarrier.expect(kready.index(s), kd.block_type.nbytes)
        tma.async_copy_global_to_shared(kd, [row0 + start, col], kready.index(s), k_s.index(s))
        mbarrier.wait(vempty.index(s), free_phase)
        mbarrier.expect(vready.index(s), vd.block_type.nbytes)
        tma.async_copy_global_to_shared(vd, [row0 + start, col], vready.index(s), v_s.index(s))


@gluon.jit
def _consumer(part: gl.constexpr, q_s, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt,
              O, LSE, ROWMAP, BIAS, GL, o_sb, o_sh, o_sl, b, h, pid_bh, pid_m, L, LK, qk_scale, bias_sb,
              BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
              HAS_BIAS: gl.constexpr, HAS_GATE: gl.constexpr, ACCUM: gl.constexpr):
    """Rows part*HALF .. part*HALF+HALF of query block pid_m (one warpgroup): the key walk and the epilogue."""
    dtype: gl.constexpr = k_s.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    TPW_D: gl.constexpr = D // 8
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    q_h = q_s.slice(part * HALF, HALF)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([HALF], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    for t in range(nt):
        s = t % NBUF
        phase = (t // NBUF) & 1
        start = _step_start(idx_base, sik, t, BLOCK, BLOCK_N)
        mbarrier.wait(kready.index(s), phase)
        tok = warpgroup_mma(q_h, k_s.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        sc, _ = warpgroup_mma_wait(0, deps=(tok, k_s.index(s)))
        mbarrier.arrive(kempty.index(s), count=1)
        if start + BLOCK_N > LK:    # the last, partial block: keys past LK out
            sc = gl.where((start + offs_n < LK)[None, :], sc, -float("inf"))
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(vready.index(s), phase)
        acc = warpgroup_mma_init(acc)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_s.index(s), acc, is_async=True)
        acc, _ = warpgroup_mma_wait(0, deps=(acc, v_s.index(s)))
        mbarrier.arrive(vempty.index(s), count=1)

    # epilogue: normalise, LSE (natural log, -inf for rows with no key), bias x gate, store through the row map
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, -float("inf"), (m_i + gl.log2(l_safe)) * _LN2)
    o = gl.convert_layout(acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None], io_layout)
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    offs_m = pid_m * BLOCK + part * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, io_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    row_ok = offs_m < L
    if HAS_BIAS:
        bias_row = gl.load(BIAS + b64 * bias_sb + h64 * D + offs_d).to(gl.float32)
        if HAS_GATE:
            bias_row = bias_row / (1.0 + gl.exp(-gl.load(GL + b)))
        o = o + bias_row[None, :]
    rows = gl.load(ROWMAP + offs_m, mask=row_ok, other=0).to(gl.int64)
    o_ptrs = O + b64 * o_sb + h64 * o_sh + rows[:, None] * o_sl + offs_d[None, :]
    if ACCUM:
        o = o + gl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(gl.float32)
    gl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    gl.store(LSE + pid_bh.to(gl.int64) * L + offs_m, gl.convert_layout(lse, gl.SliceLayout(1, io_layout)),
             mask=row_ok)


@gluon.jit
def _sparse_fwd_gluon_ws(Q, kd, vd, O, LSE, IDX, CNT, ROWMAP, BIAS, GL,
                         q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, lut_sb, lut_sh, lut_sm, lut_sk, cnt_sb, cnt_sh, cnt_sm,
                         H, L, LK, kv_rb, kv_rh, kv_ch, qk_scale, bias_sb,
                         BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
                         HAS_BIAS: gl.constexpr, HAS_GATE: gl.constexpr, ACCUM: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = kd.dtype
    TPW_D: gl.constexpr = D // 8
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [num_warps, 1], [1, 0])
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)

    # q rows of the block through the row map into shared memory (the A operand of both consumers' score wgmmas)
    offs_m = pid_m * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, io_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    row_ok = offs_m < L
    rows = gl.load(ROWMAP + offs_m, mask=row_ok, other=0).to(gl.int64)
    q = gl.load(Q + b64 * q_sb + h64 * q_sh + rows[:, None] * q_sl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_s = gl.allocate_shared_memory(dtype, [BLOCK, D], gl.NVMMASharedLayout.get_default_for([BLOCK, D], dtype), q)
    k_s = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], kd.layout)
    v_s = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], vd.layout)
    kready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    vready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    kempty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    vempty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NBUF):
        mbarrier.init(kready.index(i), count=1)
        mbarrier.init(vready.index(i), count=1)
        mbarrier.init(kempty.index(i), count=2)      # one arrival per consumer warpgroup
        mbarrier.init(vempty.index(i), count=2)
    fence_async_shared()

    qb64 = pid_m.to(gl.int64)
    idx_base = IDX + b64 * lut_sb + h64 * lut_sh + qb64 * lut_sm
    nt = gl.load(CNT + b64 * cnt_sb + h64 * cnt_sh + qb64 * cnt_sm) * (BLOCK // BLOCK_N)
    row0 = b * kv_rb + h * kv_rh
    col = h * kv_ch
    gl.warp_specialize([(_producer, (kd, vd, k_s, v_s, kready, vready, kempty, vempty, idx_base, lut_sk, nt, row0,
                                     col, BLOCK, BLOCK_N, NBUF)),
                        (_consumer, (0, q_s, k_s, v_s, kready, vready, kempty, vempty, idx_base, lut_sk, nt, O, LSE,
                                     ROWMAP, BIAS, GL, o_sb, o_sh, o_sl, b, h, pid_bh, pid_m, L, LK, qk_scale,
                                     bias_sb, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE, ACCUM)),
                        (_consumer, (1, q_s, k_s, v_s, kready, vready, kempty, vempty, idx_base, lut_sk, nt, O, LSE,
                                     ROWMAP, BIAS, GL, o_sb, o_sh, o_sl, b, h, pid_bh, pid_m, L, LK, qk_scale,
                                     bias_sb, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE, ACCUM))],
                       [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    for i in gl.static_range(NBUF):
        mbarrier.invalidate(kready.index(i))
        mbarrier.invalidate(vready.index(i))
        mbarrier.invalidate(kempty.index(i))
        mbarrier.invalidate(vempty.index(i))


def kv_view(x):
    """(2-D tensor, rows per batch, rows per head, columns per head) for a (B,H,L,D) tensor stored
    contiguously as (B,H,L,D) or (B,L,H,D); None for any other storage (the Triton kernel runs)."""
    B, H, L, D = x.shape
    if x.is_contiguous():
        return x.view(B * H * L, D), H * L, L, 0
    if x.permute(0, 2, 1, 3).is_contiguous():
        return x.permute(0, 2, 1, 3).reshape(B * L, H * D), L, 0, D
    return None


SMEM_LIMIT = 232448     # bytes of shared memory one sm90 program may opt into
SMEM_EXTRA = 16512      # beyond q's tile and the K/V ring: barriers and layout-conversion scratch (measured on an
                        # H200: D 128, BLOCK_N 128, 3 buffers asked for 245,888 bytes)


def smem_bytes(block: int, bn: int, d: int, nbuf: int, itemsize: int = 2) -> int:
    """Shared memory the kernel asks for: q's tile, NBUF K and V tiles, and SMEM_EXTRA."""
    return itemsize * d * (block + 2 * nbuf * bn) + SMEM_EXTRA


def usable(q, k, v, block: int, bn: int, nbuf: int) -> bool:
    """Whether this kernel can run the call: 16-bit q/k/v of one dtype, head dim 64 or 128, block 128 split
    into BLOCK_N steps, a K/V ring of nbuf buffers that fits in shared memory, k and v stored alike
    (kv_view)."""
    import torch
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] not in (64, 128) or block != 2 * HALF_ROWS or block % bn:
        return False
    if smem_bytes(block, bn, q.shape[-1], nbuf) > SMEM_LIMIT:
        return False
    kv, vv = kv_view(k), kv_view(v)
    return kv is not None and vv is not None and kv[1:] == vv[1:]


def launch(q, k, v, o, lse, idx, cnt, rowmap, bias, bias_sb, gate_logit, block, scale_log2, *, block_n: int,
           nbuf: int, accumulate: bool, consumer_regs: int = 232) -> None:
    """Run the kernel on a call that `usable` accepted.  o: the output (or the term to add to, `accumulate`)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, H, L, D = q.shape
    (k2, kv_rb, kv_rh, kv_ch), (v2, *_) = kv_view(k), kv_view(v)     # (usable: both stored alike)
    lay = gl.NVMMASharedLayout.get_default_for([block_n, D], _GL_DTYPES[k.dtype])
    descs = [TensorDescriptor.from_tensor(x2, [block_n, D], lay) for x2 in (k2, v2)]
    _sparse_fwd_gluon_ws[(triton.cdiv(L, block), B * H)](
        q, descs[0], descs[1], o, lse, idx, cnt, rowmap, bias if bias is not None else lse,
        gate_logit if gate_logit is not None else lse,
        *q.stride()[:3], *o.stride()[:3], *idx.stride(), *cnt.stride(),
        H, L, k.shape[2], kv_rb, kv_rh, kv_ch, scale_log2, bias_sb,
        BLOCK=block, BLOCK_N=block_n, D=D, NBUF=nbuf, HAS_BIAS=bias is not None, HAS_GATE=gate_logit is not None,
        ACCUM=accumulate, CONSUMER_REGS=consumer_regs, num_warps=4)


def _dtypes():
    import torch
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


_GL_DTYPES = _dtypes()
