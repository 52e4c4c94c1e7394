"""SALAD inside a real headless ComfyUI (CPU): numerics, patch scope, model isolation, bad files."""
import re
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_harness import execution_error, output_files, status_str
from graphs import t2v_prompt
from salad_pack.salad_core.weights import SaladWeights, save_salad_weights

STEPS = 2
T2V = "wan21_t2v_tiny.safetensors"


def _latent(server, entry, node_prefix=None):
    files = [f for f in output_files(entry) if f["filename"].endswith(".latent")]
    if node_prefix:
        files = [f for f in files if f["filename"].startswith(node_prefix)]
    assert files, entry.get("outputs")
    f = files[0]
    return load_file(str(server.output / f.get("subfolder", "") / f["filename"]))["latent_tensor"]


def _run_ok(server, prompt):
    entry = server.run(prompt)
    err = execution_error(entry)
    assert status_str(entry) == "success", (err or {}).get("exception_message", err) if err else entry.get("status")
    return entry


def _uniq(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _stats_after(server, mark):
    """The SALAD stats lines logged after log offset ``mark``."""
    return re.findall(r"SALAD stats: sparse_calls=\{([^}]*)\} declined=\{([^}]*)\} cross_attention_calls_seen=(\d+)",
                      server.log()[mark:])


def _parse_counter(text):
    return {(int(k) if k.isdigit() else k): int(v) for k, v in (kv.split(":") for kv in text.split(",") if kv)}


def random_weights(seed, dim=256, heads=2, num_blocks=2, scale=0.05):
    """SALAD weights with every gate/Proj parameter ~ N(0, scale^2) from ``seed`` (the linear branch runs)."""
    w = SaladWeights.new(dim=dim, heads=heads, num_blocks=num_blocks, base_model="wan21_t2v_tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in w.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return w


def _zero_weights(server, name, dim=256, heads=2, num_blocks=2, **kw):
    w = SaladWeights.new(dim=dim, heads=heads, num_blocks=num_blocks, base_model="wan21_t2v_tiny", **kw)
    return save_salad_weights(w, server.salad_dir / name)


@pytest.fixture(scope="module")
def dense_latent(comfy_server):
    entry = _run_ok(comfy_server, t2v_prompt(T2V, steps=STEPS, prefix=_uniq("dense")))
    return _latent(comfy_server, entry)


def test_sparsity_zero_with_zero_proj_reproduces_unpatched(comfy_server, dense_latent):
    _zero_weights(comfy_server, "zero_tiny.safetensors")
    entry = _run_ok(comfy_server, t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.0},
                                             weights_name="zero_tiny.safetensors", prefix=_uniq("s0")))
    out = _latent(comfy_server, entry)
    err = (out - dense_latent).abs().max() / dense_latent.abs().max()
    assert err < 2e-3, f"relative max error {err}"


def test_sparse_run_differs_and_owns_exactly_the_self_attention(comfy_server, dense_latent):
    mark = len(comfy_server.log())
    entry = _run_ok(comfy_server, t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9, "pattern": "topk"},
                                             prefix=_uniq("s9")))
    out = _latent(comfy_server, entry)
    assert out.isfinite().all()
    rel = (out - dense_latent).norm() / dense_latent.norm()
    assert rel > 1e-3, "90% sparse attention gave the dense result: SALAD did not run"
    stats = _stats_after(comfy_server, mark)
    assert stats, comfy_server.log()[mark:][-2000:]
    sparse, declined, cross_seen = stats[-1]
    # cond+uncond go through the model together: one self-attention call per block and step
    assert _parse_counter(sparse) == {0: STEPS, 1: STEPS}
    assert _parse_counter(declined) == {}
    assert int(cross_seen) == 0


@pytest.mark.parametrize("pattern", ["window", "topk"])
def test_dense_blocks_and_earlier_override_are_respected(comfy_server, pattern):
    """An earlier (non-chaining) override keeps getting every call we do not own: all cross-attention and
    the self-attention of dense blocks; SALAD runs only on the blocks it owns."""
    prompt = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.8, "pattern": pattern, "dense_blocks": "1"},
                        prefix=_uniq("rec"))
    tag = uuid.uuid4().hex[:6]
    prompt["20"] = {"class_type": "SALADTest_RecordingOverride", "inputs": {"model": ["1", 0], "tag": tag}}
    prompt["5"]["inputs"]["model"] = ["20", 0]
    mark = len(comfy_server.log())
    _run_ok(comfy_server, prompt)
    log = comfy_server.log()[mark:]
    rec = re.search(rf"RECORDING OVERRIDE {tag} self=(\d+) cross=(\d+)", log)
    assert rec, log[-2000:]
    assert int(rec.group(1)) == STEPS * 1      # block 1 stays dense -> its self-attention reaches the earlier override
    assert int(rec.group(2)) == STEPS * 2      # every cross-attention call (2 blocks) stays dense
    sparse, declined, _ = _stats_after(comfy_server, mark)[-1]
    assert _parse_counter(sparse) == {0: STEPS}


def test_original_model_is_not_mutated(comfy_server):
    """One graph: A = unpatched model; B = SALAD on the same loaded model; C = unpatched again, forced to run
    after B (its empty latent is B's output times 0). C must equal A bit for bit."""
    p = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9}, prefix=_uniq("B"))
    pa, pc = _uniq("A"), _uniq("C")
    p["30"] = {"class_type": "KSampler", "inputs": dict(p["6"]["inputs"], model=["1", 0])}
    p["31"] = {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": pa}}
    p["32"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["6", 0], "multiplier": 0.0}}
    p["33"] = {"class_type": "KSampler", "inputs": dict(p["6"]["inputs"], model=["1", 0], latent_image=["32", 0])}
    p["34"] = {"class_type": "SaveLatent", "inputs": {"samples": ["33", 0], "filename_prefix": pc}}
    entry = _run_ok(comfy_server, p)
    a, b, c = _latent(comfy_server, entry, pa), _latent(comfy_server, entry, p["7"]["inputs"]["filename_prefix"]), \
        _latent(comfy_server, entry, pc)
    assert torch.equal(a, c)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("unet,channels", [("wan21_i2v_tiny.safetensors", 16), ("wan22_5b_tiny.safetensors", 48)])
def test_other_wan_variants_run(comfy_server, unet, channels):
    mark = len(comfy_server.log())
    _run_ok(comfy_server, t2v_prompt(unet, steps=STEPS, channels=channels, salad={"sparsity": 0.9},
                                     prefix=_uniq("var")))
    sparse, _declined, cross = _stats_after(comfy_server, mark)[-1]
    assert _parse_counter(sparse) == {0: STEPS, 1: STEPS} and int(cross) == 0


def test_wan22_high_low_pair_with_two_salad_nodes(comfy_server):
    p = t2v_prompt(T2V, steps=4, salad={"sparsity": 0.9}, prefix=_uniq("hl"))
    p["6"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["5", 0], "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 3.0, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    p["40"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "wan21_t2v_tiny_3blk.safetensors",
                                                      "weight_dtype": "default"}}
    p["41"] = {"class_type": "SALADApplyAttention", "inputs": dict(p["5"]["inputs"], model=["40", 0], sparsity=0.8)}
    p["42"] = {"class_type": "KSamplerAdvanced", "inputs": dict(p["6"]["inputs"], model=["41", 0], add_noise="disable",
                                                                latent_image=["6", 0], start_at_step=2,
                                                                end_at_step=10000,
                                                                return_with_leftover_noise="disable")}
    p["7"]["inputs"]["samples"] = ["42", 0]
    mark = len(comfy_server.log())
    _run_ok(comfy_server, p)
    stats = _stats_after(comfy_server, mark)
    counters = sorted((_parse_counter(s[0]) for s in stats), key=len)
    assert counters == [{0: 2, 1: 2}, {0: 2, 1: 2, 2: 2}]


def test_lora_model_works(comfy_server, tmp_path):
    g = torch.Generator().manual_seed(5)
    lora = {}
    for b in range(2):
        for proj in ("q", "k", "v"):
            base = f"diffusion_model.blocks.{b}.self_attn.{proj}"
            lora[f"{base}.lora_up.weight"] = torch.randn(256, 4, generator=g) * 0.5
            lora[f"{base}.lora_down.weight"] = torch.randn(4, 256, generator=g) * 0.5
    lora_dir = comfy_server.models / "loras"
    lora_dir.mkdir(exist_ok=True)
    save_file(lora, str(lora_dir / "tiny_lora.safetensors"))
    p = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9}, prefix=_uniq("lora"))
    ref = _latent(comfy_server, _run_ok(comfy_server, p))
    p["50"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "tiny_lora.safetensors",
                                                               "strength_model": 1.0}}
    p["5"]["inputs"]["model"] = ["50", 0]
    p["7"]["inputs"]["filename_prefix"] = _uniq("lora2")
    mark = len(comfy_server.log())
    out = _latent(comfy_server, _run_ok(comfy_server, p))
    assert not torch.allclose(out, ref)
    sparse, _d, _c = _stats_after(comfy_server, mark)[-1]
    assert _parse_counter(sparse) == {0: STEPS, 1: STEPS}


def _bad_files(server):
    d = server.salad_dir
    good = SaladWeights.new(dim=256, heads=2, num_blocks=2, base_model="wan21_t2v_tiny")
    p = save_salad_weights(good, d / "good_source.safetensors")
    raw = p.read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    torch.save({"blocks.0.proj.weight": torch.zeros(2, 2)}, str(d / "pickled.safetensors"))
    nan = SaladWeights.new(dim=256, heads=2, num_blocks=2, base_model="wan21_t2v_tiny")
    with torch.no_grad():
        nan.proj_for(1).weight[3, 4] = float("nan")
    # save_salad_weights may refuse NaN; write the file with plain safetensors then
    sd = {k: t.detach().clone() for k, t in nan.state_dict().items()}
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        load_meta = f.metadata()
    sd = {f"blocks.{k.split('.')[1]}.{k.split('.')[0]}.{k.split('.')[2]}": v for k, v in sd.items()}
    save_file(sd, str(d / "nan.safetensors"), metadata=load_meta)
    _zero_weights(server, "other_size.safetensors", dim=384, heads=3, num_blocks=3)
    return {"truncated.safetensors": "truncated", "pickled.safetensors": "pickled",
            "nan.safetensors": "nan", "other_size.safetensors": "other_size"}


def test_bad_weight_files_give_clear_node_errors_and_server_keeps_serving(comfy_server):
    expected = {"truncated.safetensors": "", "pickled.safetensors": "safetensors",
                "nan.safetensors": "blocks.1.proj.weight", "other_size.safetensors": "dim 384"}
    for name in _bad_files(comfy_server):
        entry = comfy_server.run(t2v_prompt(T2V, steps=1, salad={"sparsity": 0.9}, weights_name=name,
                                            prefix=_uniq("bad")))
        assert status_str(entry) == "error", name
        err = execution_error(entry)
        assert err is not None and name in err["exception_message"], (name, err)
        assert expected[name] in err["exception_message"], (name, err["exception_message"])
        print(name, "->", err["exception_message"])
        assert err["node_type"] in ("SALADWeightsLoader", "SALADApplyAttention"), err
        assert "Traceback" not in err["exception_message"]
        assert comfy_server.alive()
    # the next good prompt runs
    _run_ok(comfy_server, t2v_prompt(T2V, steps=1, salad={"sparsity": 0.5}, prefix=_uniq("after")))


def test_bad_dense_blocks_input_is_named(comfy_server):
    entry = comfy_server.run(t2v_prompt(T2V, steps=1, salad={"dense_blocks": "0,7"}, prefix=_uniq("db")))
    assert status_str(entry) == "error"
    msg = execution_error(entry)["exception_message"]
    assert "dense_blocks" in msg and "7" in msg and "2 blocks" in msg


def test_start_percent_keeps_early_steps_dense(comfy_server):
    mark = len(comfy_server.log())
    _run_ok(comfy_server, t2v_prompt(T2V, steps=4, salad={"sparsity": 0.9, "start_percent": 0.5},
                                     prefix=_uniq("pct")))
    sparse, declined, _ = _stats_after(comfy_server, mark)[-1]
    sparse, declined = _parse_counter(sparse), _parse_counter(declined)
    assert set(sparse) == {0, 1} and 0 < sparse[0] < 4
    assert declined.get("outside_percent", 0) + sum(sparse.values()) == 4 * 2


def test_fp8_weight_model_works(comfy_server):
    """Quantised weights (ComfyUI's fp8 storage, cast on the fly) are invisible to SALAD: it only sees the
    activations that reach attention."""
    p = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9}, prefix=_uniq("fp8"))
    p["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    mark = len(comfy_server.log())
    out = _latent(comfy_server, _run_ok(comfy_server, p))
    assert out.isfinite().all()
    sparse, _d, cross = _stats_after(comfy_server, mark)[-1]
    assert _parse_counter(sparse) == {0: STEPS, 1: STEPS} and int(cross) == 0


def test_triton_backend_on_cpu_is_a_clear_node_error(comfy_server):
    entry = comfy_server.run(t2v_prompt(T2V, steps=1, salad={"backend": "triton"}, prefix=_uniq("tr")))
    assert status_str(entry) == "error"
    err = execution_error(entry)
    assert err["node_type"] == "SALADApplyAttention"
    assert "backend 'triton'" in err["exception_message"] and "'auto'" in err["exception_message"]
    _run_ok(comfy_server, t2v_prompt(T2V, steps=1, salad={"backend": "torch"}, prefix=_uniq("torch")))


def test_fp8_precisions_fall_back_on_a_cpu_server(comfy_server):
    """The node's precision input through a real server: on a machine without FP8 tensor cores fp8 and fp8_proj
    run the bf16 path (same latent as bf16, with SALAD weights so the Proj GEMM runs) and the log says why,
    once, instead of failing the graph."""
    name = "random_prec_tiny.safetensors"
    save_salad_weights(random_weights(7), comfy_server.salad_dir / name)
    outs = {}
    for prec in ("bf16", "fp8_proj", "fp8"):
        p = t2v_prompt(T2V, steps=STEPS, salad={"sparsity": 0.9, "precision": prec}, weights_name=name,
                       prefix=_uniq(f"prec_{prec}"))
        outs[prec] = _latent(comfy_server, _run_ok(comfy_server, p))
    assert outs["bf16"].isfinite().all()
    assert torch.equal(outs["bf16"], outs["fp8_proj"]) and torch.equal(outs["bf16"], outs["fp8"])
    log = comfy_server.log()
    assert "precision 'fp8_proj' falls back to bf16 (Proj GEMM)" in log, log[-2000:]
    assert "precision 'fp8' falls back to bf16 (attention)" in log, log[-2000:]
