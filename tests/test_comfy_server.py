"""The pack inside a real, headless ComfyUI: it loads, lists its nodes and runs a graph."""
import re

from safetensors.torch import load_file

from comfy_harness import PACK_DIR_NAME, execution_error, output_files, status_str
from graphs import t2v_prompt


def test_server_loads_pack_without_import_failure(comfy_server):
    log = comfy_server.log()
    assert "IMPORT FAILED" not in log or PACK_DIR_NAME not in log.split("IMPORT FAILED", 1)[1][:300], log
    # ComfyUI prints one timing line per custom node folder it imported successfully.
    assert re.search(r"seconds: .*" + re.escape(PACK_DIR_NAME), log), log[-3000:]
    assert comfy_server.alive()


def test_object_info_lists_nodes_and_inputs(comfy_server):
    info = comfy_server.get("/object_info")
    assert "SALADWeightsLoader" in info and "SALADApplyAttention" in info
    apply = info["SALADApplyAttention"]
    assert apply["display_name"] == "Apply SALAD Attention"
    req = apply["input"]["required"]
    assert list(req) == ["model", "sparsity", "pattern", "start_percent", "end_percent", "dense_blocks", "backend"]
    sp = req["sparsity"][1]
    assert (sp["default"], sp["min"], sp["max"]) == (0.9, 0.0, 0.99)
    assert req["pattern"][0] == ["topk", "window"]
    assert apply["input"]["optional"]["salad_weights"][0] == "SALAD_WEIGHTS"
    for section in ("required", "optional"):
        for name, spec in apply["input"][section].items():
            assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    loader = info["SALADWeightsLoader"]
    assert loader["output"] == ["SALAD_WEIGHTS"]
    assert loader["input"]["required"]["weights_name"][1].get("tooltip")
    # the models/salad folder is registered with ComfyUI's folder_paths
    assert isinstance(comfy_server.get("/models/salad"), list)


def test_tiny_wan_graph_runs_through_salad_node(comfy_server):
    entry = comfy_server.run(t2v_prompt("wan21_t2v_tiny.safetensors", salad={"sparsity": 0.9}, prefix="smoke"))
    assert status_str(entry) == "success", execution_error(entry)
    files = output_files(entry)
    assert files and files[0]["filename"].endswith(".latent")
    path = comfy_server.output / files[0].get("subfolder", "") / files[0]["filename"]
    lat = load_file(str(path))["latent_tensor"]
    assert lat.shape == (1, 16, 5, 16, 16)
    assert lat.isfinite().all() and lat.abs().sum() > 0
    assert "Requested to load WAN21" in comfy_server.log()
