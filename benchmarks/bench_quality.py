"""Quality of sparse attention on the trained testbed Wan: full ComfyUI sampling, videos vs dense.

For P prompt x seed pairs (captions of ``testbed.data.sample_specs(seed=BENCH_SEED, n=P)``, a seed
range training never uses; noise seed of pair i = BENCH_SEED + i, drawn with
``comfy.sample.prepare_noise``) every method samples from the same noise with ComfyUI's own sampler
(``comfy.sample.sample``: euler / simple, 20 steps, cfg 5; positive ``testbed.text.caption_context``,
negative the empty caption), on the testbed model loaded by ``comfy.sd.load_diffusion_model``:

  dense            the unpatched ModelPatcher
  sparse_topk      ``nodes.patch.apply_salad`` without weights (what the Apply SALAD node does),
  sparse_window    pattern topk / window
  salad_calibrated apply_salad with SALAD weights: files from ``--weights`` (SALADWeightsLoader.wrap), or
                   with ``--calibrate`` made here by the SALAD Train Weights node's code, one per
                   sparsity, from captions of seed CALIB_SEED (not the benchmark's pairs)
  sol_attn         ComfyUI core's training-free "Model Sparse Attention" method (comfy_kitchen
                   Sol-Attn), our override in benchmarks/sol_attn_peer.py, tau calibrated to the
                   same kept-block share as SALAD (see that module's docstring)

at sparsities 0.8 / 0.9 / 0.95 and start_percent 0 / 0.2, plus ``sparse_topk`` at sparsity 0 (must
reproduce dense).  Every output latent is decoded with ``testbed.codec``; per pair PSNR and SSIM
(gaussian window 11, sigma 1.5, per colour channel and frame, averaged) vs the dense video, and the
caption adherence rate (``testbed.detect``) per method.  For salad_calibrated the gate
G = sigmoid(gate(mean_tokens x)) of every block is recorded on every SALAD call
(through ``salad_core.trainer.capture``).

Output in ``--out``: ``quality-<date>-<card>.json`` + ``.log``, the same json as ``latest-quality.json``
({card, date, rows: [{method, sparsity, start_percent, psnr, ssim, pairs, ...}]}; dense's psnr/ssim
are null; per-pair PSNR is capped at 100 dB for identical videos), and ``quality-<date>-<card>.png``
(frames of one prompt: dense, sparse_topk, salad_calibrated, sol_attn at ``--image-sparsity``).

GPU (no network there): here ``bash benchmarks/prepare_quality_gpu.sh`` stages the comfy-kitchen wheel
(ROCm library stripped), three small wheels ComfyUI's sampler imports and a minimal ComfyUI in ignored
folders; carry those and run
      pip install --no-index --no-deps --target /tmp/site <the four wheels> && export PYTHONPATH=/tmp/site
      COMFYUI_DIR=$PWD/.gpu/comfyui_min PYTHONUNBUFFERED=1 python3 benchmarks/bench_quality.py \
          (--weights W.safetensors[,W2...] | --calibrate) --out DIR
CPU:  python benchmarks/bench_quality.py --smoke --out DIR   (tiny random Wan, tiny latent, 2 pairs,
      2 steps, torch backend, random SALAD weights, no sol_attn; checks the whole path runs)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _p in (ROOT / "tests", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

BENCH_SEED = 10_000_000     # testbed training uses seeds 1_000_003 + step, its validation 20_000_000
CALIB_SEED = 30_000_000
MODEL_PATH = ROOT / "testbed" / "models" / "salad_testbed_wan21.safetensors"
SPARSE_METHODS = ("sparse_topk", "sparse_window", "salad_calibrated", "sol_attn")
FIGURE_METHODS = ("dense", "sparse_topk", "salad_calibrated", "sol_attn")
PSNR_CAP = 100.0
SPARSITIES = "0.8,0.9,0.95"


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------

def psnr_per_video(a: torch.Tensor, b: torch.Tensor, cap: float = PSNR_CAP) -> torch.Tensor:
    """(B,) PSNR in dB of [0, 1] videos a, b (B, F, H, W, 3) over all values, capped at ``cap``."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse.clamp_min(10.0 ** (-cap / 10.0)))).float()


def _gauss_kernel(win: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(win, device=device, dtype=dtype) - (win - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def ssim_images(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5,
                data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004, gaussian-weighted statistics, no padding: only window positions fully
    inside the image) of single-channel images x, y (N, H, W) -> (N,) mean SSIM map.  H, W >= win."""
    g = _gauss_kernel(win, sigma, x.device, x.dtype)
    gh, gw = g.view(1, 1, win, 1), g.view(1, 1, 1, win)

    def blur(t):
        return F.conv2d(F.conv2d(t, gh), gw)

    x, y = x.unsqueeze(1), y.unsqueeze(1)
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(1)


def ssim_per_video(a: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
    """(B,) SSIM of videos a, b (B, F, H, W, C): every frame and colour channel separately, averaged."""
    out = []
    for va, vb in zip(a, b):       # one video at a time bounds the memory of the blur temporaries
        fa = va.permute(0, 3, 1, 2).reshape(-1, va.shape[1], va.shape[2]).float()
        fb = vb.permute(0, 3, 1, 2).reshape(-1, vb.shape[1], vb.shape[2]).float()
        out.append(ssim_images(fa, fb, **kw).mean())
    return torch.stack(out)


def _stats(v: list) -> tuple:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(v) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------
# SALAD call probe (through salad_core.trainer.capture): call counts and gate values per block
# ----------------------------------------------------------------------------------------------

class SaladProbe:
    """Duck-typed sample store for ``trainer.capture``: counts SALAD calls per block and, given the
    weights, accumulates G = sigmoid(gate(mean_tokens x)) (per sample) per block."""

    def __init__(self, weights=None):
        from salad_pack.salad_core.attention import gate_value
        self._gate_value = gate_value
        self.weights = weights
        self.calls = {}
        self.g = {}        # block -> [sum, count, min, max]

    def add(self, *, x=None, block_id=None, q=None, **_):
        b = int(block_id) if block_id is not None else -1
        self.calls[b] = self.calls.get(b, 0) + 1
        gate = self.weights.gate_for(b) if self.weights is not None and block_id is not None else None
        if gate is not None and x is not None:
            G = self._gate_value(x, gate, x.shape[0]).flatten().float()
            s = self.g.setdefault(b, [0.0, 0, math.inf, -math.inf])
            s[0] += float(G.sum())
            s[1] += G.numel()
            s[2] = min(s[2], float(G.min()))
            s[3] = max(s[3], float(G.max()))

    def gates(self) -> dict:
        return {str(b): dict(mean=s[0] / s[1], min=s[2], max=s[3], samples=s[1]) for b, s in sorted(self.g.items())}


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny random Wan and latent, 2 pairs, 2 steps")
    ap.add_argument("--model", default=None, help=f"diffusion model file (default {MODEL_PATH.relative_to(ROOT)})")
    ap.add_argument("--weights", default=None,
                    help="SALAD weight file(s) for salad_calibrated, comma-separated: each sparsity uses the "
                         "file whose metadata sparsity is nearest")
    ap.add_argument("--calibrate", action="store_true",
                    help="without --weights: make the salad_calibrated weights here, one file per sparsity, with the "
                         "SALAD Train Weights node's own code on captions of seed CALIB_SEED (not the bench pairs)")
    ap.add_argument("--calib-prompts", type=int, default=8)
    ap.add_argument("--calib-record-steps", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=8, help="recorded calls kept per block")
    ap.add_argument("--calib-train-steps", type=int, default=200)
    ap.add_argument("--salad-pattern", default=None, help="pattern for salad_calibrated (default: the file's, "
                                                          "or topk when calibrating)")
    ap.add_argument("--methods", default=",".join(("dense",) + SPARSE_METHODS))
    ap.add_argument("--sparsities", default=SPARSITIES)
    ap.add_argument("--starts", default="0,0.2", help="start_percent values")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="latents per sampler call (cond+uncond doubles it)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--bench-seed", type=int, default=BENCH_SEED)
    ap.add_argument("--latent", default="16,16,32,32", help="C,T,H,W of the raw latent")
    ap.add_argument("--backend", default="auto", help="SALAD backend: auto | triton | torch")
    ap.add_argument("--sol-extra-tokens", type=int, default=0,
                    help="Sol-Attn token_aug (core node default 256; 0 here, see sol_attn_peer.py)")
    ap.add_argument("--sol-eager", action="store_true",
                    help="allow Sol-Attn on CPU through comfy_kitchen's eager reference (testing only)")
    ap.add_argument("--image-sparsity", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.pairs, a.batch, a.steps, a.latent, a.backend = min(a.pairs, 2), 2, min(a.steps, 2), "16,8,16,16", "torch"
        if a.sparsities == SPARSITIES:       # one sparsity keeps the CPU run short (512 tokens: 4 blocks)
            a.sparsities = "0.9"
        if not a.sol_eager:
            a.methods = ",".join(m for m in a.methods.split(",") if m != "sol_attn")
    return a


class Run:
    """Log, comfy handles and the shared inputs of one benchmark run."""

    def __init__(self, a):
        self.a = a
        default = Path(tempfile.gettempdir()) / "bench_quality_smoke" if a.smoke else ROOT / "benchmarks" / "results"
        self.out = Path(a.out) if a.out else default
        self.out.mkdir(parents=True, exist_ok=True)
        self.lines = []

    def say(self, msg: str):
        print(f"[quality] {msg}", flush=True)
        self.lines.append(msg)


def import_comfy(smoke: bool):
    from comfy_harness import find_comfyui
    comfy_dir = str(find_comfyui())
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    if smoke or not torch.cuda.is_available():
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.sd  # noqa: F401
    return comfy_dir


def smoke_files(comfy_dir: str, tmp: Path, run: Run):
    """Tiny random Wan (tests/make_fixtures.py wan21_t2v_tiny) and random SALAD weights for it."""
    from make_fixtures import VARIANTS, write_variant
    from salad_pack.salad_core.weights import SaladWeights, save_salad_weights
    model = write_variant(comfy_dir, tmp, "wan21_t2v_tiny")
    cfg = VARIANTS["wan21_t2v_tiny"]
    sw = SaladWeights.new(dim=cfg["dim"], heads=cfg["num_heads"], num_blocks=cfg["num_layers"],
                          base_model="smoke-random", pattern="topk", sparsity=0.9)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sw.parameters():
            p.normal_(0.0, 0.05)
    w = save_salad_weights(sw, tmp / "smoke_salad_weights.safetensors")
    run.say(f"smoke: tiny model {model.name}, random SALAD weights {w.name}")
    return model, str(w)


def calibrate(model, sparsities, a, latent_shape, out_dir: Path, run: Run):
    """[(SaladWeights, path)]: one weight file per sparsity made by the SALAD Train Weights node's code
    (record with sparse-only SALAD, distil each block's Proj + gate, keep improved blocks), on
    ``--calib-prompts`` captions of ``data.sample_specs(CALIB_SEED)``; saved under out_dir/salad_weights."""
    import folder_paths
    from salad_pack.nodes.paths import EXTENSIONS, FOLDER_NAME
    from salad_pack.nodes.train import SALADTrainWeights
    from salad_pack.testbed import data as tb_data
    from salad_pack.testbed import text as tb_text
    wdir = out_dir / "salad_weights"
    wdir.mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[FOLDER_NAME] = ([str(wdir)], set(EXTENSIONS))
    specs = tb_data.sample_specs(seed=CALIB_SEED, n=a.calib_prompts)
    pos = [[tb_text.caption_context([s.caption for s in specs]), {}]]
    neg = [[tb_text.caption_context([""]), {}]]
    latent = {"samples": torch.zeros(len(specs), *latent_shape)}
    pattern = a.salad_pattern or "topk"
    files = []
    for s in sparsities:
        t0 = time.perf_counter()
        with torch.inference_mode():
            res = SALADTrainWeights().train(
                model=model, positive=pos, negative=neg, latent_image=latent, seed=CALIB_SEED,
                record_steps=a.calib_record_steps, cfg=a.cfg, sampler_name=a.sampler, scheduler=a.scheduler,
                sparsity=s, pattern=pattern, samples_per_block=a.calib_samples, train_steps=a.calib_train_steps,
                learning_rate=1e-3, filename_prefix=f"testbed_{pattern}_{s:g}")
        patcher, report = res["result"]
        run.say(f"calibrated s={s} {pattern} in {time.perf_counter() - t0:.1f}s: " + report.replace("\n", " | "))
        saved = sorted(wdir.glob(f"testbed_{pattern}_{s:g}_*.safetensors"), key=lambda p: p.stat().st_mtime)
        if patcher is not None and saved:
            files.append((patcher.model, str(saved[-1])))
    return files


def load_weight_files(spec: str | None):
    """[(SaladWeights, path)] from a comma-separated list of files."""
    from salad_pack.salad_core.weights import load_salad_weights
    if not spec:
        return []
    return [(load_salad_weights(p), p) for p in spec.split(",") if p.strip()]


def pick_weights(files, sparsity: float):
    """The (weights, path) whose metadata sparsity is nearest ``sparsity`` (files without one last)."""
    def distance(wp):
        try:
            return abs(float(wp[0].metadata.get("sparsity")) - sparsity)
        except (TypeError, ValueError):
            return math.inf
    return min(files, key=distance)


def main(argv=None):
    a = parse(argv)
    run = Run(a)
    t_start = time.perf_counter()
    comfy_dir = import_comfy(a.smoke)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd

    from _pack import register
    register()
    from salad_pack.kernels import keep_count, num_blocks
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.nodes.patch import PatchOptions, apply_salad
    from salad_pack.salad_core.trainer import capture
    from salad_pack.testbed import codec as tb_codec
    from salad_pack.testbed import data as tb_data
    from salad_pack.testbed import detect as tb_detect
    from salad_pack.testbed import text as tb_text
    from sol_attn_peer import NODE_DEFAULTS, SolAttnPatch, apply_sol_attn, calibrate_tau, import_kitchen, routed_share

    dev = mm.get_torch_device()
    card = torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    model_path, weights_spec = (smoke_files(comfy_dir, tmp, run) if a.smoke else (a.model or str(MODEL_PATH), None))
    weights_spec = a.weights or (None if a.calibrate else weights_spec)
    methods = [m for m in a.methods.split(",") if m]
    sparsities = [float(s) for s in a.sparsities.split(",")]
    starts = [float(s) for s in a.starts.split(",")]

    model = comfy.sd.load_diffusion_model(str(model_path))
    C, T, H, W = (int(v) for v in a.latent.split(","))
    files = load_weight_files(weights_spec)
    if "salad_calibrated" in methods and not files and a.calibrate:
        files = calibrate(model, sparsities, a, (C, T, H, W), run.out, run)
    if "salad_calibrated" in methods and not files:
        run.say("salad_calibrated skipped: no weights (give --weights or --calibrate)")
        methods.remove("salad_calibrated")
    if "sol_attn" in methods and import_kitchen() is None:
        run.say("sol_attn skipped: comfy_kitchen is not importable (see the GPU command in the report/README)")
        methods.remove("sol_attn")
    elif "sol_attn" in methods and dev.type != "cuda" and not a.sol_eager:
        run.say("sol_attn skipped: needs CUDA (or --sol-eager for comfy_kitchen's O(T^2) eager reference)")
        methods.remove("sol_attn")

    # inputs shared by every method
    n = a.pairs
    specs = tb_data.sample_specs(seed=a.bench_seed, n=n)
    captions = [s.caption for s in specs]
    seeds = [a.bench_seed + i for i in range(n)]
    ctx = tb_text.caption_context(captions)
    neg = tb_text.caption_context([""])
    empty = torch.zeros(1, C, T, H, W)
    noise = torch.cat([comfy.sample.prepare_noise(empty, s) for s in seeds])
    tokens = T * ((H + 1) // 2) * ((W + 1) // 2)
    nkv = num_blocks(tokens)
    codec = tb_codec.load_codec(device=dev)
    run.say(f"{card}: model {Path(model_path).name} ({model.model.get_dtype()}), latent {(C, T, H, W)}, "
            f"{tokens} tokens, {n} pairs, {a.steps} steps {a.sampler}/{a.scheduler} cfg {a.cfg}, batch {a.batch}, "
            f"methods {methods}")

    def sample(m, probe=None, count=n):
        """Raw output latents (count, C, T, H, W) on the CPU of ModelPatcher m for the first count pairs."""
        outs = []
        for b0 in range(0, count, a.batch):
            sl = slice(b0, min(count, b0 + a.batch))
            lat = empty.expand(sl.stop - sl.start, -1, -1, -1, -1).contiguous()
            with torch.inference_mode(), (capture(probe) if probe is not None else contextlib.nullcontext()):
                out = comfy.sample.sample(m, noise[sl], a.steps, a.cfg, a.sampler, a.scheduler,
                                          [[ctx[sl], {}]], [[neg, {}]], lat, disable_pbar=True, seed=seeds[b0])
            outs.append(out.float().cpu())
        return torch.cat(outs)

    def decode(raw, sl):
        with torch.inference_mode():
            return codec.decode(raw[sl].to(dev))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows, figure = [], {}
    dense_raw = None

    def evaluate(method, sparsity, start, raw, seconds, extra):
        """Metrics of one configuration vs dense; appends a row."""
        psnr, ssim, adh = [], [], []
        for b0 in range(0, n, a.batch):
            sl = slice(b0, min(n, b0 + a.batch))
            vid = decode(raw, sl)
            adh += tb_detect.adherence(vid, specs[sl])
            if method != "dense":
                ref = decode(dense_raw, sl)
                psnr += psnr_per_video(vid, ref).tolist()
                ssim += ssim_per_video(vid, ref).tolist()
            if b0 == 0 and method in FIGURE_METHODS and (method == "dense" or (
                    abs(sparsity - a.image_sparsity) < 1e-9 and start == 0.0)):
                figure[method] = vid[0].cpu()
        (p_mean, p_std), (s_mean, s_std) = (_stats(v) if v else (None, None) for v in (psnr, ssim))
        row = dict(method=method, sparsity=sparsity, start_percent=start, psnr=p_mean, ssim=s_mean, pairs=n,
                   psnr_std=p_std, ssim_std=s_std, psnr_min=min(psnr) if psnr else None,
                   identical_pairs=sum(p >= PSNR_CAP for p in psnr),
                   adherence=float(tb_detect.adherence_rate(adh)), seconds=round(seconds, 2), **extra)
        rows.append(row)
        fmt = (lambda v: "-" if v is None else f"{v:.4f}")
        run.say(f"{method:<17} s={sparsity:<5} start={start:<4} PSNR {fmt(row['psnr'])} dB  SSIM {fmt(row['ssim'])}  "
                f"adherence {row['adherence']:.3f}  kept {fmt(row.get('kept_share'))}  {seconds:.1f}s")

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        r = fn()
        sync()
        return r, time.perf_counter() - t0

    # dense reference
    dense_raw, sec = timed(lambda: sample(model))
    evaluate("dense", 0.0, 0.0, dense_raw, sec, dict(kept_share=1.0))

    # Sol-Attn calibration data: routing scores of the dense run's self-attention calls (first batch)
    sol_z = []
    if "sol_attn" in methods:
        rec = SolAttnPatch(record=sol_z)
        sample(apply_sol_attn(model, rec, 0.0), count=min(n, a.batch))
        run.say(f"sol_attn calibration: {len(sol_z)} self-attention calls recorded (dense run, first batch)")
    sol_cal = {}

    configs = [("sparse_topk", 0.0, 0.0)] if "sparse_topk" in methods else []
    configs += [(m, s, st) for st in starts for s in sparsities for m in SPARSE_METHODS if m in methods]
    ms = model.get_model_object("model_sampling")
    for method, s, start in configs:
        target = keep_count(nkv, s) / nkv             # SALAD's kept key-block share at this length
        extra = dict(kept_share=target)
        probe = None
        if method in ("sparse_topk", "sparse_window"):
            opts = PatchOptions(sparsity=s, pattern=method.split("_")[1], start_percent=start, backend=a.backend)
            m = apply_salad(model, opts)
            probe = SaladProbe()
        elif method == "salad_calibrated":
            sw, path = pick_weights(files, s)
            pattern = a.salad_pattern or sw.metadata.get("pattern") or "topk"
            opts = PatchOptions(sparsity=s, pattern=pattern, start_percent=start, backend=a.backend)
            m = apply_salad(model, opts, SALADWeightsLoader.wrap(sw))
            probe = SaladProbe(copy.deepcopy(sw).to(dev))   # fp32 copy: the patched model's copy stays as loaded
            extra.update(weights=Path(path).name, pattern=pattern, weights_sparsity=sw.metadata.get("sparsity"))
        else:  # sol_attn
            sig = float(ms.percent_to_sigma(start))
            zs = [z.to(dev, torch.float32) for sg, z in sol_z if sg is None or sg <= sig + 1e-6]
            tau = calibrate_tau(zs, target) if zs else NODE_DEFAULTS["tau"]
            floor = routed_share(zs[0], math.inf) if zs else None     # the always-exact diagonal band
            sol_cal[f"{s}@{start}"] = dict(tau=tau, target_share=target, calls=len(zs), diagonal_floor=floor,
                                           reachable=bool(zs) and floor <= target)
            patch = SolAttnPatch(tau=tau, extra_tokens=a.sol_extra_tokens, min_tokens=0, allow_eager=a.sol_eager)
            m = apply_sol_attn(model, patch, start)
        raw, sec = timed(lambda: sample(m, probe))
        calls = sum(probe.calls.values()) if probe is not None else patch.calls
        if calls == 0 and s > 0:
            run.say(f"WARNING: {method} s={s} start={start} never ran sparse attention (all calls dense)")
        if probe is not None:
            extra["salad_calls"] = calls
            if method == "salad_calibrated":
                extra["gates"] = probe.gates()
        else:
            extra.update(tau=patch.tau, extra_tokens=patch.extra_tokens, target_share=target,
                         kept_share=patch.kept_share, sol_calls=patch.calls, declined=dict(patch.declined),
                         kernel_vs_eager=patch.eager_check)
        evaluate(method, s, start, raw, sec, extra)
        del m

    # no patch may leak into the base model: dense again (first batch) must match the first dense run
    nb = min(n, a.batch)
    again = sample(model, count=nb)
    dense_repeat = float(psnr_per_video(decode(again, slice(0, nb)), decode(dense_raw, slice(0, nb))).min())
    run.say(f"dense re-run after all methods: min PSNR vs the first dense run {dense_repeat:.2f} dB")
    check = next((r["psnr"] for r in rows if r["method"] == "sparse_topk" and r["sparsity"] == 0.0), None)
    date = dt.datetime.now(dt.timezone.utc)
    res = dict(card=card, date=date.isoformat(timespec="seconds"), rows=rows,
               check_sparsity0_psnr=check, check_dense_repeat_psnr=dense_repeat, model=Path(model_path).name, model_dtype=str(model.model.get_dtype()),
               latent=[C, T, H, W], tokens=tokens, kv_blocks_128=nkv, steps=a.steps, cfg=a.cfg, sampler=a.sampler,
               scheduler=a.scheduler, pairs=n, batch=a.batch, bench_seed=a.bench_seed, backend=a.backend,
               codec=dict(ft=codec.ft, fs=codec.fs), sol_attn_calibration=sol_cal, torch=torch.__version__,
               smoke=a.smoke, seconds_total=round(time.perf_counter() - t_start, 1),
               notes=("psnr/ssim vs the dense video of the same prompt and noise, mean over pairs (per-pair PSNR "
                      f"capped at {PSNR_CAP:g} dB); kept_share: key-block share attended exactly (SALAD: "
                      "keep_count/blocks of 128 tokens; sol_attn: measured with comfy_kitchen's routing rule on "
                      "its own q, k, 64-token blocks, diagonal included)"))
    tag = "smoke" if a.smoke else card.replace(" ", "-")
    stem = f"quality-{date.date().isoformat()}-{tag}"
    text = json.dumps(res, indent=2)
    (run.out / f"{stem}.json").write_text(text)
    (run.out / "latest-quality.json").write_text(text)
    png = write_figure(figure, run.out / f"{stem}.png", captions[0], a.image_sparsity)
    run.say(f"sparsity-0 check: PSNR vs dense {check} dB; total {res['seconds_total']} s")
    run.say(f"wrote {run.out / (stem + '.json')}, latest-quality.json, {png.name if png else 'no figure'}")
    (run.out / f"{stem}.log").write_text("\n".join(run.lines) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def write_figure(videos: dict, path: Path, caption: str, sparsity: float, n_frames: int = 6):
    """One row per method (dense first) of ``n_frames`` frames spread over the clip, labelled."""
    from PIL import Image, ImageDraw
    names = [m for m in FIGURE_METHODS if m in videos]
    if not names:
        return None
    F_, H, W, _ = videos["dense"].shape
    idx = torch.linspace(0, F_ - 1, n_frames).round().long()
    label_w, top, pad = 150, 24, 4
    img = Image.new("RGB", (label_w + n_frames * (W + pad), top + len(names) * (H + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), f"{caption[:110]}  (sparsity {sparsity}, start 0)", fill=(0, 0, 0))
    for r, name in enumerate(names):
        y = top + r * (H + pad)
        draw.text((4, y + H // 2 - 6), name, fill=(0, 0, 0))
        frames = (videos[name][idx].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for c, fr in enumerate(frames):
            img.paste(Image.fromarray(fr), (label_w + c * (W + pad), y))
    img.save(path)
    return path


if __name__ == "__main__":
    main()
