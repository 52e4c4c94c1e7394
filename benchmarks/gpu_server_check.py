"""SALAD through a real ComfyUI server on the GPU, in every memory mode ComfyUI has (issue 14).

For each mode a fresh ComfyUI 0.3.75 server starts on the GPU (no ``--cpu``) with this pack, loads a
full-size random-weight Wan 2.1 T2V checkpoint (built here with ComfyUI's own WanModel class) through
UNETLoader, and samples 480p x 81 frames with KSampler (euler/simple, CFG: cond and uncond run as one
batch).  Runs per mode: dense; SALAD at sparsity 0 (must equal dense); SALAD 90% top-k without weights;
90% top-k / window with a weight file (random gate + Proj on every block, saved in bf16, loaded by
SALAD Weights Loader); 90% top-k with weights and start_percent 0.2; 90% top-k with weights and precision
fp8_proj (FP8 Proj GEMM; on a card without FP8 it falls back to bf16 with one log line).  Checked: every run succeeds,
sparsity 0 equals dense; recorded: wall time of each prompt (ComfyUI's own execution timestamps),
peak GPU memory during the prompt (NVML, device-wide), and how ComfyUI loaded the model (its log).

Modes: full (default), partial (--reserve-vram so that about 4.5 GB is usable, as on a 6-8 GB card),
lowvram (--lowvram with the same reserve), novram (--novram), and fp8 model weights (weight_dtype fp8_e4m3fn)
under partial load.  ``--model 14b`` runs Wan 14B at 480p in the partial mode with about 22 GB usable (a 24 GB card).

GPU:  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/gpu_server_check.py --out DIR [--model 14b]
CPU:  python benchmarks/gpu_server_check.py --model tiny --modes full --out DIR   (checks the script runs)
Writes DIR/<date>-server-<model>-<card>.json and .log; the table is printed at the end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from comfy_harness import ComfyServer, execution_error, find_comfyui, output_files, status_str  # noqa: E402

# usable_gib: GPU memory left to ComfyUI in the partial / lowvram modes (--reserve-vram = card total - this):
# about what a 6-8 GB card leaves for Wan 1.3B, and a 24 GB card for Wan 14B.
SHAPES = {"tiny": dict(width=64, height=64, frames=9, steps=2, usable_gib=0.0),   # --model tiny: CPU check
          "1.3b": dict(width=832, height=480, frames=81, steps=4, usable_gib=4.5),
          "14b": dict(width=832, height=480, frames=81, steps=2, usable_gib=22.0)}


class PeakMemory:
    """Device-wide used GPU memory sampled every 20 ms (NVML) while a prompt runs."""

    def __init__(self, enabled=True):
        self.peak = 0
        self.enabled = enabled
        self._stop = threading.Event()
        if not enabled:
            return
        import pynvml
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def used(self):
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used if self.enabled else 0

    def total_gib(self):
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total / 2**30 if self.enabled else 0.0

    def name(self):
        if not self.enabled:
            return "cpu"
        n = self.nvml.nvmlDeviceGetName(self.handle)
        return n.decode() if isinstance(n, bytes) else n

    def __enter__(self):
        self.peak = self.used()
        self._stop.clear()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def prompt(unet, shape, *, salad=None, weights=None, weight_dtype="default", steps=None, prefix="gpu"):
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}},
        "2": {"class_type": "SALADTest_Conditioning", "inputs": {"seed": 11, "tokens": 512, "dim": 4096}},
        "3": {"class_type": "SALADTest_Conditioning", "inputs": {"seed": 12, "tokens": 512, "dim": 4096}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": shape["width"], "height": shape["height"], "length": shape["frames"],
                         "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": 7, "steps": steps or shape["steps"], "cfg": 5.0,
                         "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                         "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
    if salad is not None:
        inputs = dict(sparsity=0.9, pattern="topk", start_percent=0.0, end_percent=1.0, dense_blocks="",
                      backend="auto", min_tokens=0, verbose=False, model=["1", 0])
        inputs.update(salad)
        p["5"] = {"class_type": "SALADApplyAttention", "inputs": inputs}
        p["6"]["inputs"]["model"] = ["5", 0]
        if weights:
            p["8"] = {"class_type": "SALADWeightsLoader", "inputs": {"weights_name": weights}}
            p["5"]["inputs"]["salad_weights"] = ["8", 0]
    return p


def runs_for(weights):
    return [
        ("dense", None, None),
        ("salad_sparsity0", {"sparsity": 0.0}, None),
        ("sparse_topk90", {"sparsity": 0.9, "pattern": "topk"}, None),
        ("salad_topk90_weights", {"sparsity": 0.9, "pattern": "topk"}, weights),
        ("salad_window90_weights", {"sparsity": 0.9, "pattern": "window"}, weights),
        ("salad_topk90_weights_start0.2", {"sparsity": 0.9, "pattern": "topk", "start_percent": 0.2}, weights),
        # the FP8 Proj GEMM with the Proj weights wherever ComfyUI put them (offloaded in the partial modes)
        ("salad_topk90_weights_fp8proj", {"sparsity": 0.9, "pattern": "topk", "precision": "fp8_proj"}, weights),
    ]


def build_files(base: Path, model: str):
    """Random full-size checkpoint (bf16) and a SALAD weight file for it (bf16, random gate + Proj)."""
    import torch
    from make_fixtures import FULL_SIZE, random_state_dict
    from safetensors.torch import save_file

    from _pack import register
    register()
    from salad_pack.salad_core.weights import SaladWeights, save_salad_weights

    from make_fixtures import VARIANTS
    cfg = VARIANTS["wan21_t2v_tiny"] if model == "tiny" else FULL_SIZE[f"wan21_t2v_{model}"]
    (base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (base / "models" / "salad").mkdir(parents=True, exist_ok=True)
    unet = f"wan21_t2v_{model}_random.safetensors"
    sd = random_state_dict(str(find_comfyui()), cfg, seed=0, device="cuda" if model != "tiny" else "cpu",
                           dtype=torch.bfloat16)
    save_file(sd, str(base / "models" / "diffusion_models" / unet))
    del sd
    w = SaladWeights.new(dim=cfg["dim"], heads=cfg["num_heads"], num_blocks=cfg["num_layers"],
                         base_model=f"wan21_t2v_{model}_random")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in w.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    weights = f"salad_{model}_random.safetensors"
    save_salad_weights(w, base / "models" / "salad" / weights, dtype=torch.bfloat16)
    return unet, weights


def prompt_seconds(entry):
    ts = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    if ts.get("execution_start") and ts.get("execution_success"):
        return (ts["execution_success"] - ts["execution_start"]) / 1000.0
    return None


def load_latent(server, entry):
    from safetensors.torch import load_file
    f = [x for x in output_files(entry) if x["filename"].endswith(".latent")][0]
    return load_file(str(server.output / f.get("subfolder", "") / f["filename"]))["latent_tensor"].float()


def run_mode(base, mode, args, unet, weights, shape, mem, log, deadline, weight_dtype="default"):
    server = ComfyServer(base_dir=base, extra_args=args, cpu=not mem.enabled)
    rows = []
    server.start(timeout=300)
    try:
        # warm-up (model load, Triton compile) with one step each, not timed
        for name, salad, w in runs_for(weights)[:1] + runs_for(weights)[3:5]:
            e = server.run(prompt(unet, shape, salad=salad, weights=w, weight_dtype=weight_dtype, steps=1,
                                  prefix=f"warm_{uuid.uuid4().hex[:6]}"), timeout=900)
            if status_str(e) != "success":
                log(f"[{mode}] warm-up {name} failed: {(execution_error(e) or {}).get('exception_message')}")
        dense = None
        cached = None
        for name, salad, w in runs_for(weights):
            if time.time() > deadline:
                log(f"[{mode}] time budget reached, skipping {name}")
                continue
            if w != cached:
                # ComfyUI drops a node's cached output when a prompt without that node runs; load the
                # weight file (and convert it for the model) once, untimed, as a user re-running a graph has
                server.run(prompt(unet, shape, salad=salad, weights=w, weight_dtype=weight_dtype, steps=1,
                                  prefix=f"reload_{uuid.uuid4().hex[:6]}"), timeout=900)
                cached = w
            mark = len(server.log())
            with mem:
                e = server.run(prompt(unet, shape, salad=salad, weights=w, weight_dtype=weight_dtype,
                                      prefix=f"{mode}_{name}_{uuid.uuid4().hex[:6]}"), timeout=900)
            ok = status_str(e) == "success"
            row = dict(mode=mode, run=name, ok=ok, seconds=prompt_seconds(e), peak_gib=mem.peak / 2**30,
                       load=[ln.split("INFO")[-1].strip()[:160] for ln in server.log()[mark:].splitlines()
                             if "loaded partially" in ln or "loaded completely" in ln][:3])
            if not ok:
                row["error"] = (execution_error(e) or {}).get("exception_message", "")[:500]
            else:
                lat = load_latent(server, e)
                row["finite"] = bool(lat.isfinite().all())
                if name == "dense":
                    dense = lat
                elif dense is not None:
                    row["rel_err_vs_dense"] = float((lat - dense).abs().max() / dense.abs().max())
            rows.append(row)
            log(f"[{mode}] {json.dumps(row)}")
    finally:
        server.stop()
        (base / f"comfyui-{mode}.log").write_text(server.log())
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SHAPES), default="1.3b")
    ap.add_argument("--modes", default=None, help="comma list (default: all for 1.3b, partial for 14b)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default="/tmp/salad_gpu_check")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new runs after this")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    base = Path(a.base) / a.model
    if a.build_only:      # in a child process, so that this process never holds a CUDA context
        print(json.dumps(build_files(base, a.model)))
        return
    import subprocess
    t_start = time.time()
    deadline = t_start + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mem = PeakMemory(enabled=a.model != "tiny")
    card = mem.name()
    date = dt.date.today().isoformat()
    stem = f"{date}-server-{a.model}-{card.lower().replace(' ', '_')}"
    logf = open(out / f"{stem}.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    shape = SHAPES[a.model]
    t0 = time.time()
    built = subprocess.run([sys.executable, __file__, "--build-only", "--model", a.model, "--base", a.base,
                            "--out", a.out], check=True, capture_output=True, text=True)
    unet, weights = json.loads(built.stdout.strip().splitlines()[-1])
    log(f"built {unet}, {weights} in {time.time() - t0:.1f}s")
    r = f"{max(0.0, mem.total_gib() - shape['usable_gib']):.1f}"
    log(f"card {card}: {mem.total_gib():.1f} GiB; partial/lowvram modes use --reserve-vram {r}")
    modes = {"full": ([], "default"), "partial": (["--reserve-vram", r], "default"),
             "lowvram": (["--lowvram", "--reserve-vram", r], "default"), "novram": (["--novram"], "default"),
             "partial_fp8": (["--reserve-vram", str(r)], "fp8_e4m3fn")}
    chosen = a.modes.split(",") if a.modes else (["partial"] if a.model == "14b" else list(modes))
    rows = []
    for mode in chosen:
        if time.time() > deadline:
            log(f"time budget reached before mode {mode}")
            continue
        extra, wdt = modes[mode]
        rows += run_mode(base, mode, extra, unet, weights, shape, mem, log, deadline, weight_dtype=wdt)
    res = dict(card=card, date=date, model=a.model, shape=shape, rows=rows,
               wall_s=time.time() - t_start)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    log(f"\n{'mode':12s} {'run':32s} {'ok':4s} {'s':>7s} {'peak GiB':>9s} {'err vs dense':>12s}")
    for row in rows:
        err = row.get("rel_err_vs_dense")
        log(f"{row['mode']:12s} {row['run']:32s} {str(row['ok']):4s} {row['seconds'] or float('nan'):7.2f} "
            f"{row['peak_gib']:9.2f} {'' if err is None else f'{err:.2e}':>12s}")
    logf.close()


if __name__ == "__main__":
    main()
