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

import comfy.model_management as mm
import folder_paths

from ..salad_core.options import DEFAULT_PATTERN, DEFAULT_SPARSITY, PATTERNS
from .loader import SALAD_WEIGHTS
from .paths import FOLDER_NAME
from .patch import PatchOptions, apply_salad, wan_model_info

log = logging.getLogger("SALAD")


def _unique_path(prefix: str) -> str:
    folder = folder_paths.get_folder_paths(FOLDER_NAME)[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix).strip("._") or "salad"
    n = 1
    while True:
        path = os.path.join(folder, f"{safe}_{n:05d}.safetensors")
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
    def INPUT_TYPES(cls):
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
            "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1.0, "step": 1e-4,
                                        "tooltip": "AdamW learning rate (warm-up, then cosine decay)."}),
            "filename_prefix": ("STRING", {"default": "salad_wan",
                                           "tooltip": "Saved as models/salad/<prefix>_NNNNN.safetensors."}),
        }}

    def train(self, model, positive, negative, latent_image, seed, record_steps, cfg, sampler_name, scheduler,
              sparsity, pattern, samples_per_block, train_steps, learning_rate, filename_prefix):
        import comfy.sample
        import comfy.utils
        import torch
        from ..salad_core.trainer import SampleStore, capture
        from ..salad_core.weights import SaladWeights

        info = wan_model_info(model, "SALAD Train Weights")
        latent = latent_image["samples"]
        self._check_memory(model, info, latent, positive, negative, cfg, samples_per_block)
        patched = apply_salad(model, PatchOptions(sparsity=sparsity, pattern=pattern))

        latent = comfy.sample.fix_empty_latent_channels(patched, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        every = max(1, record_steps // samples_per_block)
        store = SampleStore(max_per_block=samples_per_block, dtype=torch.float16, device="cpu")
        pbar = comfy.utils.ProgressBar(record_steps + train_steps * info["num_blocks"])
        done = [0]

        def on_step(step, x0, x, total_steps):
            done[0] += 1
            pbar.update_absolute(done[0])

        with capture(store, every=every):
            comfy.sample.sample(patched, noise, record_steps, cfg, sampler_name, scheduler, positive, negative,
                                latent, denoise=1.0, noise_mask=latent_image.get("noise_mask"), callback=on_step,
                                disable_pbar=True, seed=seed)
        if len(store) == 0:
            raise RuntimeError("SALAD Train Weights: no self-attention call was recorded; is this a Wan model and "
                               "is the latent at least one 128-token block?")
        # ComfyUI runs nodes under inference_mode; training needs autograd and normal tensors
        with torch.inference_mode(False), torch.enable_grad():
            for smp in store.samples:
                for key in ("q", "k", "v", "x"):
                    if smp.get(key) is not None:
                        smp[key] = smp[key].clone()
            weights = SaladWeights.new(dim=info["dim"], heads=info["heads"], num_blocks=info["num_blocks"],
                                       base_model=info["base_model"], pattern=pattern, sparsity=sparsity,
                                       created_by="ComfyUI SALAD Train Weights")
            return self._train(weights, store, info, seed, record_steps, cfg, sampler_name, scheduler, sparsity,
                               pattern, train_steps, learning_rate, filename_prefix, latent, pbar, done)

    @staticmethod
    def _check_memory(model, info, latent, positive, negative, cfg, samples_per_block):
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

    def _train(self, weights, store, info, seed, record_steps, cfg, sampler_name, scheduler, sparsity, pattern,
               train_steps, learning_rate, filename_prefix, latent, pbar, done):
        from ..salad_core.trainer import keep_improved_blocks, relative_error, train_salad, training_report
        from ..salad_core.weights import save_salad_weights

        train_set, holdout = store.split(0.25, seed=seed % 2**31)
        device = mm.get_torch_device()
        weights.to(device)

        def on_train(d):
            done[0] = record_steps + d["block"] * train_steps + d["step"]
            pbar.update_absolute(min(done[0], record_steps + train_steps * info["num_blocks"]))

        res = train_salad(train_set, weights, steps=train_steps, lr=learning_rate, sparsity=sparsity,
                          pattern=pattern, log_every=max(1, train_steps // 20), callback=on_train,
                          seed=seed % 2**31, tokens_per_step=4096, device=device,
                          training_data=f"{len(train_set)} calls recorded in ComfyUI, latent {tuple(latent.shape)}, "
                                        f"{record_steps} steps, {sampler_name}/{scheduler}, cfg {cfg}")
        if len(holdout):
            heldout = relative_error(holdout, weights, device=device)  # sparse-only and trained, per block
        else:  # nothing could be held out: nothing can be shown to help
            heldout = dict(sparse_only=0.0, salad=0.0, n=0, per_sample=[], sample_blocks=[], per_block={})
        weights.to("cpu")
        result = keep_improved_blocks(weights, heldout, trained_blocks=res["blocks"])
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
