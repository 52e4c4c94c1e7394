"""Procedural caption -> video data for the SALAD testbed (deterministic by seed, batched pure torch).

A clip is 1-3 coloured objects on a dark, lightly textured background.  Coordinates are
normalised: x, y in [0, 1) with y pointing down (image rows); the frame is a torus, so an object
that leaves one edge re-enters at the opposite one.  Time t = frame / frames in [0, 1), so the
same spec rendered with fewer frames shows the same motion sampled more coarsely.

Vocabulary (the caption grammar; ``testbed/text.py`` and ``testbed/detect.py`` use these lists):
  colours  red green blue yellow cyan magenta white          (PALETTE, saturated, distinct)
  shapes   square circle triangle
  motions  moves left | moves right | moves up | moves down | bounces | stays | circles
  extras   "spinning" (square/triangle rotate one turn per clip), "then turns <colour>"
           (the colour changes once, at t = 0.5), camera pan left/right (background only)

Caption: one clause per object, back to front (later objects occlude earlier ones), then the
camera clause, joined by ", ", e.g.
  "a red square moves left, a spinning blue triangle bounces then turns green, the camera pans right"

Motion sizes (object radius r in [0.12, 0.20] of the frame width, so widths 0.24-0.40):
  moves <dir>: straight line, 0.5-1.0 frame widths per clip (~0.4-1 object widths per 16 frames
               of a 64-frame clip), wrapping around the edge;
  bounces:     vertical |sin| hops (2 or 3 per clip) of height 0.22-0.32 above a floor;
  circles:     one revolution per clip on a circle of radius 0.14-0.20 (either direction);
  stays:       fixed.
  Camera pans shift only the background, by 0.3-0.6 frame widths per clip ("pans right" = the
  background content moves left); objects are described and drawn in screen coordinates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "white": (0.95, 0.95, 0.95),
}
COLOURS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("left", "right", "up", "down", "bounces", "stays", "circles")
PANS = ("left", "right")
BACKGROUNDS = ("stripes", "checker", "gradient")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
CHANGE_T = 0.5          # time of the "then turns <colour>" change
SQUARE_HALF = 0.85      # square half-side as a fraction of r (so its area ~ the circle's)
TRIANGLE_SCALE = 1.15   # equilateral triangle circumradius as a fraction of r
MAX_OBJECTS = 3


@dataclass
class ObjectSpec:
    shape: str
    colour: str
    motion: str            # one of MOTIONS
    x0: float              # start position (for bounces: x and the floor y; circles: the centre)
    y0: float
    radius: float
    speed: float = 0.0     # frame widths per clip (moves <dir>)
    amp: float = 0.0       # bounce height / circle radius
    hops: int = 0          # bounces per clip
    phase: float = 0.0     # circles: start angle
    turn: float = 0.0      # circles: +1 / -1 (revolutions per clip)
    spin: float = 0.0      # rotation, revolutions per clip (signed); "spinning" when non-zero
    colour_to: str | None = None

    @property
    def spinning(self) -> bool:
        return self.spin != 0.0

    @property
    def clause(self) -> str:
        verb = f"moves {self.motion}" if self.motion in DIRECTIONS else self.motion
        spin = "spinning " if self.spinning else ""
        then = f" then turns {self.colour_to}" if self.colour_to else ""
        return f"a {spin}{self.colour} {self.shape} {verb}{then}"

    def colour_at(self, t: float) -> str:
        return self.colour_to if (self.colour_to and t >= CHANGE_T) else self.colour

    def area(self) -> float:
        """Shape area in frame units (fraction of the frame)."""
        r = self.radius
        if self.shape == "circle":
            return math.pi * r * r
        if self.shape == "square":
            return (2 * SQUARE_HALF * r) ** 2
        R = TRIANGLE_SCALE * r
        return 3 * math.sqrt(3) / 4 * R * R

    def path(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) at times t (not wrapped into [0, 1))."""
        t = np.asarray(t, dtype=np.float64)
        if self.motion in DIRECTIONS:
            dx, dy = DIRECTIONS[self.motion]
            return self.x0 + dx * self.speed * t, self.y0 + dy * self.speed * t
        if self.motion == "bounces":
            return np.full_like(t, self.x0), self.y0 - self.amp * np.abs(np.sin(math.pi * self.hops * t))
        if self.motion == "circles":
            a = self.phase + 2 * math.pi * self.turn * t
            return self.x0 + self.amp * np.cos(a), self.y0 + self.amp * np.sin(a)
        return np.full_like(t, self.x0), np.full_like(t, self.y0)


@dataclass
class ClipSpec:
    objects: list[ObjectSpec]
    pan: str | None = None
    pan_speed: float = 0.0
    background: str = "stripes"
    bg_colour: tuple[float, float, float] = (0.1, 0.1, 0.1)
    bg_angle: float = 0.0
    bg_freq: float = 6.0
    extra: dict = field(default_factory=dict)

    @property
    def caption(self) -> str:
        parts = [o.clause for o in self.objects]
        if self.pan:
            parts.append(f"the camera pans {self.pan}")
        return ", ".join(parts)


def sample_spec(rng: np.random.Generator) -> ClipSpec:
    """One random clip spec (distinct colours within a clip, colour changes included)."""
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    cols = [str(c) for c in rng.permutation(COLOURS)]
    objs = []
    for i in range(n):
        shape = str(rng.choice(SHAPES))
        motion = str(rng.choice(MOTIONS))
        r = float(rng.uniform(0.12, 0.20))
        o = ObjectSpec(shape=shape, colour=cols[i], motion=motion, x0=float(rng.uniform()),
                       y0=float(rng.uniform(r, 1 - r)), radius=r)
        if motion == "stays":
            o.x0 = float(rng.uniform(r, 1 - r))
        elif motion in DIRECTIONS:
            o.speed = float(rng.uniform(0.5, 1.0))
        elif motion == "bounces":
            o.x0 = float(rng.uniform(r, 1 - r))
            o.y0 = 1.0 - r - 0.03
            o.amp = float(rng.uniform(0.22, 0.32))
            o.hops = int(rng.integers(2, 4))
        elif motion == "circles":
            o.amp = float(rng.uniform(0.14, 0.20))
            o.x0, o.y0 = (float(v) for v in rng.uniform(r + o.amp, 1 - r - o.amp, size=2))
            o.phase = float(rng.uniform(0, 2 * math.pi))
            o.turn = float(rng.choice([-1.0, 1.0]))
        if shape != "circle" and rng.uniform() < 0.25:
            o.spin = float(rng.choice([-1.0, 1.0]))
        if rng.uniform() < 0.2:
            o.colour_to = cols[MAX_OBJECTS + i]   # never a colour another object of the clip uses
        objs.append(o)
    spec = ClipSpec(objects=objs)
    if rng.uniform() < 0.5:
        spec.pan = str(rng.choice(PANS))
        spec.pan_speed = float(rng.uniform(0.3, 0.6))
    spec.background = str(rng.choice(BACKGROUNDS))
    hue = rng.uniform(0.04, 0.16, size=3)
    spec.bg_colour = tuple(float(v) for v in hue)
    spec.bg_angle = float(rng.uniform(0, math.pi))
    spec.bg_freq = float(rng.choice([3.0, 4.0, 5.0, 6.0]))
    return spec


def sample_specs(seed: int, n: int) -> list[ClipSpec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(n)]


def _params(specs: list[ClipSpec], frames: int):
    """Per-object arrays: centre (B, K, F) x2, angle (B, K, F), colour (B, K, F, 3), shape (B, K), active (B, K)."""
    B, K = len(specs), MAX_OBJECTS
    t = np.arange(frames) / frames
    cx, cy, ang = np.zeros((B, K, frames)), np.zeros((B, K, frames)), np.zeros((B, K, frames))
    col = np.zeros((B, K, frames, 3))
    shape = np.zeros((B, K), dtype=np.int64)
    rad = np.ones((B, K)) * 0.1
    active = np.zeros((B, K), dtype=bool)
    pan = np.zeros((B, frames))
    bg = np.zeros((B, 6))
    for b, s in enumerate(specs):
        for k, o in enumerate(s.objects[:K]):
            cx[b, k], cy[b, k] = o.path(t)
            ang[b, k] = 2 * math.pi * o.spin * t
            col[b, k] = PALETTE[o.colour]
            if o.colour_to:
                col[b, k, t >= CHANGE_T] = PALETTE[o.colour_to]
            shape[b, k] = SHAPES.index(o.shape)
            rad[b, k] = o.radius
            active[b, k] = True
        if s.pan:
            pan[b] = (1.0 if s.pan == "right" else -1.0) * s.pan_speed * t
        bg[b] = (*s.bg_colour, s.bg_angle, s.bg_freq, BACKGROUNDS.index(s.background))
    return cx, cy, ang, col, shape, rad, active, pan, bg


def _sdf(shape_id: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (frame units) of points (px, py) relative to the centre; all (B, F, H, W)."""
    circle = torch.sqrt(px * px + py * py) - r
    h = SQUARE_HALF * r
    qx, qy = px.abs() - h, py.abs() - h
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    # equilateral triangle, apex up (y down in the image): Inigo Quilez's exact sdf, circumradius R
    R = TRIANGLE_SCALE * r
    k = math.sqrt(3.0)
    a = R * k / 2                      # half side
    tx, ty = px.abs() - a, a / k - py  # flip y so the apex points up in image rows
    c = tx + k * ty > 0
    tx, ty = torch.where(c, (tx - k * ty) / 2, tx), torch.where(c, (-k * tx - ty) / 2, ty)
    tx = tx - torch.maximum(tx, -2 * a).clamp(max=0)
    tri = -torch.sqrt(tx * tx + ty * ty) * torch.sign(ty)
    return torch.where(shape_id == 0, square, torch.where(shape_id == 1, circle, tri))


def _grid(size: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
    return g.view(1, 1, size, 1), g.view(1, 1, 1, size)               # ys (1, 1, H, 1), xs (1, 1, 1, W)


def _object_alphas(p, size: int, edge_px: float):
    """Yield (k, alpha (B, F, H, W)) coverage of object slot k (before occlusion), back to front."""
    cx, cy, ang, col, shape, rad, active, pan, bg = p
    B = cx.shape[0]
    ys, xs = _grid(size, cx.device)
    aa = edge_px / size
    for k in range(MAX_OBJECTS):
        if not bool(active[:, k].any()):
            continue
        # torus offsets to the centre, then rotate into the object frame
        dx = torch.remainder(xs - cx[:, k, :, None, None] + 0.5, 1.0) - 0.5
        dy = torch.remainder(ys - cy[:, k, :, None, None] + 0.5, 1.0) - 0.5
        ca, sa = torch.cos(ang[:, k, :, None, None]), torch.sin(ang[:, k, :, None, None])
        px, py = ca * dx + sa * dy, -sa * dx + ca * dy
        d = _sdf(shape[:, k].view(B, 1, 1, 1), px, py, rad[:, k].view(B, 1, 1, 1))
        yield k, (0.5 - d / aa).clamp(0, 1) * active[:, k].view(B, 1, 1, 1)


def _tensors(specs: list[ClipSpec], frames: int, device):
    dev = torch.device(device)
    p = [torch.as_tensor(a, device=dev) for a in _params(specs, frames)]
    return [a.to(torch.float32) if a.dtype == torch.float64 else a for a in p]


def render(specs: list[ClipSpec], frames: int = 64, size: int = 128, device="cpu",
           edge_px: float = 1.5) -> torch.Tensor:
    """Render clips -> (B, F, H, W, 3) float32 in [0, 1] (H = W = size), batched pure torch.

    ``edge_px``: anti-aliasing ramp width of object edges in pixels.
    """
    p = _tensors(specs, frames, device)
    col, pan, bg = p[3], p[7], p[8]
    B = len(specs)
    ys, xs = _grid(size, col.device)
    # background: dark base colour times (1 + 0.35 * periodic pattern), pattern shifted by the pan
    u = xs + pan.view(B, frames, 1, 1)
    th, fr = bg[:, 3].view(B, 1, 1, 1), bg[:, 4].view(B, 1, 1, 1)
    kind = bg[:, 5].view(B, 1, 1, 1)
    w = 2 * math.pi * fr * (u * torch.cos(th) + ys * torch.sin(th))
    stripes = torch.sin(w)
    checker = torch.tanh(3 * torch.sin(2 * math.pi * fr * u) * torch.sin(2 * math.pi * fr * ys))
    gradient = torch.sin(2 * math.pi * (u * torch.cos(th) + ys * torch.sin(th)))
    pattern = torch.where(kind == 0, stripes, torch.where(kind == 1, checker, gradient))
    img = bg[:, None, None, None, :3] * (1 + 0.35 * pattern).unsqueeze(-1)     # (B, F, H, W, 3)
    for k, alpha in _object_alphas(p, size, edge_px):
        img = img + alpha.unsqueeze(-1) * (col[:, k, :, None, None, :] - img)
    return img.clamp(0, 1).contiguous()


def visible_area(specs: list[ClipSpec], frames: int, size: int = 64, device="cpu") -> torch.Tensor:
    """(B, MAX_OBJECTS, F) area of each object left visible by the objects in front (frame fractions)."""
    p = _tensors(specs, frames, device)
    alphas = dict(_object_alphas(p, size, 1.0))
    out = torch.zeros(len(specs), MAX_OBJECTS, frames, device=p[0].device)
    for k, a in alphas.items():
        for j in range(k + 1, MAX_OBJECTS):
            if j in alphas:
                a = a * (1 - alphas[j])
        out[:, k] = a.mean((2, 3))
    return out
