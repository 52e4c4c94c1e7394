"""The model-family seam (nodes/families) and the second family, LTX-Video, on CPU.

The LTX-Video model is ComfyUI's own LTXVModel with tiny dims (tests/make_fixtures.py ``ltxv_tiny``:
32 heads x 16, 2 blocks, random weights), loaded by ComfyUI's loader, which detects it as LTXV.
In this process: the adapter's token rules, sparsity 0 == dense, keyframe (guide) tokens as extras,
series semantics, weight checks.  In the real ComfyUI server: UNETLoader -> Apply SALAD Attention ->
KSampler, SALAD on both blocks, close to dense at sparsity 0, different at 0.9.
"""
import pytest
import torch

from comfy_harness import make_fixtures
from graphs import t2v_prompt
from test_salad_in_comfy import _latent, _parse_counter, _run_ok, _stats_after, _uniq

LTXV = "ltxv_tiny"
FRAMES, SIZE, TOKENS = 3, 16, 3 * 16 * 16          # latent (1, 128, 3, 16, 16) -> 768 tokens, 6 blocks of 128


@pytest.fixture(scope="module")
def ltxv_path(tmp_path_factory, comfyui_dir):
    return make_fixtures(comfyui_dir, tmp_path_factory.mktemp("ltxv"), [LTXV])[0]


@pytest.fixture(scope="module")
def ltxv(comfy_inprocess, ltxv_path):
    return comfy_inprocess.sd.load_diffusion_model(str(ltxv_path))


def _apply(model, sparsity, **kw):
    from salad_pack.nodes.apply import SALADApplyAttention
    args = dict(dense_blocks="", backend="torch")
    args.update(kw)
    dense_blocks, backend = args.pop("dense_blocks"), args.pop("backend")
    return SALADApplyAttention().apply(model, sparsity, "topk", 0.0, 1.0, dense_blocks, backend, **args)[0]


def _state(m):
    import comfy.patcher_extension as pe
    return [c.__self__ for c in m.get_all_callbacks(pe.CallbacksMP.ON_CLEANUP)
            if type(getattr(c, "__self__", None)).__name__ == "SaladPatch"][-1]


def _forward(m, x, keyframe_idxs=None, seed=3):
    """One model call as the sampler makes it (wrappers in transformer_options, T5-style mask)."""
    import comfy.model_management as mm
    mm.load_models_gpu([m])
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(x.shape[0], 16, 4096, generator=g)
    sigma = torch.full((x.shape[0],), 0.7)
    kw = {} if keyframe_idxs is None else {"keyframe_idxs": keyframe_idxs}
    mask = torch.ones(x.shape[0], 16, dtype=torch.long)
    with torch.no_grad():
        return m.model.apply_model(x, sigma, c_crossattn=ctx, attention_mask=mask,
                                   transformer_options={"wrappers": m.wrappers, "sigmas": sigma}, **kw)


def _latent_in(seed=0, frames=FRAMES):
    print(f"seed={seed}")
    return torch.randn(1, 128, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# -- the seam ------------------------------------------------------------------------------------

def test_family_detection_and_head_layout(ltxv, tiny_models, comfy_inprocess):
    from salad_pack.nodes.families import LTXVFamily, WanFamily, family_for
    from salad_pack.nodes.patch import model_info, wan_model_info
    assert type(ltxv.model).__name__ == "LTXV"          # ComfyUI's loader detected the fixture as LTX-Video
    info = model_info(ltxv, "test")
    assert info == dict(family="ltxv", label=LTXVFamily.label, dim=512, heads=32, num_blocks=2,
                        base_model="ltxv-dim512-2blocks", model_type="ModelType.FLUX")
    wan = comfy_inprocess.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]))
    assert isinstance(family_for(wan.model.diffusion_model), WanFamily)
    assert model_info(wan, "test")["family"] == "wan"
    assert LTXVFamily(ltxv.model.diffusion_model).patch_size() == (1, 1, 1)
    assert WanFamily(wan.model.diffusion_model).latent_grid(21, 60, 104) == (21, 30, 52)
    with pytest.raises(ValueError, match=r"SALAD Train Weights: model input is a LTXVModel; SALAD supports Wan"):
        wan_model_info(ltxv, "SALAD Train Weights")        # training wires Wan's forward: Wan only


def test_audio_video_ltx_blocks_are_not_claimed(comfy_inprocess):
    """Newer ComfyUI's LTX-2 audio-video model subclasses LTXVModel with blocks that also run an audio
    stream (audio_attn1 ...): the LTX-Video adapter does not claim it (its token rule is video only)."""
    import comfy.ldm.lightricks.model as ltx
    import comfy.ops
    from make_fixtures import LTXV_VARIANTS
    from salad_pack.nodes.families import LTXVFamily, family_for
    dm = ltx.LTXVModel(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32,
                       **LTXV_VARIANTS[LTXV])
    assert isinstance(family_for(dm), LTXVFamily)
    for b in dm.transformer_blocks:
        b.audio_attn1 = torch.nn.Identity()
    assert family_for(dm) is None


def test_token_layout_rules(ltxv, tiny_models, comfy_inprocess):
    """Where each family's extra tokens go, and what is declined."""
    from salad_pack.nodes.families import LTXVFamily, WanFamily
    fam = LTXVFamily(ltxv.model.diffusion_model)
    assert fam.token_layout(768, ((3, 16, 16), 0), {}) == ((3, 16, 16), 0, 0)
    # one guide frame appended to the latent (LTXVAddGuide): its 256 tokens are n_back extras
    assert fam.token_layout(1024, ((4, 16, 16), 256), {}) == ((3, 16, 16), 0, 256)
    assert fam.token_layout(1000, ((4, 16, 16), 256), {}) == "grid_mismatch"   # filtered tokens: hand on
    assert fam.token_layout(768 + 256, ((3, 16, 16), 0), {}) == "grid_mismatch"
    assert fam.token_layout(768, None, {}) == "no_grid"
    wan = comfy_inprocess.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]))
    w = WanFamily(wan.model.diffusion_model)
    assert w.token_layout(200, (3, 8, 8), {}) == ((3, 8, 8), 0, 8)
    assert w.token_layout(200, (3, 8, 8), {"grid_sizes": (2, 8, 8)}) == ((2, 8, 8), 0, 72)
    w.has_ref_conv = True
    assert w.token_layout(200, (3, 8, 8), {}) == ((3, 8, 8), 8, 0)
    assert w.token_layout(100, (3, 8, 8), {}) == "grid_mismatch"


# -- LTX-Video in this process -------------------------------------------------------------------

def test_ltxv_sparsity_zero_is_dense_and_090_differs(ltxv):
    x = _latent_in()
    ref = _forward(ltxv, x)
    m0 = _apply(ltxv, 0.0, verbose=True)
    out0 = _forward(m0, x)
    st0 = _state(m0)
    assert dict(st0.stats.sparse_calls) == {0: 1, 1: 1} and not st0.stats.declined, st0.stats.summary()
    assert st0.stats.shapes == {((1, TOKENS, 512), (FRAMES, SIZE, SIZE))}
    assert ((out0 - ref).norm() / ref.norm()) < 1e-5
    m9 = _apply(ltxv, 0.9)
    out9 = _forward(m9, x)
    assert dict(_state(m9).stats.sparse_calls) == {0: 1, 1: 1}
    assert out9.isfinite().all() and ((out9 - ref).norm() / ref.norm()) > 1e-3
    assert torch.equal(_forward(ltxv, x), ref)           # the user's model is untouched


def test_ltxv_guide_tokens_are_extras(ltxv):
    """A guide frame appended to the latent with keyframe_idxs (as LTXVAddGuide does): the grid is the
    video part, the guide's tokens are n_back extras (kept for every query), and sparsity 0 is dense."""
    x = _latent_in(1, frames=FRAMES + 1)
    kf = torch.zeros(1, 3, SIZE * SIZE)                  # pixel coords of the guide tokens: frame 0
    kf[:, 1] = torch.arange(SIZE).repeat_interleave(SIZE) * 32
    kf[:, 2] = torch.arange(SIZE).repeat(SIZE) * 32
    ref = _forward(ltxv, x, kf)
    m0 = _apply(ltxv, 0.0)
    out0 = _forward(m0, x, kf)
    st = _state(m0)
    assert st.stats.shapes == {((1, (FRAMES + 1) * SIZE * SIZE, 512), (FRAMES, SIZE, SIZE))}, st.stats.summary()
    assert ((out0 - ref).norm() / ref.norm()) < 1e-5
    seen = {}
    from salad_pack.salad_core import attention as A
    token = A.CAPTURE_HOOK.set(lambda d: seen.update(n_front=d["n_front"], n_back=d["n_back"], grid=d["grid"]))
    try:
        _forward(_apply(ltxv, 0.9), x, kf)
    finally:
        A.CAPTURE_HOOK.reset(token)
    assert seen == dict(n_front=0, n_back=SIZE * SIZE, grid=(FRAMES, SIZE, SIZE))


def test_ltxv_positional_transformer_options_and_series(ltxv):
    """attn1 called with transformer_options positionally still gets SALAD; a later node wins for the blocks
    it covers, the earlier keeps the block the later leaves dense."""
    a = _apply(ltxv, 0.5)
    b = _apply(a, 0.9, dense_blocks="1")
    sa, sb = _state(a), _state(b)
    fwd0 = b.object_patches["diffusion_model.transformer_blocks.0.attn1.forward"]
    fwd1 = b.object_patches["diffusion_model.transformer_blocks.1.attn1.forward"]
    assert fwd0._salad_state is sb and fwd1._salad_state is sa
    attn = ltxv.model.diffusion_model.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(5)
    xin = torch.randn(1, TOKENS, 512, generator=g)
    sb.record(((FRAMES, SIZE, SIZE), 0), first_of_forward=False)
    to = {}
    with torch.no_grad():
        out = fwd0(xin, None, None, None, to)             # (x, context, mask, pe, transformer_options)
        ref = attn.forward(xin, None, None, None, {})
    assert dict(sb.stats.sparse_calls) == {0: 1} and "optimized_attention_override" not in to
    assert out.shape == ref.shape and not torch.allclose(out, ref)


def test_ltxv_weights_checked_against_the_family(ltxv, tmp_path):
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.salad_core.weights import SaladWeights
    ok = SaladWeights.new(dim=512, heads=32, num_blocks=2, model_family="ltxv", base_model="ltxv-dim512-2blocks")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ok.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = _latent_in(2)
    m = _apply(ltxv, 0.9, salad_weights=SALADWeightsLoader.wrap(ok))
    sparse_only = _forward(_apply(ltxv, 0.9), x)
    out = _forward(m, x)
    assert dict(_state(m).stats.sparse_calls) == {0: 1, 1: 1}
    assert not torch.allclose(out, sparse_only)         # the gated linear branch ran
    wan_shaped = SaladWeights.new(dim=512, heads=32, num_blocks=2)               # model_family "wan"
    with pytest.raises(ValueError, match=r"salad_weights do not fit this model: .*made for wan dim 512"):
        _apply(ltxv, 0.9, salad_weights=SALADWeightsLoader.wrap(wan_shaped))
    small = SaladWeights.new(dim=256, heads=2, num_blocks=2, model_family="ltxv")
    with pytest.raises(ValueError, match=r"do not fit this model: .*dim 256"):
        _apply(ltxv, 0.9, salad_weights=SALADWeightsLoader.wrap(small))


# -- LTX-Video in the real ComfyUI server --------------------------------------------------------

STEPS = 2


def _ltxv_prompt(unet, salad=None, prefix="ltxv"):
    p = t2v_prompt(unet, salad=salad, steps=STEPS, channels=128, frames=FRAMES, height=SIZE, width=SIZE,
                   prefix=prefix)
    for n in ("2", "3"):
        p[n]["class_type"] = "SALADTest_MaskedConditioning"
    return p


@pytest.fixture(scope="module")
def ltxv_server(comfy_server, ltxv_path):
    link = comfy_server.diffusion_dir / ltxv_path.name
    if not link.exists():
        link.symlink_to(ltxv_path)
    return comfy_server


def test_ltxv_graph_in_real_comfyui(ltxv_server, ltxv_path):
    server, unet = ltxv_server, ltxv_path.name
    dense = _latent(server, _run_ok(server, _ltxv_prompt(unet, prefix=_uniq("ltxv_dense"))))
    mark = len(server.log())
    s0 = _latent(server, _run_ok(server, _ltxv_prompt(unet, {"sparsity": 0.0}, prefix=_uniq("ltxv_s0"))))
    stats = _stats_after(server, mark)
    assert stats, server.log()[mark:][-2000:]
    sparse, declined, cross = stats[-1]
    assert _parse_counter(sparse) == {0: STEPS, 1: STEPS} and _parse_counter(declined) == {} and cross == "0"
    assert "patched 2 of 2 ltxv blocks" in server.log()[mark:]
    assert (s0 - dense).abs().max() / dense.abs().max() < 2e-3
    mark = len(server.log())
    s9 = _latent(server, _run_ok(server, _ltxv_prompt(unet, {"sparsity": 0.9}, prefix=_uniq("ltxv_s9"))))
    assert _parse_counter(_stats_after(server, mark)[-1][0]) == {0: STEPS, 1: STEPS}
    assert s9.isfinite().all() and (s9 - dense).norm() / dense.norm() > 1e-3


def test_gpu_timing_script_runs_tiny(comfy_inprocess, tmp_path):
    """benchmarks/bench_family.py (the GPU timing of this family) runs end to end at its --tiny size."""
    import importlib.util
    from comfy_harness import ROOT
    spec = importlib.util.spec_from_file_location("bench_family", ROOT / "benchmarks" / "bench_family.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--out", str(tmp_path / "family.json")])
    row = res["sizes"][0]
    assert res["family"]["family"] == "ltxv" and row["tokens"] == TOKENS
    assert row["check_sparsity0_rel_err"] < 1e-5 and row["runs"][0]["salad_calls_one_forward"] == 2
    assert (tmp_path / "family.json").is_file()
