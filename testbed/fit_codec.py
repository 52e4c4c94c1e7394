"""Fit the testbed's PCA patch codec in closed form and write testbed/codec.safetensors.

    python testbed/fit_codec.py                  # ft=4, fs=4, 256 clips of 64x128x128 from seed 1234
    python testbed/fit_codec.py --table          # also print held-out PSNR of other (ft, fs) choices

Reproducible: clips come from ``data.sample_specs(seed, n)``; the fit is the float64 covariance of
all space-time patches and its eigendecomposition (eigenvector signs fixed: largest |entry| > 0).
Held-out PSNR uses clips from ``seed + 1`` (disjoint specs).  Frame size for (ft, fs) is
16*ft frames of 32*fs pixels, i.e. the 16x32x32 latent of the standard clip.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: register the repo root as package salad_pack
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _pack import register
    register()
    from salad_pack.testbed import data
    from salad_pack.testbed.codec import CHANNELS, CODEC_PATH, PatchPCACodec
else:
    from . import data
    from .codec import CHANNELS, CODEC_PATH, PatchPCACodec


def fit(ft: int, fs: int, seed: int, n_clips: int, batch: int = 8, channels: int = CHANNELS,
        device="cpu") -> PatchPCACodec:
    """Closed-form whitened PCA of (ft, fs, fs, 3) patches of n_clips standard clips."""
    frames, size = 16 * ft, 32 * fs
    specs = data.sample_specs(seed, n_clips)
    P = ft * fs * fs * 3
    probe = PatchPCACodec(torch.zeros(P), torch.zeros(P, channels), torch.ones(channels), ft, fs)
    s1 = torch.zeros(P, dtype=torch.float64, device=device)
    s2 = torch.zeros(P, P, dtype=torch.float64, device=device)
    n = 0
    for i in range(0, n_clips, batch):
        v = data.render(specs[i:i + batch], frames, size, device=device)
        p = probe.patches(v).reshape(-1, P).double()
        s1 += p.sum(0)
        s2 += p.T @ p
        n += p.shape[0]
    mu = s1 / n
    cov = s2 / n - torch.outer(mu, mu)
    evals, evecs = torch.linalg.eigh(cov)                 # ascending
    evals, evecs = evals.flip(0)[:channels], evecs.flip(1)[:, :channels]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * sign
    return PatchPCACodec(mu.float().cpu(), evecs.float().cpu().contiguous(),
                         evals.clamp(min=1e-12).sqrt().float().cpu(), ft, fs)


def heldout_psnr(codec: PatchPCACodec, seed: int, n_clips: int, batch: int = 8) -> float:
    """PSNR over n_clips standard clips (16*ft frames, 32*fs px) from ``seed``."""
    frames, size = 16 * codec.ft, 32 * codec.fs
    specs = data.sample_specs(seed, n_clips)
    se, cnt = 0.0, 0
    for i in range(0, n_clips, batch):
        v = data.render(specs[i:i + batch], frames, size)
        r = codec.decode(codec.encode(v))
        se += ((r.double() - v.double()) ** 2).sum().item()
        cnt += v.numel()
    return -10.0 * torch.log10(torch.tensor(se / cnt)).item()


def save(codec: PatchPCACodec, path: Path, **meta):
    from safetensors.torch import save_file
    md = {"ft": str(codec.ft), "fs": str(codec.fs), "channels": str(codec.channels),
          **{k: str(v) for k, v in meta.items()}}
    save_file(codec.state_dict(), str(path), metadata=md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ft", type=int, default=4)
    ap.add_argument("--fs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--eval-clips", type=int, default=32)
    ap.add_argument("--out", default=str(CODEC_PATH))
    ap.add_argument("--table", action="store_true", help="also report (4,4), (2,4), (1,8), (4,8)")
    ap.add_argument("--table-clips", type=int, default=64)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.table:
        for ft, fs in [(4, 4), (2, 4), (1, 8), (4, 8)]:
            c = fit(ft, fs, a.seed, a.table_clips)
            print(f"ft={ft} fs={fs}: {16 * ft} frames at {32 * fs}px, patch {ft * fs * fs * 3} -> 16, "
                  f"held-out PSNR {heldout_psnr(c, a.seed + 1, a.eval_clips):.2f} dB "
                  f"(fit on {a.table_clips} clips)", flush=True)
    codec = fit(a.ft, a.fs, a.seed, a.clips)
    p = heldout_psnr(codec, a.seed + 1, a.eval_clips)
    save(codec, Path(a.out), seed=a.seed, clips=a.clips, eval_seed=a.seed + 1, eval_clips=a.eval_clips,
         psnr=f"{p:.2f}", frames=16 * a.ft, size=32 * a.fs)
    print(f"wrote {a.out}: ft={a.ft} fs={a.fs} fitted on {a.clips} clips (seed {a.seed}); "
          f"held-out PSNR {p:.2f} dB on {a.eval_clips} clips (seed {a.seed + 1})")


if __name__ == "__main__":
    main()
