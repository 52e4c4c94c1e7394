"""SALAD attention for ComfyUI: sparse + linear attention for Wan video models.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS.  Everything heavy
(Triton, CUDA kernels) is imported lazily, so the pack loads in a CPU-only ComfyUI.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.paths import register_model_folder

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
