"""benchmarks/bench_quality.py: metric properties, the Sol-Attn peer's routing rule and wheel
stripping, and the CPU smoke run of the whole benchmark (tiny random Wan in real ComfyUI)."""
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bench_quality as bq  # benchmarks/ is on sys.path (tests/_pack.py bootstrap)
import sol_attn_peer as sp

ROOT = Path(__file__).resolve().parents[1]


# ---- metrics ---------------------------------------------------------------------------------

def test_psnr_known_values():
    a = torch.zeros(2, 4, 8, 8, 3)
    b = a.clone()
    b[0] += 0.1                                   # mse 0.01 -> 20 dB
    p = bq.psnr_per_video(a, b)
    assert p[0].item() == pytest.approx(20.0, abs=1e-4)
    assert p[1].item() == pytest.approx(bq.PSNR_CAP)   # identical videos: capped, finite


def test_ssim_identity_symmetry_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 24, 24, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(3, 24, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(bq.ssim_images(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(bq.ssim_images(x, y), bq.ssim_images(y, x))
    s = bq.ssim_images(x, y)
    assert ((s > -1) & (s < 1)).all()
    y2 = (x + 0.05 * torch.randn(3, 24, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert (bq.ssim_images(x, y2) > s).all()      # less noise, higher SSIM


def test_ssim_constant_images_closed_form():
    # no variance: SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1) exactly (the contrast term is C2/C2)
    c1, c2 = 0.3, 0.7
    x = torch.full((1, 16, 16), c1, dtype=torch.float64)
    y = torch.full((1, 16, 16), c2, dtype=torch.float64)
    C1 = 0.01 ** 2
    assert bq.ssim_images(x, y).item() == pytest.approx((2 * c1 * c2 + C1) / (c1 ** 2 + c2 ** 2 + C1), rel=1e-9)


def test_ssim_matches_direct_weighted_formula():
    # an 11x11 image has exactly one window position: compare with the formula written out
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 11, 11, generator=g, dtype=torch.float64)
    y = torch.rand(1, 11, 11, generator=g, dtype=torch.float64)
    k = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    w = torch.outer(k, k)
    w = w / w.sum()
    mx, my = (w * x[0]).sum(), (w * y[0]).sum()
    vx, vy = (w * (x[0] - mx) ** 2).sum(), (w * (y[0] - my) ** 2).sum()
    cxy = (w * (x[0] - mx) * (y[0] - my)).sum()
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    ref = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    assert bq.ssim_images(x, y).item() == pytest.approx(ref.item(), rel=1e-9)


def test_ssim_per_video_averages_frames_and_channels():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 16, 16, 3, generator=g)
    b = a.clone()
    b[1, :, :, :, 0] = 0.5                        # video 1: one channel replaced
    s = bq.ssim_per_video(a, b)
    assert s[0].item() == pytest.approx(1.0, abs=1e-5)
    ch0 = bq.ssim_images(a[1, :, :, :, 0], b[1, :, :, :, 0]).mean().item()
    assert s[1].item() == pytest.approx((ch0 + 2.0) / 3.0, abs=1e-5)


# ---- Sol-Attn peer ---------------------------------------------------------------------------

def test_routing_scores_match_token_level_rule():
    """The closed form (block centroid . centred key mean) equals the eager reference's
    column mean of per-token scores over each 64-token query block."""
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 256, 2, 128
    q, k = (torch.randn(B, T, H, D, generator=g) for _ in range(2))
    z = sp.routing_scores(q, k)
    log2s = D ** -0.5 * sp.LOG2E
    n = T // sp.BLOCK
    km = k.view(B, n, sp.BLOCK, H, D).mean(2)
    kc = km - km.mean(1, keepdim=True)
    s_tok = torch.einsum("bthd,bjhd->bhtj", q, kc) * log2s             # (B, H, T, N)
    colmean = s_tok.view(B, H, n, sp.BLOCK, n).mean(3)
    qm = q.view(B, n, sp.BLOCK, H, D).mean(2)
    var = (qm ** 2 * (kc ** 2).mean(1).unsqueeze(1)).sum(-1)             # (B, N, H)
    unit = torch.sqrt(var * log2s ** 2 + 1e-6).permute(0, 2, 1).unsqueeze(-1)
    assert torch.allclose(z, colmean / unit, atol=1e-4, rtol=1e-4)


def test_calibrate_tau_hits_target_share():
    g = torch.Generator().manual_seed(4)
    zs = [torch.randn(2, 2, 32, 32, generator=g) for _ in range(3)]
    floor = sp.routed_share(zs[0], 1e9)                                  # the diagonal band only
    for target in (0.1, 0.25):
        tau = sp.calibrate_tau(zs, target)
        share = sum(sp.routed_share(z, tau) for z in zs) / len(zs)
        assert share == pytest.approx(target, abs=2e-3)
    assert floor == pytest.approx((32 + 2 * 31) / 32 ** 2)


def test_strip_rocm_wheel(tmp_path):
    src = tmp_path / "in" / "pkg-1.0-cp312-abi3-linux_x86_64.whl"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg/backends/cuda/_C.so", b"cuda")
        z.writestr("pkg/backends/hip/_C.cpython-312-x86_64-linux-gnu.so", b"rocm" * 100)
        z.writestr("pkg/backends/hip/__init__.py", "")
        z.writestr("pkg-1.0.dist-info/RECORD", "stale\n")
    out = sp.strip_rocm_wheel(src, tmp_path / "out")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "pkg/backends/hip/_C.cpython-312-x86_64-linux-gnu.so" not in names
    assert {"pkg/__init__.py", "pkg/backends/cuda/_C.so", "pkg/backends/hip/__init__.py"} <= names
    assert "hip/_C" not in record and "pkg/backends/cuda/_C.so,sha256=" in record


# ---- the whole benchmark on CPU --------------------------------------------------------------

def test_smoke_run(tmp_path, comfyui_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COMFYUI_DIR": str(comfyui_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "latest-quality.json").read_text())
    assert {"card", "date", "rows"} <= set(res)
    methods = {r["method"] for r in res["rows"]}
    assert {"dense", "sparse_topk", "sparse_window", "salad_calibrated"} <= methods
    for r in res["rows"]:
        assert {"method", "sparsity", "start_percent", "psnr", "ssim", "pairs"} <= set(r)
        assert r["pairs"] == 2
        if r["method"] != "dense":
            assert math.isfinite(r["psnr"]) and -1.0 <= r["ssim"] <= 1.0
    dense0 = [r for r in res["rows"] if r["method"] == "sparse_topk" and r["sparsity"] == 0.0]
    assert len(dense0) == 1 and dense0[0]["psnr"] >= 40.0, dense0
    cal = [r for r in res["rows"] if r["method"] == "salad_calibrated"]
    assert len(cal) == 2 and all(r["salad_calls"] > 0 and r["gates"] for r in cal)
    assert list((tmp_path).glob("quality-*-smoke.png")) and list(tmp_path.glob("quality-*-smoke.log"))


# ---- --sweep: speed model, configs, plot, CPU smoke --------------------------------------------

def test_e2e_speed_model():
    # the H100 check point: the op 5.03x faster at a = 0.636 -> 2.04x forward (measured 2.00x)
    assert bq.step_speedup(5.03, bq.ATTN_SHARE_1P3B_480P) == pytest.approx(2.04, abs=0.01)
    assert bq.step_speedup(1.0, 0.6) == pytest.approx(1.0)
    assert bq.step_speedup(5.0, 0.6, dense_fraction=1.0) == pytest.approx(1.0)
    s = bq.step_speedup(5.0, 0.6)
    assert bq.e2e_speedup(5.0, 0.6, 0.0, 0.0) == pytest.approx(s)
    assert bq.e2e_speedup(5.0, 0.6, 0.0, 0.2) == pytest.approx(1.0 / (0.2 + 0.8 / s))
    assert bq.e2e_speedup(5.0, 0.6, 2 / 6, 0.0) < s


def test_sweep_configs_priorities():
    full = bq.sweep_configs(None, [0.8, 0.9, 0.95], [0.0, 0.1, 0.2], 6, True, True)
    keys = [tuple(sorted((k, str(v)) for k, v in c.items())) for c in full]
    assert len(keys) == len(set(keys))
    assert full[0]["sparsity"] == 0.0 and full[0]["method"] == "sparse"          # sanity check first
    methods = [c["method"] for c in full]
    # the core curves (no weights, centroid, weights, sol_attn) come before the rest
    assert methods.index("sol_attn") < methods.index("sol_attn_default") < len(methods) - 9
    assert all(c["weights"] == (c["method"] == "salad_calibrated") for c in full)
    assert {tuple(c["dense_blocks"]) for c in full} == {(), (0, 5)}
    bare = bq.sweep_configs(None, [0.9], [0.0], 6, False, False)
    assert {c["method"] for c in bare} == {"sparse"}
    assert len(full) <= 64                         # ~3 s each on the H200: fits the budget with the table


def test_speed_for_rows():
    table = dict(dense_ms=10.0, salad=[dict(sparsity=0.9, pattern="topk", compensation="none", weights=False,
                                            speedup=5.0)],
                 sol_attn=[dict(kept_share=0.1, ms=2.0, extra_tokens=0), dict(kept_share=0.3, ms=4.0, extra_tokens=0),
                           dict(kept_share=0.2, ms=1.0, extra_tokens=256)])
    row = dict(method="sparse", sparsity=0.9, pattern="topk", compensation="none", weights=False)
    assert bq.speed_for(table, row) == 5.0
    assert bq.speed_for(table, dict(row, compensation="centroid")) is None
    assert bq.speed_for(table, dict(method="sol_attn", kept_share=0.2)) == pytest.approx(10.0 / 3.0)
    assert bq.speed_for(None, row) is None


def test_plot_quality_png(tmp_path):
    import plot_quality as pq
    rows = []
    for i, s in enumerate((0.8, 0.9, 0.95)):
        for m, w in (("sparse", False), ("salad_calibrated", True), ("sol_attn", False)):
            rows.append(dict(method=m, pattern="sol" if m == "sol_attn" else "topk", compensation="none",
                             sparsity=s, start_percent=0.0, dense_blocks=[], weights=w, psnr=15.0 - 2 * i,
                             kept_share=1 - s, e2e_speedup_est=1.5 + 0.3 * i))
    rows.append(dict(method="sol_attn_default", pattern="sol", compensation="none", sparsity=None, start_percent=0.2,
                     dense_blocks=[], weights=False, psnr=16.0, kept_share=0.12, e2e_speedup_est=1.6))
    png = pq.plot_sweep(dict(rows=rows, card="test", attn_share=0.594, pairs=2, steps=2), tmp_path / "p.png")
    assert png.exists() and png.stat().st_size < 1 << 20
    assert [p[0] for p in pq.pareto([(1, 5), (2, 4), (3, 1), (2.5, 0)])] == [1, 2, 3]


def test_sweep_smoke(tmp_path, comfyui_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--smoke", "--sweep",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COMFYUI_DIR": str(comfyui_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert res["rows"] and not res["skipped"] and res["speed"]["dense_ms"] > 0
    need = {"method", "sparsity", "pattern", "compensation", "start_percent", "dense_blocks", "weights", "psnr",
            "ssim", "attn_speedup", "e2e_speedup_est"}
    for r in res["rows"]:
        assert need <= set(r), r
        assert math.isfinite(r["psnr"])
        if r["sparsity"]:
            assert r["attn_speedup"] > 0 and r["e2e_speedup_est"] > 0
    assert {(r["pattern"], r["compensation"], r["weights"]) for r in res["rows"]} >= {
        ("topk", "none", False), ("topk", "centroid", False), ("window", "none", False), ("topk", "none", True)}
    assert (tmp_path / "sweep.png").stat().st_size < 1 << 20


# ---- selection study (issue 12 item 2) -------------------------------------------------------

def test_selection_study_pieces():
    import selection_study as ss
    from salad_pack.kernels import reference as ref
    from salad_pack.kernels import select_topk
    g = torch.Generator().manual_seed(5)
    B, H, L, D, blk = 1, 2, 512, 32, 128
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    scale = D ** -0.5
    # mean/topk is the product's selection
    keep, _, _ = ss.select(q, k, "mean/topk", 2, scale, block=blk)
    idx, cnt = ss.lut_from_mask(keep)
    pidx, pcnt = select_topk(q, k, 0.5, block=blk, backend="torch")
    assert torch.equal(cnt, pcnt) and torch.equal(idx, pidx)
    # adaptive rules never exceed the budget on average; own block always kept
    for var in ("mean/thr", "lse32/thr2", "mean/cumrow", "lse16/cumhead", "mean/topk+col"):
        keep, _, _ = ss.select(q, k, var, 2, scale, block=blk)
        assert float(keep.float().sum(-1).mean()) <= 2 + 1e-6, var
        assert keep.diagonal(dim1=-2, dim2=-1).all(), var
    # the per-head partials give the dense output with every block, and the kernels' reference otherwise
    hp = ss.HeadPartials(q[0, 0], k[0, 0], v[0, 0], scale, block=blk)
    dense = ref.attention_ref(q, k, v)[0][0, 0].float()
    all_blocks = torch.ones(L // blk, L // blk, dtype=torch.bool)
    assert torch.allclose(hp.output(all_blocks)[0], dense, atol=1e-5)
    keep, _, _ = ss.select(q, k, "mean/topk", 2, scale, block=blk)
    idx, cnt = ss.lut_from_mask(keep)
    for comp in (False, True):
        o_ref, _ = ref.block_sparse_attention_ref(q, k, v, idx, cnt, blk, scale, compensate=comp)
        assert torch.allclose(hp.output(keep[0, 0], comp)[0], o_ref[0, 0], atol=1e-5)
    # token_aug: top-1 block + 128 routed tokens outside it = the softmax over exactly those keys
    keep, _, toks = ss.select(q, k, "mean/topk+aug128", 2, scale, block=blk)
    assert int(keep[0, 0].sum(-1).max()) == 1 and toks.shape == (B, H, L // blk, 128)
    assert not keep[0, 0].gather(1, toks[0, 0] // blk).any()
    mask = keep[0, 0].repeat_interleave(blk, 0).repeat_interleave(blk, 1)
    mask.view(L // blk, blk, L).scatter_(2, toks[0, 0][:, None, :].expand(-1, blk, -1), True)
    s = (scale * q[0, 0] @ k[0, 0].T).masked_fill(~mask, -math.inf)
    assert torch.allclose(hp.output(keep[0, 0], toks=toks[0, 0])[0], torch.softmax(s, -1) @ v[0, 0], atol=1e-5)
    # with centroids: a skipped block's pseudo-token stands for its tokens not routed (log of their count)
    kbar, vbar = (x[0, 0].view(L // blk, blk, D).mean(1) for x in (k, v))
    n = blk - torch.zeros(L // blk, L // blk).scatter_add_(1, toks[0, 0] // blk, torch.ones(L // blk, 128))
    n = n.masked_fill(keep[0, 0], 0).repeat_interleave(blk, 0)
    sc = (scale * q[0, 0] @ kbar.T + n.log()).masked_fill(n == 0, -math.inf)
    want = torch.softmax(torch.cat([s, sc], 1), -1) @ torch.cat([v[0, 0], vbar])
    assert torch.allclose(hp.output(keep[0, 0], True, toks[0, 0])[0], want, atol=1e-5)
    with pytest.raises(ValueError, match="not a block-level"):
        ss.make_selector("mean/topk+aug128")


def test_selection_study_selector_matches_product():
    """The e2e stage's stand-in for salad_core's select_blocks gives the product's lists for mean/topk."""
    import selection_study as ss
    from salad_pack.salad_core.attention import SaladConfig, select_blocks
    from salad_pack.salad_core.tiling import TileLayout
    g = torch.Generator().manual_seed(6)
    layout = TileLayout.get((2, 16, 16), 0, 0, (2, 8, 8), "cpu")
    q4, kh = (torch.randn(1, 2, 512, 64, generator=g) for _ in range(2))
    cfg = SaladConfig(sparsity=0.5, pattern="topk", backend="torch")
    want = select_blocks(q4, kh, layout, cfg, q_rowmap=layout.perm32)
    got = ss.make_selector("mean/topk")(q4, kh, layout, cfg, q_rowmap=layout.perm32)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    with pytest.raises(ValueError, match="not a block-level"):
        ss.make_selector("mean/topk+tok")
