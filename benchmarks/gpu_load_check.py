"""Load check (issue 8): 20 prompts queued at once on one ComfyUI server that has to offload.

A fresh ComfyUI 0.3.75 server on the GPU with ``--reserve-vram`` (card total - usable_gib, as in
gpu_server_check.py's partial mode) loads a full-size random-weight Wan 2.1 T2V 1.3B and samples short
clips.  First every configuration runs alone (its solo output); then 20 prompts are queued without
waiting (consecutive prompts differ, so ComfyUI's cache cannot serve the sampler; checked), cycling dense /
SALAD with weights / SALAD sparse-only at several sparsities and patterns.
Checked: all 20 finish with success, each output equals its configuration's solo output (max abs diff
relative to the solo's max; on a GPU small differences may come from nondeterministic kernels, so the
check is <= --tol), and after POST /free (unload models, free memory) the device's used memory is back
within --mem-slack-gib of its level before the first prompt.

GPU:  COMFYUI_DIR=... PYTHONUNBUFFERED=1 python benchmarks/gpu_load_check.py --out DIR
CPU:  python benchmarks/gpu_load_check.py --model tiny --out DIR   (checks the script runs; no memory checks)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_server_check import PeakMemory, build_files, load_latent, prompt  # noqa: E402
from comfy_harness import ComfyServer, execution_error, status_str  # noqa: E402  (path set by gpu_server_check)

SHAPES = {"tiny": dict(width=64, height=64, frames=5, steps=2, usable_gib=0.0),
          "1.3b": dict(width=832, height=480, frames=17, steps=2, usable_gib=3.0)}
# A prompt no card can hold: 4096x4096, 481 frames = 121x256x256 = 7.9 M tokens (the 1.3B model's FFN alone
# would need ~140 GiB for one block's activations).  It must fail with ComfyUI's OOM report, not kill the server.
OOM_SHAPE = dict(width=4096, height=4096, frames=481, steps=1)
CONFIGS = [  # name, Apply SALAD Attention inputs (None: dense), with the weight file?
    ("dense", None, False),
    ("salad_topk90_w", {"sparsity": 0.9, "pattern": "topk"}, True),
    ("sparse_window50", {"sparsity": 0.5, "pattern": "window"}, False),
    ("salad_window95_w", {"sparsity": 0.95, "pattern": "window"}, True),
    ("sparse_topk80_dense0-1", {"sparsity": 0.8, "pattern": "topk", "dense_blocks": "0-1"}, False),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SHAPES), default="1.3b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default="/tmp/salad_gpu_load")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--mem-slack-gib", type=float, default=0.5)
    a = ap.parse_args()
    shape = SHAPES[a.model]
    gpu = a.model != "tiny"
    base = Path(a.base) / a.model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mem = PeakMemory(enabled=gpu)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    unet, weights = build_files(base, a.model)
    args = []
    if gpu:
        args = ["--reserve-vram", f"{max(0.0, mem.total_gib() - shape['usable_gib']):.2f}"]
    server = ComfyServer(base_dir=base, extra_args=args, cpu=not gpu)
    result = dict(card=mem.name(), model=a.model, shape=shape, args=args, prompts=[], ok=False)
    server.start(timeout=300)
    try:
        start_used = mem.used() / 2**30
        result["start_used_gib"] = start_used

        def make(cfg, prefix):
            name, salad, with_w = cfg
            return prompt(unet, shape, salad=salad, weights=weights if with_w else None,
                          prefix=f"{prefix}_{name}_{uuid.uuid4().hex[:6]}")

        solo = {}
        for cfg in CONFIGS:
            e = server.run(make(cfg, "solo"), timeout=900)
            if status_str(e) != "success":
                raise RuntimeError(f"solo {cfg[0]} failed: {(execution_error(e) or {}).get('exception_message')}")
            solo[cfg[0]] = load_latent(server, e)
            log(f"solo {cfg[0]} done")
        with mem:
            t0 = time.time()
            ids = [(CONFIGS[i % len(CONFIGS)], server.queue(make(CONFIGS[i % len(CONFIGS)], f"q{i:02d}")))
                   for i in range(a.prompts)]
            entries = [(cfg, server.wait(pid, timeout=1800)) for cfg, pid in ids]
            wall = time.time() - t0
        all_ok = True
        for i, (cfg, e) in enumerate(entries):
            ok = status_str(e) == "success"
            cached = [n for kind, d in e.get("status", {}).get("messages", []) if kind == "execution_cached"
                      for n in d.get("nodes", [])]
            row = dict(i=i, config=cfg[0], ok=ok, sampled="6" not in cached)   # not served from ComfyUI's cache
            ok = ok and row["sampled"]
            if ok:
                lat, ref = load_latent(server, e), solo[cfg[0]]
                row["rel_diff_vs_solo"] = float((lat - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                row["matches_solo"] = row["rel_diff_vs_solo"] <= a.tol
                ok = ok and row["matches_solo"] and bool(lat.isfinite().all())
            else:
                row["error"] = (execution_error(e) or {}).get("exception_message", "")[:500]
            all_ok &= ok
            result["prompts"].append(row)
            log(json.dumps(row))
        if gpu:
            result["oom_prompt"] = oom_prompt(server, unet, weights, make, solo, a.tol, log)
        server.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(3)
        end_used = mem.used() / 2**30
        result.update(wall_s=wall, peak_gib=mem.peak / 2**30, end_used_gib=end_used,
                      memory_returned=(not gpu) or end_used <= start_used + a.mem_slack_gib)
        result["partial_load_seen"] = "loaded partially" in server.log()
        result["ok"] = bool(all_ok and result["memory_returned"]
                            and (not gpu or (result["oom_prompt"]["ok"] and result["partial_load_seen"])))
        log(f"{a.prompts} queued prompts in {wall:.1f}s, all ok: {all_ok}; GPU used {start_used:.2f} GiB before, "
            f"peak {mem.peak / 2**30:.2f}, {end_used:.2f} after /free -> returned: {result['memory_returned']}")
    finally:
        server.stop()
        (out / f"comfyui-load-{a.model}.log").write_text(server.log())
    if gpu:
        result["oom_op"] = oom_op(log)
        result["ok"] = bool(result["ok"] and result["oom_op"]["ok"])
    stem = f"{dt.date.today().isoformat()}-load-{a.model}-{result['card'].lower().replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.log").write_text("\n".join(lines) + "\n")
    print("PASS" if result["ok"] else "FAIL")
    sys.exit(0 if result["ok"] else 1)


def oom_prompt(server, unet, weights, make, solo, tol, log):
    """A SALAD prompt too large for the card, then a normal prompt: the first fails with an error, the
    server stays up, the second succeeds and matches its solo output."""
    t0 = time.time()
    e = server.run(prompt(unet, OOM_SHAPE, salad={"sparsity": 0.9, "pattern": "topk"}, weights=weights,
                          prefix=f"oom_{uuid.uuid4().hex[:6]}"), timeout=900)
    err = execution_error(e) or {}
    row = dict(status=status_str(e), seconds=round(time.time() - t0, 1),
               exception_type=err.get("exception_type"), message=(err.get("exception_message") or "")[:800])
    cfg = CONFIGS[1]
    e2 = server.run(make(cfg, "after_oom"), timeout=900)
    row["next_prompt"] = status_str(e2)
    if row["next_prompt"] == "success":
        lat, ref = load_latent(server, e2), solo[cfg[0]]
        row["next_rel_diff_vs_solo"] = float((lat - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    row["ok"] = (row["status"] != "success" and "memory" in row["message"].lower()
                 and row["next_prompt"] == "success" and row.get("next_rel_diff_vs_solo", 1.0) <= tol)
    log("oom prompt: " + json.dumps(row))
    return row


def oom_op(log):
    """SALAD attention called in this process with q, k, v that fit but leave no room for SALAD's
    tile-ordered copies: a torch.OutOfMemoryError naming the size; then a normal call works and the
    memory comes back."""
    import torch
    from salad_pack.salad_core.attention import salad_self_attention
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    H, D = 12, 128
    per_token = H * D * 2
    F = max(1, int(0.3 * free / per_token) // (64 * 64))
    grid = (F, 64, 64)
    L = F * 64 * 64
    row = dict(free_gib=free / 2**30, grid=list(grid), tokens=L, qkv_gib_each=L * per_token / 2**30)
    base = torch.cuda.memory_allocated()
    try:
        q, k, v = (torch.empty(1, L, H * D, device="cuda", dtype=torch.bfloat16).normal_() for _ in range(3))
        try:
            salad_self_attention(q, k, v, H, grid=grid, block_id=0)
            row["error"] = None
        except torch.OutOfMemoryError as ex:
            row["error"] = str(ex)[:800]
        del q, k, v
    except torch.OutOfMemoryError as ex:   # the inputs themselves did not fit: the check did not run
        row["error"] = "inputs did not fit: " + str(ex)[:300]
    torch.cuda.empty_cache()
    g = (21, 30, 52)
    q, k, v = (torch.randn(1, g[0] * g[1] * g[2], H * D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = salad_self_attention(q, k, v, H, grid=g, block_id=0)
    row["next_call_finite"] = bool(out.isfinite().all())
    del q, k, v, out
    from salad_pack.salad_core.tiling import TileLayout
    TileLayout.clear_cache()          # the huge grid's cached permutation is not a leak
    torch.cuda.empty_cache()
    row["allocated_after_gib"] = (torch.cuda.memory_allocated() - base) / 2**30
    row["ok"] = bool(row["error"] and row["error"].startswith("SALAD attention") and row["next_call_finite"]
                     and row["allocated_after_gib"] < 0.25)
    log("oom op: " + json.dumps(row))
    return row


if __name__ == "__main__":
    main()
