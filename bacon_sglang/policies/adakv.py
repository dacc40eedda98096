"""AdaKV: SnapKV's score, per-head candidates from the layer's global top-k."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bacon_sglang.allocation import adakv_candidates
from bacon_sglang.policies.snapkv import SnapKV


@dataclass(frozen=True)
class AdaKV(SnapKV):
    """Heads share the layer's ``Hkv * K`` tokens by their hits in the global top
    ``Hkv * K``, each keeping at least ``floor * K``
    (:func:`bacon_sglang.allocation.adakv_candidates`).
    Keep-sets are ragged: shorter rows end in ``KEEP_PAD``. A layer's total is SnapKV's (its
    ``layer_candidates``): only the split between heads waits for the scores.

    Attributes:
        floor: the share of ``K`` every head keeps whatever its scores.
    """

    floor: float = 0.2

    def allocate(self, scores: Tensor, candidates: int, layer_idx: int, num_layers: int) -> Tensor:
        """``[Hkv]`` summing to ``Hkv * min(K, C)`` (see :meth:`Policy.allocate`)."""
        return adakv_candidates(scores, candidates, self.floor)
