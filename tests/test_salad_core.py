"""Tests of salad_core: tiling, SALAD attention, weight files, trainer (CPU, torch backend)."""
from __future__ import annotations

import math
import struct
import json

import pytest
import torch
from seeds import fresh_seed

from salad_pack.salad_core import (
    SaladConfig,
    SaladWeights,
    SaladWeightsError,
    TileLayout,
    dense_reference_attention,
    format_block_spec,
    load_salad_weights,
    parse_block_spec,
    salad_branches,
    salad_self_attention,
    save_salad_weights,
)
from salad_pack.salad_core import weights as weights_mod
from salad_pack.salad_core.trainer import SampleStore, capture, relative_error, train_salad


def _seed():
    """Fresh random inputs each run; the seed is printed (SALAD_TEST_SEED=<seed> replays it)."""
    return fresh_seed()


def _qkv(B, L, H, D, dtype=torch.float32):
    return [torch.randn(B, L, H * D, dtype=dtype) for _ in range(3)]


# ----------------------------------------------------------------------------------------------
# tiling
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,nf,nb,tile", [
    ((3, 5, 9), 0, 0, (2, 8, 8)),
    ((3, 10, 13), 7, 4, (2, 8, 8)),
    ((1, 3, 3), 5, 0, (2, 8, 8)),
    ((5, 17, 11), 0, 130, (2, 4, 4)),
    ((2, 16, 16), 128, 128, (2, 8, 8)),
])
def test_tiling_perm_roundtrip(grid, nf, nb, tile):
    lay = TileLayout.get(grid, nf, nb, tile)
    F_, Hh, Ww = grid
    nv = F_ * Hh * Ww
    assert lay.L == nf + nv + nb
    assert torch.equal(torch.sort(lay.perm).values, torch.arange(lay.L))
    assert torch.equal(lay.perm[lay.inv_perm], torch.arange(lay.L))
    assert torch.equal(lay.inv_perm[lay.perm], torch.arange(lay.L))
    x = torch.randn(2, lay.L, 3)
    assert torch.equal(x.index_select(1, lay.perm).index_select(1, lay.inv_perm), x)
    # video tokens first, then front extras, then back extras
    assert torch.equal(lay.perm[nv:nv + nf], torch.arange(nf))
    assert torch.equal(lay.perm[nv + nf:], torch.arange(nf + nv, lay.L))
    # each tile is contiguous in the new order and raster-ordered inside
    vid = lay.perm[:nv] - nf
    f, r, c = vid // (Hh * Ww), (vid // Ww) % Hh, vid % Ww
    tf, th, tw = tile
    nth, ntw = -(-Hh // th), -(-Ww // tw)
    tid = ((f // tf) * nth + r // th) * ntw + c // tw
    assert torch.all(tid[1:] >= tid[:-1])
    same = tid[1:] == tid[:-1]
    assert torch.all(vid[1:][same] > vid[:-1][same])
    # cache
    assert TileLayout.get(grid, nf, nb, tile) is lay


def test_tiling_interior_blocks_are_tiles_and_coords():
    grid = (4, 16, 24)
    lay = TileLayout.get(grid, 0, 0, (2, 8, 8))
    coords = lay.block_coords(128)
    assert coords.shape == (lay.L // 128, 3)
    # every block is exactly one 2x8x8 tile: centroid at tile centre
    expect = []
    for tf in range(2):
        for th in range(2):
            for tw in range(3):
                expect.append([tf * 2 + 0.5, th * 8 + 3.5, tw * 8 + 3.5])
    assert torch.allclose(coords, torch.tensor(expect))
    assert lay.extra_blocks(128).numel() == 0


def test_block_coords_ragged_with_extras():
    grid = (3, 10, 13)
    lay = TileLayout.get(grid, 20, 5, (2, 8, 8))
    coords = lay.block_coords(128)
    nb = math.ceil(lay.L / 128)
    assert coords.shape == (nb, 3)
    assert torch.isfinite(coords).all()
    assert (coords[:, 0] >= 0).all() and (coords[:, 0] <= 2).all()
    assert (coords[:, 1] >= 0).all() and (coords[:, 1] <= 9).all()
    assert (coords[:, 2] >= 0).all() and (coords[:, 2] <= 12).all()
    nv = 3 * 10 * 13
    ex = lay.extra_blocks(128).tolist()
    assert ex == list(range(nv // 128, nb))
    # a block of only extra tokens sits at the grid centre
    lay2 = TileLayout.get((1, 4, 4), 300, 0, (2, 8, 8))
    c2 = lay2.block_coords(128)
    assert torch.allclose(c2[-1], torch.tensor([0.0, 1.5, 1.5]))


def test_grid_mismatch_raises():
    q, k, v = _qkv(1, 100, 2, 8)
    with pytest.raises(ValueError, match=r"grid \(2, 7, 7\).*L = 100"):
        salad_self_attention(q, k, v, 2, grid=(2, 7, 7), config=SaladConfig(pattern="window", backend="torch"))


def test_config_validation():
    for bad in (dict(sparsity=1.0), dict(sparsity=-0.1), dict(pattern="x"), dict(backend="cuda"),
                dict(tile=(2, 8)), dict(window_scale=(1, 0, 1)), dict(block=0), dict(eps=0)):
        with pytest.raises(ValueError):
            SaladConfig(**bad)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["window", "topk"])
def test_sparsity_zero_equals_dense(pattern):
    _seed()
    H, D, grid, nf, nb = 3, 16, (3, 10, 13), 11, 6
    L = nf + 3 * 10 * 13 + nb
    q, k, v = _qkv(2, L, H, D)
    ref = dense_reference_attention(q, k, v, H)
    out = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, n_back=nb,
                               config=SaladConfig(sparsity=0.0, pattern=pattern, backend="torch"))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["window", "topk"])
def test_sparse_differs_from_dense_and_zero_proj_is_sparse_only(pattern):
    _seed()
    H, D, grid = 2, 32, (4, 16, 24)
    L = 4 * 16 * 24
    q, k, v = _qkv(2, L, H, D)
    x = torch.randn(2, L, H * D)
    cfg = SaladConfig(sparsity=0.9, pattern=pattern, backend="torch")
    ref = dense_reference_attention(q, k, v, H)
    sparse = salad_self_attention(q, k, v, H, grid=grid, config=cfg)
    assert torch.isfinite(sparse).all()
    rel = (sparse - ref).norm() / ref.norm()
    assert rel > 0.05
    w = SaladWeights.new(H * D, H, 2)
    out = salad_self_attention(q, k, v, H, grid=grid, x=x, proj=w.proj_for(1), gate=w.gate_for(1), config=cfg)
    assert torch.equal(out, sparse)
    # B=2 batch rows are independent (cond / uncond)
    one = salad_self_attention(q[1:], k[1:], v[1:], H, grid=grid, config=cfg)
    assert torch.allclose(one[0], sparse[1], atol=1e-6)


def test_window_sparse_matches_masked_reference():
    """The sparse branch is exact softmax attention restricted to the selected blocks."""
    _seed()
    from salad_pack.kernels import block_mask_dense
    from salad_pack.salad_core.attention import select_blocks

    H, D, grid, nf = 2, 8, (2, 8, 24), 30
    L = nf + 2 * 8 * 24
    q, k, v = _qkv(1, L, H, D)
    cfg = SaladConfig(sparsity=0.7, pattern="window", backend="torch")
    out = salad_self_attention(q, k, v, H, grid=grid, n_front=nf, config=cfg)
    lay = TileLayout.get(grid, nf, 0, cfg.tile)
    th = lambda t: t.view(1, L, H, D).index_select(1, lay.perm).permute(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh = th(q), th(k), th(v)
    idx, cnt = select_blocks(qh, kh, lay, cfg)
    assert (cnt < math.ceil(L / 128)).all()
    m = block_mask_dense(idx, cnt, L, L, 128)
    # extra-token blocks are always kept
    for b in lay.extra_blocks(128).tolist():
        assert m[..., b * 128:(b + 1) * 128].any(-1).all()
    s = (qh.double() @ kh.double().transpose(-1, -2)) / math.sqrt(D)
    o = torch.softmax(s.masked_fill(~m, -float("inf")), -1) @ vh.double()
    o = o.permute(0, 2, 1, 3).index_select(1, lay.inv_perm).reshape(1, L, H * D)
    assert torch.allclose(out.double(), o, atol=1e-5)


def test_linear_branch_gate_and_dtype():
    _seed()
    H, D, grid = 2, 16, (2, 8, 16)
    L = 2 * 8 * 16
    q, k, v = _qkv(2, L, H, D)
    x = torch.randn(2, L, H * D)
    cfg = SaladConfig(sparsity=0.5, pattern="window", backend="torch")
    proj = torch.nn.Linear(H * D, H * D)
    gate = torch.nn.Linear(H * D, 1)
    o_s, o_l = salad_branches(q, k, v, H, grid=grid, config=cfg)
    G = torch.sigmoid(gate(x.mean(1))).view(2, 1, 1)
    expect = o_s + G * proj(o_l)
    out = salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=cfg)
    assert torch.allclose(out, expect, atol=1e-5)
    # no gate -> G = 1
    out1 = salad_self_attention(q, k, v, H, grid=grid, proj=proj, config=cfg)
    assert torch.allclose(out1, o_s + proj(o_l), atol=1e-5)
    # linear branch == ReLU linear attention over all tokens
    qh, kh, vh = (t.view(2, L, H, D).transpose(1, 2).double() for t in (q, k, v))
    pq, pk = qh.relu(), kh.relu()
    ol = (pq @ (pk.transpose(-1, -2) @ vh)) / ((pq * pk.sum(2, keepdim=True)).sum(-1, keepdim=True) + cfg.eps)
    assert torch.allclose(o_l.double(), ol.transpose(1, 2).reshape(2, L, H * D), atol=1e-4)
    # bf16 inputs -> bf16 output, fp32 proj
    ob = salad_self_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), H, grid=grid, x=x.bfloat16(),
                              proj=proj, gate=gate, config=cfg)
    assert ob.dtype == torch.bfloat16
    assert (ob.float() - expect).norm() / expect.norm() < 0.03
    with torch.no_grad():  # inference path: proj runs in the activation dtype
        ob2 = salad_self_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), H, grid=grid, x=x.bfloat16(),
                                   proj=proj, gate=gate, config=cfg)
        assert ob2.dtype == torch.bfloat16
        assert (ob2.float() - expect).norm() / expect.norm() < 0.03
        o32 = salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=cfg)
        assert torch.allclose(o32, expect, atol=1e-5)
    # gradients reach proj and gate
    out.square().mean().backward()
    assert proj.weight.grad is not None and gate.weight.grad is not None
    assert gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------

def _trained_like(dim=32, heads=2, nblk=4, blocks=(0, 1, 3)):
    w = SaladWeights.new(dim, heads, nblk, blocks=blocks, base_model="test-model", pattern="topk", sparsity=0.8)
    with torch.no_grad():
        for p in w.parameters():
            p.normal_()
    w.metadata["training_data"] = "unit test"
    return w


def test_new_weights_init():
    w = SaladWeights.new(48, 3, 5, blocks="1-3")
    assert w.block_ids == [1, 2, 3] and w.has_block(2) and not w.has_block(0)
    assert w.proj_for(0) is None and w.gate_for(4) is None
    assert torch.count_nonzero(w.proj_for(1).weight) == 0 and torch.count_nonzero(w.proj_for(1).bias) == 0
    x = torch.randn(2, 48)
    assert torch.allclose(torch.sigmoid(w.gate_for(1)(x)), torch.full((2, 1), 0.5))
    assert w.metadata["blocks"] == "1-3" and w.metadata["dim"] == "48"
    assert parse_block_spec("0-3, 7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert format_block_spec([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"


def test_one_block_list_syntax_and_vocabulary():
    from salad_pack.salad_core import options
    from salad_pack.salad_core.attention import PATTERNS

    assert PATTERNS is options.PATTERNS and SaladConfig().pattern == options.DEFAULT_PATTERN == "topk"
    assert weights_mod.DEFAULT_META["pattern"] == options.DEFAULT_PATTERN
    # node use: negatives count from the end; weight-file use: no negatives, bounded by num_blocks
    assert options.parse_block_list("0; 1,28-29,-1", 30) == [0, 1, 28, 29]
    with pytest.raises(ValueError, match="negative"):
        parse_block_spec("-1", 30)
    with pytest.raises(ValueError, match=r"dense_blocks: block '0-99999' .* 2 blocks"):
        options.parse_block_list("0-99999", 2, name="dense_blocks")
    with pytest.raises(ValueError, match="cannot read '2-1'"):
        options.parse_block_list("2-1", 5)
    with pytest.raises(ValueError, match=r"chars\)"):
        options.parse_block_list("x" * 5000, 5)


def test_weights_roundtrip(tmp_path):
    _seed()
    w = _trained_like()
    p = save_salad_weights(w, tmp_path / "salad_test.safetensors")
    assert [f.name for f in tmp_path.iterdir()] == ["salad_test.safetensors"]
    w2 = load_salad_weights(p)
    assert w2.block_ids == [0, 1, 3] and w2.dim == 32 and w2.heads == 2 and w2.num_blocks == 4
    for a, b in zip(w.state_tensors().values(), w2.state_tensors().values()):
        assert torch.equal(a, b)
    for key in ("salad_format_version", "base_model", "model_family", "dim", "heads", "num_blocks", "blocks",
                "pattern", "sparsity", "training_steps", "training_data", "created_by"):
        assert w2.metadata[key] == w.metadata[key], key
    assert w2.metadata["blocks"] == "0-1,3" and w2.metadata["base_model"] == "test-model"
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {f"blocks.{i}.{m}.{t}" for i in (0, 1, 3) for m in ("proj", "gate")
                                 for t in ("weight", "bias")}
    assert all(isinstance(v, str) for v in meta.values())
    w2.check_compatible("wan", 32, 2, 4)
    with pytest.raises(SaladWeightsError, match=r"salad_test\.safetensors was made for wan dim 32.*dim 5120"):
        w2.check_compatible("wan", 5120, 40, 40)


def test_atomic_save_leaves_no_temp(tmp_path, monkeypatch):
    w = _trained_like()
    target = tmp_path / "w.safetensors"
    save_salad_weights(w, target)
    before = target.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save", boom)
    with torch.no_grad():
        w.proj_for(0).weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_salad_weights(w, target)
    monkeypatch.undo()

    # failure after the temp file was written: os.replace fails
    def bad_replace(a, b):
        raise OSError("rename failed")

    monkeypatch.setattr(weights_mod.os, "replace", bad_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_salad_weights(w, target)
    monkeypatch.undo()
    assert [f.name for f in tmp_path.iterdir()] == ["w.safetensors"]
    assert target.read_bytes() == before
    # NaN is refused before anything is written
    with torch.no_grad():
        w.gate_for(1).bias.fill_(float("nan"))
    with pytest.raises(SaladWeightsError, match="blocks.1.gate.bias"):
        save_salad_weights(w, tmp_path / "nan.safetensors")
    assert [f.name for f in tmp_path.iterdir()] == ["w.safetensors"]


def _write_raw(path, tensors, meta):
    from safetensors.torch import save
    path.write_bytes(save(tensors, metadata=meta))


def test_load_errors(tmp_path):
    w = _trained_like()
    good = save_salad_weights(w, tmp_path / "good.safetensors")
    data = good.read_bytes()

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SaladWeightsError, match="nope.safetensors"):
        load_salad_weights(missing)

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(SaladWeightsError, match=r"trunc\.safetensors.*truncated"):
        load_salad_weights(trunc)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(SaladWeightsError, match="tiny.safetensors"):
        load_salad_weights(tiny)

    # a pickle / torch.save checkpoint is recognised and never unpickled
    ck = tmp_path / "salad.ckpt"
    torch.save({"blocks.0.proj.weight": torch.zeros(2, 2)}, ck)
    with pytest.raises(SaladWeightsError, match=r"salad\.ckpt.*pickle"):
        load_salad_weights(ck)
    pk = tmp_path / "raw.pkl"
    pk.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(SaladWeightsError, match="raw.pkl"):
        load_salad_weights(pk)
    txt = tmp_path / "text.safetensors"
    txt.write_text("this is not a weight file at all, just some text " * 4)
    with pytest.raises(SaladWeightsError, match="text.safetensors"):
        load_salad_weights(txt)

    # header lies about sizes: shape says more bytes than the offsets cover
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["blocks.0.proj.weight"]["shape"] = [32, 33]
    hb = json.dumps(header).encode()
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    with pytest.raises(SaladWeightsError, match=r"liar\.safetensors.*blocks\.0\.proj\.weight"):
        load_salad_weights(liar)

    tensors = {k: t.detach().clone() for k, t in w.state_tensors().items()}
    meta = dict(w.metadata)
    bad = dict(tensors)
    bad["blocks.3.proj.weight"] = bad["blocks.3.proj.weight"].clone()
    bad["blocks.3.proj.weight"][2, 5] = float("nan")
    nanf = tmp_path / "nan.safetensors"
    _write_raw(nanf, bad, meta)
    with pytest.raises(SaladWeightsError, match=r"nan\.safetensors.*blocks\.3\.proj\.weight.*NaN"):
        load_salad_weights(nanf)

    # wrong-size tensors (weights of another model size under this metadata)
    wrong = dict(tensors)
    wrong["blocks.1.proj.weight"] = torch.zeros(64, 64)
    ws = tmp_path / "wrongsize.safetensors"
    _write_raw(ws, wrong, meta)
    with pytest.raises(SaladWeightsError, match=r"wrongsize\.safetensors.*blocks\.1\.proj\.weight.*\[32, 32\]"):
        load_salad_weights(ws)

    # missing tensor / metadata problems
    part = dict(tensors)
    del part["blocks.0.gate.bias"]
    pf = tmp_path / "partial.safetensors"
    _write_raw(pf, part, meta)
    with pytest.raises(SaladWeightsError, match=r"partial\.safetensors.*blocks\.0\.gate\.bias"):
        load_salad_weights(pf)
    for key, val, pat in (("salad_format_version", "99", "not supported"), ("dim", "abc", "dim"),
                          ("blocks", "0-1,7", "num_blocks"), (None, None, "missing")):
        m = dict(meta)
        if key is None:
            del m["heads"]
        else:
            m[key] = val
        f = tmp_path / f"meta_{key}.safetensors"
        _write_raw(f, tensors, m)
        with pytest.raises(SaladWeightsError, match=pat) as ei:
            load_salad_weights(f)
        assert f.name in str(ei.value)


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------

def _structured_sample(gen, grid=(4, 16, 32), H=2, D=16, B=4, ng=4, amp=0.3, ka=16.0):
    """Local attention (smooth random-Fourier position features on q, k) plus `ng` groups of
    distant "anchor" tokens (4x4 patches in frame 0) that every query attends to strongly.  The
    window pattern misses the anchors for most queries, i.e. sparse attention loses long-range
    mass; the anchor keys also dominate the ReLU features (non-anchor keys are shifted negative,
    which does not change softmax attention), so the linear branch carries that content."""
    F_, Hh, Ww = grid
    L = F_ * Hh * Ww
    f = torch.arange(F_).view(-1, 1, 1).expand(grid).reshape(-1).float()
    r = torch.arange(Hh).view(1, -1, 1).expand(grid).reshape(-1).float()
    c = torch.arange(Ww).view(1, 1, -1).expand(grid).reshape(-1).float()
    pos = torch.stack([f / 2, r / 4, c / 4], 1)
    nf = (D - 1 - ng) // 2
    ph = pos @ torch.randn(H, 3, nf, generator=gen)
    loc = torch.cat([torch.cos(ph), torch.sin(ph)], -1) * amp
    nl = loc.shape[-1]
    npad = D - 1 - ng - nl
    grp = torch.full((L,), -1)
    for g in range(ng):
        rr, cc = 4 * (g // 2), 4 * (g % 2)
        grp[(f == 0) & (r >= rr) & (r < rr + 4) & (c >= cc) & (c < cc + 4)] = g
    ak = torch.full((L, ng), -2.0)
    for g in range(ng):
        ak[grp == g, g] = ka - 2
    a = 0.8 + 0.4 * torch.rand(B, 1, 1, 1, generator=gen)
    one = torch.ones(B, H, L, 1)
    q = torch.cat([loc.expand(B, H, L, nl), a.expand(B, H, L, ng), torch.zeros(B, H, L, npad), one], -1)
    k = torch.cat([loc.expand(B, H, L, nl) - 2, ak.expand(B, H, L, ng), torch.zeros(B, H, L, npad), one], -1)
    q = q + 0.1 * torch.randn(B, H, L, D, generator=gen)
    k = k + 0.1 * torch.randn(B, H, L, D, generator=gen)
    u = 2 * torch.randn(B, H, ng, D, generator=gen)
    oh = torch.nn.functional.one_hot(grp.clamp(min=0), ng).float() * (grp >= 0).float()[:, None]
    v = 0.2 * torch.randn(B, H, L, D, generator=gen) + oh @ u
    x = torch.randn(B, L, H * D, generator=gen) + 2 * a.view(B, 1, 1)
    tob = lambda t: t.transpose(1, 2).reshape(B, L, H * D)  # noqa: E731
    return dict(q=tob(q), k=tob(k), v=tob(v), x=x, heads=H, grid=grid, block_id=2)


def test_trainer_reduces_error_on_heldout():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    store = SampleStore()
    for _ in range(20):
        store.add(**_structured_sample(gen))
    train, held = store.split(holdout=0.2, seed=seed)
    assert len(train) == 16 and len(held) == 4
    cfg = SaladConfig(sparsity=0.9, pattern="window", backend="torch")
    w = SaladWeights.new(32, 2, 3, blocks=[2], sparsity=0.9)
    before = relative_error(held, w, cfg)
    assert before["sparse_only"] == before["salad"] and before["sparse_only"] > 0.3
    logs = []
    res = train_salad(train, w, steps=150, lr=3e-2, config=cfg, log_every=50, callback=logs.append,
                      batch_size=2, seed=seed, training_data="synthetic anchors")
    assert [d["step"] for d in logs] == [50, 100, 150]
    hist = res["history"][2]
    assert hist[-1][1] < hist[0][1]
    after = relative_error(held, w, cfg)
    assert after["sparse_only"] == pytest.approx(before["sparse_only"])
    assert after["salad"] < 0.8 * after["sparse_only"], (seed, before, after)
    assert w.metadata["training_steps"] == "150" and w.metadata["training_data"] == "synthetic anchors"
    assert torch.isfinite(w.proj_for(2).weight).all()


def test_capture_hook_is_scoped_and_caches_are_stdlib():
    from salad_pack.salad_core import attention as attn_mod
    _seed()
    H, D, grid = 2, 8, (2, 8, 8)
    cfg = SaladConfig(sparsity=0.5, pattern="window", backend="torch")
    outer, inner = SampleStore(), SampleStore()
    q, k, v = _qkv(1, 128, H, D)
    with pytest.raises(RuntimeError):
        with capture(outer):
            salad_self_attention(q, k, v, H, grid=grid, config=cfg, block_id=0)
            with capture(inner):
                salad_self_attention(q, k, v, H, grid=grid, config=cfg, block_id=1)
            salad_self_attention(q, k, v, H, grid=grid, config=cfg, block_id=2)
            raise RuntimeError("leave the with early")
    assert attn_mod.CAPTURE_HOOK.get() is None
    assert [s["block_id"] for s in outer] == [0, 2] and [s["block_id"] for s in inner] == [1]
    assert TileLayout.get(grid, 0, 0, cfg.tile) is TileLayout.get(list(grid), 0, 0, cfg.tile)
    lay = TileLayout.get(grid, 0, 0, cfg.tile)
    assert attn_mod._window_lut(lay, cfg) is attn_mod._window_lut(lay, cfg)


def test_capture_and_sample_store_roundtrip(tmp_path):
    _seed()
    H, D, grid = 2, 8, (2, 8, 8)
    L = 128 + 3
    store = SampleStore(max_per_block=2)
    cfg = SaladConfig(sparsity=0.5, pattern="window", backend="torch")
    with capture(store, blocks=[1, 4]):
        for blk in (0, 1, 4, 1, 1):
            q, k, v = _qkv(1, L, H, D)
            salad_self_attention(q, k, v, H, grid=grid, n_back=3, x=torch.randn(1, L, H * D), config=cfg,
                                 block_id=blk)
    q, k, v = _qkv(1, L, H, D)
    salad_self_attention(q, k, v, H, grid=grid, n_back=3, config=cfg, block_id=1)  # outside: not captured
    assert [s["block_id"] for s in store] == [1, 4, 1]
    assert store[0]["n_back"] == 3 and store[0]["grid"] == grid
    p = store.save(tmp_path / "samples.safetensors")
    back = SampleStore.load(p)
    assert len(back) == 3
    for a, b in zip(store, back):
        for key in ("q", "k", "v", "x"):
            assert torch.equal(a[key], b[key])
        assert a["grid"] == b["grid"] and a["block_id"] == b["block_id"]
    w = SaladWeights.new(H * D, H, 6, blocks=[1, 4])
    res = train_salad(back, w, steps=5, lr=1e-3, config=cfg, log_every=5)
    assert res["blocks"] == [1, 4]
    assert w.metadata["training_steps"] == "5"
