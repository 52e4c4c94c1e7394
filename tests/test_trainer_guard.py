"""The trainer never hands back weights that are worse than none, says so plainly, and refuses
recordings that would not fit in RAM (issue 15).  CPU, salad_core only."""
from __future__ import annotations

import json
import math

import pytest
import torch

from salad_pack.salad_core import SaladConfig, SaladWeights, load_salad_weights, save_salad_weights
from salad_pack.salad_core.trainer import (
    GiB,
    SampleStore,
    change_words,
    check_recording_memory,
    keep_improved_blocks,
    recording_bytes,
    relative_error,
    train_salad,
    training_report,
)
from test_salad_core import _structured_sample

CFG = SaladConfig(sparsity=0.9, pattern="window", backend="torch")


def _text(lines):
    return "\n".join(line for _lvl, line in lines)


def _random_sample(gen, block_id, grid=(2, 8, 16), H=2, D=16, B=1):
    L = grid[0] * grid[1] * grid[2]
    q, k, v, x = (torch.randn(B, L, H * D, generator=gen) for _ in range(4))
    return dict(q=q, k=k, v=v, x=x, heads=H, grid=grid, block_id=block_id)


def test_change_words_never_negative_percent():
    assert change_words(0.0567, 0.0593) == "worse by 4.6%"
    assert change_words(0.0593, 0.0567) == "better by 4.4%"
    assert change_words(0.05, 0.05) == "no change"
    for b, a in ((1.0, 2.0), (2.0, 1.0), (0.3, 0.31)):
        assert "-" not in change_words(b, a)


def test_split_holds_out_one_of_two():
    gen = torch.Generator().manual_seed(0)
    store = SampleStore()
    for b in (0, 1):
        for _ in range(2):
            store.add(**_random_sample(gen, b))
    tr, ho = store.split(0.25, seed=0)
    assert sorted(s["block_id"] for s in ho) == [0, 1] and sorted(s["block_id"] for s in tr) == [0, 1]


def test_training_that_hurts_keeps_every_block_sparse_only_and_warns():
    """Random activations: nothing to learn, training fits noise, and every block is worse than
    sparse-only on held-out calls, so none is kept, nothing is handed back, and the report warns."""
    gen = torch.Generator().manual_seed(1)
    store = SampleStore()
    for b in (0, 1, 2):
        for _ in range(4):
            store.add(**_random_sample(gen, b))
    train, held = store.split(0.25, seed=1)
    w = SaladWeights.new(32, 2, 3, sparsity=0.9)
    res = train_salad(train, w, steps=30, lr=3e-2, config=CFG, seed=1)
    ev = relative_error(held, w, CFG)
    assert set(ev["per_block"]) == {0, 1, 2} and ev["salad"] > ev["sparse_only"]
    out = keep_improved_blocks(w, ev, trained_blocks=res["blocks"])
    assert out["weights"] is None and out["kept"] == [] and out["dropped"] == [0, 1, 2]
    assert out["after"] == pytest.approx(out["before"])
    lines = training_report(out, 0.9, "window")
    assert lines[0][0] == "warning" and "did not help" in lines[0][1] and "NO weight file" in lines[0][1]
    text = _text(lines)
    assert "no gain: kept sparse-only for 3 of 3 blocks" in text
    assert "worse by" in text and "% lower" not in text and "-" not in text.split("worse by")[1][:2]
    assert "saved to" not in text
    for b in (0, 1, 2):
        assert f"{b}: " in lines[-1][1]


def test_learnable_structure_keeps_trained_blocks_and_reports_better(tmp_path):
    """Block 2 has long-range structure the linear branch can carry (as in test_salad_core) and is
    trained well: kept.  Block 0 gets three training calls and one batch per step: it overfits and is
    worse on its held-out call, so it is dropped (sparse-only).  The file covers block 2 only and records
    both blocks' errors."""
    gen = torch.Generator().manual_seed(5)
    store = SampleStore()
    for _ in range(12):
        store.add(**_structured_sample(gen, B=2))
    for _ in range(4):
        s = _structured_sample(gen, B=2)
        s["block_id"] = 0
        store.add(**s)
    train, held = store.split(0.25, seed=5)
    w = SaladWeights.new(32, 2, 3, blocks=[0, 2], sparsity=0.9)
    train_salad([s for s in train if s["block_id"] == 2], w, steps=120, lr=3e-2, config=CFG, batch_size=2, seed=5)
    train_salad([s for s in train if s["block_id"] == 0], w, steps=30, lr=3e-2, config=CFG, seed=5)
    ev = relative_error(held, w, CFG)
    out = keep_improved_blocks(w, ev, trained_blocks=[0, 2])
    assert out["kept"] == [2] and out["dropped"] == [0], out["per_block"]
    assert out["after"] < out["before"] and out["after"] < out["trained_after"]
    lines = training_report(out, 0.9, "window", saved_path=tmp_path / "w.safetensors")
    assert all(lvl == "info" for lvl, _ in lines)
    text = _text(lines)
    pct = 100 * (out["before"] - out["after"]) / out["before"]
    assert f"better by {pct:.1f}%" in lines[0][1], text
    assert "no gain: kept sparse-only for 1 of 2 blocks (0)" in text and "saved to" in text
    kept_w = out["weights"]
    assert kept_w.block_ids == [2] and w.block_ids == [0, 2]
    assert torch.equal(kept_w.proj_for(2).weight, w.proj_for(2).weight)
    # the file keeps the per-block errors (the loader keeps unknown metadata keys as they are)
    path = save_salad_weights(kept_w, tmp_path / "w.safetensors")
    back = load_salad_weights(path)
    assert back.metadata["blocks"] == "2"
    errs = json.loads(back.metadata["block_errors"])
    assert set(errs) == {"0", "2"} and errs["2"][1] < errs["2"][0] and errs["0"][1] > errs["0"][0]
    assert len(back.metadata["block_errors"]) < 200
    assert "sparse-only" in back.metadata["heldout_error"]
    # what the file does is what the report says
    ev2 = relative_error(held, back, CFG)
    assert ev2["per_block"][2]["salad"] == pytest.approx(ev["per_block"][2]["salad"], rel=1e-4)


def test_block_without_heldout_is_not_kept():
    ev = dict(sparse_only=0.5, salad=0.4, n=1, per_sample=[(0.5, 0.4)], sample_blocks=[1],
              per_block={1: dict(sparse_only=0.5, salad=0.4, n=1)})
    w = SaladWeights.new(32, 2, 3)
    out = keep_improved_blocks(w, ev, trained_blocks=[0, 1])
    assert out["kept"] == [1] and out["unchecked"] == [0] and out["weights"].block_ids == [1]
    text = _text(training_report(out, 0.9, "topk"))
    assert "better by 20.0%" in text and "kept sparse-only for 1 of 2 blocks" in text
    assert "no held-out recording" in text


# ----------------------------------------------------------------------------------------------
# recording memory guard
# ----------------------------------------------------------------------------------------------

def test_recording_bytes_formula():
    # Wan2.1-1.3B at 480p, 81 frames: 32,760 tokens; 30 blocks, 4 calls, cond+uncond batched
    assert recording_bytes(32760, 1536, 30, 4, batch=2) == 32760 * (3 * 1536 + 1536) * 2 * 2 * 30 * 4


def test_memory_guard_refuses_and_suggests_a_size_that_fits():
    plan = check_recording_memory((21, 60, 104), (1, 2, 2), 1536, 30, 4, 2, available_bytes=64 * GiB)
    assert not plan["ok"] and plan["tokens"] == 32760
    assert plan["need"] == recording_bytes(32760, 1536, 30, 4, 2) and plan["need"] > 64 * GiB
    msg = plan["message"]
    assert "21x60x104" in msg and "frames x height x width" in msg and "81 frames at 832x480" in msg
    t, h, w = plan["suggest_latent"]
    assert f"at most {t}x{h}x{w}" in msg and t == 21 and h < 60 and w < 104
    again = check_recording_memory((t, h, w), (1, 2, 2), 1536, 30, 4, 2, available_bytes=64 * GiB)
    assert again["ok"] and again["message"] == ""
    # aspect ratio roughly kept
    assert abs(w / h - 104 / 60) < 0.3


def test_memory_guard_margin_and_cpu_training():
    small = check_recording_memory((9, 34, 60), (1, 2, 2), 1536, 30, 4, 2, available_bytes=64 * GiB)
    assert small["ok"] and small["usable"] == 64 * GiB - int(0.15 * 64 * GiB)
    cpu = check_recording_memory((9, 34, 60), (1, 2, 2), 1536, 30, 4, 2, available_bytes=64 * GiB,
                                 train_on_cpu=True)
    assert cpu["need"] > small["need"]
    # 2 GiB margin at least: nothing fits in 1 GiB
    tiny = check_recording_memory((1, 2, 2), (1, 2, 2), 256, 2, 2, 1, available_bytes=GiB)
    assert not tiny["ok"] and tiny["suggest_latent"] is None and "samples_per_block" in tiny["message"]


def test_memory_guard_reduces_frames_when_frames_dominate():
    plan = check_recording_memory((64, 8, 8), (1, 2, 2), 1536, 30, 64, 2, available_bytes=16 * GiB)
    assert not plan["ok"]
    t, h, w = plan["suggest_latent"]
    tokens = t * math.ceil(h / 2) * math.ceil(w / 2)
    assert t < 64 and recording_bytes(tokens, 1536, 30, 64, 2) <= plan["usable"]
