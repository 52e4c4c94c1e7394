"""The second model family on the GPU: one LTX-Video forward, dense vs SALAD 90%, at a real size.

ComfyUI's own LTXV model class (comfy.supported_models.LTXV -> model_base.LTXV -> LTXVModel) with
random bf16 weights of the real shapes (default LTXV 13B: 48 blocks, 32 heads x 128; ``--model
ltxv_2b``: 28 blocks, 32 x 64), wrapped in a ComfyUI ModelPatcher and patched by the node's own
code (nodes/patch.py apply_salad through the LTX-Video adapter, nodes/families/ltxv.py), loaded with
comfy.model_management.load_models_gpu and called as the sampler calls it (model.apply_model with
the clone's wrappers).  Random gate + Proj on every block (``--no-weights``: sparse-only).

Per video size: dense ms, SALAD ms at each sparsity, speed-up, the relative difference of the output
from dense, and a check that sparsity 0 without weights equals dense.  Times are medians of
``--reps`` forwards after one warm-up, CUDA-synchronised.

GPU:  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/bench_family.py --out results.json
CPU:  python benchmarks/bench_family.py --tiny --out /tmp/family.json   (tiny model, checks it runs)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and video on the CPU (torch backend)")
    ap.add_argument("--model", default="ltxv_13b", help="tests/make_fixtures.py LTXV_FULL_SIZE key")
    ap.add_argument("--sizes", default="768x512x121,1216x704x257",
                    help="pixel WxHxFRAMES list; latent = frames/8+1 x H/32 x W/32 (LTX-Video VAE)")
    ap.add_argument("--sparsities", default="0.9")
    ap.add_argument("--pattern", default="topk")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--no-weights", action="store_true", help="sparse-only (no gate/Proj)")
    ap.add_argument("--out", default=None, help="JSON file to write (default benchmarks/results/...)")
    return ap.parse_args(argv)


def _comfy(cpu: bool):
    from comfy_harness import find_comfyui
    comfy_dir = str(find_comfyui())
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    return comfy


def build_model(comfy, cfg: dict, device, dtype, seed: int = 0):
    """ComfyUI's LTXV BaseModel (its LTXVModel inside) on ``device`` with seeded random weights, in a
    ModelPatcher.  Weights are drawn in place (no state dict of the full model is ever held)."""
    import torch
    mc = comfy.supported_models.LTXV({"image_model": "ltxv", **cfg})
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g, device=device) / max(fan_in, 1) ** 0.5)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def random_weights(comfy, info: dict, device, seed: int = 1):
    """Random SALAD gate + Proj for every block of the family (model_family from the adapter)."""
    import torch
    from salad_pack.salad_core.weights import SaladWeights
    sw = SaladWeights.new(dim=info["dim"], heads=info["heads"], num_blocks=info["num_blocks"],
                          model_family=info["family"], base_model=info["base_model"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sw.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return comfy.model_patcher.ModelPatcher(sw, load_device=device, offload_device=device)


def main(argv=None):
    a = parse(argv)
    import torch
    cpu = a.tiny or not torch.cuda.is_available()
    comfy = _comfy(cpu)
    from _pack import register
    register()
    from make_fixtures import LTXV_FULL_SIZE, LTXV_VARIANTS
    from salad_pack.nodes.patch import PatchOptions, apply_salad, model_info, model_family

    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    if a.tiny:
        cfg, a.sizes, a.reps = LTXV_VARIANTS["ltxv_tiny"], "512x512x17", 1
        a.text_tokens = min(a.text_tokens, 16)
    else:
        cfg = LTXV_FULL_SIZE[a.model]
    backend = "torch" if cpu else "auto"
    t0 = time.perf_counter()
    base = build_model(comfy, cfg, dev, dtype)
    info = model_info(base, "bench_family")
    family = model_family(base, "bench_family")
    weights = None if a.no_weights else random_weights(comfy, info, dev)
    print(f"[family] {info['family']} {info['base_model']} built in {time.perf_counter() - t0:.1f} s", flush=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def call(m, x, ctx, mask, sigma):
        comfy.model_management.load_models_gpu([m])
        with torch.inference_mode():
            return m.model.apply_model(x, sigma, c_crossattn=ctx, attention_mask=mask,
                                       transformer_options={"wrappers": m.wrappers, "sigmas": sigma})

    def timeit(fn):
        fn()
        sync()
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def salad_calls(m):
        import comfy.patcher_extension as pe
        st = [c.__self__ for c in m.get_all_callbacks(pe.CallbacksMP.ON_CLEANUP)
              if type(getattr(c, "__self__", None)).__name__ == "SaladPatch"][-1]
        n, summary = sum(st.stats.sparse_calls.values()), st.stats.summary()
        st.on_cleanup()
        return n, summary

    res = {"card": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "family": info, "model_config": cfg, "dtype": str(dtype), "pattern": a.pattern, "reps": a.reps,
           "weights": "none (sparse-only)" if weights is None else "random gate+Proj on all blocks", "sizes": []}
    g = torch.Generator(device=dev).manual_seed(0)
    for size in a.sizes.split(","):
        w, h, frames = (int(v) for v in size.lower().split("x"))
        lat = ((frames - 1) // 8 + 1, h // 32, w // 32)
        grid = family.latent_grid(*lat)
        L = grid[0] * grid[1] * grid[2]
        x = torch.randn(1, 128, *lat, generator=g, device=dev, dtype=dtype)
        ctx = torch.randn(1, a.text_tokens, 4096, generator=g, device=dev, dtype=dtype)
        mask = torch.ones(1, a.text_tokens, dtype=torch.long, device=dev)
        sigma = torch.full((1,), 0.7, device=dev)
        row = {"pixels": [w, h, frames], "latent": list(lat), "tokens": L, "runs": []}
        ref = call(base, x, ctx, mask, sigma).float()
        row["dense_ms"] = timeit(lambda: call(base, x, ctx, mask, sigma))
        print(f"[family] {size}: {L} tokens, dense {row['dense_ms']:.1f} ms", flush=True)
        m0 = apply_salad(base, PatchOptions(sparsity=0.0, pattern=a.pattern, backend=backend))
        out0 = call(m0, x, ctx, mask, sigma).float()
        row["check_sparsity0_rel_err"] = float((out0 - ref).norm() / ref.norm())
        row["check_sparsity0_salad_calls"], _ = salad_calls(m0)
        for s in (float(v) for v in a.sparsities.split(",")):
            m = apply_salad(base, PatchOptions(sparsity=s, pattern=a.pattern, backend=backend), weights)
            out = call(m, x, ctx, mask, sigma).float()
            n, summary = salad_calls(m)
            ms = timeit(lambda: call(m, x, ctx, mask, sigma))
            salad_calls(m)
            run = dict(sparsity=s, ms=ms, speedup=row["dense_ms"] / ms, salad_calls_one_forward=n,
                       rel_diff_vs_dense=float((out - ref).norm() / ref.norm()), stats=summary)
            row["runs"].append(run)
            print(f"[family] {size}: SALAD {a.pattern} {s:.2f}: {ms:.1f} ms -> {run['speedup']:.2f}x "
                  f"({n} SALAD calls, rel diff {run['rel_diff_vs_dense']:.3f})", flush=True)
            assert n == info["num_blocks"], summary
        assert row["check_sparsity0_salad_calls"] == info["num_blocks"]
        res["sizes"].append(row)

    out = Path(a.out) if a.out else (ROOT / "benchmarks" / "results" /
                                      f"{dt.date.today().isoformat()}-family-{info['family']}-"
                                      f"{'tiny' if a.tiny else res['card'].replace(' ', '_').lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"[family] wrote {out}")
    return res


if __name__ == "__main__":
    main()
