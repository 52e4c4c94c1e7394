"""Every GPU benchmark's CPU ``--smoke`` mode runs (tiny shapes, torch backend or the Triton interpreter), so a
script that rots is caught here, not in a GPU call the device budget pays for.  Each run writes its JSON where
``--out`` says and nothing into benchmarks/results/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# script, extra arguments, a JSON glob its --out folder must hold afterwards (None: the script takes no --out dir)
CASES = [
    ("sweep_fwd.py", [], "sweep-fwd-*-cpu.json"),
    ("profile_layer.py", [], "profile-layer-*-cpu.json"),
    ("sweep_passes.py", [], "sweep-passes-*-cpu.json"),
    ("bench_e2e.py", [], "e2e-*-smoke-cpu.json"),
    ("bench_finetune.py", [], "finetune-*.json"),
    ("bench_kernels.py", ["--quick"], None),
    ("bench_fp8.py", [], None),
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
