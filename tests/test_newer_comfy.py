"""What newer ComfyUI passes to attention, and core's "Model Sparse Attention" chaining with SALAD (issue 11).

ComfyUI newer than 0.3.75 cannot be installed here, so these tests reproduce, on the real 0.3.75, what the
newest upstream files do (read one by one):
  * comfy/ldm/wan/model.py puts ``grid_sizes`` (post-patch T, H, W), ``block_index``, ``total_blocks`` and
    ``block_type`` into transformer_options and calls the override as
    ``override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, transformer_options=..., ...)``;
  * comfy_extras/nodes_sparse_attention.py (core's "Model Sparse Attention", Sol-Attn) installs its override
    on the patched model's transformer_options and re-installs it before every step (ON_PREPARE_STATE) on
    top of whatever is current, handing declined calls to the previous override.
The fixture node SALADTest_CoreStyleSparseOverride installs an override exactly that way.  SALAD, in either
order, must own the self-attention of the blocks it covers and hand everything else (cross-attention, its
dense blocks) to core's override, so the two compose instead of one silently replacing the other.
"""
import re
import uuid

import pytest
import torch

from graphs import t2v_prompt
from test_salad_in_comfy import STEPS, T2V, _latent, _parse_counter, _run_ok, _stats_after, _uniq


def _core_counts(log, tag):
    m = re.search(rf"CORE-STYLE OVERRIDE {tag} self=(\d+) cross=(\d+)", log)
    assert m, log[-2000:]
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("order", ["core_then_salad", "salad_then_core"])
def test_core_sparse_node_and_salad_compose_in_either_order(comfy_server, order):
    prompt = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.8, "pattern": "topk", "dense_blocks": "1"},
                        prefix=_uniq(order))
    tag = uuid.uuid4().hex[:6]
    if order == "core_then_salad":
        prompt["20"] = {"class_type": "SALADTest_CoreStyleSparseOverride", "inputs": {"model": ["1", 0], "tag": tag}}
        prompt["5"]["inputs"]["model"] = ["20", 0]
    else:
        prompt["20"] = {"class_type": "SALADTest_CoreStyleSparseOverride", "inputs": {"model": ["5", 0], "tag": tag}}
        prompt["6"]["inputs"]["model"] = ["20", 0]
    mark = len(comfy_server.log())
    _run_ok(comfy_server, prompt)
    log = comfy_server.log()[mark:]
    self_calls, cross_calls = _core_counts(log, tag)
    # core's override gets block 1's self-attention (SALAD leaves it dense) and every cross-attention call
    assert self_calls == STEPS * 1, log[-2000:]
    assert cross_calls == STEPS * 2, log[-2000:]
    sparse, _declined, _ = _stats_after(comfy_server, mark)[-1]
    assert _parse_counter(sparse) == {0: STEPS}


def test_core_style_override_alone_is_exact_and_salad_result_does_not_depend_on_order(comfy_server):
    """Core-style override computing ComfyUI's own attention leaves the output as it was; SALAD with it gives
    the same latent in both orders (the override only sees calls SALAD hands on)."""
    plain = _latent(comfy_server, _run_ok(comfy_server, t2v_prompt(T2V, steps=STEPS, prefix=_uniq("plain"))))
    p = t2v_prompt(T2V, steps=STEPS, prefix=_uniq("core_only"))
    p["20"] = {"class_type": "SALADTest_CoreStyleSparseOverride", "inputs": {"model": ["1", 0], "tag": "x"}}
    p["6"]["inputs"]["model"] = ["20", 0]
    assert torch.equal(_latent(comfy_server, _run_ok(comfy_server, p)), plain)
    outs = []
    for order in ("a", "b"):
        q = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9}, prefix=_uniq(f"ord_{order}"))
        q["20"] = {"class_type": "SALADTest_CoreStyleSparseOverride",
                   "inputs": {"model": ["1", 0] if order == "a" else ["5", 0], "tag": order}}
        if order == "a":
            q["5"]["inputs"]["model"] = ["20", 0]
        else:
            q["6"]["inputs"]["model"] = ["20", 0]
        outs.append(_latent(comfy_server, _run_ok(comfy_server, q)))
    assert torch.equal(outs[0], outs[1])


def test_newest_override_signature_and_block_keys(comfy_inprocess, tiny_models):
    """The override SALAD installs accepts the newest call form (keyword mask/attn_precision/skip_* and
    transformer_options with block_index / total_blocks / block_type / grid_sizes) and uses grid_sizes."""
    from salad_pack.nodes.apply import SALADApplyAttention
    import comfy.sd
    import comfy.patcher_extension as pe

    base = comfy.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]))
    m = SALADApplyAttention().apply(base, 0.9, "topk", 0.0, 1.0, "", "torch")[0]
    state = [c.__self__ for c in m.get_all_callbacks(pe.CallbacksMP.ON_CLEANUP)
             if type(getattr(c, "__self__", None)).__name__ == "SaladPatch"][0]
    dm = m.get_model_object("diffusion_model")
    seen = {}

    def newest_style_call(block):
        """Call block ``block``'s patched self-attention forward and, inside it, the override the newest
        ComfyUI way; return what the override got."""
        g = torch.Generator().manual_seed(block)
        L, dim = 3 * 8 * 8, 256
        x = torch.randn(1, L, dim, generator=g)
        q, k, v = (torch.randn(1, L, dim, generator=g) for _ in range(3))
        to = {"grid_sizes": (3, 8, 8), "block_index": block, "total_blocks": 2, "block_type": "double"}

        def fake_base(x_, freqs, transformer_options=None, **kw):
            o = transformer_options["optimized_attention_override"]

            def default(q_, k_, v_, heads, **kw_):
                seen[block] = ("default", kw_.get("transformer_options", {}).get("block_index"))
                return q_
            return o(default, q, k, v, 2, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, transformer_options=transformer_options)
        fwd = state.make_self_attn_forward(block, fake_base)
        return fwd(x, None, transformer_options=to)

    for b in (0, 1):
        out = newest_style_call(b)
        assert out.shape == (1, 192, 256) and out.isfinite().all()
    assert dict(state.stats.sparse_calls) == {0: 1, 1: 1} and not seen      # SALAD ran, nothing handed on
    assert {g for _s, g in state.stats.shapes} == {(3, 8, 8)}
    assert dm is m.get_model_object("diffusion_model")
