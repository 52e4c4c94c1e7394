"""Rebuild bench_e2e rows from its log (for a run cut by its timeout before it wrote JSON) and merge runs.

    python benchmarks/e2e_from_log.py --log A.log [--json B.json ...] --card "NVIDIA H200" --out latest-e2e.json

Rows come from the log's "[e2e] <card> <model> WxHxF (grid ...) batch N: dense X ms" and
"SALAD <pattern> <sparsity> [<precision>]: Y ms" lines, layers from its "layer:" lines; a cut-off size keeps the
rows it printed.  --json adds the rows and layers of finished runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from pathlib import Path

HEAD = re.compile(r"\[e2e\] .*? (?P<model>1\.3b|14b) (?P<w>\d+)x(?P<h>\d+)x(?P<f>\d+) \(grid \((?P<g>[\d, ]+)\)\) "
                  r"batch (?P<b>\d+): dense (?P<dense>[\d.]+) ms")
RUN = re.compile(r"\[e2e\]\s+SALAD (?P<pattern>\w+) (?P<s>[\d.]+)(?: (?P<prec>bf16|fp8))?: (?P<ms>[\d.]+) ms")


def rows_from_log(text: str):
    rows, layers, cur = [], [], None
    for line in text.splitlines():
        if m := HEAD.search(line):
            cur = m.groupdict()
        elif (m := RUN.search(line)) and cur:
            g = [int(x) for x in cur["g"].split(",")]
            dense, ms = float(cur["dense"]), float(m["ms"])
            rows.append(dict(model=cur["model"], height=int(cur["h"]), width=int(cur["w"]), frames=int(cur["f"]),
                             batch=int(cur["b"]), tokens=g[0] * g[1] * g[2], sparsity=float(m["s"]),
                             pattern=m["pattern"], precision=m["prec"] or "bf16", dense_ms=dense, ms=ms,
                             speedup=dense / ms))
        elif "layer: " in line and cur:
            lay = json.loads(line.split("layer: ", 1)[1])
            layers.append(lay)
    return rows, layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", action="append", default=[])
    ap.add_argument("--json", action="append", default=[])
    ap.add_argument("--card", required=True)
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows, layers = [], []
    for p in a.log:
        r, l_ = rows_from_log(Path(p).read_text())
        rows += r
        layers += l_
    for p in a.json:
        d = json.loads(Path(p).read_text())
        rows += d["rows"]
        layers += d.get("layers", [])
    Path(a.out).write_text(json.dumps(dict(card=a.card, date=a.date, rows=rows, layers=layers), indent=1))
    print(f"{len(rows)} rows, {len(layers)} layers -> {a.out}")


if __name__ == "__main__":
    main()
