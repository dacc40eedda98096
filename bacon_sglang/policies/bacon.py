"""BACON: the base method's allocation, ranked inside each head by the calibrated score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from bacon_sglang import scoring
from bacon_sglang.policies.base import Policy, RequestState
from bacon_sglang.policies.snapkv import SnapKV
from bacon_sglang.selection import select_keep


@dataclass(frozen=True)
class BACON(Policy):
    """Boundary Attention CalibratiON around a base policy ("Last But Not Least", EMNLP 2026).

    Per-head counts ``K_h`` come from ``base`` and its score ``B``; each head then keeps its
    top-``K_h`` of ``S = B + lam * (E + L + Tr)`` (:func:`bacon_sglang.scoring.calibrate`). The
    top-2K region uses the layer's mean head count. ``Q`` is pooled with ``base.pool_kernel``.

    Attributes:
        base: the wrapped policy (``SnapKV``, ``PyramidKV``, ``AdaKV``); not a ``BACON``.
        coherence_kernel: pool kernel of ``L``.
        history: earlier layers averaged into ``Tr``.
        scale: ``c`` of the scale match.
        region: ``2`` in ``top-2K``.
        eps: denominators' epsilon.
        coherence_2d: pool ``L`` over each image's patch grid (``RequestState.image_grids``)
            instead of the flattened token order; off in the paper.
    """

    base: Policy = field(default_factory=SnapKV)
    coherence_kernel: int = scoring.COHERENCE_KERNEL
    history: int = scoring.HISTORY
    scale: float = scoring.SCALE
    region: int = scoring.REGION
    eps: float = scoring.EPS
    coherence_2d: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.base, BACON):
            raise TypeError("BACON wraps a base policy, not another BACON")

    def score(self, attn: Tensor, num_kv_heads: int) -> Tensor:
        """The base score ``B`` (BACON's own score needs the request state: see :meth:`keep`)."""
        return self.base.score(attn, num_kv_heads)

    def allocate(self, scores: Tensor, candidates: int, layer_idx: int, num_layers: int) -> Tensor:
        """The base policy's counts, from ``B``."""
        return self.base.allocate(scores, candidates, layer_idx, num_layers)

    def layer_candidates(
        self, candidates: int, available: int, num_layers: int, heads: Sequence[int]
    ) -> list[int]:
        """The base policy's (see :meth:`Policy.layer_candidates`)."""
        return self.base.layer_candidates(candidates, available, num_layers, heads)

    def keep(
        self,
        attn: Tensor,
        num_kv_heads: int,
        candidates: int,
        layer_idx: int,
        num_layers: int,
        state: RequestState,
        first_candidate: int = 0,
    ) -> Tensor:
        """See :meth:`Policy.keep`. Appends this layer's evidence ``E`` to ``state.evidence``
        and trims it to the last ``history`` layers."""
        base = self.base.score(attn, num_kv_heads)
        kernel = getattr(self.base, "pool_kernel", scoring.POOL_KERNEL)
        last = scoring.last_query_scores(attn, num_kv_heads, kernel)
        per_head = self.allocate(base[:, first_candidate:], candidates, layer_idx, num_layers)
        scores, evidence = scoring.calibrate(
            base,
            last,
            self.base.region_candidates(per_head, candidates),
            state.evidence,
            coherence_kernel=self.coherence_kernel,
            history=self.history,
            scale=self.scale,
            region=self.region,
            eps=self.eps,
            first_candidate=first_candidate,
            image_grids=state.image_grids if self.coherence_2d else None,
        )
        state.evidence.append(evidence)
        del state.evidence[: max(0, len(state.evidence) - self.history)]
        return select_keep(scores, per_head, attn.shape[1], first_candidate)
