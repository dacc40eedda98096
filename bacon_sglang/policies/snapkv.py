"""SnapKV: the same number of candidates everywhere, top-k of the pooled window score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from bacon_sglang.allocation import uniform_candidates
from bacon_sglang.policies.base import Policy
from bacon_sglang.scoring import POOL_KERNEL, snapkv_scores


@dataclass(frozen=True)
class SnapKV(Policy):
    """Every layer and head keeps ``K`` candidates by SnapKV's window score.

    Attributes:
        pool_kernel: avg-pool kernel of the window score.
    """

    pool_kernel: int = POOL_KERNEL

    def score(self, attn: Tensor, num_kv_heads: int) -> Tensor:
        """:func:`bacon_sglang.scoring.snapkv_scores`, ``[Hkv, n - w]`` float32."""
        return snapkv_scores(attn, num_kv_heads, self.pool_kernel)

    def allocate(self, scores: Tensor, candidates: int, layer_idx: int, num_layers: int) -> Tensor:
        """``[Hkv]`` all ``min(K, C)`` (see :meth:`Policy.allocate`)."""
        heads, available = scores.shape
        return uniform_candidates(candidates, heads, available).to(scores.device)

    def layer_candidates(
        self, candidates: int, available: int, num_layers: int, heads: Sequence[int]
    ) -> list[int]:
        """``len(heads) * min(K, C)`` in every layer (see :meth:`Policy.layer_candidates`)."""
        return [len(heads) * max(0, min(candidates, available))] * num_layers
