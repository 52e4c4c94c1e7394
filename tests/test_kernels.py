"""Tests for salad_pack.kernels: torch reference vs dense fp64, Triton kernels (CPU interpreter) vs
reference, LUT properties, backward vs autograd.

Inputs are fresh random tensors each run; the seed is printed in every assertion message so a
failure can be replayed with SALAD_TEST_SEED=<seed>.  Triton outputs are POISONED (NaN-filled)
before the kernels write them, so unwritten elements fail the comparisons.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton kernels run through the interpreter on CPU; must be set before triton compiles anything.
sys.path.insert(0, str(Path(__file__).parent))
from triton_env import have_triton, ptxas_bundled, kernel_device, use_interpreter_without_cuda  # noqa: E402

use_interpreter_without_cuda()   # before the kernels are first imported
from _pack import register  # noqa: E402

register()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import salad_pack.kernels as K  # noqa: E402
from salad_pack.kernels import reference as R  # noqa: E402

HAVE_TRITON = have_triton()
DEV = kernel_device()
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton cannot be imported")


def TRITON(opts):
    """Keyword arguments of a call that must run the Triton kernels, with the test's options."""
    return dict(backend="triton", triton_options=opts)


def qkv(B, H, L, D, dtype, layout="bhld", scale=1.0, Lk=None):
    """Random q, k, v; layout 'blhd' returns permuted (B,H,L,D) views of (B,L,H,D) buffers."""
    Lk = L if Lk is None else Lk
    out = []
    for n in (L, Lk, Lk):
        if layout == "blhd":
            x = (torch.randn(B, n, H, D, device=DEV) * scale).to(dtype).transpose(1, 2)
        else:
            x = (torch.randn(B, H, n, D, device=DEV) * scale).to(dtype)
        out.append(x)
    return out


def random_lut(B, H, nq, nk, kmax=None, device=DEV):
    """Random sorted duplicate-free lists with random counts in [1, kmax], -1 padded."""
    kmax = nk if kmax is None else kmax
    perm = torch.rand(B, H, nq, nk, device=device).argsort(-1)[..., :kmax].to(torch.int32)
    cnt = torch.randint(1, kmax + 1, (B, H, nq), device=device, dtype=torch.int32)
    slot = torch.arange(kmax, device=device)
    perm = torch.where(slot < cnt[..., None], perm, torch.full_like(perm, nk + 7))
    perm, _ = perm.sort(-1)
    idx = torch.where(perm > nk, torch.full_like(perm, -1), perm)
    return idx, cnt


def full_lut(B, H, nq, nk, device=DEV):
    idx = torch.arange(nk, device=device, dtype=torch.int32).expand(B, H, nq, nk)
    cnt = torch.full((B, H, nq), nk, device=device, dtype=torch.int32)
    return idx, cnt


def assert_close(a, b, atol, rtol, what, seed):
    a = a.double()
    b = b.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten/NaN) [seed {seed}]"
    err = (a - b).abs()
    lim = atol + rtol * b.abs()
    bad = err > lim
    assert not bad.any(), (f"{what}: max abs err {err.max().item():.3e}, {int(bad.sum())} of {bad.numel()} "
                           f"elements out of tolerance [seed {seed}]")


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 5e-3), torch.float64: (1e-10, 1e-10)}
if DEV.type == "cuda":  # fp32 tl.dot runs as TF32 on the GPU (about 1e-3 relative)
    TOL[torch.float32] = (5e-3, 5e-3)


def TIGHT(t: float):
    """A tight fp32 tolerance on the CPU interpreter; TF32-level on the GPU."""
    return (t, t) if DEV.type == "cpu" else (1e-2, 1e-2)


def check_lut(idx, cnt, nk, k_expect, seed):
    B, H, nq, kmax = idx.shape
    slot = torch.arange(kmax, device=idx.device)
    valid = slot < cnt[..., None].long()
    assert (cnt >= 1).all() and (cnt <= kmax).all(), f"cnt out of range [seed {seed}]"
    assert (cnt >= k_expect).all(), f"cnt below keep count [seed {seed}]"
    vi = idx.long()
    assert ((vi[valid] >= 0) & (vi[valid] < nk)).all(), f"index out of range [seed {seed}]"
    assert (vi[~valid] == -1).all(), f"padding not -1 [seed {seed}]"
    big = torch.where(valid, vi, torch.full_like(vi, 10**9))
    assert (big[..., 1:] > big[..., :-1])[valid[..., 1:]].all(), f"lists not strictly ascending [seed {seed}]"
    # own block present
    own = torch.arange(nq, device=idx.device).clamp(max=nk - 1).view(1, 1, nq, 1)
    assert ((vi == own) & valid).any(-1).all(), f"own block missing [seed {seed}]"


# ----------------------------------------------------------------------------------------------
# API basics
# ----------------------------------------------------------------------------------------------

def test_counts():
    assert K.num_blocks(32760) == 256 and K.num_blocks(75600) == 591 and K.num_blocks(128) == 1
    assert K.keep_count(256, 0.9) == 26 and K.keep_count(256, 0.95) == 13
    assert K.keep_count(10, 1.0) == 1 and K.keep_count(10, 0.0) == 10 and K.keep_count(3, -1.0) == 3


def test_import_does_not_load_triton():
    code = ("import sys; sys.path.insert(0, %r); from _pack import register; register(); "
            "import salad_pack.kernels as K; "
            "assert 'salad_pack.kernels._triton_kernels' not in sys.modules; "
            "import torch; torch.manual_seed(0); q = torch.randn(1, 1, 70, 16); "
            "i, c = K.select_topk(q, q, 0.5, block=16); o, l = K.block_sparse_attention(q, q, q, i, c, block=16); "
            "assert 'salad_pack.kernels._triton_kernels' not in sys.modules; print('ok')"
            % str(Path(__file__).parent))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ----------------------------------------------------------------------------------------------
# torch reference vs dense fp64
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,L,D,block,layout", [(2, 3, 200, 32, 32, "blhd"), (1, 2, 128, 16, 64, "bhld"),
                                                  (1, 1, 77, 8, 16, "blhd")])
def test_reference_vs_dense_fp64(seed, B, H, L, D, block, layout):
    q, k, v = qkv(B, H, L, D, torch.float32, layout)
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    ro, rl = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    for chunk in (R._CHUNK_BYTES, 1):  # 1 byte -> one query block per chunk
        o, lse = R.block_sparse_attention_ref(q, k, v, idx, cnt, block, chunk_bytes=chunk)
        assert o.shape == (B, H, L, D) and o.is_contiguous() and lse.shape == (B, H, L)
        assert_close(o, ro, 1e-5, 1e-5, "ref o", seed)
        assert_close(lse, rl, 1e-5, 1e-5, "ref lse", seed)
    # sparsity 0 == dense softmax attention (torch SDPA)
    fi, fc = full_lut(B, H, nq, nq)
    o, _ = R.block_sparse_attention_ref(q, k, v, fi, fc, block)
    sd = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close(o, sd, 1e-5, 1e-5, "ref vs sdpa", seed)


def test_reference_backward_vs_dense_fp64(seed):
    B, H, L, D, block = 1, 2, 150, 16, 32
    q, k, v = qkv(B, H, L, D, torch.float64)
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    do = torch.randn(B, H, L, D, dtype=torch.float64, device=DEV)
    g = []
    for fn in (lambda a, b, c: R.block_sparse_attention_ref(a, b, c, idx, cnt, block, chunk_bytes=1)[0],
               lambda a, b, c: K.masked_attention_ref(a, b, c, idx, cnt, block=block)[0]):
        a, b, c = [x.clone().requires_grad_() for x in (q, k, v)]
        (fn(a, b, c) * do).sum().backward()
        g.append((a.grad, b.grad, c.grad))
    for x, y, n in zip(g[0], g[1], "qkv"):
        assert_close(x, y, 1e-9, 1e-9, f"ref d{n}", seed)


def test_linear_reference(seed):
    B, H, L, D = 2, 2, 90, 16
    q, k, v = qkv(B, H, L, D, torch.float64)
    o = R.linear_attention_ref(q, k, v, eps=1e-5)
    pq, pk = q.clamp(min=0), k.clamp(min=0)
    a = pq @ pk.transpose(-1, -2)  # dense L x L formulation
    ref = (a @ v) / (a.sum(-1, keepdim=True) + 1e-5)
    assert_close(o, ref, 1e-9, 1e-9, "linear ref", seed)


# ----------------------------------------------------------------------------------------------
# block selection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_select_topk(seed, poison, backend, sparsity):
    B, H, L, D, block = 2, 2, 300, 16, 16  # nq = nk = 19, ragged tail
    q, k, _ = qkv(B, H, L, D, torch.float32, "blhd")
    nk = K.num_blocks(L, block)
    kk = K.keep_count(nk, sparsity)
    idx, cnt = K.select_topk(q, k, sparsity, block=block, backend=backend, triton_options=poison)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape == (B, H, nk, kk) and cnt.shape == (B, H, nk)
    check_lut(idx, cnt, nk, kk, seed)
    assert (cnt == kk).all(), f"count != keep_count [seed {seed}]"
    # top-k property: every selected non-own block scores >= every unselected block
    sc = R.pool_blocks_ref(q, block) @ R.pool_blocks_ref(k, block).transpose(-1, -2)
    sel = K.block_mask_dense(idx, cnt, nk, nk, 1)  # block-level mask (block=1)
    own = torch.eye(nk, dtype=torch.bool, device=DEV)
    sel_free = sel & ~own
    lo = torch.where(sel_free, sc, torch.full_like(sc, float("inf"))).amin(-1)
    hi = torch.where(~sel, sc, torch.full_like(sc, -float("inf"))).amax(-1)
    assert (lo >= hi - 1e-5).all(), f"not top-k [seed {seed}]"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_select_topk_always_kept(seed, backend):
    B, H, L, D, block = 1, 3, 256, 16, 32  # nk = 8
    q, k, _ = qkv(B, H, L, D, torch.float32)
    ak = torch.tensor([0, 5, 5], device=DEV)
    for sp, kk in ((0.9, 1), (0.5, 4)):
        idx, cnt = K.select_topk(q, k, sp, block=block, always_kept=ak, backend=backend)
        check_lut(idx, cnt, 8, kk, seed)
        vi = idx.long()
        valid = torch.arange(idx.shape[-1], device=DEV) < cnt[..., None]
        for a in (0, 5):
            assert ((vi == a) & valid).any(-1).all(), f"always-kept {a} missing [seed {seed}]"
        nforced = torch.tensor([len({i, 0, 5}) for i in range(8)], device=DEV)
        assert (cnt.long() == torch.clamp(nforced, min=kk)).all(), f"count wrong [seed {seed}]"


def test_select_window(seed):
    F_, Hh, W = 3, 4, 5
    g = torch.stack(torch.meshgrid(torch.arange(F_), torch.arange(Hh), torch.arange(W), indexing="ij"), -1)
    coords = g.reshape(-1, 3).float().to(DEV)
    perm = torch.randperm(coords.shape[0], device=DEV)
    coords = coords[perm] + 0.01 * torch.rand(coords.shape[0], 3, device=DEV)
    n = coords.shape[0]
    scale = (2.0, 1.0, 1.0)
    for sp in (0.0, 0.7, 0.95):
        kk = K.keep_count(n, sp)
        idx, cnt = K.select_window(coords, coords, sp, B=2, H=3, scale=scale)
        assert idx.shape == (2, 3, n, max(kk, 1)) and idx.stride(0) == 0 and cnt.shape == (2, 3, n)
        check_lut(idx, cnt, n, kk, seed)
        d = (((coords[:, None] - coords[None]) / torch.tensor(scale, device=DEV)) ** 2).sum(-1)
        sel = K.block_mask_dense(idx[:1, :1], cnt[:1, :1], n, n, 1)[0, 0]
        far_sel = torch.where(sel, d, torch.full_like(d, -1.0)).amax(-1)
        near_un = torch.where(~sel, d, torch.full_like(d, float("inf"))).amin(-1)
        assert (far_sel <= near_un + 1e-6).all(), f"window not nearest [seed {seed}]"


@needs_triton
@pytest.mark.parametrize("L,D,block", [(300, 64, 64), (128, 128, 128), (77, 16, 32)])
def test_pool_blocks_triton(seed, poison, L, D, block):
    x = qkv(2, 3, L, D, torch.float16, "blhd")[0]
    p = K.pool_blocks(x, block, **TRITON(poison))
    assert_close(p, R.pool_blocks_ref(x, block), 1e-5, 1e-5, "pool", seed)


# ----------------------------------------------------------------------------------------------
# Triton block-sparse attention forward
# ----------------------------------------------------------------------------------------------

FWD_CASES = [  # B, H, L, D, block, dtype, layout
    (1, 2, 200, 64, 64, torch.float16, "blhd"),
    (2, 1, 161, 128, 32, torch.float32, "bhld"),
    (1, 1, 300, 128, 128, torch.float16, "blhd"),
    (1, 3, 96, 64, 32, torch.float32, "blhd"),
]


@needs_triton
@pytest.mark.parametrize("B,H,L,D,block,dtype,layout", FWD_CASES)
def test_sparse_fwd_triton(seed, fwd_path, B, H, L, D, block, dtype, layout):
    q, k, v = qkv(B, H, L, D, dtype, layout)
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    o, lse = K.block_sparse_attention(q, k, v, idx, cnt, block=block, **TRITON(fwd_path))
    assert o.shape == (B, H, L, D) and o.dtype == dtype and lse.dtype == torch.float32
    ro, rl = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    atol, rtol = TOL[dtype]
    assert_close(o, ro, atol, rtol, "triton o", seed)
    assert_close(lse, rl, *TIGHT(1e-4), "triton lse", seed)


@needs_triton
@pytest.mark.parametrize("L,D,block,dtype", [(200, 64, 64, torch.float16), (97, 128, 32, torch.float32)])
def test_sparse_dense_equivalence_triton(seed, poison, L, D, block, dtype):
    B, H = 1, 2
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    nq = K.num_blocks(L, block)
    idx, cnt = K.select_topk(q, k, 0.0, block=block, **TRITON(poison))
    assert (cnt == nq).all()
    o, lse = K.block_sparse_attention(q, k, v, idx, cnt, block=block, **TRITON(poison))
    sd = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    atol, rtol = TOL[dtype]
    assert_close(o, sd, atol, rtol, "triton vs sdpa", seed)
    _, rl = K.attention_ref(q, k, v)
    assert_close(lse, rl, *TIGHT(1e-4), "triton lse vs dense", seed)


@needs_triton
def test_sparse_single_block_and_expanded_lut(seed, poison):
    """k = 1 (own block only, via select_window at sparsity 1) with an expanded (stride-0) LUT."""
    B, H, L, D, block = 2, 2, 150, 64, 32
    q, k, v = qkv(B, H, L, D, torch.float16, "blhd")
    nq = K.num_blocks(L, block)
    coords = torch.rand(nq, 3, device=DEV)
    idx, cnt = K.select_window(coords, coords, 1.0, B, H)
    assert idx.shape[-1] == 1 and (idx[..., 0] == torch.arange(nq, device=DEV)).all()
    o, lse = K.block_sparse_attention(q, k, v, idx, cnt, block=block, **TRITON(poison))
    ro, rl = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    assert_close(o, ro, *TOL[torch.float16], "k=1", seed)
    assert_close(lse, rl, *TIGHT(1e-4), "k=1 lse", seed)


# ----------------------------------------------------------------------------------------------
# linear branch and the sparse+linear pair
# ----------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("B,H,L,D,dtype", [(1, 2, 200, 64, torch.float16), (2, 1, 77, 128, torch.float32)])
def test_linear_triton(seed, poison, B, H, L, D, dtype):
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    o = K.linear_attention(q, k, v, **TRITON(poison))
    ref = R.linear_attention_ref(q.double(), k.double(), v.double())
    atol, rtol = TOL[dtype]
    assert o.dtype == dtype and o.shape == (B, H, L, D)
    assert_close(o, ref, atol, rtol, "linear", seed)


@needs_triton
def test_sparse_linear_triton(seed, fwd_path):
    B, H, L, D, block = 1, 2, 200, 64, 64
    q, k, v = qkv(B, H, L, D, torch.float16, "blhd")
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    os_, ol = K.sparse_linear_attention(q, k, v, idx, cnt, block=block, **TRITON(fwd_path))
    ro, _ = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    rl = R.linear_attention_ref(q.double(), k.double(), v.double())
    assert_close(os_, ro, *TOL[torch.float16], "sparse+linear: sparse", seed)
    assert_close(ol, rl, *TOL[torch.float16], "sparse+linear: linear", seed)
    # torch backend returns the same pair
    ts, tl_ = K.sparse_linear_attention(q.float(), k.float(), v.float(), idx, cnt, block=block, backend="torch")
    assert_close(ts, ro, 1e-5, 1e-5, "torch sparse", seed)
    assert_close(tl_, rl, 2e-3, 2e-3, "torch linear", seed)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

def _grads(fn, q, k, v, dos):
    a, b, c = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    outs = fn(a, b, c)
    loss = sum((o.double() * d).sum() for o, d in zip(outs, dos))
    loss.backward()
    return outs, (a.grad, b.grad, c.grad)


@needs_triton
@pytest.mark.parametrize("B,H,L,D,block,dtype", [(1, 2, 150, 64, 32, torch.float32),
                                                 (1, 1, 200, 128, 64, torch.float16),
                                                 (2, 1, 130, 64, 64, torch.float16)])
def test_sparse_backward_triton(seed, fwd_path, B, H, L, D, block, dtype):
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    do = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    _, gt = _grads(lambda a, b, c: (K.block_sparse_attention(a, b, c, idx, cnt, block=block, **TRITON(fwd_path))[0],),
                   q, k, v, (do,))
    _, gr = _grads(lambda a, b, c: (R.block_sparse_attention_ref(a, b, c, idx, cnt, block)[0],),
                   q.double(), k.double(), v.double(), (do,))
    atol, rtol = ((1e-4, 1e-4) if DEV.type == "cpu" else (1e-2, 1e-2)) if dtype == torch.float32 else (1e-2, 1e-2)
    for x, y, n in zip(gt, gr, "qkv"):
        assert x.dtype == dtype
        assert_close(x, y, atol, rtol, f"sparse d{n}", seed)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_and_sparse_linear_backward_triton(seed, poison, dtype):
    B, H, L, D, block = 1, 2, 150, 64, 32
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    do1 = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    do2 = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    atol, rtol = ((1e-4, 1e-4) if DEV.type == "cpu" else (1e-2, 1e-2)) if dtype == torch.float32 else (1e-2, 1e-2)
    _, gt = _grads(lambda a, b, c: (K.linear_attention(a, b, c, **TRITON(poison)),), q, k, v, (do2,))
    _, gr = _grads(lambda a, b, c: (R.linear_attention_ref(a, b, c),), q.double(), k.double(), v.double(), (do2,))
    for x, y, n in zip(gt, gr, "qkv"):
        assert_close(x, y, atol, rtol, f"linear d{n}", seed)
    _, gt = _grads(lambda a, b, c: K.sparse_linear_attention(a, b, c, idx, cnt, block=block, **TRITON(poison)),
                   q, k, v, (do1, do2))
    _, gr = _grads(lambda a, b, c: K.sparse_linear_attention(a, b, c, idx, cnt, block=block, backend="torch"),
                   q.double(), k.double(), v.double(), (do1, do2))
    for x, y, n in zip(gt, gr, "qkv"):
        assert_close(x, y, atol, rtol, f"sparse+linear d{n}", seed)


@needs_triton
@pytest.mark.parametrize("nq,nk,k,ak", [(19, 19, 5, None), (7, 600, 60, [3, 599, 3]), (12, 9, 2, [8]),
                                        (5, 33, 33, None)])
def test_topk_lut_kernel_vs_torch(seed, poison, nq, nk, k, ak):
    from salad_pack.kernels import _triton_ops
    B, H = 2, 2
    sc = torch.randn(B, H, nq, nk, device=DEV)
    sc[0, 0, 0, :4] = 1.5  # ties
    sc[1, 1, -1, 2] = float("nan")
    akt = None if ak is None else torch.tensor(ak, device=DEV)
    it, ct = _triton_ops.topk_lut(sc, k, akt)
    ir, cr = K.lut_from_scores(sc, k, akt)
    assert it.shape == ir.shape and torch.equal(ct, cr), f"counts differ [seed {seed}]"
    check_lut(it, ct, nk, k, seed)
    # same selected score multiset (tie order may differ) and identical sets where no ties
    sel_t = K.block_mask_dense(it, ct, nq, nk, 1)
    sel_r = K.block_mask_dense(ir, cr, nq, nk, 1)
    s0 = torch.nan_to_num(sc, nan=-1e30)
    st = torch.where(sel_t, s0, torch.zeros_like(s0)).sort(-1).values
    sr = torch.where(sel_r, s0, torch.zeros_like(s0)).sort(-1).values
    assert torch.equal(st, sr), f"selected scores differ [seed {seed}]"
    same = (sel_t == sel_r).all(-1)
    same[0, 0, 0] = True
    assert same.all(), f"selection differs without ties [seed {seed}]"


def test_reference_expanded_window_lut_and_auto_backend(seed):
    """select_window's expanded (stride-0) LUT through the torch path; 'auto' on CPU = torch."""
    B, H, L, D, block = 2, 2, 150, 16, 32
    q, k, v = qkv(B, H, L, D, torch.float32, "blhd")
    nq = K.num_blocks(L, block)
    coords = torch.rand(nq, 3, device=DEV) * 4
    idx, cnt = K.select_window(coords, coords, 0.6, B, H, scale=(1.0, 2.0, 2.0))
    o, lse = K.block_sparse_attention(q, k, v, idx, cnt, block=block, backend="torch")
    ro, rl = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    assert_close(o, ro, 1e-5, 1e-5, "window ref o", seed)
    assert_close(lse, rl, 1e-5, 1e-5, "window ref lse", seed)
    if DEV.type == "cpu":
        oa, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=block)  # auto -> torch on CPU
        assert torch.equal(oa, o)


@needs_triton
@pytest.mark.parametrize("L,block", [(50, 128), (7, 16)])
def test_short_sequence_triton(seed, fwd_path, L, block):
    """L shorter than one block (single ragged block) through fwd, bwd and the linear branch."""
    B, H, D = 1, 2, 64
    q, k, v = qkv(B, H, L, D, torch.float32, "blhd")
    idx, cnt = K.select_topk(q, k, 0.9, block=block, **TRITON(fwd_path))
    assert idx.shape == (B, H, 1, 1) and (idx == 0).all() and (cnt == 1).all()
    do = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    do2 = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    (os_, ol), gt = _grads(lambda a, b, c: K.sparse_linear_attention(a, b, c, idx, cnt, block=block,
                                                                     **TRITON(fwd_path)),
                           q, k, v, (do, do2))
    (rs, rl), gr = _grads(lambda a, b, c: K.sparse_linear_attention(a, b, c, idx, cnt, block=block, backend="torch"),
                          q.double(), k.double(), v.double(), (do, do2))
    sd = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close(os_, sd, *TIGHT(1e-5), "short sparse vs sdpa", seed)
    assert_close(ol, rl, *TIGHT(1e-4), "short linear", seed)
    for x, y, n in zip(gt, gr, "qkv"):
        assert_close(x, y, *TIGHT(1e-4), f"short d{n}", seed)


@needs_triton
def test_out_layout_blhd_forward_and_backward(seed, fwd_path):
    """out_layout='blhd': outputs are (B,H,L,D) views of contiguous (B,L,H,D) buffers (what SALAD's
    (B,L,H*D) caller needs without a transpose copy); values and gradients are unchanged."""
    B, H, L, D, block = 2, 2, 150, 64, 32
    q, k, v = qkv(B, H, L, D, torch.float16, "blhd")
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    o_s, o_l = K.sparse_linear_attention(q, k, v, idx, cnt, block=block, **TRITON(fwd_path), out_layout="blhd")
    o_only, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=block, **TRITON(fwd_path), out_layout="blhd")
    o_lin = K.linear_attention(q, k, v, **TRITON(fwd_path), out_layout="blhd")
    do1 = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    do2 = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    _, gt = _grads(lambda a, b, c: K.sparse_linear_attention(a, b, c, idx, cnt, block=block, **TRITON(fwd_path),
                                                             out_layout="blhd"), q, k, v, (do1, do2))
    for o in (o_s, o_l, o_only, o_lin):
        assert o.shape == (B, H, L, D) and o.transpose(1, 2).is_contiguous()
    ro, _ = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    rl = R.linear_attention_ref(q.double(), k.double(), v.double())
    tol = TOL[torch.float16]
    assert_close(o_s, ro, *tol, "blhd sparse", seed)
    assert_close(o_only, ro, *tol, "blhd sparse only", seed)
    assert_close(o_l, rl, *tol, "blhd linear", seed)
    assert_close(o_lin, rl, *tol, "blhd linear only", seed)
    _, gr = _grads(lambda a, b, c: K.sparse_linear_attention(a, b, c, idx, cnt, block=block, backend="torch"),
                   q.double(), k.double(), v.double(), (do1, do2))
    for x, y, n in zip(gt, gr, "qkv"):
        assert_close(x, y, 1e-2, 1e-2, f"blhd d{n}", seed)


def test_out_layout_torch_reference(seed):
    q, k, v = qkv(1, 2, 100, 32, torch.float32, "bhld")
    nq = K.num_blocks(100, 32)
    idx, cnt = random_lut(1, 2, nq, nq)
    a, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=32, backend="torch")
    b, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=32, backend="torch", out_layout="blhd")
    assert b.transpose(1, 2).is_contiguous() and torch.equal(a, b)
    with pytest.raises(ValueError, match="out_layout"):
        K.linear_attention(q, k, v, backend="torch", out_layout="lbhd")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rowmap_forward_gathers_q_and_scatters_o(seed, fwd_path, backend):
    """block_sparse_attention_rowmap == gather q by the row map, block-sparse attention in tile order,
    scatter the output back, add the bias; pooling through the row map == pooling the gathered rows."""
    B, H, L, D, block = 2, 2, 150, 64, 32
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    perm = torch.randperm(L, device=DEV)
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    bias = torch.randn(B, H * D, device=DEV)
    o = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, backend=backend,
                                        triton_options=fwd_path)
    assert o.shape == (B, H, L, D) and o.transpose(1, 2).is_contiguous() and o.dtype == dtype
    ro, _ = K.masked_attention_ref(q.index_select(2, perm), k, v, idx, cnt, block=block)
    expect = torch.empty_like(ro)
    expect[:, :, perm] = ro
    expect = expect + bias.view(B, H, 1, D).to(expect.dtype)
    assert_close(o, expect, *TOL[dtype], "rowmap o", seed)
    pooled = K.pool_blocks(q, block, backend=backend, triton_options=fwd_path, rowmap=perm)
    assert_close(pooled, R.pool_blocks_ref(q.index_select(2, perm), block), 1e-3, 1e-3, "rowmap pool", seed)
    i1, c1 = K.select_topk(q, k, 0.5, block=block, backend=backend, triton_options=fwd_path, q_rowmap=perm)
    i2, c2 = K.select_topk(q.index_select(2, perm).contiguous(), k, 0.5, block=block, backend=backend,
                           triton_options=fwd_path)
    assert torch.equal(c1, c2) and torch.equal(i1, i2)


@pytest.mark.parametrize("config", [None, dict(Q_TILED=True), dict(Q_TILED=True, BLOCK_N=32)],
                         ids=["table", "q_tiled", "q_tiled_bn32"])
@pytest.mark.parametrize("tma", [False, True])
def test_rowmap_forward_with_tiled_q(seed, config, tma):
    """q_tiled (q already in tile order, as q_pass's tile_q writes it): the row-map forward reads it instead of
    gathering q and gives the same output, with the table's config and with Q_TILED (TMA or pointer loads), with
    a partial last key block, bias, gate and accumulate_into."""
    import triton
    from salad_pack.kernels.options import TritonOptions
    B, H, L, D, block = 2, 2, 150, 64, 64
    dtype = torch.float16
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    perm = torch.randperm(L, device=DEV)
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    idx[:, :, 0] = torch.arange(nq, device=DEV, dtype=idx.dtype)     # one row lists every block, the partial
    cnt[:, :, 0] = nq                                                  # last one too: keys past L masked
    bias, gl = torch.randn(H * D, device=DEV), torch.randn(B, device=DEV)
    base = dict(BLOCK_N=64, USE_TMA=tma)
    configs = {} if config is None else {"fwd": triton.Config({**base, **config}, num_warps=4, num_stages=2)}
    opts = TritonOptions(poison=True, tma=tma, configs=configs)
    qt = R.q_pass_ref(q, perm, block, pool=False, tile_q=True)[-1]
    want = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                           backend="torch")
    got = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                          backend="triton", triton_options=opts, q_tiled=qt)
    assert got.shape == (B, H, L, D) and got.transpose(1, 2).is_contiguous()
    assert_close(got, want, *TOL[dtype], f"rowmap o with q_tiled {config}", seed)
    acc = torch.randn(B, L, H, D, device=DEV).to(dtype).transpose(1, 2)
    want2 = acc.float() + want.float()
    got2 = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                           backend="triton", triton_options=opts, q_tiled=qt,
                                           accumulate_into=acc.clone())
    assert_close(got2, want2, *TOL[dtype], f"accumulated with q_tiled {config}", seed)
    # the plain (training-path) forward with the same config
    o3, lse3 = K.block_sparse_attention(qt, k, v, idx, cnt, block=block, backend="triton", triton_options=opts)
    ro, rlse = K.masked_attention_ref(qt, k, v, idx, cnt, block=block)
    assert_close(o3, ro, *TOL[dtype], f"plain forward {config}", seed)
    assert_close(lse3, rlse, 1e-3, 1e-3, f"plain forward lse {config}", seed)
    assert K.wants_tiled_q(q, block, "torch") is False
    assert K.wants_tiled_q(q, block, "triton", opts) is (config is not None and tma)
    with pytest.raises(ValueError, match="q_tiled"):
        K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, backend="triton", q_tiled=qt[:, :1])


def _hopper() -> bool:
    return DEV.type == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (the Gluon warp-specialised forward is sm90 code)")
@pytest.mark.parametrize("D,L,bn", [(128, 1000, 64), (64, 700, 64), (128, 1000, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [1, 2, 3, 4], ids=["split", "one_consumer", "overlap", "asym"])
def test_gluon_ws_forward_matches_reference(seed, monkeypatch, D, L, bn, dtype, mode):
    """The experimental Gluon warp-specialised forward (fwd config key GLUON_WS, each partitioning and walk): on the
    row-map path with random key lists of random lengths (some empty), a partial last key block, a gated bias and
    accumulate_into, the same output as the plain-torch reference, and it really ran (not the Triton kernel)."""
    import triton
    from salad_pack.kernels import _gluon_ws, _triton_ops as ops
    from salad_pack.kernels.options import TritonOptions
    ran = []
    launch = _gluon_ws.launch
    monkeypatch.setattr(_gluon_ws, "launch", lambda *a, **kw: ran.append(kw) or launch(*a, **kw))
    tol = TOL[torch.float16] if dtype == torch.float16 else (1e-2, 2e-2)
    B, H, block = 2, 3, 128
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    perm = torch.randperm(L, device=DEV)
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    idx[:, :, 0] = torch.arange(nq, device=DEV, dtype=idx.dtype)     # one list with every block, the partial
    cnt[:, :, 0] = nq                                                  # last one included
    cnt[0, 0, 1] = 0                                                   # and one empty list
    bias, gl = torch.randn(H * D, device=DEV), torch.randn(B, device=DEV)
    split = _gluon_ws.MODES[mode]["split"]
    fits = [ns for ns in (2, 3) if _gluon_ws.smem_bytes(block, bn, D, ns, split) <= _gluon_ws.SMEM_LIMIT]
    assert fits == ([2] if (D, bn) == (128, 128) else [2, 3])
    for ns in (2, 3):     # (a ring that does not fit in shared memory runs the Triton kernel instead)
        opts = TritonOptions(poison=True, configs={"fwd": triton.Config(
            dict(BLOCK_N=bn, USE_TMA=True, GLUON_WS=mode), num_warps=4, num_stages=ns)})
        assert ops._gluon_ws_ok(q, k, v, block, bn, ns, mode) == (ns in fits)
        want = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                               backend="torch")
        got = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                              **TRITON(opts))
        assert_close(got, want, *tol, f"Gluon WS mode {mode} forward, {ns} stages", seed)
        acc = torch.randn(B, L, H, D, device=DEV).to(dtype).transpose(1, 2)
        got2 = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                               accumulate_into=acc.clone(), **TRITON(opts))
        assert_close(got2, acc.float() + want.float(), *tol, f"Gluon WS mode {mode} accumulated, {ns} stages", seed)
    assert all(kw["split"] == split for kw in ran), ran
    assert len(ran) == 2 * len(fits), ran


@pytest.mark.skipif(not ptxas_bundled(), reason="triton without its NVIDIA backend / ptxas")
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter checks results, not compilation: every kernel path is compiled for sm90 by the
    real Triton compiler (no GPU needed, nothing launched; benchmarks/kernel_codegen.py), and the
    tuned sparse kernels keep their launch settings and fit the H100/H200's 227 KB of shared memory."""
    out = tmp_path / "codegen.json"
    script = Path(__file__).parents[1] / "benchmarks" / "kernel_codegen.py"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ks = json.loads(out.read_text())["kernels"]
    names = {key.split(":")[1] for key in ks}
    assert names == {"_pool_kernel", "_topk_lut_kernel", "_sparse_fwd_kernel", "_linear_state_kernel",
                     "_linear_apply_kernel", "_linear_bwd_q_kernel", "_linear_bwd_kv_kernel", "_bwd_preprocess_kernel",
                     "_sparse_bwd_dq_kernel", "_sparse_bwd_dkdv_kernel", "_centroid_bwd_kernel", "_kv_pass_kernel",
                     "_q_pass_kernel", "_token_sum_kernel", "_sparse_fwd_gluon_ws"}, names
    assert all(k["shared"] <= 227 * 1024 for k in ks.values()), {n: k["shared"] for n, k in ks.items()}
    fwd = ks["fwd_tma:_sparse_fwd_kernel"]
    assert (fwd["num_warps"], fwd["num_stages"]) == (4, 2)          # the D=128 16-bit entry of the table
    assert any(op.startswith("wgmma") for op in fwd["hist"]), "no Hopper tensor-core instructions"
    # ptxas -v: the D=128 forward's wgmmas stay asynchronous (no C75xx "wgmma serialized" warning), on the
    # TMA path and on the inference path (row map + gated bias)
    for key in ("fwd_tma:_sparse_fwd_kernel", "fwd_rowmap_gated_bias:_sparse_fwd_kernel"):
        assert isinstance(ks[key]["registers"], int), ks[key]
        assert ks[key]["ptxas_warnings"] == [], (key, ks[key]["ptxas_warnings"])
    # the experimental Gluon forward: a producer warpgroup and two consumer warpgroups (12 warps, setmaxnreg),
    # no spills, no serialised wgmma
    for key in ("fwd_gluon_ws:_sparse_fwd_gluon_ws", "fwd_gluon_ws_d64:_sparse_fwd_gluon_ws"):
        w = ks[key]
        assert w["num_warps"] == 12 and any(op.startswith("setmaxnreg") for op in w["hist"]), (key, w["num_warps"])
        assert w["spill_store_bytes"] == 0 and w["ptxas_warnings"] == [], (key, w["spill_store_bytes"],
                                                                          w["ptxas_warnings"])


# ----------------------------------------------------------------------------------------------
# tuned-config table and per-call options
# ----------------------------------------------------------------------------------------------

@needs_triton
def test_config_overrides_are_scoped():
    """kernels.config_overrides: inside the block the kernels use the given entries (below a call's own
    TritonOptions.configs), nested blocks stack, and on leaving it the table's entries are back."""
    import triton
    from salad_pack.kernels import _triton_ops as ops
    from salad_pack.kernels.options import TritonOptions
    table = ops.config_for("fwd", 128, torch.bfloat16, 32760)
    tiled = triton.Config(dict(table.kwargs, Q_TILED=True), num_warps=4, num_stages=1)
    own = triton.Config(dict(table.kwargs), num_warps=8, num_stages=2)
    q = torch.zeros(1, 1, 256, 128, dtype=torch.float16, device=DEV)
    assert not K.wants_tiled_q(q, 128, "triton")
    with K.config_overrides({"fwd": tiled}):
        assert ops.config_for("fwd", 128, torch.bfloat16, 32760) is tiled
        assert K.wants_tiled_q(q, 128, "triton") and not K.wants_tiled_q(q, 128, "torch")
        assert ops.config_for("fwd", 128, torch.bfloat16, 32760, TritonOptions(configs={"fwd": own})) is own
        with K.config_overrides({"q_pass": own}):
            assert ops.config_for("q_pass", 128, torch.bfloat16, 32760) is own
            assert ops.config_for("fwd", 128, torch.bfloat16, 32760) is tiled
        assert ops.config_for("q_pass", 128, torch.bfloat16, 32760) is not own
    assert ops.config_for("fwd", 128, torch.bfloat16, 32760) is table
    with pytest.raises(ValueError, match="unknown kernel config"):
        with K.config_overrides({"fwd2": tiled}):
            pass


@needs_triton
def test_config_table_is_read_only_and_keyed():
    from salad_pack.kernels import _triton_ops as ops
    cfg = ops.config_for("fwd", 128, torch.bfloat16, 32760)
    assert (cfg.kwargs, cfg.num_warps, cfg.num_stages) == ({"BLOCK_N": 64, "USE_TMA": True}, 4, 2)
    dq = ops.config_for("bwd_dq", 128, torch.float16, 1000)
    assert (dq.kwargs["BLOCK_N"], dq.num_warps, dq.num_stages) == (64, 8, 4)
    assert ops.config_for("fwd", 128, torch.float32, 1000).num_stages == 1       # fp32: one stage
    assert ops.config_for("lin_state", 64, torch.float32, 1000).kwargs["BLOCK_N"] == 64
    assert ops.config_for("fwd", 32, torch.float16, 1000) is ops.CONFIGS[("fwd", 128, "16bit", "short")]
    assert ops.config_for("fwd", 128, torch.bfloat16, 75600) is ops.CONFIGS[("fwd", 128, "16bit", "long")]
    with pytest.raises(TypeError):
        ops.CONFIGS[("fwd", 128, "16bit", "short")] = cfg
    with pytest.raises(ValueError, match="fwd_long"):
        K.TritonOptions(configs={"fwd_long": cfg})


@needs_triton
def test_explicit_config_per_call(seed, poison):
    """A config passed for one call (what the benchmark's sweep does) runs that tiling and leaves the
    table as it was; the results match the reference either way."""
    import triton as _triton
    from salad_pack.kernels import _triton_ops as ops
    before = dict(ops.CONFIGS)
    B, H, L, D, block = 1, 2, 200, 64, 64
    q, k, v = qkv(B, H, L, D, torch.float16, "blhd")
    nq = K.num_blocks(L, block)
    idx, cnt = random_lut(B, H, nq, nq)
    c = _triton.Config({"BLOCK_N": 16, "USE_TMA": False}, num_warps=4, num_stages=1)
    opts = K.TritonOptions(poison=True, configs={"fwd": c, "lin_apply": _triton.Config(
        {"BLOCK_M": 16, "PROGRAMS": 4}, num_warps=4, num_stages=1)})
    o, lse = K.block_sparse_attention(q, k, v, idx, cnt, block=block, **TRITON(opts))
    ol = K.linear_attention(q, k, v, **TRITON(opts))
    ro, rl = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    assert_close(o, ro, *TOL[torch.float16], "explicit fwd config", seed)
    assert_close(lse, rl, *TIGHT(1e-4), "explicit fwd config lse", seed)
    assert_close(ol, R.linear_attention_ref(q.double(), k.double(), v.double()), *TOL[torch.float16],
                 "explicit linear config", seed)
    assert dict(ops.CONFIGS) == before


@needs_triton
def test_triton_path_rejects_mixed_dtypes(seed):
    q = torch.randn(1, 1, 64, 16, device=DEV)
    idx, cnt = full_lut(1, 1, 1, 1)
    with pytest.raises(ValueError, match="share one dtype"):
        K.block_sparse_attention(q, q, q.half(), idx, cnt, block=64, backend="triton")
