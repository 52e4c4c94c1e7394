"""Patch a ComfyUI Wan model so its self-attention runs SALAD attention.

How (no ComfyUI file is edited, the user's model object is never touched):
  * ``model.clone()``; everything below is an object patch or callback on the clone, applied by
    ComfyUI when the clone is loaded and removed when another model runs.
  * ``diffusion_model.patch_embedding.forward`` records the latent token grid of each forward
    (ComfyUI >= 0.5 also passes ``transformer_options["grid_sizes"]``, which wins when present).
  * ``diffusion_model.blocks.{i}.self_attn.forward`` for every block we own: for the duration of
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
    activations per call (salad_core.attention.linear_params), as ComfyUI's ops do for offloaded
    layers.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..salad_core.options import DEFAULT_BACKEND, DEFAULT_COMPENSATION, DEFAULT_PATTERN, DEFAULT_SPARSITY

log = logging.getLogger("SALAD")

KEY = "salad"


@dataclass
class PatchOptions:
    sparsity: float = DEFAULT_SPARSITY
    pattern: str = DEFAULT_PATTERN
    start_percent: float = 0.0
    end_percent: float = 1.0
    dense_blocks: frozenset = frozenset()
    backend: str = DEFAULT_BACKEND
    min_tokens: int = 0
    verbose: bool = False
    compensation: str = DEFAULT_COMPENSATION


@dataclass
class RunStats:
    sparse_calls: Counter = field(default_factory=Counter)      # block -> calls run with SALAD
    declined: Counter = field(default_factory=Counter)          # reason -> calls handed on
    kv_mismatch_seen: int = 0                                   # calls with len(q) != len(k): never ours
    shapes: set = field(default_factory=set)

    def summary(self) -> str:
        blocks = ",".join(f"{b}:{n}" for b, n in sorted(self.sparse_calls.items()))
        declined = ",".join(f"{r}:{n}" for r, n in sorted(self.declined.items()))
        return (f"SALAD stats: sparse_calls={{{blocks}}} declined={{{declined}}} "
                f"cross_attention_calls_seen={self.kv_mismatch_seen} shapes={sorted(self.shapes)}")


class SaladPatch:
    """State shared by the object patches of one patched clone."""

    def __init__(self, diffusion_model, opts: PatchOptions, weights=None, sigma_start=None, sigma_end=None):
        from ..salad_core.attention import SaladConfig  # lazy: keeps import of the pack light
        self.opts = opts
        self.weights = weights            # a ComfyUI ModelPatcher whose .model is SaladWeights, or None
        self.config = SaladConfig(sparsity=opts.sparsity, pattern=opts.pattern, backend=opts.backend,
                                  compensation=opts.compensation)
        self.has_ref_conv = getattr(diffusion_model, "ref_conv", None) is not None
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self._grid = None
        self._fresh_forward = True
        self._sigma_cache = (None, None)
        self.stats = RunStats()

    # -- object patches ----------------------------------------------------------------------
    def make_patch_embedding_forward(self, prev_forward):
        def forward(x, *args, **kwargs):
            out = prev_forward(x, *args, **kwargs)
            if self._fresh_forward and out.ndim == 5:
                self._grid = tuple(int(s) for s in out.shape[2:])
                self._fresh_forward = False
            return out
        return forward

    def make_self_attn_forward(self, block: int, prev_forward):
        """The self-attention forward of ``block``.  Built on the pre-SALAD forward: when
        ``prev_forward`` is an earlier SALAD node's forward, that one is replaced (later node wins)."""
        base = getattr(prev_forward, "_salad_base", prev_forward)

        def forward(x, freqs, *args, **kwargs):
            args = list(args)
            if "transformer_options" in kwargs:
                to = kwargs["transformer_options"]
            elif args and isinstance(args[0], dict):
                to = args[0]
            else:
                to = None
            if to is None:
                to = {}
                kwargs["transformer_options"] = to
            self._fresh_forward = True       # the next patch_embedding call starts a new forward
            had = "optimized_attention_override" in to
            previous = to.get("optimized_attention_override")
            if getattr(previous, "_salad_override", False):
                # a later SALAD node (wrapped around another node's patch around us) owns this call
                return base(x, freqs, *args, **kwargs)

            def override(func, q, k, v, heads, *a, **kw):
                return self.attention(func, previous, block, x, q, k, v, heads, *a, **kw)
            override._salad_override = True

            to["optimized_attention_override"] = override
            try:
                return base(x, freqs, *args, **kwargs)
            finally:
                if had:
                    to["optimized_attention_override"] = previous
                else:
                    to.pop("optimized_attention_override", None)
        forward._salad_state = self
        forward._salad_base = base
        return forward

    # -- the attention override --------------------------------------------------------------
    def _decline(self, reason, func, previous, q, k, v, heads, *a, **kw):
        self.stats.declined[reason] += 1
        if previous is not None:
            return previous(func, q, k, v, heads, *a, **kw)
        return func(q, k, v, heads, *a, **kw)

    def _in_sigma_window(self, transformer_options) -> bool:
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

    def grid_for(self, transformer_options):
        g = transformer_options.get("grid_sizes") if transformer_options else None
        if g is not None:
            return tuple(int(s) for s in g)
        return self._grid

    def attention(self, func, previous, block, x, q, k, v, heads, *a, **kw):
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
        grid = self.grid_for(to)
        if grid is None:
            return self._decline("no_grid", func, previous, q, k, v, heads, *a, **kw)
        n_video = grid[0] * grid[1] * grid[2]
        extra = L - n_video
        if extra < 0:
            return self._decline("grid_mismatch", func, previous, q, k, v, heads, *a, **kw)
        n_front, n_back = (extra, 0) if self.has_ref_conv else (0, extra)

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
    def on_cleanup(self, *args, **kwargs):
        if self.stats.sparse_calls or self.stats.declined:
            msg = self.stats.summary()
            if self.opts.verbose:
                log.info(msg)
            else:
                log.debug(msg)
        self.stats = RunStats()
        self._grid = None
        self._fresh_forward = True
        self._sigma_cache = (None, None)


_SALAD_CALL = None


def _salad_call():
    """salad_self_attention, kept out of torch.compile graphs (TorchCompileModel traces through
    ComfyUI's attention wrapper into this override; the Triton kernels and the data-dependent block
    lists run eagerly, the rest of the model stays compiled)."""
    global _SALAD_CALL
    if _SALAD_CALL is None:
        from ..salad_core.attention import salad_self_attention
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        _SALAD_CALL = disable(salad_self_attention) if disable is not None else salad_self_attention
    return _SALAD_CALL


def wan_model_info(model, node_name: str) -> dict:
    """dim / heads / block count of a ComfyUI Wan ModelPatcher; a clear error for anything else."""
    dm = model.get_model_object("diffusion_model")
    blocks = getattr(dm, "blocks", None)
    if blocks is None or not hasattr(dm, "patch_embedding") or not all(hasattr(b, "self_attn") for b in blocks):
        raise ValueError(f"{node_name}: model input is a {type(dm).__name__}; SALAD supports Wan 2.1 / 2.2 video "
                         f"models (WanModel and its variants)")
    dim = int(getattr(dm, "dim", 0) or blocks[0].self_attn.dim)
    heads = int(getattr(dm, "num_heads", 0) or blocks[0].self_attn.num_heads)
    model_type = getattr(model.model, "model_type", None)
    base = f"wan-{type(model.model).__name__.lower()}-dim{dim}-{len(blocks)}blocks"
    return dict(dim=dim, heads=heads, num_blocks=len(blocks), base_model=base, model_type=str(model_type))


def compute_dtype(model):
    """The dtype a ComfyUI model computes in: the manual-cast dtype for fp8 / low-precision weights,
    else its weight dtype."""
    base = model.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def weights_in_compute_dtype(weights_patcher, model):
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


def apply_salad(model, opts: PatchOptions, weights_patcher=None):
    """Return a patched clone of the ComfyUI ModelPatcher ``model``."""
    import comfy.patcher_extension as pe

    info = wan_model_info(model, "Apply SALAD Attention")
    m = model.clone()
    dm = m.get_model_object("diffusion_model")
    num_blocks, dim, heads = info["num_blocks"], info["dim"], info["heads"]
    if weights_patcher is not None:
        try:
            weights_patcher.model.check_compatible(model_family="wan", dim=dim, heads=heads, num_blocks=num_blocks)
        except ValueError as e:
            raise ValueError(f"Apply SALAD Attention: salad_weights do not fit this model: {e}") from None
        weights_patcher = weights_in_compute_dtype(weights_patcher, model)

    sigma_start = sigma_end = None
    if opts.start_percent > 0.0 or opts.end_percent < 1.0:
        ms = m.get_model_object("model_sampling")
        sigma_start = float(ms.percent_to_sigma(opts.start_percent))
        sigma_end = float(ms.percent_to_sigma(opts.end_percent))

    state = SaladPatch(dm, opts, weights_patcher, sigma_start, sigma_end)
    key = "diffusion_model.patch_embedding.forward"
    m.add_object_patch(key, state.make_patch_embedding_forward(m.get_model_object(key)))
    owned = [i for i in range(num_blocks) if i not in opts.dense_blocks]
    replaced = 0
    for i in owned:
        key = f"diffusion_model.blocks.{i}.self_attn.forward"
        prev = m.get_model_object(key)
        replaced += hasattr(prev, "_salad_state")
        m.add_object_patch(key, state.make_self_attn_forward(i, prev))
    weights_in_use = _weights_in_use(m, state, owned, num_blocks)
    if weights_in_use:
        m.set_additional_models(KEY, weights_in_use)
    else:
        m.remove_additional_models(KEY)
    m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, KEY, state.on_cleanup)
    if opts.verbose:
        log.info("SALAD: patched %d of %d blocks (sparsity %.2f, pattern %s, backend %s, weights %s)%s",
                 len(owned), num_blocks, opts.sparsity, opts.pattern, opts.backend,
                 "yes" if weights_patcher is not None else "none: sparse-only",
                 f"; replaces an earlier SALAD node on {replaced} blocks" if replaced else "")
    return m


def _weights_in_use(m, state, owned, num_blocks):
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
        f = m.object_patches.get(f"diffusion_model.blocks.{i}.self_attn.forward")
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
