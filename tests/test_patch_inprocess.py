"""The patch on a real ComfyUI ModelPatcher in this process: newer-ComfyUI transformer_options keys,
object-patch scope, and what the user's model looks like before and after."""
import torch


def _apply(*args):
    from salad_pack.nodes.apply import SALADApplyAttention  # needs comfy: import after the fixture
    return SALADApplyAttention().apply(*args)[0]


def _load(comfy, path):
    return comfy.sd.load_diffusion_model(str(path))


def _forward(m, grid_sizes=None, extra=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 16, 16, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 8, 4096, generator=g)
    to = dict(extra or {})
    if grid_sizes is not None:
        to["grid_sizes"] = grid_sizes
    with torch.no_grad():
        return m.model.diffusion_model(x, t, ctx, transformer_options=to)


def _state(m):
    import comfy.patcher_extension as pe
    cb = m.get_all_callbacks(pe.CallbacksMP.ON_CLEANUP)
    return [c.__self__ for c in cb if hasattr(c, "__self__") and type(c.__self__).__name__ == "SaladPatch"][0]


def test_grid_sizes_from_newer_comfyui_is_used(comfy_inprocess, tiny_models):
    base = _load(comfy_inprocess, tiny_models["wan21_t2v_tiny"])
    m = _apply(base, 0.9, "topk", 0.0, 1.0, "", "auto")
    state = _state(m)
    m.patch_model()
    try:
        _forward(m, grid_sizes=(3, 8, 8), extra={"block_index": 0, "total_blocks": 2, "block_type": "double"})
        assert dict(state.stats.sparse_calls) == {0: 1, 1: 1}
        state.on_cleanup()
        # a grid that does not fit the sequence: every call is handed on to dense attention
        _forward(m, grid_sizes=(4, 8, 8))
        assert not state.stats.sparse_calls and state.stats.declined["grid_mismatch"] == 2
        state.on_cleanup()
        # 0.3.75 style (no grid_sizes): the patch_embedding hook learns (3, 8, 8) on every call
        _forward(m)
        assert dict(state.stats.sparse_calls) == {0: 1, 1: 1}
        assert {g for _shape, g in state.stats.shapes} == {(3, 8, 8)}
    finally:
        m.unpatch_model()


def test_patching_leaves_the_users_model_alone(comfy_inprocess, tiny_models):
    base = _load(comfy_inprocess, tiny_models["wan21_t2v_tiny"])
    dm = base.model.diffusion_model
    before = {n: p.detach().clone() for n, p in dm.state_dict().items()}
    fwd_before = [b.self_attn.forward for b in dm.blocks]
    opts_before = repr(base.model_options)
    ref = _forward(base)
    m = _apply(base, 0.9, "window", 0.0, 1.0, "", "torch")
    assert m is not base and repr(base.model_options) == opts_before and not base.object_patches
    m.patch_model()
    out = _forward(m)
    m.unpatch_model()
    assert not torch.allclose(out, ref)
    after = _forward(base)
    assert torch.equal(after, ref)
    assert [b.self_attn.forward for b in dm.blocks] == fwd_before
    for n, p in dm.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_percent_window_follows_a_shift_node_placed_after_salad(comfy_inprocess, tiny_models):
    """start/end_percent are turned into sigmas on the schedule of the model being sampled (ON_PRE_RUN):
    Apply SALAD, then ModelSamplingSD3 with another shift, moves the window as the shift moves the sigmas."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    base = _load(comfy_inprocess, tiny_models["wan21_t2v_tiny"])
    m = _apply(base, 0.9, "topk", 0.2, 0.9, "", "torch")
    state = _state(m)
    at_apply = (state.sigma_start, state.sigma_end)
    ms = m.get_model_object("model_sampling")
    assert at_apply == (float(ms.percent_to_sigma(0.2)), float(ms.percent_to_sigma(0.9)))
    shifted = ModelSamplingSD3().patch(m, shift=1.0)[0]
    ms1 = shifted.get_model_object("model_sampling")
    want = (float(ms1.percent_to_sigma(0.2)), float(ms1.percent_to_sigma(0.9)))
    assert abs(want[0] - at_apply[0]) > 0.05, (want, at_apply)       # the shift really moves the window
    shifted.pre_run()                                                  # what CFGGuider.outer_sample calls
    assert (state.sigma_start, state.sigma_end) == want
    m.pre_run()                                                        # sampling the unshifted clone again
    assert (state.sigma_start, state.sigma_end) == at_apply
    # the whole window (0, 1) stays "always on" whatever the schedule
    full = _state(_apply(base, 0.9, "topk", 0.0, 1.0, "", "torch"))
    assert full.sigma_start is None and full.sigma_end is None


def test_read_only_models_folder_does_not_stop_the_pack_loading(comfy_inprocess, monkeypatch, caplog):
    """models/salad cannot be created (read-only models folder, e.g. in a container): a warning, and the
    folder is still registered, so weight files in extra_model_paths.yaml's salad folders keep working."""
    import folder_paths

    from salad_pack.nodes import paths

    def refuse(*a, **k):
        raise PermissionError(13, "Read-only file system")
    monkeypatch.setattr(paths.os, "makedirs", refuse)
    saved = folder_paths.folder_names_and_paths.get(paths.FOLDER_NAME)
    try:
        with caplog.at_level("WARNING", logger="SALAD"):
            paths.register_model_folder()
        assert paths.FOLDER_NAME in folder_paths.folder_names_and_paths
        assert "could not create" in caplog.text and "Read-only" in caplog.text
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths[paths.FOLDER_NAME] = saved
