"""The UI workflows in workflows/ against their API twins and a real ComfyUI's node registry."""
import json
from pathlib import Path

import pytest

from comfy_harness import PACK_DIR_NAME, PromptRejected, execution_error, status_str
from workflow_convert import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").rglob("*.json"))
TEMPLATES = sorted((ROOT / "workflows").glob("*.json"))     # workflows/dev/ is not offered as a template
TWINS = ROOT / "tests" / "workflow_twins"
# ComfyUI lists a pack's templates by file name (app/custom_node_manager.py) and the frontend (1.32.9 up to
# 1.58.1) shows that name as the template's title and, with - and _ as spaces, as its description.
TITLES = ["Wan 2.1 T2V 1.3B with SALAD", "Wan 2.1 I2V 480p with SALAD",
          "Wan 2.2 T2V 14B high and low noise with SALAD", "Train SALAD weights (Wan 2.1 T2V 1.3B)",
          "Fine-tune SALAD weights (Wan 2.1 T2V 1.3B)", "SALAD vs dense on the CPU testbed model"]


def _twin(ui_path: Path) -> Path:
    rel = ui_path.relative_to(ROOT / "workflows").with_suffix("")
    return TWINS / (str(rel).replace("/", "__") + ".api.json")


def test_every_workflow_has_a_twin():
    assert len(UI_FILES) >= 4
    names = {p.relative_to(ROOT / "workflows").as_posix() for p in UI_FILES}
    assert {f"{t}.json" for t in TITLES} <= names
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
                    x["type"] == "custom_validation_failed" and x["extra_info"].get("input_name") in ("image", "file"))
                assert missing_file, (ui_path.name, node_id, err)
            bad_inputs = {x["extra_info"]["input_name"] for x in err["errors"]}
            assert bad_inputs <= {"unet_name", "clip_name", "vae_name", "image", "file", "weights_name"}, bad_inputs


def test_demo_workflow_runs(comfy_server):
    ui = json.loads((ROOT / "workflows" / "dev" / "salad_demo_tiny_wan.json").read_text())
    entry = comfy_server.run(ui_to_api(ui, comfy_server.get("/object_info")))
    assert status_str(entry) == "success", execution_error(entry)


def test_comfyui_lists_our_workflows_as_templates(comfy_server):
    templates = comfy_server.get("/workflow_templates")
    assert PACK_DIR_NAME in templates, templates
    assert sorted(templates[PACK_DIR_NAME]) == sorted(p.stem for p in TEMPLATES), templates


def test_template_names_are_human_titles():
    """The file name is the title a user reads in the template browser: words, not a slug."""
    assert set(TITLES) <= {p.stem for p in TEMPLATES}
    for p in TEMPLATES:
        t = p.stem
        assert "_" not in t and " " in t and "SALAD" in t and t[0].isupper(), f"{p.name}: not a readable title"
        assert len(t) <= 60, f"{p.name}: title longer than a template card shows"
        assert p.with_suffix(".jpg").is_file(), f"{p.name}: no thumbnail (scripts/capture_thumbnails.py)"


def test_finetune_workflow_builds_data_then_trains(comfy_server):
    """The fine-tune template: Run as opened saves a training pair (VAE-encoded clip + caption) and does not
    train; unmuting the two fine-tune nodes trains on the same data folder."""
    ui = json.loads((ROOT / "workflows" / "Fine-tune SALAD weights (Wan 2.1 T2V 1.3B).json").read_text())
    info = comfy_server.get("/object_info")
    api = ui_to_api(ui, info)
    by_type = {v["class_type"]: (k, v) for k, v in api.items()}
    assert "SALADFinetune" not in by_type, "the fine-tune node must start muted"
    _, pair = by_type["SALADSaveTrainingPair"]
    assert api[pair["inputs"]["latent"][0]]["class_type"] == "VAEEncode"
    assert api[pair["inputs"]["conditioning"][0]]["class_type"] == "CLIPTextEncode"
    unmuted = dict(ui, nodes=[dict(n, mode=0) for n in ui["nodes"]])
    api = ui_to_api(unmuted, info)
    ft = next(v for v in api.values() if v["class_type"] == "SALADFinetune")
    assert ft["inputs"]["data_folder"] == pair["inputs"]["data_folder"]
    assert api[ft["inputs"]["model"][0]]["class_type"] == "ModelSamplingSD3"
    preview = [v for v in api.values() if v["class_type"] == "PreviewAny" and v["inputs"]["source"][0] in
               {k for k, v in api.items() if v["class_type"] == "SALADFinetune"}]
    assert preview and preview[0]["inputs"]["source"][1] == info["SALADFinetune"]["output_name"].index("filename")
    # unmuted, the whole graph validates up to the files this machine lacks
    with pytest.raises(PromptRejected) as e:
        comfy_server.queue(api)
    bad = {x["extra_info"]["input_name"] for err in e.value.body["node_errors"].values() for x in err["errors"]}
    assert bad <= {"unet_name", "clip_name", "vae_name", "file"}, e.value.body
