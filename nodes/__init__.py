"""ComfyUI adapters for SALAD (the only part of the pack that imports ``comfy``)."""
from .apply import SALADApplyAttention
from .loader import SALADWeightsLoader
from .train import SALADTrainWeights
from .finetune import SALADFinetune, SALADSaveTrainingPair
from . import testbed as _testbed

NODE_CLASS_MAPPINGS = {
    "SALADWeightsLoader": SALADWeightsLoader,
    "SALADApplyAttention": SALADApplyAttention,
    "SALADTrainWeights": SALADTrainWeights,
    "SALADFinetune": SALADFinetune,
    "SALADSaveTrainingPair": SALADSaveTrainingPair,
    **{f"SALADTestbed{n}": getattr(_testbed, f"SALADTestbed{n}") for n in _testbed.NODES},
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SALADWeightsLoader": "SALAD Weights Loader",
    "SALADApplyAttention": "Apply SALAD Attention",
    "SALADTrainWeights": "SALAD Train Weights",
    "SALADFinetune": "SALAD Fine-tune",
    "SALADSaveTrainingPair": "SALAD Save Training Pair",
    **{f"SALADTestbed{n}": f"SALAD Testbed {d}" for n, d in _testbed.NODES.items()},
}
