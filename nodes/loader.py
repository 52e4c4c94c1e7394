"""SALAD Weights Loader node: models/salad/*.safetensors -> SALAD_WEIGHTS."""
from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from .paths import FOLDER_NAME

if TYPE_CHECKING:
    from ..salad_core.weights import SaladWeights

SALAD_WEIGHTS = "SALAD_WEIGHTS"


class SALADWeightsLoader:
    DESCRIPTION = ("Loads a SALAD weight file (per-block linear-branch projection and gate, safetensors) from "
                   "models/salad. Connect it to Apply SALAD Attention. The file is checked against the model "
                   "it is applied to.")
    CATEGORY = "advanced/loaders/SALAD"
    RETURN_TYPES = (SALAD_WEIGHTS,)
    RETURN_NAMES = ("salad_weights",)
    OUTPUT_TOOLTIPS = ("SALAD gate and linear-branch weights, for Apply SALAD Attention.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {"required": {
            "weights_name": (list_weight_files(), {
                "tooltip": "A .safetensors file in ComfyUI/models/salad made by the SALAD trainer "
                           "(or any folder added under 'salad:' in extra_model_paths.yaml)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, weights_name: str) -> str:
        """Re-run the loader when the file on disk changed (overwritten with other weights, or with
        garbage): its identity, size, mtime and a hash of its first 64 KiB (the header)."""
        path = _resolve(weights_name)
        if path is None:
            return f"missing:{weights_name}"
        try:
            st = os.stat(path)
            h = hashlib.sha256()
            if _is_regular(st):  # never open a pipe or device here
                with open(path, "rb") as f:
                    h.update(f.read(1 << 16))
            return f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"
        except OSError as e:
            return f"error:{path}:{e}"

    def load(self, weights_name: str) -> tuple[comfy.model_patcher.ModelPatcher]:
        from ..salad_core.weights import SaladWeightsError, clip, load_salad_weights
        path = _resolve(weights_name)
        if path is None:
            raise FileNotFoundError(f"SALAD Weights Loader: weights_name {clip(weights_name)} is not in "
                                    f"models/salad ({', '.join(folder_paths.get_folder_paths(FOLDER_NAME))})")
        try:
            weights = load_salad_weights(path)
        except SaladWeightsError as e:
            raise ValueError(f"SALAD Weights Loader: {e}") from None
        return (self.wrap(weights),)

    @staticmethod
    def wrap(weights: SaladWeights) -> comfy.model_patcher.ModelPatcher:
        """Give the weights their own ModelPatcher so ComfyUI loads/offloads them with the model."""
        return comfy.model_patcher.ModelPatcher(weights, load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device())


def _is_regular(st: os.stat_result) -> bool:
    import stat
    return stat.S_ISREG(st.st_mode)


def list_weight_files() -> list[str]:
    """models/salad/*.safetensors that are regular files (a named pipe or a link to a device is not listed)."""
    out = []
    for name in folder_paths.get_filename_list(FOLDER_NAME):
        path = _resolve(name)
        try:
            if path is not None and _is_regular(os.stat(path)):
                out.append(name)
        except OSError:
            pass
    return out


def _resolve(weights_name: str) -> str | None:
    """The full path of ``weights_name`` in the salad folders, also when it is not a regular file
    (ComfyUI's get_full_path skips those, which made a pipe read as 'not in models/salad'); the
    loader then refuses it by its real cause.  Names that leave the folder are not resolved."""
    path = folder_paths.get_full_path(FOLDER_NAME, weights_name)
    if path is not None:
        return path
    name = str(weights_name)
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return None
    for folder in folder_paths.get_folder_paths(FOLDER_NAME):
        cand = os.path.join(folder, name)
        if os.path.lexists(cand):
            return cand
    return None
