"""ComfyUI adapters for SALAD (the only part of the pack that imports ``comfy``)."""
from .apply import SALADApplyAttention
from .loader import SALADWeightsLoader
from .train import SALADTrainWeights
from . import testbed as _testbed

NODE_CLASS_MAPPINGS = {
    "SALADWeightsLoader": SALADWeightsLoader,
    "SALADApplyAttention": SALADApplyAttention,
    "SALADTrainWeights": SALADTrainWeights,
    **{f"SALADTestbed{n}": getattr(_testbed, f"SALADTestbed{n}") for n in _testbed.NODES},
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SALADWeightsLoader": "SALAD Weights Loader",
    "SALADApplyAttention": "Apply SALAD Attention",
    "SALADTrainWeights": "SALAD Train Weights",
    **{f"SALADTestbed{n}": f"SALAD Testbed {d}" for n, d in _testbed.NODES.items()},
}
