"""Benchmark SALAD kernels against default SDPA, FlexAttention (same block mask) and, if present,
comfy-kitchen's sol_attn.  One process; JSON results + a printed table.

GPU:   PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --out benchmarks/results [--sweep]
       PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --quick --out $OUT     (< 3 min)
CPU:   python benchmarks/bench_kernels.py --smoke [--quick]   (tiny shapes, TRITON_INTERPRET=1)

Besides the detailed JSON, --out DIR gets latest-kernels.json: {card, date, rows: [{shape, B, H, L, D,
sparsity, what, ms, sdpa_ms, ratio}]} with what = "whole" (select + sparse + linear branch, vs SDPA),
"sparse" (the block-sparse kernel alone, vs SDPA) or "layer" (salad_core's inference call with
gate + Proj at d = H*D, tokens in raster order, vs SDPA on the same (B, L, H*D) tensors); ratio =
sdpa_ms / ms.  Kernel configs come from the checked-in table (kernels/_triton_ops.CONFIGS);
--sweep times candidates per call and reports the fastest without changing the table.

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
    ap.add_argument("--sweep", action="store_true",
                    help="also time candidate kernel configs (passed per call; the checked-in table is not changed)")
    ap.add_argument("--shapes", default="all",
                    help="comma list of shape names (wan1.3b_480p, ragged_21x30x30, wan14b_480p, wan14b_720p) or "
                         "'all' (wan1.3b_480p, wan14b_720p)")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler kernel breakdown per shape")
    ap.add_argument("--quick", action="store_true",
                    help="< 3 min on an H100/H200: whole op, sparse only and full layer vs SDPA at Wan-1.3B 480p, "
                         "the ragged 21x30x30 grid and Wan-14B 480p, sparsity 0.9/0.95, no Flex/backward/sweep")
    ap.add_argument("--rep", type=float, default=None, help="do_bench rep (ms; default 60, --quick 25)")
    ap.add_argument("--d64", action="store_true", help="also check/time head_dim 64")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--kitchen", default=str(ROOT / ".whl" / "ck"), help="dir holding an unpacked comfy_kitchen")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip remaining work after this many seconds")
    args = ap.parse_args()
    if args.rep is None:
        args.rep = 25.0 if args.quick else 60.0
    if args.quick:
        args.no_bwd = args.no_flex = True
        args.sweep = False
    return args


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
RESULTS: dict = {"errors": [], "rows": []}
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

# Candidate configs for --sweep: (num_warps, num_stages, kernel keyword arguments).  Each is passed to
# the kernels per call (TritonOptions.configs); the checked-in table (kernels/_triton_ops.CONFIGS)
# is never changed here.  The fastest candidate is reported; adopting it means editing the table.
FWD_CANDIDATES = [(4, 2, dict(BLOCK_N=64, USE_TMA=True)), (4, 3, dict(BLOCK_N=64, USE_TMA=True)),
                  (8, 2, dict(BLOCK_N=128, USE_TMA=True)), (8, 3, dict(BLOCK_N=128, USE_TMA=True)),
                  (8, 2, dict(BLOCK_N=64, USE_TMA=True)), (4, 2, dict(BLOCK_N=64, USE_TMA=False))]
DQ_CANDIDATES = [(8, 4, dict(BLOCK_N=64, USE_TMA=False)), (8, 4, dict(BLOCK_N=64, USE_TMA=True)),
                 (4, 2, dict(BLOCK_N=64, USE_TMA=True)), (8, 2, dict(BLOCK_N=64, USE_TMA=True)),
                 (8, 2, dict(BLOCK_N=128, USE_TMA=True))]
DKDV_CANDIDATES = [(8, 3, dict(BLOCK_N=128, BLOCK_M=64, USE_TMA=False)),
                   (8, 3, dict(BLOCK_N=128, BLOCK_M=64, USE_TMA=True)),
                   (8, 2, dict(BLOCK_N=128, BLOCK_M=64, USE_TMA=True)),
                   (4, 2, dict(BLOCK_N=64, BLOCK_M=64, USE_TMA=True)),
                   (8, 3, dict(BLOCK_N=128, BLOCK_M=32, USE_TMA=True))]
LIN_STATE_CANDIDATES = [(8, 3, dict(BLOCK_N=64, PROGRAMS=528)), (8, 3, dict(BLOCK_N=64, PROGRAMS=1056)),
                        (8, 3, dict(BLOCK_N=128, PROGRAMS=528)), (4, 3, dict(BLOCK_N=64, PROGRAMS=1056)),
                        (8, 3, dict(BLOCK_N=128, PROGRAMS=1056))]
LIN_APPLY_CANDIDATES = [(8, 3, dict(BLOCK_M=64, PROGRAMS=528)), (4, 3, dict(BLOCK_M=64, PROGRAMS=1056)),
                        (8, 3, dict(BLOCK_M=128, PROGRAMS=1056)), (4, 3, dict(BLOCK_M=64, PROGRAMS=2112)),
                        (8, 3, dict(BLOCK_M=128, PROGRAMS=2112)), (4, 3, dict(BLOCK_M=32, PROGRAMS=2112))]


def cfg_dict(c):
    """A triton.Config as JSON."""
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def sweep_configs(kind, candidates, fn, D, dtype, L):
    """Time fn(opts) under each candidate config for kernel `kind` (passed per call), next to the
    table's own entry; returns rows and the fastest."""
    import triton
    from salad_pack.kernels import _triton_ops as ops
    table = ops.config_for(kind, D, dtype, L)
    rows, best = [], None
    for nw, ns, kw in candidates:
        if over_budget():
            break
        c = triton.Config(dict(kw), num_warps=nw, num_stages=ns)
        opts = K.TritonOptions(configs={kind: c})
        ms = guard(f"sweep {kind} {cfg_dict(c)}", lambda: bench(lambda: fn(opts)))
        rows.append(dict(cfg_dict(c), ms=ms))
        log(f"sweep {kind} {cfg_dict(c)}: {ms}")
        if ms is not None and (best is None or ms < best["ms"]):
            best = rows[-1]
    return {"table": cfg_dict(table), "candidates": rows, "fastest": best}


def sweep(name, shape, sparsity=0.9):
    """Forward, backward and linear-branch configs on one shape (each candidate explicit per call)."""
    from salad_pack.kernels import _triton_ops as ops
    B, H, L, D = shape
    blk = K.DEFAULT_BLOCK
    scale = 1 / math.sqrt(D)
    (_, _, _), (q, k, v) = make_inputs(B, H, L, D)
    idx, cnt = sel(q, k, sparsity, block=blk)
    out = {"fwd": sweep_configs("fwd", FWD_CANDIDATES, lambda o: bsa(q, k, v, idx, cnt, block=blk, triton_options=o),
                                D, q.dtype, L)}
    if not ARGS.no_bwd:
        o, lse, _ = ops._sparse_fwd(q, k, v, idx, cnt, blk, scale)
        do = torch.randn_like(o)
        for kind, cands in (("bwd_dq", DQ_CANDIDATES), ("bwd_dkdv", DKDV_CANDIDATES)):
            out[kind] = sweep_configs(kind, cands, lambda opts: ops._sparse_bwd(q, k, v, o, lse, do, idx, cnt, blk,
                                                                               scale, opts=opts), D, q.dtype, L)
    out["lin_state"] = sweep_configs("lin_state", LIN_STATE_CANDIDATES, lambda o: ops.linear_state(k, v, o),
                                     D, q.dtype, L)
    S, z = ops.linear_state(k, v)
    out["lin_apply"] = sweep_configs("lin_apply", LIN_APPLY_CANDIDATES,
                                     lambda o: ops._linear_apply(q, S, z, 1e-5, opts=o), D, q.dtype, L)
    log("sweep", name, {kind: (r["table"], r["fastest"]) for kind, r in out.items()})
    return out


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


def layer_times(shape, grid, sparsities):
    """salad_core's inference call for one Wan self-attention (q, k, v and the gate input x in
    (B, L, H*D) raster order; tile gather/scatter in the kernel, linear branch, gate and a d x d
    Proj at d = H*D) at each sparsity, and SDPA on the same tensors (head split and merge included)."""
    from salad_pack.salad_core.attention import SaladConfig, salad_self_attention
    from salad_pack.salad_core.weights import SaladWeights
    B, H, L, D = shape
    q3, k3, v3, x = (torch.randn(B, L, H * D, device=DEV, dtype=DT) for _ in range(4))
    w = SaladWeights.new(H * D, H, 1).to(device=DEV, dtype=DT)
    torch.nn.init.normal_(w.proj_for(0).weight, std=0.02)   # zero-init Proj would be a no-op mix

    def sdpa():
        heads = (t.view(B, L, H, D).transpose(1, 2) for t in (q3, k3, v3))
        return F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B, L, H * D)

    out = {"sdpa_layer_ms": guard("sdpa layer", lambda: bench(sdpa))}
    with torch.no_grad():
        for sp in sparsities:
            cfg = SaladConfig(sparsity=sp, pattern="topk", backend=BK)
            out[sp] = guard(f"layer {sp}", lambda: bench(lambda: salad_self_attention(
                q3, k3, v3, H, grid=grid, x=x, proj=w.proj_for(0), gate=w.gate_for(0), config=cfg)))
    return out


def summary_row(name, shape, sp, what, ms, sdpa_ms):
    B, H, L, D = shape
    return {"shape": name, "B": B, "H": H, "L": L, "D": D, "sparsity": sp, "what": what,
            "ms": ms, "sdpa_ms": sdpa_ms, "ratio": (sdpa_ms / ms) if ms and sdpa_ms else None}


def run_shape(name, shape, grid, sparsities, fx, fmask, ck):
    B, H, L, D = shape
    blk = K.DEFAULT_BLOCK
    nq = K.num_blocks(L, blk)
    res = {"B": B, "H": H, "L": L, "D": D, "block": blk, "nq": nq}
    (qb, kb, vb), (q, k, v) = make_inputs(B, H, L, D)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    flops_dense = 4.0 * B * H * L * L * D
    # ---- dense SDPA
    res["sdpa_fwd_ms"] = guard("sdpa fwd", lambda: bench(lambda: F.scaled_dot_product_attention(qc, kc, vc)))
    if not ARGS.quick:
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
    # ---- the full layer (salad_core) and our pieces that do not depend on sparsity
    layers = guard("layer", lambda: layer_times(shape, grid, sparsities), {}) or {}
    res["sdpa_layer_ms"] = layers.get("sdpa_layer_ms")
    res["linear_ms"] = guard("linear", lambda: bench(lambda: lin(q, k, v)))
    res["pool_qk_ms"] = guard("pool", lambda: bench(lambda: (pool(q), pool(k))))
    ol = guard("linear out", lambda: lin(q, k, v))
    if ol is not None:
        hs = slice(0, min(H, 2))
        res["linear_relerr_vs_ref"] = guard(
            "lin ref", lambda: rel(ol[:, hs], R.linear_attention_ref(q[:, hs], k[:, hs], v[:, hs])))
    for sp in sparsities:
        if over_budget():
            log("budget reached, skipping", name, sp)
            break
        r = {}
        kk = K.keep_count(nq, sp)
        r["keep"] = kk
        r["density"] = kk / nq
        idx, cnt = sel(q, k, sp)
        r["sparse_fwd_ms"] = guard("sparse fwd", lambda: bench(lambda: bsa(q, k, v, idx, cnt)))
        r["whole_fwd_ms"] = guard("whole", lambda: bench(lambda: sla(q, k, v, *sel(q, k, sp))))
        r["layer_ms"] = layers.get(sp)
        if not ARGS.quick:
            r["select_ms"] = guard("select", lambda: bench(lambda: sel(q, k, sp)))
            r["select_torch_pool_ms"] = guard("select torch", lambda: bench(
                lambda: K.lut_from_scores(R.pool_blocks_ref(q) @ R.pool_blocks_ref(k).transpose(-1, -2), kk)))
            r["sparse_fwd_contig_ms"] = guard("sparse fwd contig",
                                              lambda: bench(lambda: bsa(qc, kc, vc, idx, cnt)))
            r["sparse_linear_fwd_ms"] = guard("sparse+lin", lambda: bench(lambda: sla(q, k, v, idx, cnt)))
            r["select_sparse_fwd_ms"] = guard("sel+sparse", lambda: bench(
                lambda: bsa(q, k, v, *sel(q, k, sp))))
            r["whole_fwd_peak_mb"] = guard("whole mem", lambda: peak_mb(
                lambda: sla(q, k, v, *sel(q, k, sp))))
        for what, key, ref in (("whole", "whole_fwd_ms", "sdpa_fwd_ms"), ("sparse", "sparse_fwd_ms", "sdpa_fwd_ms"),
                               ("layer", "layer_ms", "sdpa_layer_ms")):
            RESULTS["rows"].append(summary_row(name, shape, sp, what, r.get(key), res.get(ref)))
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
                # centroid compensation (Triton forward + backward, means pooled inside)
                oc, _ = bsa(a, b, c, idx, cnt, compensate=True)
                out["sparse_comp_fwd_ms"] = bench(lambda: bsa(q, k, v, idx, cnt, compensate=True))
                out["sparse_comp_bwd_ms"] = bench(lambda: torch.autograd.grad(oc, (a, b, c), do, retain_graph=True))
                return out
            r.update(guard("our bwd", our_bwd, {}) or {})
        # comfy-kitchen sol_attn (own selection, 64-token blocks, topk_ratio = keep fraction)
        if ck is not None:
            def kit():
                def f():
                    return ck.sol_attn(qb, kb, vb, topk_ratio=1.0 - sp, tail=False)
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
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))
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


SHAPES = {  # name: ((B, H, L, D), latent grid (frames, rows, cols) of the layer call)
    "wan1.3b_480p": ((1, 12, 32760, 128), (21, 30, 52)),
    "ragged_21x30x30": ((1, 12, 18900, 128), (21, 30, 30)),   # 30 rows/cols: ragged tiles and tail block
    "wan14b_480p": ((1, 40, 32760, 128), (21, 30, 52)),
    "wan14b_720p": ((1, 40, 75600, 128), (21, 45, 80)),
}
QUICK = ("wan1.3b_480p", "ragged_21x30x30", "wan14b_480p")
FULL = ("wan1.3b_480p", "wan14b_720p")


def main():
    from salad_pack.kernels import _triton_ops as ops
    if ARGS.smoke:
        shapes = {"smoke": ((1, 2, 300, 64), (3, 10, 10))}   # 3 blocks of 128, ragged tail
    else:
        names = QUICK if ARGS.quick else (FULL if ARGS.shapes == "all" else ARGS.shapes.split(","))
        unknown = [n for n in names if n not in SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
        shapes = {n: SHAPES[n] for n in names}
    sps = [float(s) for s in ARGS.sparsities.split(",")]
    RESULTS["meta"] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "card": (torch.cuda.get_device_name() if DEV.type == "cuda"
                 else f"cpu ({platform.processor() or 'cpu'}) interpreter"),
        "torch": torch.__version__, "python": platform.python_version(),
        "dtype": str(DT), "smoke": ARGS.smoke, "quick": ARGS.quick,
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
    ck, why = kitchen_setup() if not ARGS.quick else (None, "skipped (--quick)")
    RESULTS["kitchen"] = "available" if ck is not None else why
    RESULTS["shapes"] = {}
    for name, (shp, grid) in shapes.items():
        if over_budget():
            log("budget reached; skipping shape", name)
            RESULTS["errors"].append(f"skipped {name}: time budget")
            continue
        if ARGS.sweep:
            RESULTS["sweep"][name] = guard("sweep", lambda: sweep(name, shp), {})
        RESULTS["shapes"][name] = guard(name, lambda: run_shape(name, shp, grid, sps, fx, fmask, ck), {})
        if ARGS.profile and DEV.type == "cuda" and not over_budget():
            RESULTS["shapes"][name]["profile"] = guard("profile", lambda: profile_ops(shp), {})
        _write()
    RESULTS["configs"] = {str(key): cfg_dict(c) for key, c in ops.CONFIGS.items()}
    if ARGS.d64 and DEV.type == "cuda" and not over_budget():
        RESULTS["d64_check"] = guard("d64", d64_check, {})
    RESULTS["elapsed_s"] = time.time() - T0
    _write()
    print(table(RESULTS["shapes"]))
    print(summary_table(RESULTS["rows"]))
    if RESULTS["errors"]:
        print("errors:", *RESULTS["errors"], sep="\n  ")


def summary_table(rows):
    f = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = [f"{'shape':18s} {'sparsity':>8s} {'what':7s} {'ms':>9s} {'SDPA ms':>9s} {'x SDPA':>7s}"]
    for r in rows:
        lines.append(f"{r['shape']:18s} {r['sparsity']:8.2f} {r['what']:7s} {f(r['ms']):>9s} {f(r['sdpa_ms']):>9s} "
                     f"{f(r['ratio']):>7s}")
    return "\n".join(lines)


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
    kind = "kernels-quick" if ARGS.quick else "kernels"
    (out / f"{day}-{kind}-{tag}.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    if ARGS.out or ARGS.smoke:
        latest = {"card": RESULTS["meta"]["card"], "date": RESULTS["meta"]["date_utc"], "rows": RESULTS["rows"]}
        (out / "latest-kernels.json").write_text(json.dumps(latest, indent=1))


if __name__ == "__main__":
    main()
