"""The served policies: policy name -> its batched keep-set function.

``patches/attention.py`` names no policy: after the last layer of a prefill forward it calls
``SERVED[config.policy]`` once per group of finishing requests that share a policy and pool
kernel, then compacts every request in one launch. Each function takes a
:class:`~.base.PrefillBatch` (every layer at once) and returns its :class:`~.base.KeepSets`
(``[layers, B, Hkv, width]`` keep-sets padded with ``KEEP_PAD`` and ``[layers, B, Hkv]``
counts) in a constant number of launches. A policy is a score (SnapKV's pooled window score,
or BACON's calibrated one) under an allocation (:mod:`.allocation`); the names are
:func:`bacon_sglang.policies.make_policy`'s. Adding a served policy: README.md here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from . import allocation, bacon, snapkv
from .base import KeepSets, PrefillBatch

ServedPolicy = Callable[[PrefillBatch], KeepSets]

SERVED: dict[str, ServedPolicy] = {
    "snapkv": snapkv.keep_sets,
    "pyramidkv": partial(snapkv.keep_sets, allocate=allocation.pyramid),
    "adakv": partial(snapkv.keep_sets, allocate=allocation.adakv),
    "sparsemm": partial(snapkv.keep_sets, allocate=allocation.sparsemm),
    "bacon": bacon.keep_sets,
    "bacon-pyramidkv": partial(bacon.keep_sets, allocate=allocation.pyramid),
    "bacon-adakv": partial(bacon.keep_sets, allocate=allocation.adakv),
    "bacon-sparsemm": partial(bacon.keep_sets, allocate=allocation.sparsemm),
}
"""One entry per ``--kv-policy`` value except ``none`` (``bacon_sglang.config.POLICY_NAMES``;
the uneven allocations, ``config.RAGGED_POLICIES``, are served with ``--kv-layout cells``)."""


def keep_sets(policy: str, batch: PrefillBatch) -> KeepSets:
    """The keep-sets of ``batch`` under the served policy ``policy`` (a :data:`SERVED` key):
    ``keep [layers, B, Hkv, width]``, request ``b``'s row ``(l, h)`` in ``keep[l, b, h,
    :counts[l, b, h]]``, ``KEEP_PAD`` after."""
    if policy not in SERVED:
        raise ValueError(f"policy {policy!r} is not served; served: {', '.join(SERVED)}")
    return SERVED[policy](batch)


__all__ = ["SERVED", "KeepSets", "PrefillBatch", "ServedPolicy", "keep_sets"]
