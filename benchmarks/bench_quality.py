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

--sweep (issue 12 item 4, defaults from measurements): 16 pairs (default), 20 steps, a grid over sparsity x
start_percent for sparse topk / + centroid / with weights / window / weights + centroid, dense first+last
block, and core's sol_attn at matched density and at its node defaults (see ``sweep_configs`` for the
subset and why), plus a speed table timed in the same call: one Wan2.1-1.3B 480p self-attention call
(B1 H12 L32760 D128) dense SDPA vs SALAD per sparsity/pattern/compensation/weights and comfy_kitchen's
sol_attn; each row gets attn_speedup and e2e_speedup_est (model in ``e2e_speedup``).  Configurations run
in priority order until ``--budget-s`` (200 s) has passed.  Writes DIR/sweep.json (after every row),
sweep.log and sweep.png (``plot_quality.py``: PSNR vs estimated speed-up, one curve per method).
      ... bench_quality.py --sweep --weights testbed/models/salad_testbed_wan21_topk90.safetensors --out DIR
CPU:  python benchmarks/bench_quality.py --smoke --sweep --out DIR   (~40 s; speed table at a tiny shape)
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
    ap.add_argument("--precisions", default="bf16",
                    help="SALAD precisions for the SALAD methods (comma list of bf16, fp8, fp8_proj); rows name theirs")
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
    sw = ap.add_argument_group("sweep (--sweep): quality grid + attention-op speed -> sweep.json, sweep.png")
    sw.add_argument("--sweep", action="store_true",
                    help="settings grid (see sweep_configs) with 16 pairs by default, speed table at --time-shape")
    sw.add_argument("--budget-s", type=float, default=200.0,
                    help="stop starting new sweep configs after this many seconds (the rest are listed as skipped)")
    sw.add_argument("--attn-share", type=float, default=None,
                    help=f"attention share of a dense step for the e2e estimate (default {ATTN_SHARE_1P3B_480P})")
    sw.add_argument("--time-shape", default=None, help=f"B,H,L,D of the timed attention call (default {TIME_SHAPE})")
    sw.add_argument("--time-grid", default=None, help=f"its token grid F,H,W (default {TIME_GRID})")
    sw.add_argument("--no-timing", action="store_true", help="sweep without the speed table")
    a = ap.parse_args(argv)
    a.attn_share = ATTN_SHARE_1P3B_480P if a.attn_share is None else a.attn_share
    a.time_shape = a.time_shape or (SMOKE_TIME_SHAPE if a.smoke else TIME_SHAPE)
    a.time_grid = a.time_grid or (SMOKE_TIME_GRID if a.smoke else TIME_GRID)
    if a.sweep:
        if "--pairs" not in (argv if argv is not None else sys.argv):
            a.pairs = 16
        if a.starts == "0,0.2":
            a.starts = "0,0.1,0.2"
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


def pair_inputs(n: int, latent, bench_seed: int = BENCH_SEED):
    """The benchmark's n prompt x seed pairs: (specs, seeds, positive context, negative context, empty
    latent (1, C, T, H, W), noise (n, C, T, H, W) from comfy.sample.prepare_noise)."""
    import comfy.sample

    from salad_pack.testbed import data as tb_data
    from salad_pack.testbed import text as tb_text
    specs = tb_data.sample_specs(seed=bench_seed, n=n)
    seeds = [bench_seed + i for i in range(n)]
    ctx = tb_text.caption_context([s.caption for s in specs])
    neg = tb_text.caption_context([""])
    empty = torch.zeros(1, *latent)
    noise = torch.cat([comfy.sample.prepare_noise(empty, s) for s in seeds])
    return specs, seeds, ctx, neg, empty, noise


class Bench:
    """Everything the configurations of one run share: ComfyUI, the model, the pairs' captions and
    noise, the codec, the dense reference; ``sample`` / ``decode`` / ``compare`` as every method uses them."""

    def __init__(self, a, run: Run):
        self.a, self.run = a, run
        comfy_dir = import_comfy(a.smoke)
        import comfy.model_management as mm
        import comfy.sample
        import comfy.sd

        from _pack import register
        register()
        from salad_pack.kernels import num_blocks
        from salad_pack.testbed import codec as tb_codec
        self.comfy_sample = comfy.sample
        self.dev = dev = mm.get_torch_device()
        self.card = torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or "cpu")
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_quality_"))
        model_path, weights_spec = (smoke_files(comfy_dir, self.tmp, run) if a.smoke
                                    else (a.model or str(MODEL_PATH), None))
        self.model_path = model_path
        self.weights_spec = a.weights or (None if a.calibrate else weights_spec)
        self.model = comfy.sd.load_diffusion_model(str(model_path))
        self.latent = C, T, H, W = [int(v) for v in a.latent.split(",")]
        self.n = a.pairs
        self.specs, self.seeds, self.ctx, self.neg, self.empty, self.noise = pair_inputs(a.pairs, self.latent,
                                                                                         a.bench_seed)
        self.captions = [s.caption for s in self.specs]
        self.tokens = T * ((H + 1) // 2) * ((W + 1) // 2)
        self.nkv = num_blocks(self.tokens)
        self.codec = tb_codec.load_codec(device=dev)
        self.dense_raw = None
        self._dense_videos = {}

    def sample(self, m, probe=None, count=None):
        """Raw output latents (count, C, T, H, W) on the CPU of ModelPatcher m for the first count pairs."""
        from salad_pack.salad_core.trainer import capture
        a, count = self.a, self.n if count is None else count
        outs = []
        for b0 in range(0, count, a.batch):
            sl = slice(b0, min(count, b0 + a.batch))
            lat = self.empty.expand(sl.stop - sl.start, -1, -1, -1, -1).contiguous()
            with torch.inference_mode(), (capture(probe) if probe is not None else contextlib.nullcontext()):
                out = self.comfy_sample.sample(m, self.noise[sl], a.steps, a.cfg, a.sampler, a.scheduler,
                                               [[self.ctx[sl], {}]], [[self.neg, {}]], lat, disable_pbar=True,
                                               seed=self.seeds[b0])
            outs.append(out.float().cpu())
        return torch.cat(outs)

    def decode(self, raw, sl):
        with torch.inference_mode():
            return self.codec.decode(raw[sl].to(self.dev))

    def dense_video(self, sl):
        """Decoded dense videos of the pairs in slice sl (decoded once per run)."""
        key = (sl.start, sl.stop, id(self.dense_raw))
        if key not in self._dense_videos:
            self._dense_videos = {k: v for k, v in self._dense_videos.items() if k[2] == id(self.dense_raw)}
            self._dense_videos[key] = self.decode(self.dense_raw, sl)
        return self._dense_videos[key]

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        r = fn()
        self.sync()
        return r, time.perf_counter() - t0

    def batches(self):
        return [slice(b0, min(self.n, b0 + self.a.batch)) for b0 in range(0, self.n, self.a.batch)]

    def compare(self, raw, on_video=None):
        """(psnr, ssim, adherence) per pair of raw latents vs the dense run (psnr/ssim empty while
        there is no dense run yet); on_video(slice, video) sees every decoded batch."""
        from salad_pack.testbed import detect as tb_detect
        psnr, ssim, adh = [], [], []
        for sl in self.batches():
            vid = self.decode(raw, sl)
            adh += tb_detect.adherence(vid, self.specs[sl])
            if self.dense_raw is not None:
                ref = self.dense_video(sl)
                psnr += psnr_per_video(vid, ref).tolist()
                ssim += ssim_per_video(vid, ref).tolist()
            if on_video is not None:
                on_video(sl, vid)
        return psnr, ssim, adh

    def metrics_row(self, psnr, ssim, adh) -> dict:
        from salad_pack.testbed import detect as tb_detect
        (p_mean, p_std), (s_mean, s_std) = (_stats(v) if v else (None, None) for v in (psnr, ssim))
        return dict(psnr=p_mean, ssim=s_mean, pairs=self.n, psnr_std=p_std, ssim_std=s_std,
                    psnr_min=min(psnr) if psnr else None, identical_pairs=sum(p >= PSNR_CAP for p in psnr),
                    adherence=float(tb_detect.adherence_rate(adh)))

    def record_sol(self, patcher_fn, count):
        """Sol-Attn calibration data: routing scores of the dense run's self-attention calls."""
        from sol_attn_peer import SolAttnPatch
        sol_z = []
        self.sample(patcher_fn(SolAttnPatch(record=sol_z)), count=count)
        return sol_z

    def sol_patch(self, sol_z, s, start, tau=None, extra_tokens=None):
        """(SolAttnPatch, calibration info): tau calibrated to SALAD's kept share at sparsity s from the
        recorded calls inside the start_percent window (or the given tau)."""
        import math as _m

        from salad_pack.kernels import keep_count
        from sol_attn_peer import NODE_DEFAULTS, SolAttnPatch, calibrate_tau, routed_share
        target = keep_count(self.nkv, s) / self.nkv
        sig = float(self.model.get_model_object("model_sampling").percent_to_sigma(start))
        zs = [z.to(self.dev, torch.float32) for sg, z in sol_z if sg is None or sg <= sig + 1e-6]
        floor = routed_share(zs[0], _m.inf) if zs else None          # the always-exact diagonal band
        if tau is None:
            tau = calibrate_tau(zs, target) if zs else NODE_DEFAULTS["tau"]
        cal = dict(tau=tau, target_share=target, calls=len(zs), diagonal_floor=floor,
                   reachable=bool(zs) and floor <= target)
        ext = self.a.sol_extra_tokens if extra_tokens is None else extra_tokens
        return SolAttnPatch(tau=tau, extra_tokens=ext, min_tokens=0, allow_eager=self.a.sol_eager), cal

    def sol_usable(self, methods) -> bool:
        from sol_attn_peer import import_kitchen
        if not any(m.startswith("sol_attn") for m in methods):
            return False
        if import_kitchen() is None:
            self.run.say("sol_attn skipped: comfy_kitchen is not importable (see the GPU command in the report/README)")
            return False
        if self.dev.type != "cuda" and not self.a.sol_eager:
            self.run.say("sol_attn skipped: needs CUDA (or --sol-eager for comfy_kitchen's O(T^2) eager reference)")
            return False
        return True

    def dense_repeat_check(self) -> float:
        """No patch may leak into the base model: dense again (first batch) must match the first dense run."""
        nb = min(self.n, self.a.batch)
        again = self.sample(self.model, count=nb)
        return float(psnr_per_video(self.decode(again, slice(0, nb)), self.decode(self.dense_raw, slice(0, nb))).min())

    def header(self) -> dict:
        a, (C, T, H, W) = self.a, self.latent
        return dict(model=Path(self.model_path).name, model_dtype=str(self.model.model.get_dtype()),
                    latent=[C, T, H, W], tokens=self.tokens, kv_blocks_128=self.nkv, steps=a.steps, cfg=a.cfg,
                    sampler=a.sampler, scheduler=a.scheduler, pairs=self.n, batch=a.batch,
                    bench_seed=a.bench_seed, backend=a.backend, codec=dict(ft=self.codec.ft, fs=self.codec.fs),
                    torch=torch.__version__, smoke=a.smoke)

    def describe(self, methods) -> str:
        a, (C, T, H, W) = self.a, self.latent
        return (f"{self.card}: model {Path(self.model_path).name} ({self.model.model.get_dtype()}), latent "
                f"{(C, T, H, W)}, {self.tokens} tokens, {self.n} pairs, {a.steps} steps {a.sampler}/{a.scheduler} "
                f"cfg {a.cfg}, batch {a.batch}, methods {methods}")


def main(argv=None):
    a = parse(argv)
    run = Run(a)
    if a.sweep:
        return sweep(a, run)
    t_start = time.perf_counter()
    b = Bench(a, run)
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.nodes.patch import PatchOptions, apply_salad
    from sol_attn_peer import apply_sol_attn

    model, dev, n = b.model, b.dev, b.n
    methods = [m for m in a.methods.split(",") if m]
    sparsities = [float(s) for s in a.sparsities.split(",")]
    starts = [float(s) for s in a.starts.split(",")]
    files = load_weight_files(b.weights_spec)
    if "salad_calibrated" in methods and not files and a.calibrate:
        files = calibrate(model, sparsities, a, tuple(b.latent), run.out, run)
    if "salad_calibrated" in methods and not files:
        run.say("salad_calibrated skipped: no weights (give --weights or --calibrate)")
        methods.remove("salad_calibrated")
    if "sol_attn" in methods and not b.sol_usable(methods):
        methods.remove("sol_attn")
    run.say(b.describe(methods))

    rows, figure = [], {}

    def evaluate(method, sparsity, start, raw, seconds, extra):
        """Metrics of one configuration vs dense; appends a row."""
        plain = extra.get("precision", "bf16") == "bf16"

        def keep_frame(sl, vid):
            if sl.start == 0 and plain and method in FIGURE_METHODS and (method == "dense" or (
                    abs(sparsity - a.image_sparsity) < 1e-9 and start == 0.0)):
                figure[method] = vid[0].cpu()
        row = dict(method=method, sparsity=sparsity, start_percent=start,
                   **b.metrics_row(*b.compare(raw, keep_frame)), seconds=round(seconds, 2), **extra)
        rows.append(row)
        say_row(run, row, seconds, None if plain else f"{method}[{extra['precision']}]")

    # dense reference
    dense_raw, sec = b.timed(lambda: b.sample(model))
    evaluate("dense", 0.0, 0.0, dense_raw, sec, dict(kept_share=1.0))
    b.dense_raw = dense_raw

    sol_z = []
    if "sol_attn" in methods:
        sol_z = b.record_sol(lambda p: apply_sol_attn(model, p, 0.0), min(n, a.batch))
        run.say(f"sol_attn calibration: {len(sol_z)} self-attention calls recorded (dense run, first batch)")
    sol_cal = {}

    precisions = a.precisions.split(",")
    configs = [("sparse_topk", 0.0, 0.0, "bf16")] if "sparse_topk" in methods else []
    configs += [(m, s, st, p) for st in starts for s in sparsities for m in SPARSE_METHODS if m in methods
                for p in (precisions if m != "sol_attn" else ["bf16"])]
    for method, s, start, prec in configs:
        target = keep_count_share(b.nkv, s)             # SALAD's kept key-block share at this length
        extra = dict(kept_share=target)
        if prec != "bf16":
            extra["precision"] = prec
        probe = None
        if method in ("sparse_topk", "sparse_window"):
            opts = PatchOptions(sparsity=s, pattern=method.split("_")[1], start_percent=start, backend=a.backend,
                                precision=prec)
            m = apply_salad(model, opts)
            probe = SaladProbe()
        elif method == "salad_calibrated":
            sw, path = pick_weights(files, s)
            pattern = a.salad_pattern or sw.metadata.get("pattern") or "topk"
            opts = PatchOptions(sparsity=s, pattern=pattern, start_percent=start, backend=a.backend,
                                precision=prec)
            m = apply_salad(model, opts, SALADWeightsLoader.wrap(sw))
            probe = SaladProbe(copy.deepcopy(sw).to(dev))   # fp32 copy: the patched model's copy stays as loaded
            extra.update(weights=Path(path).name, pattern=pattern, weights_sparsity=sw.metadata.get("sparsity"))
        else:  # sol_attn
            patch, sol_cal[f"{s}@{start}"] = b.sol_patch(sol_z, s, start)
            m = apply_sol_attn(model, patch, start)
        raw, sec = b.timed(lambda: b.sample(m, probe))
        calls = sum(probe.calls.values()) if probe is not None else patch.calls
        if calls == 0 and s > 0:
            run.say(f"WARNING: {method} s={s} start={start} never ran sparse attention (all calls dense)")
        if probe is not None:
            extra["salad_calls"] = calls
            if method == "salad_calibrated":
                extra["gates"] = probe.gates()
        else:
            extra.update(sol_extra(patch, target))
        evaluate(method, s, start, raw, sec, extra)
        m = None       # the patched clone goes before the next one is made

    dense_repeat = b.dense_repeat_check()
    run.say(f"dense re-run after all methods: min PSNR vs the first dense run {dense_repeat:.2f} dB")
    check = next((r["psnr"] for r in rows if r["method"] == "sparse_topk" and r["sparsity"] == 0.0), None)
    date = dt.datetime.now(dt.timezone.utc)
    res = dict(card=b.card, date=date.isoformat(timespec="seconds"), rows=rows,
               check_sparsity0_psnr=check, check_dense_repeat_psnr=dense_repeat, **b.header(),
               sol_attn_calibration=sol_cal, seconds_total=round(time.perf_counter() - t_start, 1),
               notes=("psnr/ssim vs the dense video of the same prompt and noise, mean over pairs (per-pair PSNR "
                      f"capped at {PSNR_CAP:g} dB); kept_share: key-block share attended exactly (SALAD: "
                      "keep_count/blocks of 128 tokens; sol_attn: measured with comfy_kitchen's routing rule on "
                      "its own q, k, 64-token blocks, diagonal included)"))
    tag = "smoke" if a.smoke else b.card.replace(" ", "-")
    stem = f"quality-{date.date().isoformat()}-{tag}"
    text = json.dumps(res, indent=2)
    (run.out / f"{stem}.json").write_text(text)
    (run.out / "latest-quality.json").write_text(text)
    png = write_figure(figure, run.out / f"{stem}.png", b.captions[0], a.image_sparsity)
    run.say(f"sparsity-0 check: PSNR vs dense {check} dB; total {res['seconds_total']} s")
    run.say(f"wrote {run.out / (stem + '.json')}, latest-quality.json, {png.name if png else 'no figure'}")
    (run.out / f"{stem}.log").write_text("\n".join(run.lines) + "\n")
    shutil.rmtree(b.tmp, ignore_errors=True)
    return res


def keep_count_share(nkv: int, s: float) -> float:
    from salad_pack.kernels import keep_count
    return keep_count(nkv, s) / nkv


def sol_extra(patch, target) -> dict:
    return dict(tau=patch.tau, extra_tokens=patch.extra_tokens, target_share=target, kept_share=patch.kept_share,
                sol_calls=patch.calls, declined=dict(patch.declined), kernel_vs_eager=patch.eager_check)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def say_row(run: Run, row: dict, seconds: float, label: str | None = None):
    fmt = _fmt
    run.say(f"{label or row['method']:<17} s={row['sparsity']:<5} start={row['start_percent']:<4} "
            f"PSNR {fmt(row['psnr'])} dB  SSIM {fmt(row['ssim'])}  adherence {row['adherence']:.3f}  "
            f"kept {fmt(row.get('kept_share'))}  {seconds:.1f}s")


# ----------------------------------------------------------------------------------------------
# --sweep: quality over the settings grid + attention-op speed at Wan2.1-1.3B 480p -> sweep.json
# ----------------------------------------------------------------------------------------------

# Attention share of a dense Wan2.1-1.3B 480p forward (81 frames, 32,760 tokens), measured on the H100
# (benchmarks/results/2026-11-27-e2e-nvidia_h100_80gb_hbm3-after-cleanup.log): the dense forward took
# 574.2 ms and one SDPA self-attention call 12.17 ms, 30 calls = 365 ms -> a = 0.636.  Check: SALAD topk
# 0.9 with weights ran the call in 2.42 ms (5.03x); the model below predicts 1 / (0.364 + 0.636 / 5.03) =
# 2.04x for the forward, measured 2.00x (the estimate is ~2% optimistic).  H200 (2026-11-28 e2e and
# kernels-quick logs): 30 x 11.59 ms of a 551.9 ms forward = 0.630; the SALAD layer at 5.17x predicts
# 2.03x, measured 2.04x.  The op speed-ups timed by the sweep are the same kind ("layer": selection,
# layout, sparse kernel, linear branch + Proj with weights).  FLOPs give a similar 0.70:
# 2 L^2 d = 3.3 TMAC of self-attention vs 1.42 TMAC of projections, cross-attention and FFN.
ATTN_SHARE_1P3B_480P = 0.636
TIME_SHAPE = "1,12,32760,128"        # B, H, L, D of one Wan2.1-1.3B 480p self-attention call
TIME_GRID = "21,30,52"               # its latent token grid (frames, rows, cols)
SMOKE_TIME_SHAPE, SMOKE_TIME_GRID = "1,2,512,64", "2,16,16"


def step_speedup(attn_speedup: float, attn_share: float, dense_fraction: float = 0.0) -> float:
    """Speed-up of one sampler step when the attention op of the sparse blocks runs ``attn_speedup``
    times faster, attention is ``attn_share`` of the dense step and ``dense_fraction`` of the blocks
    stay dense: 1 / ((1 - a) + a * (f + (1 - f) / s))."""
    a, f = attn_share, dense_fraction
    return 1.0 / ((1.0 - a) + a * (f + (1.0 - f) / attn_speedup))


def e2e_speedup(attn_speedup: float, attn_share: float, dense_fraction: float, dense_steps: float) -> float:
    """Speed-up of a whole sampling run whose first ``dense_steps`` share of steps is dense
    (start_percent): 1 / (ds + (1 - ds) / step_speedup)."""
    return 1.0 / (dense_steps + (1.0 - dense_steps) / step_speedup(attn_speedup, attn_share, dense_fraction))


def timed_ms(fn, reps: int) -> list:
    """Milliseconds of each of ``reps`` calls of fn() (CUDA events on the GPU, perf_counter on the CPU)."""
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(reps):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def _cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() after ``warmup`` untimed calls (see timed_ms)."""
    for _ in range(warmup):
        fn()
    return float(torch.tensor(timed_ms(fn, reps)).median())


def attention_speed_table(a, run: Run, sparsities, combos, device) -> dict:
    """Milliseconds of one self-attention call at ``--time-shape`` (Wan2.1-1.3B 480p): dense (SDPA on
    the (B, L, H*D) tensors ComfyUI passes, with its transposes), SALAD's salad_self_attention for every
    sparsity x (pattern, compensation, weights) in ``combos`` (weights: a random Proj 1536x1536 and gate,
    so the linear branch and the Proj GEMM are timed), and comfy_kitchen's sol_attn with tau calibrated on the same
    inputs to SALAD's kept share at each sparsity (and at the node's defaults)."""
    from salad_pack.kernels import keep_count, num_blocks
    from salad_pack.salad_core.attention import SaladConfig, salad_self_attention
    B, H, L, D = (int(v) for v in a.time_shape.split(","))
    grid = tuple(int(v) for v in a.time_grid.split(","))
    if grid[0] * grid[1] * grid[2] != L:
        raise ValueError(f"--time-grid {grid} holds {grid[0] * grid[1] * grid[2]} tokens, --time-shape says L={L}")
    dt_ = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, L, H * D, device=device, dtype=dt_, generator=g) for _ in range(3))
    x = torch.randn(B, L, H * D, device=device, dtype=dt_, generator=g)
    proj = torch.nn.Linear(H * D, H * D).to(device, dt_)
    gate = torch.nn.Linear(H * D, 1).to(device, dt_)
    reps = 10 if device.type == "cuda" else 2

    def sdpa():
        qh, kh, vh = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(B, L, H * D)

    nkv = num_blocks(L)
    table = dict(shape=dict(B=B, H=H, L=L, D=D, grid=list(grid)), dtype=str(dt_), device=str(device),
                 dense_ms=None, salad=[], sol_attn=[], notes=(
                     "median of CUDA-event timings; SALAD: salad_self_attention with backend auto (Triton on "
                     "CUDA): selection, tile layout, sparse kernel (+ centroids), with weights the ReLU linear "
                     "branch, Proj and gate; inputs random (SALAD's cost depends on the kept count only)"))
    with torch.inference_mode():
        table["dense_ms"] = _cuda_ms(sdpa, reps=reps)
        run.say(f"speed table at {table['shape']}: SDPA {table['dense_ms']:.3f} ms")
        for s in sparsities:
            for pattern, comp, w in combos:
                cfg = SaladConfig(sparsity=s, pattern=pattern, backend=a.backend, compensation=comp)
                kw = dict(x=x, proj=proj, gate=gate) if w else {}
                try:
                    ms = _cuda_ms(lambda: salad_self_attention(q, k, v, H, grid=grid, config=cfg, **kw),
                                  reps=reps)
                    err = None
                except Exception as e:  # noqa: BLE001 - one failing entry must not end the sweep
                    ms, err = None, f"{type(e).__name__}: {e}"
                table["salad"].append(dict(sparsity=s, pattern=pattern, compensation=comp, weights=w,
                                           kept_share=keep_count(nkv, s) / nkv, ms=ms, error=err,
                                           speedup=None if ms is None else table["dense_ms"] / ms))
                run.say(f"  salad s={s} {pattern} {comp} weights={w}: " +
                        (f"{ms:.3f} ms, {table['dense_ms'] / ms:.2f}x" if ms else f"failed ({err})"))
        table["sol_attn"] = sol_speed(a, run, q, k, v, (B, L, H, D), sparsities, table["dense_ms"], reps)
    return table


def sol_speed(a, run: Run, q, k, v, shape, sparsities, dense_ms, reps) -> list:
    """comfy_kitchen sol_attn timings at the speed-table shape (CUDA only)."""
    from salad_pack.kernels import keep_count, num_blocks
    from sol_attn_peer import NODE_DEFAULTS, calibrate_tau, import_kitchen, routed_share, routing_scores
    B, L, H, D = shape
    ck = import_kitchen() if q.is_cuda or a.sol_eager else None      # --sol-eager: CPU eager reference (tests)
    if ck is None or (q.is_cuda and not ck.sol_attn_is_available(q.device)):
        run.say("  sol_attn speed: skipped (comfy_kitchen or its CUDA kernel not available)")
        return []
    qs, ks, vs = (t.view(B, L, H, D).contiguous() for t in (q, k, v))
    z = routing_scores(qs, ks)
    nkv = num_blocks(L)
    entries = [(s, calibrate_tau([z], keep_count(nkv, s) / nkv), 0) for s in sparsities]
    entries.append((None, NODE_DEFAULTS["tau"], NODE_DEFAULTS["extra_tokens"]))
    out = []
    for s, tau, aug in entries:
        ms, err, used = None, None, L
        # a length that is not a multiple of its 64-token block may be refused: then time the longest one that is
        for n in dict.fromkeys((L, L - L % 64)):
            try:
                ms = _cuda_ms(lambda: ck.sol_attn(qs[:, :n], ks[:, :n], vs[:, :n], tau=tau, topk_ratio=0.0,
                                                  token_aug=aug), reps=reps)
                used, err = n, None
                break
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
        if ms is not None and used != L:
            ms *= (L / used) ** 2          # attention cost grows as L^2
        share = routed_share(z, tau)
        out.append(dict(sparsity=s, tau=tau, extra_tokens=aug, kept_share=share, ms=ms, error=err, length_used=used,
                        speedup=None if ms is None else dense_ms / ms))
        run.say(f"  sol_attn {'default' if s is None else f's={s}'} tau={tau:.3f} aug={aug} share={share:.4f}: "
                + (f"{ms:.3f} ms, {dense_ms / ms:.2f}x" if ms else f"failed ({err})"))
    return out


def speed_for(table: dict, row: dict):
    """Attention-op speed-up of a sweep row from the speed table (None when not measured).  sol_attn:
    interpolated in op time over the kept shares of the table's tau points (its testbed kept share)."""
    if table is None:
        return None
    if row["method"].startswith("sol_attn"):
        pts = sorted((e["kept_share"], e["ms"]) for e in table["sol_attn"] if e["ms"] and not e["extra_tokens"])
        share = row.get("kept_share") or row.get("target_share")
        if not pts or share is None:
            return None
        xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        if len(pts) == 1:
            ms = float(ys[0])
        else:
            i = int(torch.searchsorted(xs, torch.tensor([share], dtype=torch.float64)).clamp(1, len(pts) - 1))
            t = (share - float(xs[i - 1])) / max(float(xs[i] - xs[i - 1]), 1e-12)
            ms = float(ys[i - 1] + t * (ys[i] - ys[i - 1]))
        return table["dense_ms"] / ms if ms > 0 else None
    for e in table["salad"]:
        if (e["sparsity"] == row["sparsity"] and e["pattern"] == row["pattern"]
                and e["compensation"] == row["compensation"] and e["weights"] == bool(row["weights"])):
            return e["speedup"]
    return None


def sweep_configs(a, sparsities, starts, blocks: int, have_weights: bool, have_sol: bool) -> list:
    """The sweep's configurations in priority order (a run that reaches --budget-s skips the rest).

    Not the full product (3 sparsities x 3 starts x 2 patterns x 2 compensations x 2 weights x 2 dense
    first/last = 144 runs, ~6 min on the H200): every curve of the plot is sparsity x start_percent
    (9 points) for
      1. sparse topk, no compensation       the product without weights today
      2. sparse topk + centroid             issue 12 item 1
      3. salad_calibrated topk              with weights
      4. sol_attn at SALAD's kept share     core's method at matched density
      5. sol_attn at its node defaults      (tau 1.3, 256 extra tokens; start 0.2 as the node, and 0)
      6. dense first/last block             topk without weights at 0.9 and 0.95, with at 0.9; start 0 and 0.2
      7. sparse window                      the static pattern (lost to topk everywhere so far)
      8. salad_calibrated + centroid        item 3: weights and compensation composed
    Window + centroid and window + weights are left out (window trails topk by 1-4 dB at every point of
    the last run; its speed is the same as topk's), and so are dense first/last at 0.8."""
    sp = [s for s in sparsities if s > 0]
    grid = [(s, st) for st in starts for s in sp]
    last = (0, blocks - 1)
    c = [dict(method="sparse", pattern="topk", compensation="none", sparsity=0.0, start_percent=0.0)]

    def curve(**kw):
        return [dict(kw, sparsity=s, start_percent=st) for s, st in grid]
    c += curve(method="sparse", pattern="topk", compensation="none")
    c += curve(method="sparse", pattern="topk", compensation="centroid")
    if have_weights:
        c += curve(method="salad_calibrated", pattern="topk", compensation="none")
    if have_sol:
        c += curve(method="sol_attn", pattern="sol", compensation="none")
        c += [dict(method="sol_attn_default", pattern="sol", compensation="none", sparsity=None, start_percent=st)
              for st in sorted({0.2, 0.0} & set(starts) or {starts[-1]}, reverse=True)]
    hi = [s for s in sp if s >= 0.9] or sp[-1:]
    ends = sorted({min(starts), max(starts)})
    c += [dict(method="sparse", pattern="topk", compensation="none", sparsity=s, start_percent=st, dense_blocks=last)
          for st in ends for s in hi]
    if have_weights:
        c += [dict(method="salad_calibrated", pattern="topk", compensation="none", sparsity=hi[0], start_percent=st,
                   dense_blocks=last) for st in ends]
    c += curve(method="sparse", pattern="window", compensation="none")
    if have_weights:
        c += curve(method="salad_calibrated", pattern="topk", compensation="centroid")
    for x in c:
        x.setdefault("dense_blocks", ())
        x["weights"] = x["method"] == "salad_calibrated"
    return c


def sweep(a, run: Run):
    """--sweep: see sweep_configs and attention_speed_table; writes sweep.json (after every config, so a
    stopped run keeps what it measured) and sweep.png."""
    t_start = time.perf_counter()
    b = Bench(a, run)
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.nodes.patch import PatchOptions, apply_salad
    from sol_attn_peer import apply_sol_attn
    model, n = b.model, b.n
    sparsities = [float(s) for s in a.sparsities.split(",")]
    starts = [float(s) for s in a.starts.split(",")]
    files = load_weight_files(b.weights_spec)
    have_sol = b.sol_usable(["sol_attn"])
    blocks = len(model.get_model_object("diffusion_model").blocks)
    configs = sweep_configs(a, sparsities, starts, blocks, bool(files), have_sol)
    run.say(b.describe(sorted({c["method"] for c in configs})) + f"; {len(configs)} sweep configs, "
            f"budget {a.budget_s:.0f} s")
    if not files:
        run.say("salad_calibrated left out: no weights (give --weights)")

    speed = None
    if not a.no_timing:
        t0 = time.perf_counter()
        combos = sorted({(c["pattern"], c["compensation"], c["weights"]) for c in configs if c["pattern"] != "sol"})
        try:
            speed = attention_speed_table(a, run, [s for s in sparsities if s > 0], combos, b.dev)
        except Exception as e:  # noqa: BLE001 - quality rows are still worth having
            run.say(f"speed table failed: {type(e).__name__}: {e}")
        run.say(f"speed table: {time.perf_counter() - t0:.1f} s")

    b.dense_raw, sec = b.timed(lambda: b.sample(model))
    run.say(f"dense: {sec:.1f} s")
    sol_z = b.record_sol(lambda p: apply_sol_attn(model, p, 0.0), min(n, a.batch)) if have_sol else []
    # self-attention calls per block in a run with every step sparse: steps x sampler calls per step; the
    # sparsity-0 config (all steps sparse) measures it, in case cond and uncond are not batched together
    calls_per_block = [a.steps * len(b.batches())]

    rows, skipped = [], []
    out_json = run.out / "sweep.json"

    def write():
        res = dict(card=b.card, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **b.header(),
                   rows=rows, skipped=skipped, speed=speed, attn_share=a.attn_share,
                   weights=[Path(p).name for _, p in files], budget_s=a.budget_s,
                   seconds_total=round(time.perf_counter() - t_start, 1), notes=SWEEP_NOTES)
        out_json.write_text(json.dumps(res, indent=2))
        return res

    for cfg in configs:
        if time.perf_counter() - t_start > a.budget_s:
            skipped.append(cfg)
            continue
        method, s, start = cfg["method"], cfg["sparsity"], cfg["start_percent"]
        probe, patch = None, None
        extra = dict(kept_share=None if s is None else keep_count_share(b.nkv, s))
        if method.startswith("sol_attn"):
            if method == "sol_attn_default":
                patch, cal = b.sol_patch(sol_z, 0.9, start, tau=NODE_DEFAULTS_TAU, extra_tokens=256)
            else:
                patch, cal = b.sol_patch(sol_z, s, start)
            extra.update(calibration=cal)
            m = apply_sol_attn(model, patch, start)
        else:
            opts = PatchOptions(sparsity=s, pattern=cfg["pattern"], start_percent=start, backend=a.backend,
                                compensation=cfg["compensation"], dense_blocks=frozenset(cfg["dense_blocks"]))
            wp = None
            if cfg["weights"]:
                sw, path = pick_weights(files, s)
                wp = SALADWeightsLoader.wrap(sw)
                extra.update(weights_file=Path(path).name, weights_sparsity=sw.metadata.get("sparsity"))
            m = apply_salad(model, opts, wp)
            probe = SaladProbe()
        try:
            raw, sec = b.timed(lambda: b.sample(m, probe))
        except Exception as e:  # noqa: BLE001 - record and go on
            run.say(f"FAILED {cfg}: {type(e).__name__}: {e}")
            skipped.append(dict(cfg, error=f"{type(e).__name__}: {e}"))
            continue
        if patch is not None:
            extra.update(sol_extra(patch, extra["kept_share"]))
            calls, per_step = patch.calls, blocks
        else:
            calls, per_step = sum(probe.calls.values()), blocks - len(cfg["dense_blocks"])
        if s == 0.0 and not cfg["dense_blocks"] and calls:
            calls_per_block[0] = calls / per_step
        sparse_steps = min(1.0, calls / max(1.0, per_step * calls_per_block[0]))
        row = dict(cfg, dense_blocks=list(cfg["dense_blocks"]), **b.metrics_row(*b.compare(raw)),
                   seconds=round(sec, 2), sparse_step_share=round(sparse_steps, 4), **extra)
        if method == "sol_attn_default":
            row["sparsity"] = None if row["kept_share"] is None else round(1 - row["kept_share"], 4)
        row["attn_speedup"] = None if s == 0.0 else speed_for(speed, row)
        dense_fraction = len(cfg["dense_blocks"]) / blocks
        row["dense_fraction"] = dense_fraction
        row["e2e_speedup_est"] = (None if row["attn_speedup"] is None else
                                  e2e_speedup(row["attn_speedup"], a.attn_share, dense_fraction, 1 - sparse_steps))
        rows.append(row)
        label = f"{method}/{cfg['pattern']}/{cfg['compensation']}" + ("/dense0,last" if cfg["dense_blocks"] else "")
        say_row(run, row, sec, label=label)
        write()
        m = None
    if skipped:
        run.say(f"budget: {len(skipped)} configs skipped or failed (listed in sweep.json 'skipped')")
    res = write()
    run.say(f"wrote {out_json} ({len(rows)} rows, {res['seconds_total']} s)")
    try:
        from plot_quality import plot_sweep
        png = plot_sweep(res, run.out / "sweep.png")
        run.say(f"wrote {png}")
    except Exception as e:  # noqa: BLE001 - the json is the result; the plot can be redrawn from it
        run.say(f"plot failed ({type(e).__name__}: {e}); redraw: python benchmarks/plot_quality.py {out_json}")
    (run.out / "sweep.log").write_text("\n".join(run.lines) + "\n")
    shutil.rmtree(b.tmp, ignore_errors=True)
    return res


NODE_DEFAULTS_TAU = 1.3
SWEEP_NOTES = (
    "psnr/ssim: decoded testbed videos vs the dense video of the same pair and noise (mean over pairs). "
    "attn_speedup: dense SDPA ms / method ms of one self-attention call at speed.shape (Wan2.1-1.3B 480p) "
    "on this GPU (SALAD rows: the same sparsity/pattern/compensation/weights; sol_attn rows: interpolated "
    "at the row's kept_share between sol_attn timings whose tau was calibrated on the timing inputs; the "
    "256 extra tokens of the node default, 0.8% of the keys, are not timed). e2e_speedup_est = "
    "1 / (ds + (1 - ds) / step), step = 1 / ((1 - a) + a (f + (1 - f) / attn_speedup)), a = attn_share "
    "(attention share of a dense 1.3B 480p step), f = dense_fraction (dense blocks / blocks, as on the "
    "testbed: 2 of 6, so the estimate is what the same fraction costs at 1.3B), ds = 1 - sparse_step_share "
    "(steps the start_percent window keeps dense, counted from the sparse calls made). The testbed has "
    "4,096 tokens: speed is not measured on it.")


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
