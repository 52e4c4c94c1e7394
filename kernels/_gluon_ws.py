"""Hopper (sm90) block-sparse attention forward with explicit warp specialisation, written in Gluon.
EXPERIMENTAL and off by default (fwd config key GLUON_WS, values in MODES): correct on an H200, but not faster than
the Triton kernel, so the tuned table never picks it (benchmarks/results/wave9/, 2026-11-29).

Why it was built: the Triton kernel (_triton_kernels._sparse_fwd_kernel) keeps the H200's tensor pipe 55% busy; a
quarter of its stall samples wait at the block-wide barriers before each TMA refill and another quarter on the
wgmma results (benchmarks/results/wave6/).  FlashAttention-3 removes both with warp specialisation.  Triton 3.6's
automatic pass did not work on this kernel (128-row programs stalled, 64-row ones ran at half speed, 3 stages gave
NaNs; benchmarks/results/wave8/), so this kernel states the partitions itself.  A producer walks the query block's
key list and issues the TMA loads of each step's K and V tile into a ring of NBUF buffers (mbarriers `kready` /
`vready`), refilling a buffer once every consumer released it (`kempty` / `vempty`).  The consumers compute per
step the scores (async wgmma, q from shared memory), the online softmax and P.V (async wgmma, P from registers),
releasing each buffer as soon as their wgmma has read it.  Partitionings (MODES):

- 1: the producer is the default partition (4 warps); two 4-warp consumer partitions of 64 rows each share every
  K/V tile and never wait for each other, so one warpgroup's softmax can run under the other's wgmma.  Each step
  in order (_walk_serial): the overlapped walk is serialised by ptxas here (C7512), because Triton 3.6 runs worker
  partitions inside a switch loop entered at 120 registers.
- 2: one 8-warp consumer partition of all 128 rows is the default partition, the producer a 1-warp worker; each
  step in order.
- 3: as 2 with FlashAttention-3's intra-warpgroup overlap (_walk_overlap): step t+1's scores are issued before
  step t's P.V and step t+1's softmax runs under it.
- 4 (asym): the consumer of rows 0-63 with the overlapped walk is the default partition (4 warps, outside the
  switch loop, so ptxas keeps its wgmmas in flight); the consumer of rows 64-127 (steps in order) and a 1-warp
  producer are workers.

Measured on an H200 (Triton 3.6), kernel time vs the table's Triton kernel at Wan 1.3B/14B 480p and 480x480,
90/95%: mode 1 0.73-1.06x (best with 128-key steps: 1.00-1.05x at 90% on the 480p shapes, 0.73-0.87x at
480x480 95%), mode 2 0.77-0.82x, mode 3 0.74-0.96x, mode 4 0.79-1.04x (no better than mode 1 in the same call).
Mode 3 gains 8-12% over mode 2 (not at 480x480 95%), but Gluon syncs the whole 8-warp partition (bar.sync over
256 threads) at each mbarrier operation, so its two warpgroups run in lockstep and one's softmax cannot hide
under the other's wgmma.  Whole 1.3B 480p forwards, table vs Gluon in the same calls: table 2.13-2.16x dense,
mode 1 2.11x, mode 3 2.05-2.08x, mode 4 2.08-2.11x.

Each consumer's `mbarrier.arrive` is preceded by Gluon's own partition-wide sync, so a buffer is released only
after every thread of that partition finished its wgmma on it.

Scope: the inference call (row map in, bias and gate, accumulate_into; no centroid compensation), 16-bit q/k/v,
head dim 64 or 128, block 128 and BLOCK_N dividing it, K/V in (B,H,L,D)- or (B,L,H,D)-contiguous storage, a K/V
ring that fits in shared memory (smem_bytes).  Anything else runs the Triton kernel.  The LSE is written like the
Triton kernel's.  Gluon has no CPU interpreter: the CPU tests compile it for sm90 (benchmarks/kernel_codegen.py);
its results are checked against the plain-torch reference on the GPU only (tests/test_kernels.py, every mode).
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
def _softmax_step(sc, m_i, l_i, start, LK, offs_n, qk_scale, BLOCK_N: gl.constexpr):
    """Online softmax of one step's scores: (p, alpha, m_i, l_i); keys past LK (the last, partial block) out."""
    if start + BLOCK_N > LK:
        sc = gl.where((start + offs_n < LK)[None, :], sc, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(sc * qk_scale - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _scores(q_h, k_s, kready, t, s_zero, NBUF: gl.constexpr):
    """Issue step t's scores (async wgmma on K buffer t % NBUF, once loaded): the token to wait on."""
    mbarrier.wait(kready.index(t % NBUF), (t // NBUF) & 1)
    return warpgroup_mma(q_h, k_s.index(t % NBUF).permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _walk_serial(q_h, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt, LK, qk_scale, m_i, l_i, acc,
                 s_zero, offs_n, o_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK: gl.constexpr,
                 BLOCK_N: gl.constexpr, NBUF: gl.constexpr):
    """The key walk, each step in order: scores, wait, softmax, P.V, wait."""
    for t in range(nt):
        s = t % NBUF
        sc, _ = warpgroup_mma_wait(0, deps=(_scores(q_h, k_s, kready, t, s_zero, NBUF), k_s.index(s)))
        mbarrier.arrive(kempty.index(s), count=1)
        p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, _step_start(idx_base, sik, t, BLOCK, BLOCK_N), LK, offs_n,
                                           qk_scale, BLOCK_N)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(vready.index(s), (t // NBUF) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(k_s.dtype), p_layout), v_s.index(s), warpgroup_mma_init(acc),
                            is_async=True)
        acc, _ = warpgroup_mma_wait(0, deps=(acc, v_s.index(s)))
        mbarrier.arrive(vempty.index(s), count=1)
    return m_i, l_i, acc


@gluon.jit
def _live_until_here(x):
    """No instruction: an opaque statement that takes x and gives it back in the same registers, so ptxas keeps x's
    registers for x up to this point.  Used on the P operand of a P.V wgmma after the wait that retires it, so no
    later value can take those registers while the wgmma still reads them.  (A precaution: modes 3 and 4 also
    compile without C7512 when it and the register donation below are removed; the measured kernels had both.)"""
    return gl.inline_asm_elementwise("", "=r,0", [x], dtype=x.dtype, is_pure=False, pack=2)


@gluon.jit
def _walk_overlap(q_h, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt, LK, qk_scale, m_i, l_i, acc,
                  s_zero, offs_n, o_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK: gl.constexpr,
                  BLOCK_N: gl.constexpr, NBUF: gl.constexpr):
    """The key walk with FlashAttention-3's intra-warpgroup overlap: step t+1's scores are issued before step t's
    P.V, and step t+1's softmax runs while that P.V is in flight; the accumulator is rescaled once it retired.
    Register precautions for ptxas: each scores wgmma (use_acc=False) writes into the registers of the fp32 P tile
    that just died, and each P operand stays live until its P.V has retired (_live_until_here)."""
    acc = warpgroup_mma_init(acc)
    p16 = gl.zeros(s_zero.shape, k_s.dtype, p_layout)
    if nt > 0:
        sc, _ = warpgroup_mma_wait(0, deps=(_scores(q_h, k_s, kready, 0, s_zero, NBUF), k_s.index(0)))
        mbarrier.arrive(kempty.index(0), count=1)
        for t in range(nt):
            s = t % NBUF
            prev = (t + NBUF - 1) % NBUF
            p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, _step_start(idx_base, sik, t, BLOCK, BLOCK_N), LK,
                                               offs_n, qk_scale, BLOCK_N)
            acc, _, p = warpgroup_mma_wait(0, deps=(acc, v_s.index(prev), p))     # step t-1's P.V retired
            p16 = _live_until_here(p16)
            mbarrier.arrive(vempty.index(prev), count=1, pred=t > 0)
            acc = warpgroup_mma_init(acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None])
            p16 = gl.convert_layout(p.to(k_s.dtype), p_layout)
            # step t+1's scores (on the last step: a repeat of step t's buffer, never used, so the loop has no
            # branch around its wgmmas; its buffer is released only by the real step that loads it)
            nx = gl.minimum(t + 1, nt - 1)
            mbarrier.wait(kready.index(nx % NBUF), (nx // NBUF) & 1, pred=t + 1 < nt)
            tok = warpgroup_mma(q_h, k_s.index(nx % NBUF).permute((1, 0)), p, use_acc=False, is_async=True)
            mbarrier.wait(vready.index(s), (t // NBUF) & 1)
            acc = warpgroup_mma(p16, v_s.index(s), acc, is_async=True)
            sc, _ = warpgroup_mma_wait(1, deps=(tok, k_s.index(nx % NBUF)))      # the scores, issued first
            mbarrier.arrive(kempty.index(nx % NBUF), count=1, pred=t + 1 < nt)
    acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
    return m_i, l_i, acc


@gluon.jit
def _consumer(ROW0: gl.constexpr, ROWS: gl.constexpr, OVERLAP: gl.constexpr, ring, io,
              BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr,
              HAS_BIAS: gl.constexpr, HAS_GATE: gl.constexpr, ACCUM: gl.constexpr):
    """Rows ROW0 .. ROW0+ROWS of query block pid_m (64 rows per warpgroup of the partition): the key walk and the
    epilogue.  ring: the shared tiles, their barriers and the key list; io: the outputs and per-program values
    (the same two tuples for every consumer partition)."""
    q_s, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt = ring
    O, LSE, ROWMAP, BIAS, GL, o_sb, o_sh, o_sl, b, h, pid_bh, pid_m, L, LK, qk_scale, bias_sb = io
    NW: gl.constexpr = ROWS // 16        # the warps of this partition: one warpgroup per 64 rows
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    TPW_D: gl.constexpr = D // 8
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [NW, 1], [1, 0])
    q_h = q_s.slice(ROW0, ROWS)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([ROWS], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    if OVERLAP:
        m_i, l_i, acc = _walk_overlap(q_h, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt, LK, qk_scale,
                                      m_i, l_i, acc, s_zero, offs_n, o_layout, p_layout, BLOCK, BLOCK_N, NBUF)
    else:
        m_i, l_i, acc = _walk_serial(q_h, k_s, v_s, kready, vready, kempty, vempty, idx_base, sik, nt, LK, qk_scale,
                                     m_i, l_i, acc, s_zero, offs_n, o_layout, p_layout, BLOCK, BLOCK_N, NBUF)

    # epilogue: normalise, LSE (natural log, -inf for rows with no key), bias x gate, store through the row map
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, -float("inf"), (m_i + gl.log2(l_safe)) * _LN2)
    o = gl.convert_layout(acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None], io_layout)
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    offs_m = pid_m * BLOCK + ROW0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
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
                         OVERLAP: gl.constexpr, SPLIT: gl.constexpr, ASYM: gl.constexpr, WORKER_REGS: gl.constexpr,
                         num_warps: gl.constexpr):
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
        mbarrier.init(kempty.index(i), count=1 + SPLIT)      # one arrival per consumer partition
        mbarrier.init(vempty.index(i), count=1 + SPLIT)
    fence_async_shared()

    qb64 = pid_m.to(gl.int64)
    idx_base = IDX + b64 * lut_sb + h64 * lut_sh + qb64 * lut_sm
    nt = gl.load(CNT + b64 * cnt_sb + h64 * cnt_sh + qb64 * cnt_sm) * (BLOCK // BLOCK_N)
    row0 = b * kv_rb + h * kv_rh
    col = h * kv_ch
    prod = (kd, vd, k_s, v_s, kready, vready, kempty, vempty, idx_base, lut_sk, nt, row0, col, BLOCK, BLOCK_N, NBUF)
    ring = (q_s, k_s, v_s, kready, vready, kempty, vempty, idx_base, lut_sk, nt)
    io = (O, LSE, ROWMAP, BIAS, GL, o_sb, o_sh, o_sl, b, h, pid_bh, pid_m, L, LK, qk_scale, bias_sb)
    if ASYM:        # consumer of rows 0-63 (overlapped walk) as the default partition (4 warps), consumer of rows
        # 64-127 (steps in order) and a 1-warp producer as workers
        gl.warp_specialize([(_consumer, (0, HALF, OVERLAP, ring, io, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE,
                                         ACCUM)),
                            (_consumer, (HALF, HALF, False, ring, io, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE,
                                         ACCUM)),
                            (_producer, prod)], [4, 1], [WORKER_REGS, 40])
    elif SPLIT:     # the producer is the default partition (4 warps), two 4-warp consumer partitions of 64 rows
        gl.warp_specialize([(_producer, prod),
                            (_consumer, (0, HALF, OVERLAP, ring, io, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE,
                                         ACCUM)),
                            (_consumer, (HALF, HALF, OVERLAP, ring, io, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE,
                                         ACCUM))],
                           [4, 4], [WORKER_REGS, WORKER_REGS])
    else:           # one consumer of all BLOCK rows is the default partition (8 warps), a 1-warp producer
        gl.warp_specialize([(_consumer, (0, BLOCK, OVERLAP, ring, io, BLOCK, BLOCK_N, D, NBUF, HAS_BIAS, HAS_GATE,
                                         ACCUM)),
                            (_producer, prod)], [1], [WORKER_REGS])
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

# fwd config key GLUON_WS -> partitioning and walk (see the module docstring)
MODES = {1: dict(split=True, asym=False, overlap=False), 2: dict(split=False, asym=False, overlap=False),
         3: dict(split=False, asym=False, overlap=True), 4: dict(split=True, asym=True, overlap=True)}


def smem_bytes(block: int, bn: int, d: int, nbuf: int, split: bool = True, itemsize: int = 2) -> int:
    """Shared memory the kernel asks for: q's tile, NBUF K and V tiles, the epilogue's layout-conversion scratch
    (one consumer partition's rows x D) and 256 bytes for barriers (checked against the compiler's count for
    D 64/128, BLOCK_N 64/128, 2-4 buffers, both partitionings; an H200 refused 245,888 bytes)."""
    return itemsize * d * (block + 2 * nbuf * bn) + itemsize * d * (block // 2 if split else block) + 256


def usable(q, k, v, block: int, bn: int, nbuf: int, split: bool = True) -> bool:
    """Whether this kernel can run the call: 16-bit q/k/v of one dtype, head dim 64 or 128, block 128 split
    into BLOCK_N steps, a K/V ring of nbuf buffers that fits in shared memory, k and v stored alike
    (kv_view)."""
    import torch
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] not in (64, 128) or block != 2 * HALF_ROWS or block % bn:
        return False
    if smem_bytes(block, bn, q.shape[-1], nbuf, split) > SMEM_LIMIT:
        return False
    kv, vv = kv_view(k), kv_view(v)
    return kv is not None and vv is not None and kv[1:] == vv[1:]


def launch(q, k, v, o, lse, idx, cnt, rowmap, bias, bias_sb, gate_logit, block, scale_log2, *, block_n: int,
           nbuf: int, accumulate: bool, overlap: bool = False, split: bool = True, asym: bool = False) -> None:
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
        ACCUM=accumulate, OVERLAP=overlap, SPLIT=split, ASYM=asym, WORKER_REGS=232 if split else 40,
        num_warps=4 if split or asym else 8)


def _dtypes():
    import torch
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


_GL_DTYPES = _dtypes()
