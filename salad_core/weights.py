"""SALAD weight files: one ``.safetensors`` file per base model.

Tensors (for each covered self-attention block ``i``)::

    blocks.{i}.proj.weight  (dim, dim)         full Proj (proj_rank 0)
    blocks.{i}.proj.bias    (dim,)
  or, for a rank-r Proj (proj_rank r, 1 <= r < dim, see salad_core/proj.py)::
    blocks.{i}.proj.down.weight  (r, dim)
    blocks.{i}.proj.up.weight    (dim, r)
    blocks.{i}.proj.up.bias      (dim,)
  and always::
    blocks.{i}.gate.weight  (1, dim)
    blocks.{i}.gate.bias    (1,)

All covered blocks of a file share one Proj form and rank.

Metadata (safetensors ``__metadata__``, all values strings):

    salad_format_version  "1" (full Proj) or "2" (low-rank Proj: older readers refuse it by version,
                          "update the node pack", instead of by a confusing tensor mismatch)
    proj_rank             r of a low-rank Proj (1..dim-1); missing or "0" = full dim x dim Proj (every
                          older file; full files are written without the key, byte-for-byte as before)
    base_model            e.g. "wan2.1-t2v-1.3b"
    model_family          "wan"
    dim, heads, num_blocks  of the base model (num_blocks = transformer blocks of the base model)
    blocks                covered block indices, e.g. "0-29" or "0-9,12,20-29"
    pattern, sparsity     the attention settings the weights were trained for
    training_steps        int
    training_data         free text
    created_by            free text

The structural keys (format version, model_family, dim, heads, num_blocks, blocks) are required;
the descriptive ones get defaults when missing but must parse when present.

Fresh weights (:meth:`SaladWeights.new`): ``proj`` weight and bias are zero (a low-rank Proj: ``up``
zero, ``down`` seeded orthonormal rows, see salad_core/proj.py), so SALAD output equals sparse-only
attention; ``gate`` weight and bias are zero, so ``G = sigmoid(0) = 0.5`` for every input until
trained (the gate weight still receives gradient once proj is non-zero).

A full file becomes a low-rank one without training by :meth:`SaladWeights.to_low_rank` (truncated
SVD of every block's Proj, the best rank-r approximation; metadata ``proj_compression`` says so).

Files are read only with safetensors (never pickle); the header is checked by hand first so that
truncated / foreign / lying files produce a :class:`SaladWeightsError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .options import (DEFAULT_PATTERN, DEFAULT_SPARSITY, ERROR_QUOTE_LIMIT, MAX_NUM_BLOCKS, PATTERNS,  # noqa: F401
                      clip, format_block_list, parse_block_list)
from .proj import LowRankProj, make_proj, proj_matrix, svd_truncate

SALAD_FORMAT_VERSION = "1"             # written for full-Proj files (unchanged since the first release)
LOW_RANK_FORMAT_VERSION = "2"          # written for low-rank Proj files (proj_rank > 0)
SUPPORTED_FORMAT_VERSIONS = ("1", "2")
REQUIRED_KEYS = ("salad_format_version", "model_family", "dim", "heads", "num_blocks", "blocks")
DEFAULT_META = {
    "base_model": "unknown",
    "pattern": DEFAULT_PATTERN,
    "sparsity": str(DEFAULT_SPARSITY),
    "training_steps": "0",
    "training_data": "",
    "created_by": "salad_core",
}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_META_VALUE = {               # characters per metadata value (free text may be long, the rest is short)
    "training_data": 1 << 20, "created_by": 1 << 20, "block_errors": 1 << 20, "proj_rank": 4096,
}
_MAX_META_DEFAULT = 4096
_MAX_META_OTHER = 1 << 20         # keys this format does not define


_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

PathLike = Union[str, os.PathLike]


class SaladWeightsError(ValueError):
    """A SALAD weight file is missing, malformed, or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# block spec "0-29" / "0-9,12" (the syntax lives in .options)
# ----------------------------------------------------------------------------------------------

def parse_block_spec(spec: str, limit: Optional[int] = None) -> List[int]:
    """"0-3,7,9-10" -> [0, 1, 2, 3, 7, 9, 10] (sorted, unique).  Raises ValueError.

    ``limit``: every index must be < limit; checked before a range is expanded, so a crafted
    "0-1000000000" costs nothing (without a limit, ranges may cover at most MAX_NUM_BLOCKS blocks).
    No negative numbers (see :func:`.options.parse_block_list`)."""
    return parse_block_list(spec, limit, from_end=False)


format_block_spec = format_block_list


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------

def _proj_seed(block: int, seed: int = 0) -> int:
    """Seed of a fresh low-rank Proj's ``down`` for one block (distinct per block, stable across runs)."""
    return int(seed) * 1_000_003 + 7919 * (int(block) + 1)


def normalize_proj_rank(rank, dim: int, what: str = "proj_rank") -> int:
    """0 (full Proj) or 1..dim-1: ``rank`` >= dim gives no saving and means the full Proj (0).  Raises
    SaladWeightsError for a negative / non-integer rank."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float, str)):
        raise SaladWeightsError(f"{what} must be an integer >= 0 (0: full dim x dim Proj), got {clip(rank)}")
    try:
        r = int(str(rank).strip()) if isinstance(rank, str) else int(rank)
    except ValueError:
        raise SaladWeightsError(f"{what} must be an integer >= 0 (0: full dim x dim Proj), got {clip(rank)}") from None
    if r != rank and not isinstance(rank, str):
        raise SaladWeightsError(f"{what} must be an integer >= 0, got {clip(rank)}")
    if r < 0:
        raise SaladWeightsError(f"{what} must be >= 0 (0: full dim x dim Proj), got {r}")
    return 0 if r >= int(dim) else r


class SaladWeights(nn.Module):
    """Per-block ``proj`` (full ``nn.Linear`` dim->dim, or a rank-r :class:`~.proj.LowRankProj`) and ``gate``
    (Linear dim->1) of SALAD attention.

    ``proj`` and ``gate`` are ``nn.ModuleDict`` keyed by ``str(block_index)``.  ``proj_rank``: 0 = full Proj,
    r = rank-r Proj in every block (r >= dim means full); None takes the metadata's ``proj_rank`` (default 0),
    so a copy made from another file's metadata keeps its form.  New modules follow the zero-init rule
    (see :func:`~.proj.make_proj`; :meth:`new` also zeroes the gates); ``init=False`` leaves every tensor
    uninitialised, for a load or a copy that overwrites them all (no init work on dim x dim matrices).
    """

    def __init__(self, dim: int, heads: int, num_blocks: int, block_ids: Sequence[int],
                 metadata: Optional[Dict[str, str]] = None, path: Optional[str] = None,
                 proj_rank: Optional[int] = None, seed: int = 0, init: bool = True):
        super().__init__()
        dim, heads, num_blocks = int(dim), int(heads), int(num_blocks)
        if dim < 1 or heads < 1 or dim % heads:
            raise SaladWeightsError(f"dim {dim} must be a positive multiple of heads {heads}")
        ids = sorted(set(int(i) for i in block_ids))
        bad = [i for i in ids if i < 0 or i >= num_blocks]
        if bad:
            raise SaladWeightsError(f"block indices {bad} out of range for num_blocks={num_blocks}")
        if proj_rank is None:
            proj_rank = (metadata or {}).get("proj_rank", 0)
        self.proj_rank: int = normalize_proj_rank(proj_rank, dim)
        self.dim, self.heads, self.num_blocks = dim, heads, num_blocks
        self.block_ids: List[int] = ids
        self.path = path
        self.proj = nn.ModuleDict({str(i): make_proj(dim, self.proj_rank, seed=_proj_seed(i, seed), init=init)
                                   for i in ids})
        self.gate = nn.ModuleDict({str(i): nn.Linear(dim, 1) if init else
                                   nn.Linear(dim, 1, device="meta").to_empty(device="cpu") for i in ids})
        meta = dict(DEFAULT_META)
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        self.metadata: Dict[str, str] = meta
        self._sync_metadata()

    def _sync_metadata(self) -> None:
        self.metadata.update({
            "salad_format_version": LOW_RANK_FORMAT_VERSION if self.proj_rank else SALAD_FORMAT_VERSION,
            "model_family": self.metadata.get("model_family", "wan") or "wan",
            "dim": str(self.dim),
            "heads": str(self.heads),
            "num_blocks": str(self.num_blocks),
            "blocks": format_block_spec(self.block_ids),
        })
        # full-Proj files stay byte-for-byte what they were before the low-rank option (no proj_rank key)
        if self.proj_rank:
            self.metadata["proj_rank"] = str(self.proj_rank)
        else:
            self.metadata.pop("proj_rank", None)

    @classmethod
    def new(cls, dim: int, heads: int, num_blocks: int, blocks: Optional[Iterable[int]] = None,
            base_model: str = "unknown", pattern: str = DEFAULT_PATTERN, sparsity: float = DEFAULT_SPARSITY,
            model_family: str = "wan", created_by: str = "salad_core", proj_rank: int = 0,
            seed: int = 0) -> "SaladWeights":
        """Fresh weights: proj = 0 (SALAD == sparse-only), gate = 0 (G = 0.5).
        ``blocks``: iterable of block indices, a spec string ("0-29"), or None for all blocks.
        ``proj_rank``: 0 = full dim x dim Proj; r = rank-r Proj (``up`` = 0, ``down`` orthonormal rows seeded by
        ``seed`` and the block index, so it outputs 0 and still trains; r >= dim means full)."""
        if blocks is None:
            ids = list(range(int(num_blocks)))
        elif isinstance(blocks, str):
            ids = parse_block_spec(blocks)
        else:
            ids = list(blocks)
        w = cls(dim, heads, num_blocks, ids, metadata=dict(
            base_model=base_model, model_family=model_family, pattern=pattern, sparsity=str(float(sparsity)),
            training_steps="0", training_data="", created_by=created_by), proj_rank=proj_rank, seed=seed)
        with torch.no_grad():
            for i in w.block_ids:   # make_proj already applied the zero-init rule to proj
                w.gate[str(i)].weight.zero_()
                w.gate[str(i)].bias.zero_()
        return w

    def to_low_rank(self, rank: int) -> "SaladWeights":
        """A copy whose every Proj is the truncated SVD of this one's at rank ``rank`` (training-free, the best
        rank-r approximation of each block's matrix; bias and gate kept; see :func:`~.proj.svd_truncate`).
        Works from a full or a higher-rank file; same device and dtype.  Metadata ``proj_compression`` records
        it with each block's relative Frobenius error ||W - W_r|| / ||W||."""
        r = normalize_proj_rank(rank, self.dim, "rank")
        if r == 0:
            raise SaladWeightsError(f"to_low_rank: rank must be 1..{self.dim - 1} for dim {self.dim}, got {rank}")
        if self.proj_rank and r > self.proj_rank:
            raise SaladWeightsError(f"to_low_rank: these weights already have rank {self.proj_rank}; a rank-{r} "
                                    f"copy would not be smaller")
        out = SaladWeights(self.dim, self.heads, self.num_blocks, self.block_ids, metadata=dict(self.metadata),
                           path=None, proj_rank=r, init=False)
        p0 = next(iter(self.parameters()), None)
        if p0 is not None:
            out.to(device=p0.device, dtype=p0.dtype)
        errors = {}
        with torch.no_grad():
            for i in self.block_ids:
                src = self.proj[str(i)]
                low = svd_truncate(src, r)
                w = proj_matrix(src)
                errors[str(i)] = float(f"{float((w - proj_matrix(low)).norm() / w.norm().clamp_min(1e-30)):.4g}")
                out.proj[str(i)] = low
                out.gate[str(i)].load_state_dict(self.gate[str(i)].state_dict())
        was = f"rank-{self.proj_rank}" if self.proj_rank else f"full {self.dim} x {self.dim}"
        out.metadata["proj_compression"] = (
            f"training-free truncated SVD of the {was} Proj to rank {r} (~{self.dim / (2 * r):.3g}x cheaper than "
            f"full); relative Frobenius error per block {json.dumps(errors, separators=(',', ':'))}")
        out._sync_metadata()
        return out

    # --------------------------------------------------------------------------------------
    def has_block(self, i: int) -> bool:
        return str(int(i)) in self.proj

    def proj_for(self, i: int) -> Optional[nn.Module]:
        """proj of block i (nn.Linear, or LowRankProj when ``proj_rank`` > 0), or None if the file does not
        cover it."""
        key = str(int(i))
        return self.proj[key] if key in self.proj else None

    def gate_for(self, i: int) -> Optional[nn.Linear]:
        key = str(int(i))
        return self.gate[key] if key in self.gate else None

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else f"<SaladWeights {self.metadata.get('base_model')}>"

    def check_compatible(self, model_family: str, dim: int, heads: int, num_blocks: int) -> None:
        """Raise SaladWeightsError naming the file and every mismatch with the model."""
        mine = (self.metadata.get("model_family", "wan"), self.dim, self.heads, self.num_blocks)
        theirs = (str(model_family), int(dim), int(heads), int(num_blocks))
        if mine != theirs:
            raise SaladWeightsError(
                f"{self.name} was made for {mine[0]} dim {mine[1]} / {mine[2]} heads / {mine[3]} blocks "
                f"(base model {self.metadata.get('base_model', 'unknown')}), the model is {theirs[0]} "
                f"dim {theirs[1]} / {theirs[2]} heads / {theirs[3]} blocks")

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for i in self.block_ids:
            p, g = self.proj[str(i)], self.gate[str(i)]
            if isinstance(p, LowRankProj):
                out[f"blocks.{i}.proj.down.weight"] = p.down.weight
                out[f"blocks.{i}.proj.up.weight"] = p.up.weight
                out[f"blocks.{i}.proj.up.bias"] = p.up.bias
            else:
                out[f"blocks.{i}.proj.weight"] = p.weight
                out[f"blocks.{i}.proj.bias"] = p.bias
            out[f"blocks.{i}.gate.weight"] = g.weight
            out[f"blocks.{i}.gate.bias"] = g.bias
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, num_blocks={self.num_blocks}, proj_rank={self.proj_rank}, "
                f"blocks={format_block_spec(self.block_ids)!r}, base_model={self.metadata.get('base_model')!r}")


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def save_salad_weights(weights: SaladWeights, path: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Atomically write ``weights`` to ``path`` (temp file in the same directory, fsync,
    os.replace).  On any error the temp file is removed and an existing ``path`` is untouched."""
    path = Path(path)
    weights._sync_metadata()
    tensors = {}
    for name, t in weights.state_tensors().items():
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        if not torch.isfinite(t).all():
            raise SaladWeightsError(f"refusing to save {path.name}: tensor {name} has NaN/Inf values")
        tensors[name] = t.to("cpu").contiguous()
    meta = {str(k): str(v) for k, v in weights.metadata.items()}
    return atomic_write_safetensors(tensors, meta, path)


def atomic_write_safetensors(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], path: PathLike) -> Path:
    """Write a safetensors file atomically: temp file in the same directory, fsync, os.replace.
    On any error the temp file is removed and an existing ``path`` is left untouched."""
    from safetensors.torch import save as st_save

    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(directory))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(st_save(tensors, metadata=metadata))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable (best effort; not supported everywhere)
        dfd = os.open(str(directory), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------

def _open_regular(path: Path):
    """Open ``path`` for reading only if it is a regular file (after following symlinks).  A named
    pipe, a device (/dev/zero) or a directory is refused by name and never read: the open does not
    block (O_NONBLOCK) and the type is checked on the opened descriptor."""
    name = path.name
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SaladWeightsError(f"SALAD weight file {clip(str(path))} does not exist") from None
    except OSError as e:
        raise SaladWeightsError(f"{name}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SaladWeightsError(f"{name} is not a regular file ({_file_kind(st.st_mode)}); SALAD weights must be "
                                f"a .safetensors file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise SaladWeightsError(f"{name}: cannot be read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
        os.close(fd)
        raise SaladWeightsError(f"{name} is not a regular file ({_file_kind(st.st_mode)})")
    return os.fdopen(fd, "rb"), st.st_size


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a plain file"


def is_regular_file(path: PathLike) -> bool:
    """True for a regular file (symlinks followed); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_header(path: Path) -> dict:
    name = path.name
    f, size = _open_regular(path)
    with f:
        head = f.read(9)
        if len(head) < 9:
            raise SaladWeightsError(f"{name} is not a safetensors file: only {size} bytes "
                                    f"(expected an 8-byte header length + JSON header + tensor data)")
        (n,) = struct.unpack("<Q", head[:8])
        # In safetensors the first 8 bytes are the header length, so they may be anything (0x80 or
        # "PK" included); the file is judged by whether it is a plausible safetensors file at all.
        plausible = 2 <= n and 8 + n <= size and head[8:9] == b"{"
        if not plausible:
            if head[:1] == b"\x80" or head[:2] == b"PK":
                raise SaladWeightsError(
                    f"{name} looks like a pickle / PyTorch checkpoint (.ckpt/.pt/.bin); SALAD weights must be "
                    f"a .safetensors file (pickle files are never loaded)")
            if 8 + n > size:
                raise SaladWeightsError(
                    f"{name} is not a valid safetensors file (truncated or foreign format): header length "
                    f"field says {n} bytes but the file has {size} bytes")
            raise SaladWeightsError(
                f"{name} is not a valid safetensors file: the header does not start with a JSON object "
                f"(header length {n}, first header byte {head[8:9]!r})")
        if n > _MAX_HEADER:
            raise SaladWeightsError(
                f"{name}: safetensors header of {n} bytes is larger than the {_MAX_HEADER // (1024 * 1024)} MiB "
                f"a SALAD weight file may have (its metadata is far too large)")
        raw = head[8:] + f.read(n - 1)
        if len(raw) != n:
            raise SaladWeightsError(f"{name} is truncated: the header should have {n} bytes, read {len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaladWeightsError(
            f"{name} is not a valid safetensors file: header is not JSON ({clip(e, 300)})") from None
    except RecursionError:
        raise SaladWeightsError(f"{name} is not a valid safetensors file: its JSON header is nested too "
                                f"deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise SaladWeightsError(f"{name} is not a valid safetensors file: header is not a JSON object")
    data_len = size - 8 - n
    end_max = 0
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        try:
            dt, shape, (b, e) = info["dtype"], list(info["shape"]), info["data_offsets"]
            nbytes = _DTYPE_SIZE[dt] * math.prod(int(s) for s in shape)
            if any(int(s) < 0 for s in shape):
                raise ValueError(f"negative dimension in shape {clip(shape)}")
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError, OverflowError) as ex:
            raise SaladWeightsError(f"{name}: malformed header entry for tensor {clip(tname)} "
                                    f"({type(ex).__name__}: {clip(ex)})") from None
        if b < 0 or e < b or e - b != nbytes:
            raise SaladWeightsError(
                f"{name}: header of tensor {clip(tname)} is inconsistent: dtype {dt} shape {clip(shape)} needs "
                f"{clip(nbytes, 40)} bytes but data_offsets give {clip(e - b, 40)}")
        if e > data_len:
            raise SaladWeightsError(
                f"{name} is truncated or its header lies: tensor {clip(tname)} ends at byte {clip(e, 40)} of the "
                f"data section but only {data_len} data bytes are present")
        end_max = max(end_max, e)
    if end_max != data_len:
        raise SaladWeightsError(
            f"{name}: data section has {data_len} bytes but the header describes {end_max} bytes")
    return header


def _parse_int(name: str, meta: dict, key: str, minimum: int = 0, maximum: Optional[int] = None) -> int:
    try:
        v = int(str(meta[key]).strip())
    except (KeyError, ValueError):
        raise SaladWeightsError(f"{name}: metadata {key}={clip(meta.get(key))} is not an integer") from None
    if v < minimum:
        raise SaladWeightsError(f"{name}: metadata {key}={v} must be >= {minimum}")
    if maximum is not None and v > maximum:
        raise SaladWeightsError(f"{name}: metadata {key}={v} must be <= {maximum}")
    return v


def _check_metadata_values(name: str, meta: dict) -> None:
    """All values strings (as safetensors requires) and of sane length, before anything parses them."""
    for k, v in meta.items():
        if not isinstance(v, str):
            raise SaladWeightsError(f"{name}: metadata {clip(k)} is a JSON {type(v).__name__}, safetensors "
                                    f"metadata values must be strings")
        if len(k) > _MAX_META_DEFAULT:
            raise SaladWeightsError(f"{name}: metadata key {clip(k)} is too long")
        cap = _MAX_META_VALUE.get(k, _MAX_META_DEFAULT if k in REQUIRED_KEYS or k in DEFAULT_META else _MAX_META_OTHER)
        if len(v) > cap:
            raise SaladWeightsError(f"{name}: metadata {k}={clip(v)} is longer than the {cap} characters allowed")


def _proj_form_hint(present: dict, rank: int) -> str:
    """When the Proj tensors have the other form than the metadata's proj_rank says: a sentence saying so."""
    low = any(k.endswith((".proj.down.weight", ".proj.up.weight", ".proj.up.bias")) for k in present)
    full = any(k.endswith((".proj.weight", ".proj.bias")) for k in present)
    if rank and full and not low:
        return (f"metadata proj_rank={rank} says low-rank Proj tensors (proj.down.weight / proj.up.weight / "
                f"proj.up.bias) but the file has full proj.weight / proj.bias tensors")
    if not rank and low:
        return ("the file has low-rank Proj tensors (proj.down / proj.up) but its metadata proj_rank is "
                "missing or 0 (full Proj)")
    return ""


def load_salad_weights(path: PathLike, device: Union[str, torch.device] = "cpu",
                       dtype: Optional[torch.dtype] = None) -> SaladWeights:
    """Load and validate a SALAD weight file.  Raises SaladWeightsError naming the file (and only
    that: anything unexpected while reading a hostile file is reported the same way)."""
    path = Path(path)
    try:
        return _load(path, device, dtype)
    except SaladWeightsError:
        raise
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError, struct.error) as e:
        raise SaladWeightsError(f"{path.name}: could not be read as a SALAD weight file "
                                f"({type(e).__name__}: {clip(e)})") from None


def _load(path: Path, device, dtype) -> SaladWeights:
    from safetensors import safe_open

    name = path.name
    header = _read_header(path)
    meta = header.get("__metadata__")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise SaladWeightsError(f"{name}: __metadata__ is not a JSON object")
    _check_metadata_values(name, meta)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise SaladWeightsError(
            f"{name} is not a SALAD weight file: metadata keys {missing} are missing "
            f"(expected {list(REQUIRED_KEYS)})")
    ver = str(meta["salad_format_version"]).strip()
    if ver not in SUPPORTED_FORMAT_VERSIONS:
        raise SaladWeightsError(
            f"{name}: salad_format_version {clip(ver)} is not supported (supported: "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}); update the node pack")
    dim = _parse_int(name, meta, "dim", 1)
    heads = _parse_int(name, meta, "heads", 1)
    nblk = _parse_int(name, meta, "num_blocks", 1, MAX_NUM_BLOCKS)
    if dim % heads:
        raise SaladWeightsError(f"{name}: metadata dim {dim} is not divisible by heads {heads}")
    try:
        ids = parse_block_spec(meta["blocks"], limit=nblk)
    except ValueError as e:
        raise SaladWeightsError(f"{name}: metadata blocks={clip(meta['blocks'])} does not fit num_blocks={nblk} "
                                f"or does not parse ({e})") from None
    if not ids:
        raise SaladWeightsError(f"{name}: metadata blocks is empty")
    full = dict(DEFAULT_META)
    full.update({str(k): str(v) for k, v in meta.items()})
    try:
        sp = float(full["sparsity"])
        if not (0.0 <= sp <= 0.99):
            raise ValueError
    except ValueError:
        raise SaladWeightsError(f"{name}: metadata sparsity={clip(full['sparsity'])} is not a number in "
                                f"[0, 0.99]") from None
    _parse_int(name, full, "training_steps", 0)
    if full["pattern"] not in PATTERNS:
        raise SaladWeightsError(f"{name}: metadata pattern={clip(full['pattern'])} is not one of "
                                f"{' or '.join(map(repr, PATTERNS))}")

    if "proj_rank" in meta:
        rank = _parse_int(name, meta, "proj_rank", 0)
        if rank and rank >= dim:
            raise SaladWeightsError(f"{name}: metadata proj_rank={rank} must be 0 (full Proj) or 1..{dim - 1} for "
                                    f"dim {dim} (a rank >= dim is no cheaper than the full Proj)")
    else:
        rank = 0                     # files from before the low-rank option: full Proj
    expected = {}
    for i in ids:
        if rank:
            expected[f"blocks.{i}.proj.down.weight"] = [rank, dim]
            expected[f"blocks.{i}.proj.up.weight"] = [dim, rank]
            expected[f"blocks.{i}.proj.up.bias"] = [dim]
        else:
            expected[f"blocks.{i}.proj.weight"] = [dim, dim]
            expected[f"blocks.{i}.proj.bias"] = [dim]
        expected[f"blocks.{i}.gate.weight"] = [1, dim]
        expected[f"blocks.{i}.gate.bias"] = [1]
    present = {k: v for k, v in header.items() if k != "__metadata__"}
    extra = sorted(set(present) - set(expected))
    lacking = sorted(set(expected) - set(present))
    if extra or lacking:
        msg = []
        form = _proj_form_hint(present, rank)
        if form:
            msg.append(form)
        if lacking:
            msg.append(f"missing tensors {lacking[:6]}{' ...' if len(lacking) > 6 else ''}")
        if extra:
            msg.append(f"unexpected tensors [{', '.join(clip(x, 60) for x in extra[:6])}]"
                       f"{' ...' if len(extra) > 6 else ''}")
        raise SaladWeightsError(f"{name}: tensors do not match metadata (dim {dim}, proj_rank {rank}, blocks "
                                f"{clip(meta['blocks'])}): " + "; ".join(msg))
    for tname, shape in expected.items():
        info = present[tname]
        if list(info["shape"]) != shape:
            why = f"dim {dim}" + (f" and proj_rank {rank}" if rank and ".proj." in tname else "")
            raise SaladWeightsError(
                f"{name}: tensor {tname} has shape {clip(list(info['shape']))}, expected {shape} for {why}")
        if info["dtype"] not in _FLOAT_DTYPES:
            raise SaladWeightsError(f"{name}: tensor {tname} has dtype {clip(info['dtype'])}, expected a float type")

    w = SaladWeights(dim, heads, nblk, ids, metadata=full, path=str(path), proj_rank=rank, init=False)
    dst = w.state_tensors()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            with torch.no_grad():
                for tname in expected:
                    t = f.get_tensor(tname)
                    if not torch.isfinite(t).all():
                        raise SaladWeightsError(f"{name}: tensor {tname} contains NaN or Inf values")
                    dst[tname].copy_(t.to(torch.float32))
    except SaladWeightsError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise SaladWeightsError(f"{name}: could not be read as safetensors ({type(e).__name__}: {clip(e)})") from None
    w.to(device=device, dtype=dtype if dtype is not None else torch.float32)
    return w
