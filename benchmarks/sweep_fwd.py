"""Configs of the sparse forward kernel, timed on the inference path (issue 9: the sparse kernel is most of a
SALAD layer).

    python benchmarks/sweep_fwd.py --out DIR [--shapes 1.3b-480p,14b-480p,1.3b-sq480,14b-720p] [--sparsities 0.9,0.95]

Per shape (B1, a Wan grid's tokens, H heads of 128, bf16 random q/k/v, top-k lists from the real selection, gate
+ Proj bias as in a layer): ``kernels.block_sparse_attention_rowmap`` under each candidate ``fwd`` config, passed
per call through ``TritonOptions(configs=...)`` (the checked-in table is never touched), timed with
``triton.testing.do_bench`` (median), with its largest difference from the table's config on the same inputs.

History: at commit bb1d2b0 the kernel's inner loop had three switchable variants (config keys FOLD, TAIL_BRANCH,
LAZY_TAU) and this script compared them (benchmarks/results/fwd_loop/): the max on raw scores with the scale
folded into the exp2 FMA plus the tail mask only on steps past L was 1.06-1.11x faster on every shape and
sparsity, a lazy rescale (FlashAttention-4's trick, as a uniform branch) was slower; the kernel now has that one
loop.  At commit 0a97554 exp2 on the FMA units (a degree-3 polynomial for all or half the scores), loop unrolling
by 2 and 32-key steps were swept the same way (sweep-fwd-exp2-unroll-*.json): all 0.68-0.95x, so the MUFU exp2
is not what bounds the kernel; they were removed.  At commit 9212be2 (reverted) a Gluon sm90 kernel that issues the
scores of step t+1 before the softmax of step t was swept against the table's Triton config (fwd-config keys
GLUON = rows per program, PIPELINE; sweep-fwd-gluon-*.json): 0.44-0.92x (best variant 0.76-0.92x), its
non-pipelined Gluon replica 0.94-1.07x.  At commit fb4ea8f Triton 3.6's automatic Hopper warp specialisation
(fwd-config keys WS, and Q_SPLIT = programs per 128-row query block) was swept on an H200
(benchmarks/results/wave8/): with 128-row programs the kernel never finished (benchmarks/ws_probe.py at that
commit: every 128-row case stalled, every 64-row case ran); two 64-row programs per block ran at 0.44-0.53x the
table's kernel, and gave NaNs at 3 stages; Q_SPLIT alone 0.87-0.92x.  WS and Q_SPLIT were removed.

``--smoke``: CPU interpreter, a tiny shape, two candidates (checks the script; numbers mean nothing).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from profile_layer import (infer_parts, make_inputs, median_ms, run_header, shape, sweep_parser,  # noqa: E402
                           write_result)

# (num_warps, num_stages, BLOCK_N, extra config keys); the first is the table's entry for D=128.  Q_TILED: q read
# with TMA from a tile-ordered copy (q_pass's tile_q) instead of gathered through the row map.  GLUON_WS: the
# experimental Gluon warp-specialised kernel (kernels/_gluon_ws.py; the value picks its partitioning and walk,
# _gluon_ws.MODES; num_stages = its ring of K/V buffers; its warps are fixed by the mode); kept last, so a stall
# keeps the rows before it
GWS = {"GLUON_WS": True}
VARIANTS = [(4, 2, 64, {}), (4, 3, 64, {}), (8, 2, 64, {}), (8, 2, 128, {}), (8, 3, 128, {}), (4, 2, 128, {}),
            (4, 2, 64, {"Q_TILED": True}), (4, 2, 64, GWS), (4, 3, 64, GWS), (4, 2, 128, GWS),
            (4, 4, 64, GWS), (4, 2, 64, {"GLUON_WS": 2}), (4, 2, 64, {"GLUON_WS": 3}), (4, 3, 64, {"GLUON_WS": 3}),
            (4, 2, 128, {"GLUON_WS": 3}), (4, 4, 64, {"GLUON_WS": 3}), (4, 2, 64, {"GLUON_WS": 4}),
            (4, 2, 128, {"GLUON_WS": 4}), (4, 3, 64, {"GLUON_WS": 4})]


def parse(argv=None):
    ap = sweep_parser(__doc__, rep_ms=100, budget_s=300, smoke_help="CPU interpreter, tiny shape, two configs")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    if a.smoke:
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _pack import register
    register()
    import torch
    import triton
    import salad_pack.kernels as K
    from salad_pack.salad_core import attention as A
    dev = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float16 if a.smoke else torch.bfloat16
    shapes = {k: shape(k) for k in a.shapes.split(",")}
    variants = VARIANTS if a.variants is None else [VARIANTS[int(i)] for i in a.variants.split(",")]
    if a.smoke:
        shapes, variants, a.rep_ms = {"smoke": (2, (3, 10, 12))}, VARIANTS[:2] + VARIANTS[6:8], 1
    res = run_header(dev, torch=torch.__version__, triton=triton.__version__, rows=[])
    t0 = time.time()
    for name, (H, grid) in shapes.items():
        D = 32 if a.smoke else 128
        q, k, v, x, proj, gate = make_inputs(H, D, grid, 1, dev, dtype)
        L = q.shape[1]
        for s in (float(t) for t in a.sparsities.split(",")):
            conf = A.SaladConfig(sparsity=s, pattern="topk", block=32 if a.smoke else 128)
            with torch.inference_mode():
                n = infer_parts(A, K, q, k, v, x, proj, gate, H, D, grid, conf)

                def run(opts, tiled=False):
                    return n.sparse(backend="triton", triton_options=opts, tiled=tiled)
                ref = run(K.TritonOptions()).float()
                if s == float(a.sparsities.split(",")[0]):   # what the tile-ordered q copy adds to the Q pass
                    def qp(tile):
                        return K.q_pass(n.q4, n.rm, conf.block, state=n.st, eps=conf.eps, gate_logit=n.gl,
                                        tile_q=tile)
                    res.setdefault("q_pass_tile_q", {})[name] = {
                        "plain_ms": median_ms(lambda: qp(False), dev, a.rep_ms, 10),
                        "tile_q_ms": median_ms(lambda: qp(True), dev, a.rep_ms, 10)}
                base_ms = None
                for nw, ns, bn, extra in variants:
                    if time.time() - t0 > a.budget_s:
                        print(f"[sweep_fwd] budget spent, skipping the rest of {name} {s}", flush=True)
                        break
                    c = triton.Config(dict(BLOCK_N=bn, USE_TMA=not a.smoke, **extra), num_warps=nw, num_stages=ns)
                    opts = K.TritonOptions(configs={"fwd": c})
                    tiled = bool(extra.get("Q_TILED"))
                    row = dict(shape=name, H=H, L=L, sparsity=s, num_warps=nw, num_stages=ns, BLOCK_N=bn, **extra)
                    try:
                        o = run(opts, tiled).float()
                        row["max_diff_vs_table"] = float((o - ref).abs().max())
                        row["ms"] = median_ms(lambda: run(opts, tiled), dev, a.rep_ms, max(10, a.rep_ms // 4))
                    except Exception as e:  # a config that does not compile (shared memory, registers)
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    if base_ms is None and "ms" in row:
                        base_ms = row["ms"]
                    if "ms" in row:
                        row["vs_first"] = base_ms / row["ms"]
                    row["t_s"] = round(time.time() - t0, 1)
                    res["rows"].append(row)
                    print(f"[sweep_fwd] {json.dumps(row)}", flush=True)
                    write_result(a.out, "sweep-fwd", res)     # each row at once: a hang or timeout keeps the rest
        del q, k, v, x
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_result(a.out, "sweep-fwd", res)
    return res


if __name__ == "__main__":
    main()
