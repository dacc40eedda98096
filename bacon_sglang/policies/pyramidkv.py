"""PyramidKV: SnapKV's score, candidates per head falling linearly with depth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from bacon_sglang.allocation import pyramid_candidates, pyramid_cap
from bacon_sglang.policies.snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """Layer ``l`` keeps ``cap_l`` candidates per head, from about ``2K`` at the first layer
    down to ``K // beta`` at the last (:func:`bacon_sglang.allocation.pyramid_cap`).

    Attributes:
        beta: ratio of ``K`` to the last layer's count.
    """

    beta: int = 20

    def allocate(self, scores: Tensor, candidates: int, layer_idx: int, num_layers: int) -> Tensor:
        """``[Hkv]`` all ``cap_l`` (see :meth:`Policy.allocate`)."""
        heads, available = scores.shape
        caps = pyramid_candidates(candidates, layer_idx, num_layers, heads, available, self.beta)
        return caps.to(scores.device)

    def layer_candidates(
        self, candidates: int, available: int, num_layers: int, heads: Sequence[int]
    ) -> list[int]:
        """``len(heads) * cap_l`` (see :meth:`Policy.layer_candidates`)."""
        return [
            len(heads) * pyramid_cap(candidates, layer, num_layers, available, self.beta)
            for layer in range(num_layers)
        ]
