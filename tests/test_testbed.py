"""SALAD testbed on the CPU: procedural data, PCA codec, caption encoder, adherence detector."""

import pytest
import torch

from salad_pack.testbed import codec as codec_mod
from salad_pack.testbed import data, detect, text


@pytest.fixture(scope="module")
def codec():
    return codec_mod.load_codec()


@pytest.fixture(scope="module")
def clips():
    """12 held-out specs (seed 99, not the codec's fit seed) and their 64x64x64 renders."""
    specs = data.sample_specs(99, 12)
    return specs, data.render(specs, 64, 64)


def test_specs_and_render_are_deterministic():
    a, b, c = data.sample_specs(5, 4), data.sample_specs(5, 4), data.sample_specs(6, 4)
    assert [s.caption for s in a] == [s.caption for s in b] != [s.caption for s in c]
    va, vb = data.render(a, 8, 32), data.render(b, 8, 32)
    assert va.shape == (4, 8, 32, 32, 3) and va.dtype == torch.float32
    assert torch.equal(va, vb) and 0 <= va.min() and va.max() <= 1
    assert not torch.equal(va, data.render(c, 8, 32))


def test_caption_grammar():
    for s in data.sample_specs(3, 50):
        parts = s.caption.split(", ")
        assert len(parts) == len(s.objects) + bool(s.pan)
        for o, p in zip(s.objects, parts):
            assert p.startswith("a ") and o.colour in p and o.shape in p
        assert len({o.colour for o in s.objects} | {o.colour_to for o in s.objects if o.colour_to}) == \
            len(s.objects) + sum(bool(o.colour_to) for o in s.objects)


def test_codec_metadata_and_shapes(codec):
    assert (codec.ft, codec.fs, codec.channels) == (4, 4, 16)
    assert {"ft", "fs", "seed", "psnr"} <= set(codec.meta)
    v = data.render(data.sample_specs(1, 4), 16 * codec.ft, 32 * codec.fs)
    raw = codec.encode(v)
    assert raw.shape == (4, 16, 16, 32, 32)
    var = codec.to_model_space(raw).var(dim=(0, 2, 3, 4))     # whitened on the training distribution
    assert 0.5 < var.mean() < 2 and (var > 0.1).all() and (var < 10).all(), var
    assert codec.decode(raw).shape == v.shape
    assert torch.allclose(codec.from_model_space(codec.to_model_space(raw)), raw, atol=1e-5)


def test_codec_psnr_on_held_out_clips(codec, clips):
    specs, v = clips
    raw = codec.encode(v)
    got = codec_mod.psnr(codec.decode(raw), v)
    assert got >= float(codec.meta["psnr"]) - 1.0, (got, codec.meta["psnr"])


def test_wan21_constants_match_comfy(comfy_inprocess, codec):
    from comfy.latent_formats import Wan21
    fmt = Wan21()
    assert torch.equal(fmt.latents_mean.flatten(), torch.tensor(codec_mod.WAN21_MEAN))
    assert torch.equal(fmt.latents_std.flatten(), torch.tensor(codec_mod.WAN21_STD))
    raw = torch.randn(2, 16, 3, 4, 4)
    assert torch.allclose(fmt.process_in(raw), codec.to_model_space(raw), atol=1e-6)
    assert torch.allclose(fmt.process_out(raw), codec.from_model_space(raw), atol=1e-6)


def test_caption_context():
    caps = ["a red square moves left, a spinning blue circle bounces then turns green, the camera pans right",
            "", "a green circle stays"]
    ctx = text.caption_context(caps)
    assert ctx.shape == (3, 512, 4096) and ctx.dtype == torch.float32
    assert torch.equal(ctx, text.caption_context(caps))
    assert not ctx[1].any()
    rms = ctx[0, :3].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full((3,), text.TOKEN_RMS), atol=1e-4)
    assert not ctx[0, 3:].any() and not ctx[2, 1:].any()
    # case, punctuation and unknown words do not matter; order and "turns <colour>" do
    same = text.caption_context(["A RED square xyzzy moves left!"])
    assert torch.allclose(same[0, 0], ctx[0, 0])
    assert not torch.allclose(text.caption_context(["a blue circle stays, a red square moves left"])[0, 1], ctx[0, 0])
    turned = text.caption_context(["a red square moves left then turns green", "a green red square moves left"])
    assert not torch.allclose(turned[0, 0], turned[1, 0])
    assert text.caption_context(["x"], dtype=torch.float16).dtype == torch.float16


def test_detector_passes_truth_and_rejects_wrong_specs(codec, clips):
    specs, v = clips
    assert detect.adherence_rate(detect.adherence(v, specs)) >= 11 / 12
    assert detect.adherence_rate(detect.adherence(codec.decode(codec.encode(v)), specs)) >= 10 / 12
    assert detect.adherence_rate(detect.adherence(v, specs[1:] + specs[:1])) <= 2 / 12
    assert detect.adherence_rate(detect.adherence(v, detect.swap_motions(specs))) <= 3 / 12
    r = detect.adherence(v[:1], specs[:1])[0]
    assert set(r) == {"pass", "colour_ok", "motion_ok", "objects"} and len(r["objects"]) == len(specs[0].objects)
