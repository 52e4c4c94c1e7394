"""Fixed linear video codec for the SALAD testbed: whitened PCA of space-time patches.

A video (B, F, H, W, 3) in [0, 1] is cut into non-overlapping patches of ft frames x fs x fs
pixels x 3 colours (P = ft*fs*fs*3 values).  With the patch mean ``mu`` (P,), the top-16
principal directions ``basis`` (P, 16) and their standard deviations ``scale`` (16,) (all fitted
in closed form on procedural clips by ``testbed/fit_codec.py`` and stored in
``testbed/codec.safetensors``):

    z   = basis^T (patch - mu) / scale          whitened coefficients, unit variance per channel
    raw = z * WAN21_STD + WAN21_MEAN            ComfyUI's raw Wan 2.1 latent space
    patch_hat = basis (z * scale) + mu          decode (then clamped to [0, 1])

so ``comfy.latent_formats.Wan21().process_in(raw) == z``: a Wan 2.1 model sampled by ComfyUI
works on z, and ComfyUI's latent nodes see an ordinary 16-channel Wan 2.1 latent
(B, 16, F/ft, H/fs, W/fs).  This module does not import ComfyUI.
"""
from __future__ import annotations

from pathlib import Path

import torch

CODEC_PATH = Path(__file__).resolve().parent / "codec.safetensors"
CHANNELS = 16
# comfy.latent_formats.Wan21 latents_mean / latents_std (ComfyUI 0.3.75), checked by a test
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class PatchPCACodec:
    """mu (P,), basis (P, C), scale (C,) with P = ft*fs*fs*3; ``meta``: the file's metadata."""

    def __init__(self, mu: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, ft: int, fs: int,
                 meta: dict | None = None):
        self.mu, self.basis, self.scale = mu, basis, scale
        self.ft, self.fs = int(ft), int(fs)
        self.channels = basis.shape[1]
        self.meta = dict(meta or {})
        assert basis.shape[0] == self.ft * self.fs * self.fs * 3, (basis.shape, ft, fs)

    def to(self, device=None, dtype=None) -> "PatchPCACodec":
        return PatchPCACodec(*(t.to(device=device, dtype=dtype) for t in (self.mu, self.basis, self.scale)),
                             self.ft, self.fs, self.meta)

    def _stats(self, like: torch.Tensor):
        view = (1, self.channels, 1, 1, 1)
        kw = dict(device=like.device, dtype=like.dtype)
        return torch.tensor(WAN21_MEAN, **kw).view(view), torch.tensor(WAN21_STD, **kw).view(view)

    def to_model_space(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw Wan 2.1 latent (B, 16, T, h, w) -> z (same shape); = comfy Wan21().process_in."""
        mean, std = self._stats(raw)
        return (raw - mean) / std

    def from_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 16, T, h, w) -> raw Wan 2.1 latent; = comfy Wan21().process_out."""
        mean, std = self._stats(z)
        return z * std + mean

    def patches(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, H, W, 3) -> (B, T, h, w, P) space-time patches."""
        B, F, H, W, Cc = video.shape
        ft, fs = self.ft, self.fs
        if F % ft or H % fs or W % fs or Cc != 3:
            raise ValueError(f"video {tuple(video.shape)}: frames must divide by ft={ft}, height and width "
                             f"by fs={fs}, and there must be 3 colour channels")
        x = video.reshape(B, F // ft, ft, H // fs, fs, W // fs, fs, 3).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(B, F // ft, H // fs, W // fs, -1)

    def unpatch(self, p: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w, P) -> (B, T*ft, h*fs, w*fs, 3)."""
        B, T, h, w, _ = p.shape
        ft, fs = self.ft, self.fs
        x = p.reshape(B, T, h, w, ft, fs, fs, 3).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(B, T * ft, h * fs, w * fs, 3)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, F, H, W, 3) in [0, 1] -> raw Wan 2.1 latent (B, 16, F/ft, H/fs, W/fs)."""
        p = self.patches(video.to(self.basis.dtype))
        z = ((p - self.mu) @ self.basis) / self.scale
        return self.from_model_space(z.permute(0, 4, 1, 2, 3).contiguous())

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """raw Wan 2.1 latent (B, 16, T, h, w) -> video (B, T*ft, h*fs, w*fs, 3) clamped to [0, 1]."""
        z = self.to_model_space(raw.to(self.basis.dtype)).permute(0, 2, 3, 4, 1)
        p = (z * self.scale) @ self.basis.T + self.mu
        return self.unpatch(p).clamp(0, 1)

    def state_dict(self) -> dict:
        return {"mu": self.mu, "basis": self.basis, "scale": self.scale}


_CACHE: dict = {}


def load_codec(device=None, dtype=torch.float32, path: str | Path | None = None) -> PatchPCACodec:
    """The shipped codec (cached per path/device/dtype)."""
    from safetensors import safe_open
    path = Path(path or CODEC_PATH)
    key = (str(path), str(device), dtype)
    if key not in _CACHE:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in ("mu", "basis", "scale")}
        base = PatchPCACodec(t["mu"], t["basis"], t["scale"], int(meta["ft"]), int(meta["fs"]), meta)
        _CACHE[key] = base.to(device=device, dtype=dtype)
    return _CACHE[key]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [0, 1] videos (over all their values)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()
