"""Demo: run "workflows/SALAD vs dense on the CPU testbed model.json" headless in a real ComfyUI (CPU is enough).

The model is our testbed Wan 2.1 (testbed/models/salad_testbed_wan21.safetensors, ComfyUI's own
WanModel trained on procedural videos) with its calibrated SALAD weights; both are linked into the
demo's ComfyUI models folders.  The workflow samples one caption twice with the same seed, SALAD at 90%
sparsity and dense attention, and writes both as animated WebP videos (64 frames, 128x128).
Prints where the outputs went.  --workflow PATH runs another UI-format workflow, e.g.
workflows/dev/salad_demo_tiny_wan.json (a tiny random-weight Wan built by tests/make_fixtures.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "testbed" / "models"
sys.path.insert(0, str(ROOT / "tests"))

from comfy_harness import ComfyServer, execution_error, make_fixtures, output_files, status_str  # noqa: E402
from workflow_convert import ui_to_api  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workflow", default=str(ROOT / "workflows" / "SALAD vs dense on the CPU testbed model.json"))
    ap.add_argument("--out", default=str(ROOT / "demo_output"), help="ComfyUI base directory for the demo")
    a = ap.parse_args(argv)

    base = Path(a.out).resolve()
    base.mkdir(parents=True, exist_ok=True)
    server = ComfyServer(base_dir=base)
    made = make_fixtures(server.comfyui, server.diffusion_dir, ["wan21_t2v_tiny"])
    for src, folder in ((TESTBED / "salad_testbed_wan21.safetensors", server.diffusion_dir),
                        (TESTBED / "salad_testbed_wan21_topk90.safetensors", server.salad_dir)):
        dst = folder / src.name
        if not dst.exists():
            dst.symlink_to(src)
    print(f"[demo] ComfyUI: {server.comfyui}")
    print(f"[demo] models:  {TESTBED} (testbed), {made[0].parent} (tiny random Wan)")
    t0 = time.time()
    with server:
        ui = json.loads(Path(a.workflow).read_text())
        prompt = ui_to_api(ui, server.get("/object_info"))
        entry = server.run(prompt, timeout=600)
        if status_str(entry) != "success":
            print(f"[demo] FAILED: {json.dumps(execution_error(entry), indent=1)[:3000]}", file=sys.stderr)
            return 1
        salad_lines = [l for l in server.log().splitlines() if "SALAD" in l]
    print(f"[demo] workflow {Path(a.workflow).name} ran in {time.time() - t0:.1f} s (server start included)")
    for line in salad_lines:
        print("[demo] log:", line.strip())
    for f in output_files(entry):
        print(f"[demo] output: {server.output / f.get('subfolder', '') / f['filename']}")
    print(f"[demo] server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
