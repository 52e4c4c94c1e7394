"""SALAD weights that do not sit where the activations are (issue 14).

ComfyUI may leave the SALAD weights' ModelPatcher offloaded (partial load, --lowvram, --novram) or hold
them in another dtype than the model computes in.  On a GPU that showed up as a device-mismatch crash
deep in a matmul.  Without a GPU we show the same path with what a CPU has: weights stored in another
dtype than the activations, weights on the ``meta`` device (no data), and the conversion Apply SALAD
Attention makes into the model's compute dtype.
"""
import uuid

import pytest
import torch

from comfy_harness import execution_error, status_str
from graphs import t2v_prompt
from salad_pack.salad_core.attention import SaladConfig, linear_params, salad_self_attention
from salad_pack.salad_core.weights import load_salad_weights, save_salad_weights
from test_salad_in_comfy import STEPS, T2V, _latent, _run_ok, random_weights

SEED = 1234


def _random_weights(dim=256, heads=2, num_blocks=2, seed=SEED, scale=0.05):
    return random_weights(seed, dim=dim, heads=heads, num_blocks=num_blocks, scale=scale)


def _with_weights_to(prompt, dtype, device):
    prompt["70"] = {"class_type": "SALADTest_WeightsTo",
                    "inputs": {"salad_weights": ["8", 0], "dtype": dtype, "device": device}}
    prompt["5"]["inputs"]["salad_weights"] = ["70", 0]
    return prompt


@pytest.fixture(scope="module")
def random_weights_file(comfy_server):
    name = f"placement_{uuid.uuid4().hex[:6]}.safetensors"
    save_salad_weights(_random_weights(), comfy_server.salad_dir / name)
    return name


@pytest.fixture(scope="module")
def fp32_latent(comfy_server, random_weights_file):
    p = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9}, weights_name=random_weights_file,
                   prefix=f"place32_{uuid.uuid4().hex[:6]}")
    return _latent(comfy_server, _run_ok(comfy_server, p))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_weights_in_another_dtype_than_the_activations_run(comfy_server, random_weights_file, fp32_latent, dtype):
    """fp16 / bf16 weights with the fp32 activations of a CPU run: same result as fp32 weights, up to the
    weights' rounding."""
    p = _with_weights_to(t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9}, weights_name=random_weights_file,
                                    prefix=f"place_{dtype}_{uuid.uuid4().hex[:6]}"), dtype, "cpu")
    out = _latent(comfy_server, _run_ok(comfy_server, p))
    rel = ((out - fp32_latent).norm() / fp32_latent.norm()).item()
    assert rel < 2e-2, f"{dtype} weights changed the output by {rel:.3e} (relative)"


def test_weights_without_data_are_a_clear_node_error(comfy_server, random_weights_file):
    p = _with_weights_to(t2v_prompt(T2V, steps=1, salad={"sparsity": 0.9}, weights_name=random_weights_file,
                                    prefix=f"place_meta_{uuid.uuid4().hex[:6]}"), "float32", "meta")
    entry = comfy_server.run(p)
    assert status_str(entry) == "error"
    msg = (execution_error(entry) or {}).get("exception_message", "")
    assert "meta" in msg and random_weights_file in msg, msg
    assert "Apply SALAD Attention" in msg, msg
    # the server keeps serving
    _run_ok(comfy_server, t2v_prompt(T2V, steps=1, prefix=f"place_after_{uuid.uuid4().hex[:6]}"))


def test_apply_converts_weights_to_the_compute_dtype_without_touching_the_loaders(comfy_inprocess, tiny_models,
                                                                                 tmp_path):
    """The patched model holds the weights in its compute dtype; the loader's output stays as it was."""
    import comfy.sd
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.nodes.patch import KEY, PatchOptions, apply_salad, compute_dtype

    # bf16 storage on a CPU ComfyUI computes in fp32 (manual cast): the weights must follow the compute dtype
    model = comfy.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]),
                                          model_options={"dtype": torch.bfloat16})
    assert compute_dtype(model) == torch.float32
    path = save_salad_weights(_random_weights(), tmp_path / "w.safetensors")
    wp = SALADWeightsLoader.wrap(load_salad_weights(path, dtype=torch.bfloat16))
    before = {k: v.clone() for k, v in wp.model.state_dict().items()}
    patched = apply_salad(model, PatchOptions(sparsity=0.9), wp)
    held = patched.get_additional_models_with_key(KEY)[0].model
    assert {p.dtype for p in held.parameters()} == {torch.float32}
    assert {p.dtype for p in wp.model.parameters()} == {torch.bfloat16}
    for k, v in wp.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # same dtype: no copy
    wp32 = SALADWeightsLoader.wrap(load_salad_weights(path))
    assert apply_salad(model, PatchOptions(sparsity=0.9), wp32).get_additional_models_with_key(KEY)[0] is wp32


def test_core_weights_follow_the_activations_dtype_and_refuse_meta():
    """salad_self_attention with proj/gate in another dtype than q matches the same-dtype result; meta
    weights raise a ValueError naming the block, never a matmul error."""
    g = torch.Generator().manual_seed(SEED)
    print("seed", SEED)
    B, grid, H, D = 1, (4, 4, 8), 2, 128
    L = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(B, L, H * D, generator=g) for _ in range(3))
    x = torch.randn(B, L, H * D, generator=g)
    w = _random_weights(dim=H * D, heads=H, num_blocks=1)
    cfg = SaladConfig(sparsity=0.5, pattern="topk", backend="torch")
    with torch.no_grad():
        ref = salad_self_attention(q, k, v, H, grid=grid, x=x, proj=w.proj_for(0), gate=w.gate_for(0), config=cfg)
        w16 = w.to(torch.float16)
        out = salad_self_attention(q, k, v, H, grid=grid, x=x, proj=w16.proj_for(0), gate=w16.gate_for(0),
                                   config=cfg)
        assert out.dtype == q.dtype
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2
        wm = _random_weights(dim=H * D, heads=H, num_blocks=1).to("meta")
        with pytest.raises(ValueError, match="block 0.*meta|meta.*block 0"):
            salad_self_attention(q, k, v, H, grid=grid, x=x, proj=wm.proj_for(0), gate=wm.gate_for(0), config=cfg,
                                 block_id=0)
    lin = torch.nn.Linear(4, 4).to(torch.float16)
    wt, bt = linear_params(lin, torch.zeros(1, dtype=torch.float32))
    assert wt.dtype == bt.dtype == torch.float32
    same = torch.nn.Linear(4, 4)
    assert linear_params(same, torch.zeros(1))[0] is same.weight      # no copy when it already matches
