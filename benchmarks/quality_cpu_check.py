"""Small CPU quality check of centroid compensation (issue 12) on the trained testbed Wan.

Same protocol as ``bench_quality.py`` (its loading, noise, sampler call, codec decode, PSNR / SSIM are
reused), but few pairs and steps and one sparsity / start_percent, so it runs on a CPU:

  dense                     the unpatched model
  sparse_topk               Apply SALAD's patch without weights, compensation "none"
  sparse_topk_centroid      the same with compensation "centroid"
  salad_calibrated          with SALAD weights (``--weights``), compensation "none"
  salad_calibrated_centroid with SALAD weights and compensation "centroid"

  python benchmarks/quality_cpu_check.py --pairs 4 --steps 10 --backend torch --sparsity 0.9 --start 0 \
      --methods dense,sparse_topk,sparse_topk_centroid --out benchmarks/results/<file>.json

The dense latents are cached (``--cache``) so that methods can be run in separate invocations; rows of
an existing ``--out`` file with other methods are kept (same settings required).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_quality as bq  # noqa: E402  (also puts tests/ on sys.path)

METHODS = ("dense", "sparse_topk", "sparse_topk_centroid", "salad_calibrated", "salad_calibrated_centroid")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="dense,sparse_topk,sparse_topk_centroid")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--start", type=float, default=0.0, help="start_percent")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--weights", default=str(bq.ROOT / "testbed" / "models" / "salad_testbed_wan21_topk90.safetensors"))
    ap.add_argument("--latent", default="16,16,32,32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache", default="/tmp/quality_cpu_check_dense.pt")
    ap.add_argument("--out", default=str(bq.ROOT / "benchmarks" / "results"
                                         / "2026-11-28-quality-cpu-compensation.json"))
    return ap.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    bq.import_comfy(smoke=False)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd

    from _pack import register
    register()
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.nodes.patch import PatchOptions, apply_salad
    from salad_pack.testbed import codec as tb_codec

    dev = mm.get_torch_device()
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    model = comfy.sd.load_diffusion_model(str(bq.MODEL_PATH))
    C, T, H, W = (int(x) for x in a.latent.split(","))
    n = a.pairs
    _, seeds, ctx, neg, empty, noise = bq.pair_inputs(n, (C, T, H, W))
    codec = tb_codec.load_codec(device=dev)
    settings = dict(pairs=n, steps=a.steps, cfg=a.cfg, sampler="euler", scheduler="simple", sparsity=a.sparsity,
                    start_percent=a.start, backend=a.backend, latent=[C, T, H, W], bench_seed=bq.BENCH_SEED,
                    model=bq.MODEL_PATH.name)

    def sample(m):
        lat = empty.expand(n, -1, -1, -1, -1).contiguous()
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise, a.steps, a.cfg, "euler", "simple", [[ctx, {}]], [[neg, {}]], lat,
                                      disable_pbar=True, seed=seeds[0])
        return out.float().cpu()

    def decode(raw):
        with torch.inference_mode():
            return codec.decode(raw.to(dev))

    cache = Path(a.cache)
    dense_raw, dense_sec = None, None
    if cache.exists():
        blob = torch.load(cache)
        if blob.get("settings", {}).get("pairs") == n and blob["settings"].get("steps") == a.steps \
                and blob["settings"].get("cfg") == a.cfg:
            dense_raw, dense_sec = blob["raw"], blob["seconds"]
    if dense_raw is None or "dense" in methods:
        t0 = time.perf_counter()
        dense_raw = sample(model)
        dense_sec = time.perf_counter() - t0
        torch.save(dict(raw=dense_raw, seconds=dense_sec, settings=settings), cache)
        print(f"[cpu-check] dense: {dense_sec:.1f}s", flush=True)
    ref = decode(dense_raw)

    out = Path(a.out)
    rows = []
    if out.exists():
        old = json.loads(out.read_text())
        if {k: old.get("settings", {}).get(k) for k in settings} == settings:
            rows = [r for r in old.get("rows", []) if r["method"] not in methods]
    if "dense" in methods:
        rows.append(dict(method="dense", psnr=None, ssim=None, seconds=round(dense_sec, 1)))
    def write():
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(key=lambda r: order[r["method"]])
        res = dict(card=card, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), settings=settings, rows=rows,
                   torch=torch.__version__,
                   notes=("PSNR/SSIM of the decoded videos vs the dense video of the same pair and noise (mean "
                          "over pairs), bench_quality.py's metrics; few pairs and steps: a CPU check, not the "
                          "H200 table; seconds are wall time on a CPU shared with other jobs"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"[cpu-check] wrote {out}", flush=True)
        return res

    weights = None
    for method in methods:
        if method == "dense":
            continue
        comp = "centroid" if method.endswith("_centroid") else "none"
        opts = PatchOptions(sparsity=a.sparsity, pattern="topk", start_percent=a.start, backend=a.backend,
                            compensation=comp)
        if method.startswith("salad_calibrated"):
            if weights is None:
                weights = bq.load_weight_files(a.weights)[0][0]
            m = apply_salad(model, opts, SALADWeightsLoader.wrap(weights))
        else:
            m = apply_salad(model, opts)
        t0 = time.perf_counter()
        raw = sample(m)
        sec = time.perf_counter() - t0
        vid = decode(raw)
        psnr = bq.psnr_per_video(vid, ref).tolist()
        ssim = bq.ssim_per_video(vid, ref).tolist()
        (pm, ps), (sm, ss) = bq._stats(psnr), bq._stats(ssim)
        row = dict(method=method, compensation=comp, psnr=pm, psnr_std=ps, ssim=sm, ssim_std=ss,
                   psnr_per_pair=[round(p, 3) for p in psnr], seconds=round(sec, 1))
        if method.startswith("salad_calibrated"):
            row["weights"] = Path(a.weights).name
        rows.append(row)
        print(f"[cpu-check] {method:<26} PSNR {pm:.3f} dB  SSIM {sm:.4f}  {sec:.1f}s", flush=True)
        del m
        write()      # after every method, so a stopped run keeps what it measured
    return write()


if __name__ == "__main__":
    main()
