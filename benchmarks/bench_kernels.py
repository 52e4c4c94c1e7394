"""Benchmark SALAD kernels against default SDPA, FlexAttention (same block mask) and, if present,
comfy-kitchen's sol_attn.  One process; JSON results + a printed table.

GPU:   PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --out benchmarks/results [--sweep]
CPU:   python benchmarks/bench_kernels.py --smoke        (tiny shapes, TRITON_INTERPRET=1)

Timings: triton.testing.do_bench medians, random bf16 inputs.  Our kernels are fed permuted
(B,H,L,D) views of (B,L,H,D) buffers (the caller's layout); SDPA and Flex get contiguous
(B,H,L,D) tensors (their best case).  Ratios are only meaningful within one run / one card.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--out", default=None,
                    help="result dir (default: $OUT if set, else benchmarks/results; smoke: a temp dir)")
    ap.add_argument("--sweep", action="store_true", help="sweep kernel configs before timing")
    ap.add_argument("--shapes", default="all", help="comma list of shape names or 'all'")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler kernel breakdown per shape")
    ap.add_argument("--lin-only", action="store_true", help="with --sweep: sweep only the linear-branch configs")
    ap.add_argument("--rep", type=float, default=60.0, help="do_bench rep (ms)")
    ap.add_argument("--d64", action="store_true", help="also check/time head_dim 64")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--kitchen", default=str(ROOT / ".whl" / "ck"), help="dir holding an unpacked comfy_kitchen")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip remaining work after this many seconds")
    return ap.parse_args()


ARGS = _parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(ROOT / "tests"))
from _pack import register  # noqa: E402

register()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import salad_pack.kernels as K  # noqa: E402
from salad_pack.kernels import reference as R  # noqa: E402

T0 = time.time()
DEV = torch.device("cuda" if (torch.cuda.is_available() and not ARGS.smoke) else "cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float16
RESULTS: dict = {"errors": []}
BK = "triton" if ARGS.smoke else "auto"  # smoke: Triton kernels through the CPU interpreter


def sel(*a, **kw):
    return K.select_topk(*a, backend=BK, **kw)


def bsa(*a, **kw):
    return K.block_sparse_attention(*a, backend=BK, **kw)


def sla(*a, **kw):
    return K.sparse_linear_attention(*a, backend=BK, **kw)


def lin(*a, **kw):
    return K.linear_attention(*a, backend=BK, **kw)


def pool(*a, **kw):
    return K.pool_blocks(*a, backend=BK, **kw)


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def over_budget():
    return time.time() - T0 > ARGS.budget_s


def bench(fn, grad_to_none=None):
    """Median ms."""
    if DEV.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=ARGS.rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(sorted(ts)[len(ts) // 2])


def peak_mb(fn):
    if DEV.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    pk = torch.cuda.max_memory_allocated() - base
    del out
    return round(pk / 2**20, 1)


def rel(a, b):
    a = a.float()
    b = b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def guard(name, fn, default=None):
    try:
        return fn()
    except Exception as e:  # record and continue
        msg = f"{name}: {type(e).__name__}: {str(e)[:400]}"
        log("ERROR", msg)
        traceback.print_exc(limit=3)
        RESULTS["errors"].append(msg)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        return default


# ----------------------------------------------------------------------------------------------

def make_inputs(B, H, L, D, requires_grad=False):
    def one():
        return torch.randn(B, L, H, D, device=DEV, dtype=DT)
    qb, kb, vb = one(), one(), one()
    q, k, v = (x.permute(0, 2, 1, 3) for x in (qb, kb, vb))
    if requires_grad:
        for x in (qb, kb, vb):
            x.requires_grad_(True)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (qb, kb, vb))
    return (qb, kb, vb), (q, k, v)


def flex_setup():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    fx = torch.compile(flex_attention, dynamic=False)

    def mask(idx, cnt, L, nk, block):
        kvi = torch.where(idx >= 0, idx, torch.zeros_like(idx))
        if kvi.shape[-1] < nk:  # constant width per L -> one compile per shape
            kvi = F.pad(kvi, (0, nk - kvi.shape[-1]))
        return BlockMask.from_kv_blocks(cnt.contiguous(), kvi.contiguous(), BLOCK_SIZE=block, seq_lengths=(L, L))
    return fx, mask


def kitchen_setup():
    p = Path(ARGS.kitchen)
    if DEV.type != "cuda" or not (p / "comfy_kitchen").exists():
        return None, f"comfy_kitchen not found under {p}"
    sys.path.insert(0, str(p))
    try:
        import comfy_kitchen as ck
        if not ck.sol_attn_is_available(DEV):
            return None, "comfy_kitchen imported but sol_attn_is_available() is False"
        return ck, None
    except Exception as e:
        return None, f"comfy_kitchen import failed: {type(e).__name__}: {str(e)[:300]}"


# ----------------------------------------------------------------------------------------------

FWD_CANDIDATES = [dict(BLOCK_N=64, num_warps=4, num_stages=2, tma=True), dict(BLOCK_N=64, num_warps=4, num_stages=3, tma=True),
                  dict(BLOCK_N=128, num_warps=8, num_stages=2, tma=True), dict(BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
                  dict(BLOCK_N=64, num_warps=8, num_stages=2, tma=True), dict(BLOCK_N=64, num_warps=4, num_stages=2, tma=False)]
DQ_CANDIDATES = [dict(BLOCK_N=64, num_warps=8, num_stages=4, tma=False), dict(BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
                 dict(BLOCK_N=64, num_warps=4, num_stages=2, tma=True), dict(BLOCK_N=64, num_warps=8, num_stages=2, tma=True),
                 dict(BLOCK_N=128, num_warps=8, num_stages=2, tma=True)]
DKDV_CANDIDATES = [dict(BLOCK_N=128, BLOCK_M=64, num_warps=8, num_stages=3, tma=False),
                   dict(BLOCK_N=128, BLOCK_M=64, num_warps=8, num_stages=3, tma=True),
                   dict(BLOCK_N=128, BLOCK_M=64, num_warps=8, num_stages=2, tma=True),
                   dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, tma=True),
                   dict(BLOCK_N=128, BLOCK_M=32, num_warps=8, num_stages=3, tma=True)]


def sweep_fwd(name, shape, sparsity=0.9):
    """Sweep forward configs (pointer and TMA loads) on one shape; install the best one for that
    shape's length class (FWD_CFG or FWD_CFG_LONG) and pick fused/unfused linear epilogue."""
    from salad_pack.kernels import _triton_ops as ops
    B, H, L, D = shape
    blk = K.DEFAULT_BLOCK
    (_, _, _), (q, k, v) = make_inputs(B, H, L, D)
    idx, cnt = sel(q, k, sparsity, block=blk)
    long_ = L >= ops.LONG_L
    out = {"fwd": [], "lin": []}
    best = None
    for tma in (None,):
        for c in ([] if ARGS.lin_only else FWD_CANDIDATES):
            if over_budget():
                break
            cfg = dict(c)
            (ops.FWD_CFG_LONG if long_ else ops.FWD_CFG)[D] = cfg
            ms = guard(f"sweep fwd {cfg}", lambda: bench(lambda: bsa(q, k, v, idx, cnt, block=blk)))
            out["fwd"].append(dict(cfg, ms=ms))
            log(f"sweep {name} fwd {cfg}: {ms}")
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, cfg)
    if best:
        (ops.FWD_CFG_LONG if long_ else ops.FWD_CFG)[D] = best[1]
    if not long_ and not ARGS.no_bwd and not ARGS.lin_only:
        out["bwd"] = sweep_bwd(q, k, v, idx, cnt, D)
    if not long_:
        out["lin_cfg"] = sweep_lin(q, k, v)
    for fuse in (True, False):
        ops.FUSE_LINEAR_EPILOGUE = fuse
        ms = guard("sweep fuse", lambda: bench(lambda: sla(q, k, v, idx, cnt, block=blk)))
        out["lin"].append({"fuse": fuse, "ms": ms})
        log(f"sweep {name} sparse+linear fuse={fuse}: {ms}")
    ms_f = [r["ms"] for r in out["lin"]]
    ops.FUSE_LINEAR_EPILOGUE = (None not in ms_f) and ms_f[0] <= ms_f[1]
    out["chosen"] = {"fwd": best[1] if best else None, "fuse": ops.FUSE_LINEAR_EPILOGUE}
    return out


def _sweep_lin_pass(name, keys, candidates, fn):
    """Time fn under each LIN_CFG candidate (values for keys); keep the fastest in LIN_CFG."""
    from salad_pack.kernels import _triton_ops as ops
    rows, best = [], None
    for vals in candidates:
        cfg = dict(zip(keys, vals))
        ops.LIN_CFG.update(cfg)
        ms = guard(f"sweep {name}", lambda: bench(fn))
        rows.append(dict(cfg, ms=ms))
        log(f"sweep lin {name} {' '.join(map(str, vals))}: {ms}")
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, cfg)
    if best:
        ops.LIN_CFG.update(best[1])
    return rows


def sweep_lin(q, k, v):
    """Linear branch: state pass (BLOCK_N, programs) and apply pass (rows per step, warps, programs)."""
    from salad_pack.kernels import _triton_ops as ops
    res = {"state": _sweep_lin_pass(
        "state", ("BLOCK_N", "num_warps", "target_programs"),
        ((64, 8, 528), (64, 8, 1056), (128, 8, 528), (64, 4, 1056), (128, 8, 1056)),
        lambda: ops.linear_state(k, v))}
    S, z = ops.linear_state(k, v)
    SH, SLO, LP = ops._lin_operands(S, q.dtype)
    res["apply"] = _sweep_lin_pass(
        "apply", ("APPLY_BM", "apply_warps", "apply_target_programs"),
        ((64, 8, 528), (64, 4, 1056), (128, 8, 1056), (64, 4, 2112), (128, 8, 2112), (32, 4, 2112)),
        lambda: ops._linear_apply(q, SH, SLO, LP, z, 1e-5))
    res["chosen"] = dict(ops.LIN_CFG)
    return res


def sweep_bwd(q, k, v, idx, cnt, D):
    from salad_pack.kernels import _triton_ops as ops
    blk = K.DEFAULT_BLOCK
    scale = 1 / math.sqrt(D)
    o, lse, _ = ops._sparse_fwd(q, k, v, idx, cnt, blk, scale)
    do = torch.randn_like(o)
    res = {"dq": [], "dkdv": []}
    for key, cands, table in (("dq", DQ_CANDIDATES, "BWD_DQ_CFG"), ("dkdv", DKDV_CANDIDATES, "BWD_DKDV_CFG")):
        best = None
        for c in cands:
            if over_budget():
                break
            getattr(ops, table)[D] = dict(c)
            ms = guard(f"sweep {key} {c}", lambda: bench(lambda: ops._sparse_bwd(q, k, v, o, lse, do, idx, cnt, blk, scale)))
            res[key].append(dict(c, bwd_total_ms=ms))
            log(f"sweep bwd {key} {c}: {ms}")
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, dict(c))
        if best:
            getattr(ops, table)[D] = best[1]
    return res


def profile_ops(shape, sparsity=0.9):
    """Per-kernel CUDA time of the whole forward and of forward+backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    B, H, L, D = shape
    (qb, kb, vb), (q, k, v) = make_inputs(B, H, L, D, requires_grad=True)
    do1 = torch.randn(B, H, L, D, device=DEV, dtype=DT)
    do2 = torch.randn(B, H, L, D, device=DEV, dtype=DT)
    res = {}
    for tag, fn in (("whole_fwd", lambda: sla(q, k, v, *sel(q, k, sparsity))),
                    ("whole_fwd_bwd", lambda: torch.autograd.grad(sla(q, k, v, *sel(q, k, sparsity)), (qb, kb, vb),
                                                                   (do1, do2)))):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                rows.append((e.key[:90], round(t / 3 / 1000, 4), e.count // 3))
        rows.sort(key=lambda r: -r[1])
        res[tag] = rows[:25]
        log("profile", tag)
        for r in rows[:25]:
            log(f"   {r[1]:8.4f} ms  x{r[2]:<3d} {r[0]}")
    return res


def d64_check():
    """D=64 correctness and timing at a Wan-like length (the contract allows D in {64, 128})."""
    B, H, L, D = 1, 12, 32760, 64
    (_, _, _), (q, k, v) = make_inputs(B, H, L, D)
    idx, cnt = sel(q, k, 0.9)
    o, lse = bsa(q, k, v, idx, cnt)
    hs = slice(0, 2)
    ro, rl = R.block_sparse_attention_ref(q[:, hs], k[:, hs], v[:, hs], idx[:, hs], cnt[:, hs])
    out = {"o_relerr_vs_ref": rel(o[:, hs], ro), "lse_maxabs": float((lse[:, hs] - rl).abs().max()),
           "sparse_fwd_ms": bench(lambda: bsa(q, k, v, idx, cnt)),
           "sdpa_fwd_ms": bench(lambda: F.scaled_dot_product_attention(*(x.contiguous() for x in (q, k, v))))}
    a, b, c = (x.detach().clone().requires_grad_() for x in (q, k, v))
    oo, _ = bsa(a, b, c, idx, cnt)
    do = torch.randn_like(oo)
    g = torch.autograd.grad(oo, (a, b, c), do)
    a2, b2, c2 = (x[:, hs].detach().float().clone().requires_grad_() for x in (q, k, v))
    o2, _ = R.block_sparse_attention_ref(a2, b2, c2, idx[:, hs], cnt[:, hs])
    g2 = torch.autograd.grad(o2, (a2, b2, c2), do[:, hs].float())
    out["bwd_relerr_vs_ref"] = [rel(x[:, hs], y) for x, y in zip(g, g2)]
    log("d64", out)
    return out


def run_shape(name, shape, sparsities, fx, fmask, ck):
    B, H, L, D = shape
    blk = K.DEFAULT_BLOCK
    nq = K.num_blocks(L, blk)
    res = {"B": B, "H": H, "L": L, "D": D, "block": blk, "nq": nq}
    (qb, kb, vb), (q, k, v) = make_inputs(B, H, L, D)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    flops_dense = 4.0 * B * H * L * L * D
    # ---- dense SDPA
    res["sdpa_fwd_ms"] = guard("sdpa fwd", lambda: bench(lambda: F.scaled_dot_product_attention(qc, kc, vc)))
    res["sdpa_fwd_peak_mb"] = guard("sdpa mem", lambda: peak_mb(lambda: F.scaled_dot_product_attention(qc, kc, vc)))
    log(name, "sdpa fwd", res["sdpa_fwd_ms"])
    if not ARGS.no_bwd:
        def sdpa_bwd_setup():
            a, b, c = (x.detach().clone().requires_grad_() for x in (qc, kc, vc))
            o = F.scaled_dot_product_attention(a, b, c)
            do = torch.randn_like(o)
            ms = bench(lambda: torch.autograd.grad(o, (a, b, c), do, retain_graph=True))
            return ms
        res["sdpa_bwd_ms"] = guard("sdpa bwd", sdpa_bwd_setup)
        log(name, "sdpa bwd", res["sdpa_bwd_ms"])
    # ---- our pieces that do not depend on sparsity
    res["linear_ms"] = guard("linear", lambda: bench(lambda: lin(q, k, v)))
    res["pool_qk_ms"] = guard("pool", lambda: bench(lambda: (pool(q), pool(k))))
    ol = guard("linear out", lambda: lin(q, k, v))
    if ol is not None:
        hs = slice(0, min(H, 2))
        res["linear_relerr_vs_ref"] = guard("lin ref", lambda: rel(ol[:, hs], R.linear_attention_ref(q[:, hs], k[:, hs], v[:, hs])))
    for sp in sparsities:
        if over_budget():
            log("budget reached, skipping", name, sp)
            break
        r = {}
        kk = K.keep_count(nq, sp)
        r["keep"] = kk
        r["density"] = kk / nq
        r["select_ms"] = guard("select", lambda: bench(lambda: sel(q, k, sp)))
        r["select_torch_pool_ms"] = guard("select torch", lambda: bench(
            lambda: K.lut_from_scores(R.pool_blocks_ref(q) @ R.pool_blocks_ref(k).transpose(-1, -2), kk)))
        idx, cnt = sel(q, k, sp)
        r["sparse_fwd_ms"] = guard("sparse fwd", lambda: bench(lambda: bsa(q, k, v, idx, cnt)))
        r["sparse_fwd_contig_ms"] = guard("sparse fwd contig",
                                          lambda: bench(lambda: bsa(qc, kc, vc, idx, cnt)))
        r["sparse_linear_fwd_ms"] = guard("sparse+lin", lambda: bench(lambda: sla(q, k, v, idx, cnt)))
        r["whole_fwd_ms"] = guard("whole", lambda: bench(lambda: sla(q, k, v, *sel(q, k, sp))))
        r["select_sparse_fwd_ms"] = guard("sel+sparse", lambda: bench(
            lambda: bsa(q, k, v, *sel(q, k, sp))))
        r["whole_fwd_peak_mb"] = guard("whole mem", lambda: peak_mb(
            lambda: sla(q, k, v, *sel(q, k, sp))))
        if r["sparse_fwd_ms"]:
            r["sparse_tflops_on_kept"] = flops_dense * r["density"] / r["sparse_fwd_ms"] * 1e-9
        # correctness at the real shape
        o, lse = bsa(q, k, v, idx, cnt)
        if True:
            hs = slice(0, min(H, 2))
            def ref_chk():
                ro, rl = R.block_sparse_attention_ref(q[:, hs], k[:, hs], v[:, hs], idx[:, hs], cnt[:, hs])
                return {"o_relerr": rel(o[:, hs], ro), "lse_maxabs": float((lse[:, hs] - rl).abs().max())}
            r["check_vs_torch_ref_heads0-1"] = guard("ref check", ref_chk)
            r["finite"] = bool(torch.isfinite(o).all())
        # Flex on the identical mask
        if fx is not None:
            def flex_all():
                bm = fmask(idx, cnt, L, nq, blk)
                of = fx(qc, kc, vc, block_mask=bm)
                out = {"flex_fwd_ms": bench(lambda: fx(qc, kc, vc, block_mask=bm)),
                       "ours_vs_flex_relerr": rel(o, of),
                       "flex_fwd_peak_mb": peak_mb(lambda: fx(qc, kc, vc, block_mask=bm))}
                out["flex_mask_build_ms"] = bench(lambda: fmask(idx, cnt, L, nq, blk))
                if not ARGS.no_bwd:
                    a, b, c = (x.detach().clone().requires_grad_() for x in (qc, kc, vc))
                    of2 = fx(a, b, c, block_mask=bm)
                    do = torch.randn_like(of2)
                    out["flex_bwd_ms"] = bench(lambda: torch.autograd.grad(of2, (a, b, c), do, retain_graph=True))
                    gf = torch.autograd.grad(of2, (a, b, c), do, retain_graph=True)
                    a2, b2, c2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
                    oo, _ = bsa(a2, b2, c2, idx, cnt)
                    go = torch.autograd.grad(oo, (a2, b2, c2), do)
                    out["bwd_relerr_vs_flex_dq_dk_dv"] = [rel(x, y) for x, y in zip(go, gf)]
                return out
            fr = guard("flex", flex_all, {})
            r.update(fr or {})
            log(name, sp, "flex", {k_: v_ for k_, v_ in (fr or {}).items() if k_.endswith("ms")})
        # our backward
        if not ARGS.no_bwd:
            def our_bwd():
                a, b, c = (x.detach().clone().requires_grad_() for x in (q, k, v))
                oo, _ = bsa(a, b, c, idx, cnt)
                do = torch.randn_like(oo)
                out = {"sparse_bwd_ms": bench(lambda: torch.autograd.grad(oo, (a, b, c), do, retain_graph=True))}
                os_, ol_ = sla(a, b, c, idx, cnt)
                do2 = torch.randn_like(ol_)
                out["sparse_linear_bwd_ms"] = bench(
                    lambda: torch.autograd.grad((os_, ol_), (a, b, c), (do, do2), retain_graph=True))
                out["transpose_lut_ms"] = bench(lambda: _tl(idx, cnt, B, H, nq))
                def fb():
                    o3, l3 = sla(a, b, c, idx, cnt)
                    g = torch.autograd.grad((o3, l3), (a, b, c), (do, do2))
                    return g
                out["sparse_linear_fwd_bwd_peak_mb"] = peak_mb(fb)
                return out
            r.update(guard("our bwd", our_bwd, {}) or {})
        # comfy-kitchen sol_attn (own selection, 64-token blocks, topk_ratio = keep fraction)
        if ck is not None:
            def kit():
                f = lambda: ck.sol_attn(qb, kb, vb, topk_ratio=1.0 - sp, tail=False)
                return {"kitchen_sol_attn_ms": bench(f), "kitchen_peak_mb": peak_mb(f)}
            r.update(guard("kitchen", kit, {}) or {})
        # ratios
        s = res.get("sdpa_fwd_ms")
        if s:
            for key in ("sparse_fwd_ms", "whole_fwd_ms", "select_sparse_fwd_ms", "flex_fwd_ms", "kitchen_sol_attn_ms"):
                if r.get(key):
                    r["speedup_" + key[:-3]] = s / r[key]
        if res.get("sdpa_bwd_ms"):
            for key in ("sparse_bwd_ms", "sparse_linear_bwd_ms", "flex_bwd_ms"):
                if r.get(key):
                    r["speedup_" + key[:-3]] = res["sdpa_bwd_ms"] / r[key]
        if r.get("flex_fwd_ms") and r.get("sparse_fwd_ms"):
            r["ours_over_flex_fwd"] = r["flex_fwd_ms"] / r["sparse_fwd_ms"]
        res[f"s{sp}"] = r
        log(name, sp, {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()})
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _tl(idx, cnt, B, H, nq):
    from salad_pack.kernels._triton_ops import transpose_lut
    return transpose_lut(idx, cnt, B, H, nq, nq)


def table(res):
    rows = []
    hdr = ("shape", "sparsity", "SDPA ms", "Flex ms", "ours sparse", "ours sel+sparse+lin", "x SDPA (whole)",
           "Flex/ours", "kitchen ms", "SDPA bwd", "Flex bwd", "ours bwd", "x SDPA bwd")
    rows.append(hdr)
    f = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))
    for name, sr in res.items():
        if not isinstance(sr, dict) or "L" not in sr:
            continue
        for key, r in sr.items():
            if not key.startswith("s0") and not key.startswith("s1"):
                continue
            rows.append((name, key[1:], f(sr.get("sdpa_fwd_ms")), f(r.get("flex_fwd_ms")), f(r.get("sparse_fwd_ms")),
                         f(r.get("whole_fwd_ms")), f(r.get("speedup_whole_fwd")), f(r.get("ours_over_flex_fwd")),
                         f(r.get("kitchen_sol_attn_ms")), f(sr.get("sdpa_bwd_ms")), f(r.get("flex_bwd_ms")),
                         f(r.get("sparse_bwd_ms")), f(r.get("speedup_sparse_bwd"))))
    w = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main():
    from salad_pack.kernels import _triton_ops as ops
    if ARGS.smoke:
        shapes = {"smoke": (1, 2, 300, 64)}
        K.DEFAULT_BLOCK = K.DEFAULT_BLOCK  # API default stays 128; smoke uses L=300 -> 3 blocks
    else:
        shapes = {"wan1.3b_480p": (1, 12, 32760, 128), "wan14b_720p": (1, 40, 75600, 128)}
        if ARGS.shapes != "all":
            shapes = {k_: v_ for k_, v_ in shapes.items() if k_ in ARGS.shapes.split(",")}
    sps = [float(s) for s in ARGS.sparsities.split(",")]
    RESULTS["meta"] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name() if DEV.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}) interpreter",
        "torch": torch.__version__, "python": platform.python_version(),
        "dtype": str(DT), "smoke": ARGS.smoke,
    }
    try:
        import triton
        RESULTS["meta"]["triton"] = triton.__version__
    except Exception:
        pass
    log("meta", RESULTS["meta"])
    RESULTS["sweep"] = {}
    fx = fmask = None
    if not ARGS.no_flex and DEV.type == "cuda":
        fx, fmask = guard("flex setup", flex_setup, (None, None))
    ck, why = kitchen_setup()
    RESULTS["kitchen"] = "available" if ck is not None else why
    RESULTS["shapes"] = {}
    for name, shp in shapes.items():
        if over_budget():
            log("budget reached; skipping shape", name)
            RESULTS["errors"].append(f"skipped {name}: time budget")
            continue
        if ARGS.sweep and DEV.type == "cuda":
            RESULTS["sweep"][name] = guard("sweep", lambda: sweep_fwd(name, shp), {})
        RESULTS["shapes"][name] = guard(name, lambda: run_shape(name, shp, sps, fx, fmask, ck), {})
        RESULTS["shapes"][name]["fuse_linear_epilogue"] = ops.FUSE_LINEAR_EPILOGUE
        if ARGS.profile and DEV.type == "cuda" and not over_budget():
            RESULTS["shapes"][name]["profile"] = guard("profile", lambda: profile_ops(shp), {})
        _write()
    RESULTS["configs"] = {"fwd": ops.FWD_CFG, "fwd_long": ops.FWD_CFG_LONG, "bwd_dq": ops.BWD_DQ_CFG,
                          "bwd_dkdv": ops.BWD_DKDV_CFG, "lin": ops.LIN_CFG}
    if ARGS.d64 and DEV.type == "cuda" and not over_budget():
        RESULTS["d64_check"] = guard("d64", d64_check, {})
    RESULTS["elapsed_s"] = time.time() - T0
    _write()
    print(table(RESULTS["shapes"]))
    if RESULTS["errors"]:
        print("errors:", *RESULTS["errors"], sep="\n  ")


def _write():
    if ARGS.out:
        out = Path(ARGS.out)
    elif ARGS.smoke:
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "salad_bench_smoke"
    else:
        out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke-cpu" if ARGS.smoke else (RESULTS["meta"]["card"].replace(" ", "_").lower())
    day = RESULTS["meta"]["date_utc"][:10]
    p = out / f"{day}-kernels-{tag}.json"
    p.write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
