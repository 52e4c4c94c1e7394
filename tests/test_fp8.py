"""Tests for the opt-in FP8 block-sparse attention (kernels/fp8.py, kernels/_triton_fp8.py).

On CPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set here before triton is
imported): its e4m3 casts and fp8 tl.dot work (the kernels pre-round their casts there, see
_triton_fp8's header), so the kernels are checked on CPU against the plain-torch quantisation and the
step-by-step fp8 reference (tight), and against exact block-sparse attention (loose, error printed).
On a GPU with FP8 (fp8_support) the same tests run the compiled kernels with GPU tolerances; on a GPU
without FP8 the kernel tests are skipped.  Fresh random inputs per test (the `seed` fixture).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from triton_env import have_triton, kernel_device, ptxas_bundled, use_interpreter_without_cuda  # noqa: E402

use_interpreter_without_cuda()   # before the kernels are first imported
from _pack import register  # noqa: E402

register()

import salad_pack.kernels as K  # noqa: E402
from salad_pack.kernels import fp8 as F8  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = kernel_device()
HAVE_TRITON = have_triton()
RUNNABLE = HAVE_TRITON and (INTERP or F8.fp8_support(DEV)[0])
needs_fp8 = pytest.mark.skipif(not RUNNABLE, reason=f"FP8 kernels cannot run here: {F8.fp8_support(DEV)[1]}")
# kernel vs the step-by-step reference: the interpreter computes in IEEE fp32 like torch; the GPU's exp2
# and FMAs differ in the last bits, which can move a few P values by one e4m3 step
REF_TOL = 1e-5 if DEV.type == "cpu" else 5e-3


def bhld(B, H, L, D, dtype=torch.bfloat16, offset=0.0):
    """A (B,H,L,D) view of a contiguous (B,L,H,D) buffer; offset: scale of a per-(head, channel) shift."""
    x = torch.randn(B, L, H, D, device=DEV) + offset * torch.randn(1, 1, H, D, device=DEV)
    return x.to(dtype).transpose(1, 2)


def inputs(B, H, L, D, sparsity=0.5, q_dtype=torch.bfloat16, offset=0.0):
    q, k, v = bhld(B, H, L, D, q_dtype), bhld(B, H, L, D, offset=offset), bhld(B, H, L, D, offset=offset)
    idx, cnt = K.select_topk(q.float(), k.float(), sparsity, block=128, backend="torch")
    return q, k, v, idx, cnt


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# support and errors
# ----------------------------------------------------------------------------------------------

def test_fp8_support_cpu_says_no_with_reason():
    ok, why = F8.fp8_support("cpu")
    assert ok is False and "cpu" in why and "CUDA" in why
    if not torch.cuda.is_available():
        ok, why = F8.fp8_support(None)
        assert ok is False and why


def test_wrappers_raise_on_unsupported_device(seed, monkeypatch):
    """Outside the interpreter, on CPU, both public kernels refuse with a RuntimeError naming the device."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, idx, cnt = inputs(1, 1, 130, 64)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    with pytest.raises(RuntimeError, match=r"not available on cpu.*bf16 path"):
        F8.quantize_kv_fp8(k, v)
    kv8 = F8.quantize_kv_fp8_ref(k, v)
    with pytest.raises(RuntimeError, match="not available on cpu"):
        F8.block_sparse_attention_rowmap_fp8(q, kv8, idx.cpu(), cnt.cpu(), torch.arange(130))


def test_bad_inputs_are_named(seed):
    q, k, v, idx, cnt = inputs(1, 2, 130, 64)
    with pytest.raises(ValueError, match="head_dim"):
        F8.quantize_kv_fp8_ref(k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="one shape"):
        F8.quantize_kv_fp8_ref(k, v[:, :1])
    kv8 = F8.quantize_kv_fp8_ref(k, v)
    with pytest.raises(TypeError, match="kv8"):
        F8.block_sparse_attention_fp8_ref(q, (k, v), idx, cnt)
    with pytest.raises(ValueError, match="block 64 differs"):
        F8.block_sparse_attention_fp8_ref(q, kv8, idx, cnt, block=64)
    with pytest.raises(ValueError, match="does not match"):
        F8.block_sparse_attention_fp8_ref(q[:, :1], kv8, idx, cnt)
    with pytest.raises(ValueError, match="unknown fwd setting"):
        F8.fp8_config("fwd", 64, dict(BLOCK_M=64))
    with pytest.raises(ValueError, match="gate_logit"):
        F8.bias_args(None, torch.zeros(1), 1, 128, q.device)


# ----------------------------------------------------------------------------------------------
# quantisation
# ----------------------------------------------------------------------------------------------

def check_roundtrip(kv8, k, v, seed, what):
    """Every element within half an e4m3 step (2^-4 relative; 2^-10 of the scale in the subnormal range)."""
    kd, vd = kv8.dequantize()
    kc = k.float() - kv8.k_mean[:, :, None]
    ks = kv8.k_scale.repeat_interleave(kv8.block, 2)[:, :, :k.shape[2], None]
    assert ((kd - kc).abs() <= kc.abs() * 2**-4 + ks * 2**-10 + 1e-7).all(), f"{what}: k off [seed {seed}]"
    vc = v.float() - kv8.v_mean[:, :, None]
    vs = kv8.v_scale[:, :, None]
    assert ((vd - v.float()).abs() <= vc.abs() * 2**-4 + vs * 2**-10 + 1e-6).all(), f"{what}: v off [seed {seed}]"
    ek, ev = rel(kd, kc), rel(vd, v.float())
    assert ek < 0.03 and ev < 0.03, f"{what}: round trip relative L2 k {ek:.3g} v {ev:.3g} [seed {seed}]"
    LP = kv8.k8.shape[2]
    assert (kv8.k8[:, :, k.shape[2]:].float() == 0).all() and (kv8.v8t[..., k.shape[2]:].float() == 0).all(), \
        f"{what}: padding rows past L not zero [seed {seed}]"
    assert LP % kv8.block == 0 and kv8.v8t.shape[-1] == LP and kv8.v8t.is_contiguous()


@pytest.mark.parametrize("D", [64, 128])
def test_quantize_reference_roundtrip(seed, D):
    B, H, L = 2, 2, 300
    k, v = bhld(B, H, L, D, offset=3.0), bhld(B, H, L, D, offset=3.0)
    check_roundtrip(F8.quantize_kv_fp8_ref(k, v), k, v, seed, "ref")
    check_roundtrip(F8.quantize_kv_fp8_ref(k, v, smooth_k=False, smooth_v=False), k, v, seed, "ref unsmoothed")


@needs_fp8
@pytest.mark.parametrize("D,smooth", [(64, True), (128, True), (128, False)])
def test_quantize_kernel_vs_reference(seed, D, smooth):
    B, H, L = 2, 2, 300
    k, v = bhld(B, H, L, D, offset=2.0), bhld(B, H, L, D, offset=2.0)
    kq = F8.quantize_kv_fp8(k, v, smooth_k=smooth, smooth_v=smooth)
    kr = F8.quantize_kv_fp8_ref(k, v, smooth_k=smooth, smooth_v=smooth)
    for n in ("k_mean", "v_mean", "k_scale", "v_scale"):
        a, b = getattr(kq, n), getattr(kr, n)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{n} differs [seed {seed}]"
    for n in ("k8", "v8t"):
        a, b = getattr(kq, n), getattr(kr, n)
        assert a.shape == b.shape and a.dtype == torch.float8_e4m3fn and a.is_contiguous()
        diff = a.float() != b.float()
        # the means may differ in the last bits (summation order): a rare element one e4m3 step apart
        assert diff.float().mean() < 1e-3, f"{n}: {int(diff.sum())} elements differ [seed {seed}]"
        step = (b.float().abs() * 2**-3).clamp_min(2**-9)
        assert ((a.float() - b.float()).abs() <= step * 1.001).all(), f"{n}: more than one step apart [seed {seed}]"
    check_roundtrip(kq, k, v, seed, "kernel")


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

@needs_fp8
@pytest.mark.parametrize("D,tma,rowmap,bias", [(64, False, True, "gated"), (128, True, True, "shared"),
                                               (128, False, False, None)])
def test_kernel_vs_fp8_reference(seed, D, tma, rowmap, bias):
    """Tight: the step-by-step emulation of every quantisation (fp32 q so the output is not rounded)."""
    B, H, L = 2, 2, 300
    q, k, v, idx, cnt = inputs(B, H, L, D, q_dtype=torch.float32)
    kv8 = F8.quantize_kv_fp8(k, v)
    rm = torch.randperm(L, device=DEV) if rowmap else None
    kw = {}
    if bias:
        kw["bias"] = torch.randn((B if bias == "gated" else 1), H * D, device=DEV)
        kw["gate_logit"] = torch.randn(B, device=DEV) if bias == "gated" else None
    for bn in (64, 128):
        o = F8.block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, rm, config=dict(USE_TMA=tma, BLOCK_N=bn), **kw)
        assert o.shape == (B, H, L, D) and o.transpose(1, 2).is_contiguous() and o.dtype == q.dtype
        ref = F8.block_sparse_attention_fp8_ref(q, kv8, idx, cnt, rm, block_n=bn, **kw)
        assert torch.isfinite(o).all(), f"non-finite output [seed {seed}]"
        e = rel(o, ref)
        assert e < REF_TOL, f"D{D} BLOCK_N {bn} tma {tma}: relative L2 {e:.3g} vs the fp8 reference [seed {seed}]"


@needs_fp8
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_vs_exact_block_sparse(seed, D):
    """Loose: bf16 in and out against exact (fp32) block-sparse attention; prints the error."""
    B, H, L = 2, 2, 333
    q, k, v, idx, cnt = inputs(B, H, L, D, sparsity=0.34)
    rm = torch.randperm(L, device=DEV)
    o = F8.block_sparse_attention_rowmap_fp8(q, F8.quantize_kv_fp8(k, v), idx, cnt, rm)
    exact = K.block_sparse_attention_rowmap(q.float(), k.float(), v.float(), idx, cnt, rm, backend="torch")
    bf16 = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, rm, backend="torch")
    e8, e16 = rel(o, exact), rel(bf16, exact)
    print(f"[D{D}] relative L2 vs exact: fp8 {e8:.4f}, bf16 {e16:.4f}; fp8 vs bf16 {rel(o, bf16):.4f}")
    assert e8 < 0.1, f"fp8 relative L2 {e8:.3g} vs exact block-sparse attention [seed {seed}]"


@needs_fp8
def test_smoothing_lowers_error_on_offset_kv(seed):
    """K and V with large per-channel offsets (as in DiT activations): the mean subtraction helps."""
    B, H, L, D = 1, 2, 256, 64
    q, k, v, idx, cnt = inputs(B, H, L, D, q_dtype=torch.float32, offset=6.0)
    exact = K.block_sparse_attention_rowmap(q, k.float(), v.float(), idx, cnt, torch.arange(L), backend="torch")
    err = {}
    for smooth in (False, True):
        kv8 = F8.quantize_kv_fp8(k, v, smooth_k=smooth, smooth_v=smooth)
        err[smooth] = rel(F8.block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, None), exact)
    print(f"relative L2 vs exact, offset K/V: unsmoothed {err[False]:.4f}, smoothed {err[True]:.4f}")
    assert err[True] < err[False], f"smoothing did not lower the error {err} [seed {seed}]"


@pytest.mark.skipif(not ptxas_bundled(), reason="triton without its NVIDIA backend / ptxas")
def test_fp8_kernels_compile_for_sm90(tmp_path):
    """The interpreter checks results, not compilation: every FP8 kernel and forward config is compiled for
    sm90 by the real Triton compiler (no GPU, nothing launched: bench_fp8.py --codegen); the forward uses
    e4m3 tensor-core instructions and fits the H100/H200's 227 KB of shared memory."""
    import json
    import subprocess
    out = tmp_path / "fp8cg.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).parents[1] / "benchmarks" / "bench_fp8.py"
    r = subprocess.run([sys.executable, str(script), "--codegen", str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ks = json.loads(out.read_text())["kernels"]
    fwd = {name: k for name, k in ks.items() if "_sparse_fwd_fp8_kernel" in name}
    assert fwd and all(k["wgmma_e4m3"] > 0 for k in fwd.values()), {n: k["wgmma_e4m3"] for n, k in fwd.items()}
    assert all(k["shared"] <= 227 * 1024 for k in ks.values()), {n: k["shared"] for n, k in ks.items()}


# ----------------------------------------------------------------------------------------------
# precision "fp8_proj": the Proj GEMM in FP8
# ----------------------------------------------------------------------------------------------

@needs_fp8
@pytest.mark.parametrize("M,K_,dtype", [(37, 96, torch.bfloat16), (300, 1040, torch.float16), (5, 16, torch.float32)])
def test_quantize_rows_kernel_vs_reference(seed, M, K_, dtype):
    """One scale per row (amax / 448) and the e4m3 values equal the torch reference bit for bit, for ragged row
    counts, widths that are not a multiple of the kernel's column step, an all-zero row and a strided input."""
    x = torch.randn(M, K_ + 8, device=DEV).mul_(torch.rand(M, 1, device=DEV) * 10).to(dtype)[:, 4:K_ + 4]
    x[M // 2] = 0
    x8, s = F8.quantize_rows_fp8(x)
    r8, rs = F8.quantize_rows_fp8_ref(x)
    assert x8.dtype == F8.FP8_DTYPE and x8.is_contiguous() and s.shape == (M, 1)
    assert torch.equal(s, rs), f"scales differ [seed {seed}]"
    # (as values: the interpreter's pre-rounding may turn a tiny negative into +0 where the cast gives -0)
    assert torch.equal(x8.float(), r8.float()), f"e4m3 values differ [seed {seed}]"
    assert rel(x8.float() * s, x.float()) < 0.04, f"round trip [seed {seed}]"
    with pytest.raises(ValueError, match="x must be a 2-D"):
        F8.quantize_rows_fp8(x[None])


def test_sparse_kernel_accumulates_into_a_given_output(seed):
    """accumulate_into: the sparse kernel adds attention (+ G * bias) to what the buffer holds, in place, on the
    rowmap path (Triton interpreter / GPU) and the torch backend alike, with and without centroid compensation;
    a wrong buffer is refused by name."""
    B, H, L, D, block = 2, 2, 300, 64, 128
    q, k, v = bhld(B, H, L, D, torch.float16), bhld(B, H, L, D, torch.float16), bhld(B, H, L, D, torch.float16)
    idx, cnt = K.select_topk(q.float(), k.float(), 0.5, block=block, backend="torch")
    rm = torch.randperm(L, device=DEV)
    bias, gl = torch.randn(B, H * D, device=DEV), torch.randn(B, device=DEV)
    for backend, comp in [(b, c) for b in (["triton"] if HAVE_TRITON else []) + ["torch"] for c in (False, True)]:
        kw = dict(block=block, bias=bias, gate_logit=gl, backend=backend, compensate=comp)
        plain = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, rm, **kw)
        extra = torch.randn(B, L, H * D, device=DEV).to(torch.float16)
        buf = extra.clone()
        got = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, rm, accumulate_into=buf.view(B, L, H, D)
                                              .transpose(1, 2), **kw)
        assert got.data_ptr() == buf.data_ptr()
        want = plain.float() + extra.view(B, L, H, D).transpose(1, 2).float()
        assert rel(got, want) < 2e-3, f"{backend} compensate={comp} [seed {seed}]"
        with pytest.raises(ValueError, match="accumulate_into"):
            K.block_sparse_attention_rowmap(q, k, v, idx, cnt, rm, accumulate_into=buf.view(B, L, H, D), **kw)


def test_fp8_proj_falls_back_with_one_warning(seed, caplog):
    """precision="fp8_proj" without FP8 tensor cores (here the CPU), with a low-rank Proj or with the torch backend
    runs the 16-bit Proj GEMM (same output as bf16) and says why once per reason."""
    import logging
    from salad_pack.salad_core import attention as A
    from salad_pack.salad_core.proj import LowRankProj
    if F8.fp8_support(DEV)[0]:
        pytest.skip("this card runs FP8: the fallback is tested where it cannot")
    B, H, D, grid = 1, 2, 32, (2, 4, 8)
    L = 64
    q, k, v, x = (torch.randn(B, L, H * D, device=DEV) for _ in range(4))
    proj, gate = torch.nn.Linear(H * D, H * D).to(DEV), torch.nn.Linear(H * D, 1).to(DEV)
    A._FP8_WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="SALAD"), torch.no_grad():
        for p in (proj, LowRankProj(H * D, 8).to(DEV)):
            outs = {}
            for prec in ("bf16", "fp8_proj", "fp8_proj"):
                cfg = A.SaladConfig(sparsity=0.5, block=32, tile=(2, 4, 4), backend="auto", precision=prec)
                outs[prec] = A.salad_self_attention(q, k, v, H, grid=grid, x=x, proj=p, gate=gate, config=cfg)
            assert torch.equal(outs["bf16"], outs["fp8_proj"])
        cfg = A.SaladConfig(sparsity=0.5, block=32, tile=(2, 4, 4), backend="torch", precision="fp8_proj")
        A.salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=cfg)
    warned = [r.getMessage() for r in caplog.records if "falls back to bf16 (Proj GEMM)" in r.getMessage()]
    assert len(warned) == 3, warned
    assert any("low-rank" in w for w in warned) and any("torch backend" in w for w in warned), warned


@pytest.mark.skipif(INTERP or not F8.fp8_support(DEV)[0], reason="needs a GPU with FP8 tensor cores")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_fp8_vs_16bit_linear(seed, dtype):
    """linear_fp8 (both operands e4m3, per-row scales, torch._scaled_mm) is x @ w^T within e4m3's rounding, for a
    ragged row count, into a fresh result and into a given buffer; the support probe says yes on this card."""
    M, K_, N = 1000, 512, 384
    x = torch.randn(M, K_, device=DEV, dtype=dtype)
    w = (torch.randn(N, K_, device=DEV) * 0.05).to(dtype)
    assert F8.proj_fp8_support(x, w) is None
    want = torch.nn.functional.linear(x.float(), w.float())
    got = F8.linear_fp8(x, w)
    assert got.dtype == dtype and got.shape == (M, N)
    r = rel(got, want)
    print(f"linear_fp8 vs fp32 linear ({dtype}): rel {r:.3e}")
    assert 0 < r < 0.06, f"rel {r} [seed {seed}]"
    buf = torch.empty(M, N, device=DEV, dtype=dtype)
    assert F8.linear_fp8(x, w, out=buf).data_ptr() == buf.data_ptr() and torch.equal(buf, got)
    assert "divisible by 16" in F8.proj_fp8_support(x, w[:, :500])
