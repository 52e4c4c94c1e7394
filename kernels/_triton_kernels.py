"""Triton kernels (imported lazily by kernels._triton_ops; imports triton at module load).

Conventions: tensors are addressed with explicit (b, h, l) strides and unit stride on D, so
permuted (B,L,H,D) buffers work without copies.  Block lists: idx (B,H,nq,kmax) int32 with
arbitrary strides (stride 0 allowed), cnt (B,H,nq) int32.  exp2 domain with log2(e) folded into
the softmax scale.  Grid axis 0 = block within a head (fastest), axis 1 = b*H + h, so one head's
K/V stay L2-resident while its query blocks run.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _pool_kernel(X, OUT, ROWMAP, sxb, sxh, sxl, H, L, NB,
                 BLOCK: tl.constexpr, D: tl.constexpr, GATHER: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_l = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    rows = offs_l
    if GATHER:  # pool block pid_n of the row order ROWMAP (tile position -> row of X)
        rows = tl.load(ROWMAP + offs_l, mask=offs_l < L, other=0)
    x = tl.load(base + rows[:, None].to(tl.int64) * sxl + offs_d[None, :],
                mask=offs_l[:, None] < L, other=0.0).to(tl.float32)
    n_valid = tl.minimum(L - pid_n * BLOCK, BLOCK).to(tl.float32)
    s = tl.sum(x, axis=0) / n_valid
    tl.store(OUT + (pid_bh.to(tl.int64) * NB + pid_n) * D + offs_d, s)


@triton.jit
def _linear_q_side(q, SH, SLO, ZL, pid_bh, eps, D: tl.constexpr, LP: tl.constexpr):
    """relu(q) S / (relu(q).z + eps) for one tile.  LP: S is given as hi + lo parts in q's 16-bit
    dtype (two tensor-core dots, ~fp32 accuracy); else S is fp32 (fp32 dot)."""
    offs_d = tl.arange(0, D)
    s_off = pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :]
    z = tl.load(ZL + pid_bh.to(tl.int64) * D + offs_d)
    if LP:
        pq = tl.maximum(q, 0.0).to(q.dtype)
        num = tl.dot(pq, tl.load(SH + s_off))
        num = tl.dot(pq, tl.load(SLO + s_off), num)
        pqf = pq.to(tl.float32)
    else:
        pqf = tl.maximum(q.to(tl.float32), 0.0)
        num = tl.dot(pqf, tl.load(SH + s_off))
    den = tl.sum(pqf * z[None, :], 1) + eps
    return num / den[:, None]



@triton.jit
def _load_q(q_base, sql, ROWMAP, offs_m, offs_d, L, GATHER_Q: tl.constexpr):
    """The query tile: rows offs_m, or rows ROWMAP[offs_m] of Q when GATHER_Q (zero past L)."""
    rows = offs_m
    if GATHER_Q:
        rows = tl.load(ROWMAP + offs_m, mask=offs_m < L, other=0)
    return tl.load(q_base + rows[:, None].to(tl.int64) * sql + offs_d[None, :], mask=offs_m[:, None] < L, other=0.0)


@triton.jit
def _fwd_epilogue(acc, l_i, m_i, q, O, LSE, SL, SLO, ZL, OL, sob, soh, sol, b64, h64, pid_bh, offs_m, offs_d,
                  L, eps, ROWMAP, BIAS, sbb, D: tl.constexpr, FUSE_LINEAR: tl.constexpr, LP: tl.constexpr,
                  SCATTER_O: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Normalise, store O (any (b,h,l) strides; OL shares them) and the natural-log LSE (contiguous).
    SCATTER_O: row r of the tile is stored at row ROWMAP[r] of O (back to the caller's token order).
    HAS_BIAS: add BIAS[b, h*D:(h+1)*D] (fp32) to O."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, -float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < L
    if HAS_BIAS:
        o = o + tl.load(BIAS + b64 * sbb + h64 * D + offs_d)[None, :]
    rows = offs_m
    if SCATTER_O:
        rows = tl.load(ROWMAP + offs_m, mask=row_ok, other=0)
    out_off = b64 * sob + h64 * soh + rows[:, None].to(tl.int64) * sol + offs_d[None, :]
    tl.store(O + out_off, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)
    if FUSE_LINEAR:
        ol = _linear_q_side(q, SL, SLO, ZL, pid_bh, eps, D, LP)
        tl.store(OL + out_off, ol.to(OL.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _lut_row(IDX, CNT, b64, h64, pid_m, sib, sih, sim, scb, sch, scm):
    """Start of query block pid_m's key-block list and its count."""
    idx_base = IDX + b64 * sib + h64 * sih + pid_m.to(tl.int64) * sim
    n = tl.load(CNT + b64 * scb + h64 * sch + pid_m.to(tl.int64) * scm)
    return idx_base, n


@triton.jit
def _kv_tile(desc, base, b, h, start, offs_n64, stride, kmask, offs_d,
             BLOCK_N: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    """BLOCK_N key/value rows from row `start`: a TMA descriptor load, or masked strided loads."""
    if USE_TMA:
        return desc.load([b, h, start, 0]).reshape(BLOCK_N, D)
    return tl.load(base + offs_n64[:, None] * stride + offs_d[None, :], mask=kmask[:, None], other=0.0)


@triton.jit
def _sparse_fwd_kernel(Q, K, V, O, LSE, IDX, CNT, q_desc, k_desc, v_desc,
                       SL, SLO, ZL, OL, ROWMAP, BIAS, sbb,
                       sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                       sib, sih, sim, sik, scb, sch, scm,
                       H, L, LK, qk_scale, eps,
                       KM, VM, NK,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                       D: tl.constexpr, FUSE_LINEAR: tl.constexpr, LP: tl.constexpr, NUM_STAGES: tl.constexpr,
                       USE_TMA: tl.constexpr, GATHER_Q: tl.constexpr, SCATTER_O: tl.constexpr,
                       HAS_BIAS: tl.constexpr, COMPENSATE: tl.constexpr = False,
                       BLOCK_C: tl.constexpr = 16, KMAXP: tl.constexpr = 16):
    """Online-softmax attention of one query block over its listed key blocks.  USE_TMA: Q/K/V come
    through 4-D host tensor descriptors (B, H, L, D) with block [1, 1, rows, D] (rows past L are
    zero-filled by the TMA unit); otherwise plain strided loads.  GATHER_Q reads q rows through
    ROWMAP with plain loads (TMA has no row gather on sm90).
    COMPENSATE: after the listed blocks, every key block NOT listed adds one pseudo-token to the same
    online softmax: key KM[bh, j] / value VM[bh, j] (fp32 block means, (B*H, NK, D) contiguous) and
    logit scale * q.kbar_j + log(n_j) (n_j valid keys of block j), in BLOCK_C centroids per step;
    listed blocks are recognised by comparing with the LUT row (KMAXP >= kmax entries)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    if USE_TMA and not GATHER_Q:
        q = q_desc.load([b, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, D)
    else:
        q = _load_q(Q + b64 * sqb + h64 * sqh, sql, ROWMAP, offs_m, offs_d, L, GATHER_Q)
    idx_base, n = _lut_row(IDX, CNT, b64, h64, pid_m, sib, sih, sim, scb, sch, scm)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t in tl.range(0, n * SPLIT, num_stages=NUM_STAGES):
        j = t // SPLIT
        sub = t % SPLIT
        kb = tl.load(idx_base + j * sik)
        start = kb * (BLOCK_N * SPLIT) + sub * BLOCK_N
        offs_n = start + offs_n0
        kmask = offs_n < LK
        offs_n64 = offs_n.to(tl.int64)
        k = _kv_tile(k_desc, k_base, b, h, start, offs_n64, skl, kmask, offs_d, BLOCK_N, D, USE_TMA)
        # scale and tail mask in one FMA: bias is 0 for valid keys, -inf past LK
        bias = tl.where(kmask, 0.0, -float("inf"))
        qk = tl.dot(q, tl.trans(k)) * qk_scale + bias[None, :]
        # every listed block (0 <= kb < nk) has >= 1 valid key, so m_new is finite after the
        # first iteration and needs no -inf guard
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _kv_tile(v_desc, v_base, b, h, start, offs_n64, svl, kmask, offs_d, BLOCK_N, D, USE_TMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if COMPENSATE:
        # m_i is finite here (cnt >= 1 listed block with >= 1 valid key)
        offs_k = tl.arange(0, KMAXP)
        lut = tl.load(idx_base + offs_k * sik, mask=offs_k < n, other=-1)
        c_base = pid_bh.to(tl.int64) * NK * D
        KB: tl.constexpr = BLOCK_N * SPLIT
        for c0 in range(0, NK, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < NK
            listed = tl.sum((offs_c[:, None] == lut[None, :]).to(tl.int32), 1)
            skip = c_ok & (listed == 0)
            n_c = tl.minimum(LK - offs_c * KB, KB)
            log2n = tl.log2(tl.maximum(n_c, 1).to(tl.float32))
            cbias = tl.where(skip, log2n, -float("inf"))
            c_off = c_base + offs_c[:, None].to(tl.int64) * D + offs_d[None, :]
            km = tl.load(KM + c_off, mask=c_ok[:, None], other=0.0).to(q.dtype)
            qk = tl.dot(q, tl.trans(km)) * qk_scale + cbias[None, :]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vm = tl.load(VM + c_off, mask=c_ok[:, None], other=0.0).to(V.dtype.element_ty)
            acc = acc * alpha[:, None] + tl.dot(p.to(vm.dtype), vm)
            m_i = m_new
    _fwd_epilogue(acc, l_i, m_i, q, O, LSE, SL, SLO, ZL, OL, sob, soh, sol, b64, h64, pid_bh, offs_m, offs_d,
                  L, eps, ROWMAP, BIAS, sbb, D, FUSE_LINEAR, LP, SCATTER_O, HAS_BIAS)


@triton.jit
def _linear_state_kernel(K, V, SP, ZP, skb, skh, skl, svb, svh, svl,
                         H, LK, CHUNK, NSPLIT, INV_C,
                         BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Partial S = relu(K)^T V and z = sum relu(K) over rows [split*CHUNK, (split+1)*CHUNK)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    s_acc = tl.zeros([D, D], tl.float32)
    z_acc = tl.zeros([D], tl.float32)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, LK)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        msk = offs_n < end
        offs_n64 = offs_n.to(tl.int64)
        k = tl.load(k_base + offs_n64[:, None] * skl + offs_d[None, :], mask=msk[:, None], other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * svl + offs_d[None, :], mask=msk[:, None], other=0.0)
        pk = tl.maximum(k, 0.0).to(v.dtype)
        s_acc += tl.dot(tl.trans(pk), v)
        z_acc += tl.sum(pk.to(tl.float32), 0)
    out = pid_bh.to(tl.int64) * NSPLIT + pid_s
    tl.store(SP + out * D * D + offs_d[:, None] * D + offs_d[None, :], s_acc * INV_C)
    tl.store(ZP + out * D + offs_d, z_acc * INV_C)


@triton.jit
def _linear_apply_kernel(Q, SH, SLO, ZL, OL, sqb, sqh, sql, sob, soh, sol, H, L, CHUNK, eps,
                         BLOCK_M: tl.constexpr, D: tl.constexpr, LP: tl.constexpr):
    """o = relu(q) S / (relu(q).z + eps) for rows [pid*CHUNK, (pid+1)*CHUNK); S loaded once."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    s_off = pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :]
    sh = tl.load(SH + s_off)
    if LP:
        slo = tl.load(SLO + s_off)
    z = tl.load(ZL + pid_bh.to(tl.int64) * D + offs_d)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for m0 in tl.range(start, end, BLOCK_M):
        offs_m = m0 + offs_m0
        row_ok = offs_m < end
        offs_m64 = offs_m.to(tl.int64)
        q = tl.load(q_base + offs_m64[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if LP:
            pq = tl.maximum(q, 0.0).to(q.dtype)
            num = tl.dot(pq, sh)
            num = tl.dot(pq, slo, num)
            pqf = pq.to(tl.float32)
        else:
            pqf = tl.maximum(q.to(tl.float32), 0.0)
            num = tl.dot(pqf, sh)
        den = tl.sum(pqf * z[None, :], 1) + eps
        ol = num / den[:, None]
        tl.store(OL + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m64[:, None] * sol + offs_d[None, :],
                 ol.to(OL.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _linear_bwd_q_kernel(Q, SH, SLO, ZL, DO, DQ, DSP, DZP,
                         sqb, sqh, sql, sdb, sdh, sdl,
                         H, L, CHUNK, NSPLIT, eps,
                         BLOCK_M: tl.constexpr, D: tl.constexpr, LP: tl.constexpr, ACCUM: tl.constexpr):
    """Per split of L: dq rows (ACCUM: added to the dq already in DQ), partial dS = relu(q)^T (do/den), partial dz = sum dden * relu(q).
    LP: 16-bit operands (S as hi+lo, do/den rounded to q's dtype) on tensor cores; else fp32."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    s_off = pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :]
    sT_off = pid_bh.to(tl.int64) * D * D + offs_d[None, :] * D + offs_d[:, None]
    sh = tl.load(SH + s_off)
    shT = tl.load(SH + sT_off)
    if LP:
        slo = tl.load(SLO + s_off)
        sloT = tl.load(SLO + sT_off)
    z = tl.load(ZL + pid_bh.to(tl.int64) * D + offs_d)
    ds_acc = tl.zeros([D, D], tl.float32)
    dz_acc = tl.zeros([D], tl.float32)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for m0 in tl.range(start, end, BLOCK_M):
        offs_m = m0 + offs_m0
        msk = offs_m < end
        offs_m64 = offs_m.to(tl.int64)
        q = tl.load(q_base + offs_m64[:, None] * sql + offs_d[None, :], mask=msk[:, None], other=0.0)
        do = tl.load(do_base + offs_m64[:, None] * sdl + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
        if LP:
            pq = tl.maximum(q, 0.0).to(q.dtype)
            num = tl.dot(pq, sh)
            num = tl.dot(pq, slo, num)
            pqf = pq.to(tl.float32)
        else:
            pqf = tl.maximum(q.to(tl.float32), 0.0)
            num = tl.dot(pqf, sh)
        den = tl.sum(pqf * z[None, :], 1) + eps
        inv = 1.0 / den
        dnum = do * inv[:, None]
        dden = -tl.sum(do * num, 1) * inv * inv
        if LP:
            dnum_lp = dnum.to(q.dtype)
            dpq = tl.dot(dnum_lp, shT)
            dpq = tl.dot(dnum_lp, sloT, dpq)
            ds_acc = tl.dot(tl.trans(pq), dnum_lp, ds_acc)
        else:
            dpq = tl.dot(dnum, shT)
            ds_acc = tl.dot(tl.trans(pqf), dnum, ds_acc)
        dpq = dpq + dden[:, None] * z[None, :]
        dq = tl.where(pqf > 0.0, dpq, 0.0)
        dq_ptr = DQ + pid_bh.to(tl.int64) * L * D + offs_m64[:, None] * D + offs_d[None, :]
        if ACCUM:
            dq += tl.load(dq_ptr, mask=msk[:, None], other=0.0).to(tl.float32)
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=msk[:, None])
        dz_acc += tl.sum(pqf * dden[:, None], 0)
    out = pid_bh.to(tl.int64) * NSPLIT + pid_s
    tl.store(DSP + out * D * D + offs_d[:, None] * D + offs_d[None, :], ds_acc)
    tl.store(DZP + out * D + offs_d, dz_acc)


@triton.jit
def _linear_bwd_kv_kernel(K, V, DSL, DZL, DK, DV,
                          skb, skh, skl, svb, svh, svl,
                          H, LK, CHUNK, BLOCK_N: tl.constexpr, D: tl.constexpr, ACCUM: tl.constexpr):
    """dk = (v dS^T + dz) * [k>0], dv = relu(k) dS for rows of one split; dS loaded once."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    # dS^T loaded directly transposed
    dsT = tl.load(DSL + pid_bh.to(tl.int64) * D * D + offs_d[None, :] * D + offs_d[:, None])
    ds = tl.load(DSL + pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :])
    dz = tl.load(DZL + pid_bh.to(tl.int64) * D + offs_d)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, LK)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        msk = offs_n < end
        offs_n64 = offs_n.to(tl.int64)
        k = tl.load(k_base + offs_n64[:, None] * skl + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_n64[:, None] * svl + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
        dpk = tl.dot(v, dsT) + dz[None, :]
        dk = tl.where(k > 0.0, dpk, 0.0)
        dv = tl.dot(tl.maximum(k, 0.0), ds)
        out_off = pid_bh.to(tl.int64) * LK * D + offs_n64[:, None] * D + offs_d[None, :]
        if ACCUM:
            dk += tl.load(DK + out_off, mask=msk[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DV + out_off, mask=msk[:, None], other=0.0).to(tl.float32)
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=msk[:, None])
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=msk[:, None])


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, soh, sol, sdb, sdh, sdl, H, L,
                           BLOCK_M: tl.constexpr, D: tl.constexpr):
    """delta = rowsum(o * do); O and DO with arbitrary (b,h,l) strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    msk = offs_m < L
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * sol
                + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None].to(tl.int64) * sdl
                 + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=msk)


@triton.jit
def _sparse_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT, k_desc, v_desc,
                          sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                          sib, sih, sim, sik, scb, sch, scm,
                          H, L, LK, qk_scale, sm_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                          D: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < L
    offs_m64 = offs_m.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m64[:, None] * sql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + offs_m64[:, None] * sdl + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == -float("inf"), float("inf"), lse)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    idx_base, n = _lut_row(IDX, CNT, b64, h64, pid_m, sib, sih, sim, scb, sch, scm)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for t in tl.range(0, n * SPLIT, num_stages=NUM_STAGES):
        j = t // SPLIT
        sub = t % SPLIT
        kb = tl.load(idx_base + j * sik)
        start = kb * (BLOCK_N * SPLIT) + sub * BLOCK_N
        offs_n = start + offs_n0
        kmask = offs_n < LK
        offs_n64 = offs_n.to(tl.int64)
        k = _kv_tile(k_desc, k_base, b, h, start, offs_n64, skl, kmask, offs_d, BLOCK_N, D, USE_TMA)
        v = _kv_tile(v_desc, v_base, b, h, start, offs_n64, svl, kmask, offs_d, BLOCK_N, D, USE_TMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        p = tl.where(kmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * L * D + offs_m64[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KIDX, KCNT, q_desc, do_desc,
                            sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                            H, L, LK, NQ, NKT, qk_scale, sm_scale,
                            BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            D: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr):
    """One program per BLOCK_N keys (a sub-tile of a BLOCK-sized key block); loops over the query
    blocks that list this key block (transposed LUT, KIDX (B*H, nk, NQ) contiguous, KCNT (B*H, nk)),
    in BLOCK_M-row sub-tiles."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N
    SPLIT_M: tl.constexpr = BLOCK // BLOCK_M
    kblk = pid_n // SPLIT_N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    kmask = offs_n < LK
    offs_n64 = offs_n.to(tl.int64)
    k = tl.load(K + b64 * skb + h64 * skh + offs_n64[:, None] * skl + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + offs_n64[:, None] * svl + offs_d[None, :], mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    row = pid_bh.to(tl.int64) * NKT + kblk
    n = tl.load(KCNT + row)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdb + h64 * sdh
    for t in tl.range(0, n * SPLIT_M, num_stages=NUM_STAGES):
        j = t // SPLIT_M
        sub = t % SPLIT_M
        qb = tl.load(KIDX + row * NQ + j)
        offs_m = qb * BLOCK + sub * BLOCK_M + offs_m0
        qmask = offs_m < L
        offs_m64 = offs_m.to(tl.int64)
        if USE_TMA:
            q = q_desc.load([b, h, qb * BLOCK + sub * BLOCK_M, 0]).reshape(BLOCK_M, D)
            do = do_desc.load([b, h, qb * BLOCK + sub * BLOCK_M, 0]).reshape(BLOCK_M, D)
        else:
            q = tl.load(q_base + offs_m64[:, None] * sql + offs_d[None, :], mask=qmask[:, None], other=0.0)
            do = tl.load(do_base + offs_m64[:, None] * sdl + offs_d[None, :], mask=qmask[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * L + offs_m, mask=qmask, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == -float("inf"), float("inf"), lse)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * L + offs_m, mask=qmask, other=0.0)
        qkT = tl.dot(k, tl.trans(q)) * qk_scale
        pT = tl.exp2(qkT - lse[None, :])
        pT = tl.where(qmask[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    dk = dk * sm_scale
    out_off = pid_bh.to(tl.int64) * LK * D + offs_n64[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _topk_lut_kernel(SC, AK, IDX, CNT, NQ, NK, K, KMAX, N_AK,
                     NKP: tl.constexpr, KMAXP: tl.constexpr, SHIFT: tl.constexpr):
    """One program per (b*h, q-block) row of scores SC (B*H, NQ, NK) fp32 contiguous.
    Keeps the cnt = max(K, n_forced) best key blocks (forced: own block, AK[0:N_AK]) and writes them
    ascending into IDX (B*H, NQ, KMAX) int32, -1 after cnt; CNT (B*H, NQ).
    Exact top-k by bisection on unique int64 keys (order-preserving float bits << SHIFT | reversed
    index), so ties go to the lower index and exactly cnt entries are selected."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    row = pid_bh.to(tl.int64) * NQ + pid_m
    offs = tl.arange(0, NKP)
    valid = offs < NK
    s = tl.load(SC + row * NK + offs, mask=valid, other=-float("inf"))
    s = tl.where(s != s, -float("inf"), s)  # NaN -> -inf
    own = tl.minimum(pid_m, NK - 1)
    forced = offs == own
    for a in range(0, N_AK):
        forced = forced | (offs == tl.load(AK + a))
    forced = forced & valid
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    ordered = tl.where(forced, 0x7FFFFFFF, ordered)
    key = (ordered.to(tl.int64) + 2147483648) * (1 << SHIFT) + (NKP - 1 - offs)
    key = tl.where(valid, key, -1)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    kk = tl.maximum(n_forced, K)
    lo = tl.zeros([], tl.int64)
    hi = tl.full([], 1, tl.int64) << (32 + SHIFT)
    for _ in range(32 + SHIFT):
        mid = lo + (hi - lo) // 2
        c = tl.sum((key >= mid).to(tl.int32), 0)
        ge = c >= kk
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid)
    sel = key >= lo
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(IDX + row * KMAX + pos, offs, mask=sel)
    offs_k = tl.arange(0, KMAXP)
    tl.store(IDX + row * KMAX + offs_k, tl.full([KMAXP], -1, tl.int32), mask=(offs_k >= kk) & (offs_k < KMAX))
    tl.store(CNT + row, kk)
