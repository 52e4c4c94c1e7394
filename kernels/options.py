"""Per-call settings of the Triton kernels (importable without triton)."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

# names of the tuned-config entries a TritonOptions may override (see _triton_ops.CONFIGS)
CONFIG_NAMES = ("fwd", "bwd_dq", "bwd_dkdv", "lin_state", "lin_apply", "lin_bwd", "kv_pass", "q_pass", "token_mean")


@dataclass(frozen=True)
class TritonOptions:
    """Explicit settings for one call of the Triton path; the default is the checked-in tuned table.

    tma: None follows each kernel's config; False forces plain pointer loads everywhere; True uses
        host TMA descriptors wherever the tensors meet TMA's 16-byte alignment rules, also where the
        config says otherwise (tests run both paths through this).
    poison: fill every output buffer with NaN before the kernels write it, so elements a kernel
        forgets to write fail the comparisons (tests).
    configs: name -> ``triton.Config`` replacing the table's entry for this call (benchmark sweeps);
        names are CONFIG_NAMES, the keys of each config as in ``_triton_ops.CONFIGS``.
    """
    tma: Optional[bool] = None
    poison: bool = False
    configs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = sorted(set(self.configs) - set(CONFIG_NAMES))
        if bad:
            raise ValueError(f"TritonOptions.configs: unknown kernel config name(s) {bad}; "
                             f"expected some of {list(CONFIG_NAMES)}")


DEFAULT_OPTIONS = TritonOptions()


# Scoped replacements of table entries for every call inside a ``with config_overrides(...)`` block (this thread
# or task only), below a call's own TritonOptions.configs: how a benchmark times a whole model forward with a
# candidate config (e.g. the forward's Q_TILED) without a parameter on every layer in between.  The table itself is
# never changed.
_OVERRIDES: "contextvars.ContextVar[Optional[Mapping[str, Any]]]" = contextvars.ContextVar(
    "salad_config_overrides", default=None)


@contextlib.contextmanager
def config_overrides(configs: Mapping[str, Any]) -> Iterator[None]:
    """Use ``configs`` (name -> triton.Config, names as in TritonOptions.configs) instead of the table's entries
    for the kernels called inside the block."""
    bad = sorted(set(configs) - set(CONFIG_NAMES))
    if bad:
        raise ValueError(f"config_overrides: unknown kernel config name(s) {bad}; expected some of "
                         f"{list(CONFIG_NAMES)}")
    token = _OVERRIDES.set({**(_OVERRIDES.get() or {}), **configs})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def overridden(name: str) -> Optional[Any]:
    """The config a surrounding config_overrides block gives for ``name`` (None: the table's)."""
    return (_OVERRIDES.get() or {}).get(name)
