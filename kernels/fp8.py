"""Opt-in FP8 block-sparse attention forward (inference only), for cards with FP8 tensor cores (Hopper:
H100 / H200; Ada compiles too but is not tuned).  Importable without triton: the Triton kernels
(kernels/_triton_fp8.py) are imported on first use.

Contract: as kernels.block_sparse_attention_rowmap (k, v tile-ordered (B,H,L,D) views, q in the caller's
raster order read through ``rowmap`` (L,), output a (B,H,L,D) view of a contiguous (B,L,H,D) buffer in
q's dtype and order, optional bias (H*D,) or (B, H*D) times sigmoid(gate_logit[b])), with K and V
quantised first by :func:`quantize_kv_fp8` (once per attention call; the result serves every query
block and head of that call):

    ok, why = fp8_support(q.device)                 # False on CPU / capability < 8.9 / old Triton
    kv8 = quantize_kv_fp8(kt, vt)                    # 2 small kernels: statistics, then one pass
    o = block_sparse_attention_rowmap_fp8(q, kv8, idx, cnt, rowmap, bias=bias, gate_logit=g)

What is quantised (e4m3, round to nearest even, fp32 scales; see _triton_fp8's header):
- K: minus its per-head mean over tokens (exact: softmax ignores a per-query constant), one scale per
  key block (block amax / 448).
- V: minus its per-head channel mean (added back exactly in the epilogue), one scale per channel.
  e4m3 keeps ~2^-4 relative precision at any magnitude, so the scale granularity only has to keep
  values out of the subnormal range; per channel costs nothing (applied once in the epilogue) and
  handles channels of very different range.  The mean subtraction matters more: an element's rounding
  error is relative to its magnitude, so a large channel offset (common in DiT keys and values) would
  otherwise dominate the error.
- Q: one scale per query row (row amax / 448), quantised in registers inside the kernel.
- P: p * 2^8 with p = exp2(s - running max) <= 1 (the factor cancels in the row sum).
Measured (benchmarks/results/2026-11-28-fp8-nvidia_h200.*, NVIDIA H200, Triton 3.6): the FP8 kernel is NOT
faster than the bf16 one (0.91-1.00x at 90/95% on Wan-1.3B/14B 480p and 21x30x30; quantising K/V adds
0.14-0.72 ms), and it differs from the step-by-step reference by ~1% (5e-3 gate failed: the tensor cores'
fp8 accumulation is coarser than the reference's fp32).  The kernel is bound by the softmax and the LUT
walk, not by tensor-core throughput; opt-in and experimental.  The bf16 kernel's inner loop was then made
~9% faster (max on raw scores, tail mask only past L; benchmarks/results/fwd_loop/), which this kernel does not
have: 0.86x the bf16 kernel at Wan-1.3B 480p (benchmarks/results/2026-11-28-fp8-loop-nvidia_h200.*).
Error: on random bf16 inputs (the hardest case: the output is a cancelling average) about 5% relative L2
against exact attention, from the e4m3 rounding of q.k (~4%), of P and of V (~2.5% each); bf16 is ~0.2%.
Outputs dominated by a few keys, or by V's mean, fare better (benchmarks/bench_fp8.py reports it per
shape).  block_sparse_attention_fp8_ref reproduces every
quantisation step, so the kernel is checked tightly against it.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple

import torch

from .reference import DEFAULT_BLOCK, bias_args, num_blocks

Tensor = torch.Tensor

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0            # largest finite e4m3 value
P_LOG2 = 8                 # P is quantised as p * 2**P_LOG2
TINY = 1e-20               # amax floor of an all-zero row / block / channel (the kernels import these)
MIN_CAPABILITY = (8, 9)    # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634

# Tuned kernel settings, read-only: kernel -> head dim -> launch settings.  "fwd": the attention kernel
# (BLOCK_N keys per step, USE_TMA: tensor descriptors for K8 / VT8, PV_PRECISE: fp32 two-level P.V sums);
# "stats" / "quant": the K/V statistics pass (BLOCK_N rows per step, about PROGRAMS programs) and the
# quantisation pass (one 128-row block per program).  Untimed first choices for sm90; benchmarks/bench_fp8.py
# --sweep times alternatives (pass one per call as `config=`).
_FWD = {64: dict(BLOCK_N=128, num_warps=4, num_stages=3, USE_TMA=True, PV_PRECISE=False),
        128: dict(BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=True, PV_PRECISE=False)}
FP8_CONFIGS: Mapping[str, Mapping[int, Mapping[str, Any]]] = MappingProxyType({
    "fwd": MappingProxyType({d: MappingProxyType(c) for d, c in _FWD.items()}),
    "stats": MappingProxyType({d: MappingProxyType(dict(BLOCK_N=64, PROGRAMS=528, num_warps=4)) for d in HEAD_DIMS}),
    "quant": MappingProxyType({d: MappingProxyType(dict(num_warps=4)) for d in HEAD_DIMS}),
})


@dataclass(frozen=True)
class KV8:
    """K and V quantised for the FP8 kernel (quantize_kv_fp8).  B*H heads, L keys, LP = nk * block.

    k8: (B,H,LP,D) float8_e4m3fn contiguous, tile order: (k - k_mean) / k_scale[key block], 0 past L.
    k_scale: (B,H,nk) fp32, block amax of k - k_mean over 448.
    v8t: (B,H,D,LP) float8_e4m3fn contiguous, TRANSPOSED: (v - v_mean) / v_scale[channel], 0 past L.
    v_scale: (B,H,D) fp32, channel amax of v - v_mean over 448.
    k_mean, v_mean: (B,H,D) fp32 per-head means over the L tokens (zeros when not smoothed).
    """
    k8: Tensor
    k_scale: Tensor
    v8t: Tensor
    v_scale: Tensor
    k_mean: Tensor
    v_mean: Tensor
    L: int
    block: int

    def dequantize(self) -> Tuple[Tensor, Tensor]:
        """(k, v) fp32 (B,H,L,D) as the kernel sees them: k without its mean (softmax ignores it), v
        with its mean added back."""
        B, H, LP, D = self.k8.shape
        ks = self.k_scale.repeat_interleave(self.block, dim=2)[..., :, None]
        k = (self.k8.float() * ks)[:, :, :self.L]
        v = self.v8t.float().transpose(2, 3) * self.v_scale[:, :, None, :] + self.v_mean[:, :, None, :]
        return k, v[:, :, :self.L]


# ----------------------------------------------------------------------------------------------
# support and checks
# ----------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_fp8() -> Tuple[bool, str]:
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # pragma: no cover - depends on environment
        return False, f"triton cannot be imported ({type(e).__name__}: {e})"
    if not hasattr(tl, "float8e4nv"):
        return False, f"triton {triton.__version__} has no float8e4nv (e4m3) type"
    return True, f"triton {triton.__version__}"


def fp8_support(device: Any = None) -> Tuple[bool, str]:
    """(ok, reason): whether the FP8 kernels can run on `device` (default: the current CUDA device).
    False for CPU and other non-CUDA devices, CUDA devices of compute capability < 8.9 (no FP8 tensor
    cores), a torch without float8_e4m3fn or a Triton without e4m3; the reason names what is missing.
    (Tests run the kernels on CPU through the Triton interpreter, TRITON_INTERPRET=1; that is not FP8
    support and this still says False there.)"""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if FP8_DTYPE is None:
        return False, f"torch {torch.__version__} has no float8_e4m3fn"
    if dev.type != "cuda":
        return False, f"FP8 attention needs a CUDA GPU with FP8 tensor cores; got device {dev}"
    if not torch.cuda.is_available():
        return False, f"CUDA is not available (device {dev})"
    return _cuda_fp8_support(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_fp8_support(index: int) -> Tuple[bool, str]:
    """fp8_support for CUDA device `index`, asked once per device (the attention path asks on every call)."""
    dev = torch.device("cuda", index)
    cap = torch.cuda.get_device_capability(dev)
    if tuple(cap) < MIN_CAPABILITY:
        return False, (f"{dev} ({torch.cuda.get_device_name(dev)}) has compute capability {cap[0]}.{cap[1]}; "
                       f"FP8 tensor cores need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper)")
    ok, why = _triton_fp8()
    if not ok:
        return False, why
    return True, f"{dev} ({torch.cuda.get_device_name(dev)}, capability {cap[0]}.{cap[1]}), {why}"


def _require(device: torch.device, what: str) -> None:
    """Raise a RuntimeError naming the device when the FP8 kernels cannot run there (the Triton CPU
    interpreter, TRITON_INTERPRET=1, is let through for tests)."""
    if _interpreting() and device.type == "cpu":
        ok, why = _triton_fp8()
        if ok:
            return
    else:
        ok, why = fp8_support(device)
        if ok:
            return
    raise RuntimeError(f"{what}: FP8 attention is not available on {device}: {why}. "
                       "Use the bf16 path (kernels.block_sparse_attention_rowmap) instead.")


def _check_kv(k: Tensor, v: Tensor, block: int) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must be (B,H,L,D) of one shape, got k {tuple(k.shape)} v {tuple(v.shape)}")
    if k.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"FP8 attention supports head_dim in {HEAD_DIMS}, got k with D = {k.shape[-1]}")
    if block < 64 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 64, got {block}")
    if k.shape[2] < 1:
        raise ValueError("k and v must hold at least one token")


def _check_attn(q: Tensor, kv8: KV8, block: int) -> None:
    if not isinstance(kv8, KV8):
        raise TypeError(f"kv8 must be the KV8 that quantize_kv_fp8 returns, got {type(kv8).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B,H,L,D), got shape {tuple(q.shape)}")
    B, H, _, D = kv8.k8.shape
    if tuple(q.shape[:2]) != (B, H) or q.shape[-1] != D:
        raise ValueError(f"q {tuple(q.shape)} does not match the quantised K/V (B,H,D) = {(B, H, D)}")
    if block != kv8.block:
        raise ValueError(f"block {block} differs from the block K/V were quantised with ({kv8.block})")
    if not q.is_floating_point() or q.dtype == FP8_DTYPE:
        raise ValueError(f"q must be fp16 / bf16 / fp32, got {q.dtype}")


def fp8_config(kernel: str, D: int, config: Optional[Mapping[str, Any]] = None) -> Mapping[str, Any]:
    """The settings a call uses: FP8_CONFIGS[kernel][D] updated by `config` (a per-call override)."""
    c = dict(FP8_CONFIGS[kernel][D])
    if config:
        bad = sorted(set(config) - set(c))
        if bad:
            raise ValueError(f"config: unknown {kernel} setting(s) {bad}; expected some of {sorted(c)}")
        c.update(config)
    return c


# ----------------------------------------------------------------------------------------------
# quantisation of K and V
# ----------------------------------------------------------------------------------------------

def _kv8_buffers(k: Tensor, block: int) -> Tuple[Tensor, Tensor, Tensor]:
    B, H, L, D = k.shape
    LP = num_blocks(L, block) * block
    k8 = torch.empty(B, H, LP, D, device=k.device, dtype=FP8_DTYPE)
    v8t = torch.empty(B, H, D, LP, device=k.device, dtype=FP8_DTYPE)
    ks = torch.empty(B, H, LP // block, device=k.device, dtype=torch.float32)
    return k8, v8t, ks


@torch.no_grad()
def quantize_kv_fp8(k: Tensor, v: Tensor, block: int = DEFAULT_BLOCK, smooth_k: bool = True,
                    smooth_v: bool = True) -> KV8:
    """K and V (tile-ordered (B,H,L,D), any strides with a unit last stride, 16-bit or fp32) as KV8 for
    block_sparse_attention_rowmap_fp8.  Three Triton kernels: per-head statistics (sums of k and v,
    min / max of v; split over L, then one tiny reduction per head), then one pass that writes k8 (one scale per key
    block), the transposed v8t (one scale per channel) and the block scales.  smooth_k / smooth_v:
    subtract the per-head token means first (see the module docstring); both on by default."""
    _check_kv(k, v, block)
    _require(k.device, "quantize_kv_fp8")
    from . import _triton_fp8 as tf
    from ._triton_ops import _lastdim_contig, _splits
    B, H, L, D = k.shape
    k, v = _lastdim_contig(k), _lastdim_contig(v)
    k_str, v_str = k.stride()[:3], v.stride()[:3]
    cs = fp8_config("stats", D)
    bn = cs["BLOCK_N"]
    nsplit, chunk = _splits(L, bn, B * H, cs["PROGRAMS"])
    sp = torch.empty(B * H, nsplit, 4, D, device=k.device, dtype=torch.float32)
    tf._kv_stats_kernel[(nsplit, B * H)](k, v, sp, k_str, v_str, H, L, chunk, nsplit, BLOCK_N=bn, D=D,
                                         num_warps=cs["num_warps"])
    k_mean, v_mean, v_scale = (torch.empty(B * H, D, device=k.device, dtype=torch.float32) for _ in range(3))
    tf._kv_stats_finish_kernel[(B * H,)](sp, k_mean, v_mean, v_scale, nsplit, 1.0 / L, D=D,
                                         SMOOTH_K=bool(smooth_k), SMOOTH_V=bool(smooth_v), num_warps=4)
    k8, v8t, ks = _kv8_buffers(k, block)
    nk, LP = ks.shape[-1], k8.shape[2]
    tf._quant_kv_kernel[(nk, B * H)](k, v, k8, ks, v8t, k_mean, v_mean, v_scale, k_str, v_str, H, L, nk, LP,
                                     BLOCK=block, D=D, EXACT_CAST=_interpreting(),
                                     num_warps=fp8_config("quant", D)["num_warps"])
    return KV8(k8, ks, v8t, v_scale.view(B, H, D), k_mean.view(B, H, D), v_mean.view(B, H, D), L, block)


def _over_max(amax: Tensor) -> Tensor:
    """amax / 448 divided exactly, as the kernels do (div_rn): on CUDA torch turns a division by a Python
    scalar into a multiplication by its reciprocal, one ulp off at times, which moves whole blocks of the
    reference's e4m3 values by a rounding step (a flaky comparison on the GPU)."""
    return amax / torch.full_like(amax, FP8_MAX)


def _v_scale(v_max: Tensor, v_min: Tensor, v_mean: Tensor) -> Tensor:
    """Channel scale of v - v_mean: its amax, max(v_max - mean, mean - v_min), over 448."""
    return _over_max(torch.maximum(v_max - v_mean, v_mean - v_min).clamp_min(TINY))


def _q8(x: Tensor) -> Tensor:
    """fp32 -> e4m3 (round to nearest even), as float32 values."""
    return x.to(FP8_DTYPE).float()


@torch.no_grad()
def quantize_kv_fp8_ref(k: Tensor, v: Tensor, block: int = DEFAULT_BLOCK, smooth_k: bool = True,
                        smooth_v: bool = True) -> KV8:
    """Plain-torch quantize_kv_fp8 (same formulas; runs anywhere torch has float8_e4m3fn).  The means may
    differ from the kernel's in the last bits (summation order), so a few elements can land one e4m3
    step apart."""
    if FP8_DTYPE is None:
        raise RuntimeError(f"torch {torch.__version__} has no float8_e4m3fn")
    _check_kv(k, v, block)
    B, H, L, D = k.shape
    kf, vf = k.float(), v.float()
    zeros = torch.zeros(B, H, D, device=k.device)
    k_mean = kf.mean(2) if smooth_k else zeros
    v_mean = vf.mean(2) if smooth_v else zeros
    v_scale = _v_scale(vf.amax(2), vf.amin(2), v_mean)
    k8, v8t, ks = _kv8_buffers(k, block)
    LP = k8.shape[2]
    kc = torch.nn.functional.pad(kf - k_mean[:, :, None], (0, 0, 0, LP - L)).view(B, H, LP // block, block * D)
    ks.copy_(_over_max(kc.abs().amax(-1).clamp_min(TINY)))
    k8.copy_((kc * (1.0 / ks)[..., None]).view(B, H, LP, D))
    vc = (vf - v_mean[:, :, None]) * (1.0 / v_scale)[:, :, None]
    v8t.copy_(torch.nn.functional.pad(vc, (0, 0, 0, LP - L)).transpose(2, 3))
    return KV8(k8, ks, v8t, v_scale, k_mean, v_mean, L, block)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def block_sparse_attention_rowmap_fp8(q: Tensor, kv8: KV8, idx: Tensor, cnt: Tensor, rowmap: Optional[Tensor],
                                      block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                                      bias: Optional[Tensor] = None, gate_logit: Optional[Tensor] = None,
                                      config: Optional[Mapping[str, Any]] = None) -> Tensor:
    """FP8 form of kernels.block_sparse_attention_rowmap (inference, no compensation): q (B,H,L,D) in the
    caller's order (16-bit or fp32, any strides with a unit last stride), tile position r reads q row
    rowmap[r] and writes output row rowmap[r] (rowmap None: tile order); kv8 from quantize_kv_fp8 on the
    tile-ordered k, v; idx / cnt block lists as in kernels/__init__.py; bias ((H*D,) or (B, H*D)) added to
    every row, times sigmoid(gate_logit[b]) when gate_logit (B,) is given.  Returns o (B,H,L,D) in q's
    dtype, a view of a contiguous (B,L,H,D) buffer.  config: per-call override of FP8_CONFIGS["fwd"][D].
    Raises RuntimeError where FP8 is not supported (see fp8_support)."""
    _check_attn(q, kv8, block)
    _require(q.device, "block_sparse_attention_rowmap_fp8")
    from . import _triton_fp8 as tf
    from ._triton_ops import _descs, _lastdim_contig, _lut_views, _out, _rowmap
    B, H, L, D = q.shape
    q = _lastdim_contig(q)
    nq, nk = num_blocks(L, block), kv8.k_scale.shape[-1]
    idx, cnt, lut_str = _lut_views(idx, cnt, B, H, nq)
    rm = _rowmap(rowmap, L, q.device)
    c = fp8_config("fwd", D, config)
    bn = min(c["BLOCK_N"], block)
    o = _out(B, H, L, D, q.device, q.dtype, "blhd")
    bias, bias_sb, gl = bias_args(bias, gate_logit, B, H * D, q.device)
    kd, vd = kv8.k8, kv8.v8t
    if c["USE_TMA"]:  # our own contiguous buffers: TMA's 16-byte rules always hold
        from triton.tools.tensor_descriptor import TensorDescriptor
        kd = _descs(True, (kv8.k8, bn))[0]
        vd = TensorDescriptor.from_tensor(kv8.v8t, [1, 1, D, bn])     # (B,H,D,LP): blocks of D rows x bn keys
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tf._sparse_fwd_fp8_kernel[(nq, B * H)](
        q, kd, vd, kv8.k_scale, kv8.v_scale, kv8.v_mean, o, idx, cnt, rm if rm is not None else cnt,
        bias if bias is not None else kv8.v_mean, gl if gl is not None else kv8.v_mean,
        q.stride()[:3], kv8.k8.stride()[:3], kv8.v8t.stride()[:3], o.stride()[:3], lut_str,
        H, L, kv8.L, nk, scale * _LOG2E, bias_sb,
        BLOCK_M=block, BLOCK_N=bn, D=D, NUM_STAGES=c["num_stages"], USE_TMA=bool(c["USE_TMA"]),
        ROWMAP_IO=rm is not None, HAS_BIAS=bias is not None, HAS_GATE=gl is not None,
        EXACT_CAST=_interpreting(), PV_PRECISE=bool(c["PV_PRECISE"]),
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    return o


@torch.no_grad()
def block_sparse_attention_fp8_ref(q: Tensor, kv8: KV8, idx: Tensor, cnt: Tensor, rowmap: Optional[Tensor] = None,
                                   block: int = DEFAULT_BLOCK, scale: Optional[float] = None,
                                   bias: Optional[Tensor] = None, gate_logit: Optional[Tensor] = None,
                                   block_n: Optional[int] = None) -> Tensor:
    """Plain-torch emulation of block_sparse_attention_rowmap_fp8, step by step: q quantised per row,
    e4m3 products of the quantised K / V with fp32 sums, the online softmax walking each query block's
    list in block_n-key steps (default: the kernel's BLOCK_N for this head dim) with P quantised as
    p * 2^P_LOG2 against the running max, V's channel scale and mean and the bias in the epilogue.
    Same return as the kernel (a (B,H,L,D) view of a contiguous (B,L,H,D) buffer in q's dtype).  Memory:
    B*H*nq*block*(D + block_n) fp32 at a time (tests, or a few heads at Wan sizes)."""
    _check_attn(q, kv8, block)
    B, H, L, D = q.shape
    bn = min(block, block_n or fp8_config("fwd", D)["BLOCK_N"])
    split = block // bn
    nq = num_blocks(L, block)
    rm = torch.arange(L, device=q.device) if rowmap is None else rowmap.to(device=q.device, dtype=torch.long)
    qt = torch.nn.functional.pad(q.index_select(2, rm).float(), (0, 0, 0, nq * block - L))
    q_s = _over_max(qt.abs().amax(-1).clamp_min(TINY))                       # (B,H,nq*block)
    q8 = _q8(qt * (1.0 / q_s)[..., None]).view(B, H, nq, block, D)
    q_s = (q_s * ((1.0 / math.sqrt(D) if scale is None else float(scale)) * _LOG2E)).view(B, H, nq, block)
    idx = idx.expand(B, H, nq, idx.shape[-1]).long()
    cnt = cnt.expand(B, H, nq).long()
    k8, v8 = kv8.k8.float(), kv8.v8t.float().transpose(2, 3)                  # (B,H,LP,D) each
    m = torch.full((B, H, nq, block), -float("inf"), device=q.device)
    l_i = torch.zeros(B, H, nq, block, device=q.device)
    acc = torch.zeros(B, H, nq, block, D, device=q.device)
    tok = torch.arange(bn, device=q.device)
    for t in range(idx.shape[-1] * split):
        active = (t // split) < cnt                                            # (B,H,nq)
        kb = idx[..., t // split].clamp_min(0)
        keys = (kb * block + (t % split) * bn)[..., None] + tok                # (B,H,nq,bn)
        gather = keys.view(B, H, nq * bn, 1).expand(B, H, nq * bn, D)
        kg = torch.gather(k8, 2, gather).view(B, H, nq, bn, D)
        vg = torch.gather(v8, 2, gather).view(B, H, nq, bn, D)
        rs = q_s * torch.gather(kv8.k_scale, 2, kb)[..., None]
        s = (q8 @ kg.transpose(-1, -2)) * rs[..., None]
        s = s.masked_fill((keys >= kv8.L)[:, :, :, None, :], -float("inf"))
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - (m_new - P_LOG2)[..., None])
        upd = active[..., None]
        l_i = torch.where(upd, l_i * alpha + p.sum(-1), l_i)
        acc = torch.where(upd[..., None], acc * alpha[..., None] + _q8(p) @ vg, acc)
        m = torch.where(upd, m_new, m)
    o = acc * (kv8.v_scale[:, :, None, None, :] / l_i[..., None]) + kv8.v_mean[:, :, None, None, :]
    o = o.view(B, H, nq * block, D)[:, :, :L]
    if bias is not None:
        b = bias.to(device=q.device, dtype=torch.float32).reshape(-1, H, 1, D)
        if gate_logit is not None:
            b = b * torch.sigmoid(gate_logit.to(device=q.device, dtype=torch.float32)).reshape(B, 1, 1, 1)
        o = o + b
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    out[:, rm] = o.transpose(1, 2).to(q.dtype)
    return out.permute(0, 2, 1, 3)


__all__ = ["FP8_CONFIGS", "KV8", "fp8_support", "fp8_config", "quantize_kv_fp8", "quantize_kv_fp8_ref",
           "block_sparse_attention_rowmap_fp8", "block_sparse_attention_fp8_ref", "quantize_rows_fp8",
           "quantize_rows_fp8_ref", "proj_fp8_support", "linear_fp8"]


# ----------------------------------------------------------------------------------------------
# the Proj GEMM in FP8 (precision "fp8_proj")
# ----------------------------------------------------------------------------------------------

ROWS_CONFIG = dict(BLOCK_R=16, BLOCK_K=512, num_warps=4)


def _check_rows(x: Tensor, what: str) -> None:
    if x.dim() != 2 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"{what} must be a 2-D fp16 / bf16 / fp32 matrix, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] and x.stride(1) != 1:
        raise ValueError(f"{what} must have a unit last stride, got strides {x.stride()}")


@torch.no_grad()
def quantize_rows_fp8(x: Tensor) -> Tuple[Tensor, Tensor]:
    """x (M, K) 16-bit or fp32 with a unit last stride -> (x8 (M, K) e4m3 contiguous, scale (M, 1) fp32), x ~= x8 *
    scale with scale = row amax / 448 (rounded to nearest even; an all-zero row gets a tiny scale).  One Triton
    kernel (the interpreter on CPU, for tests); :func:`quantize_rows_fp8_ref` is the torch version."""
    _check_rows(x, "quantize_rows_fp8: x")
    _require(x.device, "quantize_rows_fp8")
    from . import _triton_fp8 as tf
    from ._triton_ops import triton_cdiv
    M, K = x.shape
    x8 = torch.empty(M, K, device=x.device, dtype=FP8_DTYPE)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    c = ROWS_CONFIG
    tf._quant_rows_kernel[(max(1, triton_cdiv(M, c["BLOCK_R"])),)](x, x8, s, M, K, x.stride(0), BLOCK_R=c["BLOCK_R"],
                                                                  BLOCK_K=c["BLOCK_K"], EXACT_CAST=_interpreting(),
                                                                  num_warps=c["num_warps"])
    return x8, s


def quantize_rows_fp8_ref(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Plain-torch :func:`quantize_rows_fp8` (same rounding: IEEE division, round to nearest even)."""
    s = _over_max(x.float().abs().amax(1, keepdim=True).clamp_min(TINY))
    return (x.float() * (1.0 / s)).to(FP8_DTYPE), s


def proj_fp8_support(x: Tensor, w: Tensor) -> Optional[str]:
    """Why :func:`linear_fp8` cannot run for inputs like x (any shape, width x.shape[-1] = K) and w (N, K) (None:
    it can): it needs a CUDA card with FP8 tensor cores and a Triton with e4m3 (fp8_support), 16-bit activations,
    K and N divisible by 16, and a torch build whose ``_scaled_mm`` takes per-row scales with this output dtype on
    this card (asked once per device and dtype with a 16 x 16 x 16 product: some builds, e.g. Windows ones,
    lack that kernel)."""
    ok, why = fp8_support(x.device)
    if not ok:
        return f"no FP8 GEMM here ({why})"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {x.dtype}, not 16-bit"
    if w.dim() != 2 or w.shape[1] != x.shape[-1] or w.shape[0] % 16 or w.shape[1] % 16:
        return f"the weight is {tuple(w.shape)} for inputs of width {x.shape[-1]}; FP8 GEMMs need both sizes " \
               "divisible by 16"
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _rowwise_scaled_mm_unsupported(dev, x.dtype)


@functools.lru_cache(maxsize=None)
def _rowwise_scaled_mm_unsupported(index: int, dtype: torch.dtype) -> Optional[str]:
    """None when ``torch._scaled_mm`` with per-row scales and a ``dtype`` result runs on CUDA device ``index``,
    else why not (the error it raised)."""
    dev = torch.device("cuda", index)
    try:
        a = torch.ones(16, 16, device=dev).to(FP8_DTYPE)
        s = torch.ones(16, 1, device=dev, dtype=torch.float32)
        torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.reshape(1, 16), out_dtype=dtype, use_fast_accum=True)
    except Exception as e:  # noqa: BLE001 - any failure means: use the 16-bit GEMM
        return f"torch {torch.__version__} cannot run a per-row scaled FP8 GEMM with {dtype} output on {dev} " \
               f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    return None


@torch.no_grad()
def linear_fp8(x2d: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """x2d @ w^T (no bias) with both operands in e4m3: x2d (M, K) scaled per row, w (N, K) per output channel
    (:func:`quantize_rows_fp8`, one kernel each), then ``torch._scaled_mm`` with fp32 accumulation (Hopper's
    fast FP8 accumulate) into a (M, N) result of x2d's dtype (``out`` when given: a (M, N) contiguous buffer).
    e4m3 keeps 3 mantissa bits: the product differs from the 16-bit one by a few percent (relative L2) on
    random data."""
    _check_rows(x2d, "linear_fp8: x2d")
    _check_rows(w, "linear_fp8: w")
    a8, sa = quantize_rows_fp8(x2d)
    w8, sw = quantize_rows_fp8(w)
    kw = dict(scale_a=sa, scale_b=sw.reshape(1, -1), out_dtype=x2d.dtype, use_fast_accum=True)
    if out is not None:
        return torch._scaled_mm(a8, w8.t(), out=out, **kw)
    return torch._scaled_mm(a8, w8.t(), **kw)
