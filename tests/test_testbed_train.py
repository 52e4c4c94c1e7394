"""testbed/train.py: CPU smoke of the whole path (train, checkpoint, resume, export, detection, val)
with the packages the GPU machine lacks blocked; the objective against ComfyUI's own flow sampling
classes; the exported file in ComfyUI's loader; the caption fast path; the fp8 moment codec."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "testbed" / "train.py"
BLOCKED = ("torchsde", "av", "alembic", "sqlalchemy", "pydantic")


@pytest.fixture(scope="module")
def codec_path(tmp_path_factory):
    """The shipped codec; until it is committed, a small fit with the real fit_codec (4 clips)."""
    from salad_pack.testbed import codec, fit_codec
    if codec.CODEC_PATH.exists():
        return codec.CODEC_PATH
    p = tmp_path_factory.mktemp("codec") / "codec.safetensors"
    fit_codec.save(fit_codec.fit(4, 4, 1234, 4), p)
    return p


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory, comfyui_dir, codec_path):
    """Runs ``train.py --smoke`` in a subprocess where importing torchsde/av/alembic/sqlalchemy/pydantic fails."""
    out = tmp_path_factory.mktemp("train_smoke")
    code = ("import runpy, sys; sys.modules.update({m: None for m in %r}); "
            "sys.argv = [%r] + sys.argv[1:]; runpy.run_path(%r, run_name='__main__')"
            % (BLOCKED, str(TRAIN), str(TRAIN)))
    cmd = [sys.executable, "-c", code, "--smoke", "--out", str(out), "--comfyui", str(comfyui_dir),
           "--codec", str(codec_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for m in BLOCKED:
        assert f"No module named '{m}'" not in r.stderr
    return out


def test_smoke_resume_continues_and_is_exact(smoke_dir):
    s = json.loads((smoke_dir / "smoke.json").read_text())
    assert s["ok"], s
    assert (s["first_step"], s["resumed_step"], s["curve_steps"]) == (2, 3, [1, 2, 3])
    # first step after the resume sees the same weights, data and noise as an uninterrupted run
    assert s["loss_step3_resumed"] == pytest.approx(s["loss_step3_straight"], rel=1e-5)
    state = json.loads((smoke_dir / "b" / "state.json").read_text())
    assert state["step"] == 3 and state["samples_seen"] == 3 * state["config"]["batch"]
    assert (smoke_dir / "b" / "val.png").stat().st_size > 0


def test_checkpoint_fits_transfer_limits(smoke_dir):
    d = smoke_dir / "b"
    shards = sorted(d.glob("ckpt-*.safetensors"))
    assert [p.name for p in shards] == json.loads((d / "state.json").read_text())["shards"]
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) <= 15 * 2 ** 20 and sum(sizes) <= 56 * 2 ** 20, sizes
    files = [p for p in d.iterdir() if p.name != "model.safetensors"]   # the export is made on the CPU side
    assert len(files) <= 8, files


def test_export_loads_in_comfyui_as_wan21_t2v(smoke_dir, comfy_inprocess):
    from safetensors import safe_open
    path = smoke_dir / "b" / "model.safetensors"
    assert path.stat().st_size <= 32 * 2 ** 20
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["training_steps"] == "3" and int(meta["samples_seen"]) == 3 * 2 and meta["seed"] == "1"
    patcher = comfy_inprocess.sd.load_diffusion_model(str(path))
    assert type(patcher.model.model_config).__name__ == "WAN21_T2V"
    assert patcher.model.model_sampling.shift == 8.0


def test_comfyui_denoises_what_we_train(smoke_dir, comfy_inprocess, codec_path):
    """ComfyUI's apply_model on the exported model (sigma, CONST) == x - sigma * our forward, and a
    training batch satisfies CONST.noise_scaling / calculate_denoised with our z0 and noise."""
    from salad_pack.testbed import codec as codec_mod, train
    from safetensors.torch import load_file
    import comfy.ldm.wan.model as wan
    import comfy.model_sampling as ms
    import comfy.ops
    import comfy.samplers

    patcher = comfy_inprocess.sd.load_diffusion_model(str(smoke_dir / "b" / "model.safetensors"))
    base = patcher.model
    ours = train.build_model(comfy.ops, wan, "cpu")
    ours.load_state_dict({k: v.float() for k, v in load_file(str(smoke_dir / "b" / "model.safetensors")).items()})
    cfg = type("Cfg", (), dict(seed=1, batch=2, cfg_dropout=0.0, latent_frames=2, latent_size=4))
    codec = codec_mod.load_codec(path=codec_path)
    x, sigma, ctx, target = train.training_batch(5, cfg, codec, "cpu")
    z0 = train.clean_latents(train.data.sample_specs(1 * train.SEED_STRIDE + 5, 2), cfg, codec, "cpu")
    const = ms.CONST()
    assert torch.allclose(const.calculate_denoised(sigma, target, x), z0, atol=1e-5)
    assert torch.allclose(const.noise_scaling(sigma, target + z0, z0), x, atol=1e-5)
    t = sigma / (8 - 7 * sigma) * 1000                      # inverse of the shift: timesteps in [0, 1000)
    assert torch.allclose(base.model_sampling.sigma(t), sigma, atol=1e-6)
    with torch.no_grad():
        den = base.apply_model(x, sigma, c_crossattn=ctx).float()
        mine = x - sigma.view(-1, 1, 1, 1, 1) * ours(x, sigma * 1000, ctx, transformer_options={})
    assert torch.allclose(den, mine, atol=2e-3, rtol=1e-3), (den - mine).abs().max()
    assert torch.allclose(train.comfy_simple_sigmas(20), comfy.samplers.simple_scheduler(base.model_sampling, 20))


def test_caption_batch_equals_caption_context():
    from salad_pack.testbed import data, text, train
    caps = [s.caption for s in data.sample_specs(7, 6)] + ["", "a red square moves left, the camera pans right"]
    assert torch.equal(train.caption_batch(caps, "cpu"), text.caption_context(caps))


def test_fp8_moment_roundtrip():
    from salad_pack.testbed import train
    s = torch.rand(1000).pow(4) * 1e-3
    q, scale = train.fp8_encode(s)
    assert q.dtype == torch.uint8 and scale.shape == ()
    back = train.fp8_decode(q, scale)
    assert bool((back >= s * (1 - 1e-6)).all())           # rounded up: restored Adam steps only shrink
    normal = s >= scale * 2 ** -6                          # e4m3 normal range: 3 mantissa bits
    assert (back[normal] / s[normal]).max() <= 1.125 + 1e-6
