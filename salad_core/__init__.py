"""SALAD core: token tiling, sparse + linear attention mixing, weight format and trainer.

Pure torch (plus safetensors); never imports ComfyUI.  The sibling package ``kernels``
is imported relatively.
"""
from .tiling import DEFAULT_TILE, TileLayout, from_tile_order, grid_from_latent_shape, to_tile_order
from .attention import (
    SaladConfig,
    dense_reference_attention,
    gate_value,
    mix_branches,
    salad_branches,
    salad_self_attention,
    select_blocks,
)
from .weights import (
    SALAD_FORMAT_VERSION,
    SaladWeights,
    SaladWeightsError,
    format_block_spec,
    load_salad_weights,
    parse_block_spec,
    save_salad_weights,
)

__all__ = [
    "DEFAULT_TILE", "TileLayout", "to_tile_order", "from_tile_order", "grid_from_latent_shape",
    "SaladConfig", "salad_self_attention", "salad_branches", "dense_reference_attention",
    "gate_value", "mix_branches", "select_blocks",
    "SALAD_FORMAT_VERSION", "SaladWeights", "SaladWeightsError", "save_salad_weights",
    "load_salad_weights", "parse_block_spec", "format_block_spec",
]
