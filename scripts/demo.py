"""Developer demo: run workflows/dev/salad_demo_tiny_wan.json headless in a real ComfyUI.

The bundled default model is a tiny random-weight Wan 2.1 (built from a fixed seed by
tests/make_fixtures.py with ComfyUI's own WanModel class, so nothing is downloaded).  The workflow
goes UNETLoader -> Apply SALAD Attention (90% sparse) -> KSampler -> SaveLatent + a PNG preview.
Prints where the outputs went.  Options: --workflow PATH (another UI-format workflow), --keep-server.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from comfy_harness import ComfyServer, execution_error, make_fixtures, output_files, status_str  # noqa: E402
from workflow_convert import ui_to_api  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workflow", default=str(ROOT / "workflows" / "dev" / "salad_demo_tiny_wan.json"))
    ap.add_argument("--out", default=str(ROOT / "demo_output"), help="ComfyUI base directory for the demo")
    a = ap.parse_args(argv)

    base = Path(a.out).resolve()
    base.mkdir(parents=True, exist_ok=True)
    server = ComfyServer(base_dir=base)
    made = make_fixtures(server.comfyui, server.diffusion_dir, ["wan21_t2v_tiny"])
    print(f"[demo] ComfyUI: {server.comfyui}")
    print(f"[demo] model:   {made[0]}")
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
