"""GPU integration of salad_core with the Triton kernels (skipped without CUDA).

Run on a GPU machine with ``python -m pytest tests/test_salad_core_gpu.py`` or, where pytest is
missing, ``python tests/test_salad_core_gpu.py`` (also prints timings).
"""
from __future__ import annotations

import sys
import time

import torch
from _pack import bootstrap
from seeds import fresh_seed

bootstrap()  # conftest did this under pytest; this file also runs as a script (README)

from salad_pack.salad_core import (  # noqa: E402
    SaladConfig,
    SaladWeights,
    dense_reference_attention,
    salad_self_attention,
)
from salad_pack.salad_core.trainer import relative_error, train_salad  # noqa: E402

try:
    import pytest

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
except ImportError:  # script mode on a machine without pytest
    pytest = None


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _inputs(B, grid, H, D, nf=0, nb=0, dtype=torch.bfloat16):
    L = nf + grid[0] * grid[1] * grid[2] + nb
    g = torch.Generator(device="cuda").manual_seed(fresh_seed("gpu inputs"))
    q, k, v = (torch.randn(B, L, H * D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    x = torch.randn(B, L, H * D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, x


def test_triton_matches_torch_backend_small():
    H, D, grid, nf, nb = 4, 128, (5, 12, 20), 40, 17
    q, k, v, x = _inputs(2, grid, H, D, nf, nb)
    w = SaladWeights.new(H * D, H, 1)
    with torch.no_grad():
        w.proj_for(0).weight.normal_(std=0.02)
        w.gate_for(0).weight.normal_(std=0.02)
    w = w.cuda()
    for pattern in ("window", "topk"):
        outs = {}
        for backend in ("triton", "torch"):
            cfg = SaladConfig(sparsity=0.8, pattern=pattern, backend=backend)
            with torch.no_grad():
                outs[backend] = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, n_back=nb, x=x,
                                                     proj=w.proj_for(0), gate=w.gate_for(0), config=cfg)
        r = _rel(outs["triton"], outs["torch"])
        print(f"[gpu] {pattern}: triton vs torch backend rel {r:.2e}")
        assert outs["triton"].dtype == torch.bfloat16 and r < 2e-2


def _fp8_case(proj_std, bias_std=None):
    """Inputs of the FP8 precision tests (skipped without FP8 tensor cores): H, grid, extra tokens nf, q, k, v, x
    (B2, a ragged grid, bf16) and one block of SALAD weights with random Proj (and bias) and gate."""
    import salad_pack.kernels as K
    ok, why = K.fp8.fp8_support(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    H, D, grid, nf = 4, 128, (5, 12, 20), 40
    q, k, v, x = _inputs(2, grid, H, D, nf)
    w = SaladWeights.new(H * D, H, 1)
    with torch.no_grad():
        w.proj_for(0).weight.normal_(std=proj_std)
        if bias_std is not None:
            w.proj_for(0).bias.normal_(std=bias_std)
        w.gate_for(0).weight.normal_(std=0.02)
    return H, grid, nf, q, k, v, x, w.cuda().bfloat16()


def test_fp8_precision_runs_fp8_and_stays_close():
    """precision="fp8" on an FP8 card runs the FP8 kernel (output differs from bf16) within a few percent of
    the bf16 output, with gate + full and low-rank Proj, extra tokens and a ragged grid."""
    from salad_pack.salad_core.proj import LowRankProj
    H, grid, nf, q, k, v, x, w = _fp8_case(0.02)
    low = LowRankProj(q.shape[-1], 16).cuda().bfloat16()
    for proj in (w.proj_for(0), low):
        outs = {}
        for prec in ("bf16", "fp8"):
            cfg = SaladConfig(sparsity=0.8, pattern="topk", precision=prec)
            with torch.no_grad():
                outs[prec] = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, x=x, proj=proj,
                                                  gate=w.gate_for(0), config=cfg)
        r = _rel(outs["fp8"], outs["bf16"])
        print(f"[gpu] fp8 vs bf16 SALAD ({type(proj).__name__}): rel {r:.3e}")
        assert outs["fp8"].dtype == torch.bfloat16 and 0 < r < 0.1


def test_fp8_proj_runs_fp8_and_stays_close():
    """precision="fp8_proj" on an FP8 card: the Proj GEMM runs in e4m3 (output differs from bf16), its term is
    within a few percent of the 16-bit one, and the attention part is the bf16 kernel's (same selection)."""
    H, grid, nf, q, k, v, x, w = _fp8_case(0.05, 0.05)
    outs = {}
    for prec in ("bf16", "fp8_proj"):
        cfg = SaladConfig(sparsity=0.8, pattern="topk", precision=prec)
        with torch.no_grad():
            outs[prec] = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, x=x, proj=w.proj_for(0),
                                              gate=w.gate_for(0), config=cfg)
            sparse_only = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, config=cfg)
    term = outs["bf16"].double() - sparse_only.double()
    r_term = float((outs["fp8_proj"].double() - outs["bf16"].double()).norm() / term.norm())
    r_all = _rel(outs["fp8_proj"], outs["bf16"])
    print(f"[gpu] fp8_proj vs bf16: whole output rel {r_all:.3e}, Proj+bias term rel {r_term:.3e}")
    assert outs["fp8_proj"].dtype == torch.bfloat16 and 0 < r_all and r_term < 0.08


def test_dense_at_sparsity_zero_wan_size():
    H, D, grid = 12, 128, (21, 30, 52)  # Wan 2.1 1.3B, 480x832, 81 frames
    q, k, v, _ = _inputs(2, grid, H, D)
    with torch.no_grad():
        ref = dense_reference_attention(q, k, v, H)
        out = salad_self_attention(q, k, v, H, grid=grid, config=SaladConfig(sparsity=0.0, backend="auto"))
    r = _rel(out, ref)
    print(f"[gpu] sparsity 0 vs dense at L={q.shape[1]}: rel {r:.2e}")
    assert r < 1e-2


def _bench(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def test_speed_and_memory_wan_size():
    H, D, grid = 12, 128, (21, 30, 52)
    q, k, v, x = _inputs(2, grid, H, D)
    w = SaladWeights.new(H * D, H, 1).cuda()
    with torch.no_grad():
        t_dense = _bench(lambda: dense_reference_attention(q, k, v, H, chunk=1 << 20))
        for pattern in ("window", "topk"):
            cfg = SaladConfig(sparsity=0.9, pattern=pattern)
            t_s = _bench(lambda: salad_self_attention(q, k, v, H, grid=grid, config=cfg))
            t_sl = _bench(lambda: salad_self_attention(q, k, v, H, grid=grid, x=x, proj=w.proj_for(0),
                                                       gate=w.gate_for(0), config=cfg))
            print(f"[gpu] L={q.shape[1]} B=2 H={H}: dense SDPA {t_dense:.1f} ms, {pattern} 0.9 sparse-only "
                  f"{t_s:.1f} ms, SALAD {t_sl:.1f} ms")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        salad_self_attention(q, k, v, H, grid=grid, x=x, proj=w.proj_for(0), gate=w.gate_for(0),
                             config=SaladConfig(sparsity=0.9, pattern="window"))
        peak = torch.cuda.max_memory_allocated() - base
    per = q.numel() * q.element_size()
    print(f"[gpu] SALAD peak extra memory {peak / 2 ** 20:.0f} MiB = {peak / per:.1f} x one q tensor")
    assert peak < 12 * per  # never anything like L x L (which would be ~ 100 GiB here)


def test_trainer_on_gpu():
    H, D, grid = 4, 64, (4, 16, 32)
    samples = []
    for _ in range(4):
        q, k, v, x = _inputs(1, grid, H, D, dtype=torch.float32)
        samples.append(dict(q=q, k=k, v=v, x=x, heads=H, grid=grid, block_id=0))
    w = SaladWeights.new(H * D, H, 1, sparsity=0.9).cuda()
    cfg = SaladConfig(sparsity=0.9, pattern="window")
    res = train_salad(samples, w, steps=20, lr=1e-3, config=cfg, log_every=10)
    e = relative_error(samples, w, cfg)
    print(f"[gpu] trainer: loss {res['history'][0]}, rel err sparse {e['sparse_only']:.3f} salad {e['salad']:.3f}")
    assert e["salad"] <= e["sparse_only"] + 1e-3
    assert w.proj_for(0).weight.is_cuda


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA")
        sys.exit(0)
    fails = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                print(f"PASS {name}")
            except Exception as e:  # noqa: BLE001
                fails += 1
                import traceback
                traceback.print_exc()
                print(f"FAIL {name}: {e!r}")
    sys.exit(1 if fails else 0)
