"""Token re-ordering for block-sparse attention on a video DiT's 3-D token grid.

Video DiTs (Wan, LTX-Video) flatten the patchified latent in raster order: frame-major, then row,
then column, over the token grid ``(F, Hh, Ww)`` (Wan: ``(T_latent, ceil(H_latent / 2),
ceil(W_latent / 2))``).  In raster order a
run of 128 consecutive tokens is a thin sliver of one or two rows, so a 128-token attention block
has a poor 3-D locality.  :class:`TileLayout` re-orders the tokens *tile by tile*: the grid is cut
into 3-D tiles of ``tile = (tf, th, tw)`` tokens, tiles are visited in raster order of the tile
grid, and inside a tile tokens keep their raster order.  With the default tile ``(2, 8, 8)``
(volume 128 == ``kernels.DEFAULT_BLOCK``) every interior tile is exactly one attention block.
Edge tiles are ragged (smaller) when a grid side is not a multiple of the tile side; ragged tiles
are simply concatenated, so blocks after the first ragged tile may straddle two tiles (they remain
spatially compact, their centroid is still meaningful).

Extra tokens: ``n_front`` tokens before the video tokens (e.g. a reference-image latent) and
``n_back`` tokens after them (e.g. context latents of newer ComfyUI versions) are not part of the
grid.  In the tile-ordered sequence they are placed *after* all video tokens (front extras first,
then back extras), so the video part starts at block 0 and blocks stay tile aligned.  Such tokens
have no grid position: :meth:`TileLayout.block_coords` gives a block made only of extra tokens the
grid *centre* as coordinate (so a query block of extras gets a window around the centre), and the
attention code marks every block that contains any extra token as an "always kept" key block
(:meth:`TileLayout.extra_blocks`), i.e. extra tokens act as attention sinks that every query sees.
"""
from __future__ import annotations

import functools
from typing import Dict, Sequence, Tuple

import torch

Tensor = torch.Tensor

DEFAULT_TILE: Tuple[int, int, int] = (2, 8, 8)
_CACHE_SIZE = 16


def _as_triple(name: str, value: Sequence[int]) -> Tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in value)
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of 3 ints, got {value!r}") from e
    if len(t) != 3:
        raise ValueError(f"{name} must have 3 entries (frames, rows, cols), got {value!r}")
    return t  # type: ignore[return-value]


def grid_from_latent_shape(t: int, h: int, w: int, patch: Sequence[int]) -> Tuple[int, int, int]:
    """Token grid of a latent of shape (..., t, h, w) cut into patches of ``patch`` = (pt, ph, pw) cells
    (ceil division).  The patch size belongs to the model family (nodes/families: Wan 1x2x2, LTX-Video
    1x1x1)."""
    pt, ph, pw = _as_triple("patch", patch)
    return (-(-int(t) // pt), -(-int(h) // ph), -(-int(w) // pw))


class TileLayout:
    """Tile ordering of one (grid, n_front, n_back, tile, device) combination.

    Use :meth:`TileLayout.get` (cached) rather than the constructor.

    Attributes:
        grid: (F, Hh, Ww) video token grid.
        n_front, n_back: number of extra tokens before / after the video tokens in the original order.
        tile: (tf, th, tw) tile size.
        L: total number of tokens, ``n_front + F*Hh*Ww + n_back``.
        n_video: ``F*Hh*Ww``.
        perm: LongTensor (L,), ``perm[i]`` = original (raster) index of the token at tile-ordered
            position i.  ``x_tiled = x.index_select(dim, perm)``.
        inv_perm: LongTensor (L,), inverse of ``perm``: ``x = x_tiled.index_select(dim, inv_perm)``.
    """

    def __init__(self, grid: Sequence[int], n_front: int = 0, n_back: int = 0,
                 tile: Sequence[int] = DEFAULT_TILE, device=None):
        F_, Hh, Ww = _as_triple("grid", grid)
        tf, th, tw = _as_triple("tile", tile)
        if min(F_, Hh, Ww) < 1:
            raise ValueError(f"grid must be positive, got {tuple(grid)}")
        if min(tf, th, tw) < 1:
            raise ValueError(f"tile must be positive, got {tuple(tile)}")
        n_front, n_back = int(n_front), int(n_back)
        if n_front < 0 or n_back < 0:
            raise ValueError(f"n_front/n_back must be >= 0, got {n_front}/{n_back}")
        self.grid = (F_, Hh, Ww)
        self.tile = (tf, th, tw)
        self.n_front = n_front
        self.n_back = n_back
        self.n_video = F_ * Hh * Ww
        self.L = n_front + self.n_video + n_back
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        # build on CPU (cheap, done once per key), then move
        f = torch.arange(F_).view(F_, 1, 1).expand(F_, Hh, Ww).reshape(-1)
        r = torch.arange(Hh).view(1, Hh, 1).expand(F_, Hh, Ww).reshape(-1)
        c = torch.arange(Ww).view(1, 1, Ww).expand(F_, Hh, Ww).reshape(-1)
        nth, ntw = -(-Hh // th), -(-Ww // tw)
        tile_id = ((f // tf) * nth + (r // th)) * ntw + (c // tw)
        # stable sort keeps raster order inside each tile
        order = torch.sort(tile_id, stable=True).indices
        perm = torch.cat([
            order + n_front,
            torch.arange(n_front),
            torch.arange(n_front + self.n_video, self.L),
        ]).to(torch.long)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(self.L)
        # coordinates of the tile-ordered video tokens, (n_video, 3) float64
        self._coords_video = torch.stack([f, r, c], dim=1)[order].double()
        self.perm = perm.to(self.device)
        self.inv_perm = inv.to(self.device)
        self.perm32 = self.perm.to(torch.int32)  # row map for the kernels (inference path)
        self._block_cache: Dict[int, Tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------------
    @classmethod
    def get(cls, grid: Sequence[int], n_front: int = 0, n_back: int = 0,
            tile: Sequence[int] = DEFAULT_TILE, device=None) -> "TileLayout":
        """Cached constructor (small LRU keyed by grid, extras, tile and device)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return _cached_layout(_as_triple("grid", grid), int(n_front), int(n_back), _as_triple("tile", tile),
                              str(dev))

    @classmethod
    def clear_cache(cls) -> None:
        _cached_layout.cache_clear()

    # ------------------------------------------------------------------------------------------
    def check_length(self, L: int) -> None:
        """Raise a clear ValueError if a sequence of length L does not match this layout."""
        if int(L) != self.L:
            F_, Hh, Ww = self.grid
            raise ValueError(
                f"token count mismatch: grid {self.grid} gives {F_}*{Hh}*{Ww} = {self.n_video} video "
                f"tokens + n_front {self.n_front} + n_back {self.n_back} = {self.L}, but the sequence "
                f"has L = {int(L)} tokens")

    def _blocks(self, block: int) -> Tuple[Tensor, Tensor]:
        block = int(block)
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        hit = self._block_cache.get(block)
        if hit is not None:
            return hit
        nb = -(-self.L // block)
        coords = torch.zeros(self.L, 3, dtype=torch.float64)
        coords[: self.n_video] = self._coords_video
        is_video = torch.zeros(self.L, dtype=torch.float64)
        is_video[: self.n_video] = 1.0
        pad = nb * block - self.L
        if pad:
            coords = torch.cat([coords, coords.new_zeros(pad, 3)])
            is_video = torch.cat([is_video, is_video.new_zeros(pad)])
        coords = coords.view(nb, block, 3)
        is_video = is_video.view(nb, block)
        nvid = is_video.sum(1)
        cent = (coords * is_video[..., None]).sum(1) / nvid.clamp(min=1)[:, None]
        centre = torch.tensor([(g - 1) / 2.0 for g in self.grid], dtype=torch.float64)
        cent[nvid == 0] = centre
        # a block has an extra token if it has fewer video tokens than real tokens
        real = torch.full((nb,), float(block), dtype=torch.float64)
        if pad:
            real[-1] = block - pad
        extra = torch.nonzero(nvid < real).reshape(-1)
        res = (cent.float().to(self.device), extra.to(self.device))
        self._block_cache[block] = res
        return res

    def block_coords(self, block: int = 128) -> Tensor:
        """(nb, 3) float32 centroid (frame, row, col) of the video tokens of each block of the
        tile-ordered sequence.  Blocks made only of extra tokens get the grid centre."""
        return self._blocks(block)[0]

    def extra_blocks(self, block: int = 128) -> Tensor:
        """LongTensor of the indices of the blocks that contain at least one extra
        (n_front / n_back) token; empty when there are none."""
        return self._blocks(block)[1]

    def __repr__(self) -> str:
        return (f"TileLayout(grid={self.grid}, n_front={self.n_front}, n_back={self.n_back}, "
                f"tile={self.tile}, L={self.L}, device={self.device})")


def to_tile_order(x: Tensor, layout: TileLayout, dim: int = 1) -> Tensor:
    """Gather ``x`` along ``dim`` from raster order into tile order (one copy)."""
    layout.check_length(x.shape[dim])
    return x.index_select(dim, layout.perm)


def from_tile_order(x: Tensor, layout: TileLayout, dim: int = 1) -> Tensor:
    """Inverse of :func:`to_tile_order`."""
    layout.check_length(x.shape[dim])
    return x.index_select(dim, layout.inv_perm)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_layout(grid: Tuple[int, int, int], n_front: int, n_back: int, tile: Tuple[int, int, int],
                   device: str) -> TileLayout:
    """The cache behind :meth:`TileLayout.get` (a small LRU keyed by grid, extras, tile and device)."""
    return TileLayout(grid, n_front, n_back, tile, device)
