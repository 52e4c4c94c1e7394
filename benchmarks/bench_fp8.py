"""FP8 block-sparse attention (kernels/fp8.py) against the bf16 block-sparse kernel: speed and error.

GPU:   PYTHONUNBUFFERED=1 python benchmarks/bench_fp8.py --out $OUT/fp8.json [--sweep]    (< 3 min on an H200)
CPU:   python benchmarks/bench_fp8.py --smoke        (tiny shapes through TRITON_INTERPRET=1; checks only)
       python benchmarks/bench_fp8.py --codegen $OUT/fp8-codegen.json   (no GPU: compile for sm90, report)

Per shape (Wan-1.3B 480p B1 H12 L32760, the ragged 21x30x30 grid L18900 H12, Wan-14B 480p H40; D=128) and
sparsity (0.9, 0.95; top-k lists from kernels.select_topk on the random q / k): do_bench medians of the bf16
rowmap kernel (kernels.block_sparse_attention_rowmap), of quantize_kv_fp8 and of the FP8 kernel alone; the
FP8 output's error against the bf16 kernel's (relative L2, max abs) and, on a sub-sample of heads, against
exact fp32 block-sparse attention and against the step-by-step fp8 reference (the correctness gate: FAIL
and exit status 1 above GATE_TOL).  q is in a random raster order read through a row map, as in SALAD's
inference path.  --sweep then times FWD_CANDIDATES on Wan-1.3B 480p at 0.9 (budget permitting).

JSON (--out PATH): {card, date, rows: [{shape, B, H, L, D, sparsity, what, ms, sdpa_ms, ratio,
rel_err_vs_bf16}], details, sweep}; what = "sparse" (bf16 kernel), "fp8_sparse" (FP8 kernel alone),
"fp8_quant" (quantize_kv_fp8); ratio = sdpa_ms / ms as in latest-kernels.json; the fp8 rows also carry
speedup_vs_bf16 (bf16 ms / fp8 ms) and, for fp8_sparse, ms_with_quant.

History: at commit fb4ea8f FWD_CANDIDATES also had warp-specialised configs (key WS: q quantised beforehand in
tile order, Triton 3.6's Hopper pass). On an H200 the sweep stalled at the first of them (128-row programs,
benchmarks/results/wave8/p19-fp8-sweep-ws-stalled.log), as the bf16 forward's WS did, and WS was removed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATE_TOL = 5e-3          # relative L2 of the GPU kernel vs the step-by-step fp8 reference
SHAPES = {"wan1.3b_480p": (1, 12, 32760, 128), "ragged_21x30x30": (1, 12, 18900, 128),
          "wan14b_480p": (1, 40, 32760, 128)}
SMOKE_SHAPES = {"smoke_d64": (1, 2, 300, 64), "smoke_d128": (1, 2, 300, 128)}
# (BLOCK_N, num_warps, num_stages, USE_TMA, PV_PRECISE) for --sweep
FWD_CANDIDATES = [(128, 8, 2, True, False), (128, 8, 3, True, False), (64, 4, 2, True, False),
                  (64, 4, 3, True, False), (128, 8, 2, False, False), (64, 8, 2, True, False),
                  (128, 4, 2, True, False), (128, 8, 2, True, True)]


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through TRITON_INTERPRET=1")
    ap.add_argument("--codegen", default=None, metavar="JSON",
                    help="no GPU needed: compile the FP8 kernels for --arch and write their fingerprints")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--sweep", action="store_true", help="time FWD_CANDIDATES at Wan-1.3B 480p, sparsity 0.9")
    ap.add_argument("--rep", type=float, default=25.0, help="do_bench rep (ms)")
    ap.add_argument("--ref-heads", type=int, default=2, help="heads checked against the fp32 / fp8 references")
    ap.add_argument("--budget-s", type=float, default=160.0, help="skip remaining work after this many seconds")
    return ap.parse_args()


ARGS = _parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"
elif ARGS.codegen:
    os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, str(ROOT / "tests"))
from _pack import register  # noqa: E402

register()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import salad_pack.kernels as K  # noqa: E402
from salad_pack.kernels import fp8 as F8  # noqa: E402
from profile_layer import median_ms  # noqa: E402

T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def over_budget() -> bool:
    return time.time() - T0 > ARGS.budget_s


def bench(fn) -> float:
    """Median ms (do_bench on the GPU; one timed call after a warm-up on CPU)."""
    dev = torch.device("cuda" if torch.cuda.is_available() and not ARGS.smoke else "cpu")
    return float(median_ms(fn, dev, ARGS.rep, 10))


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def heads(kv8: F8.KV8, hs: slice) -> F8.KV8:
    """The quantised K/V of heads hs only (for the references)."""
    return F8.KV8(kv8.k8[:, hs], kv8.k_scale[:, hs], kv8.v8t[:, hs], kv8.v_scale[:, hs], kv8.k_mean[:, hs],
                  kv8.v_mean[:, hs], kv8.L, kv8.block)


def row(name, shape, sp, what, ms, sdpa_ms, **extra) -> dict:
    B, H, L, D = shape
    return dict(shape=name, B=B, H=H, L=L, D=D, sparsity=sp, what=what, ms=ms, sdpa_ms=sdpa_ms,
                ratio=(sdpa_ms / ms) if ms and sdpa_ms else None, **extra)


# ----------------------------------------------------------------------------------------------

def run_shape(name, shape, sparsities, dev, res) -> bool:
    """Rows for one shape; False when the correctness gate fails."""
    B, H, L, D = shape
    bk = "triton" if ARGS.smoke else "auto"
    dt = torch.float16 if ARGS.smoke else torch.bfloat16   # the interpreter's bf16 stores truncate
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    rm = torch.randperm(L, device=dev)
    sdpa_ms = None
    if not ARGS.smoke:
        qc, kc, vc = (x.contiguous() for x in (q, k, v))
        sdpa_ms = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc))
        del qc, kc, vc
    ok = True
    hs = slice(0, min(H, ARGS.ref_heads))
    for sp in sparsities:
        if over_budget():
            log("budget reached, skipping", name, sp)
            break
        idx, cnt = K.select_topk(q, k, sp, backend=bk, q_rowmap=rm)
        o16 = K.block_sparse_attention_rowmap(q, k, v, idx, cnt, rm, backend=bk)
        kv8 = F8.quantize_kv_fp8(k, v)
        o8 = F8.block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, rm)
        ms16 = bench(lambda: K.block_sparse_attention_rowmap(q, k, v, idx, cnt, rm, backend=bk))
        msq = bench(lambda: F8.quantize_kv_fp8(k, v))
        ms8 = bench(lambda: F8.block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, rm))
        exact = K.block_sparse_attention_rowmap(q[:, hs].float(), k[:, hs].float(), v[:, hs].float(), idx[:, hs],
                                                cnt[:, hs], rm, backend="torch")
        ref8 = F8.block_sparse_attention_fp8_ref(q[:, hs], heads(kv8, hs), idx[:, hs], cnt[:, hs], rm)
        d = dict(bf16_ms=ms16, fp8_ms=ms8, quant_ms=msq, speedup=ms16 / ms8, speedup_with_quant=ms16 / (ms8 + msq),
                 rel_err_vs_bf16=rel(o8, o16), maxabs_vs_bf16=float((o8.float() - o16.float()).abs().max()),
                 fp8_rel_err_vs_exact=rel(o8[:, hs], exact), bf16_rel_err_vs_exact=rel(o16[:, hs], exact),
                 fp8_rel_err_vs_fp8_ref=rel(o8[:, hs], ref8), keep=K.keep_count(K.num_blocks(L), sp))
        res["details"][f"{name}@{sp}"] = d
        err = d["rel_err_vs_bf16"]
        res["rows"] += [row(name, shape, sp, "sparse", ms16, sdpa_ms),
                        row(name, shape, sp, "fp8_sparse", ms8, sdpa_ms, rel_err_vs_bf16=err,
                            speedup_vs_bf16=ms16 / ms8, ms_with_quant=ms8 + msq),
                        row(name, shape, sp, "fp8_quant", msq, sdpa_ms, speedup_vs_bf16=None)]
        log(f"{name} sparsity {sp}: bf16 {ms16:.3f} ms | fp8 {ms8:.3f} ms ({ms16 / ms8:.2f}x) + quant {msq:.3f} ms "
            f"({d['speedup_with_quant']:.2f}x with quant) | vs bf16 rel {err:.4f} max {d['maxabs_vs_bf16']:.3g} | "
            f"vs exact fp8 {d['fp8_rel_err_vs_exact']:.4f} bf16 {d['bf16_rel_err_vs_exact']:.4f} | "
            f"vs fp8 ref {d['fp8_rel_err_vs_fp8_ref']:.2e}")
        if not d["fp8_rel_err_vs_fp8_ref"] < GATE_TOL:
            log(f"FAIL {name} {sp}: FP8 kernel vs fp8 reference relative L2 {d['fp8_rel_err_vs_fp8_ref']:.3g} "
                f"> {GATE_TOL}")
            ok = False
    return ok


def sweep(dev) -> dict:
    B, H, L, D = SHAPES["wan1.3b_480p"]
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    rm = torch.randperm(L, device=dev)
    idx, cnt = K.select_topk(q, k, 0.9, q_rowmap=rm)
    kv8 = F8.quantize_kv_fp8(k, v)
    out = {"table": dict(F8.fp8_config("fwd", D)), "candidates": []}
    for bn, nw, ns, tma, precise in FWD_CANDIDATES:
        if over_budget():
            log("budget reached, sweep stopped")
            break
        cfg = dict(BLOCK_N=bn, num_warps=nw, num_stages=ns, USE_TMA=tma, PV_PRECISE=precise)
        try:
            ms = bench(lambda: F8.block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, rm, config=cfg))
        except Exception as e:  # e.g. out of shared memory: record and go on
            ms = None
            cfg["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out["candidates"].append(dict(cfg, ms=ms))
        log("sweep", cfg, ms)
    done = [c for c in out["candidates"] if c["ms"] is not None]
    out["fastest"] = min(done, key=lambda c: c["ms"]) if done else None
    log("sweep fastest", out["fastest"], "table", out["table"])
    return out


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() and not ARGS.smoke else "cpu-interpreter"


def main_bench() -> int:
    dev = torch.device("cuda" if torch.cuda.is_available() and not ARGS.smoke else "cpu")
    ok, why = F8.fp8_support(dev)
    log("fp8_support:", ok, why)
    if not ok and not ARGS.smoke:
        log(f"FP8 path not available here ({why}); nothing to measure")
        return 2
    torch.manual_seed(0)
    res = {"card": card(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "fwd_config": dict(F8.fp8_config("fwd", 128)), "rows": [], "details": {}}
    shapes = SMOKE_SHAPES if ARGS.smoke else {n: SHAPES[n] for n in ARGS.shapes.split(",")}
    sps = [float(s) for s in ARGS.sparsities.split(",")]
    good = True
    for name, shape in shapes.items():
        good &= run_shape(name, shape, [0.5] if ARGS.smoke else sps, dev, res)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if ARGS.sweep and not ARGS.smoke:
        res["sweep"] = sweep(dev)
    print(f"\n{'shape':18s} {'sp':>5s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'x':>5s} {'quant':>6s} {'x w/q':>6s} "
          f"{'rel vs bf16':>11s} {'fp8/exact':>9s} {'bf16/exact':>10s}")
    for key, d in res["details"].items():
        name, sp = key.split("@")
        print(f"{name:18s} {sp:>5s} {d['bf16_ms']:8.3f} {d['fp8_ms']:8.3f} {d['speedup']:5.2f} {d['quant_ms']:6.3f} "
              f"{d['speedup_with_quant']:6.2f} {d['rel_err_vs_bf16']:11.4f} {d['fp8_rel_err_vs_exact']:9.4f} "
              f"{d['bf16_rel_err_vs_exact']:10.4f}")
    if ARGS.out:
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).write_text(json.dumps(res, indent=1))
        log("wrote", ARGS.out)
    print("PASS" if good else "FAIL: the FP8 kernel is off its fp8 reference (see above)")
    return 0 if good else 1


# ----------------------------------------------------------------------------------------------

def main_codegen() -> int:
    """Compile (never launch) the FP8 kernels for sm ARGS.arch through kernel_codegen's stand-in driver."""
    import triton
    import kernel_codegen as kc
    compiled = kc._install_driver(ARGS.arch)
    F8._require = lambda *a: None          # CPU tensors stand in for the GPU's; nothing runs
    L, blk = 1000, 128
    nq = K.num_blocks(L, blk)
    out = {"triton": triton.__version__, "arch": ARGS.arch, "kernels": {}}
    for D in (64, 128):
        k, v, q = (torch.randn(1, L, 2, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        idx = torch.arange(nq, dtype=torch.int32).expand(1, 2, nq, nq)
        cnt = torch.full((1, 2, nq), nq, dtype=torch.int32)
        n0 = len(compiled)
        F8.quantize_kv_fp8(k, v)
        kv8 = F8.quantize_kv_fp8_ref(k, v)
        cands = [dict(F8.fp8_config("fwd", D))] + [dict(BLOCK_N=bn, num_warps=nw, num_stages=ns, USE_TMA=t,
                                                        PV_PRECISE=p) for bn, nw, ns, t, p in FWD_CANDIDATES]
        tags = iter(["fwd " + ",".join(f"{a}={b}" for a, b in c.items()) for c in cands])
        for c in cands:
            F8.block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, torch.randperm(L), bias=torch.randn(2 * D),
                                                 config=c)
        for name, kern in compiled[n0:]:
            fp = kc._fingerprint(kern)
            h = fp["hist"]
            fp["wgmma_e4m3"] = sum(n for op, n in h.items() if op.startswith("wgmma.mma_async") and "e4m3" in op)
            fp["cvt_e4m3"] = sum(n for op, n in h.items() if op.startswith("cvt") and "e4m3" in op)
            fp["ex2"] = sum(n for op, n in h.items() if op.startswith("ex2"))
            tag = f"D{D} {name}" + (f" [{next(tags)}]" if name == "_sparse_fwd_fp8_kernel" else "")
            out["kernels"][tag] = fp
            print(f"{tag:100s} warps {fp['num_warps']} stages {fp['num_stages']} shared {fp['shared']:6d} "
                  f"wgmma.e4m3 {fp['wgmma_e4m3']:2d} cvt.e4m3 {fp['cvt_e4m3']:3d} ex2 {fp['ex2']:3d}")
    Path(ARGS.codegen).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.codegen).write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main_codegen() if ARGS.codegen else main_bench())
