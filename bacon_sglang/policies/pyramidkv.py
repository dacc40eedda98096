"""PyramidKV: SnapKV's score, budgets falling linearly with depth."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bacon_sglang.budgets import pyramid_budgets
from bacon_sglang.policies.snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """Layer ``l`` keeps ``cap_l`` candidates per head, from about ``2K`` at the first layer
    down to ``K // beta`` at the last (:func:`bacon_sglang.budgets.pyramid_budget`).

    Attributes:
        beta: ratio of ``K`` to the last layer's budget.
    """

    beta: int = 20

    def allocate(self, scores: Tensor, budget: int, layer_idx: int, num_layers: int) -> Tensor:
        """``[Hkv]`` all ``cap_l`` (see :meth:`Policy.allocate`)."""
        heads, candidates = scores.shape
        caps = pyramid_budgets(budget, layer_idx, num_layers, heads, candidates, self.beta)
        return caps.to(scores.device)
