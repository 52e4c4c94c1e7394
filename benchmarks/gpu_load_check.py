"""Load check (issue 8): 20 prompts queued at once on one ComfyUI server that has to offload.

A fresh ComfyUI 0.3.75 server on the GPU with ``--reserve-vram`` (card total - usable_gib, as in
gpu_server_check.py's partial mode) loads a full-size random-weight Wan 2.1 T2V 1.3B and samples short
clips.  First every configuration runs alone (its solo output); then 20 prompts are queued without
waiting (consecutive prompts differ, so ComfyUI's cache cannot serve the sampler; checked), cycling dense / SALAD with weights / SALAD sparse-only at several sparsities and patterns.
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
          "1.3b": dict(width=832, height=480, frames=17, steps=2, usable_gib=4.5)}
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
        server.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(3)
        end_used = mem.used() / 2**30
        result.update(wall_s=wall, peak_gib=mem.peak / 2**30, end_used_gib=end_used,
                      memory_returned=(not gpu) or end_used <= start_used + a.mem_slack_gib)
        result["ok"] = bool(all_ok and result["memory_returned"])
        log(f"{a.prompts} queued prompts in {wall:.1f}s, all ok: {all_ok}; GPU used {start_used:.2f} GiB before, "
            f"peak {mem.peak / 2**30:.2f}, {end_used:.2f} after /free -> returned: {result['memory_returned']}")
    finally:
        server.stop()
        (out / f"comfyui-load-{a.model}.log").write_text(server.log())
    stem = f"{dt.date.today().isoformat()}-load-{a.model}-{result['card'].lower().replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.log").write_text("\n".join(lines) + "\n")
    print("PASS" if result["ok"] else "FAIL")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
