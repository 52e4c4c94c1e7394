"""A GGUF-quantised Wan runs through SALAD in a real ComfyUI (CPU), as the README claims.

The test writes a GGUF file of the tiny Wan fixture (``wan21_t2v_tiny``) with the ``gguf`` package:
every 2-D weight whose rows are whole Q8_0 blocks is quantised to Q8_0, the rest stays F16.  It is
loaded by a test fixture node (tests/fixture_nodes/salad_test_gguf) that behaves the way
ComfyUI-GGUF's ``UnetLoaderGGUF`` does -- weights stay quantised tensors in the model and custom
``comfy.ops`` dequantise them on the fly -- because ComfyUI-GGUF itself cannot be installed from a
package registry here and its code may not be copied; that module's docstring says what it covers.
Then Apply SALAD Attention + KSampler run on it inside the real server.
"""
import json
import os
import re
import uuid

import numpy as np
import pytest
from safetensors.torch import load_file

from comfy_harness import TESTS, ComfyServer, execution_error, output_files, status_str
from graphs import t2v_prompt
from salad_pack.salad_core.weights import SaladWeights, save_salad_weights
from test_salad_in_comfy import random_weights

try:
    import gguf
except ImportError:  # scripts/setup_env.sh installs it; CI must run this test
    if os.environ.get("CI"):
        raise
    pytest.skip("the gguf package (scripts/requirements-dev.txt) is not installed", allow_module_level=True)

STEPS = 2
GGUF_NAME = "wan21_t2v_tiny_q8_0.gguf"
SHAPES_FIELD = "salad_test.shapes"      # as read by tests/fixture_nodes/salad_test_gguf


def write_gguf(sd: dict, path) -> dict:
    """Write ``sd`` as GGUF: 2-D weights with rows of whole Q8_0 blocks as Q8_0, others F16 (tensors with
    more than GGUF's 4 dimensions are stored flattened to 2-D, their shape in ``SHAPES_FIELD``).
    Returns {GGML type name: count}."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]
    writer = gguf.GGUFWriter(str(path), arch="wan")
    shapes, counts = {}, {}
    for name, t in sd.items():
        a = t.float().numpy()
        if a.ndim == 2 and name.endswith(".weight") and a.shape[1] % block == 0:
            writer.add_tensor(name, gguf.quantize(a, q8), raw_dtype=q8)
            kind = "Q8_0"
        else:
            if a.ndim > 4:
                shapes[name] = list(a.shape)
                a = a.reshape(a.shape[0], -1)
            writer.add_tensor(name, a.astype(np.float16))
            kind = "F16"
        counts[kind] = counts.get(kind, 0) + 1
    writer.add_string(SHAPES_FIELD, json.dumps(shapes))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


@pytest.fixture(scope="module")
def gguf_server(tiny_models, tmp_path_factory):
    sd = load_file(str(tiny_models["wan21_t2v_tiny"]))
    base = tmp_path_factory.mktemp("gguf_comfy")
    server = ComfyServer(base_dir=base, extra_custom_nodes=[TESTS / "fixture_nodes" / "salad_test_gguf"])
    server.file_counts = write_gguf(sd, server.diffusion_dir / GGUF_NAME)
    (server.diffusion_dir / tiny_models["wan21_t2v_tiny"].name).symlink_to(tiny_models["wan21_t2v_tiny"])
    save_salad_weights(SaladWeights.new(dim=256, heads=2, num_blocks=2, base_model="wan21_t2v_tiny"),
                       server.salad_dir / "zero_tiny.safetensors")
    save_salad_weights(random_weights(3), server.salad_dir / "random_tiny.safetensors")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def _gguf_prompt(salad=None, **kw):
    p = t2v_prompt("unused", salad=salad, steps=STEPS, prefix=f"gguf_{uuid.uuid4().hex[:8]}", **kw)
    p["1"] = {"class_type": "SALADTest_UnetLoaderGGUF", "inputs": {"unet_name": GGUF_NAME}}
    return p


def _run_latent(server, prompt):
    entry = server.run(prompt)
    err = execution_error(entry)
    assert status_str(entry) == "success", (err or {}).get("exception_message", err) if err else entry
    f = [f for f in output_files(entry) if f["filename"].endswith(".latent")][0]
    return load_file(str(server.output / f.get("subfolder", "") / f["filename"]))["latent_tensor"]


@pytest.fixture(scope="module")
def gguf_dense(gguf_server):
    mark = len(gguf_server.log())
    out = _run_latent(gguf_server, _gguf_prompt())
    return out, gguf_server.log()[mark:]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_gguf_model_stays_quantised_and_matches_fp16(gguf_server, gguf_dense):
    """The file is really quantised, the model keeps the Q8_0 weights as quantised tensors, and sampling
    with them (dequantised on the fly) lands near the fp16 model, but not on it."""
    counts = gguf_server.file_counts
    assert counts["Q8_0"] >= 20 and counts["F16"] > 0, counts
    dense, log = gguf_dense
    m = re.search(r"SALADTest GGUF: loaded \S+, file types (\{.*?\}), (\d+) weights stay quantised", log)
    assert m, log[-2000:]
    assert json.loads(m.group(1)) == counts
    assert int(m.group(2)) == counts["Q8_0"]
    fp16 = _run_latent(gguf_server, t2v_prompt("wan21_t2v_tiny.safetensors", steps=STEPS,
                                               prefix=f"fp16_{uuid.uuid4().hex[:8]}"))
    assert dense.isfinite().all()
    assert 0 < _rel(dense, fp16) < 0.02, _rel(dense, fp16)


@pytest.fixture(scope="module")
def gguf_sparse(gguf_server):
    mark = len(gguf_server.log())
    out = _run_latent(gguf_server, _gguf_prompt(salad={"sparsity": 0.9, "pattern": "topk"}))
    return out, gguf_server.log()[mark:]


def test_salad_on_gguf_runs_sparse_on_every_block(gguf_dense, gguf_sparse):
    dense, _ = gguf_dense
    out, log = gguf_sparse
    assert out.isfinite().all()
    assert _rel(out, dense) > 1e-3, "90% sparse attention on the GGUF model gave the dense result"
    stats = re.findall(r"SALAD stats: sparse_calls=\{([^}]*)\}", log)
    assert stats and stats[-1] == f"0:{STEPS},1:{STEPS}", log[-2000:]


def test_salad_weights_on_gguf_run_the_linear_branch(gguf_server, gguf_sparse):
    """Weights with non-zero Proj/gate on the GGUF model (converted to its compute dtype, whatever the
    quantised storage is): the linear branch adds to the sparse output."""
    sparse, _ = gguf_sparse
    out = _run_latent(gguf_server, _gguf_prompt(salad={"sparsity": 0.9, "pattern": "topk"},
                                                weights_name="random_tiny.safetensors"))
    assert out.isfinite().all()
    assert _rel(out, sparse) > 1e-4, "SALAD weights changed nothing on the GGUF model"


def test_salad_at_zero_sparsity_reproduces_gguf_dense(gguf_server, gguf_dense):
    dense, _ = gguf_dense
    out = _run_latent(gguf_server, _gguf_prompt(salad={"sparsity": 0.0}, weights_name="zero_tiny.safetensors"))
    err = ((out - dense).abs().max() / dense.abs().max()).item()
    assert err < 2e-3, f"relative max error {err}"
