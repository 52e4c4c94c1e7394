"""Better block selection for SALAD's sparse branch (issue 12 item 2), measured on CPU at equal kept share.

Two stages (both CPU, torch only; no Triton, the product's selection is not changed):

``record``  samples ``--pairs`` testbed prompts (bench_quality's pairs, seeds and sampler) through
            Apply SALAD's patch at sparsity 0 (= dense attention, the dense trajectory) and keeps the
            q, k, v of every self-attention call at the sampler steps ``--record-steps`` (cond rows only,
            fp16) in ``--cache``.
``study``   for every recorded call and head, the exact attention (tile order, 4,096 x 4,096 per head)
            and, for each selection variant at sparsities ``--sparsities``, the attention output of the
            block-sparse softmax over the blocks the variant keeps (renormalised, exactly what the
            sparse kernel computes), optionally with centroid compensation.  Reported per variant:
            relative error ||o - o_dense|| / ||o_dense|| (mean over heads), the dense probability mass
            the kept keys hold, the kept share actually used, and on how many heads it beats the
            product's selection.  Writes ``--out`` (json) and prints a table.
``e2e``     (optional) whole-model check of block-level variants: bench_quality's sampling and metrics
            (PSNR / SSIM of the decoded videos vs dense) with ``salad_core.attention.select_blocks``
            replaced in this process by the variant's selector (the file is not edited).

Equal kept share: every variant keeps on average the same number of key blocks per query block as the
product's top-k (``keep_count(nk, s)``, own block included), never more: the fixed-k variants keep k
per row; the adaptive ones calibrate their threshold per attention call (bisection over all rows of the
call, largest setting whose mean count <= k; the kept share actually used is reported).

Variants (name = scoring/rule[+sink]):

scoring  ``mean``   the product: scale * mean(q block) . mean(k block) (+ log n_j)
         ``lseS``   log-sum-exp over sub-blocks of S tokens: each S-token query sub-block's estimated
                    mass share of every key block (logsumexp over the key block's sub-blocks of
                    scale * qbar_a . kbar_b + log S, normalised over all key blocks), averaged over the
                    query block's sub-blocks -> estimated mass of key block j for query block i
         ``maxS``   max over sub-block pairs of scale * qbar_a . kbar_b
         ``oracle`` the exact mass of key block j for query block i from dense attention (upper bound of
                    any selection from block statistics; study only)
rule     ``topk``   own block + the k-1 best others (the product's rule)
         ``thr``    keep every block whose estimated mass share >= t (own block forced); t per call
         ``thr2``   the same, but every row keeps at least its own and its best other block
         ``cumrow`` per row, the fewest best blocks whose estimated mass reaches tau (own first)
         ``cumhead`` per head, one count k_h for all its rows: the mean per-row count of cumrow at tau
sink     ``+first`` key block 0 always kept (inside the same budget)
         ``+col``   per head, the key block with the largest estimated mass summed over query blocks
         ``+tok``   per head, the 128 tokens with the largest estimated received attention (query block
                    means vs every key) as an extra key set, with k-1 blocks (study only: not a block)
         ``+augT``  token_aug (core Sol-Attn's routed tokens): the product's top-k at ceil(T/128) fewer
                    blocks, plus per query block the T key tokens outside its kept blocks with the largest
                    scale * mean(q block) . k_t, attended exactly (equal attended count for T a multiple of
                    128; T=64 attends 64 fewer).  With centroids, a skipped block's pseudo-token stands for
                    its tokens not routed (weight exp(scale q . kbar + log(128 - routed))).  Study only.
         ``+oaugT`` the same with the T tokens of the largest exact mean attention of the query block

Findings (CPU, 2026-11-28; results/2026-11-28-selection-cpu*.json: 24 calls = 6 blocks x steps 0/3/6/9 of
10 x 2 pairs' cond rows x 2 heads = 96 heads; mean relative error, change vs the product's mean/topk):

  sparsity  compensation  mean/topk  lse16/topk       oracle/topk      best thr/thr2        +col sink
  0.8       none          0.158      0.154 (-2.5%)    0.148 (-6.3%)    0.172 (+8.6%)        +5.3%
  0.8       centroid      0.137      0.129 (-5.5%)    0.117 (-14.6%)   0.149 (+9.1%)        +6.8%
  0.9       none          0.257      0.256 (-0.4%)    0.254 (-1.3%)    0.266 (+3.6%)        +15.9%
  0.9       centroid      0.211      0.206 (-2.5%)    0.191 (-9.4%)    0.212 (+0.3%)        +12.9%
  0.95      none          0.329      0.326 (-0.9%)    0.332 (+0.9%)    0.329 (0%: = topk)   +26.2%
  0.95      centroid      0.251      0.245 (-2.6%)    0.238 (-5.0%)    0.246 (-2.0%)        +23.1%

* per-head / per-row adaptive budgets (cumrow, cumhead) are 5-45% worse at equal share; a global
  threshold (thr, thr2) is 0-15% worse without compensation and within +-2% with it: the rows it starves lose
  more than the rows it feeds gain.  Not worth a kernel.
* sinks (first block, top column block, 128 top tokens) are worse everywhere (+4% to +58%): this model's
  attention has no sink to keep; the budget they take is missed elsewhere.
* log-sum-exp scoring over 16-token (or 8-token) sub-blocks is the only consistent gain (wins on 41-70% of
  heads), but small: 0.4-2.5% without compensation, 2.5-5.5% with centroids; max-scoring is worse.
* even an oracle that knows each block's exact mass gains only 1-6% without compensation: at block
  granularity the selection is not where the error is; the kept share is.
* centroid compensation lowers the per-head attention error by 14-24% at every sparsity, unlike the
  whole-model CPU check (-1.1 dB): per-layer error on the dense trajectory does not predict the video.

token_aug at equal attended count (results/2026-11-28-selection-cpu-tokenaug.json, same 96 heads; mean
relative error vs mean/topk at the same compensation, share of heads where it wins):

  sparsity  compensation  mean/topk  +aug64 (-64 tok)  +aug128         +aug256         +oaug128 (oracle)
  0.8       none          0.158      +6.3%  (0.51)     +1.6%  (0.62)   +5.5%  (0.58)   -6.2%  (0.65)
  0.8       centroid      0.137      -12.4% (0.85)     -22.0% (0.96)   -25.1% (0.91)   -36.8% (1.00)
  0.9       none          0.257      +20.6% (0.31)     +9.7%  (0.57)   +16.7% (0.51)   +3.1%  (0.60)
  0.9       centroid      0.211      -9.1%  (0.70)     -20.8% (0.94)   -21.3% (0.88)   -37.1% (1.00)
  0.95      none          0.329      +34.3% (0.20)     +15.3% (0.50)   (0 blocks)      +10.2% (0.59)
  0.95      centroid      0.251      -3.0%  (0.61)     -17.1% (0.84)   (0 blocks)      -33.8% (1.00)

* without compensation, trading a block for routed tokens is worse on the mean (+2% to +34%) although the
  kept mass rises (0.48 -> 0.53 at 0.9): even oracle-chosen tokens lose at 0.9/0.95.  The median head gains
  (aug128: -1% / -10% / -4% at 0.8 / 0.9 / 0.95); the loss is a tail, mostly block 4 (0.32 -> 0.44 at 0.9)
  and block 0, where the dropped block's mass is spread and the routed tokens skew the renormalised output.
* with centroids it is the largest gain in this study: -17% to -25% (T = 128..384, wins on 84-96% of heads),
  oracle tokens -34% to -42%; T=128 (one block traded) takes most of it.  Per-head error with centroids
  did not predict the video before (see above): check it end to end before building a kernel.

  python benchmarks/selection_study.py record --pairs 2 --steps 10 --record-steps 0,3,6,9
  python benchmarks/selection_study.py study --out benchmarks/results/2026-11-28-selection-cpu.json
  python benchmarks/selection_study.py study --variants mean/topk,mean/topk+aug64,mean/topk+aug128,\
      mean/topk+aug256,mean/topk+aug384,mean/topk+oaug128,mean/topk+oaug256 \
      --out benchmarks/results/2026-11-28-selection-cpu-tokenaug.json
  python benchmarks/selection_study.py e2e --variants mean/topk,lse32/topk --pairs 2 --steps 10
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_quality as bq  # noqa: E402  (also puts tests/ on sys.path)
from sol_attn_peer import bisect_falling  # noqa: E402

BLOCK = 128
SINK_TOKENS = 128
DEFAULT_VARIANTS = (
    "mean/topk", "oracle/topk",
    "lse32/topk", "lse16/topk", "max32/topk",
    "mean/thr", "mean/thr2", "mean/cumrow", "mean/cumhead",
    "lse32/thr", "lse32/thr2", "lse32/cumrow", "lse32/cumhead",
    "mean/topk+first", "mean/topk+col", "mean/topk+tok",
    "lse32/topk+col", "lse32/thr+col", "oracle/thr", "oracle/thr2",
)


# ----------------------------------------------------------------------------------------------
# scoring: (B,H,L,D) tile-ordered q, k -> (B,H,nq,nk) log estimated mass (or a score for topk)
# ----------------------------------------------------------------------------------------------

def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    B, H, L, D = x.shape
    if L % size:
        raise ValueError(f"selection_study: sequence length {L} must be a multiple of {size}")
    return x.float().reshape(B, H, L // size, size, D).mean(3)


def block_scores(q: torch.Tensor, k: torch.Tensor, scoring: str, scale: float, block: int = BLOCK) -> torch.Tensor:
    """Row-normalised log mass estimates (B,H,nq,nk) for ``mean`` / ``lseS``; raw scores for ``maxS``."""
    if scoring == "mean":
        s = scale * _pool(q, block) @ _pool(k, block).transpose(-1, -2) + math.log(block)
        return torch.log_softmax(s, -1)
    sub = int(scoring[3:])
    if block % sub:
        raise ValueError(f"selection_study: sub-block {sub} must divide the block {block}")
    a = block // sub
    t = scale * _pool(q, sub) @ _pool(k, sub).transpose(-1, -2) + math.log(sub)   # (B,H,nq*a,nk*a)
    B, H, nqa, nka = t.shape
    t = t.view(B, H, nqa, nka // a, a)
    if scoring.startswith("max"):
        return t.view(B, H, nqa // a, a, nka // a, a).amax(dim=(3, 5))
    if not scoring.startswith("lse"):
        raise ValueError(f"selection_study: unknown scoring {scoring!r}")
    per_sub = torch.log_softmax(torch.logsumexp(t, -1), -1)                       # (B,H,nq*a,nk)
    return torch.logsumexp(per_sub.view(B, H, nqa // a, a, -1), 3) - math.log(a)


# ----------------------------------------------------------------------------------------------
# rules: log mass (B,H,nq,nk) + forced (B,H,nq,nk) bool -> keep mask, mean count <= k
# ----------------------------------------------------------------------------------------------

def own_blocks(B: int, H: int, nq: int, nk: int, device=None) -> torch.Tensor:
    f = torch.zeros(B, H, nq, nk, dtype=torch.bool, device=device)
    r = torch.arange(min(nq, nk), device=device)
    f[:, :, r, r] = True
    return f


def rule_topk(score: torch.Tensor, forced: torch.Tensor, k: int) -> torch.Tensor:
    s = score.masked_fill(forced, math.inf)
    kk = max(k, int(forced.sum(-1).max()))
    keep = torch.zeros_like(forced)
    keep.scatter_(-1, s.topk(kk, -1).indices, True)
    if kk > k:                    # rows with fewer forced blocks keep k, not kk
        rank = s.argsort(-1, descending=True).argsort(-1)
        keep &= rank < torch.clamp(forced.sum(-1, keepdim=True), min=k)
    return keep | forced


def _calibrate(count_fn, k: float, lo: float, hi: float) -> float:
    """Parameter p in [lo, hi] (count falls as p rises) with the largest mean count <= k."""
    return bisect_falling(count_fn, k, lo, hi)[1]


def rule_thr(logm: torch.Tensor, forced: torch.Tensor, k: int, floor: int = 1):
    """Global threshold on the estimated mass share; every row keeps at least its ``floor`` best blocks."""
    if floor > 1:
        forced = rule_topk(logm, forced, min(floor, k))
    t = _calibrate(lambda t: float(((logm >= t) | forced).float().sum(-1).mean()), k, -60.0, 0.0)
    return (logm >= t) | forced, t


def _cum_counts(logm: torch.Tensor, forced: torch.Tensor, tau: float) -> torch.Tensor:
    """Keep mask: per row the best blocks (forced first) until the mass before the next reaches tau."""
    key = logm.masked_fill(forced, math.inf)
    order = key.argsort(-1, descending=True)
    m = logm.exp().gather(-1, order)
    before = m.cumsum(-1) - m
    keep_sorted = (before < tau) | forced.gather(-1, order)
    keep = torch.zeros_like(forced)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def rule_cumrow(logm, forced, k):
    # the bisection runs on x = 1 - tau (the count falls as x rises)
    x = _calibrate(lambda x: float(_cum_counts(logm, forced, 1 - x).float().sum(-1).mean()), k, 0.0, 1.0)
    return _cum_counts(logm, forced, 1 - x), 1 - x


def rule_cumhead(logm, forced, k):
    def per_head(x):
        c = _cum_counts(logm, forced, 1 - x).float().sum(-1).mean(-1)          # (B,H) mean count
        return c.round().clamp(min=1).long()
    x = _calibrate(lambda x: float(per_head(x).float().mean()), k, 0.0, 1.0)
    kh = per_head(x)
    keep = torch.zeros_like(forced)
    for b in range(kh.shape[0]):
        for h in range(kh.shape[1]):
            keep[b, h] = rule_topk(logm[b, h], forced[b, h], int(kh[b, h]))
    return keep, 1 - x


def sink_blocks(logm: torch.Tensor, kind: str) -> torch.Tensor:
    """(B,H,nq,nk) forced mask of the sink block(s)."""
    B, H, nq, nk = logm.shape
    f = torch.zeros(B, H, nq, nk, dtype=torch.bool, device=logm.device)
    if kind == "first":
        f[..., 0] = True
    elif kind == "col":
        col = logm.exp().sum(2).argmax(-1)                                      # (B,H)
        f.scatter_(-1, col.view(B, H, 1, 1).expand(B, H, nq, 1), True)
    else:
        raise ValueError(f"selection_study: unknown sink {kind!r}")
    return f


def sink_tokens(q: torch.Tensor, k: torch.Tensor, scale: float, n: int = SINK_TOKENS, block: int = BLOCK):
    """(B,H,n) token indices with the largest received attention from the query block means."""
    a = torch.softmax(scale * _pool(q, block) @ k.float().transpose(-1, -2), -1)   # (B,H,nq,L)
    return a.sum(2).topk(n, -1).indices


def aug_tokens(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, n: int, scale: float, oracle: bool = False,
               block: int = BLOCK) -> torch.Tensor:
    """(B,H,nq,n) key token indices per query block outside its kept blocks (token_aug): the n best by
    scale * mean(q block) . k_t, or (``oracle``) by the query block's exact mean attention on token t."""
    if oracle:
        sc = torch.stack([torch.stack([torch.softmax(scale * q[b, h].float() @ k[b, h].float().T, -1)
                                       .view(-1, block, k.shape[2]).mean(1) for h in range(q.shape[1])])
                          for b in range(q.shape[0])])
    else:
        sc = scale * _pool(q, block) @ k.float().transpose(-1, -2)                  # (B,H,nq,L)
    sc = sc.masked_fill(keep.repeat_interleave(block, -1), -math.inf)
    return sc.topk(n, -1).indices


def parse_aug(sink: str):
    """``augT`` / ``oaugT`` -> (T, oracle) or None."""
    m = re.fullmatch(r"(o?)aug(\d+)", sink)
    return (int(m.group(2)), m.group(1) == "o") if m else None


def parse_variant(name: str):
    base, _, sink = name.partition("+")
    scoring, _, rule = base.partition("/")
    if parse_aug(sink) and rule != "topk":
        raise ValueError(f"selection_study: {name}: token_aug (+augT) only with topk")
    if (rule not in ("topk", "thr", "thr2", "cumrow", "cumhead")
            or (sink not in ("", "first", "col", "tok") and not parse_aug(sink))):
        raise ValueError(f"selection_study: bad variant {name!r} (scoring/rule[+sink])")
    if scoring.startswith("max") and rule != "topk":
        raise ValueError(f"selection_study: {name}: max scores are not masses; only topk")
    return scoring, rule, sink


def select(q, k, variant: str, k_blocks: int, scale: float, oracle=None, block: int = BLOCK):
    """Keep mask (B,H,nq,nk), calibrated parameter (or None), sink token indices (or None)."""
    scoring, rule, sink = parse_variant(variant)
    logm = oracle if scoring == "oracle" else block_scores(q, k, scoring, scale, block)
    B, H, nq, nk = logm.shape
    forced = own_blocks(B, H, nq, nk, logm.device)
    toks = None
    kb = k_blocks
    aug = parse_aug(sink)
    if aug:
        kb = k_blocks - -(-aug[0] // block)          # the block budget drops by ceil(T / block)
        if kb < 1:
            raise ValueError(f"selection_study: {variant} needs at least 2 kept blocks")
        keep = rule_topk(logm, forced, kb)
        return keep, None, aug_tokens(q, k, keep, aug[0], scale, oracle=aug[1], block=block)
    if sink == "tok":
        toks = sink_tokens(q, k, scale, block=block)
        kb = k_blocks - 1
        if kb < 1:
            raise ValueError(f"selection_study: {variant} needs at least 2 kept blocks")
    elif sink:
        forced = forced | sink_blocks(logm, sink)
    if rule == "topk":
        return rule_topk(logm, forced, kb), None, toks
    fn = dict(thr=rule_thr, thr2=lambda *x: rule_thr(*x, floor=2), cumrow=rule_cumrow, cumhead=rule_cumhead)[rule]
    keep, p = fn(logm, forced, kb)
    return keep, p, toks


def lut_from_mask(keep: torch.Tensor):
    """Keep mask (B,H,nq,nk) -> (idx int32 ascending, -1 padded; cnt int32) as the kernels take them."""
    nk = keep.shape[-1]
    ar = torch.arange(nk, device=keep.device, dtype=torch.int32)
    vals = torch.where(keep, ar, torch.full_like(ar, nk)).sort(-1).values
    cnt = keep.sum(-1).to(torch.int32)
    kmax = max(1, int(cnt.max()))
    idx = vals[..., :kmax]
    return torch.where(idx == nk, torch.full_like(idx, -1), idx).contiguous(), cnt.contiguous()


# ----------------------------------------------------------------------------------------------
# exact per-head partials and variant outputs
# ----------------------------------------------------------------------------------------------

class HeadPartials:
    """Dense attention of one head (L, D) split by key block: den[r, j] = mass of row r in block j,
    num[r, j] = its mass-weighted value sum; centroid pseudo-token weights c[r, j]."""

    def __init__(self, q, k, v, scale, block=BLOCK):
        q, k, v = q.float(), k.float(), v.float()
        L, D = q.shape
        nk = L // block
        s = scale * q @ k.T
        self.lse = torch.logsumexp(s, -1)
        p = torch.exp(s - self.lse[:, None])
        del s
        self.p = p
        pb = p.view(L, nk, block)
        self.den = pb.sum(-1)
        self.num = torch.einsum("rjt,jtd->rjd", pb, v.view(nk, block, D))
        self.o = self.num.sum(1)
        self.v, self.block, self.nk = v, block, nk
        kbar, self.vbar = k.view(nk, block, D).mean(1), v.view(nk, block, D).mean(1)
        self.c = torch.exp(scale * q @ kbar.T + math.log(block) - self.lse[:, None])

    def oracle(self) -> torch.Tensor:
        """(nq, nk) log of the exact mean mass of key block j over query block i's rows."""
        return self.den.view(-1, self.block, self.nk).mean(1).clamp_min(1e-30).log()

    def output(self, keep_blocks: torch.Tensor, compensate: bool = False, toks=None):
        """(o (L, D), kept mass per row mean) of the block-sparse softmax over keep_blocks (nq, nk)."""
        mr = keep_blocks.repeat_interleave(self.block, 0).float()                 # (L, nk)
        num = torch.einsum("rj,rjd->rd", mr, self.num)
        den = (mr * self.den).sum(1)
        if toks is not None and toks.dim() == 2:   # token_aug: (nq, T) tokens per query block, outside keep
            nq, T = toks.shape
            D = self.v.shape[1]
            pg = self.p.view(nq, self.block, -1).gather(2, toks[:, None, :].expand(nq, self.block, T))
            num = num + torch.bmm(pg, self.v[toks]).reshape(-1, D)
            den = den + pg.sum(-1).reshape(-1)
            if compensate:        # a skipped block's centroid stands for its tokens not routed (weight share)
                routed = torch.zeros(nq, self.nk).scatter_add_(1, toks // self.block, torch.ones(nq, T))
                mr = mr + (routed / self.block).repeat_interleave(self.block, 0)
        elif toks is not None:
            tmask = torch.zeros(self.p.shape[1], dtype=torch.bool)
            tmask[toks] = True
            outside = (1 - mr).repeat_interleave(self.block, 1).bool() & tmask      # (L, L): sink keys not kept
            pt = self.p * outside
            num = num + pt @ self.v
            den = den + pt.sum(1)
        mass = float(den.mean())
        if compensate:
            w = (1 - mr) * self.c
            num = num + w @ self.vbar
            den = den + w.sum(1)
        return num / den[:, None], mass


def rel_err(o, ref) -> float:
    return float((o - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------------
# record
# ----------------------------------------------------------------------------------------------

class CallRecorder:
    """``trainer.capture`` store: q, k, v (cond rows, fp16) of every SALAD call at the wanted steps."""

    def __init__(self, steps_wanted):
        self.steps_wanted = set(steps_wanted)
        self.sigmas = []          # sigma of every model call, in order
        self.cond_rows = None
        self.calls = []

    def wrapper(self, apply_model, args):
        sig = float(args["timestep"].reshape(-1)[0])
        if not self.sigmas or self.sigmas[-1] != sig:
            self.sigmas.append(sig)
        cu = list(args.get("cond_or_uncond") or [0])
        n = args["input"].shape[0] // len(cu)
        self.cond_rows = [r for i, c in enumerate(cu) if c == 0 for r in range(i * n, (i + 1) * n)]
        return apply_model(args["input"], args["timestep"], **args["c"])

    def add(self, *, q, k, v, heads, grid, n_front=0, n_back=0, block_id=None, **_):
        step = len(self.sigmas) - 1
        if step not in self.steps_wanted:
            return
        rows = torch.tensor(self.cond_rows or list(range(q.shape[0])))
        self.calls.append(dict(step=step, sigma=self.sigmas[-1], block_id=block_id, heads=int(heads),
                               grid=tuple(int(g) for g in grid), n_front=int(n_front), n_back=int(n_back),
                               **{n: t.index_select(0, rows.to(t.device)).to("cpu", torch.float16)
                                  for n, t in (("q", q), ("k", k), ("v", v))}))


def load_model_and_inputs(pairs: int, latent: str):
    import comfy.sample
    import comfy.sd
    model = comfy.sd.load_diffusion_model(str(bq.MODEL_PATH))
    _, seeds, ctx, neg, empty, noise = bq.pair_inputs(pairs, [int(x) for x in latent.split(",")])

    def sample(m, steps, cfg=5.0):
        lat = empty.expand(pairs, -1, -1, -1, -1).contiguous()
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise, steps, cfg, "euler", "simple", [[ctx, {}]], [[neg, {}]], lat,
                                      disable_pbar=True, seed=seeds[0])
        return out.float().cpu()
    return model, sample


def record(a):
    from salad_pack.nodes.patch import PatchOptions, apply_salad
    from salad_pack.salad_core.trainer import capture
    model, sample = load_model_and_inputs(a.pairs, a.latent)
    rec = CallRecorder(int(s) for s in a.record_steps.split(","))
    m = apply_salad(model, PatchOptions(sparsity=0.0, pattern="topk", backend="torch"))
    m.set_model_unet_function_wrapper(rec.wrapper)
    t0 = time.perf_counter()
    with capture(rec):
        sample(m, a.steps)
    meta = dict(pairs=a.pairs, steps=a.steps, record_steps=a.record_steps, latent=a.latent,
                model=bq.MODEL_PATH.name, bench_seed=bq.BENCH_SEED, sigmas=rec.sigmas,
                seconds=round(time.perf_counter() - t0, 1))
    torch.save(dict(meta=meta, calls=rec.calls), a.cache)
    print(f"[selection] recorded {len(rec.calls)} calls (steps {a.record_steps} of {a.steps}, {a.pairs} pairs) "
          f"in {meta['seconds']} s -> {a.cache}", flush=True)


# ----------------------------------------------------------------------------------------------
# study
# ----------------------------------------------------------------------------------------------

def study(a):
    from salad_pack.kernels import keep_count
    from salad_pack.salad_core.tiling import TileLayout
    blob = torch.load(a.cache)
    calls = blob["calls"]
    if a.max_calls:
        calls = calls[:: max(1, len(calls) // a.max_calls)][: a.max_calls]
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    sparsities = [float(s) for s in a.sparsities.split(",")]
    comps = [c == "centroid" for c in a.compensation.split(",")]
    acc = {}          # (variant, s, comp) -> lists
    t0 = time.perf_counter()
    for ci, c in enumerate(calls):
        B, L, HD = c["q"].shape
        H = c["heads"]
        D = HD // H
        layout = TileLayout.get(c["grid"], c["n_front"], c["n_back"], (2, 8, 8), "cpu")
        q, k, v = (c[n].float().view(B, L, H, D).index_select(1, layout.perm).permute(0, 2, 1, 3)
                   for n in ("q", "k", "v"))
        scale = 1.0 / math.sqrt(D)
        parts = [[HeadPartials(q[b, h], k[b, h], v[b, h], scale) for h in range(H)] for b in range(B)]
        oracle = torch.stack([torch.stack([p.oracle() for p in row]) for row in parts])
        nk = L // BLOCK
        for s in sparsities:
            kb = keep_count(nk, s)
            for var in variants:
                try:
                    keep, param, toks = select(q, k, var, kb, scale, oracle=oracle)
                except ValueError as e:
                    if "at least 2" in str(e):
                        continue
                    raise
                aug = parse_aug(parse_variant(var)[2])
                for comp in comps:
                    if comp and toks is not None and not aug:
                        continue
                    r = acc.setdefault((var, s, comp), dict(err=[], mass=[], share=[], param=[], layer=[]))
                    for b in range(B):
                        for h in range(H):
                            o, mass = parts[b][h].output(keep[b, h], comp, None if toks is None else toks[b, h])
                            r["err"].append(rel_err(o, parts[b][h].o))
                            r["mass"].append(mass)
                            r["layer"].append(c["block_id"])
                    extra = aug[0] if aug else SINK_TOKENS if toks is not None else 0
                    share = float(keep.float().sum(-1).mean()) / nk + extra / L
                    r["share"].append(share)
                    if param is not None:
                        r["param"].append(param)
        print(f"[selection] call {ci + 1}/{len(calls)} (step {c['step']}, block {c['block_id']}) "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    rows = summarise(acc, variants, sparsities)
    res = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               cpu=platform.processor() or platform.machine(), torch=torch.__version__, record=blob["meta"],
               calls=len(calls), heads_per_call=calls[0]["q"].shape[0] * calls[0]["heads"], block=BLOCK,
               seconds=round(time.perf_counter() - t0, 1), rows=rows,
               notes=("rel_err: ||o - o_dense|| / ||o_dense|| of one head's attention output (tile order), mean "
                      "over recorded calls x cond rows x heads; mass: dense probability mass on the kept keys "
                      "(mean over query rows); share: kept key share used (mean over calls); wins: heads where "
                      "the variant's error is below mean/topk's at the same sparsity and compensation; "
                      "param: calibrated threshold (thr: log mass share; cum*: tau) mean/min/max over calls"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print_table(rows)
    print(f"[selection] wrote {a.out}", flush=True)
    return res


def summarise(acc, variants, sparsities):
    rows = []
    for (var, s, comp), r in acc.items():
        base = acc.get(("mean/topk", s, comp))
        err = torch.tensor(r["err"])
        row = dict(variant=var, sparsity=s, compensation="centroid" if comp else "none",
                   rel_err=float(err.mean()), rel_err_median=float(err.median()),
                   mass=float(torch.tensor(r["mass"]).mean()), share=float(torch.tensor(r["share"]).mean()),
                   heads=len(err))
        if base is not None:
            be = torch.tensor(base["err"])
            row["wins"] = float((err < be - 1e-7).float().mean())
            row["vs_topk"] = float(err.mean() / be.mean() - 1)
        layers = sorted(set(r["layer"]))
        lt = torch.tensor(r["layer"])
        row["rel_err_per_layer"] = {str(b): float(err[lt == b].mean()) for b in layers}
        if r["param"]:
            p = torch.tensor(r["param"])
            row["param"] = dict(mean=float(p.mean()), min=float(p.min()), max=float(p.max()))
        rows.append(row)
    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda x: (x["sparsity"], x["compensation"], order[x["variant"]]))
    return rows


def print_table(rows):
    print(f"{'sparsity':>8} {'comp':<9}{'variant':<18}{'rel_err':>8}{'vs topk':>9}{'wins':>6}{'mass':>7}{'share':>7}")
    for r in rows:
        print(f"{r['sparsity']:>8} {r['compensation']:<9}{r['variant']:<18}{r['rel_err']:>8.4f}"
              f"{100 * r.get('vs_topk', 0):>8.1f}%{r.get('wins', 0):>6.2f}{r['mass']:>7.3f}{r['share']:>7.4f}")


# ----------------------------------------------------------------------------------------------
# e2e: whole-model PSNR with the product's select_blocks replaced in this process
# ----------------------------------------------------------------------------------------------

def make_selector(variant: str):
    """A ``salad_core.attention.select_blocks`` stand-in running ``variant`` (block-level variants)."""
    from salad_pack.kernels import keep_count, pool_blocks  # noqa: F401
    sink = parse_variant(variant)[2]
    if sink == "tok" or parse_aug(sink) or variant.startswith("oracle"):
        raise ValueError(f"selection_study: {variant} is not a block-level selection (study only)")

    def select_blocks(qh, kh, layout, config, q_rowmap=None, k_pooled=None, q_pooled=None):
        if q_rowmap is not None:
            qh = qh.index_select(2, q_rowmap.to(qh.device, torch.long))
        nk = kh.shape[2] // config.block
        scale = 1.0 / math.sqrt(qh.shape[-1])
        keep, _, _ = select(qh, kh, variant, keep_count(nk, config.sparsity), scale, block=config.block)
        return lut_from_mask(keep)
    return select_blocks


def e2e(a):
    import salad_pack.salad_core.attention as attn
    from salad_pack.nodes.patch import PatchOptions, apply_salad
    model, sample = load_model_and_inputs(a.pairs, a.latent)
    from salad_pack.testbed import codec as tb_codec
    codec = tb_codec.load_codec(device="cpu")
    original = attn.select_blocks
    t0 = time.perf_counter()
    ref = codec.decode(sample(model, a.steps))
    print(f"[selection] dense {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for var in [v for v in a.variants.split(",") if v]:
        attn.select_blocks = original if var == "product" else make_selector(var)
        try:
            t0 = time.perf_counter()
            vid = codec.decode(sample(apply_salad(model, PatchOptions(sparsity=a.sparsity, pattern="topk",
                                                                      start_percent=a.start, backend="torch")),
                                      a.steps))
        finally:
            attn.select_blocks = original
        psnr, ssim = bq.psnr_per_video(vid, ref).tolist(), bq.ssim_per_video(vid, ref).tolist()
        rows.append(dict(variant=var, sparsity=a.sparsity, start_percent=a.start, psnr=sum(psnr) / len(psnr),
                         ssim=sum(ssim) / len(ssim), psnr_per_pair=[round(p, 3) for p in psnr],
                         seconds=round(time.perf_counter() - t0, 1)))
        print(f"[selection] e2e {var:<16} PSNR {rows[-1]['psnr']:.3f} dB SSIM {rows[-1]['ssim']:.4f} "
              f"{rows[-1]['seconds']}s", flush=True)
        res = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), pairs=a.pairs,
                   steps=a.steps, latent=a.latent, rows=rows,
                   notes="PSNR/SSIM of decoded videos vs dense (bench_quality metrics); CPU, torch backend")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    return rows


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("record", "study", "e2e"))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--record-steps", default="0,3,6,9")
    ap.add_argument("--latent", default="16,16,32,32")
    ap.add_argument("--cache", default="/tmp/selection_study_calls.pt")
    ap.add_argument("--max-calls", type=int, default=0, help="study: use at most this many recorded calls")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--compensation", default="none,centroid")
    ap.add_argument("--sparsity", type=float, default=0.9, help="e2e")
    ap.add_argument("--start", type=float, default=0.0, help="e2e start_percent")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.variants is None:
        a.variants = ",".join(DEFAULT_VARIANTS) if a.stage == "study" else "product,mean/topk,lse32/topk"
    if a.out is None:
        a.out = str(Path("/tmp") / f"selection_{a.stage}.json")
    return a


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from _pack import register
    register()
    if a.stage != "study":
        bq.import_comfy(smoke=False)
    return dict(record=record, study=study, e2e=e2e)[a.stage](a)


if __name__ == "__main__":
    main()
