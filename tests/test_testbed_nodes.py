"""SALAD testbed nodes in the real headless ComfyUI server (CPU)."""
import uuid

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_harness import execution_error, output_files, status_str
from salad_pack.testbed import codec as codec_mod
from salad_pack.testbed import data


def _run_ok(server, prompt):
    entry = server.run(prompt)
    err = execution_error(entry)
    assert status_str(entry) == "success", (err or {}).get("exception_message", err) if err else entry.get("status")
    return entry


def _files(server, entry, prefix, ext):
    return sorted(server.output / f.get("subfolder", "") / f["filename"] for f in output_files(entry)
                  if f["filename"].startswith(prefix) and f["filename"].endswith(ext))


def test_node_info_has_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    names = ["Caption", "EmptyLatent", "Decode", "Encode", "ProceduralVideo"]
    for n in names:
        node = info[f"SALADTestbed{n}"]
        assert node["category"] == "SALAD/testbed"
        assert node["display_name"].startswith("SALAD Testbed ")
        for spec in node["input"]["required"].values():
            assert spec[1].get("tooltip"), (n, spec)


def test_procedural_video_encode_decode_round_trip(comfy_server):
    tag = uuid.uuid4().hex[:8]
    p = {
        "1": {"class_type": "SALADTestbedProceduralVideo", "inputs": {"seed": 3, "frames": 16, "size": 64}},
        "2": {"class_type": "SALADTestbedEncode", "inputs": {"pixels": ["1", 0]}},
        "3": {"class_type": "SALADTestbedDecode", "inputs": {"samples": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"tbrt_{tag}"}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": f"tblat_{tag}"}},
    }
    entry = _run_ok(comfy_server, p)
    lat = load_file(str(_files(comfy_server, entry, f"tblat_{tag}", ".latent")[0]))["latent_tensor"]
    assert lat.shape == (1, 16, 4, 16, 16)
    pngs = _files(comfy_server, entry, f"tbrt_{tag}", ".png")
    assert len(pngs) == 16
    got = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in pngs]) / 255.0)
    ref = data.render(data.sample_specs(3, 1), 16, 64)[0]
    assert codec_mod.psnr(got, ref) > 25


def test_caption_samples_tiny_wan(comfy_server):
    tag = uuid.uuid4().hex[:8]
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan21_t2v_tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "SALADTestbedCaption", "inputs": {"caption": "a red square moves left"}},
        "3": {"class_type": "SALADTestbedCaption", "inputs": {"caption": ""}},
        "4": {"class_type": "SALADTestbedEmptyLatent", "inputs": {"frames": 8, "size": 32, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SALADTestbedDecode", "inputs": {"samples": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"tbks_{tag}"}},
    }
    entry = _run_ok(comfy_server, p)
    assert len(_files(comfy_server, entry, f"tbks_{tag}", ".png")) == 8
