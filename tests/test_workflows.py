"""The UI workflows in workflows/ against their API twins and a real ComfyUI's node registry."""
import json
from pathlib import Path

import pytest

from comfy_harness import PACK_DIR_NAME, PromptRejected, execution_error, status_str
from workflow_convert import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").rglob("*.json"))
TWINS = ROOT / "tests" / "workflow_twins"


def _twin(ui_path: Path) -> Path:
    rel = ui_path.relative_to(ROOT / "workflows").with_suffix("")
    return TWINS / (str(rel).replace("/", "__") + ".api.json")


def test_every_workflow_has_a_twin():
    assert len(UI_FILES) >= 4
    names = {p.relative_to(ROOT / "workflows").as_posix() for p in UI_FILES}
    assert {"wan21_t2v_1.3b_salad.json", "wan22_14b_t2v_salad_high_low.json", "wan21_i2v_480p_salad.json"} <= names
    for p in UI_FILES:
        assert _twin(p).is_file(), f"{p.name} has no API twin"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.name)
def test_twin_matches_ui_graph(comfy_server, ui_path):
    info = comfy_server.get("/object_info")
    ui = json.loads(ui_path.read_text())
    twin = json.loads(_twin(ui_path).read_text())
    assert ui["version"] == 0.4 and ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
    # links are consistent on both ends and typed like ComfyUI's sockets
    nodes = {n["id"]: n for n in ui["nodes"]}
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        assert lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == lid
        assert info[nodes[src]["type"]]["output"][sslot] == typ
    assert ui_to_api(ui, info) == twin
    # every SALAD node exposes exactly our inputs with widget values in range
    for n in ui["nodes"]:
        if n["type"] == "SALADApplyAttention":
            api = twin[str(n["id"])]["inputs"]
            assert 0.0 <= api["sparsity"] <= 0.99 and api["pattern"] in ("topk", "window")


def test_twins_validate_in_comfyui(comfy_server):
    """The real-model twins are refused only because this machine lacks the Wan checkpoints."""
    for ui_path in UI_FILES:
        twin = json.loads(_twin(ui_path).read_text())
        if "dev" in ui_path.parts:
            continue
        with pytest.raises(PromptRejected) as e:
            comfy_server.queue(twin)
        errors = e.value.body.get("node_errors", {})
        assert errors, e.value.body
        for node_id, err in errors.items():
            for x in err["errors"]:
                missing_file = x["type"] == "value_not_in_list" or (
                    x["type"] == "custom_validation_failed" and x["extra_info"].get("input_name") == "image")
                assert missing_file, (ui_path.name, node_id, err)
            bad_inputs = {x["extra_info"]["input_name"] for x in err["errors"]}
            assert bad_inputs <= {"unet_name", "clip_name", "vae_name", "image", "weights_name"}, bad_inputs


def test_demo_workflow_runs(comfy_server):
    ui = json.loads((ROOT / "workflows" / "dev" / "salad_demo_tiny_wan.json").read_text())
    entry = comfy_server.run(ui_to_api(ui, comfy_server.get("/object_info")))
    assert status_str(entry) == "success", execution_error(entry)


def test_comfyui_lists_our_workflows_as_templates(comfy_server):
    templates = comfy_server.get("/workflow_templates")
    assert PACK_DIR_NAME in templates, templates
    assert {"wan21_t2v_1.3b_salad", "wan22_14b_t2v_salad_high_low", "wan21_i2v_480p_salad"} <= set(templates[PACK_DIR_NAME])
