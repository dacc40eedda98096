"""SparseMM: SnapKV's score, per-head candidates from offline visual-head scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bacon_sglang.allocation import sparsemm_candidates, sparsemm_cap
from bacon_sglang.policies.snapkv import SnapKV


@dataclass(frozen=True)
class SparseMM(SnapKV):
    """Head ``h`` of layer ``l`` keeps ``round(score_lh * (K - m) * L * Hkv + m)`` candidates
    (:func:`bacon_sglang.allocation.sparsemm_candidates`), ``m = floor(floor * K)``. Keep-sets
    are ragged across heads and layers. The batched pass serves it (``kernels/served``), the
    server with head-granular KV only (``--kv-layout cells``, ``--kv-head-scores``).

    Attributes:
        head_scores: ``[L][Hkv]`` visual-head scores summing to 1
            (:func:`bacon_sglang.models.visual_heads.load`).
        floor: the share of ``K`` every head keeps.
    """

    head_scores: tuple[tuple[float, ...], ...] = ()
    floor: float = 0.1

    def allocate(self, scores: Tensor, candidates: int, layer_idx: int, num_layers: int) -> Tensor:
        """``[Hkv]`` counts of layer ``layer_idx`` (see :meth:`Policy.allocate`)."""
        if len(self.head_scores) != num_layers:
            raise ValueError(f"{len(self.head_scores)} layers of head scores for {num_layers}")
        row = torch.tensor(self.head_scores[layer_idx], dtype=torch.float64)
        if row.shape[0] != scores.shape[0]:
            raise ValueError(f"{row.shape[0]} head scores for {scores.shape[0]} KV heads")
        caps = sparsemm_candidates(row, candidates, num_layers, scores.shape[1], self.floor)
        return caps.to(scores.device)

    def layer_candidates(
        self, candidates: int, available: int, num_layers: int, heads: Sequence[int]
    ) -> list[int]:
        """The caps of ``heads`` summed per layer, each normalised over all the model's heads
        (see :meth:`Policy.layer_candidates`)."""
        if len(self.head_scores) != num_layers:
            raise ValueError(f"{len(self.head_scores)} layers of head scores for {num_layers}")
        return [
            sum(sparsemm_cap(row[h], candidates, num_layers, len(row), available, self.floor)
                for h in heads)
            for row in self.head_scores
        ]  # fmt: skip

    def region_candidates(self, per_head: Tensor, candidates: int) -> int:
        """BACON's top-2K region uses the model-wide mean ``K`` (the release's
        ``base_capacity``), not this layer's mean."""
        return candidates
