"""Tune the inference passes (kernels.kv_pass, kernels.q_pass) on the GPU, and profile the host side of one
SALAD call (issue 9 items 1 and 3).

History: kinds kv_gather / lin_state timed kv_pass's STATE_APART (the gathering kernel without the D x D state,
the state from a second read of k, v) at commit fb4ea8f: 0.217 ms vs the fused pass's 0.209 ms at Wan-1.3B 480p
on an H200 (benchmarks/results/wave8/), so it was removed.

    python benchmarks/sweep_passes.py --out DIR [--shapes 1.3b-480p,14b-480p,1.3b-sq480] [--host-profile]

Per shape (B1, tokens of a Wan grid, H heads of 128, bf16, random inputs): each candidate config
(rows per step, warps, stages, programs) of both passes timed with ``triton.testing.do_bench`` (median) through
``TritonOptions(configs=...)`` (the checked-in table is never touched), next to what memory bandwidth allows:
``copy_ms`` (``index_select`` of K and V into tile order, the pre-pass way) and ``bytes`` moved.  The best
config per shape is printed as a table entry for kernels/_triton_ops.py.

``--host-profile``: cProfile of 200 inference calls of one SALAD layer at the smallest shape while the GPU is
kept busy (so only the host's work is seen): the functions where the host spends its time.
"""
from __future__ import annotations

import cProfile
import io
import itertools
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from profile_layer import median_ms, run_header, shape, sweep_parser, write_result  # noqa: E402

SMOKE = (2, (2, 8, 8))          # heads, grid of --smoke


KINDS = ("kv_pass", "q_pass", "token_mean")


def parse(argv=None):
    ap = sweep_parser(__doc__, rep_ms=60, budget_s=240, smoke_help="CPU interpreter, tiny shape, two candidates")
    ap.add_argument("--host-profile", action="store_true")
    ap.add_argument("--kinds", default="kv_pass,q_pass",
                    help="what to sweep, comma separated: kv_pass, q_pass; token_mean (the gate's mean of the "
                         "block input, against torch.mean); empty: none")
    ap.add_argument("--wave-check", action="store_true",
                    help="per shape at batch 1 and 2: the table's kv_pass with and without WAVE_FIT (programs "
                         "halved when one wave of whole splits per head fills)")
    return ap.parse_args(argv)


def candidates(kind: str, smoke: bool):
    import triton
    rows = {"kv_pass": "BLOCK_N", "q_pass": "BLOCK_M", "token_mean": "BLOCK_L"}[kind]
    if smoke:
        extra = {"BLOCK_C": 32} if kind == "token_mean" else {}
        return [triton.Config({rows: 32 if kind != "token_mean" else 4, "PROGRAMS": p, **extra}, num_warps=4,
                              num_stages=1) for p in (4, 8)]
    out = []
    if kind == "kv_pass":
        # programs: 1056 never won (wave 6); 132 / 264 (one / two per SM of an H100/H200) write fewer partial
        # D x D states for the torch sum to reduce (528 programs: 35 MB at Wan-1.3B 480p)
        for r, w, s, p in itertools.product((64, 128), (4, 8), (2, 3), (132, 264, 528)):
            out.append(triton.Config({"BLOCK_N": r, "PROGRAMS": p}, num_warps=w, num_stages=s))
        return out
    if kind == "token_mean":
        for r, c, w, p in itertools.product((16, 32), (256, 512), (4, 8), (528, 1056, 2112)):
            out.append(triton.Config({"BLOCK_L": r, "BLOCK_C": c, "PROGRAMS": p}, num_warps=w, num_stages=3))
        return out
    # q_pass: also the state as one 16-bit operand (S_PARTS 1) and the denominator on the tensor cores
    for r, w, s, p, parts, dd in itertools.product((64, 128), (4, 8), (1, 2), (528, 2112), (1, 2), (False, True)):
        out.append(triton.Config({"BLOCK_M": r, "PROGRAMS": p, "S_PARTS": parts, "DEN_DOT": dd}, num_warps=w,
                                 num_stages=s))
    return out


def _wave_check(entry, name, card, H, L, D, rm, dev, dtype, bench):
    """kv_pass with the table's entry (WAVE_FIT on) against the same entry with WAVE_FIT off, batch 1 and 2."""
    import torch
    import triton
    import salad_pack.kernels as K
    from salad_pack.kernels import _triton_ops as ops
    table = ops.config_for("kv_pass", D, dtype, L)
    no_fit = triton.Config(dict(table.kwargs, WAVE_FIT=False), num_warps=table.num_warps, num_stages=table.num_stages)
    off = K.TritonOptions(configs={"kv_pass": no_fit})
    nb = ops.num_blocks(L, K.DEFAULT_BLOCK)

    def programs(c, bh):       # the programs kv_pass launches for bh heads with config c
        return bh * ops._splits(nb, 1, bh, ops.kv_pass_programs(c, bh))[0]

    for b in (1, 2):
        kv = [torch.randn(b, L, H, D, device=dev, dtype=dtype).transpose(1, 2) for _ in range(2)]
        with torch.inference_mode():
            fit_ms = bench(lambda: K.kv_pass(kv[0], kv[1], rm))
            off_ms = bench(lambda: K.kv_pass(kv[0], kv[1], rm, triton_options=off))
        row = {"batch": b, "fit_ms": fit_ms, "off_ms": off_ms,
               "programs_fit": programs(table, b * H), "programs_off": programs(no_fit, b * H)}
        entry.setdefault("kv_wave_fit", []).append(row)
        print(f"[sweep] {card} {name} batch {b} kv_pass WAVE_FIT: {row['programs_fit']} programs {fit_ms:.4f} ms, "
              f"off: {row['programs_off']} programs {off_ms:.4f} ms ({off_ms / fit_ms:.3f}x)", flush=True)


def main(argv=None):
    a = parse(argv)
    import os
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    from _pack import register
    register()
    import torch
    import salad_pack.kernels as K
    from salad_pack.salad_core import attention as A
    from salad_pack.salad_core.tiling import TileLayout
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    if a.smoke:
        a.shapes = "smoke"

    def bench(fn):
        return median_ms(fn, dev, a.rep_ms, 15)

    res = run_header(dev, shapes={})
    t_start = time.time()
    for name in a.shapes.split(","):
        H, grid = SMOKE if a.smoke else shape(name)
        D = 32 if a.smoke else 128
        L = grid[0] * grid[1] * grid[2]
        lay = TileLayout.get(grid, 0, 0, (2, 8, 8), dev)
        rm = lay.perm32
        q, k, v = (torch.randn(1, L, H, D, device=dev, dtype=dtype).transpose(1, 2) for _ in range(3))
        # the block input x (B, L, dim) of the gate's token mean: dim = H * D, as in the model
        x = torch.randn(1, L, H * D, device=dev, dtype=dtype) if "token_mean" in a.kinds else None
        with torch.inference_mode():
            st = K.kv_pass(k, v, rm)[-1]
            gl = torch.zeros(1, device=dev)
            copy_ms = bench(lambda: (k.transpose(1, 2).index_select(1, lay.perm), v.transpose(1, 2).index_select(
                1, lay.perm)))
            entry = {"H": H, "L": L, "copy_ms": copy_ms, "kv_bytes": 4 * k.numel() * k.element_size(),
                     "q_bytes": 2 * q.numel() * q.element_size()}
            if x is not None:
                entry["x_bytes"] = x.numel() * x.element_size()
                entry["torch_mean_ms"] = bench(lambda: torch.mean(x, dim=1, dtype=torch.float32))
            for kind in [x for x in a.kinds.split(",") if x]:
                entry[kind] = []
                tried = []                  # (config, its row in entry[kind]) of each candidate
                for c in candidates(kind, a.smoke):
                    if time.time() - t_start > a.budget_s:
                        break
                    opts = K.TritonOptions(configs={kind: c})
                    if kind == "kv_pass":
                        def fn():
                            return K.kv_pass(k, v, rm, pool_k=True, linear_state=True, triton_options=opts)
                    elif kind == "token_mean":
                        def fn():
                            return K.token_mean(x, backend="triton", triton_options=opts)
                    else:
                        def fn():
                            return K.q_pass(q, rm, state=st, gate_logit=gl, triton_options=opts)
                    try:
                        ms = bench(fn)
                    except Exception as e:  # e.g. out of shared memory / registers for this config
                        ms = None
                        print(f"[sweep] {name} {kind} {c} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    entry[kind].append(dict(config=dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages),
                                            ms=ms))
                    tried.append((c, entry[kind][-1]))
                ok = [t for t in tried if t[1]["ms"] is not None]
                if ok and kind == "token_mean":
                    best = min(ok, key=lambda t: t[1]["ms"])[1]
                    entry[f"{kind}_best"] = best
                    print(f"[sweep] {res['card']} {name} {kind}: best {best['ms']:.3f} ms {best['config']}", flush=True)
                elif ok:
                    best_c, best = min(ok, key=lambda t: t[1]["ms"])
                    default = bench(lambda: (K.kv_pass(k, v, rm) if kind == "kv_pass"
                                             else K.q_pass(q, rm, state=st, gate_logit=gl)))
                    entry[f"{kind}_best"] = best
                    if kind == "kv_pass":   # which part bounds it: the gather alone, + pooling, + state
                        bo = K.TritonOptions(configs={kind: best_c})
                        entry["kv_gather_only_ms"] = bench(lambda: K.kv_pass(k, v, rm, pool_k=False, linear_state=False,
                                                                             triton_options=bo))
                        entry["kv_gather_pool_ms"] = bench(lambda: K.kv_pass(k, v, rm, pool_k=True, linear_state=False,
                                                                             triton_options=bo))
                        print(f"[sweep] {name} kv_pass parts at best config: gather {entry['kv_gather_only_ms']:.3f}"
                              f" ms, + pool {entry['kv_gather_pool_ms']:.3f} ms, + state {best['ms']:.3f} ms",
                              flush=True)
                    entry[f"{kind}_default_ms"] = default
                    nbytes = entry["kv_bytes"] if kind == "kv_pass" else entry["q_bytes"]
                    print(f"[sweep] {res['card']} {name} {kind}: default {default:.3f} ms, best {best['ms']:.3f} ms "
                          f"{best['config']} ({nbytes / best['ms'] / 1e9:.2f} TB/s; K/V index_select copy "
                          f"{copy_ms:.3f} ms)", flush=True)
            if "token_mean_best" in entry:
                entry["token_mean_default_ms"] = bench(lambda: K.token_mean(x, backend="triton"))
                err = (K.token_mean(x, backend="triton") - torch.mean(x, dim=1, dtype=torch.float32)).abs().max().item()
                print(f"[sweep] {res['card']} {name} token mean: torch.mean {entry['torch_mean_ms']:.3f} ms, kernel "
                      f"(table) {entry['token_mean_default_ms']:.3f} ms, best {entry['token_mean_best']['ms']:.3f} ms "
                      f"({entry['x_bytes'] / entry['token_mean_best']['ms'] / 1e9:.2f} TB/s); max |diff| {err:.2e}",
                      flush=True)
            if a.wave_check:
                _wave_check(entry, name, res["card"], H, L, D, rm, dev, dtype, bench)
        res["shapes"][name] = entry
        del q, k, v, x

    if a.host_profile:
        H, grid = SMOKE if a.smoke else shape("1.3b-480p17")
        D = 32 if a.smoke else 128
        L = grid[0] * grid[1] * grid[2]
        q, k, v, x = (torch.randn(1, L, H * D, device=dev, dtype=dtype) for _ in range(4))
        proj = torch.nn.Linear(H * D, H * D).to(device=dev, dtype=dtype)
        gate = torch.nn.Linear(H * D, 1).to(device=dev, dtype=dtype)
        conf = A.SaladConfig(sparsity=0.9, backend="auto" if dev.type == "cuda" else "triton")

        def call():
            return A.salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=conf)
        with torch.inference_mode():
            call()
            n = 5 if a.smoke else 200
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda._sleep(int(5e9))
            pr = cProfile.Profile()
            t0 = time.perf_counter()
            pr.enable()
            for _ in range(n):
                call()
            pr.disable()
            host_us = (time.perf_counter() - t0) / n * 1e6
            if dev.type == "cuda":
                torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        s2 = io.StringIO()
        pstats.Stats(pr, stream=s2).sort_stats("cumulative").print_stats(40)
        res["host_profile"] = {"calls": n, "host_us_per_call_under_cprofile": host_us}
        print(f"[host] {host_us:.0f} us per call under cProfile\n{s.getvalue()}\n{s2.getvalue()}", flush=True)
    write_result(a.out, "sweep-passes", res)
    return res


if __name__ == "__main__":
    main()
