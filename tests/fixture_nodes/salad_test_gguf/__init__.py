"""Test-only GGUF diffusion-model loader (``SALADTest_UnetLoaderGGUF``), never shipped to users.

Why a fixture and not ComfyUI-GGUF itself: ComfyUI-GGUF (city96) is not published on any package
registry that this project's machines and CI can reach (only downloader stubs such as ``gguf-node``
are), and its code may not be copied into this repository.  So this module is our own minimal
loader that reproduces the parts of ComfyUI-GGUF's design that a model patch such as SALAD can see:

* the ``.gguf`` file is read with the ``gguf`` package (PyPI) and its quantised tensors stay
  quantised in memory: each is a :class:`QuantizedWeight`, a ``torch.Tensor`` subclass holding the
  raw GGML blocks (uint8) that reports the *logical* weight shape, so ComfyUI's model detection
  (``model_detection.model_config_from_unet``) recognises the model from the shapes;
* the model is built by ComfyUI's own ``comfy.sd.load_diffusion_model_state_dict`` with
  ``model_options={"custom_operations": GGUFOps}``; ``GGUFOps`` derives from ``comfy.ops.manual_cast``
  and its Linear dequantises the weight on every call, on the activation's device and in its dtype;
* the returned patcher is a ModelPatcher subclass whose ``clone()`` keeps the subclass, as
  ComfyUI-GGUF's patcher does, so nodes that clone the model (SALAD does) get the same kind back.

Only Q8_0 (blocks of 32 int8 values with one fp16 scale) plus F16/F32 are implemented: enough for a
quantised Wan.  GGUF tensors have at most 4 dimensions; tensors stored flattened (Wan's 5-D
``patch_embedding`` weight) have their real shape in the string field ``salad_test.shapes`` (JSON).
LoRA patches on quantised weights are not supported here (ComfyUI-GGUF has its own path for them).
"""
from __future__ import annotations

import json
import logging

import torch

import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths

SHAPES_FIELD = "salad_test.shapes"
FOLDER_KEY = "salad_test_gguf"
Q8_0_BLOCK = 32                 # values per block
Q8_0_BYTES = 2 + Q8_0_BLOCK     # fp16 scale + int8 values

# The .gguf files are listed from the same folders as diffusion models (the very list object, so
# folders added later by ComfyUI or extra_model_paths.yaml appear here too).
folder_paths.folder_names_and_paths[FOLDER_KEY] = (folder_paths.get_folder_paths("diffusion_models"), {".gguf"})


class QuantizedWeight(torch.Tensor):
    """Raw GGML blocks of one weight (uint8, ``(rows, bytes_per_row)``) that report the logical shape.

    Moving, detaching or cloning keeps the subclass and its metadata; any computation on it gives a
    plain tensor of the raw bytes, so nothing can use the bytes as values by accident except through
    :func:`dequantize`.
    """
    _KEEP = {torch.Tensor.to, torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.cpu, torch.Tensor.cuda,
             torch.Tensor.pin_memory, torch.Tensor.requires_grad_, torch.Tensor.contiguous}

    @staticmethod
    def __new__(cls, raw: torch.Tensor, qtype: str, logical_shape):
        t = raw.as_subclass(cls)
        t.qtype = qtype
        t.logical_shape = torch.Size(logical_shape)
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    @property
    def shape(self):
        return self.logical_shape

    def raw(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.as_subclass(self, torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], QuantizedWeight) else None
        if (func in cls._KEEP and src is not None and isinstance(out, torch.Tensor)
                and out.dtype == torch.uint8 and tuple(out.size()) == tuple(src.raw().size())):
            return QuantizedWeight(out, src.qtype, src.logical_shape)
        return out

    def __repr__(self):
        return f"QuantizedWeight({self.qtype}, shape={tuple(self.logical_shape)}, device={self.device})"


def dequantize(w: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """The values of ``w`` on ``device`` in ``dtype`` (plain tensors are only cast)."""
    if not isinstance(w, QuantizedWeight):
        return w.to(device=device, dtype=dtype)
    if w.qtype != "Q8_0":
        raise NotImplementedError(f"SALADTest_UnetLoaderGGUF: GGML type {w.qtype} is not implemented (Q8_0 only)")
    blocks = w.raw().to(device).reshape(-1, Q8_0_BYTES)
    scale = blocks[:, :2].contiguous().view(torch.float16).to(dtype)
    values = blocks[:, 2:].contiguous().view(torch.int8).to(dtype)
    return (values * scale).reshape(w.logical_shape)


class GGUFOps(comfy.ops.manual_cast):
    """ComfyUI's manual-cast ops whose Linear takes a quantised weight and dequantises it per call."""

    class Linear(comfy.ops.manual_cast.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            # No float weight is allocated: the weight comes from the state dict, quantised or not.
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = None
            self.bias = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            for name in ("weight", "bias"):
                v = state_dict.get(prefix + name)
                if v is None:
                    if name == "weight":
                        missing_keys.append(prefix + name)
                    continue
                if tuple(v.shape) != ((self.out_features, self.in_features) if name == "weight"
                                      else (self.out_features,)):
                    error_msgs.append(f"{prefix}{name}: shape {tuple(v.shape)} does not fit Linear("
                                      f"{self.in_features}, {self.out_features})")
                    continue
                setattr(self, name, torch.nn.Parameter(v, requires_grad=False))

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            if not isinstance(self.weight, QuantizedWeight):
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            weight = dequantize(self.weight, input.dtype, input.device)
            bias = None if self.bias is None else dequantize(self.bias, input.dtype, input.device)
            return torch.nn.functional.linear(input, weight, bias)


class QuantizedModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that stays one when cloned (as ComfyUI-GGUF's patcher does)."""

    def clone(self, *args, **kwargs):
        n = super().clone(*args, **kwargs)
        n.__class__ = type(self)
        return n

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key in self.patches and isinstance(comfy.utils.get_attr(self.model, key), QuantizedWeight):
            raise NotImplementedError(f"SALADTest_UnetLoaderGGUF: weight patches (LoRA) on the quantised "
                                      f"weight {key} are not supported by this test loader")
        return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)


def read_gguf(path: str) -> tuple[dict, dict]:
    """(state dict, {GGML type name: count}) of a GGUF file; quantised tensors become QuantizedWeight."""
    import gguf
    reader = gguf.GGUFReader(path)
    field = reader.fields.get(SHAPES_FIELD)
    shapes = json.loads(field.contents()) if field is not None else {}
    sd, counts = {}, {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type).name
        counts[qtype] = counts.get(qtype, 0) + 1
        logical = tuple(shapes.get(t.name, [int(x) for x in reversed(t.shape)]))
        raw = torch.from_numpy(t.data.copy())
        if qtype in ("F16", "F32"):
            sd[t.name] = raw.reshape(logical)
        elif qtype == "Q8_0":
            sd[t.name] = QuantizedWeight(raw.reshape(-1, raw.shape[-1]), qtype, logical)
        else:
            raise NotImplementedError(f"{path}: tensor {t.name} has GGML type {qtype}; this test loader "
                                      "reads Q8_0, F16 and F32 only")
    return sd, counts


class SALADTest_UnetLoaderGGUF:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list(FOLDER_KEY),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing/salad"

    def load(self, unet_name):
        path = folder_paths.get_full_path_or_raise(FOLDER_KEY, unet_name)
        sd, counts = read_gguf(path)
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": GGUFOps})
        if patcher is None:
            raise RuntimeError(f"SALADTest_UnetLoaderGGUF: ComfyUI did not recognise the model in {path}")
        kept = sum(isinstance(p, QuantizedWeight) for p in patcher.model.parameters())
        logging.info("SALADTest GGUF: loaded %s, file types %s, %d weights stay quantised in the model",
                     unet_name, json.dumps(counts, sort_keys=True), kept)
        patcher.__class__ = QuantizedModelPatcher
        return (patcher,)


NODE_CLASS_MAPPINGS = {"SALADTest_UnetLoaderGGUF": SALADTest_UnetLoaderGGUF}
NODE_DISPLAY_NAME_MAPPINGS = {"SALADTest_UnetLoaderGGUF": "Unet Loader (GGUF, SALAD test fixture)"}
