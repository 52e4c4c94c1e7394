"""The option vocabulary of SALAD, in one place: selection patterns, backends, compensations,
their defaults, and the block-list syntax ("0,1,28-29") shared by node inputs and weight files.

Adding a selection pattern starts here (``PATTERNS``); nodes, core, trainer and the weight format
all read these names.  Nothing here imports torch or ComfyUI.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional

PATTERNS = ("topk", "window")
BACKENDS = ("auto", "triton", "torch")
COMPENSATIONS = ("none", "centroid")
# precision at inference: "bf16" = the model's 16-bit dtype everywhere (exact block-sparse softmax); "fp8" = the
# sparse branch's Q.K and P.V in e4m3 on FP8 tensor cores (Hopper/Ada; kernels/fp8.py); "fp8_proj" = bf16
# attention, the d x d Proj GEMM in e4m3 (kernels.fp8.linear_fp8); where FP8 cannot run they fall back to bf16
PRECISIONS = ("bf16", "fp8", "fp8_proj")

DEFAULT_PATTERN = "topk"          # what the Apply node and the quality benchmark use
DEFAULT_SPARSITY = 0.9
DEFAULT_BACKEND = "auto"
DEFAULT_COMPENSATION = "none"
DEFAULT_PRECISION = "bf16"
# Chosen from measurements (benchmarks/results/2026-11-28-sweep-nvidia_h200.json and the e2e table):
# start_percent 0.2 keeps the layout-forming first steps dense (+4.7 dB PSNR vs dense on the testbed at 90%
# top-k, for an estimated 2.1x -> 1.65x end to end); sequences under 12,288 tokens stay dense (Wan2.1-1.3B
# 832x480x17 = 7,800 tokens ran 0.59x-1.0x of dense with SALAD on an H200; 14,040 tokens already 1.41x).
DEFAULT_START_PERCENT = 0.2
DEFAULT_MIN_TOKENS = 12288

MAX_NUM_BLOCKS = 4096             # Wan 14B has 40; anything near this is a crafted file
ERROR_QUOTE_LIMIT = 200
BLOCK_LIST_EXAMPLE = "'0,1,28-29'"
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_NUMBER = re.compile(r"-?\d+")


def clip(value, limit: int = ERROR_QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: "'0-1,3...' ... (1048576 chars)".
    Errors end up in ComfyUI's UI, history and log, so no input is ever quoted whole."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


def parse_block_list(text, num_blocks: Optional[int] = None, *, from_end: bool = True,
                     name: Optional[str] = None) -> List[int]:
    """"0-3, 7;9-10" -> [0, 1, 2, 3, 7, 9, 10] (sorted, unique).  Raises ValueError.

    Items are separated by "," or ";"; an item is a block number or a range "a-b" (a <= b, both
    >= 0).  Empty text gives [].

    ``num_blocks``: every block must be in [0, num_blocks).  With ``from_end`` (the default) a
    single negative number counts from the end ("-1" = last block); ``from_end=False`` refuses
    negatives (weight-file metadata).  Without ``num_blocks`` negatives are refused and blocks are
    bounded by MAX_NUM_BLOCKS.  The bound is checked before a range is expanded, so a crafted
    "0-1000000000" costs nothing.

    ``name``: prefix of the error messages (e.g. the node input "dense_blocks").  Errors quote the
    input clipped (:func:`clip`)."""
    s = str(text if text is not None else "").strip()
    if not s:
        return []
    prefix = f"{name}: " if name else ""
    negatives = num_blocks is not None and from_end
    cap = MAX_NUM_BLOCKS if num_blocks is None else int(num_blocks)
    out = set()
    for raw in s.replace(";", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        m = _RANGE.fullmatch(item)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
            elif _NUMBER.fullmatch(item):
                lo = hi = int(item)
            else:
                raise ValueError
        except ValueError:                      # also numbers too long for int()
            lo, hi = 0, -1
        if hi < lo:
            raise ValueError(f"{prefix}cannot read {clip(item, 60)} in {clip(s)}; expected block numbers "
                             f"and ranges such as {BLOCK_LIST_EXAMPLE}")
        if lo < 0:
            if not negatives:
                raise ValueError(f"{prefix}negative block {clip(item, 60)} in {clip(s)} is not allowed here; "
                                 f"expected block numbers >= 0 and ranges such as {BLOCK_LIST_EXAMPLE}")
            lo = hi = lo + cap
        if not (0 <= lo and hi < cap):          # checked before expanding
            if num_blocks is None:
                what = f"it exceeds the limit of {cap} blocks"
            else:
                what = f"there are {cap} blocks (0-{cap - 1})"
            raise ValueError(f"{prefix}block {clip(item, 60)} in {clip(s)} is out of range; {what}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_block_list(ids: Iterable[int]) -> str:
    """[0,1,2,3,7,9,10] -> "0-3,7,9-10" (the inverse of :func:`parse_block_list`)."""
    ids = sorted(set(int(i) for i in ids))
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)
