"""Per-call settings of the Triton kernels (importable without triton)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

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
