"""Triton kernels (imported lazily by kernels._triton_ops; imports triton at module load).

Conventions
- (B, H, L, D) tensors are addressed through a strides tuple (sb, sh, sl) and unit stride on D, so
  permuted (B,L,H,D) buffers work without copies.  Where a kernel has USE_TMA, the same argument is a
  host TMA descriptor over the 4-D (B, H, L, D) view instead (block [1, 1, rows, D]; rows past L
  are zero-filled by the TMA unit).
- Block lists: IDX (B,H,nq,kmax) int32 and CNT (B,H,nq) int32 with arbitrary strides (stride 0
  allowed), passed as one tuple lut_str = (idx b, h, m, k strides, cnt b, h, m strides).
- Softmax in the exp2 domain with log2(e) folded into qk_scale; LSE buffers are natural-log
  (B*H, L) fp32 contiguous.
- Grid axis 0 = block within a head (fastest), axis 1 = b*H + h, so one head's K/V stay
  L2-resident while its query blocks run.
- Centroid compensation (COMPENSATE): every key block a query block does not list adds one
  pseudo-token, key KM[bh, j] / value VM[bh, j] (fp32 block means, (B*H, NK, D) contiguous) with
  logit scale * q.kbar_j + log(n_j) (n_j valid keys of block j); see reference.py.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634          # host side: folded into qk_scale
_LOG2E = tl.constexpr(LOG2E)        # kernel side
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# shared pieces (inlined by the compiler)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _query_rows(L, BLOCK_M: tl.constexpr):
    """Query block program_id(0): its index, its BLOCK_M row offsets and their valid-row mask."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, offs_m, offs_m < L


@triton.jit
def _program_head(H):
    """This program's head: (pid_bh, b, h) from grid axis 1 = b*H + h."""
    pid_bh = tl.program_id(1)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def _head(X, strides, b, h):
    """Pointer to row 0 of head (b, h) of a (B, H, L, D) tensor with strides (sb, sh, sl)."""
    return X + b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1]


@triton.jit
def _two_heads(X, Y, x_str, y_str, H):
    """This program's head (pid_bh) and the pointers to row 0 of its rows in X and in Y."""
    pid_bh, b, h = _program_head(H)
    return pid_bh, _head(X, x_str, b, h), _head(Y, y_str, b, h)


@triton.jit
def _rows(base, rows, sl, offs_d, mask):
    """Rows `rows` of one head as a (len(rows), D) tile, zero where ~mask."""
    return tl.load(base + rows[:, None].to(tl.int64) * sl + offs_d[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _store_rows(base, rows, sl, offs_d, x, mask):
    """Store the (len(rows), D) tile x at rows `rows` of one head, where mask."""
    tl.store(base + rows[:, None].to(tl.int64) * sl + offs_d[None, :], x, mask=mask[:, None])


@triton.jit
def _tile(X, strides, b, h, start, offs, mask, offs_d, ROWS: tl.constexpr, D: tl.constexpr,
          USE_TMA: tl.constexpr):
    """ROWS rows of head (b, h) from row `start` (= offs[0]): a TMA descriptor load, or masked
    strided loads."""
    if USE_TMA:
        x = X.load([b, h, start, 0]).reshape(ROWS, D)
    else:  # (an early return would still trace the pointer code with a descriptor X)
        x = _rows(_head(X, strides, b, h), offs, strides[2], offs_d, mask)
    return x


@triton.jit
def _io_rows(ROWMAP, offs_m, row_ok, ROWMAP_IO: tl.constexpr):
    """Rows of Q / O for tile rows offs_m: ROWMAP[offs_m] (caller's token order) or offs_m."""
    if ROWMAP_IO:
        return tl.load(ROWMAP + offs_m, mask=row_ok, other=0)
    return offs_m


@triton.jit
def _dd(X, pid_bh, D: tl.constexpr, TRANS: tl.constexpr = False):
    """Head pid_bh's D x D fp32 matrix of a (B*H, D, D) contiguous buffer (TRANS: transposed)."""
    offs_d = tl.arange(0, D)
    base = X + pid_bh.to(tl.int64) * D * D
    if TRANS:
        return tl.load(base + offs_d[None, :] * D + offs_d[:, None])
    return tl.load(base + offs_d[:, None] * D + offs_d[None, :])


@triton.jit
def _split_state(S, dtype, LP: tl.constexpr):
    """An fp32 D x D state as the Q side's dot operands: (hi, lo) in the 16-bit `dtype` with S = hi + lo
    to ~fp32 accuracy (two tensor-core dots, LP), else (S, S) in fp32."""
    hi = S
    lo = S
    if LP:
        hi = S.to(dtype)
        lo = (S - hi.to(tl.float32)).to(dtype)
    return hi, lo


@triton.jit
def _state_operands(S, ZL, pid_bh, dtype, D: tl.constexpr, LP: tl.constexpr):
    """Head pid_bh's linear state for the Q side ((B*H, D, D) / (B*H, D) fp32): S as its hi and lo dot
    operands in the 16-bit `dtype` (LP; else S twice, fp32) and z."""
    sh, slo = _split_state(_dd(S, pid_bh, D), dtype, LP)
    return sh, slo, tl.load(ZL + pid_bh.to(tl.int64) * D + tl.arange(0, D))


@triton.jit
def _zero_partials(D: tl.constexpr):
    """Zero D x D and D fp32 accumulators (a split's partial sums)."""
    return tl.zeros([D, D], tl.float32), tl.zeros([D], tl.float32)


@triton.jit
def _store_partials(SP, ZP, s, z, pid_bh, pid_s, NSPLIT, D: tl.constexpr):
    """Write split pid_s's D x D and D partial sums ((B*H, NSPLIT, D, D) / (B*H, NSPLIT, D))."""
    offs_d = tl.arange(0, D)
    out = pid_bh.to(tl.int64) * NSPLIT + pid_s
    tl.store(SP + out * D * D + offs_d[:, None] * D + offs_d[None, :], s)
    tl.store(ZP + out * D + offs_d, z)


@triton.jit
def _split_rows(CHUNK, N):
    """Row range [start, end) of split program_id(0) (split-L kernels)."""
    start = tl.program_id(0) * CHUNK
    return start, tl.minimum(start + CHUNK, N)


@triton.jit
def _split_tile(r0, end, ROWS: tl.constexpr):
    """Row offsets r0 .. r0+ROWS of one step of a split's loop and their mask (rows < end)."""
    offs = r0 + tl.arange(0, ROWS)
    return offs, offs < end


@triton.jit
def _phi_q(q, sh, slo, z, eps, LP: tl.constexpr, S_PARTS: tl.constexpr = 2, DEN_DOT: tl.constexpr = False):
    """The linear branch's ReLU dot for one tile: num = relu(q) S, den = relu(q).z + eps.
    LP: S given as 16-bit dot operands in q's dtype, hi + lo (S_PARTS 2: two tensor-core dots, ~fp32
    accuracy) or hi alone (S_PARTS 1); else S (sh) is fp32 (fp32 dot).  DEN_DOT (LP only): z is given as a
    D x 16 operand with z in column 0 and the denominator is a tensor-core dot too.  Returns (num, den,
    relu(q) as the dot operand, relu(q) fp32)."""
    if LP:
        pq = tl.maximum(q, 0.0).to(q.dtype)
        num = tl.dot(pq, sh)
        if S_PARTS == 2:
            num = tl.dot(pq, slo, num)
        pqf = pq.to(tl.float32)
        if DEN_DOT:
            den = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, tl.dot(pq, z), 0.0), 1) + eps
        else:
            den = tl.sum(pqf * z[None, :], 1) + eps
    else:
        pqf = tl.maximum(q.to(tl.float32), 0.0)
        num = tl.dot(pqf, sh)
        pq = pqf
        den = tl.sum(pqf * z[None, :], 1) + eps
    return num, den, pq, pqf


@triton.jit
def _online_softmax_init(BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Running max (-inf), running sum (0) and output accumulator (0) of an online softmax over BLOCK_M rows."""
    return (tl.full([BLOCK_M], -float("inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, D], tl.float32))


@triton.jit
def _gathered_rows(ROWMAP, start, L, ROWS: tl.constexpr):
    """Tile positions start .. start+ROWS, their mask (< L) and the caller's rows they hold (ROWMAP)."""
    offs = start + tl.arange(0, ROWS)
    ok = offs < L
    return offs, ok, tl.load(ROWMAP + offs, mask=ok, other=0)


@triton.jit
def _sigmoid(x):
    """The gate G = sigmoid(x) of one sample, in fp32."""
    return 1.0 / (1.0 + tl.exp(-x.to(tl.float32)))


@triton.jit
def _lut_row(IDX, CNT, lut_str, b, h, pid_m):
    """Start of query block pid_m's key-block list, its stride and its count."""
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m64 = tl.cast(pid_m, tl.int64)  # (a loop counter is a Python int under the interpreter)
    idx_base = IDX + b64 * lut_str[0] + h64 * lut_str[1] + m64 * lut_str[2]
    n = tl.load(CNT + b64 * lut_str[4] + h64 * lut_str[5] + m64 * lut_str[6])
    return idx_base, lut_str[3], n


@triton.jit
def _lut_step(idx_base, sik, t, offs_n0, LK, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step t of the walk over a key list: BLOCK_N-key sub-tile t % (BLOCK/BLOCK_N) of listed
    block t // (BLOCK/BLOCK_N).  Returns its first key, key offsets and valid-key mask."""
    SPLIT: tl.constexpr = BLOCK // BLOCK_N
    kb = tl.load(idx_base + (t // SPLIT) * sik)
    start = kb * BLOCK + (t % SPLIT) * BLOCK_N
    offs_n = start + offs_n0
    return start, offs_n, offs_n < LK


@triton.jit
def _mask_tail(qk, start, kmask, LK, BLOCK_N: tl.constexpr):
    """Raw scores of one BLOCK_N-key step with the keys past LK at -inf.  The select runs only on a step
    that reaches past LK (a branch uniform over the program), so every other step pays nothing for it.
    With _softmax_raw the kernel measured 1.06-1.11x faster on the H200 than with a 0/-inf bias FMA on every
    step (benchmarks/results/fwd_loop/)."""
    if start + BLOCK_N > LK:
        qk = tl.where(kmask[None, :], qk, -float("inf"))
    return qk


@triton.jit
def _softmax_raw(qk, qk_scale, m_i, l_i, acc):
    """One online-softmax step over raw scores qk (exp2 domain after scaling by qk_scale > 0): the max
    is taken before scaling, so scale and max subtraction are one FMA per score.  Returns the new
    running max, running sum, the rescaled accumulator and the probabilities p."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc, p


@triton.jit
def _softmax_p(qk, m_i, l_i):
    """One online-softmax step over exp2-domain logits qk: new max, rescale factor of the old
    accumulator, probabilities and running sum."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_step(q, K, V, k_str, v_str, b, h, idx_base, sik, t, offs_n0, offs_d, LK, qk_scale, m_i, l_i, acc,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    """Step t of the forward's walk over its key list: scores of one BLOCK_N-key tile (keys past LK at -inf,
    on the step that reaches past LK), one online-softmax update, P.V into acc."""
    start, offs_n, kmask = _lut_step(idx_base, sik, t, offs_n0, LK, BLOCK_M, BLOCK_N)
    k = _tile(K, k_str, b, h, start, offs_n, kmask, offs_d, BLOCK_N, D, USE_TMA)
    qk = tl.dot(q, tl.trans(k))
    qk = _mask_tail(qk, start, kmask, LK, BLOCK_N)
    # every listed block (0 <= kb < nk) has >= 1 valid key, so m_i is finite after the first step
    m_i, l_i, acc, p = _softmax_raw(qk, qk_scale, m_i, l_i, acc)
    v = _tile(V, v_str, b, h, start, offs_n, kmask, offs_d, BLOCK_N, D, USE_TMA)
    return m_i, l_i, tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def _lse_delta(LSE, DELTA, pid_bh, L, offs_m, mask):
    """exp2-domain LSE (+inf for rows with no key, so their p is 0) and delta = rowsum(o*do)."""
    row = pid_bh.to(tl.int64) * L + offs_m
    lse = tl.load(LSE + row, mask=mask, other=0.0) * _LOG2E
    lse = tl.where(lse == -float("inf"), float("inf"), lse)
    return lse, tl.load(DELTA + row, mask=mask, other=0.0)


@triton.jit
def _lut_entries(idx_base, sik, n, KMAXP: tl.constexpr):
    """A key list as a KMAXP-vector (KMAXP >= kmax), -1 past its n entries."""
    offs_k = tl.arange(0, KMAXP)
    return tl.load(idx_base + offs_k * sik, mask=offs_k < n, other=-1)


@triton.jit
def _centroid_bias(lut, c0, LK, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Centroids c0 .. c0+BLOCK_C: their indices and logit bias, log2(n_j) for a key block the
    list `lut` (from _lut_entries) does not hold, -inf for a listed block or one past the last."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    listed = tl.sum((offs_c[:, None] == lut[None, :]).to(tl.int32), 1)
    skip = (offs_c < tl.cdiv(LK, BLOCK)) & (listed == 0)
    n_c = tl.minimum(LK - offs_c * BLOCK, BLOCK)
    log2n = tl.log2(tl.maximum(n_c, 1).to(tl.float32))
    return offs_c, tl.where(skip, log2n, -float("inf"))


@triton.jit
def _centroids(X, pid_bh, LK, offs_c, offs_d, BLOCK: tl.constexpr, D: tl.constexpr):
    """Rows offs_c of head pid_bh's fp32 block means X (B*H, NK, D) contiguous (NK key blocks of
    BLOCK over LK keys), zero past NK."""
    NK = tl.cdiv(LK, BLOCK)
    return tl.load(X + pid_bh.to(tl.int64) * NK * D + offs_c[:, None].to(tl.int64) * D + offs_d[None, :],
                   mask=offs_c[:, None] < NK, other=0.0)


@triton.jit
def _dkdv_step(k, v, q, do, lse, delta, qmask, qk_scale, kbias, dk, dv, KBIAS: tl.constexpr):
    """Accumulate one query tile's contribution to the (unscaled) dk and the dv of keys k / values v.
    KBIAS: add kbias, a per-key logit bias in the exp2 domain (the centroids' log2(n))."""
    qkT = tl.dot(k, tl.trans(q)) * qk_scale
    if KBIAS:
        qkT = qkT + kbias[:, None]
    pT = tl.exp2(qkT - lse[None, :])
    pT = tl.where(qmask[None, :], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------

@triton.jit
def _pool_kernel(X, OUT, ROWMAP, x_str, H, L, NB,
                 BLOCK: tl.constexpr, D: tl.constexpr, GATHER: tl.constexpr):
    """Mean over the valid rows of block program_id(0); GATHER: rows in the order ROWMAP gives
    (tile position -> row of X)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_l = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    rows = offs_l
    if GATHER:
        rows = tl.load(ROWMAP + offs_l, mask=offs_l < L, other=0)
    x = _rows(_head(X, x_str, pid_bh // H, pid_bh % H), rows, x_str[2], offs_d, offs_l < L).to(tl.float32)
    n_valid = tl.minimum(L - pid_n * BLOCK, BLOCK).to(tl.float32)
    s = tl.sum(x, axis=0) / n_valid
    tl.store(OUT + (pid_bh.to(tl.int64) * NB + pid_n) * D + offs_d, s)


@triton.jit
def _token_sum_kernel(X, OUT, sb, sl, L, C, CHUNK, NSPLIT, SCALE, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 sums of X (B, L, C) (strides sb, sl; unit stride on C) over the rows [s*CHUNK, (s+1)*CHUNK) of
    split s = program_id(1), for column block program_id(0) of batch program_id(2), times SCALE: OUT
    (B, NSPLIT, C)."""
    pid_c, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cok = offs_c < C
    base = X + b.to(tl.int64) * sb
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, L)
    acc = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
    for l0 in tl.range(start, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        ok = (offs_l < end)[:, None] & cok[None, :]
        acc += tl.load(base + offs_l[:, None].to(tl.int64) * sl + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + (b.to(tl.int64) * NSPLIT + s) * C + offs_c, tl.sum(acc, 0) * SCALE, mask=cok)


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


# ----------------------------------------------------------------------------------------------
# block-sparse attention, forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sparse_fwd_kernel(Q, K, V, O, LSE, IDX, CNT, ROWMAP, BIAS, GL, KM, VM,
                       q_str, k_str, v_str, o_str, lut_str, H, L, LK, qk_scale, bias_sb,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, NUM_STAGES: tl.constexpr,
                       USE_TMA: tl.constexpr, ROWMAP_IO: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_GATE: tl.constexpr, COMPENSATE: tl.constexpr, BLOCK_C: tl.constexpr,
                       KMAXP: tl.constexpr, ACCUM: tl.constexpr = False, Q_TILED: tl.constexpr = False):
    """Online-softmax attention of one query block (BLOCK_M rows = one key block) over its listed
    key blocks, walked in BLOCK_N-key tiles.  ROWMAP_IO: tile row r reads q row ROWMAP[r] and
    stores its output at row ROWMAP[r] (the caller's token order; plain loads for q, TMA has no row
    gather on sm90).  HAS_BIAS: add BIAS[b * bias_sb + h*D + d] (any float dtype; bias_sb = 0 for one
    bias shared by the batch) to O, times sigmoid(GL[b]) (fp32 gate logits, (B,)) when HAS_GATE.
    COMPENSATE: after the listed blocks, the centroids of all NK key blocks are walked in tiles of
    BLOCK_C, the listed ones masked out by comparing with the list (KMAXP >= kmax entries).
    ACCUM: O already holds a term to keep (e.g. the Proj output): the epilogue adds it (read, add, store).
    Q_TILED (with ROWMAP_IO): Q is already in tile order (a TMA descriptor when USE_TMA); only the output goes
    through ROWMAP."""
    pid_m, offs_m, row_ok = _query_rows(L, BLOCK_M)
    pid_bh, b, h = _program_head(H)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    if ROWMAP_IO and not Q_TILED:
        q = _rows(_head(Q, q_str, b, h), _io_rows(ROWMAP, offs_m, row_ok, True), q_str[2], offs_d, row_ok)
    else:
        q = _tile(Q, q_str, b, h, pid_m * BLOCK_M, offs_m, row_ok, offs_d, BLOCK_M, D, USE_TMA)
    idx_base, sik, n = _lut_row(IDX, CNT, lut_str, b, h, pid_m)
    m_i, l_i, acc = _online_softmax_init(BLOCK_M, D)
    for t in tl.range(0, n * (BLOCK_M // BLOCK_N), num_stages=NUM_STAGES):
        m_i, l_i, acc = _fwd_step(q, K, V, k_str, v_str, b, h, idx_base, sik, t, offs_n0, offs_d, LK, qk_scale,
                                  m_i, l_i, acc, BLOCK_M, BLOCK_N, D, USE_TMA)
    if COMPENSATE:
        # m_i is finite here (cnt >= 1 listed block with >= 1 valid key)
        lut = _lut_entries(idx_base, sik, n, KMAXP)
        for c0 in range(0, tl.cdiv(LK, BLOCK_M), BLOCK_C):
            offs_c, cbias = _centroid_bias(lut, c0, LK, BLOCK_M, BLOCK_C)
            km = _centroids(KM, pid_bh, LK, offs_c, offs_d, BLOCK_M, D).to(q.dtype)
            qk = tl.dot(q, tl.trans(km)) * qk_scale + cbias[None, :]
            m_new, alpha, p, l_i = _softmax_p(qk, m_i, l_i)
            vm = _centroids(VM, pid_bh, LK, offs_c, offs_d, BLOCK_M, D).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(vm.dtype), vm)
            m_i = m_new
    # epilogue: normalise, store O (any (b,h,l) strides) and the natural-log LSE
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, -float("inf"), (m_i + tl.log2(l_safe)) * _LN2)
    if HAS_BIAS:
        bias_row = tl.load(BIAS + b.to(tl.int64) * bias_sb + h.to(tl.int64) * D + offs_d).to(tl.float32)
        if HAS_GATE:
            bias_row = bias_row * _sigmoid(tl.load(GL + b))
        o = o + bias_row[None, :]
    rows = _io_rows(ROWMAP, offs_m, row_ok, ROWMAP_IO)
    o_ptrs = _head(O, o_str, b, h) + rows[:, None].to(tl.int64) * o_str[2] + offs_d[None, :]
    if ACCUM:
        o = o + tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# linear attention
# ----------------------------------------------------------------------------------------------

@triton.jit
def _linear_state_kernel(K, V, SP, ZP, k_str, v_str, H, LK, CHUNK, NSPLIT, INV_C,
                         BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Partial S = relu(K)^T V and z = sum relu(K) over the rows of split program_id(0), times INV_C."""
    pid_bh, k_base, v_base = _two_heads(K, V, k_str, v_str, H)
    s_acc, z_acc = _zero_partials(D)
    offs_d = tl.arange(0, D)
    start, end = _split_rows(CHUNK, LK)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n, msk = _split_tile(n0, end, BLOCK_N)
        k = _rows(k_base, offs_n, k_str[2], offs_d, msk)
        v = _rows(v_base, offs_n, v_str[2], offs_d, msk)
        pk = tl.maximum(k, 0.0).to(v.dtype)
        s_acc += tl.dot(tl.trans(pk), v)
        z_acc += tl.sum(pk.to(tl.float32), 0)
    _store_partials(SP, ZP, s_acc * INV_C, z_acc * INV_C, pid_bh, tl.program_id(0), NSPLIT, D)


@triton.jit
def _linear_apply_kernel(Q, S, ZL, OL, q_str, o_str, H, L, CHUNK, eps,
                         BLOCK_M: tl.constexpr, D: tl.constexpr, LP: tl.constexpr):
    """o = relu(q) S / (relu(q).z + eps) for the rows of split program_id(0); S loaded once."""
    pid_bh, q_base, o_base = _two_heads(Q, OL, q_str, o_str, H)
    sh, slo, z = _state_operands(S, ZL, pid_bh, Q.dtype.element_ty, D, LP)
    offs_d = tl.arange(0, D)
    start, end = _split_rows(CHUNK, L)
    for m0 in tl.range(start, end, BLOCK_M):
        offs_m, row_ok = _split_tile(m0, end, BLOCK_M)
        q = _rows(q_base, offs_m, q_str[2], offs_d, row_ok)
        num, den, _, _ = _phi_q(q, sh, slo, z, eps, LP)
        ol = num / den[:, None]
        tl.store(o_base + offs_m[:, None].to(tl.int64) * o_str[2] + offs_d[None, :],
                 ol.to(OL.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _linear_bwd_q_kernel(Q, S, ZL, DO, DQ, DSP, DZP, q_str, do_str, H, L, CHUNK, NSPLIT, eps,
                         BLOCK_M: tl.constexpr, D: tl.constexpr, LP: tl.constexpr):
    """Per split of L: dq rows, partial dS = relu(q)^T (do/den), partial dz = sum dden * relu(q).
    LP: 16-bit operands (S as hi+lo, do/den rounded to q's dtype) on tensor cores; else fp32."""
    pid_bh, q_base, do_base = _two_heads(Q, DO, q_str, do_str, H)
    sh, slo, z = _state_operands(S, ZL, pid_bh, Q.dtype.element_ty, D, LP)
    shT, sloT = _split_state(_dd(S, pid_bh, D, TRANS=True), Q.dtype.element_ty, LP)
    offs_d = tl.arange(0, D)
    ds_acc, dz_acc = _zero_partials(D)
    start, end = _split_rows(CHUNK, L)
    for m0 in tl.range(start, end, BLOCK_M):
        offs_m, msk = _split_tile(m0, end, BLOCK_M)
        q = _rows(q_base, offs_m, q_str[2], offs_d, msk)
        do = _rows(do_base, offs_m, do_str[2], offs_d, msk).to(tl.float32)
        num, den, pq, pqf = _phi_q(q, sh, slo, z, eps, LP)
        inv = 1.0 / den
        dnum = do * inv[:, None]
        dden = -tl.sum(do * num, 1) * inv * inv
        if LP:
            dnum = dnum.to(q.dtype)
            dpq = tl.dot(dnum, shT)
            dpq = tl.dot(dnum, sloT, dpq)
        else:
            dpq = tl.dot(dnum, shT)
        ds_acc = tl.dot(tl.trans(pq), dnum, ds_acc)
        dpq = dpq + dden[:, None] * z[None, :]
        dq = tl.where(pqf > 0.0, dpq, 0.0)
        tl.store(DQ + pid_bh.to(tl.int64) * L * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=msk[:, None])
        dz_acc += tl.sum(pqf * dden[:, None], 0)
    _store_partials(DSP, DZP, ds_acc, dz_acc, pid_bh, tl.program_id(0), NSPLIT, D)


@triton.jit
def _linear_bwd_kv_kernel(K, V, DSL, DZL, DK, DV, k_str, v_str, H, LK, CHUNK,
                          BLOCK_N: tl.constexpr, D: tl.constexpr):
    """dk = (v dS^T + dz) * [k>0], dv = relu(k) dS for the rows of split program_id(0); dS loaded once."""
    pid_bh, k_base, v_base = _two_heads(K, V, k_str, v_str, H)
    dsT = _dd(DSL, pid_bh, D, TRANS=True)
    ds = _dd(DSL, pid_bh, D)
    offs_d = tl.arange(0, D)
    dz = tl.load(DZL + pid_bh.to(tl.int64) * D + offs_d)
    start, end = _split_rows(CHUNK, LK)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n, msk = _split_tile(n0, end, BLOCK_N)
        k = _rows(k_base, offs_n, k_str[2], offs_d, msk).to(tl.float32)
        v = _rows(v_base, offs_n, v_str[2], offs_d, msk).to(tl.float32)
        dpk = tl.dot(v, dsT) + dz[None, :]
        dk = tl.where(k > 0.0, dpk, 0.0)
        dv = tl.dot(tl.maximum(k, 0.0), ds)
        out_off = pid_bh.to(tl.int64) * LK * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=msk[:, None])
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=msk[:, None])


# ----------------------------------------------------------------------------------------------
# one pass over K and V, one pass over Q (inference: tile order, pooling and the linear branch)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _kv_pass_kernel(K, V, KT, VT, KM, VM, SP, ROWMAP, k_str, v_str, kt_str, vt_str, H, L, NB, BPS, NSPLIT, INV_C,
                    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, POOL_K: tl.constexpr,
                    POOL_V: tl.constexpr, STATE: tl.constexpr):
    """Blocks [s*BPS, (s+1)*BPS) of the tile order for split s = program_id(0), read once: tile position r
    takes row ROWMAP[r] of K / V (the caller's order) and writes it to row r of KT / VT; POOL_K / POOL_V:
    each block's mean of k / v goes to KM / VM ((B*H, NB, D) fp32); STATE: the split's partial linear
    state, relu(k)^T v and sum relu(k) times INV_C, goes to SP ((B*H, NSPLIT, D*D + D) fp32, S row-major
    then z)."""
    pid_bh, b, h = _program_head(H)
    k_base, v_base = _head(K, k_str, b, h), _head(V, v_str, b, h)
    kt_base, vt_base = _head(KT, kt_str, b, h), _head(VT, vt_str, b, h)
    offs_d = tl.arange(0, D)
    s_acc, z_acc = _zero_partials(D)
    blk0, blk1 = _split_rows(BPS, NB)
    for j in tl.range(blk0, blk1):
        k_sum = tl.zeros([D], tl.float32)
        v_sum = tl.zeros([D], tl.float32)
        for r0 in tl.static_range(0, BLOCK, BLOCK_N):
            offs, ok, rows = _gathered_rows(ROWMAP, j * BLOCK + r0, L, BLOCK_N)
            k = _rows(k_base, rows, k_str[2], offs_d, ok)
            v = _rows(v_base, rows, v_str[2], offs_d, ok)
            _store_rows(kt_base, offs, kt_str[2], offs_d, k, ok)
            _store_rows(vt_base, offs, vt_str[2], offs_d, v, ok)
            if POOL_K:
                k_sum += tl.sum(k.to(tl.float32), 0)
            if POOL_V:
                v_sum += tl.sum(v.to(tl.float32), 0)
            if STATE:
                pk = tl.maximum(k, 0.0).to(v.dtype)
                s_acc += tl.dot(tl.trans(pk), v)
                z_acc += tl.sum(pk.to(tl.float32), 0)
        inv_n = 1.0 / tl.minimum(L - j * BLOCK, BLOCK).to(tl.float32)
        m_off = (pid_bh.to(tl.int64) * NB + j) * D + offs_d
        if POOL_K:
            tl.store(KM + m_off, k_sum * inv_n)
        if POOL_V:
            tl.store(VM + m_off, v_sum * inv_n)
    if STATE:
        sp = SP + (pid_bh.to(tl.int64) * NSPLIT + tl.program_id(0)) * (D * D + D)
        tl.store(sp + offs_d[:, None] * D + offs_d[None, :], s_acc * INV_C)
        tl.store(sp + D * D + offs_d, z_acc * INV_C)


@triton.jit
def _q_pass_kernel(Q, QM, OL, ST, GL, ROWMAP, QT, q_str, o_str, qt_str, H, L, NB, BPS, eps,
                   BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, POOL: tl.constexpr,
                   LINEAR: tl.constexpr, LP: tl.constexpr, HAS_GATE: tl.constexpr, S_PARTS: tl.constexpr = 2,
                   DEN_DOT: tl.constexpr = False, TILE_Q: tl.constexpr = False):
    """Blocks [s*BPS, (s+1)*BPS) of the tile order for split s = program_id(0), read once through ROWMAP (tile
    position -> row of Q): POOL: each block's mean of q to QM ((B*H, NB, D) fp32); LINEAR: the linear
    branch's rows relu(q) S / (relu(q).z + eps), times G = sigmoid(GL[b]) when HAS_GATE, stored at the
    rows' own places in OL (the caller's order).  ST: the summed state ((B*H, D*D + D) fp32: S row-major,
    then z), loaded once; LP (16-bit q): S as the dot operand in q's dtype, split into hi + lo parts
    (S_PARTS 2, ~fp32 accuracy, two dots) or rounded once (S_PARTS 1: one dot, S to 16 bits);
    DEN_DOT: the denominator relu(q).z on the tensor cores too (z, rounded to q's 16-bit dtype, as the first
    column of a D x 16 operand) instead of an fp32 multiply-and-sum in registers.  TILE_Q: row r of QT gets q
    row ROWMAP[r] (a tile-ordered copy, for a sparse kernel that reads q with TMA)."""
    pid_bh, b, h = _program_head(H)
    q_base, o_base = _head(Q, q_str, b, h), _head(OL, o_str, b, h)
    qt_base = _head(QT, qt_str, b, h)
    offs_d = tl.arange(0, D)
    if LINEAR:
        st = ST + pid_bh.to(tl.int64) * (D * D + D)
        sh, slo = _split_state(tl.load(st + offs_d[:, None] * D + offs_d[None, :]), Q.dtype.element_ty, LP)
        z = tl.load(st + D * D + offs_d)
        if LP and DEN_DOT:   # (D, 16): z in column 0, zeros elsewhere, in the dot operands' dtype
            z = tl.where(tl.arange(0, 16)[None, :] == 0, z[:, None], 0.0).to(sh.dtype)
        g = 1.0
        if HAS_GATE:
            g = _sigmoid(tl.load(GL + b))
    blk0, blk1 = _split_rows(BPS, NB)
    for j in tl.range(blk0, blk1):
        q_sum = tl.zeros([D], tl.float32)
        for r0 in tl.static_range(0, BLOCK, BLOCK_M):
            offs, ok, rows = _gathered_rows(ROWMAP, j * BLOCK + r0, L, BLOCK_M)
            q = _rows(q_base, rows, q_str[2], offs_d, ok)
            if TILE_Q:
                _store_rows(qt_base, offs, qt_str[2], offs_d, q, ok)
            if POOL:
                q_sum += tl.sum(q.to(tl.float32), 0)
            if LINEAR:
                num, den, _, _ = _phi_q(q, sh, slo, z, eps, LP, S_PARTS, DEN_DOT)
                ol = num * (g / den)[:, None]
                tl.store(o_base + rows[:, None].to(tl.int64) * o_str[2] + offs_d[None, :],
                         ol.to(OL.dtype.element_ty), mask=ok[:, None])
        if POOL:
            inv_n = 1.0 / tl.minimum(L - j * BLOCK, BLOCK).to(tl.float32)
            tl.store(QM + (pid_bh.to(tl.int64) * NB + j) * D + offs_d, q_sum * inv_n)


# ----------------------------------------------------------------------------------------------
# block-sparse attention, backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, o_str, do_str, H, L, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """delta = rowsum(o * do); O and DO with arbitrary (b,h,l) strides."""
    pid_bh, b, h = _program_head(H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    msk = offs_m < L
    o = _rows(_head(O, o_str, b, h), offs_m, o_str[2], offs_d, msk).to(tl.float32)
    do = _rows(_head(DO, do_str, b, h), offs_m, do_str[2], offs_d, msk).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=msk)


@triton.jit
def _sparse_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT, KM, VM,
                          q_str, k_str, v_str, do_str, lut_str, H, L, LK, qk_scale, sm_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                          NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr,
                          COMPENSATE: tl.constexpr, BLOCK_C: tl.constexpr, KMAXP: tl.constexpr):
    """dq of one query block over its listed key blocks (K, V: TMA descriptors when USE_TMA);
    COMPENSATE: plus the skipped blocks' centroids (as in the forward)."""
    pid_m, offs_m, row_ok = _query_rows(L, BLOCK_M)
    pid_bh, b, h = _program_head(H)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _rows(_head(Q, q_str, b, h), offs_m, q_str[2], offs_d, row_ok)
    do = _rows(_head(DO, do_str, b, h), offs_m, do_str[2], offs_d, row_ok)
    lse, delta = _lse_delta(LSE, DELTA, pid_bh, L, offs_m, row_ok)
    idx_base, sik, n = _lut_row(IDX, CNT, lut_str, b, h, pid_m)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for t in tl.range(0, n * (BLOCK_M // BLOCK_N), num_stages=NUM_STAGES):
        start, offs_n, kmask = _lut_step(idx_base, sik, t, offs_n0, LK, BLOCK_M, BLOCK_N)
        k = _tile(K, k_str, b, h, start, offs_n, kmask, offs_d, BLOCK_N, D, USE_TMA)
        v = _tile(V, v_str, b, h, start, offs_n, kmask, offs_d, BLOCK_N, D, USE_TMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        p = tl.where(kmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    if COMPENSATE:
        lut = _lut_entries(idx_base, sik, n, KMAXP)
        for c0 in range(0, tl.cdiv(LK, BLOCK_M), BLOCK_C):
            offs_c, cbias = _centroid_bias(lut, c0, LK, BLOCK_M, BLOCK_C)
            km = _centroids(KM, pid_bh, LK, offs_c, offs_d, BLOCK_M, D).to(q.dtype)
            vm = _centroids(VM, pid_bh, LK, offs_c, offs_d, BLOCK_M, D).to(q.dtype)
            p = tl.exp2(tl.dot(q, tl.trans(km)) * qk_scale + cbias[None, :] - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(vm)) - delta[:, None])
            dq += tl.dot(ds.to(km.dtype), km)
    dq = dq * sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * L * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KIDX, KCNT, DKM, DVM,
                            q_str, k_str, v_str, do_str, H, L, LK, NQ, qk_scale, sm_scale,
                            BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            D: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr,
                            COMPENSATE: tl.constexpr):
    """One program per BLOCK_N keys (a sub-tile of a BLOCK-sized key block); loops over the query
    blocks that list this key block (transposed LUT, KIDX (B*H, nk, NQ) contiguous, KCNT (B*H, nk)),
    in BLOCK_M-row sub-tiles (Q, DO: TMA descriptors when USE_TMA).
    COMPENSATE: add the gradient that reaches the block's keys / values through its centroid,
    DKM / DVM (B*H, nk, D) fp32 (from _centroid_bwd_kernel) divided by the block's key count."""
    pid_n = tl.program_id(0)
    pid_bh, b, h = _program_head(H)
    kblk = pid_n // (BLOCK // BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    kmask = offs_n < LK
    k = _rows(_head(K, k_str, b, h), offs_n, k_str[2], offs_d, kmask)
    v = _rows(_head(V, v_str, b, h), offs_n, v_str[2], offs_d, kmask)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    NKT = tl.cdiv(LK, BLOCK)
    row = pid_bh.to(tl.int64) * NKT + kblk
    n = tl.load(KCNT + row)
    SPLIT_M: tl.constexpr = BLOCK // BLOCK_M
    for t in tl.range(0, n * SPLIT_M, num_stages=NUM_STAGES):
        qb = tl.load(KIDX + row * NQ + t // SPLIT_M)
        m0 = qb * BLOCK + (t % SPLIT_M) * BLOCK_M
        offs_m = m0 + offs_m0
        qmask = offs_m < L
        q = _tile(Q, q_str, b, h, m0, offs_m, qmask, offs_d, BLOCK_M, D, USE_TMA)
        do = _tile(DO, do_str, b, h, m0, offs_m, qmask, offs_d, BLOCK_M, D, USE_TMA)
        lse, delta = _lse_delta(LSE, DELTA, pid_bh, L, offs_m, qmask)
        dk, dv = _dkdv_step(k, v, q, do, lse, delta, qmask, qk_scale, None, dk, dv, False)
    dk = dk * sm_scale
    if COMPENSATE:
        inv_n = 1.0 / tl.minimum(LK - kblk * BLOCK, BLOCK).to(tl.float32)
        c_off = row * D + offs_d
        dk += (tl.load(DKM + c_off) * inv_n)[None, :]
        dv += (tl.load(DVM + c_off) * inv_n)[None, :]
    out_off = pid_bh.to(tl.int64) * LK * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _centroid_bwd_kernel(Q, DO, LSE, DELTA, IDX, CNT, KM, VM, DKM, DVM, q_str, do_str, lut_str,
                         H, L, LK, NQ, qk_scale, sm_scale,
                         BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr,
                         KMAXP: tl.constexpr):
    """Gradients of the centroid pseudo-tokens: for centroids c0 .. c0+BLOCK_C of head pid_bh,
    dkbar = sm_scale * sum_i ds_ic q_i and dvbar = sum_i p_ic do_i over the query rows whose block
    skips the centroid's key block (all NQ query blocks walked, BLOCK_M rows at a time).
    DKM / DVM (B*H, NK, D) fp32 contiguous."""
    pid_bh, b, h = _program_head(H)
    NK = tl.cdiv(LK, BLOCK)
    c0 = tl.program_id(0) * BLOCK_C
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_base = _head(Q, q_str, b, h)
    do_base = _head(DO, do_str, b, h)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    km = _centroids(KM, pid_bh, LK, offs_c, offs_d, BLOCK, D).to(Q.dtype.element_ty)
    vm = _centroids(VM, pid_bh, LK, offs_c, offs_d, BLOCK, D).to(Q.dtype.element_ty)
    dkm = tl.zeros([BLOCK_C, D], tl.float32)
    dvm = tl.zeros([BLOCK_C, D], tl.float32)
    for qb in range(0, NQ):
        idx_base, sik, n = _lut_row(IDX, CNT, lut_str, b, h, qb)
        _, cbias = _centroid_bias(_lut_entries(idx_base, sik, n, KMAXP), c0, LK, BLOCK, BLOCK_C)
        for m0 in range(qb * BLOCK, qb * BLOCK + BLOCK, BLOCK_M):
            offs_m = m0 + offs_m0
            qmask = offs_m < L
            q = _rows(q_base, offs_m, q_str[2], offs_d, qmask)
            do = _rows(do_base, offs_m, do_str[2], offs_d, qmask)
            lse, delta = _lse_delta(LSE, DELTA, pid_bh, L, offs_m, qmask)
            dkm, dvm = _dkdv_step(km, vm, q, do, lse, delta, qmask, qk_scale, cbias, dkm, dvm, True)
    c_off = pid_bh.to(tl.int64) * NK * D + offs_c[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(DKM + c_off, dkm * sm_scale, mask=offs_c[:, None] < NK)
    tl.store(DVM + c_off, dvm, mask=offs_c[:, None] < NK)
