"""End-to-end Wan 2.1 forward (1.3B or 14B): dense vs SALAD, with ComfyUI's own Wan model code, over a table
of video sizes and batch sizes, plus where one SALAD layer spends its time.

The model is ComfyUI's ``comfy.ldm.wan.model.WanModel`` with random bf16 weights; SALAD is installed with the
same object patches the ComfyUI node uses (nodes/patch.py SaladPatch), with random gate + Proj weights on every
block (so the linear branch and Proj really run; ``--no-weights`` for sparse-only).  Each forward is one model
call (batch 1 = one CFG branch, batch 2 = cond + uncond in one call).  Times are medians of
``triton.testing.do_bench`` (1.3B) or of CUDA-event timed forwards (14B, where one forward takes seconds).

Per layer, at each size's shape (batch 1): SDPA vs the whole SALAD call, the call without weights (sparse-only),
the whole op (selection + sparse kernel + linear branch, no Proj GEMM) and each part timed alone (the K/V pass, the
gate, the Q pass, top-k, the sparse kernel, the Proj GEMM; see benchmarks/profile_layer.py).

``--precision fp8``: the opt-in FP8 sparse kernel (rows carry ``precision``); ``--proj-rank r``: random rank-r
Proj weights instead of full dim x dim ones (rows carry ``proj_rank``).

Sizes (``--sizes``, comma list of names or ``WxHxF``):
  480p 832x480x81, 720p 1280x720x81, sq480 480x480x81, sq624 624x624x81, portrait 480x832x81,
  480p17/480p33/480p49/480p121 (832x480 at 17/33/49/121 frames).  sq480 is the ragged grid of issue 9 (latent
  21x30x30, 18,900 tokens: 30 is not a multiple of the tile).

Writes ``e2e-<date>-<model>-<card>.json`` and ``latest-e2e.json``
(``{card, date, rows: [{model, height, width, frames, batch, sparsity, pattern, dense_ms, ms, speedup}], layers}``)
into --out (``--append``: add to the rows of the latest-e2e.json already there, for a second model in one run).

GPU:  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/bench_e2e.py --model 1.3b --out DIR
      COMFYUI_DIR=... python benchmarks/bench_e2e.py --model 14b --sizes 480p,720p --batches 1 --out DIR
CPU:  python benchmarks/bench_e2e.py --smoke --out /tmp/e2e   (tiny model and video, torch backend; checks it runs)
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81), "sq480": (480, 480, 81), "sq624": (624, 624, 81),
         "portrait": (480, 832, 81), "480p17": (832, 480, 17), "480p33": (832, 480, 33),
         "480p49": (832, 480, 49), "480p121": (832, 480, 121)}
MODELS = {"1.3b": "wan21_t2v_1.3b", "14b": "wan21_t2v_14b"}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="1.3b")
    ap.add_argument("--sizes", default="480p", help=f"comma list of {', '.join(SIZES)} or WxHxF")
    ap.add_argument("--batches", default="1", help="comma list of batch sizes, e.g. 1,2")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--patterns", default="topk")
    ap.add_argument("--rep-ms", type=int, default=1500, help="do_bench time per config (1.3B)")
    ap.add_argument("--iters", type=int, default=3, help="timed forwards per config when one takes > 1 s")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    ap.add_argument("--no-weights", action="store_true", help="sparse-only (no gate/Proj)")
    ap.add_argument("--precisions", default="bf16", help="comma list of PRECISIONS: bf16 (default), fp8, fp8_proj")
    ap.add_argument("--proj-rank", type=int, default=0, help="rank of the random Proj weights (0 = full)")
    ap.add_argument("--fwd-configs", default="table",
                    help="comma list of sparse-forward configs to time the SALAD forwards with: 'table' (the "
                         "checked-in entry) or KEY=VALUE settings joined by '+' on top of it, e.g. "
                         "'table,Q_TILED=1' (kernels.config_overrides; rows carry fwd_config)")
    ap.add_argument("--append", action="store_true", help="merge into --out/latest-e2e.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return ap.parse_args(argv)


def size_of(name: str):
    if name in SIZES:
        return SIZES[name]
    w, h, f = (int(s) for s in name.lower().split("x"))
    return w, h, f


class Timer:
    def __init__(self, dev, rep_ms, iters):
        self.dev, self.rep_ms, self.iters = dev, rep_ms, iters

    def __call__(self, fn):
        import torch
        from profile_layer import median_ms
        if self.dev.type != "cuda":
            return median_ms(fn, self.dev, self.rep_ms, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()                                   # warm-up (and compile for a new shape)
        torch.cuda.synchronize()
        first = (time.perf_counter() - t0) * 1000
        if first < 1000:
            return median_ms(fn, self.dev, self.rep_ms, max(self.rep_ms // 6, 100))
        from bench_quality import timed_ms
        return statistics.median(timed_ms(fn, self.iters))


def build_model(a, dev, dtype):
    import torch
    import comfy.ops
    import comfy.ldm.wan.model as wan
    from make_fixtures import FULL_SIZE
    if a.smoke:
        cfg = dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16)
    else:
        cfg = dict(FULL_SIZE[MODELS[a.model]])
    torch.manual_seed(0)
    model = wan.WanModel(text_dim=4096, device=dev, dtype=dtype, operations=comfy.ops.disable_weight_init, **cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval(), cfg


class Installer:
    """Puts SALAD on the model's blocks the way the ComfyUI node does (SaladPatch object patches)."""

    def __init__(self, model):
        self.model = model
        self.orig_embed = model.patch_embedding.forward
        self.orig_blocks = [b.self_attn.forward for b in model.blocks]

    def install(self, sparsity, pattern, weights, precision="bf16"):
        from salad_pack.nodes.patch import PatchOptions, SaladPatch
        extra = {} if precision == "bf16" else {"precision": precision}
        state = SaladPatch(self.model, PatchOptions(sparsity=sparsity, pattern=pattern, backend="auto", **extra),
                           weights)
        self.model.patch_embedding.forward = state.make_patch_embedding_forward(self.orig_embed)
        for i, b in enumerate(self.model.blocks):
            b.self_attn.forward = state.make_self_attn_forward(i, self.orig_blocks[i])
        return state

    def uninstall(self):
        self.model.patch_embedding.forward = self.orig_embed
        for i, b in enumerate(self.model.blocks):
            b.self_attn.forward = self.orig_blocks[i]


def layer_parts(cfg, grid, dev, dtype, sparsities, patterns, sw, rep_ms):
    """One self-attention call at this grid (batch 1): SDPA vs SALAD, and the call taken apart (profile_layer)."""
    import torch
    import torch.nn.functional as F
    import salad_pack.kernels as K
    from salad_pack.salad_core import attention as A
    from profile_layer import Clock, make_inputs, measure, parts
    H, D = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    clock = Clock(dev, rep_ms)
    q, k, v, x, proj, gate = make_inputs(H, D, grid, 1, dev, dtype)
    if sw is not None:
        proj, gate = sw.proj_for(0), sw.gate_for(0)
    L = q.shape[1]
    q4, k4, v4 = (t.view(1, L, H, D).transpose(1, 2) for t in (q, k, v))
    with torch.inference_mode():
        out = {"grid": list(grid), "tokens": L,
               "sdpa_ms": clock.gpu_ms(lambda: F.scaled_dot_product_attention(q4, k4, v4)), "runs": []}
    for pattern in patterns:
        for s in sparsities:
            conf = A.SaladConfig(sparsity=s, pattern=pattern)
            row = dict(pattern=pattern, sparsity=s)
            row.update(measure(A, q, k, v, x, proj, gate, H, grid, conf, clock))
            if pattern == "topk" and isinstance(proj, torch.nn.Linear):
                row.update(parts(A, K, q, k, v, x, proj, gate, H, D, grid, conf, clock))
                row["whole_op_speedup_vs_sdpa"] = out["sdpa_ms"] / row["whole_op_ms"]
            row["layer_speedup_vs_sdpa"] = out["sdpa_ms"] / row["layer_ms"]
            out["runs"].append(row)
    return out


def fwd_override(spec: str, dtype) -> dict:
    """--fwd-configs entry -> config_overrides mapping: {} for 'table', else the D=128 table entry of the sparse
    forward with KEY=VALUE settings ('+'-joined; num_warps / num_stages are launch settings, the rest config
    keys; values are ints, 1/0 for booleans the kernels read as such)."""
    if spec == "table":
        return {}
    import triton
    from salad_pack.kernels import _triton_ops as ops
    base = ops.config_for("fwd", 128, dtype, 32760)
    kw, launch = dict(base.kwargs), dict(num_warps=base.num_warps, num_stages=base.num_stages)
    for item in spec.split("+"):
        key, _, val = item.partition("=")
        if not val:
            raise ValueError(f"--fwd-configs: {item!r} is not KEY=VALUE")
        (launch if key in launch else kw)[key] = int(val)
    return {"fwd": triton.Config(kw, **launch)}


def main(argv=None):
    a = parse(argv)
    from comfy_harness import find_comfyui
    sys.path.insert(0, str(find_comfyui()))
    import torch
    if a.smoke or not torch.cuda.is_available():
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    from _pack import register
    register()
    from salad_pack.salad_core.weights import SaladWeights

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sizes = [s for s in a.sizes.split(",") if s]
    if a.smoke:
        sizes, a.rep_ms = ["64x64x9", "48x80x5"], 200
    batches = [int(b) for b in a.batches.split(",")]
    sparsities = [float(s) for s in a.sparsities.split(",")]
    patterns = a.patterns.split(",")
    precisions = a.precisions.split(",")
    fwd_configs = [c for c in a.fwd_configs.split(",") if c]
    import salad_pack.kernels as K
    model, cfg = build_model(a, dev, dtype)
    inst = Installer(model)
    timeit = Timer(dev, a.rep_ms, a.iters)

    class _Holder:  # what the node passes: a ModelPatcher-like object whose .model is SaladWeights
        def __init__(self, m):
            self.model = m

    weights = sw = None
    if not a.no_weights:
        rank = {"proj_rank": a.proj_rank} if a.proj_rank else {}
        sw = SaladWeights.new(dim=cfg["dim"], heads=cfg["num_heads"], num_blocks=cfg["num_layers"],
                              base_model="bench-random", **rank)
        with torch.no_grad():
            for p in sw.parameters():
                p.normal_(0.0, 0.01)
        sw = sw.to(device=dev, dtype=dtype)
        weights = _Holder(sw)

    card = torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or "cpu")
    res = {"card": card, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "model": a.model if not a.smoke else "smoke", "config": cfg,
           "weights": "random gate+Proj on all blocks" if weights else "none (sparse-only)", "rows": [],
           "layers": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass

    for name in sizes:
        W, Hh, Fr = size_of(name)
        T = (Fr - 1) // 4 + 1
        grid = (T, Hh // 16, W // 16)
        for batch in batches:
            x = torch.randn(batch, 16, T, Hh // 8, W // 8, device=dev, dtype=dtype)
            t = torch.full((batch,), 500.0, device=dev)
            ctx = torch.randn(batch, 512, 4096, device=dev, dtype=dtype)

            def forward():
                with torch.inference_mode():
                    return model(x, t, ctx, transformer_options={})

            inst.uninstall()
            ref = forward().float()
            dense_ms = timeit(forward)
            print(f"[e2e] {card} {a.model} {W}x{Hh}x{Fr} (grid {grid}) batch {batch}: dense {dense_ms:.1f} ms",
                  flush=True)
            for pattern, s, prec, fwdc in itertools.product(patterns, sparsities, precisions, fwd_configs):
                state = inst.install(s, pattern, weights, prec)
                with K.config_overrides(fwd_override(fwdc, dtype)):
                    out = forward().float()
                    calls = int(sum(state.stats.sparse_calls.values()))
                    ms = timeit(forward)
                row = dict(model=res["model"], height=Hh, width=W, frames=Fr, batch=batch,
                           tokens=grid[0] * grid[1] * grid[2], sparsity=s, pattern=pattern, precision=prec,
                           proj_rank=a.proj_rank if weights else None, dense_ms=dense_ms, ms=ms,
                           speedup=dense_ms / ms, rel_diff_vs_dense=float((out - ref).norm() / ref.norm()))
                if fwdc != "table":
                    row["fwd_config"] = fwdc
                assert calls == cfg["num_layers"], f"SALAD ran on {calls} of {cfg['num_layers']} blocks"
                res["rows"].append(row)
                print(f"[e2e]   SALAD {pattern} {s:.2f} {prec} {fwdc}: {ms:.1f} ms -> {dense_ms / ms:.2f}x "
                      f"(rel. diff vs dense {row['rel_diff_vs_dense']:.3f})", flush=True)
            inst.uninstall()
        if not a.no_layers:
            lp = layer_parts(cfg, grid, dev, dtype, sparsities, patterns, sw, min(a.rep_ms, 300))
            lp.update(model=res["model"], height=Hh, width=W, frames=Fr)
            res["layers"].append(lp)
            print(f"[e2e]   layer: {json.dumps(lp)}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = card.replace(" ", "_").lower()
    path = out_dir / f"e2e-{dt.date.today().isoformat()}-{res['model']}-{tag}.json"
    path.write_text(json.dumps(res, indent=1))
    latest = out_dir / "latest-e2e.json"
    merged = res
    if a.append and latest.exists():
        prev = json.loads(latest.read_text())
        if prev.get("card") == card:
            merged = dict(res, rows=prev["rows"] + res["rows"], layers=prev.get("layers", []) + res["layers"],
                          model=f"{prev.get('model')}+{res['model']}")
    latest.write_text(json.dumps(merged, indent=1))
    print(f"\n{'size':<18}{'batch':>6}{'pattern':>8}{'sparsity':>9}{'prec':>6}{'dense ms':>10}{'ms':>10}"
          f"{'speedup':>9}")
    for r in res["rows"]:
        print(f"{r['width']}x{r['height']}x{r['frames']:<8}{r['batch']:>6}{r['pattern']:>8}{r['sparsity']:>9}"
              f"{r['precision']:>6}{r['dense_ms']:>10.1f}{r['ms']:>10.1f}{r['speedup']:>9.2f}")
    print(f"[e2e] wrote {path}")
    return res


if __name__ == "__main__":
    main()
