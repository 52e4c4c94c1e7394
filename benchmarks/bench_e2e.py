"""End-to-end Wan2.1-1.3B forward: dense vs SALAD, with ComfyUI's own Wan model code.

Full size: dim 1536, 30 blocks, 12 heads, 480p x 81 frames -> latent (1,16,21,60,104) -> 32,760 tokens,
text context (1,512,4096), random bf16 weights.  SALAD is installed with the same object patches the
ComfyUI node uses (nodes/patch.py SaladPatch), with gate + Proj weights on every block (random, so
the linear branch really runs).  Times one forward (one CFG branch) with triton.testing.do_bench medians.

GPU:  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/bench_e2e.py --out DIR
CPU:  python benchmarks/bench_e2e.py --smoke     (tiny model and video, torch backend; checks it runs)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--patterns", default="topk")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--rep-ms", type=int, default=3000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-weights", action="store_true", help="sparse-only (no gate/Proj)")
    return ap.parse_args()


def main():
    a = parse()
    from comfy_harness import find_comfyui
    comfy_dir = str(find_comfyui())
    sys.path.insert(0, comfy_dir)
    import torch
    if a.smoke or not torch.cuda.is_available():
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    import comfy.ops
    import comfy.ldm.wan.model as wan

    from _pack import register
    register()
    # nodes.patch is the ComfyUI-side patch logic; importing the package pulls in folder_paths etc.
    from salad_pack.nodes.patch import PatchOptions, SaladPatch
    from salad_pack.salad_core.weights import SaladWeights

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.smoke:
        cfg = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2)
        a.frames, a.height, a.width, a.rep_ms = 9, 64, 64, 200
    else:
        cfg = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
    torch.manual_seed(0)
    model = wan.WanModel(model_type="t2v", in_dim=16, out_dim=16, text_dim=4096, device=dev, dtype=dtype,
                         operations=comfy.ops.disable_weight_init, **cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.eval()
    T = (a.frames - 1) // 4 + 1
    x = torch.randn(1, 16, T, a.height // 8, a.width // 8, device=dev, dtype=dtype)
    t = torch.full((1,), 500.0, device=dev)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=dtype)
    grid = (T, a.height // 16, a.width // 16)
    L = grid[0] * grid[1] * grid[2]

    def forward():
        with torch.inference_mode():
            return model(x, t, ctx, transformer_options={})

    originals = {"patch_embedding": model.patch_embedding.forward,
                 "blocks": [b.self_attn.forward for b in model.blocks]}

    def install(sparsity, pattern, weights):
        opts = PatchOptions(sparsity=sparsity, pattern=pattern, backend="auto")
        state = SaladPatch(model, opts, weights)
        model.patch_embedding.forward = state.make_patch_embedding_forward(originals["patch_embedding"])
        for i, b in enumerate(model.blocks):
            b.self_attn.forward = state.make_self_attn_forward(i, originals["blocks"][i])
        return state

    def uninstall():
        model.patch_embedding.forward = originals["patch_embedding"]
        for i, b in enumerate(model.blocks):
            b.self_attn.forward = originals["blocks"][i]

    class _Holder:  # what the node passes: a ModelPatcher-like object whose .model is SaladWeights
        def __init__(self, m):
            self.model = m

    weights = None
    if not a.no_weights:
        sw = SaladWeights.new(dim=cfg["dim"], heads=cfg["num_heads"], num_blocks=cfg["num_layers"],
                              base_model="bench-random")
        with torch.no_grad():
            for p in sw.parameters():
                p.normal_(0.0, 0.01)
        weights = _Holder(sw.to(device=dev, dtype=dtype))

    if dev.type == "cuda":
        from triton.testing import do_bench

        def timeit(fn):
            return do_bench(fn, warmup=max(a.rep_ms // 6, 200), rep=a.rep_ms, return_mode="median")
    else:
        def timeit(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1000

    def peak(fn):
        if dev.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    res = {"card": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "model": cfg, "latent": list(x.shape), "tokens": L, "grid": grid,
           "weights": "random gate+Proj on all blocks" if weights else "none (sparse-only)", "runs": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except Exception:
        pass

    uninstall()
    ref = forward().float()
    dense_ms = timeit(forward)
    res["dense_ms"] = dense_ms
    res["dense_peak_gib"] = peak(forward)
    print(f"[e2e] {res['card']}: dense forward {dense_ms:.1f} ms, L={L}", flush=True)

    # correctness: sparsity 0 without Proj must equal dense (same model, same inputs)
    state = install(0.0, "topk", None)
    out0 = forward().float()
    res["check_sparsity0_rel_err"] = float((out0 - ref).norm() / ref.norm())
    assert sum(state.stats.sparse_calls.values()) == cfg["num_layers"], state.stats.summary()
    print(f"[e2e] sparsity 0 vs dense: rel err {res['check_sparsity0_rel_err']:.2e}", flush=True)

    for pattern in a.patterns.split(","):
        for s in [float(v) for v in a.sparsities.split(",")]:
            state = install(s, pattern, weights)
            out = forward().float()
            ms = timeit(forward)
            run = dict(pattern=pattern, sparsity=s, ms=ms, speedup=dense_ms / ms, peak_gib=peak(forward),
                       rel_diff_vs_dense=float((out - ref).norm() / ref.norm()),
                       salad_calls=int(sum(state.stats.sparse_calls.values())))
            res["runs"].append(run)
            print(f"[e2e] SALAD {pattern} {s:.2f}: {ms:.1f} ms -> {dense_ms / ms:.2f}x  peak {run['peak_gib']} GiB",
                  flush=True)
    uninstall()

    # one self-attention call at the layer shape: SDPA vs SALAD (selection + sparse + linear + Proj/gate +
    # tile permutations), to see where the end-to-end time goes
    from salad_pack.salad_core.attention import SaladConfig, salad_self_attention
    import torch.nn.functional as F
    H, D = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(1, L, H * D, device=dev, dtype=dtype, generator=g) for _ in range(3))
    xb = torch.randn(1, L, cfg["dim"], device=dev, dtype=dtype, generator=g)

    def sdpa():
        qh, kh, vh = (t.view(1, L, H, D).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(1, L, H * D)

    layer = {"sdpa_ms": timeit(sdpa)}
    sw0 = weights.model if weights else None
    for s in [float(v_) for v_ in a.sparsities.split(",")]:
        for pattern in a.patterns.split(","):
            conf = SaladConfig(sparsity=s, pattern=pattern)
            with torch.inference_mode():
                t_sparse = timeit(lambda: salad_self_attention(q, k, v, H, grid=grid, config=conf))
                t_full = timeit(lambda: salad_self_attention(q, k, v, H, grid=grid, x=xb, config=conf,
                                                             proj=sw0.proj_for(0) if sw0 else None,
                                                             gate=sw0.gate_for(0) if sw0 else None))
            layer[f"{pattern}_{s}"] = {"sparse_only_ms": t_sparse, "salad_ms": t_full,
                                       "speedup_vs_sdpa": layer["sdpa_ms"] / t_full}
    res["layer"] = layer
    print(f"[e2e] one self-attention call: {json.dumps(layer)}", flush=True)

    out_dir = Path(a.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if a.smoke else res["card"].replace(" ", "-")
    path = out_dir / f"e2e-{dt.date.today().isoformat()}-{tag}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"\n{'config':<22}{'ms':>10}{'speedup':>10}{'peak GiB':>10}")
    print(f"{'dense (SDPA)':<22}{dense_ms:>10.1f}{1.0:>10.2f}{str(res['dense_peak_gib']):>10}")
    for r in res["runs"]:
        print(f"{'SALAD ' + r['pattern'] + ' ' + str(r['sparsity']):<22}{r['ms']:>10.1f}{r['speedup']:>10.2f}"
              f"{str(r['peak_gib']):>10}")
    print(f"[e2e] wrote {path}")


if __name__ == "__main__":
    main()
