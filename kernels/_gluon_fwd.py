"""Hopper (sm90) block-sparse attention forward for the inference path, written in Gluon.

The Triton kernel (_triton_kernels._sparse_fwd_kernel) runs each key step in order: the scores'
wgmma, a wait, the softmax, then the P.V wgmma.  While the softmax runs the tensor cores are idle, and
on the H200 that serial chain, not the MUFU exp2 or memory, bounds it (benchmarks/results/fwd_loop/).
Triton 3.6 cannot overlap the two on Hopper (``tl.range(warp_specialize=True)`` is Blackwell-only; a
software-pipelined loop in plain Triton still compiles to wgmma -> wait 0 -> softmax).  Gluon exposes
async wgmma and its waits, so this kernel pipelines the steps by hand:

    step t:  issue S(t+1) = Q K(t+1)^T      (async)
             softmax of S(t) -> P(t)        (runs while S(t+1) and P(t-1).V(t-1) are on the tensor cores)
             wait for both wgmma groups; rescale the accumulator
             refill the ring buffer step t-1 used (TMA, NBUF steps ahead)
             issue acc += P(t) V(t)         (async)

K and V tiles come through a ring of NBUF shared-memory buffers filled by TMA (one mbarrier per buffer
and operand), Q is gathered once through the row map into shared memory.  With num_warps = 8 each of
the two warpgroups owns 64 of the 128 query rows, so the scheduler can also interleave one
warpgroup's softmax with the other's wgmma.

Scope: the inference call (row map in, bias and gate, no centroid compensation), 16-bit q/k/v, head
dim 64 or 128, K/V in either (B,H,L,D)-contiguous or (B,L,H,D)-contiguous storage.  Anything else, and
any card or Triton without Gluon's Hopper API, runs the Triton kernel.  The LSE is written like the
Triton kernel's, so both are interchangeable.  Gluon has no CPU interpreter: the CPU tests compile this
kernel for sm90 (benchmarks/kernel_codegen.py's stand-in driver); its results are checked against the
Triton kernel and the plain-torch reference on the GPU (tests/test_kernels.py, GPU-only cases).
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _issue_kv(kd, vd, k_s, v_s, kbar, vbar, t, nt, start, row0, col, NBUF: gl.constexpr):
    """TMA loads of key step t (its K and V tiles, first key `start`) into ring buffer t % NBUF; no-op for t >= nt."""
    valid = t < nt
    s = t % NBUF
    mbarrier.expect(kbar.index(s), kd.block_type.nbytes, pred=valid)
    tma.async_copy_global_to_shared(kd, [row0 + start, col], kbar.index(s), k_s.index(s), pred=valid)
    mbarrier.expect(vbar.index(s), vd.block_type.nbytes, pred=valid)
    tma.async_copy_global_to_shared(vd, [row0 + start, col], vbar.index(s), v_s.index(s), pred=valid)


@gluon.jit
def _step_start(idx_base, sik, t, nt, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of step t (clamped to the last step, so it always reads a listed entry): BLOCK_N-key sub-tile
    t % (BLOCK/BLOCK_N) of listed block t // (BLOCK/BLOCK_N).  The loop loads these an iteration before it
    needs them, so the global load's latency is off its critical path."""
    SPLIT: gl.constexpr = BLOCK // BLOCK_N
    tc = gl.maximum(gl.minimum(t, nt - 1), 0)
    kb = gl.load(idx_base + (tc // SPLIT) * sik)
    return kb * BLOCK + (tc % SPLIT) * BLOCK_N


@gluon.jit
def _softmax(s, start, LK, qk_scale, m_i, l_i, offs_n, p_layout: gl.constexpr, dtype: gl.constexpr):
    """Online-softmax step over raw scores s of keys start + offs_n (keys >= LK masked): new max, sum,
    rescale factor of the accumulator and P as the wgmma A operand."""
    if start + s.shape[1] > LK:
        s = gl.where((start + offs_n < LK)[None, :], s, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return m_new, l_i, alpha, gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _sparse_fwd_gluon(Q, kd, vd, O, LSE, IDX, CNT, ROWMAP, BIAS, GL,
                      q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, lut_sb, lut_sh, lut_sm, lut_sk, cnt_sb, cnt_sh, cnt_sm,
                      H, L, LK, kv_rb, kv_rh, kv_ch, qk_scale, bias_sb,
                      BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                      NBUF: gl.constexpr, PIPELINE: gl.constexpr,
                      HAS_BIAS: gl.constexpr, HAS_GATE: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = kd.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    TPW_D: gl.constexpr = D // 8
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [num_warps, 1], [1, 0])
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)

    # Q rows through the row map into shared memory (the A operand of every score wgmma)
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    row_ok = offs_m < L
    rows = gl.load(ROWMAP + offs_m, mask=row_ok, other=0).to(gl.int64)
    q = gl.load(Q + b64 * q_sb + h64 * q_sh + rows[:, None] * q_sl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_smem_layout, q)

    k_s = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], kd.layout)
    v_s = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], vd.layout)
    kbar = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    vbar = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NBUF):
        mbarrier.init(kbar.index(i), count=1)
        mbarrier.init(vbar.index(i), count=1)
    fence_async_shared()

    qb64 = (pid_m // (BLOCK // BLOCK_M)).to(gl.int64)      # the query block whose key list this program walks
    idx_base = IDX + b64 * lut_sb + h64 * lut_sh + qb64 * lut_sm
    n = gl.load(CNT + b64 * cnt_sb + h64 * cnt_sh + qb64 * cnt_sm)
    nt = n * (BLOCK // BLOCK_N)
    row0 = b * kv_rb + h * kv_rh
    col = h * kv_ch

    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    if nt > 0:
        for i in gl.static_range(NBUF - 1):
            _issue_kv(kd, vd, k_s, v_s, kbar, vbar, i, nt, _step_start(idx_base, lut_sk, i, nt, BLOCK, BLOCK_N),
                      row0, col, NBUF)
        # first keys of steps t and t+1 and of the step refilled in iteration t (t + NBUF - 1), loaded ahead
        st_cur = _step_start(idx_base, lut_sk, 0, nt, BLOCK, BLOCK_N)
        st_nxt = _step_start(idx_base, lut_sk, 1, nt, BLOCK, BLOCK_N)
        st_iss = _step_start(idx_base, lut_sk, NBUF - 1, nt, BLOCK, BLOCK_N)
        mbarrier.wait(kbar.index(0), 0)
        s_tok = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(0, deps=(s_tok, ))
        acc = warpgroup_mma_init(acc)
        for t in range(nt - 1 if PIPELINE else 0):
            st_nn = _step_start(idx_base, lut_sk, t + 2, nt, BLOCK, BLOCK_N)
            st_iss_nn = _step_start(idx_base, lut_sk, t + NBUF, nt, BLOCK, BLOCK_N)
            t1 = t + 1
            b1 = t1 % NBUF
            mbarrier.wait(kbar.index(b1), (t1 // NBUF) & 1)
            s_tok = warpgroup_mma(q_s, k_s.index(b1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            m_i, l_i, alpha, p = _softmax(s_cur, st_cur, LK, qk_scale, m_i, l_i, offs_n, p_layout, dtype)
            s_cur, acc = warpgroup_mma_wait(0, deps=(s_tok, acc))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            # the buffer of step t-1 is free now (its P.V finished in the wait above)
            _issue_kv(kd, vd, k_s, v_s, kbar, vbar, t + NBUF - 1, nt, st_iss, row0, col, NBUF)
            bt = t % NBUF
            mbarrier.wait(vbar.index(bt), (t // NBUF) & 1)
            acc = warpgroup_mma(p, v_s.index(bt), acc, is_async=True)
            st_cur = st_nxt
            st_nxt = st_nn
            st_iss = st_iss_nn
        if not PIPELINE:
            # Triton's order (diagnostic): scores, wait, softmax, P.V; K/V refilled one step ahead
            for t in range(nt - 1):
                st_nn = _step_start(idx_base, lut_sk, t + 2, nt, BLOCK, BLOCK_N)
                st_iss_nn = _step_start(idx_base, lut_sk, t + NBUF, nt, BLOCK, BLOCK_N)
                m_i, l_i, alpha, p = _softmax(s_cur, st_cur, LK, qk_scale, m_i, l_i, offs_n, p_layout, dtype)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                _issue_kv(kd, vd, k_s, v_s, kbar, vbar, t + NBUF - 1, nt, st_iss, row0, col, NBUF)
                bt = t % NBUF
                mbarrier.wait(vbar.index(bt), (t // NBUF) & 1)
                acc = warpgroup_mma(p, v_s.index(bt), acc, is_async=True)
                t1 = t + 1
                b1 = t1 % NBUF
                mbarrier.wait(kbar.index(b1), (t1 // NBUF) & 1)
                s_tok = warpgroup_mma(q_s, k_s.index(b1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s_cur, acc = warpgroup_mma_wait(0, deps=(s_tok, acc))
                acc = warpgroup_mma_init(acc)
                st_cur = st_nxt
                st_nxt = st_nn
                st_iss = st_iss_nn
        t = nt - 1
        m_i, l_i, alpha, p = _softmax(s_cur, st_cur, LK, qk_scale, m_i, l_i, offs_n, p_layout, dtype)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        bt = t % NBUF
        mbarrier.wait(vbar.index(bt), (t // NBUF) & 1)
        acc = warpgroup_mma(p, v_s.index(bt), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
    for i in gl.static_range(NBUF):
        mbarrier.invalidate(kbar.index(i))
        mbarrier.invalidate(vbar.index(i))

    # epilogue: normalise, LSE (natural log, -inf for rows with no key), bias x gate, store through the row map
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, -float("inf"), (m_i + gl.log2(l_safe)) * _LN2)
    o = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    o = gl.convert_layout(o, io_layout)
    if HAS_BIAS:
        bias_row = gl.load(BIAS + b64 * bias_sb + h64 * D + offs_d).to(gl.float32)
        if HAS_GATE:
            bias_row = bias_row / (1.0 + gl.exp(-gl.load(GL + b)))
        o = o + bias_row[None, :]
    gl.store(O + b64 * o_sb + h64 * o_sh + rows[:, None] * o_sl + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = gl.convert_layout(lse, gl.SliceLayout(1, io_layout))
    gl.store(LSE + pid_bh.to(gl.int64) * L + offs_m, lse, mask=row_ok)


def kv_view(x):
    """(2-D tensor, rows per batch, rows per head, columns per head) for a (B,H,L,D) tensor stored
    contiguously as (B,H,L,D) or (B,L,H,D); None for any other storage (the Triton kernel runs)."""
    B, H, L, D = x.shape
    if x.is_contiguous():
        return x.view(B * H * L, D), H * L, L, 0
    if x.permute(0, 2, 1, 3).is_contiguous():
        return x.permute(0, 2, 1, 3).reshape(B * L, H * D), L, 0, D
    return None


def launch(q, k, v, o, lse, idx, cnt, rowmap, bias, bias_sb, gate_logit, block, scale_log2, *,
           rows: int, block_n: int, nbuf: int, num_warps: int, pipeline: bool = True) -> None:
    """Run the kernel (the caller checked _triton_ops._gluon_ok).  nbuf >= 3: step t+1's tiles must be in flight
    before step t-1's buffer is freed."""
    if nbuf < (3 if pipeline else 2):
        raise ValueError(f"the Gluon forward needs a ring of >= 3 K/V buffers (fwd config num_stages), got {nbuf}")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, H, L, D = q.shape
    LK = k.shape[2]
    descs = []
    for x in (k, v):
        x2, rb, rh, ch = kv_view(x)
        lay = gl.NVMMASharedLayout.get_default_for([block_n, D], _GL_DTYPES[x.dtype])
        descs.append(TensorDescriptor.from_tensor(x2, [block_n, D], lay))
    _, kv_rb, kv_rh, kv_ch = kv_view(k)
    if block % rows or rows % (16 * num_warps):
        raise ValueError(f"the Gluon forward needs rows per program ({rows}) dividing the block ({block}) and a "
                         f"multiple of 16 x num_warps ({num_warps})")
    _sparse_fwd_gluon[(triton.cdiv(L, rows), B * H)](
        q, descs[0], descs[1], o, lse, idx, cnt, rowmap, bias if bias is not None else lse,
        gate_logit if gate_logit is not None else lse,
        *q.stride()[:3], *o.stride()[:3], *idx.stride(), *cnt.stride(),
        H, L, LK, kv_rb, kv_rh, kv_ch, scale_log2, bias_sb,
        BLOCK=block, BLOCK_M=rows, BLOCK_N=block_n, D=D, NBUF=nbuf, PIPELINE=pipeline, HAS_BIAS=bias is not None,
        HAS_GATE=gate_logit is not None, num_warps=num_warps)


def _dtypes():
    import torch
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


_GL_DTYPES = _dtypes()
