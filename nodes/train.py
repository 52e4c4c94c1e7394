"""SALAD Train Weights node: make SALAD gate/Proj weights for the loaded model from your own prompts.

No public SALAD weights exist.  This node samples once with the model patched to sparse-only SALAD,
records the self-attention inputs of every block (q, k, v after Wan's norm and RoPE, and the block
input), then distils each block's Proj and gate so that O_sparse + G * Proj(O_linear) matches dense
attention on those inputs (salad_core.trainer).  It reports the held-out error against dense
attention before (sparse-only) and after training, per block.  Only blocks whose held-out error went
down keep their trained weights (the others run sparse-only); when none did, it says so plainly and
saves nothing.  Before sampling it checks that the recordings fit in free RAM.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import comfy.model_management as mm
import folder_paths

from ..salad_core.options import DEFAULT_PATTERN, DEFAULT_SPARSITY, PATTERNS
from .loader import SALAD_WEIGHTS
from .patch import PatchOptions, apply_salad, wan_model_info
from .paths import FOLDER_NAME

if TYPE_CHECKING:
    import torch
    from comfy.model_patcher import ModelPatcher

    from ..salad_core.attention import SaladConfig
    from ..salad_core.trainer import SampleStore, TrainConfig

log = logging.getLogger("SALAD")

#: the proj_rank input's tooltip (SALAD Train Weights; SALAD Fine-tune adds that init_weights' rank wins)
PROJ_RANK_TOOLTIP = ("0 = full dim x dim Proj; r > 0 = rank-r Proj, ~dim/(2r) times cheaper, see README "
                     "(e.g. 256 for Wan 14B's dim 5120: ~10x cheaper; r >= dim means full).")


def _safe(prefix: str) -> str:
    """``prefix`` as a file-name stem: characters other than letters, digits, ``-_.`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(prefix)).strip("._") or "salad"


def _unique_path(prefix: str, folder_name: str = FOLDER_NAME, tag: str = "") -> str:
    """models/<folder_name>/<prefix><tag>_NNNNN.safetensors, the first name not taken."""
    folder = folder_paths.get_folder_paths(folder_name)[0]
    stem = _safe(prefix) + tag
    n = 1
    while True:
        path = os.path.join(folder, f"{stem}_{n:05d}.safetensors")
        if not os.path.exists(path):
            return path
        n += 1


class SALADTrainWeights:
    DESCRIPTION = ("Makes SALAD weights for this model: samples once with sparse-only SALAD while recording each "
                   "block's attention inputs, then trains every block's linear-branch projection and gate to "
                   "match dense attention. Keeps the trained weights only for blocks where they lower the held-out "
                   "error against dense attention (the rest run sparse-only), saves them to models/salad and "
                   "reports before and after; when no block improves it warns and saves nothing. Use a short, "
                   "low-resolution latent: the recorded activations are kept in CPU memory (checked before "
                   "sampling).")
    CATEGORY = "model/patch/SALAD"
    RETURN_TYPES = (SALAD_WEIGHTS, "STRING")
    RETURN_NAMES = ("salad_weights", "report")
    OUTPUT_TOOLTIPS = ("The trained weights (also saved to models/salad), only for the blocks where they beat "
                       "sparse-only attention on held-out recordings. Nothing (sparse-only) when no block "
                       "improved; then no file is saved either.",
                       "Held-out relative error vs dense attention, sparse-only vs trained SALAD, overall and "
                       "per block, and which blocks kept their trained weights.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        import comfy.samplers  # imported here: it pulls in torchsde, which the pack itself never needs
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Wan model to make weights for (the same one you will apply "
                                           "SALAD to, LoRAs included)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompts to record activations with; varied prompts generalise "
                                                     "better (batch several)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt, as in your normal sampling."}),
            "latent_image": ("LATENT", {"tooltip": "An empty video latent; the resolution and length the weights are "
                                                   "tuned on. Keep it small: memory grows with tokens x blocks x "
                                                   "recorded steps."}),
            # Fixed seed, no "control after generate" widget: the frontend's default for an INT named
            # seed is "randomize", which would retrain and write a new file on every Run.
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "Noise seed of the recording run and of the training. Fixed on purpose: "
                                        "with unchanged inputs ComfyUI does not retrain on the next Run; change "
                                        "it by hand for a new run."}),
            "record_steps": ("INT", {"default": 8, "min": 1, "max": 100,
                                     "tooltip": "Sampling steps of the recording run."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1,
                              "tooltip": "CFG of the recording run."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampler of the recording run."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple",
                                                               "tooltip": "Scheduler of the recording run."}),
            "sparsity": ("FLOAT", {"default": DEFAULT_SPARSITY, "min": 0.0, "max": 0.99, "step": 0.01,
                                   "display": "slider",
                                   "tooltip": "Sparsity to tune the weights for (use the value you will run)."}),
            "pattern": (list(PATTERNS), {"default": DEFAULT_PATTERN,
                                         "tooltip": "Sparse pattern to tune the weights for."}),
            "samples_per_block": ("INT", {"default": 4, "min": 2, "max": 64,
                                          "tooltip": "Recorded calls kept per block (spread over the run); a "
                                                     "quarter are held out to measure the result."}),
            "train_steps": ("INT", {"default": 200, "min": 1, "max": 100000,
                                    "tooltip": "Optimiser steps per block."}),
            "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1.0, "step": 1e-6,
                                        "tooltip": "AdamW learning rate (warm-up, then cosine decay)."}),
            "filename_prefix": ("STRING", {"default": "salad_wan",
                                           "tooltip": "Saved as models/salad/<prefix>_NNNNN.safetensors."}),
        }, "optional": {
            "proj_rank": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": PROJ_RANK_TOOLTIP}),
        }}

    def train(self, model: ModelPatcher, positive: list, negative: list, latent_image: dict, seed: int,
              record_steps: int, cfg: float, sampler_name: str, scheduler: str, sparsity: float, pattern: str,
              samples_per_block: int, train_steps: int, learning_rate: float, filename_prefix: str,
              proj_rank: int = 0) -> dict:
        from ..salad_core.attention import SaladConfig
        from ..salad_core.trainer import TrainConfig

        info = wan_model_info(model, "SALAD Train Weights")
        self._check_memory(model, info, latent_image["samples"], positive, negative, cfg, samples_per_block)
        run = _RecordRun(seed, record_steps, cfg, sampler_name, scheduler)
        progress = _Progress(record_steps, train_steps, info["num_blocks"])
        options = PatchOptions(sparsity=sparsity, pattern=pattern)
        store, latent = _record(model, positive, negative, latent_image, run, options, samples_per_block, progress)
        attention = SaladConfig(sparsity=sparsity, pattern=pattern)
        train = TrainConfig(steps=train_steps, lr=learning_rate, log_every=max(1, train_steps // 20),
                            seed=seed % 2**31, tokens_per_step=4096, proj_rank=proj_rank)
        result = _train_and_select(store, info, attention, train, progress,
                                   source=f"recorded in ComfyUI, latent {tuple(latent.shape)}, {run}")
        return self._output(result, sparsity, pattern, filename_prefix)

    @staticmethod
    def _check_memory(model: ModelPatcher, info: dict, latent: torch.Tensor, positive: list, negative: list,
                      cfg: float, samples_per_block: int) -> None:
        """Refuse before sampling when the recordings would not fit in free RAM (they stay on the CPU)."""
        import math

        import psutil

        from ..salad_core.trainer import check_recording_memory

        if latent.ndim != 5:
            return  # not a video latent; wan_model_info / sampling will say what is wrong
        dm = model.model.diffusion_model
        patch = tuple(getattr(dm, "patch_size", (1, 2, 2)))
        # cond and uncond (and several prompts) may be batched into one call: count every row
        n_cond = len(positive) + (0 if math.isclose(cfg, 1.0) else len(negative))
        batch = int(latent.shape[0]) * max(1, n_cond)
        on_cpu = mm.get_torch_device().type == "cpu"
        vae = (4, 16, 16) if latent.shape[1] == 48 else (4, 8, 8)  # Wan 2.2 5B's VAE compresses 16x
        plan = check_recording_memory(tuple(latent.shape[2:]), patch, info["dim"], info["num_blocks"],
                                      samples_per_block, batch, psutil.virtual_memory().available,
                                      train_on_cpu=on_cpu, vae_scale=vae)
        if not plan["ok"]:
            log.warning(plan["message"])
            raise MemoryError(plan["message"])
        log.info("SALAD Train Weights: recordings need about %.2f GiB of RAM (%.1f GiB free to use)",
                 plan["need"] / 2**30, plan["usable"] / 2**30)

    @staticmethod
    def _output(result: dict, sparsity: float, pattern: str, filename_prefix: str) -> dict:
        """Save the kept weights (if any), log the report and return both."""
        from ..salad_core.trainer import training_report
        from ..salad_core.weights import save_salad_weights

        path = None
        if result["weights"] is not None:
            path = save_salad_weights(result["weights"], _unique_path(filename_prefix))
        lines = training_report(result, sparsity, pattern, saved_path=path)
        for level, line in lines:
            (log.warning if level == "warning" else log.info)("SALAD Train Weights: %s", line)
        report = "\n".join(line for _level, line in lines)
        patcher = None
        if result["weights"] is not None:
            from .loader import SALADWeightsLoader
            patcher = SALADWeightsLoader.wrap(result["weights"])
        # None = no weights: Apply SALAD Attention's optional salad_weights then runs sparse-only
        return {"ui": {"text": [report]}, "result": (patcher, report)}


@dataclass(frozen=True)
class _RecordRun:
    """Sampling settings of the recording run."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str

    def __str__(self) -> str:
        return f"{self.steps} steps, {self.sampler_name}/{self.scheduler}, cfg {self.cfg}"


class _Progress:
    """One ComfyUI progress bar over the recording steps, then ``train_steps`` per block."""

    def __init__(self, record_steps: int, train_steps: int, num_blocks: int) -> None:
        import comfy.utils

        self.record_steps, self.train_steps = record_steps, train_steps
        self.total = record_steps + train_steps * num_blocks
        self.bar = comfy.utils.ProgressBar(self.total)
        self.done = 0

    def sampling_step(self, step: int, x0: Any, x: Any, total_steps: int) -> None:
        """comfy.sample callback: one recording step done."""
        self.done += 1
        self.bar.update_absolute(self.done)

    def training_log(self, d: dict) -> None:
        """train_salad callback: ``d["step"]`` steps of block ``d["block"]`` done."""
        self.done = self.record_steps + d["block"] * self.train_steps + d["step"]
        self.bar.update_absolute(min(self.done, self.total))


def _record(model: ModelPatcher, positive: list, negative: list, latent_image: dict, run: _RecordRun,
            options: PatchOptions, samples_per_block: int, progress: _Progress) -> tuple[SampleStore, torch.Tensor]:
    """Sample once with sparse-only SALAD while recording ``samples_per_block`` calls of every block
    (spread over the run).  Returns the SampleStore (fp16, CPU) and the latent that was sampled."""
    import comfy.sample
    import torch

    from ..salad_core.trainer import SampleStore, capture

    patched = apply_salad(model, options)
    latent = comfy.sample.fix_empty_latent_channels(patched, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, run.seed, latent_image.get("batch_index"))
    store = SampleStore(max_per_block=samples_per_block, dtype=torch.float16, device="cpu")
    with capture(store, every=max(1, run.steps // samples_per_block)):
        comfy.sample.sample(patched, noise, run.steps, run.cfg, run.sampler_name, run.scheduler, positive, negative,
                            latent, denoise=1.0, noise_mask=latent_image.get("noise_mask"),
                            callback=progress.sampling_step, disable_pbar=True, seed=run.seed)
    if len(store) == 0:
        raise RuntimeError("SALAD Train Weights: no self-attention call was recorded; is this a Wan model and "
                           "is the latent at least one 128-token block?")
    return store, latent


def _train_and_select(store: SampleStore, info: dict, attention: SaladConfig, train: TrainConfig,
                      progress: _Progress, source: str) -> dict:
    """New zero-init weights for the model, trained and kept per block by salad_core (on ComfyUI's device)."""
    import torch

    from ..salad_core.trainer import train_and_select

    # ComfyUI runs nodes under inference_mode; training needs autograd and normal tensors
    with torch.inference_mode(False), torch.enable_grad():
        for smp in store.samples:
            for key in ("q", "k", "v", "x"):
                if smp.get(key) is not None:
                    smp[key] = smp[key].clone()
        weights = train.fresh_weights(info["dim"], info["heads"], info["num_blocks"], base_model=info["base_model"],
                                      pattern=attention.pattern, sparsity=attention.sparsity,
                                      created_by="ComfyUI SALAD Train Weights")
        return train_and_select(store, weights, train, attention, holdout=0.25, device=mm.get_torch_device(),
                                callback=progress.training_log, source=source)
