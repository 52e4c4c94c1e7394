"""PSNR vs speed-up plot of a quality sweep (``bench_quality.py --sweep`` -> sweep.json), PIL only.

One curve per method (method / pattern / compensation / dense first+last): every measured point as a
marker, the curve's Pareto front (highest PSNR at that speed-up or more) as a line, front points
labelled ``sparsity%/start_percent``.  x: the estimated end-to-end speed-up at Wan2.1-1.3B 480p
(``e2e_speedup_est``; without a speed table, 1 / kept share as a stand-in, said on the axis).

  python benchmarks/plot_quality.py sweep.json [out.png]
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

W, H = 1100, 700
LEFT, RIGHT, TOP, BOTTOM = 80, 330, 50, 70
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (23, 190, 207), (127, 127, 127), (188, 189, 34)]


def curve_label(r: dict) -> str:
    m = r["method"]
    if m.startswith("sol_attn"):
        return "sol_attn (core, node defaults)" if m == "sol_attn_default" else "sol_attn (core, matched density)"
    name = "SALAD + weights" if r.get("weights") else "sparse (no weights)"
    parts = [name, r.get("pattern", "topk")]
    if r.get("compensation", "none") != "none":
        parts.append(r["compensation"])
    if r.get("dense_blocks"):
        parts.append("dense first/last")
    return " ".join(parts)


def _x(r: dict, have_speed: bool):
    if have_speed:
        return r.get("e2e_speedup_est")
    share = r.get("kept_share")
    return 1.0 / share if share else None


def _nice_ticks(lo: float, hi: float, n: int = 6):
    span = max(hi - lo, 1e-9)
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    t = math.floor(lo / step) * step
    ticks = []
    while t <= hi + 1e-9:
        if t >= lo - 1e-9:
            ticks.append(round(t, 10))
        t += step
    return ticks


def pareto(points):
    """Points (x, y, ...) on the front: no other point has x' >= x and y' > y."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (-p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return sorted(front)


def plot_sweep(res: dict, path) -> Path:
    from PIL import Image, ImageDraw, ImageFont
    rows = [r for r in res["rows"] if r.get("psnr") is not None and (r.get("sparsity") or 0) != 0.0
            or r.get("method") == "sol_attn_default"]
    have_speed = any(r.get("e2e_speedup_est") for r in rows)
    rows = [r for r in rows if r.get("psnr") is not None and _x(r, have_speed)]
    if not rows:
        raise ValueError("plot_quality: no rows with PSNR and speed-up")
    curves = {}
    for r in rows:
        curves.setdefault(curve_label(r), []).append((_x(r, have_speed), r["psnr"], r))
    xs = [p[0] for c in curves.values() for p in c]
    ys = [p[1] for c in curves.values() for p in c]
    x0, x1 = min(1.0, min(xs)), max(max(xs), 1.0)
    x0, x1 = x0 - 0.04 * (x1 - x0 + 0.1), x1 + 0.06 * (x1 - x0 + 0.1)
    y0, y1 = math.floor(min(ys) - 0.5), math.ceil(max(ys) + 0.5)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
        small = ImageFont.load_default(size=10)
    except TypeError:                      # Pillow < 10.1: one fixed-size bitmap font
        font = small = ImageFont.load_default()
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x, y):
        return LEFT + (x - x0) / (x1 - x0) * pw, TOP + (1 - (y - y0) / (y1 - y0)) * ph

    d.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline=(0, 0, 0))
    if have_speed:                                        # dense speed: x = 1
        X, _ = px(1.0, y0)
        d.line([X, TOP, X, TOP + ph], fill=(160, 160, 160), width=1)
        d.text((X + 3, TOP + 3), "dense", fill=(120, 120, 120), font=font)
    for t in _nice_ticks(x0, x1):
        X, _ = px(t, y0)
        d.line([X, TOP, X, TOP + ph], fill=(230, 230, 230))
        d.text((X - 10, TOP + ph + 6), f"{t:g}", fill=(0, 0, 0), font=font)
    for t in _nice_ticks(y0, y1):
        _, Y = px(x0, t)
        d.line([LEFT, Y, LEFT + pw, Y], fill=(230, 230, 230))
        d.text((LEFT - 40, Y - 7), f"{t:g}", fill=(0, 0, 0), font=font)
    xlabel = ("estimated end-to-end speed-up, Wan2.1-1.3B 480p (attention op timed on "
              f"{res.get('card', '?')}, attention share {res.get('attn_share', '?')})" if have_speed
              else "1 / kept key share (no speed table in this sweep)")
    d.text((LEFT, H - 30), xlabel, fill=(0, 0, 0), font=font)
    d.text((10, 10), f"PSNR vs dense (dB), testbed Wan, {res.get('pairs', '?')} pairs, {res.get('steps', '?')} "
                     f"steps; labels: sparsity % / start_percent", fill=(0, 0, 0), font=font)
    for i, (label, pts) in enumerate(sorted(curves.items())):
        col = PALETTE[i % len(PALETTE)]
        front = pareto(pts)
        if len(front) > 1:
            d.line([px(x, y) for x, y, _ in front], fill=col, width=2)
        for x, y, _ in pts:
            X, Y = px(x, y)
            k = i % 3
            if k == 0:
                d.ellipse([X - 4, Y - 4, X + 4, Y + 4], fill=col)
            elif k == 1:
                d.rectangle([X - 4, Y - 4, X + 4, Y + 4], fill=col)
            else:
                d.polygon([(X, Y - 5), (X - 5, Y + 4), (X + 5, Y + 4)], fill=col)
        for x, y, r in front:
            X, Y = px(x, y)
            s = r.get("sparsity")
            tag = f"{100 * s:.0f}/{r.get('start_percent', 0):g}" if s is not None else f"/{r.get('start_percent', 0):g}"
            d.text((X + 5, Y - 13), tag, fill=col, font=small)
        ly = TOP + 10 + 22 * i
        d.rectangle([W - RIGHT + 15, ly, W - RIGHT + 27, ly + 12], fill=col)
        d.text((W - RIGHT + 33, ly - 1), label, fill=(0, 0, 0), font=font)
    path = Path(path)
    img.save(path, optimize=True)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    p = plot_sweep(json.loads(src.read_text()), out)
    print(f"{p} ({p.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
