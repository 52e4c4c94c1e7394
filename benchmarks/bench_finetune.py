"""SALAD fine-tuning on the GPU (issue 10, item 6).  Written on a CPU-only session; the CPU smoke runs in
the tests (tests/test_finetune.py) and through ``SMOKE=1 bash benchmarks/gpu_finetune_quality.sh``.

Parts (``--part speed``, ``--part testbed`` or ``--part all``):

speed    Time per training step and peak GPU memory at Wan2.1-1.3B, 480p x 81 frames (latent 16x21x60x104,
         32,760 tokens), random weights (tests/make_fixtures.random_state_dict, bf16), batch 1, the recipe's
         step (frozen model, flow-matching loss, bf16 autocast, AdamW on proj/gate, grad clipping) with
         ``--modes`` out of
           salad_topk / salad_window   SALAD at ``--sparsity`` in every block (nodes/finetune.py's wiring,
                                       our Triton forward + backward), trainable proj/gate (fresh: proj = 0)
           dense                       the model's own attention; nothing is trainable in the base, so the
                                       backward runs to the input latent (the same walk through every block)
         each with ``+ckpt``: gradient checkpointing per block (salad_core.finetune.checkpointed).
         ``--warmup`` untimed steps, then ``--iters`` timed ones (CUDA events), torch.cuda.max_memory_allocated;
         a mode that runs out of memory gives a row with ``oom``.  The JSON is rewritten after every mode.

testbed  Fine-tune on the testbed model (testbed/models/salad_testbed_wan21.safetensors): ``--pairs``
         procedural clips (testbed.data seeds 7_000_021+, disjoint from the testbed's training seeds and from
         bench_quality's) encoded with testbed.codec into ComfyUI ``.latent`` files + ``.txt`` captions (the
         CLI's ``--captions testbed`` encodes them), in ``--pairs-dir`` (default: a temporary folder);
         then ``scripts/salad_finetune.py`` (in this process) twice, SALAD top-k 90%, batch ``--batch``, lr
         ``--lr``, shift 8, caption dropout 0.1 (as the testbed was trained), no gradient checkpointing
         (a 4,096-token model does not need it):
           salad_finetuned        from fresh weights
           salad_calib_finetuned  from testbed/models/salad_testbed_wan21_topk90.safetensors (blocks 0-4
                                  calibrated; block 5, which calibration left sparse-only, starts fresh)
         With ``--deadline S`` the step count is chosen to fit: a probe of ``--probe-steps`` steps measures
         s/step (after the first 3, which compile the kernels), then both runs get
         min(--steps, (S - time used - margin) / 2 / (s/step)) steps.  Outputs
         ``<out>/salad_finetuned_topk90.safetensors`` and ``<out>/salad_calib_finetuned_topk90.safetensors``
         (checkpoints go to the pairs folder, not to ``--out``) and their loss curves in the JSON.

Commands (GPU machine, ComfyUI from COMFYUI_DIR as for bench_quality.py):
  python benchmarks/bench_finetune.py --part speed --out $OUT
  python benchmarks/bench_finetune.py --part testbed --out $OUT --deadline 170
  the whole GPU proof in one call, with bench_quality on the results: benchmarks/gpu_finetune_quality.sh
CPU smoke (tiny shapes, no timing value):  python benchmarks/bench_finetune.py --smoke --out /tmp/bf
Results: <out>/finetune-<part>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
from _pack import register  # noqa: E402

register()
import torch  # noqa: E402

from salad_pack.salad_core.finetune import (FinetuneConfig, PairFolder, checkpointed, finetune,  # noqa: E402
                                            flow_example, load_checkpoint, make_weights)
from salad_pack.salad_core.weights import SaladWeights  # noqa: E402

WAN13 = dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16)
TINY = dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16)
MODEL = ROOT / "testbed" / "models" / "salad_testbed_wan21.safetensors"
CALIB = ROOT / "testbed" / "models" / "salad_testbed_wan21_topk90.safetensors"
PAIR_SEED = 7                      # clip seeds 7 * 1_000_003 + i (testbed training: 1_000_003 + step)


def say(msg: str) -> None:
    print(f"[bench_finetune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _comfy(cpu: bool):
    from comfy_harness import find_comfyui
    d = os.environ.get("COMFYUI_DIR") or str(find_comfyui())
    if d not in sys.path:
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


def _write(out: Path, part: str, result: dict) -> None:
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    tmp = out / f".finetune-{part}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / f"finetune-{part}.json")


def _device_name(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


class _DenseCheckpointing:
    """Gradient checkpointing on every block without SALAD (the dense rows' ``+ckpt``)."""

    def __init__(self, dm, on: bool):
        self.dm, self.on = dm, on

    def __enter__(self):
        if self.on:
            for blk in self.dm.blocks:
                blk.forward = checkpointed(blk.forward)
        return None

    def __exit__(self, *exc):
        for blk in self.dm.blocks:
            blk.__dict__.pop("forward", None)
        return False


# ----------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------

def _speed_row(a, device, dm, nf, cfg_m, z0, ctx, mode: str) -> dict:
    attn, ckpt = mode.split("+")[0], mode.endswith("+ckpt")
    pattern = attn.split("_")[-1] if attn != "dense" else "topk"
    fcfg = FinetuneConfig(steps=a.warmup + a.iters, batch=1, sparsity=a.sparsity, pattern=pattern)
    w = SaladWeights.new(cfg_m["dim"], cfg_m["num_heads"], cfg_m["num_layers"]).to(device)
    w.requires_grad_(True)
    opt = torch.optim.AdamW(w.parameters(), lr=1e-4)
    hooks = (nf.salad_wan_hooks(dm, w, a.sparsity, pattern, "auto", grad_checkpointing=ckpt) if attn != "dense"
             else _DenseCheckpointing(dm, ckpt))
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    with hooks as st:
        fwd = nf.wan_forward(dm, st if attn != "dense" else None)
        for i in range(a.warmup + a.iters):
            x, sigma, c, target = flow_example(z0, ctx, fcfg, i)
            if attn == "dense":   # backward through the whole frozen model, as SALAD training does
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
            del pred, loss, x
            if device.type == "cuda":
                e1.record()
                torch.cuda.synchronize()
                ms = e0.elapsed_time(e1)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            if i >= a.warmup:
                times.append(ms)
            say(f"  {mode} step {i + 1}/{a.warmup + a.iters}: {ms:.0f} ms")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    med = sorted(times)[len(times) // 2]
    return dict(mode=mode, attention=attn, grad_checkpointing=ckpt, sparsity=a.sparsity if attn != "dense" else 0.0,
                pattern=pattern if attn != "dense" else None, step_ms_median=round(med, 1),
                step_ms_all=[round(t, 1) for t in times], peak_gib=None if peak is None else round(peak, 2),
                model_gib=None if base_mem is None else round(base_mem, 2))


def speed(a, device) -> dict:
    d = _comfy(device.type == "cpu")
    import comfy.ldm.wan.model as wan
    import comfy.ops
    from make_fixtures import random_state_dict
    nf = _nodes_finetune()
    cfg_m, lat = (TINY, (16, 2, 16, 16)) if a.smoke else (WAN13, (16, 21, 60, 104))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.monotonic()
    dm = wan.WanModel(**cfg_m, text_dim=4096, operations=comfy.ops.disable_weight_init, device="cpu", dtype=dtype)
    dm.load_state_dict({k: v.to(dtype) for k, v in random_state_dict(d, cfg_m, seed=0, device=device).items()},
                       strict=False)
    dm.to(device).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(lat, generator=g).to(device)
    ctx = (torch.randn(512, 4096, generator=g) * 0.1).to(device)
    tokens = lat[1] * (lat[2] // 2) * (lat[3] // 2)
    res = dict(part="speed", latent=list(lat), tokens=tokens, model=cfg_m, model_dtype=str(dtype),
               device=_device_name(device), torch=torch.__version__, warmup=a.warmup, iters=a.iters,
               build_seconds=round(time.monotonic() - t0, 1), rows=[],
               note="one training step = forward + backward + clip + AdamW, batch 1, bf16 autocast. dense = the "
                    "model's own attention, backward to the input latent (nothing trainable); salad = SALAD in "
                    "every block with trainable proj/gate (our Triton kernels). +ckpt = gradient checkpointing "
                    "per block. peak_gib: torch.cuda.max_memory_allocated during the mode, model_gib: before it")
    say(f"speed: model built in {res['build_seconds']} s, latent {lat} ({tokens} tokens), modes {a.modes}")
    for mode in a.modes.split(","):
        t1 = time.monotonic()
        try:
            row = _speed_row(a, device, dm, nf, cfg_m, z0, ctx, mode)
        except torch.OutOfMemoryError as e:
            row = dict(mode=mode, oom=True, error=str(e).splitlines()[0][:300])
            torch.cuda.empty_cache()
        row["seconds"] = round(time.monotonic() - t1, 1)
        res["rows"].append(row)
        dense = {r["grad_checkpointing"]: r for r in res["rows"] if r.get("attention") == "dense"}
        for r in res["rows"]:
            ref = dense.get(r.get("grad_checkpointing"))
            if ref is not None and "step_ms_median" in r:
                r["speedup_vs_dense"] = round(ref["step_ms_median"] / r["step_ms_median"], 3)
        _write(Path(a.out), "speed", res)
        say(f"speed {mode}: " + (f"{row['step_ms_median']:.1f} ms/step, peak {row['peak_gib']} GiB"
                                 if "step_ms_median" in row else f"OOM ({row['error'][:120]})")
            + f" ({row['seconds']} s)")
    return res


# ----------------------------------------------------------------------------------------------
# testbed
# ----------------------------------------------------------------------------------------------

def make_pairs(folder: Path, n: int, latent_frames: int, latent_size: int, device) -> Path:
    """n procedural testbed clips -> ComfyUI ``.latent`` files (raw latents, VAE space) + ``.txt`` captions."""
    from safetensors.torch import save_file

    from salad_pack.testbed import codec as codec_mod
    from salad_pack.testbed import data
    codec = codec_mod.load_codec(device=device)
    folder.mkdir(parents=True, exist_ok=True)
    frames, size = latent_frames * codec.ft, latent_size * codec.fs
    for s in range(0, n, 16):
        todo = [i for i in range(s, min(n, s + 16)) if not (folder / f"tb_{i:06d}.txt").exists()]
        if not todo:
            continue
        specs = [data.sample_specs(seed=PAIR_SEED * 1_000_003 + i, n=1)[0] for i in todo]
        with torch.no_grad():
            raw = codec.encode(data.render(specs, frames, size, device=device)).float().cpu()
        for j, (i, sp) in enumerate(zip(todo, specs)):
            save_file({"latent_tensor": raw[j:j + 1].contiguous()}, str(folder / f"tb_{i:06d}.latent"))
            (folder / f"tb_{i:06d}.txt").write_text(sp.caption, encoding="utf-8")
    return folder


def _run_cfg(a, steps: int) -> FinetuneConfig:
    return FinetuneConfig(steps=steps, batch=a.batch, lr=a.lr, sparsity=0.9, pattern="topk", shift=8.0,
                          cfg_dropout=0.1, seed=a.seed, grad_checkpointing=False, backend=a.backend,
                          ckpt_every=0, log_every=25)


def probe_rate(a, device, comfy_dir: str, pairs: PairFolder) -> dict:
    """s/step of the real recipe on the testbed (fresh weights, SALAD top-k 90%): ``--probe-steps`` steps."""
    import salad_finetune as ft
    handle = ft._load_provider(ft.DEFAULT_PROVIDER)(model=str(MODEL), device=device, comfyui=comfy_dir)
    cfg = _run_cfg(a, a.probe_steps)
    w = make_weights(handle["info"], cfg).to(device)
    stamps = []
    t0 = time.monotonic()
    finetune(handle["wire"](w, cfg), w, pairs, cfg, device=device, latent_transform=handle["latent_transform"],
             callback=lambda d: stamps.append(d["seconds"]))
    skip = min(3, len(stamps) - 2)
    rate = (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)
    return dict(probe_steps=len(stamps), first_steps_seconds=round(stamps[skip], 2), seconds_per_step=round(rate, 4),
                samples_per_second=round(a.batch / rate, 1), probe_seconds=round(time.monotonic() - t0, 1))


def testbed(a, device) -> dict:
    d = _comfy(device.type == "cpu")
    import salad_finetune as ft
    from salad_pack.testbed.text import caption_context
    t_part = time.monotonic()
    out = Path(a.out)
    lf, ls = (4, 16) if a.smoke else (16, 32)
    pairs_dir = Path(a.pairs_dir) if a.pairs_dir else Path(tempfile.mkdtemp(prefix="salad_ft_pairs_"))
    make_pairs(pairs_dir, a.pairs, lf, ls, device=device)
    pairs = PairFolder(pairs_dir, caption_encoder=caption_context)
    res = dict(part="testbed", device=_device_name(device), model=MODEL.name, pairs=len(pairs),
               latent=[16, lf, ls, ls], tokens=lf * (ls // 2) ** 2, batch=a.batch, lr=a.lr, sparsity=0.9,
               pattern="topk", shift=8.0, cfg_dropout=0.1, grad_checkpointing=False, backend=a.backend,
               pairs_seconds=round(time.monotonic() - t_part, 1), runs={})
    say(f"testbed: {len(pairs)} pairs ({res['latent']} latents, {res['tokens']} tokens) in {res['pairs_seconds']} s")
    steps = a.steps
    if a.deadline:
        pr = probe_rate(a, device, d, pairs)
        used = time.monotonic() - t_part
        fit = int((a.deadline - used - a.margin) / 2 / pr["seconds_per_step"])
        steps = max(a.min_steps, min(a.steps, fit))
        res["probe"] = dict(pr, seconds_used_before_runs=round(used, 1), deadline=a.deadline, fit_steps=fit)
        say(f"testbed probe: {pr['seconds_per_step']:.3f} s/step ({pr['samples_per_second']} samples/s, batch "
            f"{a.batch}); {used:.0f} s used of {a.deadline} s -> {steps} steps per run")
    res["steps"] = steps
    _write(out, "testbed", res)
    for name, init in (("salad_finetuned", None), ("salad_calib_finetuned", CALIB)):
        dst = out / f"{name}_topk90.safetensors"
        ckpt = pairs_dir / f"{name}.ckpt"
        cfg = _run_cfg(a, steps)
        argv = ["--model", str(MODEL), "--data", str(pairs_dir), "--out", str(dst), "--ckpt", str(ckpt),
                "--captions", "testbed", "--steps", str(steps), "--batch", str(cfg.batch), "--lr", str(cfg.lr),
                "--sparsity", str(cfg.sparsity), "--pattern", cfg.pattern, "--shift", str(cfg.shift),
                "--cfg-dropout", str(cfg.cfg_dropout), "--seed", str(cfg.seed), "--backend", cfg.backend,
                "--comfyui", d, "--device", str(device), "--log-every", str(max(1, steps // 10)),
                "--ckpt-every", str(max(0, steps // 4)), "--resume", "--no-grad-checkpointing"]
        if init is not None:
            argv += ["--init-weights", str(init)]
        t0 = time.monotonic()
        rc = ft.main(argv)
        sec = time.monotonic() - t0
        run = dict(rc=rc, file=dst.name, init=init.name if init else "fresh (proj = 0)", steps=steps,
                   seconds=round(sec, 1), samples_per_second=round(steps * a.batch / sec, 1))
        if ckpt.exists():
            hist = [h[1] for h in load_checkpoint(ckpt)[0]["history"]]
            k = max(1, len(hist) // 10)
            run.update(loss_first_tenth=round(sum(hist[:k]) / k, 5), loss_last_tenth=round(sum(hist[-k:]) / k, 5),
                       loss_history=[round(v, 5) for v in hist])
        res["runs"][name] = run
        _write(out, "testbed", res)
        say(f"testbed {name}: rc {rc}, {steps} steps in {sec:.1f} s, loss first/last tenth "
            f"{run.get('loss_first_tenth')} -> {run.get('loss_last_tenth')}")
    res["seconds_total"] = round(time.monotonic() - t_part, 1)
    _write(out, "testbed", res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["speed", "testbed", "all"], default="all")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (checks the path, no timing value)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--modes", default="salad_topk+ckpt,dense+ckpt,salad_topk,dense",
                    help="speed: comma list of dense|salad_topk|salad_window, each optionally +ckpt")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--pairs-dir", default=None, help="testbed pairs + checkpoints (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=1600, help="testbed steps per run (the most, with --deadline)")
    ap.add_argument("--min-steps", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=None,
                    help="testbed: seconds for the whole part; the step count is chosen to fit (probe first)")
    ap.add_argument("--margin", type=float, default=20.0, help="testbed: seconds kept spare under --deadline")
    ap.add_argument("--probe-steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args(argv)
    if a.smoke:
        a.warmup, a.iters, a.pairs, a.batch, a.backend = 1, 2, 4, 2, "torch"
        a.steps, a.probe_steps, a.min_steps = min(a.steps, 6), 5, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in (["speed", "testbed"] if a.part == "all" else [a.part]):
        r = (speed if part == "speed" else testbed)(a, device)
        print(json.dumps({k: v for k, v in r.items() if k != "runs"})[:3000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
