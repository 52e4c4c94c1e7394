"""Deterministic caption encoder for the SALAD testbed: caption -> Wan text context (B, 512, 4096).

No learned weights.  Wan's cross-attention has no position encoding on the context, so the
structure of a caption is written into the tokens themselves:

* The caption is lower-cased and split into clauses at "," and " and " (data.py's grammar puts one
  object, or the camera, in each clause).
* Clause i becomes context token i:  normalise( sum of its word vectors + slot vector i ) * TOKEN_RMS.
  Word vector = a fixed N(0, 1) vector of 4096 values seeded by SHA-256 of the word; slot vector i
  = the same for the key "<slot i>" (so the order of objects, which is their depth order, is
  visible).  A colour word right after "turns" is keyed "turns:<colour>" (the colour an object
  changes to is a different feature from the colour it starts with).
* Only VOCAB words count; any other word ("a", "the", "then", typos) is ignored, and a clause with
  no known word gives no token.  Tokens after the last clause are zero, as in Wan's padded umT5
  context; the empty caption "" gives all zeros (the unconditional / negative prompt).
* TOKEN_RMS = 1.0: with Wan's text_embedding (Linear 4096->dim, GELU, Linear) initialised with
  fan-in scaling, unit-RMS tokens give unit-scale pre-activations.  (Real umT5 outputs are smaller,
  but this model is trained from scratch on this encoder, so only the scale relative to the init
  matters.)  No whole-caption token is added: a bag of all words would mix up which colour goes
  with which shape.

VOCAB: colours red green blue yellow cyan magenta white (and "turns:<colour>"); shapes square
circle triangle; motion moves bounces stays circles spinning turns; directions left right up down;
camera camera pans.
"""
from __future__ import annotations

import hashlib
import re

import torch

from .data import COLOURS, SHAPES

TOKENS, DIM = 512, 4096
TOKEN_RMS = 1.0
VOCAB = frozenset((*COLOURS, *SHAPES, "moves", "bounces", "stays", "circles", "spinning", "turns",
                   "left", "right", "up", "down", "camera", "pans", *(f"turns:{c}" for c in COLOURS)))
_VEC: dict[str, torch.Tensor] = {}


def _vector(key: str) -> torch.Tensor:
    """Fixed N(0, 1) vector (DIM,) float32 on the CPU for a word or slot key."""
    if key not in _VEC:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2 ** 63 - 1)
        _VEC[key] = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return _VEC[key]


def clauses(caption: str) -> list[list[str]]:
    """Caption -> list of clauses, each the list of its VOCAB keys (clauses without any dropped)."""
    out = []
    for part in re.split(r",|\band\b", caption.lower()):
        words = re.findall(r"[a-z]+", part)
        keys = [f"turns:{w}" if i and words[i - 1] == "turns" else w for i, w in enumerate(words)]
        keys = [k for k in keys if k in VOCAB]
        if keys:
            out.append(keys)
    return out


def clause_token(keys: list[str], slot: int) -> torch.Tensor:
    v = sum((_vector(k) for k in keys), _vector(f"<slot {slot}>"))
    return v * (TOKEN_RMS / v.pow(2).mean().sqrt())


def caption_context(captions: list[str], device=None, dtype=torch.float32) -> torch.Tensor:
    """captions (B strings) -> context (B, 512, 4096): one token per clause, then zeros."""
    ctx = torch.zeros(len(captions), TOKENS, DIM)
    for b, cap in enumerate(captions):
        for i, keys in enumerate(clauses(cap)[:TOKENS]):
            ctx[b, i] = clause_token(keys, i)
    return ctx.to(device=device, dtype=dtype)
