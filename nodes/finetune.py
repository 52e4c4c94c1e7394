"""SALAD fine-tuning in ComfyUI (issue 10): "SALAD Save Training Pair" and "SALAD Fine-tune", plus the
Wan wiring and model provider that ``scripts/salad_finetune.py`` (the fine-tuning CLI) uses.

The recipe lives in ``salad_core.finetune`` (no ComfyUI there).  This file only
  * wires a Wan diffusion model (ComfyUI's ``WanModel``) so its self-attention runs SALAD with the
    trainable weights: :func:`salad_wan_hooks` installs ``nodes/patch.py``'s SaladPatch forwards on the
    module for the duration of training (the same code path as Apply SALAD Attention) and restores
    whatever was there before;
  * reads the flow schedule (shift, multiplier) and the latent transform (``process_latent_in``) from
    the ComfyUI model;
  * resolves data folders (relative names live under ComfyUI's output directory).
"""
from __future__ import annotations

import contextlib
import logging
import os
from types import SimpleNamespace

import torch

from ..salad_core.options import DEFAULT_SPARSITY, PATTERNS

log = logging.getLogger("SALAD")

_MISSING = object()
DATA_ROOT = "salad_training"       # relative data folders live in <output>/salad_training/
CKPT_ROOT = "salad_finetune"       # checkpoints: <output>/salad_finetune/<prefix>.ckpt


# ----------------------------------------------------------------------------------------------
# wiring (no ComfyUI import needed: works on any WanModel-like module)
# ----------------------------------------------------------------------------------------------

LORA_LAYERS = ("q", "k", "v", "o")     # the self-attention projections a fine-tune LoRA adapts


def wan_lora_targets(diffusion_model) -> dict:
    """``{"blocks.<i>.self_attn.<q|k|v|o>": (in_features, out_features)}`` of a Wan diffusion model: the
    module paths that ComfyUI's LoRA loader addresses as ``diffusion_model.<path>``."""
    out = {}
    for i, blk in enumerate(diffusion_model.blocks):
        for n in LORA_LAYERS:
            lin = getattr(blk.self_attn, n)
            out[f"blocks.{i}.self_attn.{n}"] = (int(lin.in_features), int(lin.out_features))
    return out


@contextlib.contextmanager
def salad_wan_hooks(diffusion_model, weights, sparsity: float, pattern: str, backend: str = "auto",
                    grad_checkpointing: bool = False, lora=None):
    """Every self-attention block of ``diffusion_model`` runs SALAD (blocks that ``weights`` covers with
    their proj/gate, the others sparse-only, as Apply SALAD Attention does) inside the ``with``; the base
    model is frozen meanwhile.  ``grad_checkpointing``: each transformer block is recomputed in the
    backward pass (salad_core.finetune.checkpointed).  ``lora``: a salad_core.finetune.LoraSet over
    :func:`wan_lora_targets` (or a subset), added to those projections.  Restores the forwards and
    requires_grad flags on exit."""
    from ..salad_core.finetune import checkpointed
    from .patch import PatchOptions, SaladPatch

    dm = diffusion_model
    state = SaladPatch(dm, PatchOptions(sparsity=sparsity, pattern=pattern, backend=backend),
                       SimpleNamespace(model=weights))
    saved = []

    def put(obj, name, value):
        saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    flags = [(p, p.requires_grad) for p in dm.parameters()]
    try:
        put(dm.patch_embedding, "forward", state.make_patch_embedding_forward(dm.patch_embedding.forward))
        for i, blk in enumerate(dm.blocks):
            put(blk.self_attn, "forward", state.make_self_attn_forward(i, blk.self_attn.forward))
            for n in LORA_LAYERS if lora is not None else ():
                path = f"blocks.{i}.self_attn.{n}"
                if path in lora.shapes:
                    lin = getattr(blk.self_attn, n)
                    put(lin, "forward", lora.wrap(path, lin.forward))
            if grad_checkpointing:
                put(blk, "forward", checkpointed(blk.forward))
        for p, f in flags:
            if f:
                p.requires_grad_(False)
        yield state
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)
        for p, f in flags:
            if f and not p.requires_grad:
                try:
                    p.requires_grad_(True)
                except RuntimeError:     # an inference tensor (loaded under ComfyUI's inference_mode)
                    pass                 # stays frozen: ComfyUI never needs its grad


def wan_forward(diffusion_model, state=None):
    """forward(x, timestep, context) of a Wan diffusion model (CONST prediction, as ComfyUI calls it)."""
    def forward(x, t, ctx):
        if state is not None:
            state._fresh_forward = True
        return diffusion_model(x, t, ctx, transformer_options={})
    return forward


# ----------------------------------------------------------------------------------------------
# CLI provider (scripts/salad_finetune.py --provider nodes.finetune:cli_provider)
# ----------------------------------------------------------------------------------------------

def cli_provider(model: str, device, comfyui=None) -> dict:
    """Build ComfyUI's WanModel from a diffusion-model file for the CLI: returns ``dict(info, wire,
    latent_transform)``; ``wire(weights, cfg)`` installs SALAD (for the life of the process)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if comfyui is None:
        comfyui = os.environ.get("COMFYUI_DIR")
    if comfyui is None:
        sys.path.insert(0, str(root / "tests"))
        from comfy_harness import find_comfyui
        comfyui = str(find_comfyui())
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = torch.device(device).type == "cpu"
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.latent_formats
    import comfy.ldm.wan.model as wan
    import comfy.model_detection
    import comfy.ops
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(model), safe_load=True)
    ucfg = comfy.model_detection.detect_unet_config(sd, "")
    if not ucfg or ucfg.get("image_model") not in ("wan2.1",):
        raise ValueError(f"{Path(model).name} is not a Wan 2.1 / 2.2 diffusion model (detected {ucfg!r})")
    kw = {k: v for k, v in ucfg.items() if k not in ("image_model",)}
    dm = wan.WanModel(**kw, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    dm.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    dm.to(device).eval().requires_grad_(False)
    lf = comfy.latent_formats.Wan22() if ucfg.get("in_dim") == 48 else comfy.latent_formats.Wan21()
    info = dict(dim=int(dm.dim), heads=int(dm.num_heads), num_blocks=len(dm.blocks),
                base_model=f"wan-{Path(model).stem}-dim{dm.dim}-{len(dm.blocks)}blocks")
    keep = []

    def wire(weights, cfg, lora=None):
        hooks = salad_wan_hooks(dm, weights, cfg.sparsity, cfg.pattern, cfg.backend,
                                grad_checkpointing=cfg.grad_checkpointing, lora=lora)
        st = hooks.__enter__()
        keep.append(hooks)
        return wan_forward(dm, st)

    return dict(info=info, wire=wire, latent_transform=lf.process_in, diffusion_model=dm,
                lora_targets=wan_lora_targets(dm))


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------

def resolve_data_folder(name: str, create: bool = False) -> str:
    """An absolute path as given; a relative name under <output>/salad_training/ (no '..')."""
    import folder_paths
    name = str(name).strip()
    if not name:
        raise ValueError("the data folder name is empty")
    if os.path.isabs(name):
        path = name
    else:
        if ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"data folder {name[:200]!r} must not contain '..'")
        path = os.path.join(folder_paths.get_output_directory(), DATA_ROOT, name)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# nodes
# ----------------------------------------------------------------------------------------------

class SALADSaveTrainingPair:
    DESCRIPTION = ("Saves a LATENT (e.g. from VAE Encode of your video) and its CONDITIONING (the prompt that "
                   "describes it) as training pairs for SALAD Fine-tune: one file per latent in the batch, written "
                   "atomically into the data folder (a relative name is under output/salad_training/).")
    CATEGORY = "model/patch/SALAD"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("data_folder",)
    OUTPUT_TOOLTIPS = ("The data folder (full path), for SALAD Fine-tune.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "Clean video latent(s) from VAE Encode."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The text conditioning that describes the video."}),
            "data_folder": ("STRING", {"default": "my_set", "tooltip": "Folder name under output/salad_training/ "
                                                                      "(or an absolute path)."}),
            "filename_prefix": ("STRING", {"default": "pair"}),
        }}

    def save(self, latent, conditioning, data_folder, filename_prefix):
        from ..salad_core.finetune import save_pair
        from .train import _safe
        folder = resolve_data_folder(data_folder, create=True)
        samples = latent["samples"]
        if samples.ndim != 5:
            raise ValueError(f"SALAD Save Training Pair: expected a video latent (B, C, T, H, W), got "
                             f"{tuple(samples.shape)}")
        if not conditioning:
            raise ValueError("SALAD Save Training Pair: the conditioning is empty")
        ctx = conditioning[0][0]
        if len(conditioning) > 1:
            log.warning("SALAD Save Training Pair: %d conditioning entries; only the first is saved",
                        len(conditioning))
        prefix = _safe(filename_prefix)
        existing = [f for f in os.listdir(folder) if f.startswith(prefix + "_") and f.endswith(".safetensors")]
        n = len(existing) + 1
        names = []
        for b in range(samples.shape[0]):
            while os.path.exists(os.path.join(folder, f"{prefix}_{n:05d}.safetensors")):
                n += 1
            c = ctx[min(b, ctx.shape[0] - 1)] if ctx.ndim == 3 else ctx
            p = save_pair(os.path.join(folder, f"{prefix}_{n:05d}.safetensors"), samples[b].clone(), c.clone(),
                          source="ComfyUI SALAD Save Training Pair")
            names.append(p.name)
        log.info("SALAD Save Training Pair: %s -> %s", ", ".join(names), folder)
        return {"ui": {"text": [f"saved {', '.join(names)} in {folder}"]}, "result": (folder,)}


class SALADFinetune:
    DESCRIPTION = ("Fine-tunes SALAD's linear-branch projection and gate of every block inside the frozen Wan "
                   "model, on your training pairs, with the model's own flow-matching loss and SALAD active at the "
                   "chosen sparsity (the paper's recipe); optionally also a LoRA on the self-attention projections "
                   "(lora_rank > 0, saved to models/loras). Checkpoints to output/salad_finetune/ and can resume; "
                   "saves the weights to models/salad.")
    CATEGORY = "model/patch/SALAD"
    RETURN_TYPES = ("SALAD_WEIGHTS", "STRING", "STRING")
    RETURN_NAMES = ("salad_weights", "filename", "lora_filename")
    OUTPUT_TOOLTIPS = ("The fine-tuned weights, for Apply SALAD Attention.",
                       "The saved weight file's name in models/salad (for SALAD Weights Loader).",
                       "With lora_rank > 0: the LoRA file's name in models/loras, to load with LoraLoaderModelOnly "
                       "(strength 1) together with these weights; empty otherwise.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from .train import PROJ_RANK_TOOLTIP
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Wan model (LoRAs included) the weights are for."}),
            "data_folder": ("STRING", {"default": "my_set", "tooltip": (
                "Training pairs (SALAD Save Training Pair): a name under output/salad_training/ or a path.")}),
            "steps": ("INT", {"default": 1600, "min": 1, "max": 1000000}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 256}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-7, "tooltip": (
                "AdamW learning rate (warm-up, then cosine decay). The frontend rounds to the step, so it is "
                "1e-7 to keep values such as 2e-5.")}),
            "sparsity": ("FLOAT", {"default": DEFAULT_SPARSITY, "min": 0.0, "max": 0.99, "step": 0.01,
                                   "display": "slider"}),
            "pattern": (list(PATTERNS),),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from this prefix's checkpoint if there is "
                                                               "one (same settings and data)."}),
        }, "optional": {
            "init_weights": ("SALAD_WEIGHTS", {"tooltip": "Start from these (e.g. calibrated) weights."}),
            # The frontend gives an INT named seed a "control after generate" widget (new nodes: randomize).
            # Removing it (control_after_generate False) would shift the widget values of every saved
            # workflow with this node, so it stays; the tooltip says to keep it on fixed.
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": (
                "Seed of the training (noise, timesteps, data order). Set 'control after generate' to fixed: "
                "randomize changes the seed on every Run, which trains again, and resume refuses a changed "
                "seed.")}),
            "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 1000000}),
            "filename_prefix": ("STRING", {"default": "salad_finetuned"}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": (
                "Recompute each transformer block in the backward pass instead of keeping its activations: much "
                "less GPU memory (needed for Wan 1.3B at 480p on most GPUs) for about one extra forward per step. "
                "Same results.")}),
            "lora_rank": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": (
                "0: train only SALAD's projection and gate. > 0: also train a LoRA of this rank on every "
                "self-attention q/k/v/o projection, saved to models/loras (lora_filename); load it with "
                "LoraLoaderModelOnly at strength 1 whenever you use these weights.")}),
            "proj_rank": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": (
                PROJ_RANK_TOOLTIP + " Used when fresh weights are made; with init_weights their own rank wins.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, data_folder="", **kwargs):
        """Run again when the training pairs change (names, sizes, modification times), not only the widgets."""
        return _folder_state(data_folder)

    def train(self, model, data_folder, steps, batch, learning_rate, sparsity, pattern, resume, init_weights=None,
              seed=0, checkpoint_every=100, filename_prefix="salad_finetuned", gradient_checkpointing=True,
              lora_rank=0, proj_rank=0):
        import copy

        import comfy.model_management as mm
        import comfy.utils
        import folder_paths
        from ..salad_core.finetune import (FinetuneConfig, LoraSet, NonFiniteLossError, PairFolder, finetune,
                                           make_weights)
        from .loader import SALADWeightsLoader
        from .patch import wan_model_info
        from .paths import FOLDER_NAME
        from .train import _safe, _unique_path

        info = wan_model_info(model, "SALAD Fine-tune")
        data = PairFolder(resolve_data_folder(data_folder))
        check_trainable_wan(model.get_model_object("diffusion_model"), data, data_folder)
        ms = model.get_model_object("model_sampling")
        shift = float(getattr(ms, "shift", 1.0))
        multiplier = float(getattr(ms, "multiplier", 1000.0))
        cfg = FinetuneConfig(steps=steps, batch=batch, lr=learning_rate, sparsity=sparsity, pattern=pattern,
                             shift=shift, multiplier=multiplier, seed=seed, ckpt_every=checkpoint_every,
                             log_every=max(1, steps // 20), grad_checkpointing=gradient_checkpointing,
                             lora_rank=lora_rank, proj_rank=proj_rank)
        prefix = _safe(filename_prefix)
        ckpt = os.path.join(folder_paths.get_output_directory(), CKPT_ROOT, f"{prefix}.ckpt")
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        mm.load_models_gpu([model])
        device = mm.get_torch_device()
        dm = model.model.diffusion_model
        pbar = comfy.utils.ProgressBar(steps)

        def on_step(d):
            pbar.update_absolute(d["step"], steps)
            if d["step"] % cfg.log_every == 0 or d["step"] == steps:
                log.info("SALAD Fine-tune: step %d/%d loss %.5f lr %.3g", d["step"], steps, d["loss"], d["lr"])

        # ComfyUI runs nodes under inference_mode: training needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            init = None
            if init_weights is not None:   # a copy: the loader's cached weights are never changed
                init = _plain(copy.deepcopy(init_weights.model))
            weights = make_weights(info, cfg, init, created_by="ComfyUI SALAD Fine-tune")
            swapped = _trainable_copy_of_inference_tensors(dm, device)
            if swapped:
                log.info("SALAD Fine-tune: %d inference-mode tensors of the model copied for autograd", swapped)
            lora = LoraSet(wan_lora_targets(dm), cfg.lora_rank, seed=seed) if cfg.lora_rank else None
            lora_out = _unique_path(prefix, "loras", "_lora") if lora is not None else None
            with salad_wan_hooks(dm, weights, cfg.sparsity, cfg.pattern, grad_checkpointing=cfg.grad_checkpointing,
                                 lora=lora) as st:
                try:
                    res = finetune(wan_forward(dm, st), weights, data, cfg, out_path=_unique_path(prefix),
                                   ckpt_path=ckpt, resume=bool(resume), device=device,
                                   latent_transform=model.model.process_latent_in, callback=on_step,
                                   created_by="ComfyUI SALAD Fine-tune",
                                   log=lambda m: log.info("SALAD Fine-tune: %s", m), lora=lora,
                                   lora_out_path=lora_out)
                except NonFiniteLossError as e:
                    log.error("%s", e)
                    raise
        weights.to("cpu")
        name = os.path.relpath(str(res["path"]), folder_paths.get_folder_paths(FOLDER_NAME)[0])
        lora_name = ""
        if res["lora_path"] is not None:
            lora_name = os.path.relpath(str(res["lora_path"]), folder_paths.get_folder_paths("loras")[0])
        text = (f"SALAD Fine-tune: {res['step']} steps, last loss "
                f"{res['history'][-1][1] if res['history'] else float('nan'):.5f}; saved {name}"
                + (f" and the LoRA {lora_name} (load it with LoraLoaderModelOnly, strength 1, with these weights)"
                   if lora_name else ""))
        log.info("%s", text)
        return {"ui": {"text": [text]}, "result": (SALADWeightsLoader.wrap(weights), name, lora_name)}


def _trainable_copy_of_inference_tensors(module, device=None) -> int:
    """Parameters / buffers that ComfyUI created under inference_mode (the loaders run there) cannot take
    part in autograd ("Inference tensors cannot be saved for backward"): swap each for a normal copy (one
    tensor at a time, so the extra memory is one tensor).  The model computes the same; returns how many.
    ``device``: only tensors on it are swapped.  Those that ComfyUI left elsewhere (offloaded by a partial
    load) reach the compute device through its cast, which makes a new, normal tensor, so they stay as
    they are, with whatever ComfyUI registered for them (pinned memory)."""
    n = 0
    dev = None if device is None else torch.device(device)

    def here(t):
        return dev is None or (t.device.type == dev.type and (dev.index is None or t.device.index == dev.index))

    with torch.inference_mode(False), torch.no_grad():
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference() and here(p):
                    mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference() and here(b):
                    mod._buffers[name] = b.clone()
                    n += 1
    return n


def check_trainable_wan(diffusion_model, data, data_folder: str) -> None:
    """Fine-tuning feeds the model a noisy latent, a timestep and the text context, nothing else: refuse Wan
    variants that need more (image-to-video, VACE, camera, speech / audio models) and latents whose channels
    the model does not take, with what was expected, before the model is loaded."""
    dm = diffusion_model
    kind = type(dm).__name__
    model_type = str(getattr(dm, "model_type", "t2v"))
    if kind != "WanModel" or model_type != "t2v":
        what = "an image-to-video" if model_type == "i2v" else "a"
        raise ValueError(f"SALAD Fine-tune: this is {what} Wan model ({kind}, model_type {model_type}), which needs "
                         f"more inputs than training pairs hold; fine-tuning gives the model only the noisy latent "
                         f"and the text, so it supports text-to-video Wan models (Wan 2.1 T2V, Wan 2.2 T2V and "
                         f"TI2V 5B)")
    want = int(dm.patch_embedding.weight.shape[1])
    lat = data[0][0]
    if lat.ndim != 4 or int(lat.shape[0]) != want:
        raise ValueError(f"SALAD Fine-tune: the training pairs in data_folder {str(data_folder)[:200]!r} hold "
                         f"latents of shape {tuple(lat.shape)} (first: {data.items[0][1].name}); this model takes "
                         f"{want}-channel video latents (C, T, H, W): save the pairs from this model's VAE (Wan 2.1 "
                         f"VAE: 16 channels, Wan 2.2 VAE: 48)")


def _folder_state(data_folder: str) -> str:
    """Names, sizes and modification times of a data folder's files (IS_CHANGED); '' when it cannot be read
    (the node then runs and says why)."""
    import hashlib
    try:
        path = resolve_data_folder(data_folder)
        h = hashlib.sha256(os.path.abspath(path).encode())
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            if e.is_file() and not e.name.startswith("."):
                st = e.stat()
                h.update(f"{e.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    except (OSError, ValueError):
        return ""


def _plain(weights):
    """Inference tensors (made under ComfyUI's inference_mode) -> normal fp32 tensors that can train."""
    with torch.inference_mode(False), torch.no_grad():
        for mod in weights.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(p.detach().clone().float())
    return weights
