"""SALAD fine-tuning on the GPU (issue 10, item 6).  NOT RUN YET: written on a CPU-only session.

Two parts (``--part speed``, ``--part testbed`` or ``--part all``):

speed    Time per training step and peak GPU memory at Wan2.1-1.3B, 480p x 81 frames (latent 16x21x60x104,
         32,760 tokens), random weights (tests/make_fixtures.random_state_dict, bf16), batch 1, through the
         same path as ``salad_core.finetune`` (frozen model, trainable proj/gate, flow-matching loss, AdamW,
         bf16 autocast): SALAD at 90% (top-k and window) vs dense attention (the same loop with SALAD not
         installed and nothing but the model's own attention; a trainable dummy keeps the optimiser).
         ``--warmup`` untimed steps, then ``--iters`` timed steps (cuda events), torch.cuda.max_memory_allocated.

testbed  Fine-tune SALAD on the testbed model (testbed/models/salad_testbed_wan21.safetensors) on procedural
         clips (testbed.data -> testbed.codec.encode -> raw latents, testbed.text captions), written as a pair
         folder, with ``scripts/salad_finetune.py``'s CLI path (nodes/finetune.py cli_provider); twice: from fresh
         weights (``salad_finetuned``) and from the calibrated file testbed/models/salad_testbed_wan21_topk90
         (``salad_calib_finetuned``).  Outputs ``$OUT/salad_finetuned_topk90.safetensors`` etc. for
         ``benchmarks/bench_quality.py --weights`` (PSNR vs dense of sparse-only / calibrated / fine-tuned /
         calibrate-then-fine-tune at 90%).

Commands (GPU machine, ComfyUI from COMFYUI_DIR as for bench_e2e.py):
  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/bench_finetune.py --part speed --out $OUT
  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/bench_finetune.py --part testbed --out $OUT \\
      --pairs 512 --steps 1600 --batch 8
  2 GPUs (scaling, if nvidia-h100-x2 is lent): torchrun --nproc-per-node 2 scripts/salad_finetune.py \\
      --model testbed/models/salad_testbed_wan21.safetensors --data $OUT/pairs --out $OUT/ddp.safetensors \\
      --steps 200 --batch 8 --sparsity 0.9 --pattern topk   (compare its s/step with --nproc-per-node 1)
CPU smoke (tiny shapes, no timing value):  python benchmarks/bench_finetune.py --smoke --out /tmp/bf
Results: $OUT/finetune-<part>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
from _pack import register  # noqa: E402

register()
import torch  # noqa: E402

from salad_pack.salad_core.finetune import FinetuneConfig, flow_example, save_pair  # noqa: E402
from salad_pack.salad_core.weights import SaladWeights  # noqa: E402

WAN13 = dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16)
TINY = dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16)


def _comfy(cpu: bool):
    from comfy_harness import find_comfyui
    d = os.environ.get("COMFYUI_DIR") or str(find_comfyui())
    sys.path.insert(0, d)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True
    return d


def _nodes_finetune():
    from salad_finetune import _load_provider
    _load_provider("nodes.finetune:cli_provider")          # registers salad_pack.nodes without its __init__
    import importlib
    return importlib.import_module("salad_pack.nodes.finetune")


def speed(a, device) -> dict:
    d = _comfy(device.type == "cpu")
    import comfy.ldm.wan.model as wan
    import comfy.ops
    from make_fixtures import random_state_dict
    nf = _nodes_finetune()
    cfg_m, lat = (TINY, (16, 2, 16, 16)) if a.smoke else (WAN13, (16, 21, 60, 104))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dm = wan.WanModel(**cfg_m, text_dim=4096, operations=comfy.ops.disable_weight_init, device="cpu", dtype=dtype)
    dm.load_state_dict({k: v.to(dtype) for k, v in random_state_dict(d, cfg_m, seed=0, device=device).items()},
                       strict=False)
    dm.to(device).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(lat, generator=g).to(device)
    ctx = (torch.randn(512, 4096, generator=g) * 0.1).to(device)
    rows = []
    for mode in (["dense", "salad_topk", "salad_window"] if not a.only else a.only.split(",")):
        sparsity, pattern = a.sparsity, mode.split("_")[-1]
        fcfg = FinetuneConfig(steps=a.warmup + a.iters, batch=1, sparsity=sparsity,
                              pattern=pattern if pattern in ("topk", "window") else "topk")
        w = SaladWeights.new(cfg_m["dim"], cfg_m["num_heads"], cfg_m["num_layers"]).to(device)
        w.requires_grad_(True)
        opt = torch.optim.AdamW(w.parameters(), lr=1e-4)
        hooks = (nf.salad_wan_hooks(dm, w, sparsity, fcfg.pattern, "auto") if mode != "dense"
                 else _null())
        times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with hooks as st:
            fwd = nf.wan_forward(dm, st if mode != "dense" else None)
            for i in range(a.warmup + a.iters):
                x, sigma, c, target = flow_example(z0, ctx, fcfg, i)
                if mode == "dense":   # backward through the whole frozen model, as SALAD training does
                    x = x.clone().requires_grad_(True)
                if device.type == "cuda":
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    pred = fwd(x[None], (sigma * 1000.0).reshape(1), c[None])
                loss = ((pred.float() - target[None]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(w.parameters()), 1.0)
                opt.step()
                if device.type == "cuda":
                    e1.record()
                    torch.cuda.synchronize()
                    ms = e0.elapsed_time(e1)
                else:
                    ms = (time.perf_counter() - t0) * 1e3
                if i >= a.warmup:
                    times.append(ms)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        med = sorted(times)[len(times) // 2]
        rows.append(dict(mode=mode, sparsity=sparsity if mode != "dense" else 0.0, step_ms_median=round(med, 1),
                         step_ms_all=[round(t, 1) for t in times], peak_gib=None if peak is None else round(peak, 2)))
        print(f"[bench_finetune] {mode}: {med:.1f} ms/step, peak {peak} GiB", flush=True)
    dense = next((r for r in rows if r["mode"] == "dense"), None)
    for r in rows:
        if dense:
            r["speedup_vs_dense"] = round(dense["step_ms_median"] / r["step_ms_median"], 3)
    return dict(part="speed", latent=list(lat), model=cfg_m, device=_device_name(device), rows=rows,
                note="dense = the model's own attention, backward through the whole frozen model to the input "
                     "latent (nothing trainable); SALAD = the same plus trainable proj/gate in every block, AdamW")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *e):
        return False


def _device_name(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def make_pairs(folder: Path, n: int, latent_frames: int, latent_size: int, seed: int, device) -> Path:
    """n procedural testbed clips -> raw latents + caption contexts as SALAD training pairs."""
    from salad_pack.testbed import codec as codec_mod, data, text
    codec = codec_mod.load_codec(device=device)
    folder.mkdir(parents=True, exist_ok=True)
    frames, size = latent_frames * codec.ft, latent_size * codec.fs
    done = len(list(folder.glob("*.safetensors")))
    for s in range(done, n, 8):
        specs = data.sample_specs(seed=seed * 1_000_003 + s, n=min(8, n - s))
        raw = codec.encode(data.render(specs, frames, size, device=device))
        ctx = text.caption_context([sp.caption for sp in specs])
        for j, sp in enumerate(specs):
            save_pair(folder / f"tb_{s + j:06d}.safetensors", raw[j].cpu(), ctx[j], caption=sp.caption,
                      source="testbed procedural")
    return folder


def testbed(a, device) -> dict:
    d = _comfy(device.type == "cpu")
    import salad_finetune as ft
    out = Path(a.out)
    lf, ls = (2, 4) if a.smoke else (16, 32)
    pairs = make_pairs(out / "pairs", a.pairs, lf, ls, seed=a.seed + 7, device=device)
    model = ROOT / "testbed" / "models" / "salad_testbed_wan21.safetensors"
    calib = ROOT / "testbed" / "models" / "salad_testbed_wan21_topk90.safetensors"
    res = {}
    for name, init in (("salad_finetuned", None), ("salad_calib_finetuned", calib)):
        dst = out / f"{name}_topk90.safetensors"
        argv = ["--model", str(model), "--data", str(pairs), "--out", str(dst), "--steps", str(a.steps),
                "--batch", str(a.batch), "--lr", str(a.lr), "--sparsity", "0.9", "--pattern", "topk",
                "--shift", "8", "--comfyui", d, "--device", str(device), "--resume", "--log-every", "25"]
        if init is not None:
            argv += ["--init-weights", str(init)]
        t0 = time.monotonic()
        rc = ft.main(argv)
        res[name] = dict(rc=rc, file=str(dst), seconds=round(time.monotonic() - t0, 1))
    res["next"] = (f"python benchmarks/bench_quality.py --weights {out}/salad_finetuned_topk90.safetensors,"
                   f"{out}/salad_calib_finetuned_topk90.safetensors ...")
    return dict(part="testbed", device=_device_name(device), pairs=a.pairs, steps=a.steps, batch=a.batch, runs=res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["speed", "testbed", "all"], default="all")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--only", default=None, help="comma list of dense,salad_topk,salad_window")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.smoke:
        a.warmup, a.iters, a.pairs, a.steps, a.batch = 1, 2, 4, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in (["speed", "testbed"] if a.part == "all" else [a.part]):
        r = (speed if part == "speed" else testbed)(a, device)
        r["date"] = time.strftime("%Y-%m-%d")
        (out / f"finetune-{part}.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r)[:2000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
