"""Caption-adherence detector for testbed videos: does a (decoded) clip show what its spec says?

For each object of a ClipSpec (its colour per frame, so "then turns <colour>" is followed):
  1. every pixel gets the nearest PALETTE colour if it lies within TAU of it (RGB distance; robust
     to the codec's blur and to the dark background), else no colour;
  2. the object's mask in frame f = pixels of its colour.  The spec says how much of the object
     the objects in front leave visible (``data.visible_area``); frames where that is under
     AREA_LO of the whole shape are not judged.  In the others the object is present if its mask
     area is between AREA_LO and AREA_HI times the expected visible area; ``colour_ok`` = present
     in at least PRESENT_FRAC of the judged frames;
  3. centroid per present frame = circular mean on the torus (an object split across an edge
     still has the right centre); the trajectory is unwrapped (steps taken modulo 1 to the
     shortest way round), then summarised by the least-squares velocity (vx, vy) in frame widths
     per clip and the 5-95 % quantile ranges (range_x, range_y);
  4. ``motion_ok`` rules (normalised units, y down):
       moves left/right/up/down: velocity along the direction >= MIN_SPEED with the right sign,
                                 and the cross-axis speed below half of it
       stays:    both speeds < STILL_SPEED and both ranges < STILL_RANGE
       bounces:  range_y >= MIN_HOP, range_x < STILL_RANGE, |vy| < STILL_SPEED * 2
       circles:  fitting x and y each by a + v t + b cos(2 pi t) + c sin(2 pi t), both circular
                 amplitudes |(b, c)| >= MIN_LOOP / 2 and both |v| < STILL_SPEED * 2
Shape, spin and the camera pan are not checked.  A clip passes when every object passes.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .data import COLOURS, DIRECTIONS, MOTIONS, PALETTE, ClipSpec, render, sample_specs, visible_area

TAU = 0.30
AREA_LO, AREA_HI = 0.3, 2.5
PRESENT_FRAC = 0.8
MIN_SPEED = 0.25
STILL_SPEED, STILL_RANGE = 0.12, 0.10
MIN_HOP, MIN_LOOP = 0.12, 0.15


def classify(clip: torch.Tensor) -> torch.Tensor:
    """clip (F, H, W, 3) -> (F, H, W) int64 index into COLOURS, -1 where no palette colour is near."""
    pal = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32, device=clip.device)
    d = torch.cdist(clip.float().reshape(-1, 3), pal)              # (N, C)
    dmin, idx = d.min(1)
    return torch.where(dmin < TAU, idx, -1).reshape(clip.shape[:3])


def _track(mask: torch.Tensor):
    """mask (F, H, W) bool -> area fraction (F,), circular-mean centroid x, y (F,) in [0, 1)."""
    F, H, W = mask.shape
    m = mask.float()
    area = m.mean((1, 2))
    ang_x = 2 * math.pi * (torch.arange(W, device=m.device) + 0.5) / W
    ang_y = 2 * math.pi * (torch.arange(H, device=m.device) + 0.5) / H
    mx, my = m.sum(1), m.sum(2)                                    # (F, W), (F, H)
    cx = torch.atan2(mx @ torch.sin(ang_x), mx @ torch.cos(ang_x)) / (2 * math.pi) % 1.0
    cy = torch.atan2(my @ torch.sin(ang_y), my @ torch.cos(ang_y)) / (2 * math.pi) % 1.0
    return area.cpu().numpy(), cx.cpu().numpy(), cy.cpu().numpy()


def _unwrap(c: np.ndarray) -> np.ndarray:
    steps = (np.diff(c) + 0.5) % 1.0 - 0.5
    return np.concatenate([[0.0], np.cumsum(steps)])


def _fit(t: np.ndarray, x: np.ndarray, circular: bool) -> tuple[float, float]:
    """Least squares x ~ a + v t (+ b cos 2 pi t + c sin 2 pi t) -> (v, |(b, c)|)."""
    cols = [np.ones_like(t), t] + ([np.cos(2 * np.pi * t), np.sin(2 * np.pi * t)] if circular else [])
    coef = np.linalg.lstsq(np.stack(cols, 1), x, rcond=None)[0]
    return float(coef[1]), float(np.hypot(*coef[2:])) if circular else 0.0


def _motion_ok(motion: str, vx: float, vy: float, rx: float, ry: float) -> bool:
    if motion in DIRECTIONS:
        ux, uy = DIRECTIONS[motion]
        along, cross = vx * ux + vy * uy, abs(vx * uy) + abs(vy * ux)
        return along >= MIN_SPEED and cross < 0.5 * along
    if motion == "stays":
        return max(abs(vx), abs(vy)) < STILL_SPEED and max(rx, ry) < STILL_RANGE
    if motion == "bounces":
        return ry >= MIN_HOP and rx < STILL_RANGE and abs(vy) < 2 * STILL_SPEED
    if motion == "circles":   # here rx, ry are the circular amplitudes
        return min(rx, ry) >= MIN_LOOP / 2 and max(abs(vx), abs(vy)) < 2 * STILL_SPEED
    raise ValueError(f"unknown motion {motion!r}")


def adherence(video: torch.Tensor, specs: list[ClipSpec]) -> list[dict]:
    """video (B, F, H, W, 3) in [0, 1], specs (B) -> per clip {pass, colour_ok, motion_ok, objects: [...]}."""
    if video.shape[0] != len(specs):
        raise ValueError(f"{video.shape[0]} clips but {len(specs)} specs")
    F = video.shape[1]
    t = np.arange(F) / F
    visible = visible_area(specs, F, size=32, device=video.device).cpu().numpy()       # (B, K, F)
    results = []
    for b, (clip, spec) in enumerate(zip(video, specs)):
        cls = classify(clip)
        objs = []
        for k, o in enumerate(spec.objects):
            want = torch.tensor([COLOURS.index(o.colour_at(tt)) for tt in t], device=cls.device)
            area, cx, cy = _track(cls == want.view(F, 1, 1))
            exp = visible[b, k]
            judged = exp >= AREA_LO * o.area()
            present = judged & (area >= AREA_LO * exp) & (area <= AREA_HI * exp)
            frac = float(present.sum() / max(judged.sum(), 1))
            r = dict(colour=o.colour, colour_to=o.colour_to, shape=o.shape, motion=o.motion,
                     present=frac, colour_ok=frac >= PRESENT_FRAC, motion_ok=False,
                     vx=float("nan"), vy=float("nan"), range_x=float("nan"), range_y=float("nan"))
            if present.sum() >= 4:
                tp, circ = t[present], o.motion == "circles"
                x, y = _unwrap(cx[present]), _unwrap(cy[present])
                (vx, ax), (vy, ay) = _fit(tp, x, circ), _fit(tp, y, circ)
                rx, ry = (float(np.quantile(a, 0.95) - np.quantile(a, 0.05)) for a in (x, y))
                r.update(vx=vx, vy=vy, range_x=rx, range_y=ry, motion_ok=bool(r["colour_ok"]) and _motion_ok(
                    o.motion, vx, vy, *((ax, ay) if circ else (rx, ry))))
            objs.append(r)
        c_ok, m_ok = all(r["colour_ok"] for r in objs), all(r["motion_ok"] for r in objs)
        results.append({"pass": c_ok and m_ok, "colour_ok": c_ok, "motion_ok": m_ok, "objects": objs})
    return results


def adherence_rate(results: list[dict]) -> float:
    """Fraction of clips that pass."""
    return sum(r["pass"] for r in results) / max(len(results), 1)


def swap_motions(specs: list[ClipSpec]) -> list[ClipSpec]:
    """Copies with every object's motion word replaced by the next one in MOTIONS (a wrong caption)."""
    out = copy.deepcopy(specs)
    for s in out:
        for o in s.objects:
            o.motion = MOTIONS[(MOTIONS.index(o.motion) + 1) % len(MOTIONS)]
    return out


def self_check(seed: int = 7, n: int = 64, frames: int = 64, size: int = 128, device="cpu", batch: int = 16) -> dict:
    """Pass rates on n random specs: ground truth, after the codec round trip, and against wrong specs
    (the next clip's spec = a shuffled caption; every motion swapped)."""
    from .codec import load_codec
    codec = load_codec(device=device)
    specs = sample_specs(seed, n)
    video = torch.cat([render(specs[i:i + batch], frames, size, device=device) for i in range(0, n, batch)])
    coded = torch.cat([codec.decode(codec.encode(video[i:i + batch])) for i in range(0, n, batch)])
    return {"ground_truth": adherence_rate(adherence(video, specs)),
            "codec_round_trip": adherence_rate(adherence(coded, specs)),
            "shuffled_caption": adherence_rate(adherence(video, specs[1:] + specs[:1])),
            "swapped_motion": adherence_rate(adherence(video, swap_motions(specs)))}
