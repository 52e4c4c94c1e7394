"""GPU out-of-memory inside SALAD attention (issue 8): the error names the size and stays an OOM.

The real case runs on the GPU (benchmarks/gpu_load_check.py: an op-level call that cannot fit, and a
prompt too large for the card in a real ComfyUI server, each followed by a normal call that must work).
Here, on CPU, the allocation failure is raised from inside the sparse kernel call so the error path
(message, type, no state left behind) is checked on every CI run.
"""
import pytest
import torch

from salad_pack.salad_core import attention as A


def _qkv(B=1, grid=(2, 4, 4), H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1] * grid[2]
    return [torch.randn(B, L, H * D, generator=g) for _ in range(3)]


def test_oom_inside_salad_names_the_size(monkeypatch, comfy_inprocess):
    q, k, v = _qkv()
    calls = []

    def boom(*a, **kw):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(A.K, "block_sparse_attention_rowmap", boom)
    with pytest.raises(torch.OutOfMemoryError) as ei:
        A.salad_self_attention(q, k, v, 2, grid=(2, 4, 4), block_id=7)
    msg = str(ei.value)
    assert calls, "the kernel call was not reached"
    # ComfyUI unloads models on OOM_EXCEPTION: the type must survive the re-raise
    import comfy.model_management as mm
    assert isinstance(ei.value, mm.OOM_EXCEPTION)
    for part in ("block 7", "32 tokens", "2x4x4", "2 heads of 16", "Tried to allocate 20.00 GiB"):
        assert part in msg, (part, msg)
    monkeypatch.undo()
    out = A.salad_self_attention(q, k, v, 2, grid=(2, 4, 4), block_id=7)   # the next call works
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_other_errors_pass_unchanged():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as ei:   # a wrong grid is the caller's error, not an OOM
        A.salad_self_attention(q, k, v, 2, grid=(3, 4, 4))
    assert not isinstance(ei.value, torch.OutOfMemoryError)
