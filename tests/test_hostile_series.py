"""Hostile tests in a real ComfyUI (issue 8): two SALAD nodes in series, weight files changed on disk,
pipes in models/salad, node inputs at and past their limits, huge inputs in errors, models we do not
support."""
import os
import re
import uuid

import pytest
import torch

from comfy_harness import PromptRejected, execution_error, status_str
from graphs import t2v_prompt
from salad_pack.salad_core.weights import save_salad_weights
from test_salad_in_comfy import STEPS, T2V, _latent, _parse_counter, _run_ok, _stats_after, _uniq
from test_salad_in_comfy import random_weights as _weights


@pytest.fixture(scope="module")
def two_files(comfy_server):
    names = []
    for seed in (1, 2):
        name = f"series_{seed}_{uuid.uuid4().hex[:6]}.safetensors"
        save_salad_weights(_weights(seed), comfy_server.salad_dir / name)
        names.append(name)
    return names


def _series(first: dict, second: dict, w1=None, w2=None, between=None, prefix="ser"):
    """UNETLoader -> SALAD(first) -> [between] -> SALAD(second) -> KSampler."""
    p = t2v_prompt(T2V, steps=STEPS, salad=first, weights_name=w1, prefix=_uniq(prefix))
    src = ["5", 0]
    if between is not None:
        p["20"] = {"class_type": "SALADTest_RecordingOverride", "inputs": {"model": src, "tag": between}}
        src = ["20", 0]
    inputs = dict(p["5"]["inputs"])
    inputs.pop("salad_weights", None)
    inputs.update(second, model=src)
    p["50"] = {"class_type": "SALADApplyAttention", "inputs": inputs}
    if w2 is not None:
        p["51"] = {"class_type": "SALADWeightsLoader", "inputs": {"weights_name": w2}}
        inputs["salad_weights"] = ["51", 0]
    p["6"]["inputs"]["model"] = ["50", 0]
    return p


def _single(cfg, w=None, prefix="one"):
    return t2v_prompt(T2V, steps=STEPS, salad=cfg, weights_name=w, prefix=_uniq(prefix))


A = {"sparsity": 0.5, "pattern": "window"}
B = {"sparsity": 0.9, "pattern": "topk"}


def test_series_later_node_wins_without_weights(comfy_server):
    single_b = _latent(comfy_server, _run_ok(comfy_server, _single(B)))
    single_a = _latent(comfy_server, _run_ok(comfy_server, _single(A)))
    both = _latent(comfy_server, _run_ok(comfy_server, _series(A, B)))
    assert not torch.equal(single_a, single_b)
    assert torch.equal(both, single_b)


def test_series_with_two_weight_files_uses_the_later_file(comfy_server, two_files):
    w1, w2 = two_files
    single_w2 = _latent(comfy_server, _run_ok(comfy_server, _single(B, w2)))
    single_w1 = _latent(comfy_server, _run_ok(comfy_server, _single(B, w1)))
    both = _latent(comfy_server, _run_ok(comfy_server, _series(B, B, w1, w2)))
    assert not torch.equal(single_w1, single_w2)
    assert torch.equal(both, single_w2)


def test_series_dense_blocks_of_the_later_node_keep_the_earlier_salad(comfy_server, two_files):
    w1, w2 = two_files
    mark = len(comfy_server.log())
    out = _latent(comfy_server, _run_ok(comfy_server, _series(A, dict(B, dense_blocks="1"), w1, w2)))
    counters = sorted((_parse_counter(s[0]) for s in _stats_after(comfy_server, mark)), key=lambda c: sorted(c))
    assert counters == [{0: STEPS}, {1: STEPS}], counters      # later node: block 0, earlier node: block 1
    single_w2 = _latent(comfy_server, _run_ok(comfy_server, _single(dict(B, dense_blocks="1"), w2)))
    assert not torch.equal(out, single_w2)                      # block 1 is not dense: the earlier node runs it


def test_series_with_another_override_between(comfy_server, two_files):
    w1, w2 = two_files
    tag = uuid.uuid4().hex[:6]
    mark = len(comfy_server.log())
    both = _latent(comfy_server, _run_ok(comfy_server, _series(A, B, w1, w2, between=tag)))
    log = comfy_server.log()[mark:]
    rec = re.search(rf"RECORDING OVERRIDE {tag} self=(\d+) cross=(\d+)", log)
    assert rec and int(rec.group(1)) == 0 and int(rec.group(2)) == STEPS * 2, log[-1500:]
    single_w2 = _latent(comfy_server, _run_ok(comfy_server, _single(B, w2)))
    assert torch.equal(both, single_w2)
    # the later node leaves block 1 dense: the earlier SALAD runs it, on top of the recording override
    tag2 = uuid.uuid4().hex[:6]
    mark = len(comfy_server.log())
    _run_ok(comfy_server, _series(A, dict(B, dense_blocks="1"), w1, w2, between=tag2))
    counters = sorted((_parse_counter(s[0]) for s in _stats_after(comfy_server, mark)), key=lambda c: sorted(c))
    assert counters == [{0: STEPS}, {1: STEPS}], counters


def test_series_keeps_the_weight_patchers_in_use(comfy_inprocess, tiny_models):
    from salad_pack.nodes.apply import SALADApplyAttention
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.nodes.patch import KEY
    base = comfy_inprocess.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]))
    p1, p2 = (SALADWeightsLoader.wrap(_weights(s)) for s in (1, 2))
    node = SALADApplyAttention()
    a = node.apply(base, 0.5, "window", 0.0, 1.0, "", "torch", p1)[0]
    b_all = node.apply(a, 0.9, "topk", 0.0, 1.0, "", "torch", p2)[0]
    b_part = node.apply(a, 0.9, "topk", 0.0, 1.0, "1", "torch", p2)[0]
    b_none = node.apply(a, 0.9, "topk", 0.0, 1.0, "1", "torch")[0]
    models = lambda m: [w.model for w in m.get_additional_models_with_key(KEY)]  # noqa: E731
    assert models(a) == [p1.model]
    assert models(b_all) == [p2.model]
    assert models(b_part) == [p1.model, p2.model]
    assert models(b_none) == [p1.model]
    # the later node's forward is built on the original forward, not on the earlier SALAD one
    key = "diffusion_model.blocks.0.self_attn.forward"
    assert b_all.object_patches[key]._salad_base is a.object_patches[key]._salad_base
    assert b_part.object_patches["diffusion_model.blocks.1.self_attn.forward"] is \
        a.object_patches["diffusion_model.blocks.1.self_attn.forward"]


# ----------------------------------------------------------------------------------------------
# defect 4: weight files changed on disk
# ----------------------------------------------------------------------------------------------

def test_overwritten_weight_file_is_reloaded(comfy_server):
    name = f"live_{uuid.uuid4().hex[:6]}.safetensors"
    path = comfy_server.salad_dir / name
    save_salad_weights(_weights(11), path)
    first = _latent(comfy_server, _run_ok(comfy_server, _single(B, name, "live1")))
    save_salad_weights(_weights(12), path)                  # other weights, same name
    second = _latent(comfy_server, _run_ok(comfy_server, _single(B, name, "live2")))
    assert not torch.equal(first, second), "the old weights were reused after the file changed"
    fresh = f"fresh_{uuid.uuid4().hex[:6]}.safetensors"
    save_salad_weights(_weights(12), comfy_server.salad_dir / fresh)
    assert torch.equal(second, _latent(comfy_server, _run_ok(comfy_server, _single(B, fresh, "fresh"))))
    path.write_bytes(b"garbage" * 100)                      # garbage, same name
    entry = comfy_server.run(_single(B, name, "live3"))
    assert status_str(entry) == "error", "a garbage weight file reported success"
    err = execution_error(entry)
    assert err["node_type"] == "SALADWeightsLoader" and name in err["exception_message"], err


# ----------------------------------------------------------------------------------------------
# defect 6 (node side): pipes and devices in models/salad
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_pipe_and_device_in_models_salad_are_not_listed_nor_read(comfy_server):
    pipe = f"pipe_{uuid.uuid4().hex[:6]}.safetensors"
    zero = f"zero_{uuid.uuid4().hex[:6]}.safetensors"
    os.mkfifo(comfy_server.salad_dir / pipe)
    (comfy_server.salad_dir / zero).symlink_to("/dev/zero")
    listed = comfy_server.get("/object_info/SALADWeightsLoader")["SALADWeightsLoader"]["input"]["required"][
        "weights_name"][0]
    assert pipe not in listed and zero not in listed
    for name in (pipe, zero):
        try:
            entry = comfy_server.run(_single(B, name, "pipe"), timeout=60)
        except PromptRejected as e:         # refused at validation: not in the list
            assert "weights_name" in str(e.body) and "not in models/salad" not in str(e.body)
        else:
            msg = execution_error(entry)["exception_message"]
            assert "not a regular file" in msg, msg
    assert comfy_server.alive()
    # the loader itself, called on such a name, names the real cause and does not block
    from salad_pack.salad_core.weights import SaladWeightsError, load_salad_weights
    with pytest.raises(SaladWeightsError, match="not a regular file"):
        load_salad_weights(comfy_server.salad_dir / pipe)


# ----------------------------------------------------------------------------------------------
# node inputs at and past their limits (through the HTTP API)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, 0.99])
def test_sparsity_at_its_limits_runs(comfy_server, value):
    _run_ok(comfy_server, _single({"sparsity": value}, prefix="lim"))


def _error_of(server, prompt):
    """(where, message): 'validation' when POST /prompt refused it, 'node' for a node error."""
    try:
        entry = server.run(prompt)
    except PromptRejected as e:
        return "validation", str(e.body)
    assert status_str(entry) == "error", "accepted"
    err = execution_error(entry)
    assert err["node_type"] == "SALADApplyAttention", err
    return "node", err["exception_message"]


@pytest.mark.parametrize("inputs,needle", [
    ({"sparsity": -0.01}, "sparsity"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": float("nan")}, "sparsity"),
    ({"sparsity": float("inf")}, "sparsity"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
    ({"end_percent": 1.5}, "end_percent"),
    ({"dense_blocks": "zero,one"}, "dense_blocks"),
    ({"dense_blocks": "0-1000000000"}, "dense_blocks"),
    ({"dense_blocks": "-99"}, "dense_blocks"),
    ({"dense_blocks": "1-0"}, "dense_blocks"),
    ({"dense_blocks": "9" * 5000}, "dense_blocks"),
    ({"min_tokens": 10 ** 12}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"pattern": "diagonal"}, "pattern"),
    ({"backend": "cuda"}, "backend"),
])
def test_inputs_past_their_limits_are_named(comfy_server, inputs, needle):
    where, msg = _error_of(comfy_server, _single(inputs, prefix="bad"))
    assert needle in msg, (where, msg[:500])
    assert len(msg) < 3000, (where, len(msg))
    assert comfy_server.alive()


def test_huge_input_is_not_echoed_in_errors(comfy_server):
    huge = "0," * 500_000 + "x"                              # 1 MB dense_blocks
    where, msg = _error_of(comfy_server, _single({"dense_blocks": huge}, prefix="huge"))
    assert where == "node" and "dense_blocks" in msg and "chars)" in msg
    assert len(msg) < 1000, len(msg)                          # was 2 MB (input quoted twice)


def test_min_tokens_at_its_limit_keeps_everything_dense(comfy_server):
    mark = len(comfy_server.log())
    _run_ok(comfy_server, _single({"min_tokens": 1_000_000}, prefix="mt"))
    sparse, declined, _ = _stats_after(comfy_server, mark)[-1]
    assert _parse_counter(sparse) == {} and _parse_counter(declined).get("short") == 2 * STEPS


# ----------------------------------------------------------------------------------------------
# models we do not support
# ----------------------------------------------------------------------------------------------

def _patcher(comfy, diffusion_model):
    import comfy.model_patcher
    holder = torch.nn.Module()
    holder.diffusion_model = diffusion_model
    return comfy.model_patcher.ModelPatcher(holder, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def _tiny_flux(comfy):
    import comfy.ldm.flux.model as flux
    import comfy.ops
    return flux.Flux(image_model=None, in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8,
                     hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                     axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
                     operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32)


def _tiny_sd_unet(comfy):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    return UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=2, use_spatial_transformer=True, context_dim=16,
                     transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                     operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32)


class _LookAlike(torch.nn.Module):
    """Has `blocks` and `patch_embedding` like Wan, but its blocks have no self_attn."""
    def __init__(self):
        super().__init__()
        self.patch_embedding = torch.nn.Conv3d(4, 8, 1)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])


@pytest.mark.parametrize("build", ["flux", "sd_unet", "lookalike", "empty"])
def test_unsupported_model_families_are_a_clear_error(comfy_inprocess, build):
    from salad_pack.nodes.apply import SALADApplyAttention
    dm = {"flux": _tiny_flux, "sd_unet": _tiny_sd_unet, "lookalike": lambda c: _LookAlike(),
          "empty": lambda c: torch.nn.Identity()}[build](comfy_inprocess)
    m = _patcher(comfy_inprocess, dm)
    with pytest.raises(ValueError, match="SALAD supports Wan") as ei:
        SALADApplyAttention().apply(m, 0.9, "topk", 0.0, 1.0, "", "torch")
    assert type(dm).__name__ in str(ei.value)
