"""The low-rank Proj option (issue 9 item 2): salad_core/proj.py, the weight format's low-rank blocks,
calibration and fine-tuning with a rank-r Proj.  CPU, salad_core only (the toy DiT of test_finetune)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from seeds import fresh_seed
from test_salad_core import _structured_sample

from salad_pack.salad_core.attention import SaladConfig, mix_branches, salad_self_attention
from salad_pack.salad_core.proj import (LowRankProj, make_proj, proj_add_, proj_bias, proj_flops_ratio, proj_matrix,
                                        proj_rank, svd_truncate)
from salad_pack.salad_core.trainer import SampleStore, TrainConfig, relative_error, subset_weights, train_salad
from salad_pack.salad_core.weights import SaladWeights, SaladWeightsError, load_salad_weights, save_salad_weights


def _random_linear(dim, gen, scale=0.1):
    lin = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(dim, dim, generator=gen) * scale)
        lin.bias.copy_(torch.randn(dim, generator=gen) * scale)
    return lin


# ----------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------

def test_fresh_low_rank_proj_is_zero_and_trains():
    p = make_proj(64, 8, seed=3)
    assert isinstance(p, LowRankProj) and (p.dim, p.rank) == (64, 8) and proj_rank(p) == 8
    assert p.bias is p.up.bias and p.down.bias is None
    x = torch.randn(5, 64)
    assert torch.count_nonzero(p(x)) == 0
    # down: orthonormal rows, the same for the same seed, different for another
    d = p.down.weight
    torch.testing.assert_close(d @ d.t(), torch.eye(8), atol=1e-5, rtol=0)
    assert torch.equal(d, make_proj(64, 8, seed=3).down.weight)
    assert not torch.equal(d, make_proj(64, 8, seed=4).down.weight)
    # gradients reach up at once, and down after one step
    opt = torch.optim.SGD(p.parameters(), lr=0.1)
    target = torch.randn(5, 64)
    ((p(x) - target) ** 2).mean().backward()
    assert p.up.weight.grad.abs().max() > 0 and p.up.bias.grad.abs().max() > 0
    opt.step()
    opt.zero_grad()
    ((p(x) - target) ** 2).mean().backward()
    assert p.down.weight.grad.abs().max() > 0
    # full forms: rank 0 and rank >= dim
    for r in (0, 64, 100):
        f = make_proj(64, r)
        assert type(f) is torch.nn.Linear and proj_rank(f) == 0
        assert torch.count_nonzero(f.weight) == 0 and torch.count_nonzero(f.bias) == 0
    with pytest.raises(ValueError, match="proj rank must be >= 0"):
        make_proj(64, -1)
    with pytest.raises(TypeError, match="expected a SALAD Proj"):
        proj_rank(torch.nn.Identity())
    assert proj_flops_ratio(5120, 256) == pytest.approx(0.1) and proj_flops_ratio(64, 0) == 1.0


def test_svd_truncate_full_rank_exact_and_eckart_young():
    gen = torch.Generator().manual_seed(fresh_seed("svd_truncate"))
    lin = _random_linear(48, gen)
    x = torch.randn(7, 48, generator=gen)
    full = svd_truncate(lin, 48)
    torch.testing.assert_close(full(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.bias, lin.bias, atol=0, rtol=0)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    for r in (1, 8, 24, 47):
        low = svd_truncate(lin, r)
        assert (low.dim, low.rank) == (48, r) and low.up.weight.dtype == torch.float32
        err = (proj_matrix(low).double() - lin.weight.detach().double()).norm()
        best = s[r:].pow(2).sum().sqrt()                    # Eckart-Young: the optimal Frobenius error
        tiny = 1e-4 * float(s[0])      # fp32 factors: roundoff relative to the largest singular value
        assert float(err) == pytest.approx(float(best), rel=1e-4, abs=tiny)
        spec = torch.linalg.matrix_norm(proj_matrix(low).double() - lin.weight.detach().double(), ord=2)
        assert float(spec) == pytest.approx(float(s[r]), rel=1e-4, abs=tiny)
    # a low-rank Proj truncates further; dtype follows the source
    again = svd_truncate(svd_truncate(lin, 24), 8)
    torch.testing.assert_close(proj_matrix(again), proj_matrix(svd_truncate(lin, 8)), atol=1e-5, rtol=1e-4)
    half = svd_truncate(copy.deepcopy(lin).to(torch.bfloat16), 8)
    assert half.up.weight.dtype == torch.bfloat16 == half.down.weight.dtype
    with pytest.raises(ValueError, match="rank must be 1..48"):
        svd_truncate(lin, 0)


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 6])
def test_proj_add_matches_formula(rank, act_dtype):
    """out += o_lin @ W^T for both forms; weights fp32 on the CPU, activations fp32 or bf16 (the weights
    are fetched in the activations' dtype, as when ComfyUI offloads them)."""
    gen = torch.Generator().manual_seed(fresh_seed(f"proj_add_{rank}_{act_dtype}"))
    lin = _random_linear(32, gen)
    proj = lin if rank == 0 else svd_truncate(lin, rank)
    o_lin = torch.randn(40, 32, generator=gen).to(act_dtype)
    out = torch.randn(40, 32, generator=gen).to(act_dtype)
    want = out.float() + o_lin.float() @ proj_matrix(proj).t()
    before = [p.detach().clone() for p in proj.parameters()]
    got = proj_add_(out, o_lin, proj, "test Proj")
    assert got is out and out.dtype == act_dtype
    tol = dict(atol=1e-5, rtol=1e-5) if act_dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(out.float(), want, **tol)
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(before, proj.parameters()))
    b = proj_bias(proj)
    assert b is (lin.bias if rank == 0 else proj.up.bias)
    cast = proj_bias(proj, o_lin)
    assert cast.dtype == act_dtype and torch.equal(cast, b.to(act_dtype))
    with pytest.raises(ValueError, match="test Proj: out2d and o_lin2d must both be"):
        proj_add_(out[:, :16], o_lin, proj, "test Proj")
    with pytest.raises(ValueError, match="share dtype"):
        proj_add_(out.double(), o_lin, proj, "test Proj")
    with pytest.raises(TypeError, match="expected an nn.Linear or LowRankProj"):
        proj_add_(out, o_lin, torch.nn.Identity(), "test Proj")


def test_mix_branches_and_attention_training_path_take_low_rank():
    """The autograd path (calibration / fine-tuning) runs a LowRankProj as a module and trains it."""
    gen = torch.Generator().manual_seed(1)
    H, D, grid = 2, 16, (2, 8, 16)
    L = grid[0] * grid[1] * grid[2]
    q, k, v, x = (torch.randn(1, L, H * D, generator=gen) for _ in range(4))
    lin = _random_linear(H * D, gen)
    low = svd_truncate(lin, 4)
    o_s, o_l = torch.randn(1, L, H * D, generator=gen), torch.randn(1, L, H * D, generator=gen)
    G = torch.full((1, 1, 1), 0.3)
    got = mix_branches(o_s, o_l, low, G)
    torch.testing.assert_close(got, o_s + 0.3 * (o_l @ proj_matrix(low).t() + low.bias), atol=1e-5, rtol=1e-5)
    cfg = SaladConfig(sparsity=0.5, pattern="topk", backend="torch")
    gate = torch.nn.Linear(H * D, 1)
    out = salad_self_attention(q, k, v, H, grid=grid, x=x, proj=low, gate=gate, config=cfg)
    out.square().mean().backward()
    assert low.up.weight.grad.abs().max() > 0 and low.down.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------
# the weight file
# ----------------------------------------------------------------------------------------------

def _random_weights(rank, seed=0, dim=32, blocks=(0, 2)):
    w = SaladWeights.new(dim, 2, 3, blocks=list(blocks), base_model="toy", proj_rank=rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in w.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return w


def test_low_rank_file_round_trip_and_metadata(tmp_path):
    w = _random_weights(6)
    assert w.proj_rank == 6 and isinstance(w.proj_for(2), LowRankProj) and w.metadata["proj_rank"] == "6"
    assert set(w.state_tensors()) == {f"blocks.{i}.{t}" for i in (0, 2) for t in (
        "proj.down.weight", "proj.up.weight", "proj.up.bias", "gate.weight", "gate.bias")}
    p = save_salad_weights(w, tmp_path / "low.safetensors")
    back = load_salad_weights(p)
    assert back.proj_rank == 6 and back.metadata["salad_format_version"] == "2"
    for k, t in w.state_tensors().items():
        assert torch.equal(back.state_tensors()[k], t), k
    # full files: unchanged form, version 1, no proj_rank key (byte-for-byte what older packs wrote)
    full = _random_weights(0)
    pf = save_salad_weights(full, tmp_path / "full.safetensors")
    from safetensors import safe_open
    with safe_open(str(pf), "pt") as f:
        md = f.metadata()
    assert "proj_rank" not in md and md["salad_format_version"] == "1"
    assert load_salad_weights(pf).proj_rank == 0
    # rank >= dim means full; a copy made from metadata keeps the form; subset keeps it too
    assert SaladWeights.new(32, 2, 1, proj_rank=32).proj_rank == 0
    assert SaladWeights(32, 2, 3, [0], metadata=dict(w.metadata)).proj_rank == 6
    assert subset_weights(w, [2]).proj_rank == 6
    with pytest.raises(SaladWeightsError, match="proj_rank must be >= 0"):
        SaladWeights.new(32, 2, 1, proj_rank=-1)
    # fresh low-rank weights output 0: SALAD == sparse-only
    fresh = SaladWeights.new(32, 2, 3, proj_rank=4)
    assert all(torch.count_nonzero(fresh.proj_for(i)(torch.randn(3, 32))) == 0 for i in range(3))


def test_to_low_rank_svd_truncates_every_block(tmp_path):
    full = _random_weights(0, seed=4)
    low = full.to_low_rank(8)
    assert low.proj_rank == 8 and low.block_ids == full.block_ids
    assert "truncated SVD" in low.metadata["proj_compression"]
    errs = json.loads(low.metadata["proj_compression"].split("per block ")[1])
    for i in full.block_ids:
        w = full.proj_for(i).weight.detach().double()
        s = torch.linalg.svdvals(w)
        err = (proj_matrix(low.proj_for(i)).double() - w).norm() / w.norm()
        assert float(err) == pytest.approx(float(s[8:].pow(2).sum().sqrt() / w.norm()), rel=1e-4)
        assert errs[str(i)] == pytest.approx(float(err), rel=1e-3)
        assert torch.equal(low.proj_for(i).bias, full.proj_for(i).bias)
        assert torch.equal(low.gate_for(i).weight, full.gate_for(i).weight)
    back = load_salad_weights(save_salad_weights(low, tmp_path / "c.safetensors"))
    assert back.metadata["proj_compression"] == low.metadata["proj_compression"]
    assert low.to_low_rank(4).proj_rank == 4
    with pytest.raises(SaladWeightsError, match="already have rank 8"):
        low.to_low_rank(16)
    with pytest.raises(SaladWeightsError, match="rank must be 1..31"):
        full.to_low_rank(32)


def _write(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def _hostile_base(rank=4, dim=32):
    w = _random_weights(rank, dim=dim, blocks=(0,))
    w._sync_metadata()
    return {k: v.detach().clone() for k, v in w.state_tensors().items()}, dict(w.metadata)


def test_hostile_low_rank_files_name_the_file(tmp_path):
    t, md = _hostile_base()
    # metadata rank disagrees with the tensors
    p = _write(tmp_path / "lying_rank.safetensors", t, {**md, "proj_rank": "8"})
    with pytest.raises(SaladWeightsError, match=r"lying_rank.safetensors: tensor blocks.0.proj.down.weight has shape "
                                                r"'?\[4, 32\]'?, expected \[8, 32\] for dim 32 and proj_rank 8"):
        load_salad_weights(p)
    # down and up of different ranks
    bad = dict(t, **{"blocks.0.proj.up.weight": torch.zeros(32, 5)})
    with pytest.raises(SaladWeightsError, match=r"uneven.safetensors: tensor blocks.0.proj.up.weight has shape"):
        load_salad_weights(_write(tmp_path / "uneven.safetensors", bad, md))
    # missing up.bias
    nob = {k: v for k, v in t.items() if k != "blocks.0.proj.up.bias"}
    with pytest.raises(SaladWeightsError, match=r"nobias.safetensors: tensors do not match.*missing tensors "
                                                r"\['blocks.0.proj.up.bias'\]"):
        load_salad_weights(_write(tmp_path / "nobias.safetensors", nob, md))
    # rank-0 tensors under a rank metadata (zero-size factors)
    zero = dict(t, **{"blocks.0.proj.down.weight": torch.zeros(0, 32), "blocks.0.proj.up.weight": torch.zeros(32, 0)})
    with pytest.raises(SaladWeightsError, match=r"zero.safetensors: tensor blocks.0.proj.down.weight has "
                                                r"shape '?\[0, 32\]'?"):
        load_salad_weights(_write(tmp_path / "zero.safetensors", zero, md))
    # rank >= dim, negative, not a number
    for name, val, msg in (("ge_dim", "32", r"proj_rank=32 must be 0 \(full Proj\) or 1..31"),
                           ("huge", "999999", r"proj_rank=999999 must be 0"),
                           ("neg", "-3", r"proj_rank=-3 must be >= 0"),
                           ("nan", "four", r"proj_rank='four' is not an integer"),
                           ("long", "1" * 5000, r"proj_rank=.* is longer than the 4096 characters")):
        with pytest.raises(SaladWeightsError, match=rf"{name}.safetensors: metadata {msg}"):
            load_salad_weights(_write(tmp_path / f"{name}.safetensors", t, {**md, "proj_rank": val}))
    # low-rank tensors without the proj_rank key, and full tensors with one
    no_key = {k: v for k, v in md.items() if k != "proj_rank"}
    with pytest.raises(SaladWeightsError, match=r"nokey.safetensors: .*low-rank Proj tensors \(proj.down / proj.up\) "
                                                r"but its metadata proj_rank is missing or 0"):
        load_salad_weights(_write(tmp_path / "nokey.safetensors", t, no_key))
    ft, fmd = _hostile_base(rank=0)
    with pytest.raises(SaladWeightsError, match=r"fullr.safetensors: .*metadata proj_rank=4 says low-rank Proj "
                                                r"tensors .* but the file has full proj.weight"):
        load_salad_weights(_write(tmp_path / "fullr.safetensors", ft, {**fmd, "proj_rank": "4"}))
    # both forms at once
    mixed = dict(t, **{"blocks.0.proj.weight": torch.zeros(32, 32)})
    with pytest.raises(SaladWeightsError, match=r"mixed.safetensors: tensors do not match.*unexpected tensors "
                                                r"\['?blocks.0.proj.weight'?\]"):
        load_salad_weights(_write(tmp_path / "mixed.safetensors", mixed, md))
    # NaN in a factor; version 3 refused
    nan = dict(t, **{"blocks.0.proj.up.weight": torch.full((32, 4), float("nan"))})
    with pytest.raises(SaladWeightsError, match=r"nanf.safetensors: tensor blocks.0.proj.up.weight contains NaN"):
        load_salad_weights(_write(tmp_path / "nanf.safetensors", nan, md))
    with pytest.raises(SaladWeightsError, match=r"v3.safetensors: salad_format_version '?3'? is not supported"):
        load_salad_weights(_write(tmp_path / "v3.safetensors", t, {**md, "salad_format_version": "3"}))
    # the good file loads
    assert load_salad_weights(_write(tmp_path / "good.safetensors", t, md)).proj_rank == 4


# ----------------------------------------------------------------------------------------------
# calibration and fine-tuning
# ----------------------------------------------------------------------------------------------

def test_calibration_with_low_rank_proj_lowers_the_error():
    seed = fresh_seed("calibration_low_rank")
    gen = torch.Generator().manual_seed(seed)
    store = SampleStore()
    # 24 samples (6 held out): with 12 (3 held out) about 1 seed in 30 ended above the bound on held-out noise
    # alone (SALAD_TEST_SEED=2191226043: 0.965); with 24 the largest ratio over 90 seeds was 0.940
    for _ in range(24):
        store.add(**_structured_sample(gen))
    train, held = store.split(holdout=0.25, seed=seed)
    cfg = SaladConfig(sparsity=0.9, pattern="window", backend="torch")
    tc = TrainConfig(steps=150, lr=3e-2, batch_size=2, seed=seed, log_every=40, proj_rank=8)
    w = tc.fresh_weights(32, 2, 3, blocks=[2], sparsity=0.9)
    assert w.proj_rank == 8
    before = relative_error(held, w, cfg)
    assert before["salad"] == before["sparse_only"]
    res = train_salad(train, w, tc, config=cfg)
    hist = res["history"][2]
    assert hist[-1][1] < hist[0][1]
    after = relative_error(held, w, cfg)
    # rank 8 of dim 32 cannot hold the near-identity map this toy wants (full Proj: ~0.75), but it must help
    assert after["salad"] < 0.96 * after["sparse_only"], (seed, before, after)
    assert isinstance(w.proj_for(2), LowRankProj) and w.proj_for(2).up.weight.abs().max() > 0
    # a given full file keeps its form whatever TrainConfig.proj_rank says
    full = SaladWeights.new(32, 2, 3, blocks=[2], sparsity=0.9)
    train_salad(train, full, _few_steps(tc), config=cfg)
    assert full.proj_rank == 0 and type(full.proj_for(2)) is torch.nn.Linear


def _few_steps(tc):
    return TrainConfig.of(tc, {"steps": 5})


def test_finetune_low_rank_checkpoints_and_resume_checks(tmp_path):
    from test_finetune import HEADS, NBLK, ToyDiT, _make_data

    from salad_pack.salad_core.finetune import (FinetuneConfig, FinetuneError, PairFolder, finetune, load_checkpoint,
                                                make_weights)
    data = PairFolder(_make_data(tmp_path / "data", n=4))
    info = dict(dim=64, heads=HEADS, num_blocks=NBLK, base_model="toy")
    cfg = FinetuneConfig(steps=3, batch=2, lr=3e-3, warmup=1, shift=3.0, sparsity=0.5, pattern="topk",
                         ckpt_every=0, seed=1, proj_rank=8)
    w = make_weights(info, cfg)
    assert w.proj_rank == 8
    acfg = SaladConfig(sparsity=0.5, pattern="topk", backend="torch")
    out, ckpt = tmp_path / "ft.safetensors", tmp_path / "ft.ckpt"
    res = finetune(ToyDiT().wire(w, acfg), w, data, cfg, out_path=out, ckpt_path=ckpt, device="cpu")
    assert res["step"] == 3 and float(w.proj_for(0).up.weight.abs().max()) > 0
    back = load_salad_weights(out)
    assert back.proj_rank == 8
    for k, t in w.state_tensors().items():
        assert torch.equal(back.state_tensors()[k], t.detach()), k
    state, tensors = load_checkpoint(ckpt)
    assert state["proj_rank"] == 8 and "opt.blocks.0.proj.down.weight.exp_avg" in tensors
    # resuming with a full Proj is refused by name
    cfg_full = FinetuneConfig(**{**cfg.__dict__, "proj_rank": 0})
    w0 = make_weights(info, cfg_full)
    with pytest.raises(FinetuneError, match=r"Proj rank: checkpoint 8 \(0 = full\), now 0"):
        finetune(ToyDiT().wire(w0, acfg), w0, data, cfg_full, ckpt_path=ckpt, resume=True, device="cpu")
    # given weights: their rank wins; blocks added to a partial file get the same form
    part = subset_weights(back, [1])
    grown = make_weights(info, cfg_full, part)
    assert grown.proj_rank == 8 and grown.block_ids == [0, 1] and isinstance(grown.proj_for(0), LowRankProj)
    assert torch.count_nonzero(grown.proj_for(0)(torch.randn(2, 64))) == 0
    assert torch.equal(grown.proj_for(1).up.weight, back.proj_for(1).up.weight)
    with pytest.raises(FinetuneError, match="proj_rank must be an integer >= 0"):
        FinetuneConfig(proj_rank=-2)


def test_mix_branches_low_rank_bf16_activations_fp32_parameters():
    """Training shape: bf16 activations, fp32 (trainable) low-rank Proj outside autocast: computed in the
    promoted dtype (fp32), returned in the sparse output's dtype, gradients reach both factors."""
    proj = LowRankProj(32, 4)
    with torch.no_grad():
        proj.up.weight.normal_()
    o_s = torch.randn(2, 5, 32).bfloat16()
    o_l = torch.randn(2, 5, 32).bfloat16()
    out = mix_branches(o_s, o_l, proj, torch.full((2, 1, 1), 0.5))
    assert out.dtype == torch.bfloat16
    want = o_s.float() + 0.5 * proj(o_l.float())
    assert torch.allclose(out.float(), want, atol=3e-2, rtol=1e-2)
    out.float().sum().backward()
    assert proj.down.weight.grad is not None and proj.up.weight.grad is not None
