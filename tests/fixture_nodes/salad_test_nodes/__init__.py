"""Test-only ComfyUI nodes, loaded by the test harness and the developer demo, never shipped to users.

Real Wan text conditioning comes from umt5-xxl (11 GB), which a CPU test machine cannot hold.
``SALADTest_Conditioning`` makes conditioning of exactly the shape Wan expects
([[tensor(B, tokens, 4096), {}]]) from a seed, so graphs run end to end with a tiny Wan model.
``SALADTest_LatentPreview`` writes the first frame of a latent as a PNG so a person can look at it.
"""
import os

import torch


class SALADTest_Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
            "dim": ("INT", {"default": 4096, "min": 8, "max": 8192}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/salad"

    def make(self, seed, tokens, dim):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(1, tokens, dim, generator=g)
        return ([[emb, {}]],)


class SALADTest_LatentPreview:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "filename_prefix": ("STRING", {"default": "salad_preview"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing/salad"

    def save(self, samples, filename_prefix):
        import folder_paths
        import numpy as np
        from PIL import Image
        x = samples["samples"][0]          # (C, T, H, W)
        frame = x[:3, 0].float()
        frame = (frame - frame.amin()) / (frame.amax() - frame.amin() + 1e-6)
        img = (frame.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        img = np.kron(img, np.ones((8, 8, 1), dtype=np.uint8))
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), img.shape[1], img.shape[0])
        os.makedirs(full_dir, exist_ok=True)
        name = f"{name}_{counter:05}_.png"
        Image.fromarray(img).save(os.path.join(full_dir, name))
        return {"ui": {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


class SALADTest_EmptyLatentVideo:
    """An empty video latent with any channel count (Wan 2.2 5B uses 48) without needing a VAE."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "channels": ("INT", {"default": 16, "min": 1, "max": 128}),
            "frames": ("INT", {"default": 5, "min": 1, "max": 64}),
            "height": ("INT", {"default": 16, "min": 2, "max": 256}),
            "width": ("INT", {"default": 16, "min": 2, "max": 256}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 8}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing/salad"

    def make(self, channels, frames, height, width, batch_size):
        return ({"samples": torch.zeros(batch_size, channels, frames, height, width)},)


NODE_CLASS_MAPPINGS = {
    "SALADTest_EmptyLatentVideo": SALADTest_EmptyLatentVideo,
    "SALADTest_Conditioning": SALADTest_Conditioning,
    "SALADTest_LatentPreview": SALADTest_LatentPreview,
}


class SALADTest_RecordingOverride:
    """Installs an attention override in the style of KJNodes' sage patch (no chaining), that counts the
    calls it receives by kind and hands each to ComfyUI's own attention.  Logs the counts at cleanup."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "rec"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/salad"

    def patch(self, model, tag):
        import logging
        import comfy.patcher_extension as pe
        counts = {"self": 0, "cross": 0}

        def override(func, q, k, v, *args, **kwargs):
            counts["self" if k.shape[1] == q.shape[1] else "cross"] += 1
            return func(q, k, v, *args, **kwargs)

        def report(*_a, **_k):
            logging.info("RECORDING OVERRIDE %s self=%d cross=%d", tag, counts["self"], counts["cross"])
            counts["self"] = counts["cross"] = 0

        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, "salad_test_recorder", report)
        return (m,)


NODE_CLASS_MAPPINGS["SALADTest_RecordingOverride"] = SALADTest_RecordingOverride


class SALADTest_WeightsTo:
    """Hands on a copy of SALAD_WEIGHTS moved to another dtype and/or device (``meta``: no data), to test
    how Apply SALAD Attention copes with weights that do not match the activations."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"salad_weights": ("SALAD_WEIGHTS",),
                             "dtype": (["float32", "float16", "bfloat16"],),
                             "device": (["cpu", "meta"],)}}

    RETURN_TYPES = ("SALAD_WEIGHTS",)
    FUNCTION = "convert"
    CATEGORY = "testing/salad"

    def convert(self, salad_weights, dtype, device):
        import copy
        import comfy.model_patcher
        sw = copy.deepcopy(salad_weights.model).to(device=device, dtype=getattr(torch, dtype))
        return (comfy.model_patcher.ModelPatcher(sw, load_device=salad_weights.load_device,
                                                 offload_device=salad_weights.offload_device),)


NODE_CLASS_MAPPINGS["SALADTest_WeightsTo"] = SALADTest_WeightsTo


class SALADTest_CoreStyleSparseOverride:
    """Installs an attention override the way newer ComfyUI's "Model Sparse Attention" node does (our own
    code, written from its documented behaviour): on the clone's transformer_options at patch time and again
    from an ON_PREPARE_STATE callback before every step, each time on top of whatever override is current,
    declined calls going to that previous override.  It computes ComfyUI's own attention (so outputs stay
    comparable) and counts the self- and cross-attention calls it receives; logs the counts at cleanup."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "core"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/salad"

    def patch(self, model, tag):
        import logging
        import comfy.patcher_extension as pe
        counts = {"self": 0, "cross": 0}
        installed = set()

        def make(previous):
            def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                         skip_output_reshape=False, **kwargs):
                counts["self" if k.shape[-2 if skip_reshape else 1] == q.shape[-2 if skip_reshape else 1]
                       else "cross"] += 1
                kw = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                          skip_output_reshape=skip_output_reshape, **kwargs)
                return func(q, k, v, heads, **kw) if previous is None else previous(func, q, k, v, heads, **kw)
            return override

        def install(to):
            current = to.get("optimized_attention_override")
            if current in installed:
                return
            o = make(current)
            installed.add(o)
            to["optimized_attention_override"] = o

        def on_prepare_state(patcher, *_a, **_k):
            install(patcher.model_options.setdefault("transformer_options", {}))

        def report(*_a, **_k):
            logging.info("CORE-STYLE OVERRIDE %s self=%d cross=%d", tag, counts["self"], counts["cross"])
            counts["self"] = counts["cross"] = 0

        m = model.clone()
        m.model_options["transformer_options"] = dict(m.model_options.get("transformer_options", {}))
        install(m.model_options["transformer_options"])
        m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, "salad_test_core_style", on_prepare_state)
        m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, "salad_test_core_style_report", report)
        return (m,)


NODE_CLASS_MAPPINGS["SALADTest_CoreStyleSparseOverride"] = SALADTest_CoreStyleSparseOverride


class SALADTest_MaskedConditioning(SALADTest_Conditioning):
    """Conditioning as a T5 text encoder hands it to LTX-Video (and Mochi): the embeddings plus an
    all-ones ``attention_mask`` (B, tokens), which LTXVModel.forward requires."""

    def make(self, seed, tokens, dim):
        emb = super().make(seed, tokens, dim)[0][0][0]
        return ([[emb, {"attention_mask": torch.ones(emb.shape[0], tokens, dtype=torch.long)}]],)


NODE_CLASS_MAPPINGS["SALADTest_MaskedConditioning"] = SALADTest_MaskedConditioning
