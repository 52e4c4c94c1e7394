"""Where one SALAD self-attention call spends its time, per Wan grid: GPU time of each part, host (launch) time,
number of kernels, against SDPA, and against an earlier version of the pack in the same run (issue 9 item 1).

    python benchmarks/profile_layer.py --out DIR [--before .before] [--models 1.3b,14b] [--grids 480p,sq480,...]

Per (model, grid, sparsity), batch 1 (``--batch``), top-k pattern, random bf16 q/k/v/x and random gate + Proj:

* ``sdpa_ms``: ``F.scaled_dot_product_attention`` on the same q, k, v (what dense Wan runs);
* ``layer_ms``: the whole inference call ``salad_self_attention`` with gate + Proj; ``sparse_only_ms``: without
  weights (no linear branch); ``whole_op_ms``: selection + sparse kernel + linear branch (no gate/Proj GEMM);
* parts (each timed alone on the same inputs): ``kv_pass`` (K/V tile order + k block means + linear state),
  ``q_pass`` (q block means + linear branch), ``topk`` (scores + LUT), ``sparse`` (the sparse kernel with
  G*bias), ``proj`` (the Proj GEMM into the output), ``gate`` (token mean + gate linear);
* ``layer_queued_ms``: the layer call's GPU time with the host kept ahead (calls queued behind a GPU spin), i.e.
  without the launch gaps ``layer_ms`` shows where a call is host-bound (below ~20k tokens);
* ``host_us``: time the host needs to enqueue one call while the GPU is kept busy (``torch.cuda._sleep``), i.e.
  the call's launch + Python cost; a call is launch-bound when host_us exceeds its GPU time;
* ``kernels``: CUDA kernels one call launches (torch.profiler);
* ``before_*``: the same numbers for the pack snapshot in ``--before`` (``git archive`` of an earlier commit),
  imported under another package name, so the comparison is one run on one card.

Grids (latent tokens F x H x W): 480p 21x30x52, sq480 21x30x30 (ragged: 30 is not a multiple of the 8-token
tile side), al18k 18x32x32 (the tile-aligned grid nearest sq480 in tokens), 480p17 5x30x52, 480p33 9x30x52,
al480 20x32x52->20x32x48 ... see GRIDS.  Times: medians of ``triton.testing.do_bench``.

CPU: ``--smoke`` runs tiny shapes with the torch backend (checks the script, numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.machinery
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = {"1.3b": (12, 128), "14b": (40, 128)}          # heads, head dim
GRIDS = {"480p": (21, 30, 52), "sq480": (21, 30, 30), "al18k": (18, 32, 32), "480p17": (5, 30, 52),
         "480p33": (9, 30, 52), "480p49": (13, 30, 52), "al480": (20, 32, 48), "sq624": (21, 39, 39),
         "al624": (20, 40, 40), "720p": (21, 45, 80), "al720": (22, 48, 72)}


# ---- shared by the GPU benchmark scripts (sweep_passes.py, sweep_fwd.py) --------------------------------------

def shape(name: str):
    """A shape name MODEL-GRID (e.g. "1.3b-480p", "14b-sq480"; keys of MODELS and GRIDS) -> (heads, grid)."""
    model, grid = name.split("-", 1)
    return MODELS[model][0], GRIDS[grid]


def sweep_parser(doc: str, rep_ms: int, budget_s: float, smoke_help: str) -> argparse.ArgumentParser:
    """The arguments every sweep script takes: --out, --shapes (MODEL-GRID names), --rep-ms, --budget-s, --smoke."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1.3b-480p,14b-480p,1.3b-sq480", help="MODEL-GRID names, comma separated")
    ap.add_argument("--rep-ms", type=int, default=rep_ms)
    ap.add_argument("--budget-s", type=float, default=budget_s)
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    return ap


def run_header(dev, **extra) -> dict:
    """The head of a result JSON: card (or "cpu") and UTC date, then `extra`."""
    import torch
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return {"card": card, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **extra}


def write_result(out, stem: str, res: dict) -> Path:
    """res as OUT/<stem>-<date>-<card>.json (the folder is created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{dt.date.today().isoformat()}-{res['card'].replace(' ', '_').lower()}.json"
    path.write_text(json.dumps(res, indent=1))
    return path


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--before", default=None, help="folder of an earlier pack snapshot (kernels/, salad_core/)")
    ap.add_argument("--models", default="1.3b,14b")
    ap.add_argument("--grids", default="480p17,480p33,sq480,al18k,480p,al480")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--precisions", default="bf16", help="comma list of salad_core PRECISIONS (layer rows only)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--no-parts", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--smoke", action="store_true")
    return ap.parse_args(argv)


def load_snapshot(folder: str, name: str = "salad_before"):
    """Import the pack snapshot in `folder` as package `name` (its relative imports resolve inside it)."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod = importlib.util.module_from_spec(spec)
    mod.__path__ = [str(Path(folder).resolve())]
    sys.modules[name] = mod
    return importlib.import_module(f"{name}.salad_core.attention")


def median_ms(fn, dev, rep_ms, warmup_ms):
    """GPU: the median of ``triton.testing.do_bench``; elsewhere the wall time of a second call (CPU smoke)."""
    if dev.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


class Clock:
    def __init__(self, dev, rep_ms):
        self.dev, self.rep_ms = dev, rep_ms

    def gpu_ms(self, fn):
        return median_ms(fn, self.dev, self.rep_ms, max(25, self.rep_ms // 4))

    def queued_ms(self, fn, n=40):
        """GPU time per call with the host kept ahead: the calls are queued behind a GPU spin long enough to
        enqueue them all, so host (launch) gaps between kernels are not counted -- what the call costs inside a
        forward whose host side runs ahead of the GPU.  Median of 3 runs."""
        import torch
        if self.dev.type != "cuda":
            return None
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        spin = int(min(2e9, max(1e7, (time.perf_counter() - t0) * n * 3 * 2e9)))   # cycles (~2 GHz), 3x margin
        out = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(spin)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / n)
        return sorted(out)[1]

    def host_us(self, fn, n=20):
        """Enqueue time per call with the GPU kept busy (so the host never waits for it)."""
        import torch
        if self.dev.type != "cuda":
            return None
        fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e9))          # ~1 s of GPU spin: the queue stays ahead of the host
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return host

    def kernels(self, fn):
        import torch
        if self.dev.type != "cuda":
            return None
        fn()
        torch.cuda.synchronize()
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            return sum(1 for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA"))
        except Exception as e:  # pragma: no cover - profiler availability
            return f"n/a ({type(e).__name__})"


def make_inputs(H, D, grid, B, dev, dtype, seed=1):
    import torch
    L = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(B, L, H * D, device=dev, dtype=dtype, generator=g) for _ in range(3))
    x = torch.randn(B, L, H * D, device=dev, dtype=dtype, generator=g)
    proj = torch.nn.Linear(H * D, H * D).to(device=dev, dtype=dtype)
    gate = torch.nn.Linear(H * D, 1).to(device=dev, dtype=dtype)
    with torch.no_grad():
        for p in list(proj.parameters()) + list(gate.parameters()):
            p.normal_(0.0, 0.01, generator=g)
    return q, k, v, x, proj, gate


def infer_parts(A, K, q, k, v, x, proj, gate, H, D, grid, conf):
    """What one inference call computes on its way (salad_core.attention._infer taken apart, top-k pattern), as
    a namespace: rm, q4/k4/v4, kt/vt, km (k means), st (linear state), gl (gate logit), qm (q means), ol (linear
    branch), idx/cnt, mats/bias (Proj factors), and ``sparse(tiled=False, **kw)``, the sparse kernel on these
    inputs (kw: backend, triton_options; tiled: reading a tile-ordered copy of q, as the Q_TILED config reads it).
    Call under torch.inference_mode()."""
    from types import SimpleNamespace
    from salad_pack.salad_core.tiling import TileLayout
    B, L = q.shape[:2]
    n = SimpleNamespace(rm=TileLayout.get(grid, 0, 0, conf.tile, q.device).perm32)
    n.q4, n.k4, n.v4 = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
    n.kt, n.vt, n.km, _, n.st = K.kv_pass(n.k4, n.v4, n.rm, conf.block, pool_k=True, linear_state=True)
    n.gl = A.gate_logit(x, gate, B, backend=conf.backend)
    n.qm, n.ol = K.q_pass(n.q4, n.rm, conf.block, state=n.st, eps=conf.eps, gate_logit=n.gl)
    n.idx, n.cnt = K.topk_from_pooled(n.qm, n.km, conf.sparsity)
    n.mats, n.bias = A.proj_factors(proj, q, "proj")
    n.qt = None     # q in tile order (q_pass's tile_q), made on the first sparse(tiled=True)

    def sparse(tiled=False, **kw):
        if tiled and n.qt is None:
            n.qt = K.q_pass(n.q4, n.rm, conf.block, pool=False, tile_q=True)[-1]
        return K.block_sparse_attention_rowmap(n.q4, n.kt, n.vt, n.idx, n.cnt, n.rm, block=conf.block,
                                               scale=1 / math.sqrt(D), bias=n.bias, gate_logit=n.gl,
                                               q_tiled=n.qt if tiled else None, **kw)
    n.sparse = sparse
    return n


def parts(A, K, q, k, v, x, proj, gate, H, D, grid, conf, clock):
    """The inference call taken apart (the current pack's functions), each part timed on its own."""
    import torch
    B, L = q.shape[:2]
    out = {}
    with torch.inference_mode():
        n = infer_parts(A, K, q, k, v, x, proj, gate, H, D, grid, conf)
        rm, q4, k4, v4, km, st, gl, qm = n.rm, n.q4, n.k4, n.v4, n.km, n.st, n.gl, n.qm
        o2 = n.sparse().transpose(1, 2).reshape(B * L, H * D)
        ol2 = n.ol.transpose(1, 2).reshape(B * L, H * D)
        out["kv_pass_ms"] = clock.gpu_ms(lambda: K.kv_pass(k4, v4, rm, conf.block, pool_k=True, linear_state=True))
        out["gate_ms"] = clock.gpu_ms(lambda: A.gate_logit(x, gate, B, backend=conf.backend))
        if q.is_cuda:   # the token mean as the split-L Triton kernel (kernels.token_mean), not yet the default
            out["gate_triton_ms"] = clock.gpu_ms(lambda: A.gate_logit(x, gate, B, backend="triton"))
        out["q_pass_ms"] = clock.gpu_ms(lambda: K.q_pass(q4, rm, conf.block, state=st, eps=conf.eps, gate_logit=gl))
        out["topk_ms"] = clock.gpu_ms(lambda: K.topk_from_pooled(qm, km, conf.sparsity))
        out["sparse_ms"] = clock.gpu_ms(n.sparse)
        out["proj_ms"] = clock.gpu_ms(lambda: A.add_factors_(o2, ol2, n.mats))

        def whole():
            kt, vt, km, _, st = K.kv_pass(k4, v4, rm, conf.block, pool_k=True, linear_state=True)
            qm, ol = K.q_pass(q4, rm, conf.block, state=st, eps=conf.eps)
            idx, cnt = K.topk_from_pooled(qm, km, conf.sparsity)
            return K.block_sparse_attention_rowmap(q4, kt, vt, idx, cnt, rm, block=conf.block,
                                                   scale=1 / math.sqrt(D)), ol
        out["whole_op_ms"] = clock.gpu_ms(whole)
        out["whole_op_queued_ms"] = clock.queued_ms(whole)
        out["whole_op_host_us"] = clock.host_us(whole)
    return out


def measure(A, q, k, v, x, proj, gate, H, grid, conf, clock, prefix=""):
    import torch
    with torch.inference_mode():
        def layer():
            return A.salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=conf)

        def sparse_only():
            return A.salad_self_attention(q, k, v, H, grid=grid, config=conf)
        return {f"{prefix}layer_ms": clock.gpu_ms(layer), f"{prefix}layer_queued_ms": clock.queued_ms(layer),
                f"{prefix}sparse_only_ms": clock.gpu_ms(sparse_only),
                f"{prefix}host_us": clock.host_us(layer), f"{prefix}kernels": clock.kernels(layer),
                f"{prefix}sparse_only_host_us": clock.host_us(sparse_only)}


def main(argv=None):
    a = parse(argv)
    from _pack import register
    register()
    import torch
    import torch.nn.functional as F
    import salad_pack.kernels as K
    from salad_pack.salad_core import attention as A
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    before = load_snapshot(a.before) if a.before else None
    models = a.models.split(",")
    grids = a.grids.split(",")
    if a.smoke:
        MODELS["smoke"], GRIDS["smoke"], models, grids, a.rep_ms = (2, 32), (3, 10, 12), ["smoke"], ["smoke"], 10
    clock = Clock(dev, a.rep_ms)
    res = run_header(dev, torch=torch.__version__, before=a.before, batch=a.batch, rows=[])
    t_start = time.time()
    for model in models:
        H, D = MODELS[model]
        for gname in grids:
            grid = GRIDS[gname]
            if time.time() - t_start > a.budget_s:
                print(f"[profile] budget spent, skipping {model} {gname}", flush=True)
                continue
            q, k, v, x, proj, gate = make_inputs(H, D, grid, a.batch, dev, dtype)
            B, L = q.shape[:2]
            q4, k4, v4 = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
            with torch.inference_mode():
                sdpa = clock.gpu_ms(lambda: F.scaled_dot_product_attention(q4, k4, v4))
            for s, prec in ((float(t), p) for t in a.sparsities.split(",") for p in a.precisions.split(",")):
                conf = A.SaladConfig(sparsity=s, pattern="topk", backend="auto" if dev.type == "cuda" else "torch",
                                     precision=prec)
                row = dict(model=model, grid=list(grid), tokens=L, batch=B, sparsity=s, precision=prec, sdpa_ms=sdpa)
                row.update(measure(A, q, k, v, x, proj, gate, H, grid, conf, clock))
                if not a.no_parts and prec == "bf16":
                    row.update(parts(A, K, q, k, v, x, proj, gate, H, D, grid, conf, clock))
                if before is not None and prec == "bf16":
                    bconf = before.SaladConfig(sparsity=s, pattern="topk", backend=conf.backend)
                    row.update(measure(before, q, k, v, x, proj, gate, H, grid, bconf, clock, prefix="before_"))
                row["layer_vs_sdpa"] = sdpa / row["layer_ms"]
                if row.get("whole_op_ms"):
                    row["whole_op_vs_sdpa"] = sdpa / row["whole_op_ms"]
                res["rows"].append(row)
                print(f"[profile] {json.dumps(row)}", flush=True)
            del q, k, v, x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    write_result(a.out, "profile-layer", res)
    hdr = f"{'model':<6}{'grid':<12}{'tok':>7}{'sp':>5}{'prec':>9}{'sdpa':>8}{'layer':>8}{'x':>6}{'queued':>8}" \
          f"{'whole':>8}{'x':>6}" \
          f"{'host us':>9}{'kern':>5}{'before':>8}{'b.host':>8}{'b.kern':>7}"
    print(hdr)
    for r in res["rows"]:
        print(f"{r['model']:<6}{'x'.join(map(str, r['grid'])):<12}{r['tokens']:>7}{r['sparsity']:>5}{r['precision']:>9}"
              f"{r['sdpa_ms']:>8.3f}{r['layer_ms']:>8.3f}{r['layer_vs_sdpa']:>6.2f}"
              f"{r.get('layer_queued_ms') or 0:>8.3f}"
              f"{r.get('whole_op_ms') or 0:>8.3f}"
              f"{r.get('whole_op_vs_sdpa') or 0:>6.2f}{r.get('host_us') or 0:>9.0f}{str(r.get('kernels')):>5}"
              f"{r.get('before_layer_ms') or 0:>8.3f}{r.get('before_host_us') or 0:>8.0f}"
              f"{str(r.get('before_kernels')):>7}")
    return res


if __name__ == "__main__":
    main()
