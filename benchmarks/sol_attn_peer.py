"""Peer method for the quality benchmark: NVIDIA Sol-Attn from ``comfy_kitchen``, installed the way
ComfyUI core's "Model Sparse Attention" node (``BlockSparseAttention``, method ``sol-attn``,
comfy_extras/nodes_sparse_attention.py in ComfyUI >= Sept 2026) installs it.  ComfyUI 0.3.75 has no
such node, so this is our own override with the same behaviour:

* a cloned ModelPatcher gets ``model_options["transformer_options"]["optimized_attention_override"]``
  (put on top of any previous override, re-installed from ON_PREPARE_STATE, state reset on
  ON_CLEANUP);
* calls run Sol-Attn only for unmasked self-attention (q, k, v of one shape), head_dim 128, inside
  the sigma window of ``start_percent``/``end_percent`` and with ``tokens >= min_tokens``; everything
  else goes to the previous override or ComfyUI's default attention;
* ``ck.sol_attn(q, k, v, tau=..., topk_ratio=0, token_aug=extra_tokens)`` on (B, T, H, 128) bf16/fp16
  (fp32 inputs are cast to bf16, as the node does), raster token order, 64-token blocks.

Node defaults: tau 1.3, extra_tokens 256, min_tokens 12288, start_percent 0.2.  The benchmark maps
"the same kept-block share as SALAD" onto ``tau`` (the method's only sparsity knob): tau is
calibrated by bisection so that the share of key blocks Sol-Attn routes exactly (diagonal included),
averaged over recorded attention calls of the dense run, equals SALAD's kept share.  The share uses
the routing rule of comfy_kitchen's eager reference (backends/eager/sol_attn.py), which in closed
form is: per (batch, head), with 64-token block means qm (query centroids) and km of k, kc = km -
mean_blocks(km), var_kc = mean_blocks(kc^2), a key block j is exact for query block i iff
``qm_i . kc_j > tau * sqrt(sum_d qm_i^2 var_kc)`` (scores in log2 units, as there) or ``|i - j| <= 1``.
The CUDA kernel quantises to INT8, so its routing can differ slightly; ``kept_share`` reported by the
benchmark is this rule applied to the q, k of the Sol-Attn run itself.  min_tokens is set to 0
(the node's 12288 would keep the 4,096-token testbed dense) and extra_tokens defaults to 0 here
(256 extra tokens are 6.25% of 4,096 keys, more than the whole 5% budget at sparsity 0.95); both
are arguments.

Also: :func:`strip_rocm_wheel`, to carry the comfy-kitchen wheel without its ROCm library
(``python benchmarks/sol_attn_peer.py strip-wheel IN.whl OUT_DIR``).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import math
import sys
import zipfile
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger("sol_attn_peer")

HEAD_DIM = 128
BLOCK = 64
LOG2E = 1.4426950408889634
NODE_DEFAULTS = dict(tau=1.3, extra_tokens=256, min_tokens=12288, start_percent=0.2, end_percent=1.0)


def import_kitchen():
    """comfy_kitchen, or None (with the reason logged) when it cannot be imported."""
    try:
        import comfy_kitchen as ck
        return ck
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        log.warning("comfy_kitchen not importable (%s: %s)", type(e).__name__, e)
        return None


# ----------------------------------------------------------------------------------------------
# routing rule (closed form of comfy_kitchen's eager reference) and tau calibration
# ----------------------------------------------------------------------------------------------

def _block_means(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) -> (B, N, H, D) fp32 mean over each 64-token block (ragged last block)."""
    b, t, h, d = x.shape
    n = (t + BLOCK - 1) // BLOCK
    pad = n * BLOCK - t
    xf = x.float()
    if pad:
        xf = torch.cat([xf, xf.new_zeros(b, pad, h, d)], dim=1)
    lengths = torch.full((n,), float(BLOCK), device=x.device)
    lengths[-1] = BLOCK - pad
    return xf.view(b, n, BLOCK, h, d).sum(2) / lengths.view(1, n, 1, 1)


def routing_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """z (B, H, N, N) fp32: block score / its tau-unit threshold, so block j is routed exactly for
    query block i iff ``z[..., i, j] > tau`` (or ``|i - j| <= 1``).  q, k: (B, T, H, D)."""
    d = q.shape[-1]
    log2s = (scale if scale is not None else d ** -0.5) * LOG2E
    qm, km = _block_means(q), _block_means(k)
    kc = km - km.mean(dim=1, keepdim=True)
    var_kc = kc.pow(2).mean(dim=1)                                        # (B, H, D)
    colmean = torch.einsum("bihd,bjhd->bhij", qm, kc) * log2s             # (B, H, N, N)
    var = (qm.pow(2) * var_kc.unsqueeze(1)).sum(-1)                       # (B, N, H)
    unit = torch.sqrt(var * log2s * log2s + 1e-6).permute(0, 2, 1).unsqueeze(-1)
    return colmean / unit


def _band(n: int, device) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    return (idx.view(1, -1) - idx.view(-1, 1)).abs() <= 1


def routed_share(z: torch.Tensor, tau: float) -> float:
    """Mean share of key blocks routed exactly (diagonal band included) for routing scores z."""
    exact = (z > tau) | _band(z.shape[-1], z.device)
    return float(exact.float().mean())


def bisect_falling(count_fn, target: float, lo: float, hi: float, iters: int = 40) -> tuple[float, float]:
    """Bisect [lo, hi] for the parameter p where ``count_fn(p)`` (falling as p rises) drops to ``target``:
    the final bracket (lo, hi), count above target at lo's probes, at most target at hi's."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if count_fn(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def calibrate_tau(zs: list, target: float, lo: float = -4.0, hi: float = 8.0, iters: int = 40) -> float:
    """tau whose mean routed share over the score tensors ``zs`` is ``target`` (bisection; the
    share falls as tau rises).  Shares below the diagonal band's floor give the largest tau tried."""
    def share(tau):
        return sum(routed_share(z, tau) * z.numel() for z in zs) / sum(z.numel() for z in zs)
    lo, hi = bisect_falling(share, target, lo, hi, iters)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# the override
# ----------------------------------------------------------------------------------------------

class SolAttnPatch:
    """Options and per-run state of one Sol-Attn patched model.

    ``record``: a list that receives (sigma, z) routing scores of every eligible call instead of
    running Sol-Attn (dense attention runs; used on the dense model to calibrate tau).
    ``allow_eager``: also run on CPU through comfy_kitchen's eager reference (tests only).
    """

    def __init__(self, tau=NODE_DEFAULTS["tau"], extra_tokens=0, sigma_start=math.inf, sigma_end=0.0,
                 min_tokens=0, measure=True, record=None, allow_eager=False):
        self.tau, self.extra_tokens = float(tau), int(extra_tokens)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.min_tokens, self.measure, self.record, self.allow_eager = int(min_tokens), measure, record, allow_eager
        self.installed = set()
        self.ck = None if record is not None else import_kitchen()
        self.reset_stats()

    def reset_stats(self):
        self.calls = 0
        self.declined = Counter()
        self.share_sum = 0.0
        self.eager_check = None

    def check_against_eager(self, qs, ks, vs, out):
        """Once per run: relative error of the kernel's output vs comfy_kitchen's fp32 eager reference
        (same routing rule, exact arithmetic) on the first sample of a CUDA call."""
        if self.eager_check is not None or qs.device.type != "cuda":
            return
        from comfy_kitchen.backends.eager.sol_attn import sol_attn as eager
        ref = eager(qs[:1].float(), ks[:1].float(), vs[:1].float(), tau=self.tau)
        err = (out[:1].float() - ref).norm() / ref.norm()
        self.eager_check = dict(rel_err=float(err), token_aug_in_kernel_only=self.extra_tokens)

    @property
    def kept_share(self):
        return self.share_sum / self.calls if self.calls and self.measure else None

    def reason_dense(self, q, k, v, heads, mask, transformer_options):
        """Why this call stays dense, or None.  q, k, v as ComfyUI passes them: (B, T, heads*D)."""
        if mask is not None:
            return "mask"
        if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
            return "not_self_attention"
        if q.shape[-1] // heads != HEAD_DIM:
            return "head_dim"
        sigmas = transformer_options.get("sigmas")
        if sigmas is not None:
            s = float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else float(sigmas[0])
            if s > self.sigma_start or s < self.sigma_end:
                return "outside_percent"
        if q.shape[1] < self.min_tokens:
            return "short"
        if self.record is not None:
            return None
        if self.ck is None:
            return "no_comfy_kitchen"
        if q.device.type != "cuda" and not self.allow_eager:
            return "not_cuda"
        if q.device.type == "cuda" and not self.ck.sol_attn_is_available(q.device):
            return "no_kernel"
        return None

    def run(self, q, k, v, heads, scale, transformer_options):
        """Sol-Attn of (B, T, heads*128) q, k, v -> (B, T, heads*128) in q.dtype."""
        b, t, _ = q.shape
        qs, ks, vs = (x.reshape(b, t, heads, HEAD_DIM) for x in (q, k, v))
        if self.record is not None:
            sigmas = transformer_options.get("sigmas")
            sigma = float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else None
            self.record.append((sigma, routing_scores(qs, ks, scale).to("cpu", torch.float16)))
            return None
        if self.measure:
            self.share_sum += routed_share(routing_scores(qs, ks, scale), self.tau)
        if q.dtype == torch.float32:
            qs, ks, vs = (x.to(torch.bfloat16) for x in (qs, ks, vs))
        out = self.ck.sol_attn(qs.contiguous(), ks.contiguous(), vs.contiguous(), tau=self.tau, scale=scale,
                               topk_ratio=0.0, token_aug=self.extra_tokens)
        self.calls += 1
        self.check_against_eager(qs, ks, vs, out)
        return out.to(q.dtype).reshape(b, t, heads * HEAD_DIM)


def make_override(patch: SolAttnPatch, previous):
    """ComfyUI attention override ``(func, q, k, v, heads, ...)``: Sol-Attn where eligible, else
    ``previous`` (the override that was installed before) or ``func``."""
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        to = kwargs.get("transformer_options") or {}

        def dense():
            kw = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                      skip_output_reshape=skip_output_reshape, **kwargs)
            return func(q, k, v, heads, **kw) if previous is None else previous(func, q, k, v, heads, **kw)

        reason = "layout" if (skip_reshape or skip_output_reshape) else patch.reason_dense(q, k, v, heads, mask, to)
        if reason is not None:
            patch.declined[reason] += 1
            return dense()
        out = patch.run(q, k, v, heads, kwargs.get("scale"), to)
        return dense() if out is None else out
    return override


def install_override(patch: SolAttnPatch, transformer_options: dict) -> None:
    """Put the patch's override on top of the current one (idempotent once it is on top)."""
    current = transformer_options.get("optimized_attention_override")
    if current in patch.installed:
        return
    ov = make_override(patch, current)
    patch.installed.add(ov)
    transformer_options["optimized_attention_override"] = ov


def apply_sol_attn(model, patch: SolAttnPatch, start_percent: float = 0.0, end_percent: float = 1.0):
    """Clone of the ComfyUI ModelPatcher ``model`` with Sol-Attn installed; sets the patch's sigma
    window from the model's own sampling schedule (as the core node does)."""
    import comfy.patcher_extension as pe
    ms = model.get_model_object("model_sampling")
    patch.sigma_start = float(ms.percent_to_sigma(start_percent))
    patch.sigma_end = float(ms.percent_to_sigma(end_percent))
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    install_override(patch, to)
    m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, "sol_attn_peer",
                            lambda mp, timestep, model_options=None, *a, **kw:
                            install_override(patch, (model_options or mp.model_options)["transformer_options"]))
    return m


# ----------------------------------------------------------------------------------------------
# wheel without the ROCm library (carry limit on the GPU machine)
# ----------------------------------------------------------------------------------------------

def strip_rocm_wheel(src, out_dir) -> Path:
    """Copy the comfy-kitchen wheel ``src`` into ``out_dir`` without ``backends/hip/_C*.so`` (the
    ROCm build, ~150 MB unpacked; only loaded under a ROCm torch), with RECORD updated to match."""
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    tmp = dst.with_suffix(".tmp")

    def dropped(name):
        return "/backends/hip/" in f"/{name}" and name.endswith(".so")

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in zin.infolist():
            if dropped(info.filename) or info.filename == record_name:
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        rows.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "strip-wheel":
        p = strip_rocm_wheel(sys.argv[2], sys.argv[3])
        print(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)")
    else:
        print("usage: python benchmarks/sol_attn_peer.py strip-wheel IN.whl OUT_DIR")
        sys.exit(2)
