"""SALAD fine-tuning (issue 10): salad_core.finetune on the CPU.

* a toy DiT whose self-attention is salad_self_attention (no ComfyUI: fast): training moves proj/gate,
  resume after a crash mid-run gives bit-identical final weights, an injected NaN stops with a clear
  message and keeps the last good checkpoint, two gloo processes give the weights of one process with
  the same global batch;
* ComfyUI's own WanModel (tiny fixture) through the CLI and nodes/finetune.py's wiring, killed with
  SIGKILL and resumed: bit-identical to an uninterrupted CLI run;
* the nodes SALAD Save Training Pair -> SALAD Fine-tune -> Apply SALAD Attention in a real ComfyUI server.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _pack import bootstrap

bootstrap()  # conftest did this under pytest; the gloo workers this file spawns import it without conftest

from salad_pack.salad_core.attention import SaladConfig, salad_self_attention  # noqa: E402
from salad_pack.salad_core.finetune import (FinetuneConfig, FinetuneError, NonFiniteLossError,  # noqa: E402
                                            PairFolder, finetune, load_checkpoint, save_pair)
from salad_pack.salad_core.weights import SaladWeights, load_salad_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

DIM, HEADS, NBLK, CTX = 64, 2, 2, 32


class ToyDiT(torch.nn.Module):
    """Patchify (1,2,2) -> blocks of [SALAD self-attention + context + MLP] -> unpatchify.  The SALAD
    proj/gate come from the ``weights`` module it is wired with (as nodes/patch.py does for Wan)."""

    def __init__(self, cin=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.cin = cin
        self.emb = torch.nn.Linear(cin * 4, DIM)
        self.temb = torch.nn.Linear(1, DIM)
        self.cemb = torch.nn.Linear(CTX, DIM)
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(DIM, 3 * DIM) for _ in range(NBLK)])
        self.o = torch.nn.ModuleList([torch.nn.Linear(DIM, DIM) for _ in range(NBLK)])
        self.mlp = torch.nn.ModuleList([torch.nn.Linear(DIM, DIM) for _ in range(NBLK)])
        self.out = torch.nn.Linear(DIM, cin * 4)
        self.requires_grad_(False)

    def wire(self, weights, config):
        def forward(x, t, ctx):
            B, C, T, H, W = x.shape
            h = x.reshape(B, C, T, H // 2, 2, W // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, -1, C * 4)
            h = self.emb(h) + self.temb(t.reshape(B, 1, 1) / 1000.0) + self.cemb(ctx.mean(1, keepdim=True))
            for i in range(NBLK):
                q, k, v = self.qkv[i](h).chunk(3, dim=-1)
                a = salad_self_attention(q, k, v, HEADS, grid=(T, H // 2, W // 2), x=h,
                                         proj=weights.proj_for(i), gate=weights.gate_for(i), config=config,
                                         block_id=i)
                h = h + self.o[i](a)
                h = h + torch.tanh(self.mlp[i](h))
            o = self.out(h).reshape(B, T, H // 2, W // 2, C, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
            return o.reshape(B, C, T, H, W)
        return forward


def _make_data(folder: Path, n=6, shape=(4, 2, 16, 16)):
    g = torch.Generator().manual_seed(5)
    for i in range(n):
        save_pair(folder / f"pair_{i:03d}.safetensors", torch.randn(shape, generator=g),
                  torch.randn(7, CTX, generator=g), caption=f"clip {i}")
    return folder


def _run(data_dir, tmp, *, steps=6, batch=2, ckpt_every=2, resume=False, stop_at=None, forward_hook=None,
         name="run", ckpt=None, lr=3e-3):
    """One fine-tune of fresh weights on the toy model; returns (result, weights, out path, ckpt path)."""
    cfg = FinetuneConfig(steps=steps, batch=batch, lr=lr, warmup=2, shift=3.0, sparsity=0.5, pattern="topk",
                         ckpt_every=ckpt_every, seed=1, cfg_dropout=0.2)
    model = ToyDiT()
    w = SaladWeights.new(DIM, HEADS, NBLK, base_model="toy", pattern="topk", sparsity=0.5)
    fwd = model.wire(w, SaladConfig(sparsity=0.5, pattern="topk", backend="torch"))
    if forward_hook is not None:
        fwd = forward_hook(fwd)
    out = tmp / f"{name}.safetensors"
    ckpt = ckpt or tmp / f"{name}.ckpt"
    res = finetune(fwd, w, PairFolder(data_dir), cfg, out_path=out, ckpt_path=ckpt, resume=resume,
                   device="cpu", stop_at=stop_at)
    return res, w, out, ckpt


def _tensors(w):
    return {k: v.detach().clone() for k, v in w.state_tensors().items()}


def test_finetune_trains_saves_loader_format(tmp_path):
    data = _make_data(tmp_path / "data")
    res, w, out, ckpt = _run(data, tmp_path, steps=4, ckpt_every=0)
    assert res["step"] == 4 and len(res["history"]) == 4 and out.exists() and ckpt.exists()
    assert any(float(w.proj_for(i).weight.abs().max()) > 0 for i in range(NBLK)), "proj did not move from 0"
    back = load_salad_weights(out)                   # what SALAD Weights Loader reads
    md = back.metadata
    assert md["training_steps"] == "4" and md["pattern"] == "topk" and md["sparsity"] == "0.5"
    assert "6 latent pairs in data/" in md["training_data"] and md["created_by"] == "salad_core.finetune"
    for k, v in _tensors(w).items():
        assert torch.equal(back.state_tensors()[k], v)
    state, tensors = load_checkpoint(ckpt)
    assert state["step"] == 4 and state["data_position"] == 8 and "opt.blocks.0.proj.weight.exp_avg" in tensors
    assert "rng.cpu" in tensors


def test_resume_after_crash_is_bit_exact(tmp_path):
    """Uninterrupted 6 steps == crash in step 5 (after the step-4 checkpoint) + resume in a fresh model."""
    data = _make_data(tmp_path / "data")
    _, w_ref, out_ref, _ = _run(data, tmp_path, name="straight")

    calls = {"n": 0}

    def crash_at_step5(fwd):
        def f(*a):
            calls["n"] += 1
            if calls["n"] == 5:           # 1 forward per step (one latent shape)
                raise KeyboardInterrupt("killed")
            return fwd(*a)
        return f

    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path, name="crashed", forward_hook=crash_at_step5)
    state, _ = load_checkpoint(tmp_path / "crashed.ckpt")
    assert state["step"] == 4 and not (tmp_path / "crashed.safetensors").exists()
    res, w_res, out_res, _ = _run(data, tmp_path, name="crashed", resume=True)
    assert res["resumed_from"] and res["step"] == 6
    ref, got = _tensors(w_ref), _tensors(w_res)
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed weights differ from the uninterrupted run"
    a, b = load_salad_weights(out_ref), load_salad_weights(out_res)
    assert all(torch.equal(a.state_tensors()[k], b.state_tensors()[k]) for k in ref)
    # resuming with other settings is refused, naming what differs
    with pytest.raises(FinetuneError, match="lr"):
        _run(data, tmp_path, name="crashed", resume=True, lr=1e-2)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = _make_data(tmp_path / "data")
    calls = {"n": 0}

    def nan_at_step3(fwd):
        def f(*a):
            calls["n"] += 1
            out = fwd(*a)
            return out * float("nan") if calls["n"] == 3 else out
        return f

    ckpt = tmp_path / "nan.ckpt"
    with pytest.raises(NonFiniteLossError) as ei:
        _run(data, tmp_path, name="nan", forward_hook=nan_at_step3, ckpt_every=2)
    msg = str(ei.value)
    assert "loss is nan at step 3" in msg and "NOT applied" in msg and "(step 2) is kept" in msg, msg
    state, tensors = load_checkpoint(ckpt)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("w."))
    assert not (tmp_path / "nan.safetensors").exists()


def test_calibrated_start_fills_uncovered_blocks(tmp_path):
    """Calibrate-then-fine-tune: a calibrated file covering blocks 0 and 2 of 4 keeps those values and gets
    fresh (proj = 0) blocks 1 and 3, so every block trains; a file covering all asked blocks is used as is."""
    from salad_pack.salad_core.finetune import make_weights
    from salad_pack.salad_core.weights import save_salad_weights
    cal = SaladWeights.new(DIM, HEADS, 4, blocks=[0, 2], base_model="toy")
    with torch.no_grad():
        for t in cal.parameters():
            t.normal_()
    cal.metadata["training_steps"] = "200"
    path = save_salad_weights(cal, tmp_path / "cal.safetensors")
    info = dict(dim=DIM, heads=HEADS, num_blocks=4)
    w = make_weights(info, FinetuneConfig(steps=1, batch=1), path)
    assert w.block_ids == [0, 1, 2, 3] and w.metadata["blocks"] == "0-3" and w.metadata["init_blocks"] == "0,2"
    assert w.metadata["training_steps"] == "200"
    for k, v in cal.state_tensors().items():
        assert torch.equal(w.state_tensors()[k], v.detach()), k
    assert float(w.proj_for(1).weight.detach().abs().max()) == 0 == float(w.proj_for(3).bias.detach().abs().max())
    assert make_weights(info, FinetuneConfig(steps=1, batch=1), path, blocks="0,2").block_ids == [0, 2]


def _gloo_worker(rank, world, data_dir, tmp, init_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _run(Path(data_dir), Path(tmp), steps=3, batch=4, ckpt_every=0, name="ddp")
        (Path(tmp) / f"ddp-rank{rank}.done").write_text("trained, saved, past the final barrier")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: gloo's C++ threads can abort (SIGABRT, "terminate called
    # without an active exception") while Python tears down, after the work above is finished and on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn_gloo(tmp_path, data, world=2):
    """Two gloo processes; returns (the run's folder, the attempt that gave it).  A process killed by a
    signal (a gloo/torch C++ abort, seen once in CI) is retried once with a fresh rendezvous, loudly; one
    that died after every rank wrote its ``.done`` marker only failed in teardown, and its saved result is
    checked as usual.  An exception raised in a worker (our code) is never retried."""
    import torch.multiprocessing as mp
    for attempt in (1, 2):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        try:
            mp.spawn(_gloo_worker, args=(world, str(data), str(run_dir), str(run_dir / "init")), nprocs=world,
                     join=True)
            return run_dir, attempt
        except mp.ProcessExitedException as e:
            done = [(run_dir / f"ddp-rank{r}.done").exists() for r in range(world)]
            print(f"gloo attempt {attempt}: {e} (ranks done: {done})")
            if all(done) and (run_dir / "ddp.safetensors").exists():
                return run_dir, attempt
            if attempt == 2:
                raise


def test_gloo_two_processes_match_one_process(tmp_path):
    data = _make_data(tmp_path / "data", n=5)
    _, w1, _, _ = _run(data, tmp_path, steps=3, batch=4, ckpt_every=0, name="single")
    run_dir, _ = _spawn_gloo(tmp_path, data)
    w2 = load_salad_weights(run_dir / "ddp.safetensors")
    assert "2 process(es)" in w2.metadata["training_data"]
    ref, got = _tensors(w1), w2.state_tensors()
    diff = max(float((ref[k] - got[k].detach()).abs().max()) for k in ref)
    scale = max(float(ref[k].abs().max()) for k in ref)
    print(f"gloo 2 processes vs 1 process: max abs diff {diff:.3g} (weights max {scale:.3g})")
    assert scale > 0 and diff <= 1e-5 * max(scale, 1.0)


# ------------------------------------------------------------------------------------------------
# gradient checkpointing and LoRA on ComfyUI's own WanModel (tiny fixture, in this process)
# ------------------------------------------------------------------------------------------------

def _tiny_wan(comfy, tiny_models):
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(tiny_models["wan21_t2v_tiny"]))


def _wan_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 32, 32, generator=g), torch.tensor([300.0, 800.0]),
            torch.randn(2, 16, 4096, generator=g) * 0.1, torch.randn(2, 16, 2, 32, 32, generator=g))


def _moved(w, lora, seed=4):
    """Non-zero proj/gate and LoRA B, so every trained tensor gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(w.parameters()) + ([*lora.B] if lora is not None else []):
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def test_gradient_checkpointing_same_loss_and_gradients(comfy_inprocess, tiny_models):
    """nodes/finetune.py's Wan wiring with and without gradient checkpointing (SALAD topk 75%, LoRA rank 2):
    the same loss and the same gradient for every proj/gate/LoRA tensor; with it, each block's self-attention
    runs twice per step (the recompute) and the autograd graph outside the blocks keeps far fewer bytes."""
    from salad_pack.nodes.finetune import salad_wan_hooks, wan_forward, wan_lora_targets
    from salad_pack.salad_core.finetune import LoraSet

    dm = _tiny_wan(comfy_inprocess, tiny_models).model.diffusion_model
    x, t, ctx, target = _wan_batch()
    results = {}
    for gc in (False, True):
        w = SaladWeights.new(dm.dim, dm.num_heads, len(dm.blocks), base_model="tiny", pattern="topk", sparsity=0.75)
        lora = LoraSet(wan_lora_targets(dm), 2, seed=0)
        _moved(w, lora)
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with salad_wan_hooks(dm, w, 0.75, "topk", "torch", grad_checkpointing=gc, lora=lora) as st:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = ((wan_forward(dm, st)(x, t, ctx) - target) ** 2).mean()
            loss.backward()
            calls = dict(st.stats.sparse_calls)
        grads = {f"w.{k}": v.grad.clone() for k, v in w.state_tensors().items()}
        grads.update({f"lora.{k}": v.grad.clone() for k, v in lora.state_tensors().items()})
        results[gc] = (float(loss.detach()), grads, calls, saved[0])
        print(f"gradient checkpointing {gc}: loss {float(loss.detach()):.8f}, self-attention calls {calls}, "
              f"autograd saved {saved[0] / 2**20:.2f} MiB outside checkpointed blocks")
    (l0, g0, c0, s0), (l1, g1, c1, s1) = results[False], results[True]
    assert c0 == {0: 1, 1: 1} and c1 == {0: 2, 1: 2}, (c0, c1)
    assert s1 < s0 / 2, (s0, s1)
    assert abs(l0 - l1) <= 1e-7 * abs(l0), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 4 + 2 * 4 * 2
    for k in g0:
        assert float(g0[k].abs().max()) > 0, f"{k} got no gradient"
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-9, msg=k)
    # the hooks are gone after the with-block
    assert all("forward" not in b.__dict__ and "forward" not in b.self_attn.q.__dict__ for b in dm.blocks)


def test_lora_file_loads_in_comfyui_and_reproduces_the_trained_model(comfy_inprocess, tiny_models, tmp_path):
    """Fine-tune proj/gate + a rank-4 LoRA on the tiny Wan (ComfyUI's WanModel), then load the LoRA file with
    ComfyUI's own LoRA loader (comfy.sd.load_lora_for_models, what LoraLoaderModelOnly calls) and the weights
    with Apply SALAD Attention: every LoRA key is taken and the patched model's output equals the trained one."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils
    from salad_pack.nodes.apply import SALADApplyAttention
    from salad_pack.nodes.finetune import salad_wan_hooks, wan_forward, wan_lora_targets
    from salad_pack.nodes.loader import SALADWeightsLoader
    from salad_pack.salad_core.finetune import LoraSet

    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        save_pair(data / f"p{i}.safetensors", torch.randn(16, 2, 32, 32, generator=g),
                  torch.randn(16, 4096, generator=g) * 0.1)
    trained = _tiny_wan(comfy_inprocess, tiny_models)
    dm = trained.model.diffusion_model
    cfg = FinetuneConfig(steps=3, batch=2, lr=1e-2, warmup=1, sparsity=0.75, pattern="topk", backend="torch",
                         ckpt_every=0, lora_rank=4)
    w = SaladWeights.new(dm.dim, dm.num_heads, len(dm.blocks), base_model="tiny", pattern="topk", sparsity=0.75)
    lora = LoraSet(wan_lora_targets(dm), cfg.lora_rank, seed=cfg.seed)
    with salad_wan_hooks(dm, w, cfg.sparsity, cfg.pattern, "torch", grad_checkpointing=True, lora=lora) as st:
        res = finetune(wan_forward(dm, st), w, PairFolder(data), cfg, out_path=tmp_path / "w.safetensors",
                       device="cpu", latent_transform=trained.model.process_latent_in, lora=lora,
                       lora_out_path=tmp_path / "w_lora.safetensors")
        assert res["lora_path"] is not None and float(lora.B[0].abs().max()) > 0
        x, t, ctx, _ = _wan_batch(seed=9)
        with torch.no_grad():
            ref = wan_forward(dm, st)(x, t, ctx)
    sw = load_salad_weights(res["path"])
    assert sw.metadata["lora_file"] == "w_lora.safetensors" and "rank-4 LoRA" in sw.metadata["training_data"]

    sd = comfy.utils.load_torch_file(str(res["lora_path"]), safe_load=True)
    assert len(sd) == 2 * 4 * 3 and "diffusion_model.blocks.1.self_attn.o.lora_A.weight" in sd
    base = _tiny_wan(comfy_inprocess, tiny_models)
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map)
    assert len(loaded) == 2 * 4, sorted(loaded)[:4]          # every q/k/v/o of both blocks, nothing left over
    with_lora = comfy.sd.load_lora_for_models(base, None, sd, 1.0, 0)[0]
    m = SALADApplyAttention().apply(with_lora, 0.75, "topk", 0.0, 1.0, "", "torch",
                                    salad_weights=SALADWeightsLoader.wrap(sw))[0]
    m.patch_model()
    try:
        with torch.no_grad():
            got = m.model.diffusion_model(x, t, ctx, transformer_options={})
    finally:
        m.unpatch_model()
    with torch.no_grad():
        plain = base.model.diffusion_model(x, t, ctx, transformer_options={})   # no LoRA, no SALAD
    err = float((got - ref).abs().max() / ref.abs().max())
    print(f"ComfyUI LoRA + SALAD weights vs the trained model: max rel error {err:.2e}; "
          f"vs the model without them {float((plain - ref).abs().max() / ref.abs().max()):.2e}")
    assert err < 1e-4
    assert float((plain - ref).abs().max() / ref.abs().max()) > 100 * err


# ------------------------------------------------------------------------------------------------
# ComfyUI's WanModel through the CLI (nodes/finetune.py wiring), killed with SIGKILL and resumed
# ------------------------------------------------------------------------------------------------

def _cli(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "salad_finetune.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_tiny_wan_sigkill_resume_bit_exact(tmp_path, tiny_models, comfyui_dir):
    """The CLI on the tiny Wan fixture (ComfyUI's WanModel, 512 tokens = 4 blocks, sparsity 0.75), with
    gradient checkpointing (its default) and a rank-2 LoRA: a run SIGKILLed after its step-2 checkpoint and
    resumed gives the weights and the LoRA of an uninterrupted run, bit for bit."""
    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_pair(data / f"p{i}.safetensors", torch.randn(16, 2, 32, 32, generator=g),
                  torch.randn(16, 4096, generator=g) * 0.1)
    env = dict(os.environ, COMFYUI_DIR=str(comfyui_dir), OMP_NUM_THREADS="1")
    common = ["--model", str(tiny_models["wan21_t2v_tiny"]), "--data", str(data), "--steps", "4", "--batch", "1",
              "--lr", "1e-3", "--sparsity", "0.75", "--pattern", "topk", "--ckpt-every", "2", "--log-every", "1",
              "--backend", "torch", "--device", "cpu", "--lora-rank", "2"]
    straight = _cli(common + ["--out", str(tmp_path / "a.safetensors")], env=env)
    killed = _cli(common + ["--out", str(tmp_path / "b.safetensors"), "--stop-at", "1000"], env=env)
    ckpt = tmp_path / "b.safetensors.ckpt"
    t0 = time.monotonic()
    while not ckpt.exists() and killed.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    assert killed.poll() is None, killed.stdout.read()
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    out_a = straight.communicate(timeout=90)[0]
    assert straight.returncode == 0, out_a
    print(out_a)
    state, _ = load_checkpoint(ckpt)
    assert 2 <= state["step"] < 4, state["step"]
    resumed = _cli(common + ["--out", str(tmp_path / "b.safetensors"), "--resume"], env=env)
    out_b = resumed.communicate(timeout=90)[0]
    assert resumed.returncode == 0 and f"resumed from b.safetensors.ckpt at step {state['step']}" in out_b, out_b
    a, b = load_salad_weights(tmp_path / "a.safetensors"), load_salad_weights(tmp_path / "b.safetensors")
    assert a.metadata["training_steps"] == "4" and "shift 8" in a.metadata["training_data"]
    assert float(a.proj_for(0).weight.detach().abs().max()) > 0
    for k, v in a.state_tensors().items():
        assert torch.equal(v, b.state_tensors()[k]), k
    assert "gradient checkpointing on, LoRA rank 2" in out_a and a.metadata["lora_file"] == "a_lora.safetensors"
    from safetensors.torch import load_file
    la, lb = load_file(tmp_path / "a_lora.safetensors"), load_file(tmp_path / "b_lora.safetensors")
    assert la.keys() == lb.keys() and len(la) == 2 * 4 * 3
    assert float(la["diffusion_model.blocks.0.self_attn.q.lora_B.weight"].abs().max()) > 0
    for k in la:
        assert torch.equal(la[k], lb[k]), k


# ------------------------------------------------------------------------------------------------
# the nodes in a real ComfyUI server
# ------------------------------------------------------------------------------------------------

def test_nodes_save_pairs_finetune_apply_in_comfy(comfy_server):
    import uuid

    from comfy_harness import execution_error, status_str
    from graphs import t2v_prompt

    folder = f"ft_{uuid.uuid4().hex[:8]}"
    p = {
        "2": {"class_type": "SALADTest_Conditioning", "inputs": {"seed": 11, "tokens": 16, "dim": 4096}},
        "4": {"class_type": "SALADTest_EmptyLatentVideo",
              "inputs": {"channels": 16, "frames": 2, "height": 32, "width": 32, "batch_size": 2}},
        "10": {"class_type": "SALADSaveTrainingPair", "inputs": {"latent": ["4", 0], "conditioning": ["2", 0],
                                                                "data_folder": folder, "filename_prefix": "pair"}},
    }
    entry = comfy_server.run(p)
    assert status_str(entry) == "success", execution_error(entry)
    data_dir = comfy_server.output / "salad_training" / folder
    assert sorted(f.name for f in data_dir.iterdir()) == ["pair_00001.safetensors", "pair_00002.safetensors"]

    prefix = f"ftw_{uuid.uuid4().hex[:6]}"
    q = t2v_prompt("wan21_t2v_tiny.safetensors", steps=1, salad={}, prefix=prefix)
    q["4"]["inputs"].update(frames=2, height=32, width=32)
    q["20"] = {"class_type": "SALADFinetune", "inputs": {
        "model": ["1", 0], "data_folder": folder, "steps": 2, "batch": 2, "learning_rate": 1e-3,
        "sparsity": 0.75, "pattern": "topk", "resume": False, "filename_prefix": prefix, "checkpoint_every": 0,
        "gradient_checkpointing": True, "lora_rank": 2}}
    q["5"]["inputs"]["salad_weights"] = ["20", 0]
    q["5"]["inputs"]["sparsity"] = 0.75
    mark = len(comfy_server.log())
    entry = comfy_server.run(q)
    err = execution_error(entry) or {}
    assert status_str(entry) == "success", (err.get("exception_message"), "".join(err.get("traceback", []))[-3000:])
    text = entry["outputs"]["20"]["text"][0]
    assert text.startswith("SALAD Fine-tune: 2 steps") and f"{prefix}_00001.safetensors" in text, text
    assert f"the LoRA {prefix}_lora_00001.safetensors" in text, text
    assert (comfy_server.models / "loras" / f"{prefix}_lora_00001.safetensors").is_file()
    w = load_salad_weights(comfy_server.salad_dir / f"{prefix}_00001.safetensors")
    assert w.metadata["lora_file"] == f"{prefix}_lora_00001.safetensors"
    assert w.metadata["training_steps"] == "2" and w.metadata["created_by"] == "ComfyUI SALAD Fine-tune"
    assert "shift 8" in w.metadata["training_data"] and w.metadata["sparsity"] == "0.75"
    log = comfy_server.log()[mark:]
    assert "SALAD Fine-tune: step 2/2 loss" in log
    assert (comfy_server.output / "salad_finetune" / f"{prefix}.ckpt").exists()


def test_finetune_refuses_models_and_latents_it_cannot_train_with_named_errors(comfy_server):
    """Fine-tune gives the model only the noisy latent and the text: an image-to-video Wan, or pairs whose
    latents have other channels than the model takes (Wan 2.1 VAE latents on the Wan 2.2 5B), fail before
    the model is loaded, naming the model type / the data folder and what was expected."""
    import uuid

    from comfy_harness import execution_error, status_str
    folder = f"ftbad_{uuid.uuid4().hex[:8]}"
    p = {"2": {"class_type": "SALADTest_Conditioning", "inputs": {"seed": 11, "tokens": 16, "dim": 4096}},
         "4": {"class_type": "SALADTest_EmptyLatentVideo",
               "inputs": {"channels": 16, "frames": 2, "height": 32, "width": 32, "batch_size": 1}},
         "10": {"class_type": "SALADSaveTrainingPair", "inputs": {"latent": ["4", 0], "conditioning": ["2", 0],
                                                                 "data_folder": folder, "filename_prefix": "pair"}}}
    assert status_str(comfy_server.run(p)) == "success"
    want = {"wan21_i2v_tiny.safetensors": ("i2v", "text-to-video"),
            "wan22_5b_tiny.safetensors": ("48-channel", folder)}
    for unet, words in want.items():
        q = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
             "20": {"class_type": "SALADFinetune", "inputs": {
                 "model": ["1", 0], "data_folder": folder, "steps": 1, "batch": 1, "learning_rate": 1e-3,
                 "sparsity": 0.75, "pattern": "topk", "resume": False, "filename_prefix": f"bad_{uuid.uuid4().hex[:6]}",
                 "checkpoint_every": 0}}}
        entry = comfy_server.run(q)
        assert status_str(entry) == "error", unet
        err = execution_error(entry)
        assert err["node_type"] == "SALADFinetune", err
        msg = err["exception_message"]
        assert all(w in msg for w in words), (unet, msg)
        assert "Traceback" not in msg
        print(unet, "->", msg)
    assert comfy_server.alive()


def test_finetune_is_changed_follows_the_data_folder(comfy_inprocess, tmp_path):
    """IS_CHANGED: the same while the pairs are the same, new when a file is added or rewritten, '' (run
    and say why) for a folder that cannot be read; only widget values are passed to it."""
    from salad_pack.nodes.finetune import SALADFinetune
    d = tmp_path / "set"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"x" * 10)
    one = SALADFinetune.IS_CHANGED(data_folder=str(d), steps=10)
    assert one and one == SALADFinetune.IS_CHANGED(data_folder=str(d), steps=10)
    (d / "b.safetensors").write_bytes(b"y" * 10)
    two = SALADFinetune.IS_CHANGED(data_folder=str(d))
    assert two != one
    (d / "b.safetensors").write_bytes(b"y" * 11)
    assert SALADFinetune.IS_CHANGED(data_folder=str(d)) not in (one, two)
    assert SALADFinetune.IS_CHANGED(data_folder=str(tmp_path / "missing")) == ""
    assert SALADFinetune.IS_CHANGED(data_folder="") == ""


def test_inference_tensors_swapped_only_on_the_training_device():
    """Tensors ComfyUI made under inference_mode are swapped for equal normal ones where training computes;
    tensors left on another device (offloaded by a partial load) are left alone: ComfyUI's cast to the
    compute device makes a new, normal tensor, which autograd accepts."""
    from salad_pack.nodes.finetune import _trainable_copy_of_inference_tensors
    with torch.inference_mode():
        m = torch.nn.Linear(4, 4)
        m.register_buffer("b", torch.ones(2))
    params = list(m.parameters())
    assert _trainable_copy_of_inference_tensors(m, torch.device("cuda", 0)) == 0
    assert [p is q for p, q in zip(m.parameters(), params)] == [True, True]
    x = torch.randn(2, 4, requires_grad=True)
    torch.nn.functional.linear(x, m.weight.to(torch.bfloat16).float()).sum().backward()   # a cast copy trains
    assert x.grad is not None
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert _trainable_copy_of_inference_tensors(m, "cpu") == 3
    assert not any(t.is_inference() for t in m.state_dict().values())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
