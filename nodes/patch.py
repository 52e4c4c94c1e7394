"""Patch a ComfyUI video model so its self-attention runs SALAD attention.

The patching is family-blind: what depends on the model (how to recognise it, its blocks and
heads, the key of each block's self-attention forward, how its token grid is recorded and where its
extra tokens sit) comes from its adapter in ``nodes/families`` (Wan, LTX-Video).

How (no ComfyUI file is edited, the user's model object is never touched):
  * ``model.clone()``; everything below is an object patch, wrapper or callback on the clone, applied
    by ComfyUI when the clone is loaded and removed when another model runs.
  * the family's recorder reports the latent token grid of each forward (Wan: an object patch on
    ``diffusion_model.patch_embedding.forward``, with ComfyUI >= 0.5's
    ``transformer_options["grid_sizes"]`` winning when present; LTX-Video: a DIFFUSION_MODEL wrapper).
  * the family's self-attention forward of every block we own (Wan:
    ``diffusion_model.blocks.{i}.self_attn.forward``; LTX-Video:
    ``diffusion_model.transformer_blocks.{i}.attn1.forward``): for the duration of
    that call it puts our function on top of ``transformer_options["optimized_attention_override"]``
    (keeping the previous override, if any, for calls we decline) and remembers the block index and
    the block input x (for the gate).  Cross-attention runs after the self-attention call has
    returned, so it never reaches our function; blocks we do not own never see it either.
  * Several Apply SALAD Attention nodes in series: the later node wins for every block it covers
    (its weights, sparsity, pattern, percent window, backend); blocks it leaves dense
    (``dense_blocks``) keep the earlier node's SALAD.  Each SALAD self-attention forward carries
    ``_salad_state`` and ``_salad_base`` (the pre-SALAD forward); a later node builds its forward on
    ``_salad_base``, so the earlier one is gone from that block.  If another node's object patch sits
    between them, the earlier SALAD forward still runs but sees the later node's override already in
    place and hands the call through (``_salad_override`` marks SALAD overrides).  The weight
    patchers of every SALAD node still in use stay in the additional models under ``KEY``.
  * The gate/Proj weights live in their own ModelPatcher (in the model's compute dtype) attached
    with ``set_additional_models``, so ComfyUI's memory management loads and offloads them with the
    model.  When a partial / low-VRAM load leaves them on the CPU, each block's weights follow the
    activations per call (salad_core.proj.linear_params), as ComfyUI's ops do for offloaded
    layers.
"""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Type

import torch

from ..salad_core.options import (DEFAULT_BACKEND, DEFAULT_COMPENSATION, DEFAULT_PATTERN, DEFAULT_PRECISION,
                                  DEFAULT_SPARSITY)
from .families import FAMILIES, ModelFamily, WanFamily, family_for, supported
from .families.wan import grid_recording_forward

log = logging.getLogger("SALAD")

KEY = "salad"


@dataclass
class PatchOptions:
    sparsity: float = DEFAULT_SPARSITY
    pattern: str = DEFAULT_PATTERN
    start_percent: float = 0.0
    end_percent: float = 1.0
    dense_blocks: frozenset[int] = frozenset()
    backend: str = DEFAULT_BACKEND
    min_tokens: int = 0
    verbose: bool = False
    compensation: str = DEFAULT_COMPENSATION
    precision: str = DEFAULT_PRECISION


@dataclass
class RunStats:
    sparse_calls: Counter[int] = field(default_factory=Counter)  # block -> calls run with SALAD
    declined: Counter[str] = field(default_factory=Counter)     # reason -> calls handed on
    kv_mismatch_seen: int = 0                                   # calls with len(q) != len(k): never ours
    shapes: set[tuple] = field(default_factory=set)

    def summary(self) -> str:
        blocks = ",".join(f"{b}:{n}" for b, n in sorted(self.sparse_calls.items()))
        declined = ",".join(f"{r}:{n}" for r, n in sorted(self.declined.items()))
        return (f"SALAD stats: sparse_calls={{{blocks}}} declined={{{declined}}} "
                f"cross_attention_calls_seen={self.kv_mismatch_seen} shapes={sorted(self.shapes)}")


class SaladPatch:
    """State shared by the object patches of one patched clone."""

    def __init__(self, diffusion_model: torch.nn.Module, opts: PatchOptions, weights: Any = None,
                 family: Optional[ModelFamily] = None):
        from ..salad_core.attention import SaladConfig  # lazy: keeps import of the pack light
        self.opts = opts
        self.weights = weights            # a ComfyUI ModelPatcher whose .model is SaladWeights, or None
        self.config = SaladConfig(sparsity=opts.sparsity, pattern=opts.pattern, backend=opts.backend,
                                  compensation=opts.compensation, precision=opts.precision)
        self.family = family if family is not None else family_for(diffusion_model)
        if self.family is None:
            raise ValueError(f"SALAD: {type(diffusion_model).__name__} is not a model SALAD supports "
                             f"({supported()})")
        self.sigma_start = self.sigma_end = None    # the percent window in sigmas: set_sigma_window
        self._seen = None                 # what the family's recorder saw in this forward (its token grid)
        self._fresh_forward = True
        self._sigma_cache = (None, None)
        self.stats = RunStats()

    # -- the family's recorder reports here --------------------------------------------------
    def record(self, seen: Any, first_of_forward: bool = True) -> None:
        """Keep ``seen`` (the family's description of this forward's token grid) for the attention
        calls that follow.  ``first_of_forward``: only the first report after a self-attention call
        counts (Wan's patch_embedding may also embed other latents within one forward)."""
        if self._fresh_forward or not first_of_forward:
            self._seen = seen
            self._fresh_forward = False

    # -- object patches ----------------------------------------------------------------------
    def make_patch_embedding_forward(self, prev_forward: Callable) -> Callable:
        """Wan's grid recorder (kept for callers that wire a WanModel by hand: the fine-tuner, bench_e2e)."""
        return grid_recording_forward(self, prev_forward)

    def make_self_attn_forward(self, block: int, prev_forward: Callable) -> Callable:
        """The self-attention forward of ``block``.  Built on the pre-SALAD forward: when
        ``prev_forward`` is an earlier SALAD node's forward, that one is replaced (later node wins)."""
        base = getattr(prev_forward, "_salad_base", prev_forward)
        pos = _options_position(base, self.family.options_position)

        def forward(x, *args, **kwargs):
            if "transformer_options" in kwargs:
                to = kwargs["transformer_options"]
            elif len(args) > pos and isinstance(args[pos], dict):
                to = args[pos]
            else:
                to = None
            if to is None:
                to = {}
                if len(args) > pos:
                    args = (*args[:pos], to, *args[pos + 1:])
                else:
                    kwargs["transformer_options"] = to
            self._fresh_forward = True       # the next grid report starts a new forward
            had = "optimized_attention_override" in to
            previous = to.get("optimized_attention_override")
            if getattr(previous, "_salad_override", False):
                # a later SALAD node (wrapped around another node's patch around us) owns this call
                return base(x, *args, **kwargs)

            def override(func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         *a: Any, **kw: Any) -> torch.Tensor:
                return self.attention(func, previous, block, x, q, k, v, heads, *a, **kw)
            override._salad_override = True

            to["optimized_attention_override"] = override
            try:
                return base(x, *args, **kwargs)
            finally:
                if had:
                    to["optimized_attention_override"] = previous
                else:
                    to.pop("optimized_attention_override", None)
        forward._salad_state = self
        forward._salad_base = base
        return forward

    # -- the attention override --------------------------------------------------------------
    def _decline(self, reason: str, func: Callable, previous: Optional[Callable], q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, heads: int, *a: Any, **kw: Any) -> torch.Tensor:
        self.stats.declined[reason] += 1
        if previous is not None:
            return previous(func, q, k, v, heads, *a, **kw)
        return func(q, k, v, heads, *a, **kw)

    def _in_sigma_window(self, transformer_options: Optional[dict]) -> bool:
        if self.sigma_start is None:
            return True
        sigmas = transformer_options.get("sigmas") if transformer_options else None
        if sigmas is None:
            return True
        key = (id(sigmas), sigmas.data_ptr() if torch.is_tensor(sigmas) else None)
        if self._sigma_cache[0] != key:
            s = float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else float(sigmas[0])
            self._sigma_cache = (key, s)
        s = self._sigma_cache[1]
        return self.sigma_end <= s <= self.sigma_start

    def attention(self, func: Callable, previous: Optional[Callable], block: int, x: Optional[torch.Tensor],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *a: Any, **kw: Any) -> torch.Tensor:
        to = kw.get("transformer_options") or {}
        mask = kw.get("mask", a[0] if a else None)
        if kw.get("skip_reshape") or kw.get("skip_output_reshape"):
            return self._decline("layout", func, previous, q, k, v, heads, *a, **kw)
        if mask is not None:
            return self._decline("mask", func, previous, q, k, v, heads, *a, **kw)
        if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
            self.stats.kv_mismatch_seen += 1
            return self._decline("not_self_attention", func, previous, q, k, v, heads, *a, **kw)
        L = q.shape[1]
        if L < self.opts.min_tokens:
            return self._decline("short", func, previous, q, k, v, heads, *a, **kw)
        if not self._in_sigma_window(to):
            return self._decline("outside_percent", func, previous, q, k, v, heads, *a, **kw)
        layout = self.family.token_layout(L, self._seen, to)
        if isinstance(layout, str):
            return self._decline(layout, func, previous, q, k, v, heads, *a, **kw)
        grid, n_front, n_back = layout

        proj = gate = None
        if self.weights is not None:
            sw = self.weights.model
            if sw.has_block(block):
                proj, gate = sw.proj_for(block), sw.gate_for(block)
        out = _salad_call()(q, k, v, heads, grid=grid, n_front=n_front, n_back=n_back, x=x,
                            proj=proj, gate=gate, config=self.config, block_id=block)
        self.stats.sparse_calls[block] += 1
        self.stats.shapes.add((tuple(q.shape), grid))
        return out

    # -- callbacks ---------------------------------------------------------------------------
    def set_sigma_window(self, model_sampling: Any) -> None:
        """start_percent / end_percent -> the sigma window, on ``model_sampling``'s schedule (None: always on)."""
        if self.opts.start_percent > 0.0 or self.opts.end_percent < 1.0:
            self.sigma_start = float(model_sampling.percent_to_sigma(self.opts.start_percent))
            self.sigma_end = float(model_sampling.percent_to_sigma(self.opts.end_percent))
        else:
            self.sigma_start = self.sigma_end = None
        self._sigma_cache = (None, None)

    def on_pre_run(self, patcher: Any) -> None:
        """Before each sampling run: the window follows the schedule of the model being sampled, so a
        ModelSamplingSD3 (shift) node placed after Apply SALAD Attention moves it as it moves the sigmas."""
        self.set_sigma_window(patcher.get_model_object("model_sampling"))

    def on_cleanup(self, *args: Any, **kwargs: Any) -> None:
        if self.stats.sparse_calls or self.stats.declined:
            msg = self.stats.summary()
            if self.opts.verbose:
                log.info(msg)
            else:
                log.debug(msg)
        self.stats = RunStats()
        self._seen = None
        self._fresh_forward = True
        self._sigma_cache = (None, None)


_SALAD_CALL: Optional[Callable] = None


def _salad_call() -> Callable:
    """salad_self_attention, kept out of torch.compile graphs (TorchCompileModel traces through
    ComfyUI's attention wrapper into this override; the Triton kernels and the data-dependent block
    lists run eagerly, the rest of the model stays compiled)."""
    global _SALAD_CALL
    if _SALAD_CALL is None:
        from ..salad_core.attention import salad_self_attention
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        _SALAD_CALL = disable(salad_self_attention) if disable is not None else salad_self_attention
    return _SALAD_CALL


def _options_position(forward: Callable, default: int) -> int:
    """Index of ``transformer_options`` among ``forward``'s positional arguments after ``x``, read from
    its signature (ComfyUI versions differ: LTX-Video's attn1 gained ``k_pe`` before it); ``default``
    (the family's) when the signature does not name it."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return default
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index("transformer_options") - 1 if "transformer_options" in names[1:] else default


def model_family(model: Any, node_name: str,
                 families: Sequence[Type[ModelFamily]] = FAMILIES) -> ModelFamily:
    """The family adapter of a ComfyUI ModelPatcher's diffusion model; a clear error for anything else."""
    dm = model.get_model_object("diffusion_model")
    family = family_for(dm, families)
    if family is None:
        raise ValueError(f"{node_name}: model input is a {type(dm).__name__}; SALAD supports {supported(families)} "
                         f"video models")
    return family


def model_info(model: Any, node_name: str, families: Sequence[Type[ModelFamily]] = FAMILIES) -> dict:
    """family / dim / heads / block count / base_model / model_type of a ComfyUI ModelPatcher of any
    supported family; a clear error for anything else."""
    return model_family(model, node_name, families).info(model).as_dict()


def wan_model_info(model: Any, node_name: str) -> dict:
    """:func:`model_info` for nodes that work on Wan only (training and fine-tuning wire Wan's forward)."""
    return model_info(model, node_name, (WanFamily,))


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a ComfyUI model computes in: the manual-cast dtype for fp8 / low-precision weights,
    else its weight dtype."""
    base = model.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def weights_in_compute_dtype(weights_patcher: Any, model: Any) -> Any:
    """The SALAD weights as ComfyUI should hold them for ``model``: in the model's compute dtype, so
    they take no more GPU memory than needed, and in pinned CPU memory when the model runs on a CUDA
    device, so that a block whose weights ComfyUI left offloaded (partial / low-VRAM / no-VRAM loads)
    copies them asynchronously instead of stalling the GPU queue.  Returns ``weights_patcher`` itself
    when it is already so, else a converted copy with its own ModelPatcher (the loader's output is not
    changed).  Weights that hold no data (``meta`` tensors) are refused here, with the file's name."""
    import copy

    import comfy.model_patcher
    import torch
    sw = weights_patcher.model
    params = list(sw.parameters())
    if any(p.is_meta for p in params):
        raise ValueError(f"Apply SALAD Attention: salad_weights {sw.name} are on the 'meta' device (they hold no "
                         f"data); load the file again with SALAD Weights Loader")
    dtype = compute_dtype(model) or params[0].dtype
    pin = (torch.device(weights_patcher.load_device).type == "cuda" and torch.cuda.is_available()
           and all(p.device.type == "cpu" for p in params))
    if all(p.dtype == dtype and (p.is_pinned() or not pin) for p in params):
        return weights_patcher
    converted = copy.deepcopy(sw).to(dtype=dtype)
    if pin:
        for p in converted.parameters():
            p.data = p.data.pin_memory()
    return comfy.model_patcher.ModelPatcher(converted, load_device=weights_patcher.load_device,
                                            offload_device=weights_patcher.offload_device)


def apply_salad(model: Any, opts: PatchOptions, weights_patcher: Any = None) -> Any:
    """Return a patched clone of the ComfyUI ModelPatcher ``model``."""
    import comfy.patcher_extension as pe

    family = model_family(model, "Apply SALAD Attention")
    info = family.info(model)
    m = model.clone()
    dm = m.get_model_object("diffusion_model")
    num_blocks, dim, heads = info.num_blocks, info.dim, info.heads
    if weights_patcher is not None:
        try:
            weights_patcher.model.check_compatible(model_family=family.name, dim=dim, heads=heads,
                                                   num_blocks=num_blocks)
        except ValueError as e:
            raise ValueError(f"Apply SALAD Attention: salad_weights do not fit this model: {e}") from None
        weights_patcher = weights_in_compute_dtype(weights_patcher, model)

    state = SaladPatch(dm, opts, weights_patcher, family=family)
    # the window on this model's schedule now, and on the sampled model's own at each run (on_pre_run)
    state.set_sigma_window(m.get_model_object("model_sampling"))
    family.install_recorder(m, state, KEY)
    owned = [i for i in range(num_blocks) if i not in opts.dense_blocks]
    replaced = 0
    for i in owned:
        key = family.self_attn_key(i)
        prev = m.get_model_object(key)
        replaced += hasattr(prev, "_salad_state")
        m.add_object_patch(key, state.make_self_attn_forward(i, prev))
    weights_in_use = _weights_in_use(m, state, owned, num_blocks)
    if weights_in_use:
        m.set_additional_models(KEY, weights_in_use)
    else:
        m.remove_additional_models(KEY)
    m.add_callback_with_key(pe.CallbacksMP.ON_PRE_RUN, KEY, state.on_pre_run)
    m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, KEY, state.on_cleanup)
    if opts.verbose:
        log.info("SALAD: patched %d of %d %s blocks (sparsity %.2f, pattern %s, backend %s, weights %s)%s",
                 len(owned), num_blocks, family.name, opts.sparsity, opts.pattern, opts.backend,
                 "yes" if weights_patcher is not None else "none: sparse-only",
                 f"; replaces an earlier SALAD node on {replaced} blocks" if replaced else "")
    return m


def _weights_in_use(m: Any, state: SaladPatch, owned: Sequence[int], num_blocks: int) -> list:
    """The SALAD weight patchers ``m`` needs after ``state`` took the blocks ``owned``: this node's,
    plus those of earlier SALAD nodes that still own a block this node leaves dense.  When such a block
    holds another node's patch (which may wrap an earlier SALAD forward we cannot see), all earlier
    weights are kept."""
    earlier = list(m.get_additional_models_with_key(KEY))
    owned = set(owned)
    keep_all = False
    in_use = set()
    for i in range(num_blocks):
        if i in owned:
            continue
        f = m.object_patches.get(state.family.self_attn_key(i))
        st = getattr(f, "_salad_state", None)
        if st is not None:
            if st.weights is not None:
                in_use.add(id(st.weights.model))
        elif f is not None:
            keep_all = True
    kept = [w for w in earlier if keep_all or id(w.model) in in_use]
    if state.weights is not None and not any(w.model is state.weights.model for w in kept):
        kept.append(state.weights)
    return kept
