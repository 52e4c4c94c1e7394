"""Where does the warp-specialised sparse forward (fwd config key WS, Triton 3.6) stall on the GPU?

    python benchmarks/ws_probe.py --out DIR [--timeout-s 40]

On 2026-11-28 (H200, Triton 3.6) the GPU tests of WS passed (D=64, block 64, L=150) but every WS timing at Wan
sizes (D=128, block 128, L=32760, 90% top-k) never returned: sweep_fwd, bench_e2e and bench_fp8 each sat until
their step's timeout.  This probe runs one case per child process with a wall-clock limit (a stalled kernel
cannot be interrupted inside its process), on the plain TMA forward (``block_sparse_attention``, q in tile order),
and records per case: "ok" with the largest difference from the table's (non-WS) kernel and both times, or
"stalled" / "error".  The cases vary one thing at a time from the passing test shape toward the Wan shape: head
dim, tile (BLOCK_M), length, heads, list lengths.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (H, L, D, block, BLOCK_N, sparsity or None for full lists)
CASES = {
    "test_shape_d64_b64": (2, 150, 64, 64, 64, None),
    "d64_b64_L4096": (2, 4096, 64, 64, 64, 0.9),
    "d128_b64_L4096": (2, 4096, 128, 64, 64, 0.9),
    "d64_b128_L4096": (2, 4096, 64, 128, 64, 0.9),
    "d128_b128_L1024_full": (1, 1024, 128, 128, 64, None),
    "d128_b128_L32760_H1": (1, 32760, 128, 128, 64, 0.9),
}


def child(name: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from _pack import register
    register()
    import torch
    import triton
    from triton.testing import do_bench
    import salad_pack.kernels as K
    from salad_pack.kernels.options import TritonOptions
    H, L, D, block, bn, sp = CASES[name]
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).contiguous()
               for _ in range(3))
    nq = K.num_blocks(L, block)
    if sp is None:
        idx = torch.arange(nq, device=dev, dtype=torch.int32).expand(1, H, nq, nq).contiguous()
        cnt = torch.full((1, H, nq), nq, device=dev, dtype=torch.int32)
    else:
        idx, cnt = K.select_topk(q, k, sp, block=block)
    ws = TritonOptions(configs={"fwd": triton.Config(dict(BLOCK_N=bn, USE_TMA=True, WS=True), num_warps=4,
                                                     num_stages=2)})

    def run(opts=TritonOptions()):
        return K.block_sparse_attention(q, k, v, idx, cnt, block=block, backend="triton", triton_options=opts)[0]
    ref = run()
    torch.cuda.synchronize()
    t = time.time()
    o = run(ws)
    torch.cuda.synchronize()
    from salad_pack.kernels import _triton_ops as ops
    return dict(status="ok", first_call_s=round(time.time() - t, 1), ws_ran=ops.ws_usable(),
                max_diff=float((o.float() - ref.float()).abs().max()),
                table_ms=do_bench(run, rep=100), ws_ms=do_bench(lambda: run(ws), rep=100))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout-s", type=float, default=40.0)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)     # (the child)
    a = ap.parse_args()
    if a.case:
        print("RESULT " + json.dumps(child(a.case)), flush=True)
        return
    rows = []
    for name in CASES:
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                               timeout=a.timeout_s)
            got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(got[-1][7:]) if got else dict(status="error", tail=(p.stderr or p.stdout)[-400:])
        except subprocess.TimeoutExpired:
            row = dict(status="stalled", limit_s=a.timeout_s)
        row.update(case=name, shape=dict(zip(("H", "L", "D", "block", "BLOCK_N", "sparsity"), CASES[name])),
                   wall_s=round(time.time() - t, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
