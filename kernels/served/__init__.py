"""The served policies: policy name -> its batched keep-set function.

``patches/attention.py`` names no policy: after the last layer of a prefill forward it calls
``SERVED[config.policy]`` once per group of finishing requests that share a policy and pool
kernel, then compacts every request in one launch. Each function takes a
:class:`~.base.PrefillBatch` (every layer at once) and returns ``[layers, B, Hkv, width]``
keep-sets in a constant number of launches. Adding a served policy: README.md here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from . import bacon, snapkv
from .base import PrefillBatch

KeepSets = Callable[[PrefillBatch], Tensor]

SERVED: dict[str, KeepSets] = {
    "snapkv": snapkv.keep_sets,
    "bacon": bacon.keep_sets,
}
"""One entry per ``--kv-policy`` value except ``none`` (``bacon_sglang.config.POLICY_NAMES``)."""


def keep_sets(policy: str, batch: PrefillBatch) -> Tensor:
    """The keep-sets of ``batch`` under the served policy ``policy`` (a :data:`SERVED` key):
    ``[layers, B, Hkv, width]``, request ``b``'s in ``[:, b, :, :min(K_b, T_b - P_b) + w_b]``."""
    if policy not in SERVED:
        raise ValueError(f"policy {policy!r} is not served; served: {', '.join(SERVED)}")
    return SERVED[policy](batch)


__all__ = ["SERVED", "KeepSets", "PrefillBatch", "keep_sets"]
