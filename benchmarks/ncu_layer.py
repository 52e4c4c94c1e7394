"""Hardware counters of one SALAD inference call (issue 9: what bounds each kernel), for Nsight Compute.

    ncu --profile-from-start off --clock-control none --set detailed -o REPORT \
        python3 benchmarks/ncu_layer.py --shapes 1.3b-480p --precisions bf16,fp8
    python3 benchmarks/ncu_layer.py --summarize REPORT.csv --out FILE.json   (ncu --page raw --csv export)

The script warms every kernel up (Triton compiles, autotune caches fill) outside the profiled range, then runs
one ``salad_self_attention`` call per (shape, precision) with gate + Proj between ``cudaProfilerStart`` and
``cudaProfilerStop``, so ncu sees exactly the kernels of those calls.  ``--summarize`` reduces ncu's raw CSV to
the numbers the kernels README quotes per kernel: duration, tensor-pipe / FMA / MUFU (XU) / ALU utilisation,
L2 and DRAM throughput, achieved occupancy, registers, and the top warp-stall reasons (share of PC samples).

CPU: ``--smoke`` runs the call once with the torch backend and no profiler range (checks the script).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# raw-page metric name -> short name (absent ones are skipped: names differ between ncu versions)
METRICS = {
    "gpu__time_duration.sum": "ms",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor_gmma_pct",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor_hmma_pct",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active": "fma_pct",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active": "fma_cycles_pct",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": "xu_pct",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active": "alu_pct",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active": "lsu_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem_throughput_pct",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed": "l2_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__occupancy_limit_registers": "ctas_per_sm_by_regs",
    "launch__occupancy_limit_shared_mem": "ctas_per_sm_by_smem",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum": "smem_bank_conflicts",
}
STALL_PREFIX = "smsp__pcsamp_warps_issue_stalled_"      # PC-sampling counts (the detailed set's source view)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1.3b-480p", help="MODEL-GRID names (profile_layer.py), comma separated")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--summarize", default=None, help="ncu --page raw --csv export to reduce")
    ap.add_argument("--out", default=None, help="JSON for --summarize")
    ap.add_argument("--smoke", action="store_true")
    return ap.parse_args(argv)


def _num(s: str):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def summarize(path: str) -> list:
    """ncu's raw CSV (one row per kernel launch; first data row holds the units) -> one dict per kernel."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # ncu may print ==PROF== lines before the header
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    head, units, data = rows[start], rows[start + 1], rows[start + 2:]
    col = {name: i for i, name in enumerate(head)}
    out = []
    for r in data:
        if len(r) != len(head):
            continue
        k = {"kernel": r[col["Kernel Name"]][:80], "grid": r[col.get("Grid Size", 0)],
             "block": r[col.get("Block Size", 0)]}
        for raw, short in METRICS.items():
            if raw in col and _num(r[col[raw]]) is not None:
                v = _num(r[col[raw]])
                if raw == "gpu__time_duration.sum":     # -> ms
                    v *= {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "s": 1e3,
                          "second": 1e3}.get(units[col[raw]], 1.0)
                k[short] = v
        stalls = {}
        for name, i in col.items():
            # "selected" is a warp issuing, not a stall
            if name.startswith(STALL_PREFIX) and not name.endswith(("_not_issued", "_selected")):
                v = _num(r[i])
                if v:
                    stalls[name[len(STALL_PREFIX):]] = v
        total = sum(stalls.values()) or 1.0
        k["stalls_top"] = {s: round(v / total, 3) for s, v in sorted(stalls.items(), key=lambda t: -t[1])[:6]}
        out.append(k)
    return out


def main(argv=None):
    a = parse(argv)
    if a.summarize:
        res = summarize(a.summarize)
        for k in res:
            print(json.dumps(k))
        if a.out:
            Path(a.out).write_text(json.dumps({"kernels": res}, indent=1))
        return res
    from _pack import register
    register()
    import torch
    from profile_layer import make_inputs, shape, MODELS
    from salad_pack.salad_core import attention as A
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    calls = []
    for name in a.shapes.split(","):
        H, grid = shape(name) if not a.smoke else (2, (3, 10, 12))
        D = MODELS[name.split("-")[0]][1] if not a.smoke else 32
        q, k, v, x, proj, gate = make_inputs(H, D, grid, 1, dev, dtype)
        for prec in a.precisions.split(","):
            conf = A.SaladConfig(sparsity=a.sparsity, pattern="topk", precision=prec,
                                 backend="auto" if dev.type == "cuda" else "torch")
            calls.append((name, prec, lambda q=q, k=k, v=v, x=x, proj=proj, gate=gate, H=H, grid=grid, conf=conf:
                          A.salad_self_attention(q, k, v, H, grid=grid, x=x, proj=proj, gate=gate, config=conf)))
    with torch.inference_mode():
        for _, _, fn in calls:          # compile + warm up outside the profiled range
            fn()
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        for name, prec, fn in calls:
            print(f"[ncu] profiled call: {name} {prec}", flush=True)
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        if dev.type == "cuda":
            torch.cuda.cudart().cudaProfilerStop()
    print("[ncu] done", flush=True)


if __name__ == "__main__":
    main()
