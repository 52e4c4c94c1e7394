"""Triton kernels of the opt-in FP8 block-sparse attention forward (inference only; imported lazily by
kernels/fp8.py, imports triton at module load).  The shared pieces (row loads, LUT walk, head pointers,
splits) come from _triton_kernels; see its header for the conventions (strides tuples, LUT strides,
grid = (block, b*H), exp2-domain softmax).

Quantisation (all scales fp32, e4m3 = torch.float8_e4m3fn / tl.float8e4nv, largest finite value 448):
- K: smoothed by the per-head mean over tokens (softmax is invariant to it: q.(k - m) = q.k - q.m, a
  per-query constant), then one scale per 128-key block (block amax / 448); stored tile-ordered
  (B, H, LP, D), LP = number of key blocks * block, rows past L zero.
- V: smoothed by its per-head channel mean (added back to the output: the normalised P sums to 1),
  then one scale per channel (amax over the head's tokens / 448); stored TRANSPOSED (B, H, D, LP), so
  the P.V dot has its contraction dim contiguous (K-major), which Hopper's fp8 wgmma needs.
- Q: one scale per query row (row amax / 448), quantised in registers; folded with the key block's scale
  into the logits' FMA.
- P: exp2(qk - m + P_LOG2) in (0, 2^P_LOG2], so the small probabilities stay in e4m3's normal range;
  the factor cancels between the numerator and the row sum.  V's channel scale and mean are applied in
  the epilogue.

EXACT_CAST (constexpr): round to e4m3 in fp32 (round to nearest even) before the cast, so that the cast
itself is exact.  Only for the Triton CPU interpreter, whose fp32 -> fp8 cast (Triton 3.8) gets the
rounding carry into the exponent wrong (127.07 -> 64 instead of 128); the GPU's cvt.rn needs no help.
"""
import triton
import triton.language as tl

from ._triton_kernels import (_head, _io_rows, _lut_row, _lut_step, _online_softmax_init, _program_head,
                              _query_rows, _rows, _sigmoid, _split_rows, _split_tile, _tile)

from .fp8 import FP8_MAX, P_LOG2, TINY   # the host module's constants (it loads without Triton)
_FP8_MAX = tl.constexpr(FP8_MAX)
_P_LOG2 = tl.constexpr(float(P_LOG2))
_TINY = tl.constexpr(TINY)


@triton.jit
def _round_e4m3(x):
    """fp32 x rounded to the nearest e4m3 value (ties to even), still fp32; |x| <= 448.  Normal range:
    keep 3 of fp32's 23 mantissa bits (the carry into the exponent is an integer add); below 2^-6:
    multiples of 2^-9 (the magic-number add rounds to nearest even)."""
    xi = x.to(tl.int32, bitcast=True)
    xi = (xi + 0x7FFFF + ((xi >> 20) & 1)) & -1048576
    sub = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    return tl.where(tl.abs(x) < 0.015625, sub, xi.to(tl.float32, bitcast=True))


@triton.jit
def _to_fp8(x, EXACT_CAST: tl.constexpr):
    """fp32 -> e4m3 with round to nearest even (EXACT_CAST: the interpreter's workaround, see header)."""
    if EXACT_CAST:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _div(a, b):
    """a / b rounded as IEEE (the GPU's default fp32 division is approximate): the scales match a
    torch reference bit for bit."""
    return tl.math.div_rn(a, b)


@triton.jit
def _quant_rows(x, EXACT_CAST: tl.constexpr):
    """A (rows, D) fp32 tile as e4m3 with one scale per row: (x / s as e4m3, s = row amax / 448)."""
    s = _div(tl.maximum(tl.max(tl.abs(x), 1), _TINY), _FP8_MAX)
    return _to_fp8(x * _div(1.0, s)[:, None], EXACT_CAST), s


@triton.jit
def _vt_tile(VT, vt_str, b, h, start, offs_n, offs_d, BLOCK_N: tl.constexpr, D: tl.constexpr,
             USE_TMA: tl.constexpr):
    """Columns start .. start+BLOCK_N of head (b, h) of the transposed V (B, H, D, LP), as a (D, BLOCK_N)
    tile (LP is a whole number of blocks and zero-padded: no mask)."""
    if USE_TMA:
        vt = VT.load([b, h, 0, start]).reshape(D, BLOCK_N)
    else:
        vt = tl.load(_head(VT, vt_str, b, h) + offs_d[:, None].to(tl.int64) * vt_str[2] + offs_n[None, :])
    return vt


@triton.jit
def _softmax_p8(qk, m_i, l_i):
    """Online-softmax step as in _triton_kernels._softmax_p, with p scaled by 2^P_LOG2 (<= 256) so it
    quantises well; the row sum carries the same factor."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - (m_new - _P_LOG2)[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _out_shift(VM, BIAS, GL, hd, b, h, bias_sb, offs_d, D: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_GATE: tl.constexpr):
    """What the epilogue adds to every output row of head (b, h): V's channel mean VM[hd] plus, when
    HAS_BIAS, BIAS[b * bias_sb + h*D + d] (times sigmoid(GL[b]) when HAS_GATE)."""
    shift = tl.load(VM + hd)
    if HAS_BIAS:
        g = 1.0
        if HAS_GATE:
            g = _sigmoid(tl.load(GL + b))
        shift += g * tl.load(BIAS + b.to(tl.int64) * bias_sb + h.to(tl.int64) * D + offs_d).to(tl.float32)
    return shift


# ----------------------------------------------------------------------------------------------
# K / V: statistics, then quantisation
# ----------------------------------------------------------------------------------------------

@triton.jit
def _kv_stats_kernel(K, V, SP, k_str, v_str, H, L, CHUNK, NSPLIT, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Partial per-channel statistics of the rows of split program_id(0): sum k, sum v, max v, min v to
    SP (B*H, NSPLIT, 4, D) fp32."""
    pid_bh, b, h = _program_head(H)
    k_base, v_base = _head(K, k_str, b, h), _head(V, v_str, b, h)
    offs_d = tl.arange(0, D)
    k_sum = tl.zeros([D], tl.float32)
    v_sum = tl.zeros([D], tl.float32)
    v_max = tl.full([D], -float("inf"), tl.float32)
    v_min = tl.full([D], float("inf"), tl.float32)
    start, end = _split_rows(CHUNK, L)
    for r0 in tl.range(start, end, BLOCK_N):
        offs, ok = _split_tile(r0, end, BLOCK_N)
        k = _rows(k_base, offs, k_str[2], offs_d, ok).to(tl.float32)
        v = _rows(v_base, offs, v_str[2], offs_d, ok).to(tl.float32)
        k_sum += tl.sum(k, 0)
        v_sum += tl.sum(v, 0)
        v_max = tl.maximum(v_max, tl.max(tl.where(ok[:, None], v, -float("inf")), 0))
        v_min = tl.minimum(v_min, tl.min(tl.where(ok[:, None], v, float("inf")), 0))
    sp = SP + (pid_bh.to(tl.int64) * NSPLIT + tl.program_id(0)) * 4 * D + offs_d
    tl.store(sp, k_sum)
    tl.store(sp + D, v_sum)
    tl.store(sp + 2 * D, v_max)
    tl.store(sp + 3 * D, v_min)


@triton.jit
def _kv_stats_finish_kernel(SP, KM, VM, VS, NSPLIT, inv_l, D: tl.constexpr, SMOOTH_K: tl.constexpr,
                            SMOOTH_V: tl.constexpr, ROWS: tl.constexpr = 16):
    """Head program_id(0)'s partials SP (B*H, NSPLIT, 4, D), ROWS splits at a time -> KM / VM (the token
    means of k and v; zero without SMOOTH_K / SMOOTH_V) and VS = amax of v - VM over 448 ((B*H, D) fp32)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D)
    k_sum = tl.zeros([D], tl.float32)
    v_sum = tl.zeros([D], tl.float32)
    v_max = tl.full([D], -float("inf"), tl.float32)
    v_min = tl.full([D], float("inf"), tl.float32)
    for s0 in range(0, NSPLIT, ROWS):
        offs_s, live = _split_tile(s0, NSPLIT, ROWS)
        part = SP + (pid_bh * NSPLIT + offs_s[:, None]) * 4 * D + offs_d[None, :]
        k_sum += tl.sum(tl.load(part, mask=live[:, None], other=0.0), 0)
        v_sum += tl.sum(tl.load(part + D, mask=live[:, None], other=0.0), 0)
        v_max = tl.maximum(v_max, tl.max(tl.load(part + 2 * D, mask=live[:, None], other=-float("inf")), 0))
        v_min = tl.minimum(v_min, tl.min(tl.load(part + 3 * D, mask=live[:, None], other=float("inf")), 0))
    km = k_sum * inv_l if SMOOTH_K else tl.zeros([D], tl.float32)
    vm = v_sum * inv_l if SMOOTH_V else tl.zeros([D], tl.float32)
    out = pid_bh * D + offs_d
    tl.store(KM + out, km)
    tl.store(VM + out, vm)
    tl.store(VS + out, _div(tl.maximum(tl.maximum(v_max - vm, vm - v_min), _TINY), _FP8_MAX))


@triton.jit
def _quant_kv_kernel(K, V, K8, KS, VT8, KM, VM, VS, k_str, v_str, H, L, NK, LP,
                     BLOCK: tl.constexpr, D: tl.constexpr, EXACT_CAST: tl.constexpr):
    """Key block program_id(0) of head program_id(1), read once: k - KM[bh] with one scale per block
    (amax / 448, to KS (B*H, NK)) as e4m3 rows of K8 (B*H, LP, D); v - VM[bh] divided by the channel
    scales VS[bh] as e4m3 columns of VT8 (B*H, D, LP).  Rows past L are written as zeros."""
    pid_n = tl.program_id(0)
    pid_bh, b, h = _program_head(H)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    offs_d = tl.arange(0, D)
    hd = pid_bh.to(tl.int64) * D + offs_d
    k = _rows(_head(K, k_str, b, h), offs, k_str[2], offs_d, ok).to(tl.float32) - tl.load(KM + hd)[None, :]
    k = tl.where(ok[:, None], k, 0.0)
    ks = _div(tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), _TINY), _FP8_MAX)
    head_rows = pid_bh.to(tl.int64) * LP + offs
    tl.store(K8 + head_rows[:, None] * D + offs_d[None, :], _to_fp8(k * _div(1.0, ks), EXACT_CAST))
    tl.store(KS + pid_bh.to(tl.int64) * NK + pid_n, ks)
    v = _rows(_head(V, v_str, b, h), offs, v_str[2], offs_d, ok).to(tl.float32) - tl.load(VM + hd)[None, :]
    v = tl.where(ok[:, None], v * _div(1.0, tl.load(VS + hd))[None, :], 0.0)
    tl.store(VT8 + hd[None, :] * LP + offs[:, None], _to_fp8(v, EXACT_CAST))


# ----------------------------------------------------------------------------------------------
# block-sparse attention, forward, FP8 operands
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sparse_fwd_fp8_kernel(Q, K8, VT8, KS, VS, VM, O, IDX, CNT, ROWMAP, BIAS, GL,
                           q_str, k_str, vt_str, o_str, lut_str, H, L, LK, NK, qk_scale, bias_sb,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                           NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr, ROWMAP_IO: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, EXACT_CAST: tl.constexpr,
                           PV_PRECISE: tl.constexpr):
    """Online-softmax attention of one query block (BLOCK_M rows = one key block) over its listed key
    blocks, walked in BLOCK_N-key tiles, with e4m3 operands and fp32 accumulation.  Q: 16-bit, read
    through ROWMAP (ROWMAP_IO) and quantised per row in registers.  K8 (B,H,LP,D) / VT8 (B,H,D,LP): from
    _quant_kv_kernel (TMA descriptors when USE_TMA), KS (B*H, NK) key-block scales, VS / VM (B*H, D)
    V's channel scales and means.  O = P.V * VS + VM (+ BIAS[b * bias_sb + h*D + d], times
    sigmoid(GL[b]) when HAS_GATE), stored at the rows ROWMAP gives.  PV_PRECISE: the P.V products of
    each tile are summed in fp32 registers (Hopper's fp8 wgmma accumulates with fewer mantissa bits)."""
    pid_m, offs_m, row_ok = _query_rows(L, BLOCK_M)
    pid_bh, b, h = _program_head(H)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    rows = _io_rows(ROWMAP, offs_m, row_ok, ROWMAP_IO)
    q8, q_s = _quant_rows(_rows(_head(Q, q_str, b, h), rows, q_str[2], offs_d, row_ok).to(tl.float32), EXACT_CAST)
    q_s = q_s * qk_scale
    idx_base, sik, n = _lut_row(IDX, CNT, lut_str, b, h, pid_m)
    ks_base = KS + pid_bh.to(tl.int64) * NK
    m_i, l_i, acc = _online_softmax_init(BLOCK_M, D)
    for t in tl.range(0, n * (BLOCK_M // BLOCK_N), num_stages=NUM_STAGES):
        start, offs_n, kmask = _lut_step(idx_base, sik, t, offs_n0, LK, BLOCK_M, BLOCK_N)
        k8 = _tile(K8, k_str, b, h, start, offs_n, kmask, offs_d, BLOCK_N, D, USE_TMA)
        rs = q_s * tl.load(ks_base + start // BLOCK_M)
        # scales and tail mask in one FMA: bias 0 for valid keys, -inf past LK
        qk = tl.dot(q8, tl.trans(k8)) * rs[:, None] + tl.where(kmask, 0.0, -float("inf"))[None, :]
        m_new, alpha, p, l_i = _softmax_p8(qk, m_i, l_i)
        vt8 = _vt_tile(VT8, vt_str, b, h, start, offs_n, offs_d, BLOCK_N, D, USE_TMA)
        if PV_PRECISE:
            acc = acc * alpha[:, None] + tl.dot(_to_fp8(p, EXACT_CAST), tl.trans(vt8),
                                                max_num_imprecise_acc=BLOCK_N)
        else:
            acc = acc * alpha[:, None] + tl.dot(_to_fp8(p, EXACT_CAST), tl.trans(vt8))
        m_i = m_new
    # epilogue: l_i >= 1 * 2^P_LOG2 (each listed block has a valid key, the max term is 2^P_LOG2)
    hd = pid_bh.to(tl.int64) * D + offs_d
    shift = _out_shift(VM, BIAS, GL, hd, b, h, bias_sb, offs_d, D, HAS_BIAS, HAS_GATE)
    o = acc * (tl.load(VS + hd)[None, :] / l_i[:, None]) + shift[None, :]
    tl.store(_head(O, o_str, b, h) + rows[:, None].to(tl.int64) * o_str[2] + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# rows of a matrix as e4m3 with one scale per row (the FP8 Proj GEMM's operands)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _quant_rows_kernel(X, X8, S, M, K, x_str, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       EXACT_CAST: tl.constexpr):
    """Rows [program_id(0) * BLOCK_R, +BLOCK_R) of X (M, K; row stride x_str, unit column stride): each
    row's scale s = amax / 448 (an all-zero row: TINY / 448) to S (M,) fp32 and x / s as e4m3 to X8
    (M, K contiguous).  Two sweeps over the row: amax, then quantise (the second read comes from cache)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < M
    offs_k0 = tl.arange(0, BLOCK_K)
    x_rows = X + offs_r[:, None].to(tl.int64) * x_str
    amax = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        x = tl.load(x_rows + offs_k[None, :], mask=r_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
    s = _div(tl.maximum(amax, _TINY), _FP8_MAX)
    inv = _div(1.0, s)
    tl.store(S + offs_r, s, mask=r_ok)
    out_rows = X8 + offs_r[:, None].to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        ok = r_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_rows + offs_k[None, :], _to_fp8(x * inv[:, None], EXACT_CAST), mask=ok)
