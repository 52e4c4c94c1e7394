"""Plain-torch reference / CPU production path for SALAD attention kernels.

All attention tensors are (B, H, L, D) views (last dim contiguous, any strides for B, H, L).
Nothing here builds an L x L tensor except the explicitly dense test helpers
(`attention_ref`, `masked_attention_ref`), which are meant for small sizes only.

Block lists (the "LUT"): ``idx`` int32 (B, H, nq, kmax), each row sorted ascending and
duplicate-free in its first ``cnt`` entries; entries at positions >= cnt are -1 and are ignored by
every consumer (torch reference and Triton kernels).  ``cnt`` int32 (B, H, nq), 1 <= cnt <= kmax.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEFAULT_BLOCK = 128
PAD_IDX = -1
# gathered K+V (fp32) per chunk of query blocks stays below this many bytes
_CHUNK_BYTES = 256 * 1024 * 1024


def num_blocks(L: int, block: int = DEFAULT_BLOCK) -> int:
    return (int(L) + block - 1) // block


def keep_count(n_kv_blocks: int, sparsity: float) -> int:
    n = int(n_kv_blocks)
    if n <= 0:
        return 0
    k = int(round((1.0 - float(sparsity)) * n))
    return max(1, min(n, k))


# ----------------------------------------------------------------------------------------------
# pooling and block selection
# ----------------------------------------------------------------------------------------------

def pool_blocks_ref(x: Tensor, block: int = DEFAULT_BLOCK, dtype=torch.float32) -> Tensor:
    """(B,H,L,D) -> (B,H,nb,D) mean over the valid tokens of each block, in `dtype` (fp32)."""
    B, H, L, D = x.shape
    nb = num_blocks(L, block)
    nfull = L // block
    parts = []
    if nfull:
        xf = x[:, :, : nfull * block].to(dtype).reshape(B, H, nfull, block, D)
        parts.append(xf.mean(dim=3))
    if nfull < nb:
        tail = x[:, :, nfull * block:].to(dtype)
        parts.append(tail.mean(dim=2, keepdim=True))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _forced_mask(nq: int, nk: int, device, always_kept: Optional[Tensor]) -> Tensor:
    """(nq, nk) bool: own (diagonal) block and always-kept key blocks."""
    forced = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    r = torch.arange(min(nq, nk), device=device)
    forced[r, r] = True
    if nq > nk:  # more query blocks than key blocks (cross-length use): keep the last key block
        forced[nk:, nk - 1] = True
    if always_kept is not None and always_kept.numel() > 0:
        ak = always_kept.to(device=device, dtype=torch.long).reshape(-1)
        forced[:, ak] = True
    return forced


def _kmax(k: int, nk: int, always_kept: Optional[Tensor]) -> int:
    n_ak = 0 if always_kept is None else int(always_kept.numel())
    return min(nk, max(k, 1 + n_ak))


def _finish_lut(order: Tensor, cnt: Tensor, kmax: int, nk: int) -> Tensor:
    """order: (..., >=kmax) candidate indices, best first. Keep the first cnt, sort, pad -1."""
    cand = order[..., :kmax].to(torch.int32)
    pos = torch.arange(kmax, device=cand.device, dtype=torch.int32)
    valid = pos < cnt.unsqueeze(-1)
    big = torch.full_like(cand, nk + 1)
    cand = torch.where(valid, cand, big)
    cand, _ = torch.sort(cand, dim=-1)
    return torch.where(cand > nk, torch.full_like(cand, PAD_IDX), cand)


def lut_from_scores(scores: Tensor, k: int, always_kept: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """scores (B,H,nq,nk) fp32 -> (idx, cnt).  Forced blocks get +inf."""
    nq, nk = scores.shape[-2:]
    forced = _forced_mask(nq, nk, scores.device, always_kept)
    kmax = _kmax(k, nk, always_kept)
    s = scores.float().masked_fill(forced, float("inf"))
    s = torch.nan_to_num(s, nan=-float("inf"))
    _, order = torch.topk(s, kmax, dim=-1, sorted=True)
    nforced = forced.sum(-1).to(torch.int32)  # (nq,)
    cnt = torch.clamp(nforced, min=k).expand(scores.shape[:-1]).contiguous()
    return _finish_lut(order, cnt, kmax, nk), cnt


def select_window(q_coords: Tensor, k_coords: Tensor, sparsity: float, B: int, H: int,
                  scale: Sequence[float] = (1.0, 1.0, 1.0),
                  always_kept: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """3-D window pattern: keep the keep_count(nk) nearest key blocks (scaled Euclidean distance of
    block centroids, ties broken by lower index); own block and always_kept forced.
    Output (idx, cnt) expanded (not copied) to (B,H,nq,kmax) / (B,H,nq)."""
    qc = q_coords.double()
    kc = k_coords.to(device=qc.device).double()
    sc = torch.as_tensor(scale, dtype=torch.float64, device=qc.device).reshape(1, 1, 3)
    d = (((qc[:, None, :] - kc[None, :, :]) / sc) ** 2).sum(-1)  # (nq, nk)
    nq, nk = d.shape
    kk = keep_count(nk, sparsity)
    forced = _forced_mask(nq, nk, d.device, always_kept)
    d = d.masked_fill(forced, -1.0)
    kmax = _kmax(kk, nk, always_kept)
    _, order = torch.sort(d, dim=-1, stable=True)
    cnt = torch.clamp(forced.sum(-1).to(torch.int32), min=kk)
    idx = _finish_lut(order, cnt, kmax, nk)
    return idx.expand(B, H, nq, kmax), cnt.expand(B, H, nq)


# ----------------------------------------------------------------------------------------------
# block-sparse attention (torch)
# ----------------------------------------------------------------------------------------------

def block_counts(Lk: int, block: int = DEFAULT_BLOCK, device=None) -> Tensor:
    """(nk,) fp32 number of valid keys in each key block (block, the tail block: Lk - (nk-1)*block)."""
    nk = num_blocks(Lk, block)
    start = torch.arange(nk, device=device) * block
    return (torch.clamp(Lk - start, max=block)).to(torch.float32)


def skipped_blocks(idx: Tensor, cnt: Tensor, nk: int) -> Tensor:
    """(B,H,nq,kmax) LUT -> (B,H,nq,nk) bool, True for the key blocks a query block does NOT list."""
    kmax = idx.shape[-1]
    slot = torch.arange(kmax, device=idx.device)
    ok = (slot < cnt[..., None]) & (idx >= 0)
    tgt = torch.where(ok, idx.long(), torch.full_like(idx, nk).long())
    kept = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    kept.scatter_(-1, tgt, True)
    return ~kept[..., :nk]


def block_sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor,
                               block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                               chunk_bytes: int = _CHUNK_BYTES, compensate: bool = False,
                               k_mean: Optional[Tensor] = None,
                               v_mean: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Chunked gather implementation; autograd-capable; never L x L.
    Returns o (B,H,L,D) contiguous in q.dtype and lse (B,H,L) fp32 (natural log).

    compensate=True (centroid compensation of skipped key blocks): every key block j that query
    block i does not list adds ONE pseudo-token to the same softmax, with key kbar_j = mean of the
    valid keys of block j, value vbar_j = mean of its values, and logit
        s_j = scale * q . kbar_j + log(n_j),   n_j = number of valid keys in block j,
    i.e. the block's n_j keys are replaced by n_j copies of their centroid (exact when the keys of
    the block are equal; first-order otherwise).  With every block listed (sparsity 0) nothing is
    added and the result is exact dense attention.  k_mean / v_mean (B,H,nk,D) fp32: precomputed
    block means (e.g. the pooled K of top-k selection); default pool_blocks_ref(k / v), which keeps
    the gradient flowing to every key and value through the means.  lse includes the pseudo-tokens."""
    B, H, L, D = q.shape
    Lk = k.shape[2]
    nq = num_blocks(L, block)
    nk = num_blocks(Lk, block)
    kmax = idx.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    idx = idx.expand(B, H, nq, kmax)
    cnt = cnt.expand(B, H, nq)
    dev = q.device
    per_qblock = B * H * kmax * block * (2 * D + block) * 4  # gathered K,V + scores, fp32
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32  # compute dtype
    if compensate:
        per_qblock += B * H * block * nk * 4 * 2              # pseudo-token scores / probabilities
        km = (pool_blocks_ref(k, block, cd) if k_mean is None else k_mean).to(cd)
        vm = (pool_blocks_ref(v, block, cd) if v_mean is None else v_mean).to(cd)
        log_n = torch.log(block_counts(Lk, block, dev).to(cd))  # (nk,)
    cq = max(1, min(nq, chunk_bytes // max(1, per_qblock)))
    tok = torch.arange(block, device=dev)
    slot = torch.arange(kmax, device=dev)
    outs, lses = [], []
    for s0 in range(0, nq, cq):
        s1 = min(nq, s0 + cq)
        C = s1 - s0
        t0, t1 = s0 * block, min(L, s1 * block)
        qc = q[:, :, t0:t1].to(cd)
        if t1 - t0 < C * block:
            qc = F.pad(qc, (0, 0, 0, C * block - (t1 - t0)))
        qc = qc.reshape(B, H, C, block, D)
        ib = idx[:, :, s0:s1].long()  # (B,H,C,kmax)
        slot_ok = (slot < cnt[:, :, s0:s1, None]) & (ib >= 0)
        ti = ib.clamp(min=0)[..., None] * block + tok  # (B,H,C,kmax,block)
        ok = slot_ok[..., None] & (ti < Lk)
        ti = ti.clamp(max=Lk - 1).reshape(B, H, C * kmax * block, 1).expand(B, H, C * kmax * block, D)
        kg = torch.gather(k, 2, ti).to(cd).reshape(B, H, C, kmax * block, D)
        vg = torch.gather(v, 2, ti).to(cd).reshape(B, H, C, kmax * block, D)
        s = torch.matmul(qc, kg.transpose(-1, -2)) * scale  # (B,H,C,block,kmax*block)
        s = s.masked_fill(~ok.reshape(B, H, C, 1, kmax * block), -float("inf"))
        if compensate:
            # pseudo-tokens: (B,H,C,block,nk) logits of the block centroids, -inf for listed blocks
            sc = torch.matmul(qc, km.unsqueeze(2).transpose(-1, -2)) * scale + log_n
            skip = skipped_blocks(ib.to(torch.int32), cnt[:, :, s0:s1], nk)  # (B,H,C,nk)
            sc = sc.masked_fill(~skip.unsqueeze(3), -float("inf"))
            s = torch.cat([s, sc], dim=-1)
            vg = torch.cat([vg, vm.unsqueeze(2).expand(B, H, C, nk, D)], dim=3)
        lse = torch.logsumexp(s, dim=-1)  # (B,H,C,block)
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - lse_safe[..., None])
        o = torch.matmul(p, vg)  # (B,H,C,block,D)
        outs.append(o.reshape(B, H, C * block, D)[:, :, : t1 - t0])
        lses.append(lse.reshape(B, H, C * block)[:, :, : t1 - t0])
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
    return o.to(q.dtype).contiguous(), lse.to(torch.float32 if cd == torch.float32 else cd).contiguous()


# ----------------------------------------------------------------------------------------------
# linear attention (torch)
# ----------------------------------------------------------------------------------------------

def linear_state_ref(k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """S = sum_j relu(k_j) v_j^T (B,H,D,D) fp32, z = sum_j relu(k_j) (B,H,D) fp32."""
    cd = torch.float64 if k.dtype == torch.float64 else torch.float32
    pk = torch.relu(k.to(cd))
    S = torch.matmul(pk.transpose(-1, -2), v.to(cd))
    z = pk.sum(dim=2)
    return S, z


def linear_apply_ref(q: Tensor, S: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    pq = torch.relu(q.to(S.dtype))
    num = torch.matmul(pq, S)
    den = (pq * z.unsqueeze(2)).sum(-1, keepdim=True) + eps
    return (num / den).to(q.dtype)


def linear_attention_ref(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-5) -> Tensor:
    S, z = linear_state_ref(k, v)
    return linear_apply_ref(q, S, z, eps)


def bias_args(bias: Optional[Tensor], gate_logit: Optional[Tensor], B: int, HD: int, device: torch.device
              ) -> Tuple[Optional[Tensor], int, Optional[Tensor]]:
    """The forward kernels' bias arguments: (bias (n, H*D) contiguous on `device`, any float dtype; its batch
    stride (0: one row shared by the batch); gate logits (B,) fp32 or None), with the shapes checked."""
    if bias is None:
        if gate_logit is not None:
            raise ValueError("gate_logit is given without a bias (it scales the bias)")
        return None, 0, None
    if bias.numel() not in (HD, B * HD):
        raise ValueError(f"bias must have H*D = {HD} or B*H*D = {B * HD} elements, got shape {tuple(bias.shape)}")
    bias = bias.to(device=device).reshape(-1, HD).contiguous()
    if gate_logit is not None:
        if gate_logit.numel() != B:
            raise ValueError(f"gate_logit must have B = {B} elements, got shape {tuple(gate_logit.shape)}")
        gate_logit = gate_logit.to(device=device, dtype=torch.float32).reshape(B).contiguous()
    return bias, (HD if bias.shape[0] > 1 else 0), gate_logit


# ----------------------------------------------------------------------------------------------
# inference passes (torch): what kernels.kv_pass / kernels.q_pass compute
# ----------------------------------------------------------------------------------------------

def _gather_blhd(x: Tensor, rowmap: Tensor) -> Tensor:
    """(B,H,L,D) rows rowmap[r] -> a (B,H,L,D) view of a new contiguous (B,L,H,D) buffer."""
    return x.transpose(1, 2).index_select(1, rowmap.to(device=x.device, dtype=torch.long)).transpose(1, 2)


def pack_state(S: Tensor, z: Tensor, n_keys: int) -> Tensor:
    """(S (B,H,D,D), z (B,H,D)) -> the passes' packed state (B*H, D*D + D) fp32, divided by n_keys."""
    B, H, D = z.shape
    return torch.cat([S.reshape(B * H, D * D), z.reshape(B * H, D)], 1).float() / max(1, n_keys)


def token_mean_ref(x: Tensor) -> Tensor:
    """(B, L, C) -> (B, C) fp32 mean over the tokens, accumulated in fp32 (no fp32 copy of x)."""
    return torch.mean(x, dim=1, dtype=torch.float32)


def kv_pass_ref(k: Tensor, v: Tensor, rowmap: Tensor, block: int = DEFAULT_BLOCK, pool_k: bool = True,
                pool_v: bool = False, state: bool = True):
    """(kt, vt, k means, v means, packed linear state) as kernels.kv_pass returns them."""
    kt, vt = _gather_blhd(k, rowmap), _gather_blhd(v, rowmap)
    st = pack_state(*linear_state_ref(k, v), k.shape[2]) if state else None
    return (kt, vt, pool_blocks_ref(kt, block) if pool_k else None,
            pool_blocks_ref(vt, block) if pool_v else None, st)


def q_pass_ref(q: Tensor, rowmap: Tensor, block: int = DEFAULT_BLOCK, state: Optional[Tensor] = None,
               eps: float = 1e-5, gate_logit: Optional[Tensor] = None, pool: bool = True, tile_q: bool = False):
    """(q block means in tile order, G * linear branch in q's order[, q in tile order when tile_q]) as
    kernels.q_pass returns them."""
    if tile_q:
        return (*q_pass_ref(q, rowmap, block, state, eps, gate_logit, pool), _gather_blhd(q, rowmap))
    B, H, L, D = q.shape
    qm = pool_blocks_ref(_gather_blhd(q, rowmap), block) if pool else None
    if state is None:
        return qm, None
    st = state.reshape(B, H, D * D + D)
    ol = linear_apply_ref(q, st[..., :D * D].reshape(B, H, D, D), st[..., D * D:], eps / max(1, L))
    if gate_logit is not None:
        ol = (ol.float() * torch.sigmoid(gate_logit.float()).reshape(B, 1, 1, 1)).to(q.dtype)
    return qm, ol.transpose(1, 2).contiguous().transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# dense helpers for tests (small sizes only: these DO build L x L)
# ----------------------------------------------------------------------------------------------

def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                  mask: Optional[Tensor] = None, dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """Dense softmax attention in `dtype` (default fp64). mask: bool broadcastable to (B,H,L,Lk),
    True = attend. Returns (o, lse) in `dtype`."""
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -float("inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.to(dtype)), lse


def block_mask_dense(idx: Tensor, cnt: Tensor, L: int, Lk: int, block: int = DEFAULT_BLOCK) -> Tensor:
    """(B,H,nq,kmax) LUT -> dense token mask (B,H,L,Lk) bool (small sizes only)."""
    B, H, nq, kmax = idx.shape
    nk = num_blocks(Lk, block)
    slot = torch.arange(kmax, device=idx.device)
    ok = (slot < cnt[..., None]) & (idx >= 0)
    bm = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=idx.device)
    tgt = torch.where(ok, idx.long(), torch.full_like(idx, nk).long())
    bm.scatter_(3, tgt, True)
    bm = bm[..., :nk]
    m = bm.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
    return m[:, :, :L, :Lk]


def masked_attention_ref(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor,
                         block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                         dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    m = block_mask_dense(idx.expand(B, H, *idx.shape[2:]), cnt.expand(B, H, cnt.shape[-1]),
                         L, k.shape[2], block)
    return attention_ref(q, k, v, scale=scale, mask=m, dtype=dtype)


def compensated_attention_ref(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor,
                              block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                              dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """Dense (L x (Lk + nk)) form of centroid compensation, for tests (small sizes only).
    Builds the softmax explicitly: columns 0..Lk-1 are the keys of listed blocks (masked token by
    token), columns Lk..Lk+nk-1 are the centroids of the skipped blocks with logit
    scale * q . mean(k_block) + log(n_block) and value mean(v_block), computed here in `dtype`
    from a per-block loop (independent of pool_blocks_ref).  Returns (o, lse) in `dtype`."""
    B, H, L, D = q.shape
    Lk = k.shape[2]
    nk = num_blocks(Lk, block)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    idx = idx.expand(B, H, *idx.shape[2:])
    cnt = cnt.expand(B, H, cnt.shape[-1])
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    km = torch.stack([kd[:, :, j * block: min(Lk, (j + 1) * block)].mean(2) for j in range(nk)], 2)
    vm = torch.stack([vd[:, :, j * block: min(Lk, (j + 1) * block)].mean(2) for j in range(nk)], 2)
    n = torch.tensor([min(Lk, (j + 1) * block) - j * block for j in range(nk)], dtype=dtype, device=q.device)
    tok_mask = block_mask_dense(idx, cnt, L, Lk, block)                           # (B,H,L,Lk)
    skip = skipped_blocks(idx, cnt, nk).repeat_interleave(block, dim=2)[:, :, :L]  # (B,H,L,nk)
    s_tok = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~tok_mask, -float("inf"))
    s_cen = (qd @ km.transpose(-1, -2) * scale + torch.log(n)).masked_fill(~skip, -float("inf"))
    s = torch.cat([s_tok, s_cen], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    return p @ torch.cat([vd, vm], 2), lse
