"""ComfyUI adapters for SALAD (the only part of the pack that imports ``comfy``)."""
from .apply import SALADApplyAttention
from .loader import SALADWeightsLoader
from .train import SALADTrainWeights

NODE_CLASS_MAPPINGS = {
    "SALADWeightsLoader": SALADWeightsLoader,
    "SALADApplyAttention": SALADApplyAttention,
    "SALADTrainWeights": SALADTrainWeights,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SALADWeightsLoader": "SALAD Weights Loader",
    "SALADApplyAttention": "Apply SALAD Attention",
    "SALADTrainWeights": "SALAD Train Weights",
}
