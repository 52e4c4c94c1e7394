"""(Re)generate the UI-format workflows in workflows/ and their API twins in tests/workflow_twins/.

Widget order and socket types are read from a running ComfyUI's /object_info, so the files match
what ComfyUI expects.  Run:  .venv/bin/python scripts/build_workflows.py
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from comfy_harness import ComfyServer  # noqa: E402
from workflow_convert import FRONTEND_WIDGETS, _extra_widgets, _has_control, _input_specs, _is_widget  # noqa: E402

NEG = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
       "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
       "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
       "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
       "背景人很多，倒着走")
POS = "A red fox trotting through fresh snow in a birch forest at sunrise, cinematic, shallow depth of field"
TESTBED_CAPTION = "a red square moves right"
TESTBED_STEPS = 10      # 2 x 10 model calls: the demo stays under 2 minutes on a 2-core CPU
TESTBED_SEED = 0
TESTBED_START = 0.2     # first 20% of the steps dense: the layout forms without tile seams
FINETUNE_TITLE = "Fine-tune SALAD weights (Wan 2.1 T2V 1.3B)"
SALAD = dict(sparsity=0.9, pattern="topk", start_percent=0.2, end_percent=1.0, dense_blocks="", backend="auto",
             min_tokens=12288, verbose=False)   # the node's defaults (salad_core/options.py)


def N(nid, typ, pos, widgets=None, links=None, mode=0, title=None, size=None):
    return dict(id=nid, type=typ, pos=pos, widgets=widgets or {}, links=links or {}, mode=mode, title=title,
                size=size)


def testbed_branch(nid, y, model, prefix, sampler_title, save_title):
    """KSampler -> Testbed Decode -> SaveAnimatedWEBP of the testbed workflow, sampling ``model`` (a link)
    with the shared captions (nodes 4, 5) and latent (node 6); node ids nid..nid+2, row ``y``."""
    return [
        N(nid, "KSampler", [420, y], {"seed": TESTBED_SEED, "steps": TESTBED_STEPS, "cfg": 5.0,
                                      "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
          {"model": model, "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}, title=sampler_title),
        N(nid + 1, "SALADTestbedDecode", [820, y], {}, {"samples": (nid, 0)}),
        N(nid + 2, "SaveAnimatedWEBP", [1060, y], {"filename_prefix": prefix, "fps": 16.0, "lossless": False,
                                                   "quality": 90, "method": "default"},
          {"images": (nid + 1, 0)}, title=save_title),
    ]


def note(nid, pos, text):
    return dict(id=nid, type="Note", pos=pos, text=text)


WORKFLOWS = {
    "Wan 2.1 T2V 1.3B with SALAD": [
        note(100, [-420, -260], "SALAD: sparse + linear attention for Wan.\n\n1. Apply SALAD Attention sits "
             "between the model loader and KSampler. sparsity 0.9 skips 90% of the attention blocks (2.0x per model "
             "call at 480p/81 frames on an H100).\n2. Without SALAD weights it runs sparse attention only. "
             "With a trained weight file in ComfyUI/models/salad (SALAD Train Weights writes "
             "<prefix>_00001.safetensors), unmute 'SALAD Weights Loader' (Ctrl+M) and pick the file.\n"
             "3. start_percent 0.2 keeps the first 20% of the steps dense (better layout; set 0 for the most "
             "speed). Clips under min_tokens (12,288 tokens) stay dense."),
        N(1, "UNETLoader", [-420, 0], {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        N(2, "CLIPLoader", [-420, 160], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                         "device": "default"}),
        N(3, "VAELoader", [-420, 320], {"vae_name": "wan_2.1_vae.safetensors"}),
        N(4, "SALADWeightsLoader", [-420, 420], {"weights_name": "salad_wan2.1_t2v_1.3b_00001.safetensors"}, mode=2),
        N(5, "ModelSamplingSD3", [0, -120], {"shift": 8.0}, {"model": (1, 0)}),
        N(6, "SALADApplyAttention", [0, 0], SALAD, {"model": (5, 0), "salad_weights": (4, 0)}),
        N(7, "CLIPTextEncode", [0, 260], {"text": POS}, {"clip": (2, 0)}, title="Positive prompt"),
        N(8, "CLIPTextEncode", [0, 480], {"text": NEG}, {"clip": (2, 0)}, title="Negative prompt"),
        N(9, "EmptyHunyuanLatentVideo", [0, 700], {"width": 832, "height": 480, "length": 81, "batch_size": 1}),
        N(10, "KSampler", [420, 0], {"seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc",
                                     "scheduler": "simple", "denoise": 1.0},
          {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}),
        N(11, "VAEDecode", [820, 0], {}, {"samples": (10, 0), "vae": (3, 0)}),
        N(12, "SaveAnimatedWEBP", [1060, 0], {"filename_prefix": "salad/wan21_t2v", "fps": 16.0,
                                              "lossless": False, "quality": 90, "method": "default"},
          {"images": (11, 0)}),
    ],
    "Wan 2.2 T2V 14B high and low noise with SALAD": [
        note(100, [-420, -300], "Wan 2.2 14B: one Apply SALAD Attention on each of the high-noise and low-noise "
             "experts. Both samplers share the same latent; the high-noise model runs steps 0-10, the low-noise "
             "model steps 10-20. Set the sparsity of each expert separately (e.g. keep the high-noise expert at "
             "a lower sparsity if motion suffers)."),
        N(1, "UNETLoader", [-420, 0], {"unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                                       "weight_dtype": "default"}, title="High-noise model"),
        N(2, "UNETLoader", [-420, 160], {"unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
                                         "weight_dtype": "default"}, title="Low-noise model"),
        N(3, "CLIPLoader", [-420, 320], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                         "device": "default"}),
        N(4, "VAELoader", [-420, 480], {"vae_name": "wan_2.1_vae.safetensors"}),
        N(5, "ModelSamplingSD3", [0, -160], {"shift": 8.0}, {"model": (1, 0)}),
        N(6, "ModelSamplingSD3", [0, 200], {"shift": 8.0}, {"model": (2, 0)}),
        N(7, "SALADApplyAttention", [300, -160], SALAD, {"model": (5, 0)}, title="SALAD (high noise)"),
        N(8, "SALADApplyAttention", [300, 200], SALAD, {"model": (6, 0)}, title="SALAD (low noise)"),
        N(9, "CLIPTextEncode", [0, 520], {"text": POS}, {"clip": (3, 0)}, title="Positive prompt"),
        N(10, "CLIPTextEncode", [0, 740], {"text": NEG}, {"clip": (3, 0)}, title="Negative prompt"),
        N(11, "EmptyHunyuanLatentVideo", [0, 960], {"width": 1280, "height": 720, "length": 81, "batch_size": 1}),
        N(12, "KSamplerAdvanced", [700, -160], {"add_noise": "enable", "noise_seed": 42, "steps": 20, "cfg": 3.5,
                                                "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0,
                                                "end_at_step": 10, "return_with_leftover_noise": "enable"},
          {"model": (7, 0), "positive": (9, 0), "negative": (10, 0), "latent_image": (11, 0)}),
        N(13, "KSamplerAdvanced", [1100, -160], {"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 3.5,
                                                 "sampler_name": "euler", "scheduler": "simple",
                                                 "start_at_step": 10, "end_at_step": 10000,
                                                 "return_with_leftover_noise": "disable"},
          {"model": (8, 0), "positive": (9, 0), "negative": (10, 0), "latent_image": (12, 0)}),
        N(14, "VAEDecode", [1500, -160], {}, {"samples": (13, 0), "vae": (4, 0)}),
        N(15, "SaveAnimatedWEBP", [1740, -160], {"filename_prefix": "salad/wan22_14b_t2v", "fps": 16.0,
                                                 "lossless": False, "quality": 90, "method": "default"},
          {"images": (14, 0)}),
    ],
    "Wan 2.1 I2V 480p with SALAD": [
        note(100, [-420, -260], "Wan 2.1 image-to-video with SALAD. Only the video self-attention is made "
             "sparse; the image and text cross-attention stay dense."),
        N(1, "UNETLoader", [-420, 0], {"unet_name": "wan2.1_i2v_480p_14B_fp16.safetensors", "weight_dtype": "default"}),
        N(2, "CLIPLoader", [-420, 160], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                         "device": "default"}),
        N(3, "VAELoader", [-420, 320], {"vae_name": "wan_2.1_vae.safetensors"}),
        N(4, "CLIPVisionLoader", [-420, 420], {"clip_name": "clip_vision_h.safetensors"}),
        N(5, "LoadImage", [-420, 540], {"image": "example.png", "upload": "image"}),
        N(6, "CLIPVisionEncode", [0, 540], {"crop": "none"}, {"clip_vision": (4, 0), "image": (5, 0)}),
        N(7, "ModelSamplingSD3", [0, -120], {"shift": 8.0}, {"model": (1, 0)}),
        N(8, "SALADApplyAttention", [0, 0], SALAD, {"model": (7, 0)}),
        N(9, "CLIPTextEncode", [0, 260], {"text": POS}, {"clip": (2, 0)}, title="Positive prompt"),
        N(10, "CLIPTextEncode", [0, 400], {"text": NEG}, {"clip": (2, 0)}, title="Negative prompt"),
        N(11, "WanImageToVideo", [420, 300], {"width": 832, "height": 480, "length": 81, "batch_size": 1},
          {"positive": (9, 0), "negative": (10, 0), "vae": (3, 0), "clip_vision_output": (6, 0),
           "start_image": (5, 0)}),
        N(12, "KSampler", [820, 0], {"seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                                     "scheduler": "simple", "denoise": 1.0},
          {"model": (8, 0), "positive": (11, 0), "negative": (11, 1), "latent_image": (11, 2)}),
        N(13, "VAEDecode", [1220, 0], {}, {"samples": (12, 0), "vae": (3, 0)}),
        N(14, "SaveAnimatedWEBP", [1460, 0], {"filename_prefix": "salad/wan21_i2v", "fps": 16.0,
                                              "lossless": False, "quality": 90, "method": "default"},
          {"images": (13, 0)}),
    ],
    "Train SALAD weights (Wan 2.1 T2V 1.3B)": [
        note(100, [-420, -260], "Make SALAD weights for your model: SALAD Train Weights samples once with sparse-only "
             "SALAD while recording every block's attention inputs, then trains each block's linear-branch "
             "projection and gate toward dense attention. The file lands in ComfyUI/models/salad as "
             "<filename_prefix>_00001.safetensors (only blocks that got better are kept; no file when none did); "
             "the 'Training report' node shows the held-out error vs dense attention before and after. "
             "Keep the latent small (here 33 frames at 480x272): recorded activations stay in CPU memory."),
        N(1, "UNETLoader", [-420, 0], {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        N(2, "CLIPLoader", [-420, 160], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                         "device": "default"}),
        N(3, "ModelSamplingSD3", [0, -120], {"shift": 8.0}, {"model": (1, 0)}),
        N(4, "CLIPTextEncode", [0, 60], {"text": POS}, {"clip": (2, 0)}, title="Positive prompt"),
        N(5, "CLIPTextEncode", [0, 280], {"text": NEG}, {"clip": (2, 0)}, title="Negative prompt"),
        N(6, "EmptyHunyuanLatentVideo", [0, 500], {"width": 480, "height": 272, "length": 33, "batch_size": 1}),
        N(7, "SALADTrainWeights", [420, 0], {"seed": 0, "record_steps": 8, "cfg": 6.0, "sampler_name": "uni_pc",
                                             "scheduler": "simple", "sparsity": 0.9, "pattern": "topk",
                                             "samples_per_block": 4, "train_steps": 200, "learning_rate": 1e-3,
                                             "filename_prefix": "salad_wan2.1_t2v_1.3b"},
          {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}),
        N(8, "PreviewAny", [840, 0], {}, {"source": (7, 1)}, title="Training report"),
    ],
    FINETUNE_TITLE: [
        note(100, [-420, -300], "Fine-tune SALAD on your own clips: Wan stays frozen; each block's linear-branch "
             "projection and gate learn with the flow-matching loss, SALAD active.\n\n"
             "1. Data: for each clip, upload it in 'Training clip', write its caption, Run. A pair file lands in "
             "output/salad_training/<data_folder> ('Pair saved to').\n"
             "2. Train: select SALAD Fine-tune and 'Weights file', unmute them (Ctrl+M), Run. It checkpoints and "
             "resumes; the weights go to models/salad (name in 'Weights file'). lora_rank > 0 also trains a "
             "LoRA (models/loras, for LoraLoaderModelOnly)."),
        N(1, "CLIPLoader", [-420, 0], {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                       "device": "default"}),
        N(2, "VAELoader", [-420, 160], {"vae_name": "wan_2.1_vae.safetensors"}),
        N(3, "LoadVideo", [-420, 280], {"file": "my_clip_001.mp4"}, title="Training clip"),
        N(4, "GetVideoComponents", [0, 280], {}, {"video": (3, 0)}),
        N(5, "ImageFromBatch", [0, 420], {"batch_index": 0, "length": 81}, {"image": (4, 0)},
          title="First 81 frames"),
        N(6, "ImageScale", [0, 560], {"upscale_method": "lanczos", "width": 832, "height": 480, "crop": "center"},
          {"image": (5, 0)}),
        N(7, "VAEEncode", [420, 280], {}, {"pixels": (6, 0), "vae": (2, 0)}),
        N(8, "CLIPTextEncode", [0, 0], {"text": POS}, {"clip": (1, 0)}, title="Caption of this clip"),
        N(9, "SALADSaveTrainingPair", [420, 0], {"data_folder": "my_set", "filename_prefix": "pair"},
          {"latent": (7, 0), "conditioning": (8, 0)}),
        N(10, "PreviewAny", [840, 0], {}, {"source": (9, 0)}, title="Pair saved to"),
        N(11, "UNETLoader", [-420, 700], {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        N(12, "ModelSamplingSD3", [0, 700], {"shift": 8.0}, {"model": (11, 0)}),
        N(13, "SALADFinetune", [420, 700], {"data_folder": "my_set", "filename_prefix": "salad_wan2.1_t2v_1.3b_ft"},
          {"model": (12, 0)}, mode=2),
        N(14, "PreviewAny", [840, 700], {}, {"source": (13, 1)}, mode=2, title="Weights file"),
    ],
    "SALAD vs dense on the CPU testbed model": [
        note(100, [-420, -260], "SALAD on our testbed model (runs on a CPU in about a minute): a small Wan 2.1 "
             "(8 M parameters) trained on procedural videos of coloured shapes, with its calibrated SALAD weights. "
             "Copy testbed/models/salad_testbed_wan21.safetensors into ComfyUI/models/diffusion_models and "
             "salad_testbed_wan21_topk90.safetensors into ComfyUI/models/salad (scripts/demo.sh does it). Top: "
             "SALAD at 90% sparsity (first 20% of the steps dense); bottom: the same seed with dense "
             "attention. Captions follow the testbed grammar: 'a <colour> <shape> moves left|right|up|down / "
             "bounces / stays / circles', clauses separated by commas."),
        N(1, "UNETLoader", [-420, 0], {"unet_name": "salad_testbed_wan21.safetensors", "weight_dtype": "default"}),
        N(2, "SALADWeightsLoader", [-420, 160], {"weights_name": "salad_testbed_wan21_topk90.safetensors"}),
        N(3, "SALADApplyAttention", [0, 0], dict(SALAD, start_percent=TESTBED_START, min_tokens=0),
          {"model": (1, 0), "salad_weights": (2, 0)}),
        N(4, "SALADTestbedCaption", [0, 360], {"caption": TESTBED_CAPTION}, title="Positive caption"),
        N(5, "SALADTestbedCaption", [0, 520], {"caption": ""}, title="Negative (empty caption)"),
        N(6, "SALADTestbedEmptyLatent", [0, 640], {"frames": 64, "size": 128, "batch_size": 1}),
        *testbed_branch(7, 0, (3, 0), "salad_demo/testbed_salad", "KSampler (SALAD)", "SALAD 90%"),
        *testbed_branch(10, 400, (1, 0), "salad_demo/testbed_dense", "KSampler (dense)", "dense"),
    ],
    "dev/salad_demo_tiny_wan": [
        note(100, [-420, -200], "Developer demo (scripts/demo.sh): a tiny random-weight Wan 2.1 and test-only "
             "conditioning, so it runs on a CPU without real checkpoints. Not a user template."),
        N(1, "UNETLoader", [-420, 0], {"unet_name": "wan21_t2v_tiny.safetensors", "weight_dtype": "default"}),
        N(2, "SALADApplyAttention", [0, 0], dict(SALAD, start_percent=0.0, min_tokens=0, verbose=True),
          {"model": (1, 0)}),
        N(3, "SALADTest_Conditioning", [0, 260], {"seed": 11, "tokens": 16, "dim": 4096}, title="positive"),
        N(4, "SALADTest_Conditioning", [0, 420], {"seed": 12, "tokens": 16, "dim": 4096}, title="negative"),
        N(5, "SALADTest_EmptyLatentVideo", [0, 580], {"channels": 16, "frames": 5, "height": 32, "width": 32,
                                                       "batch_size": 1}),
        N(6, "KSampler", [420, 0], {"seed": 7, "steps": 4, "cfg": 3.0, "sampler_name": "euler",
                                    "scheduler": "simple", "denoise": 1.0},
          {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        N(7, "SaveLatent", [820, 0], {"filename_prefix": "salad_demo/tiny_wan"}, {"samples": (6, 0)}),
        N(8, "SALADTest_LatentPreview", [820, 200], {"filename_prefix": "salad_demo/tiny_wan_preview"},
          {"samples": (6, 0)}),
    ],
}


HF = "https://huggingface.co/Comfy-Org/{}/resolve/main/split_files/{}/{}"
WAN21, WAN22 = "Wan_2.1_ComfyUI_repackaged", "Wan_2.2_ComfyUI_Repackaged"
MODEL_LINKS = {  # file -> (repository, folder): the frontend's missing-models panel offers these downloads
    "wan2.1_t2v_1.3B_fp16.safetensors": (WAN21, "diffusion_models"),
    "wan2.1_i2v_480p_14B_fp16.safetensors": (WAN21, "diffusion_models"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (WAN21, "text_encoders"),
    "wan_2.1_vae.safetensors": (WAN21, "vae"),
    "clip_vision_h.safetensors": (WAN21, "clip_vision"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": (WAN22, "diffusion_models"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": (WAN22, "diffusion_models"),
}
PACK_ID = "salad-attention"
COMFY_VERSION = "0.3.75"


def _pack_version() -> str:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _properties(n: dict) -> dict:
    """Node properties: pack id + version (so the frontend knows where a node comes from without asking the
    registry) and, on loaders, download links of the files the widgets name."""
    props = {"Node name for S&R": n["type"]}
    if n["type"].startswith("SALADTest_"):
        pass                                             # test-only nodes: shipped by no pack
    elif n["type"].startswith("SALAD"):
        props.update(cnr_id=PACK_ID, ver=_pack_version())
    else:
        props.update(cnr_id="comfy-core", ver=COMFY_VERSION)
    models = [dict(name=v, url=HF.format(MODEL_LINKS[v][0], MODEL_LINKS[v][1], v), directory=MODEL_LINKS[v][1])
              for v in n["widgets"].values() if isinstance(v, str) and v in MODEL_LINKS]
    if models:
        props["models"] = models
    return props


def _layout(ui_nodes: list) -> None:
    """Columns 420 px apart (in the order of the spec's x), nodes stacked without overlap."""
    xs = sorted({n["pos"][0] for n in ui_nodes})
    col = {x: i for i, x in enumerate(xs)}
    bottoms: dict[int, float] = {}
    for n in sorted(ui_nodes, key=lambda n: (n["pos"][0], n["pos"][1])):
        c = col[n["pos"][0]]
        if n["type"] != "Note":
            rows = len(n["widgets_values"]) + max(len(n["inputs"]), len(n["outputs"]))
            n["size"] = [340, 46 + 26 * rows + (60 if n["type"] == "CLIPTextEncode" else 0)]
        y = max(n["pos"][1], bottoms.get(c, -10**9) + 40)
        n["pos"] = [c * 420 - 420, y]
        bottoms[c] = y + n["size"][1]


def build(spec: list, info: dict) -> tuple[dict, dict]:
    ui_nodes, ui_links, api = [], [], {}
    link_id = 0
    out_links: dict[tuple[int, int], list[int]] = {}
    by_id = {n["id"]: n for n in spec}
    for order, n in enumerate(spec):
        if n["type"] == "Note":
            ui_nodes.append(dict(id=n["id"], type="Note", pos=n["pos"], size=[380, 180], flags={}, order=order,
                                 mode=0, inputs=[], outputs=[], properties={}, widgets_values=[n["text"]],
                                 color="#432", bgcolor="#653"))
            continue
        ninfo = info[n["type"]]
        inputs, widgets_values, api_inputs = [], [], {}
        for name, ispec in _input_specs(ninfo):
            if name in n["links"]:
                src, slot = n["links"][name]
                link_id += 1
                typ = info[by_id[src]["type"]]["output"][slot]
                ui_links.append([link_id, src, slot, n["id"], len(inputs), typ])
                out_links.setdefault((src, slot), []).append(link_id)
                in_type = typ if not _is_widget(ispec) else ispec[0] if isinstance(ispec[0], str) else "COMBO"
                inputs.append({"name": name, "type": in_type, "link": link_id})
                if by_id[src].get("mode", 0) not in (2, 4):      # muted / bypassed sources drop out
                    api_inputs[name] = [str(src), slot]
            elif not _is_widget(ispec):
                continue
            if _is_widget(ispec):
                default = ispec[1].get("default") if len(ispec) > 1 else None
                if default is None and isinstance(ispec[0], list) and ispec[0]:
                    default = ispec[0][0]
                val = n["widgets"].get(name, default)
                widgets_values.append(val)
                if _has_control(name, ispec) and ispec[0] == "INT":
                    widgets_values.append("fixed")
                if _extra_widgets(name, ispec) > int(_has_control(name, ispec) and ispec[0] == "INT"):
                    widgets_values.append("image")               # the image input's upload button
                if name not in n["links"]:
                    api_inputs[name] = val
        for name in FRONTEND_WIDGETS.get(n["type"], ()):
            api_inputs[name] = ""                        # sent with Run by the frontend, never saved
        outputs = []
        for slot, (otype, oname) in enumerate(zip(ninfo["output"], ninfo["output_name"])):
            outputs.append({"name": oname, "type": otype, "links": [], "slot_index": slot})
        node = dict(id=n["id"], type=n["type"], pos=n["pos"], size=n["size"] or [320, 130], flags={}, order=order,
                    mode=n["mode"], inputs=inputs, outputs=outputs,
                    properties=_properties(n), widgets_values=widgets_values)
        if n["title"]:
            node["title"] = n["title"]
        ui_nodes.append(node)
        if n["mode"] not in (2, 4):
            api[str(n["id"])] = {"class_type": n["type"], "inputs": api_inputs}
    for node in ui_nodes:
        for slot, out in enumerate(node["outputs"]):
            out["links"] = out_links.get((node["id"], slot), [])
    _layout(ui_nodes)
    ui = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "salad/" + str(spec[1]["type"]) + str(len(spec)))),
          "revision": 0, "last_node_id": max(n["id"] for n in spec), "last_link_id": link_id,
          "nodes": ui_nodes, "links": ui_links, "groups": [], "config": {},
          "extra": {"ds": {"scale": 0.8, "offset": [500, 350]}}, "version": 0.4}
    return ui, api


def main():
    with ComfyServer() as server:
        info = server.get("/object_info")
    for name, spec in WORKFLOWS.items():
        ui, api = build(spec, info)
        ui_path = ROOT / "workflows" / f"{name}.json"
        ui_path.parent.mkdir(parents=True, exist_ok=True)
        ui_path.write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
        twin = ROOT / "tests" / "workflow_twins" / f"{name.replace('/', '__')}.api.json"
        twin.write_text(json.dumps(api, indent=2, ensure_ascii=False) + "\n")
        print(ui_path.relative_to(ROOT), "+", twin.relative_to(ROOT))


if __name__ == "__main__":
    main()
