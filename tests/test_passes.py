"""The inference passes (kernels.kv_pass / kernels.q_pass) and the inference path of SALAD attention built on
them: Triton kernels (CPU interpreter) vs the plain-torch references, and the whole inference call vs the
autograd path (separate branches + mix_branches), on fresh random inputs (seed printed, outputs poisoned).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from triton_env import have_triton, kernel_device, use_interpreter_without_cuda  # noqa: E402

use_interpreter_without_cuda()   # before the kernels are first imported
from _pack import register  # noqa: E402

register()

import torch  # noqa: E402

import salad_pack.kernels as K  # noqa: E402
from salad_pack.kernels import reference as R  # noqa: E402
from salad_pack.salad_core.attention import SaladConfig, salad_self_attention  # noqa: E402

pytestmark = pytest.mark.skipif(not have_triton(), reason="triton cannot be imported")
DEV = kernel_device()
# fp32 dots: exact fp32 in the interpreter, TF32 tensor cores on the GPU
TOL32 = 1e-5 if DEV.type == "cpu" else 2e-3


def _close(a, b, tol, what, seed):
    a, b = a.float(), b.float()
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten?) [seed {seed}]"
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol} [seed {seed}]"


def _blhd(B, H, L, D, dtype):
    return torch.randn(B, L, H, D, device=DEV).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("L,D,block", [(300, 32, 64), (256, 64, 128), (77, 16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_pass_matches_reference(seed, poison, L, D, block, dtype):
    """One read of K and V: tile-ordered copies (exact), k / v block means and the packed linear state."""
    B, H = 2, 2
    k, v = _blhd(B, H, L, D, dtype), _blhd(B, H, L, D, dtype)
    perm = torch.randperm(L, device=DEV)
    got = K.kv_pass(k, v, perm, block, pool_k=True, pool_v=True, backend="triton", triton_options=poison)
    want = R.kv_pass_ref(k, v, perm, block, True, True, True)
    for name, a, b in zip(("kt", "vt"), got[:2], want[:2]):
        assert a.shape == (B, H, L, D) and a.transpose(1, 2).is_contiguous(), name
        assert torch.equal(a, b), f"{name} differs [seed {seed}]"
    for name, a, b in zip(("k_mean", "v_mean", "state"), got[2:], want[2:]):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        _close(a, b, TOL32 if dtype == torch.float32 else 2e-3, name, seed)
    # the flags switch the extra outputs off (a pure tile-order gather is left)
    kt, vt, km, vm, st = K.kv_pass(k, v, perm, block, pool_k=False, pool_v=False, linear_state=False,
                                   backend="triton", triton_options=poison)
    assert km is None and vm is None and st is None and torch.equal(kt, want[0]) and torch.equal(vt, want[1])


def test_kv_pass_wave_fit_rule_and_split_counts(seed, monkeypatch):
    """WAVE_FIT (the table's kv_pass entry): half of PROGRAMS when whole splits per head fill >= 95% of that
    half, else PROGRAMS (so Wan-1.3B's 12 heads run 264 programs and Wan-14B's 40 keep 528, as measured on the
    H200); and the pass is right with either split count (fewer splits: fewer partial states to sum)."""
    import triton
    from salad_pack.kernels import _triton_ops as ops
    assert [ops._wave_fit(bh, 528) for bh in (1, 2, 12, 24, 40, 80, 264, 300)] == [264, 264, 264, 264, 528, 528,
                                                                                   264, 528]
    assert ops.config_for("kv_pass", 128, torch.bfloat16, 32760).kwargs["WAVE_FIT"] is True
    B, H, L, D, block = 1, 2, 500, 32, 32              # 16 blocks; PROGRAMS 16: 4 splits per head with the rule
    k, v = _blhd(B, H, L, D, torch.float16), _blhd(B, H, L, D, torch.float16)
    perm = torch.randperm(L, device=DEV)
    want = R.kv_pass_ref(k, v, perm, block, True, False, True)
    splits, real = [], ops._splits
    monkeypatch.setattr(ops, "_splits", lambda *a: splits.append(real(*a)[0]) or real(*a))   # what the launch uses
    for fit in (True, False):
        conf = triton.Config({"BLOCK_N": 32, "PROGRAMS": 16, "WAVE_FIT": fit}, num_warps=4, num_stages=1)
        opts = K.TritonOptions(poison=True, configs={"kv_pass": conf})
        got = K.kv_pass(k, v, perm, block, pool_k=True, pool_v=False, backend="triton", triton_options=opts)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"WAVE_FIT {fit}: copies"
        _close(got[2], want[2], 2e-3, f"WAVE_FIT {fit}: k_mean", seed)
        _close(got[4], want[4], 2e-3, f"WAVE_FIT {fit}: state", seed)
    assert splits == [4, 8], splits


@pytest.mark.parametrize("B,L,C,strided", [(1, 300, 96, False), (2, 1000, 320, True), (3, 7, 40, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_mean_matches_reference(seed, B, L, C, strided, dtype):
    """The gate's mean over the tokens of a block input (B, L, C): the split-L kernel (columns not a multiple
    of its block, rows not a multiple of a split, a strided token axis) against torch.mean in fp32."""
    x = torch.randn(B, L, 2 * C if strided else C, device=DEV).to(dtype) + 0.5
    if strided:
        x = x[:, :, :C]        # row stride 2C: not contiguous
    got = K.token_mean(x, backend="triton")
    want = R.token_mean_ref(x)
    assert got.shape == (B, C) and got.dtype == torch.float32
    _close(got, want, 1e-5, "token mean", seed)
    assert torch.equal(K.token_mean(x, backend="torch"), want)
    with pytest.raises(ValueError, match="token_mean"):
        K.token_mean(x[0], backend="triton")


@pytest.mark.parametrize("L,D,block", [(300, 32, 64), (200, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # (the interpreter's bf16 tl.dot is wrong)
@pytest.mark.parametrize("gated", [False, True])
def test_q_pass_matches_reference(seed, poison, L, D, block, dtype, gated):
    """One read of Q: block means in tile order and G * the linear branch in the caller's row order."""
    B, H = 2, 3
    q, k, v = (_blhd(B, H, L, D, dtype) for _ in range(3))
    perm = torch.randperm(L, device=DEV)
    st = R.kv_pass_ref(k, v, perm, block)[-1]
    gl = torch.randn(B, device=DEV) if gated else None
    qm, ol = K.q_pass(q, perm, block, state=st, eps=1e-5, gate_logit=gl, backend="triton", triton_options=poison)
    rqm, rol = R.q_pass_ref(q, perm, block, st, 1e-5, gl)
    _close(qm, rqm, TOL32 if dtype == torch.float32 else 1e-3, "q_mean", seed)
    assert ol.dtype == dtype and ol.transpose(1, 2).is_contiguous()
    _close(ol, rol, TOL32 if dtype == torch.float32 else 1.5e-2, "o_linear", seed)
    # == the linear branch of kernels.linear_attention, times G
    lin = R.linear_attention_ref(q.float(), k.float(), v.float())
    G = torch.sigmoid(gl).view(B, 1, 1, 1) if gated else 1.0
    _close(ol, lin * G, 10 * TOL32 if dtype == torch.float32 else 1.5e-2, "o_linear vs linear_attention", seed)
    qm2, ol2 = K.q_pass(q, perm, block, state=None, backend="triton", triton_options=poison)
    assert ol2 is None
    # tile_q: the same outputs plus q in tile order, exactly (a copy)
    qm3, ol3, qt = K.q_pass(q, perm, block, state=st, eps=1e-5, gate_logit=gl, backend="triton",
                            triton_options=poison, tile_q=True)
    assert torch.equal(qm3, qm) and torch.equal(ol3, ol) and qt.transpose(1, 2).is_contiguous()
    assert torch.equal(qt, q.index_select(2, perm)), f"tile-ordered q differs [seed {seed}]"
    assert torch.equal(R.q_pass_ref(q, perm, block, st, 1e-5, gl, tile_q=True)[-1], qt)
    _close(qm2, rqm, TOL32 if dtype == torch.float32 else 1e-3, "q_mean (pool only)", seed)
    with pytest.raises(ValueError, match="linear state"):
        K.q_pass(q, perm, block, state=st[:, :-1], backend="triton")


@pytest.mark.parametrize("variant", [dict(S_PARTS=1), dict(S_PARTS=1, DEN_DOT=True), dict(S_PARTS=2, DEN_DOT=True),
                                     dict(S_PARTS=1, DEN_DOT=True, BLOCK_M=128)])
def test_q_pass_variants_match_reference(seed, variant):
    """The q_pass variants the pass sweep measures (S as one 16-bit dot operand; the denominator on the tensor
    cores): same results as the reference within 16-bit rounding.  On the GPU also bf16, whose single-operand
    error must stay within twice the two-part error plus bf16's own rounding of the output."""
    import triton
    from salad_pack.kernels.options import TritonOptions
    B, H, L, D = 2, 3, 300, 64
    block = max(64, variant.get("BLOCK_M", 64))         # rows per step are capped at the block
    dtypes = [torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])
    for dtype in dtypes:
        q, k, v = (_blhd(B, H, L, D, dtype) for _ in range(3))
        perm = torch.randperm(L, device=DEV)
        st = R.kv_pass_ref(k, v, perm, block)[-1]
        gl = torch.randn(B, device=DEV)
        conf = triton.Config({"BLOCK_M": 64, "PROGRAMS": 8, **variant}, num_warps=4, num_stages=1)   # (the
        # D=128 table entry: S_PARTS 1, DEN_DOT, 128 rows per step)
        opts = TritonOptions(poison=True, configs={"q_pass": conf})
        qm, ol = K.q_pass(q, perm, block, state=st, eps=1e-5, gate_logit=gl, backend="triton", triton_options=opts)
        rqm, rol = R.q_pass_ref(q.double(), perm, block, st.double(), 1e-5, gl)
        _close(qm, rqm, 1e-3, f"q_mean {variant} {dtype}", seed)
        _close(ol, rol, 1.5e-2, f"o_linear {variant} {dtype}", seed)
        if dtype == torch.bfloat16:
            _, ol2 = K.q_pass(q, perm, block, state=st, eps=1e-5, gate_logit=gl, backend="triton")
            e1 = ((ol.double() - rol).norm() / rol.norm()).item()
            e2 = ((ol2.double() - rol).norm() / rol.norm()).item()
            assert e1 <= 2 * e2 + 2.0 ** -8, f"{variant}: bf16 error {e1:.3g} vs two-part {e2:.3g} [seed {seed}]"


def test_topk_from_pooled_equals_select_topk(seed):
    B, H, L, D, block = 2, 2, 300, 32, 64
    q, k = _blhd(B, H, L, D, torch.float32), _blhd(B, H, L, D, torch.float32)
    pq, pk = R.pool_blocks_ref(q, block), R.pool_blocks_ref(k, block)
    for backend in ("torch", "triton"):
        a = K.topk_from_pooled(pq, pk, 0.5, always_kept=torch.tensor([4]), backend=backend)
        b = K.select_topk(q, k, 0.5, block=block, always_kept=torch.tensor([4]), backend="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), backend


@pytest.mark.parametrize("pattern,compensation,n_front,gated", [
    ("topk", "none", 0, True), ("window", "none", 3, True), ("topk", "centroid", 0, False),
    ("topk", "none", 5, False)])
def test_inference_path_equals_autograd_path(seed, pattern, compensation, n_front, gated):
    """salad_self_attention without autograd (kv_pass, q_pass, sparse kernel with G*bias, one Proj GEMM
    into the output) == with autograd (separate branches, mix_branches), Triton kernels (interpreter)
    and torch path alike; a ragged grid (not a multiple of the tile) with extra tokens."""
    B, H, D = 2, 2, 32
    grid = (3, 5, 6)
    L = n_front + 3 * 5 * 6
    dim = H * D
    q, k, v, x = (torch.randn(B, L, dim, device=DEV) for _ in range(4))
    proj = torch.nn.Linear(dim, dim).to(DEV)
    gate = torch.nn.Linear(dim, 1).to(DEV) if gated else None
    for backend in ("torch", "triton"):
        cfg = SaladConfig(sparsity=0.5, pattern=pattern, block=32, tile=(2, 4, 4), backend=backend,
                          compensation=compensation)
        kw = dict(grid=grid, n_front=n_front, x=x, proj=proj, gate=gate, config=cfg)
        with torch.no_grad():
            fast = salad_self_attention(q, k, v, H, **kw)
        slow = salad_self_attention(q.requires_grad_(), k, v, H, **kw).detach()   # the autograd path
        q = q.detach()
        _close(fast, slow, 10 * TOL32, f"{backend} inference vs autograd", seed)
        with torch.no_grad():   # sparse-only (no weights): no linear branch
            only = salad_self_attention(q, k, v, H, grid=grid, n_front=n_front, config=cfg)
        slow0 = salad_self_attention(q.requires_grad_(), k, v, H, grid=grid, n_front=n_front, config=cfg).detach()
        q = q.detach()
        _close(only, slow0, 10 * TOL32, f"{backend} sparse-only inference vs autograd", seed)


@pytest.mark.parametrize("pattern", ["topk", "window"])
def test_inference_path_with_tiled_q(seed, monkeypatch, pattern):
    """Where the sparse kernel's config reads a tile-ordered q (Q_TILED), the inference path has q_pass write
    it (also for the window pattern without weights, where q_pass otherwise does not run) and hands it to the
    kernel: the same output as the autograd path.  The table does not ask for it yet, so the question is
    answered yes here (kernels.wants_tiled_q); the kernels themselves are real (interpreter)."""
    B, H, D, grid = 2, 2, 32, (3, 5, 6)
    L = 3 * 5 * 6
    q, k, v, x = (torch.randn(B, L, H * D, device=DEV) for _ in range(4))
    proj, gate = torch.nn.Linear(H * D, H * D).to(DEV), torch.nn.Linear(H * D, 1).to(DEV)
    asked = []
    monkeypatch.setattr(K, "wants_tiled_q", lambda q4, block, backend="auto", **kw: asked.append(backend) or True)
    cfg = SaladConfig(sparsity=0.5, pattern=pattern, block=32, tile=(2, 4, 4), backend="triton")
    for weights in (dict(x=x, proj=proj, gate=gate), {}):
        with torch.no_grad():
            fast = salad_self_attention(q, k, v, H, grid=grid, config=cfg, **weights)
        slow = salad_self_attention(q.requires_grad_(), k, v, H, grid=grid, config=cfg, **weights).detach()
        q = q.detach()
        _close(fast, slow, 10 * TOL32, f"inference with tiled q vs autograd ({pattern}, {sorted(weights)})", seed)
    assert asked == ["triton", "triton"]


def test_rowmap_bias_shared_and_gated(seed, poison):
    """A (H*D,) bias shared by the batch, scaled per sample by sigmoid(gate_logit), in any float dtype."""
    B, H, L, D, block = 2, 2, 150, 32, 32
    q, k, v = (_blhd(B, H, L, D, torch.float32) for _ in range(3))
    perm = torch.randperm(L, device=DEV)
    nq = K.num_blocks(L, block)
    idx = torch.arange(nq, dtype=torch.int32, device=DEV).expand(B, H, nq, nq)
    cnt = torch.full((B, H, nq), nq, dtype=torch.int32, device=DEV)
    bias = torch.randn(H * D, device=DEV).to(torch.bfloat16)
    gl = torch.randn(B, device=DEV)
    outs = [K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=bias, gate_logit=gl,
                                            backend=b, triton_options=poison) for b in ("torch", "triton")]
    plain = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, backend="torch")
    want = plain + torch.sigmoid(gl).view(B, 1, 1, 1) * bias.float().view(1, H, 1, D)
    for o in outs:
        _close(o, want, TOL32, "gated bias", seed)
    with pytest.raises(ValueError, match="bias"):
        K.block_sparse_attention_rowmap(q, k, v, idx, cnt, perm, block=block, bias=torch.randn(3), backend="triton")


def test_inference_path_with_low_rank_proj(seed):
    """A rank-r Proj (salad_core.proj.LowRankProj) in the inference path (two GEMMs into the sparse output)
    == the autograd path, Triton (interpreter) and torch alike, also with the weights left on the CPU in
    another dtype (an offloading host: they are copied for the call)."""
    from salad_pack.salad_core.proj import LowRankProj
    B, H, D, grid = 2, 2, 32, (2, 6, 5)
    dim, L = H * D, 2 * 6 * 5
    q, k, v, x = (torch.randn(B, L, dim, device=DEV) for _ in range(4))
    proj = LowRankProj(dim, 8).to(DEV)
    with torch.no_grad():
        proj.up.weight.normal_()
        proj.up.bias.normal_()
    gate = torch.nn.Linear(dim, 1).to(DEV)
    for backend in ("torch", "triton"):
        cfg = SaladConfig(sparsity=0.5, block=32, tile=(2, 4, 4), backend=backend)
        kw = dict(grid=grid, x=x, proj=proj, gate=gate, config=cfg)
        with torch.no_grad():
            fast = salad_self_attention(q, k, v, H, **kw)
            other = salad_self_attention(q, k, v, H, **dict(kw, proj=copy.deepcopy(proj).double().cpu()))
        slow = salad_self_attention(q.requires_grad_(), k, v, H, **kw).detach()
        q = q.detach()
        _close(fast, slow, 10 * TOL32, f"{backend} low-rank inference vs autograd", seed)
        _close(other, slow, 10 * TOL32, f"{backend} low-rank inference (fp64 CPU weights)", seed)


def test_fp8_precision_falls_back_with_one_warning(seed, caplog):
    """precision="fp8" where the card has no FP8 kernel (here: the CPU) runs the bf16 path, logs why once,
    and gives the same output; a bad precision name is refused."""
    import logging
    from salad_pack.salad_core import attention as A
    B, H, D, grid = 1, 2, 32, (2, 4, 8)
    L = 64
    q, k, v = (torch.randn(B, L, H * D, device=DEV) for _ in range(3))
    A._FP8_WARNED.clear()
    outs = {}
    with caplog.at_level(logging.WARNING, logger="SALAD"), torch.no_grad():
        for prec in ("bf16", "fp8", "fp8"):
            cfg = SaladConfig(sparsity=0.5, block=32, tile=(2, 4, 4), backend="torch", precision=prec)
            outs[prec] = salad_self_attention(q, k, v, H, grid=grid, config=cfg)
    warned = [r for r in caplog.records if "falls back to bf16" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert torch.equal(outs["bf16"], outs["fp8"])
    with pytest.raises(ValueError, match="precision"):
        SaladConfig(precision="int4")
