"""Host (Python) time of one SALAD inference call, measured WITHOUT a GPU.

    python benchmarks/host_overhead.py --out DIR [--calls 300] [--profile]

Short clips are host-bound: at 17 frames of Wan-1.3B 480p a SALAD layer queues about 1 ms of host work
for a few hundred microseconds of GPU work (``profile_layer.py``'s ``host_us``), so the forward gains only
1.17x.  This script measures the part of that host time that is ours and Triton's Python, on a machine
without a GPU: the kernels are compiled for sm_90 by Triton's own compiler through the stand-in driver
of ``kernel_codegen.py`` and every launch stops after Triton's argument binding and cache lookup
(``warmup=True``), so the driver's launch call itself (a few microseconds each on the GPU machine) is the
only part of a launch left out.  The tensors are tiny CPU tensors (B1, one head of 64, a 2x8x16 grid), so
the torch operations between the kernels cost about what their dispatch costs on the GPU.

Reported per inference call (gate + full Proj, 90% top-k, bf16): wall microseconds (median of --repeats
rounds of --calls calls), the number of Triton launches and of torch operator calls, the same for a bare
Triton launch of a one-line kernel (what any launch costs here), and with --profile the functions where
the time goes (cProfile, by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--smoke", action="store_true", help="5 calls, one round (CI: the script still runs)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.calls, a.repeats = 5, 1
    return a


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    a = parse(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    import triton.language as tl
    from kernel_codegen import _install_driver
    from _pack import register
    register()
    compiled = _install_driver(a.arch)
    import salad_pack.kernels as K
    from salad_pack.salad_core import attention as A
    # the stand-in driver compiles for the GPU but the tensors live on the CPU: let the Triton path run there
    K._use_triton = lambda t, backend: backend != "torch"

    @triton.jit
    def _one(X):
        tl.store(X, 1.0)

    # the kernels never run, so their outputs hold whatever memory held: denormals there would make the CPU's
    # torch operations between the launches (sums, the Proj GEMM) take microcode assists, which the GPU never does
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)       # no OpenMP fork/join around the tiny CPU operations (on the GPU: launches)
    torch.manual_seed(0)
    H, D, grid = 1, 64, (2, 8, 16)
    L = grid[0] * grid[1] * grid[2]
    dt = torch.bfloat16
    q, k, v, x = (torch.randn(1, L, H * D, dtype=dt) for _ in range(4))
    proj = torch.nn.Linear(H * D, H * D).to(dt)
    gate = torch.nn.Linear(H * D, 1).to(dt)
    conf = A.SaladConfig(sparsity=0.9, pattern="topk", backend="triton")
    buf = torch.zeros(1)

    def call():
        return A.salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=conf)

    def bare():
        _one[(1,)](buf)

    res = {"what": "host time of one SALAD inference call without a GPU (compile-only launches)",
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "triton": triton.__version__, "torch": torch.__version__,
           "cpu": _cpu_model(), "cpus": os.cpu_count(), "shape": {"B": 1, "H": H, "D": D, "grid": grid, "L": L}}
    with torch.inference_mode():
        t0 = time.perf_counter()
        call()
        bare()
        res["first_call_s"] = time.perf_counter() - t0           # compiles every kernel once
        for name, fn in (("salad_call", call), ("bare_launch", bare)):
            n0 = len(compiled)
            fn()
            launches = len(compiled) - n0
            rounds = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                for _ in range(a.calls):
                    fn()
                rounds.append((time.perf_counter() - t) / a.calls * 1e6)
            n_prof = 20
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(n_prof):
                    fn()
            top = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
            ops = len(top) // n_prof
            # time inside top-level torch operators (dispatch and the tiny CPU compute) per call
            ops_us = sum(e.cpu_time_total for e in top) / n_prof
            med = statistics.median(rounds)
            res[name] = {"us_median": med, "us_rounds": rounds, "triton_launches": launches,
                         "torch_ops_top_level": ops, "torch_ops_us": ops_us, "python_us": med - ops_us}
            print(f"[host] {name}: {med:.1f} us per call (rounds {', '.join(f'{r:.1f}' for r in rounds)}), "
                  f"{launches} Triton launches, {ops} top-level torch operator calls taking {ops_us:.1f} us (under "
                  f"the profiler), so about {med - ops_us:.1f} us of Python (ours and Triton's launch path)",
                  flush=True)
            del compiled[n0:]
        if a.profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.calls):
                call()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
            s2 = io.StringIO()
            pstats.Stats(pr, stream=s2).sort_stats("cumulative").print_stats(45)
            res["profile_cumulative"] = s2.getvalue()
            print(s2.getvalue(), flush=True)
            res["profile_tottime"] = s.getvalue()
            print(s.getvalue(), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"host-overhead-{time.strftime('%Y-%m-%d')}-cpu.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"[host] wrote {path}")
    return res


if __name__ == "__main__":
    main()
