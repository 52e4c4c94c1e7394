"""Every GPU benchmark's CPU ``--smoke`` mode runs (tiny shapes, torch backend or the Triton interpreter), so a
script that rots is caught here, not in a GPU call the device budget pays for.  Each run writes its JSON where
``--out`` says and nothing into benchmarks/results/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from triton_env import ptxas_bundled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# script, extra arguments, a JSON glob its --out folder must hold afterwards (None: the script takes no --out dir)
CASES = [
    ("sweep_fwd.py", [], "sweep-fwd-*-cpu.json"),
    ("profile_layer.py", [], "profile-layer-*-cpu.json"),
    ("sweep_passes.py", [], "sweep-passes-*-cpu.json"),
    ("bench_e2e.py", ["--fwd-configs", "table,Q_TILED=1+num_stages=1"], "e2e-*-smoke-cpu.json"),
    ("bench_finetune.py", [], "finetune-*.json"),
    ("bench_kernels.py", ["--quick"], None),
    ("bench_fp8.py", [], None),
    ("ncu_layer.py", ["--precisions", "bf16"], None),
]


def _results_listing():
    return sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*"))


@pytest.mark.parametrize("script,extra,produces", CASES, ids=[c[0] for c in CASES])
def test_benchmark_smoke(tmp_path, comfyui_dir, script, extra, produces):
    before = _results_listing()
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *extra]
    if produces is not None:
        cmd += ["--out", str(tmp_path)]
    env = dict(os.environ, COMFYUI_DIR=str(comfyui_dir), PYTHONUNBUFFERED="1")
    env.pop("OUT", None)                                   # bench_kernels would write its results there
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} --smoke failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    if produces is not None:
        assert list(tmp_path.glob(produces)), f"{script} --smoke wrote no {produces} in {tmp_path}: " \
                                              f"{sorted(p.name for p in tmp_path.iterdir())}"
    assert _results_listing() == before, f"{script} --smoke wrote into benchmarks/results/"


@pytest.mark.skipif(not ptxas_bundled(), reason="triton without its NVIDIA backend / ptxas")
def test_host_overhead_runs(tmp_path):
    """host_overhead.py compiles the inference call's kernels for sm90 (nothing launched) and times the host
    path; its JSON names the Triton launches and torch operator calls of one call."""
    import json
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--smoke", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(next(tmp_path.glob("host-overhead-*-cpu.json")).read_text())
    assert res["salad_call"]["triton_launches"] == 5 and res["salad_call"]["us_median"] > 0, res["salad_call"]


def test_ncu_summary_reduces_the_raw_page(tmp_path):
    """ncu_layer.py --summarize: ncu's raw CSV (header row, units row, one row per kernel; ==PROF== lines before)
    -> per kernel the duration in ms whatever ncu's unit, the pipe shares and the top stall reasons as shares of
    the stalled-warp PC samples (_not_issued counters and "selected", a warp issuing, are not stalls)."""
    import csv
    import json
    head = ["ID", "Kernel Name", "Grid Size", "Block Size", "gpu__time_duration.sum",
            "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
            "smsp__pcsamp_warps_issue_stalled_wait", "smsp__pcsamp_warps_issue_stalled_wait_not_issued",
            "smsp__pcsamp_warps_issue_stalled_barrier", "smsp__pcsamp_warps_issue_stalled_long_scoreboard",
            "smsp__pcsamp_warps_issue_stalled_selected"]
    units = ["", "", "", "", "us", "%", "", "", "", "", ""]
    rows = [["0", "_sparse_fwd_kernel", "(256, 12, 1)", "(128, 1, 1)", "1,307.5", "55.3", "30", "999", "10", "0", "50"],
            ["1", "nvjet_gemm", "(2, 66, 1)", "(384, 1, 1)", "2.03", "96.7", "0", "0", "0", "0", "0"]]
    raw = tmp_path / "raw.csv"
    with open(raw, "w", newline="") as f:
        f.write("==PROF== Connected to process\n")
        w = csv.writer(f)
        w.writerows([head, units] + rows)
    out = tmp_path / "sum.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ncu_layer.py"), "--summarize", str(raw),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ks = json.loads(out.read_text())["kernels"]
    assert [k["kernel"] for k in ks] == ["_sparse_fwd_kernel", "nvjet_gemm"]
    assert abs(ks[0]["ms"] - 1.3075) < 1e-9 and abs(ks[1]["ms"] - 0.00203) < 1e-12
    assert ks[0]["tensor_hmma_pct"] == 55.3
    assert ks[0]["stalls_top"] == {"wait": 0.75, "barrier": 0.25}
