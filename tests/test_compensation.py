"""Centroid compensation of skipped key blocks (issue 12): every key block a query block skips adds
one pseudo-token (its mean key and mean value, logit scale*q.kbar + log(n_tokens)) to the same
softmax.

Torch reference (chunked, autograd) vs an explicit dense construction (fp64), the Triton forward
(CPU interpreter) vs that construction on fresh random inputs (seed printed; replay with
SALAD_TEST_SEED=<seed>), the rowmap inference form, sparsity 0 == dense, the salad_core paths and
the node input.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# importing test_kernels (below) selects the Triton CPU interpreter when there is no GPU
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from test_kernels import (  # noqa: E402  (seed / poison / fwd_path fixtures: tests/kernel_fixtures.py)
    DEV, TIGHT, TOL, TRITON, _grads, assert_close, full_lut, needs_triton, qkv, random_lut)

import salad_pack.kernels as K  # noqa: E402
from salad_pack.kernels import reference as R  # noqa: E402


def _lut(B, H, L, Lk, block, kind):
    nq, nk = K.num_blocks(L, block), K.num_blocks(Lk, block)
    if kind == "full":
        return full_lut(B, H, nq, nk)
    return random_lut(B, H, nq, nk)


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,L,Lk,D,block", [(2, 2, 150, 150, 16, 32), (1, 3, 97, 130, 8, 16),
                                              (1, 1, 64, 64, 32, 64)])
def test_reference_vs_dense_construction(seed, B, H, L, Lk, D, block):
    q, k, v = qkv(B, H, L, D, torch.float64, Lk=Lk)
    idx, cnt = _lut(B, H, L, Lk, block, "random")
    ro, rl = K.compensated_attention_ref(q, k, v, idx, cnt, block=block)
    for chunk in (R._CHUNK_BYTES, 1):              # one chunk, and one query block per chunk
        o, lse = R.block_sparse_attention_ref(q, k, v, idx, cnt, block, compensate=True, chunk_bytes=chunk)
        assert_close(o, ro, 1e-10, 1e-10, f"ref o (chunk {chunk})", seed)
        assert_close(lse, rl, 1e-10, 1e-10, f"ref lse (chunk {chunk})", seed)
    # precomputed means give the same result; the compensated output differs from plain sparse
    o2, _ = R.block_sparse_attention_ref(q, k, v, idx, cnt, block, compensate=True,
                                         k_mean=R.pool_blocks_ref(k, block, torch.float64),
                                         v_mean=R.pool_blocks_ref(v, block, torch.float64))
    assert_close(o2, ro, 1e-10, 1e-10, "ref o, given means", seed)
    plain, _ = R.block_sparse_attention_ref(q, k, v, idx, cnt, block)
    if (cnt < K.num_blocks(Lk, block)).any():
        assert not torch.allclose(plain, o2), f"compensation changed nothing [seed {seed}]"


def test_reference_counts_and_skipped():
    assert R.block_counts(150, 32).tolist() == [32, 32, 32, 32, 22]
    idx = torch.tensor([[[[0, 2, -1], [1, -1, -1]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    assert R.skipped_blocks(idx, cnt, 4).tolist() == [[[[False, True, False, True], [True, False, True, True]]]]


def test_reference_sparsity0_is_dense(seed):
    B, H, L, D, block = 1, 2, 150, 16, 32
    q, k, v = qkv(B, H, L, D, torch.float64)
    idx, cnt = full_lut(B, H, K.num_blocks(L, block), K.num_blocks(L, block))
    o, lse = R.block_sparse_attention_ref(q, k, v, idx, cnt, block, compensate=True)
    plain, plse = R.block_sparse_attention_ref(q, k, v, idx, cnt, block)
    # (bit-equal on CPU; a GPU may order the fp64 sums differently)
    assert_close(o, plain, 1e-13, 1e-13, "sparsity 0: compensated vs plain", seed)
    assert_close(lse, plse, 1e-13, 1e-13, "sparsity 0: compensated vs plain lse", seed)
    d, dl = K.attention_ref(q, k, v)
    assert_close(o, d, 1e-12, 1e-12, "sparsity 0 + compensation vs dense", seed)


def test_reference_backward_vs_dense_construction(seed):
    """Gradients flow through the block means to every key and value (fp64 autograd of both forms)."""
    B, H, L, D, block = 1, 2, 100, 8, 16
    q, k, v = (t.requires_grad_() for t in qkv(B, H, L, D, torch.float64))
    idx, cnt = _lut(B, H, L, L, block, "random")
    do = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    o, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=block, backend="torch", compensate=True)
    g = torch.autograd.grad(o, (q, k, v), do)
    ro, _ = K.compensated_attention_ref(q, k, v, idx, cnt, block=block)
    rg = torch.autograd.grad(ro, (q, k, v), do)
    for name, a, b in zip("qkv", g, rg):
        assert_close(a, b, 1e-10, 1e-10, f"d{name}", seed)
    # every key of a block some query block skips gets a gradient through its block's mean
    assert (g[1].abs().sum(-1) > 0).all(), f"[seed {seed}]"


# ----------------------------------------------------------------------------------------------
# Triton forward (interpreter on CPU)
# ----------------------------------------------------------------------------------------------

CASES = [  # B, H, L, Lk, D, block, dtype, layout
    (1, 2, 200, 200, 64, 64, torch.float16, "blhd"),
    (2, 1, 161, 161, 32, 32, torch.float32, "bhld"),
    (1, 2, 150, 230, 16, 16, torch.float16, "bhld"),    # cross length, ragged tails, many centroid tiles
    (1, 1, 300, 300, 128, 128, torch.float32, "blhd"),
]


@needs_triton
@pytest.mark.parametrize("compensate", [False, True], ids=["plain", "centroid"])
@pytest.mark.parametrize("B,H,L,Lk,D,block,dtype,layout", CASES)
def test_triton_forward_vs_reference(seed, poison, B, H, L, Lk, D, block, dtype, layout, compensate):
    q, k, v = qkv(B, H, L, D, dtype, layout, Lk=Lk)
    idx, cnt = _lut(B, H, L, Lk, block, "random")
    with torch.no_grad():
        o, lse = K.block_sparse_attention(q, k, v, idx, cnt, block=block, compensate=compensate, **TRITON(poison))
    if compensate:
        ro, rl = K.compensated_attention_ref(q, k, v, idx, cnt, block=block)
    else:
        ro, rl = K.masked_attention_ref(q, k, v, idx, cnt, block=block)
    assert o.shape == (B, H, L, D) and o.dtype == dtype
    assert_close(o, ro, *TOL[dtype], f"triton o (compensate={compensate})", seed)
    assert_close(lse, rl, *TIGHT(1e-4), f"triton lse (compensate={compensate})", seed)
    if compensate:   # the torch path agrees too
        to, tl_ = K.block_sparse_attention(q, k, v, idx, cnt, block=block, backend="torch", compensate=True)
        assert_close(o, to.double(), *TOL[dtype], "triton vs torch path", seed)


@needs_triton
def test_triton_tma_path_and_given_means(seed, fwd_path):
    B, H, L, D, block = 1, 2, 200, 64, 64
    q, k, v = qkv(B, H, L, D, torch.float16, "blhd")
    idx, cnt = _lut(B, H, L, L, block, "random")
    km, vm = K.pool_blocks(k, block, **TRITON(fwd_path)), K.pool_blocks(v, block, **TRITON(fwd_path))
    with torch.no_grad():
        o, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=block, compensate=True, **TRITON(fwd_path))
        o2, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=block, compensate=True, k_mean=km, v_mean=vm,
                                         **TRITON(fwd_path))
    assert torch.equal(o, o2), f"[seed {seed}]"
    ro, _ = K.compensated_attention_ref(q, k, v, idx, cnt, block=block)
    assert_close(o, ro, *TOL[torch.float16], f"triton ({'tma' if fwd_path.tma else 'ptr'})", seed)


@needs_triton
@pytest.mark.parametrize("L,D,block,dtype", [(200, 64, 64, torch.float16), (97, 32, 32, torch.float32)])
def test_triton_sparsity0_compensated_is_dense(seed, poison, L, D, block, dtype):
    """No skipped block: the compensated kernel equals the plain kernel bit for bit, and dense attention."""
    B, H = 1, 2
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    idx, cnt = K.select_topk(q, k, 0.0, block=block, **TRITON(poison))
    with torch.no_grad():
        oc, lc = K.block_sparse_attention(q, k, v, idx, cnt, block=block, compensate=True, **TRITON(poison))
        op, lp = K.block_sparse_attention(q, k, v, idx, cnt, block=block, **TRITON(poison))
    assert torch.equal(oc, op) and torch.equal(lc, lp), f"[seed {seed}]"
    d, dl = K.attention_ref(q, k, v)
    assert_close(oc, d, *TOL[dtype], "sparsity 0 + compensation vs dense", seed)
    assert_close(lc, dl, *TIGHT(1e-4), "lse", seed)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rowmap_compensated(seed, poison, backend):
    """The inference form (q gathered / output scattered through the row map, bias) with compensation."""
    B, H, L, D, block = 2, 2, 150, 32, 32
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = qkv(B, H, L, D, dtype, "blhd")
    perm = torch.randperm(L, device=DEV)
    idx, cnt = K.select_topk(q, k, 0.6, block=block, backend=backend, q_rowmap=perm)
    bias = torch.randn(B, H * D, device=DEV)
    km = K.pool_blocks(k, block, backend=backend)
    i2, c2 = K.select_topk(q, k, 0.6, block=block, backend=backend, q_rowmap=perm, k_pooled=km)
    assert torch.equal(idx, i2) and torch.equal(cnt, c2), f"k_pooled changed the selection [seed {seed}]"
    o = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, backend=backend,
                                        compensate=True, k_mean=km, triton_options=poison)
    ro, _ = K.compensated_attention_ref(q.index_select(2, perm), k, v, idx, cnt, block=block)
    expect = torch.empty_like(ro)
    expect[:, :, perm] = ro
    expect = expect + bias.view(B, H, 1, D).to(expect.dtype)
    assert_close(o, expect, *TOL[dtype], "rowmap + compensation", seed)


BWD_CASES = [  # B, H, L, Lk, D, block, dtype
    (1, 2, 100, 100, 16, 16, torch.float32),
    (2, 1, 97, 130, 32, 32, torch.float32),      # cross length, ragged tails of both
    (1, 1, 150, 150, 64, 32, torch.float16),
]


@needs_triton
@pytest.mark.parametrize("B,H,L,Lk,D,block,dtype", BWD_CASES)
def test_triton_backward_vs_reference(seed, fwd_path, B, H, L, Lk, D, block, dtype):
    """Triton backward with compensation (dq through the centroids, dk/dv through the block means)
    against fp64 autograd of the torch reference."""
    q, k, v = qkv(B, H, L, D, dtype, "blhd", Lk=Lk)
    idx, cnt = _lut(B, H, L, Lk, block, "random")
    do = torch.randn(B, H, L, D, device=DEV, dtype=torch.float64)
    (o,), gt = _grads(lambda a, b, c: (K.block_sparse_attention(a, b, c, idx, cnt, block=block, compensate=True,
                                                                **TRITON(fwd_path))[0],), q, k, v, (do,))
    (ro,), gr = _grads(lambda a, b, c: (R.block_sparse_attention_ref(a, b, c, idx, cnt, block, compensate=True)[0],),
                       q.double(), k.double(), v.double(), (do,))
    assert_close(o, ro, *TOL[dtype], "compensated o", seed)
    tol = TIGHT(1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
    for x, y, n in zip(gt, gr, "qkv"):
        assert x.dtype == dtype
        assert_close(x, y, *tol, f"compensated d{n}", seed)


@needs_triton
def test_triton_given_means_with_grads_use_the_reference(seed, poison):
    """Means passed in that need gradients: the torch reference runs (autograd into the means)."""
    B, H, L, D, block = 1, 2, 100, 16, 16
    q, k, v = (t.requires_grad_() for t in qkv(B, H, L, D, torch.float32))
    km = K.pool_blocks(k, block, backend="torch")      # differentiable in k
    idx, cnt = _lut(B, H, L, L, block, "random")
    o, _ = K.block_sparse_attention(q, k, v, idx, cnt, block=block, compensate=True, k_mean=km, **TRITON(poison))
    o.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ro, _ = R.block_sparse_attention_ref(q, k, v, idx, cnt, block, compensate=True)
    assert_close(o.detach(), ro.detach().double(), 1e-6, 1e-6, "given means vs reference", seed)


# ----------------------------------------------------------------------------------------------
# salad_core and the node
# ----------------------------------------------------------------------------------------------

def _salad_inputs(B, L, H, D, dtype=torch.float32):
    return [torch.randn(B, L, H * D, device=DEV).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("pattern", ["topk", "window"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_salad_core_centroid_paths(seed, pattern, backend):
    from salad_pack.salad_core.attention import SaladConfig, salad_self_attention, select_blocks
    from salad_pack.salad_core.tiling import TileLayout
    from salad_pack.salad_core.weights import SaladWeights
    H, D, grid, nf = 2, 16, (2, 8, 24), 30
    L = nf + 2 * 8 * 24
    q, k, v = _salad_inputs(1, L, H, D)
    cfg = SaladConfig(sparsity=0.7, pattern=pattern, backend=backend, compensation="centroid")
    with torch.no_grad():
        out = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, config=cfg)
        plain = salad_self_attention(q, k, v, H, grid=grid, n_front=nf,
                                     config=SaladConfig(sparsity=0.7, pattern=pattern, backend=backend))
    assert not torch.allclose(out, plain), f"[seed {seed}]"
    # explicit construction in tile order
    lay = TileLayout.get(grid, nf, 0, cfg.tile, DEV)
    th = lambda t: t.view(1, L, H, D).index_select(1, lay.perm).permute(0, 2, 1, 3)  # noqa: E731
    idx, cnt = select_blocks(th(q), th(k), lay, cfg)
    ro, _ = K.compensated_attention_ref(th(q), th(k), th(v), idx, cnt, block=128)
    ro = ro.permute(0, 2, 1, 3).index_select(1, lay.inv_perm).reshape(1, L, H * D)
    tol = TOL[torch.float32] if backend == "triton" else (1e-5, 1e-5)   # (TF32 dots on a GPU)
    assert_close(out, ro, *tol, "salad centroid vs construction", seed)
    # autograd path (proj trainable): same forward, gradients reach q, k, v
    w = SaladWeights.new(H * D, H, 2)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    og = salad_self_attention(qg, kg, vg, H, grid=grid, n_front=nf, config=cfg)
    with torch.no_grad():
        oi = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, proj=w.proj_for(1), config=cfg)
    assert_close(og.detach(), ro, *tol, "autograd path", seed)
    assert_close(oi, ro, *tol, "zero Proj == sparse-only", seed)
    og.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (qg, kg, vg))


def test_salad_core_centroid_sparsity0_is_dense(seed):
    from salad_pack.salad_core.attention import SaladConfig, dense_reference_attention, salad_self_attention
    H, D, grid = 2, 16, (2, 8, 16)
    L = 2 * 8 * 16
    q, k, v = _salad_inputs(1, L, H, D)
    out = salad_self_attention(q, k, v, H, grid=grid,
                               config=SaladConfig(sparsity=0.0, pattern="topk", backend="torch",
                                                  compensation="centroid"))
    assert_close(out, dense_reference_attention(q, k, v, H).double(), 1e-5, 1e-5, "dense", seed)


def test_config_compensation_validation():
    from salad_pack.salad_core.attention import SaladConfig
    assert SaladConfig().compensation == "none"
    with pytest.raises(ValueError, match="compensation"):
        SaladConfig(compensation="mean")


def test_node_compensation_input(comfy_inprocess, tiny_models):
    from salad_pack.nodes.apply import SALADApplyAttention
    opt = SALADApplyAttention.INPUT_TYPES()["optional"]["compensation"]
    assert opt[0] == ["none", "centroid"] and opt[1]["default"] == "none" and opt[1]["tooltip"]
    base = comfy_inprocess.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]))
    node = SALADApplyAttention()
    key = "diffusion_model.blocks.0.self_attn.forward"
    m = node.apply(base, 0.9, "topk", 0.0, 1.0, "", "torch", compensation="centroid")[0]
    assert m.object_patches[key]._salad_state.config.compensation == "centroid"
    m0 = node.apply(base, 0.9, "topk", 0.0, 1.0, "", "torch")[0]
    assert m0.object_patches[key]._salad_state.config.compensation == "none"
    with pytest.raises(ValueError, match="compensation"):
        node.apply(base, 0.9, "topk", 0.0, 1.0, "", "torch", compensation="mean")
