"""SALAD Weights Loader node: models/salad/*.safetensors -> SALAD_WEIGHTS."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from .paths import FOLDER_NAME

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
    def INPUT_TYPES(cls):
        return {"required": {
            "weights_name": (folder_paths.get_filename_list(FOLDER_NAME), {
                "tooltip": "A .safetensors file in ComfyUI/models/salad made by the SALAD trainer "
                           "(or any folder added under 'salad:' in extra_model_paths.yaml)."}),
        }}

    def load(self, weights_name):
        from ..salad_core.weights import SaladWeightsError, load_salad_weights
        path = folder_paths.get_full_path(FOLDER_NAME, weights_name)
        if path is None:
            raise FileNotFoundError(f"SALAD Weights Loader: weights_name '{weights_name}' is not in "
                                    f"models/salad ({', '.join(folder_paths.get_folder_paths(FOLDER_NAME))})")
        try:
            weights = load_salad_weights(path)
        except SaladWeightsError as e:
            raise ValueError(f"SALAD Weights Loader: {e}") from None
        return (self.wrap(weights),)

    @staticmethod
    def wrap(weights):
        """Give the weights their own ModelPatcher so ComfyUI loads/offloads them with the model."""
        return comfy.model_patcher.ModelPatcher(weights, load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device())
