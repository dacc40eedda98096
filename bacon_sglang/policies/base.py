"""The policy contract: one layer's window attention (+ the request's state) -> a keep-set.

A policy is a small frozen dataclass whose fields are its hyperparameters. It has two parts:

- ``score``: the per-token ranking score of the candidates (the "operator");
- ``allocate``: how many candidates each KV head of this layer keeps (the "allocation").

``keep`` composes them with :func:`bacon_sglang.selection.select_keep`. ``SnapKV`` is the base
operator; ``PyramidKV`` and ``AdaKV`` subclass it and change only the allocation (as in
kvpress). ``BACON(base=...)`` wraps another policy: it keeps the base's allocation and
replaces the score inside each head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from bacon_sglang.allocation import mean_candidates
from bacon_sglang.scoring import ImageGrid
from bacon_sglang.selection import select_keep


@dataclass
class RequestState:
    """What a policy remembers about one request between the layers of one prefill.

    Create a fresh one per request and prefill; pass the same object to every layer's
    :meth:`Policy.keep`, in layer order.

    Attributes:
        evidence: BACON's boundary evidence ``E`` (``[Hkv, T]`` float32) of the previous
            layers, oldest first; BACON trims it to its ``history`` (4) layers.
        image_grids: ``(start, rows, cols)`` of each image's patch tokens, used only by
            ``BACON(coherence_2d=True)``.
    """

    evidence: list[Tensor] = field(default_factory=list)
    image_grids: tuple[ImageGrid, ...] = ()


@dataclass(frozen=True)
class Policy(ABC):
    """Maps one layer's window attention to the tokens each KV head keeps."""

    @abstractmethod
    def score(self, attn: Tensor, num_kv_heads: int) -> Tensor:
        """The score that ranks the candidates inside each head (higher is kept first).

        Args:
            attn: ``[Hq, w, n]`` window attention.
            num_kv_heads: ``Hkv``.

        Returns:
            ``[Hkv, n - w]`` float32.
        """

    @abstractmethod
    def allocate(self, scores: Tensor, candidates: int, layer_idx: int, num_layers: int) -> Tensor:
        """How many candidates each head of this layer keeps.

        Args:
            scores: ``[Hkv, C]`` base scores of the ``C`` competing candidates.
            candidates: ``K`` (:mod:`bacon_sglang.config`; the mean, for uneven allocations).
            layer_idx: ``l`` in ``[0, L)``.
            num_layers: ``L``.

        Returns:
            ``[Hkv]`` int64 in ``[0, C]``.
        """

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
        """The tokens each KV head keeps after this layer's prefill.

        Args:
            attn: ``[Hq, w, n]`` window attention of the last ``w`` prompt queries (float32 or
                bfloat16; scored in float32).
            num_kv_heads: ``Hkv``.
            candidates: ``K``, selected per head besides the ``w`` window tokens
                (:mod:`bacon_sglang.config`).
            layer_idx: ``l`` in ``[0, L)``.
            num_layers: ``L``.
            state: the request's :class:`RequestState` (read and updated by stateful policies).
            first_candidate: positions ``[0, first_candidate)`` are a shared prefix kept
                elsewhere: never selected, not counted in ``K``; they still take part in the
                attention and the pooling.

        Returns:
            ``[Hkv, max_h(k_h) + w]`` int64 absolute indices in ``[0, n)``, each row sorted, the
            last ``w`` positions always included; rows of heads that keep fewer tokens than
            the widest end in ``KEEP_PAD`` (-1). Uniform allocations (SnapKV, PyramidKV) never
            pad: ``k_h = min(K_l, n - w - first_candidate)``.
        """
        scores = self.score(attn, num_kv_heads)
        per_head = self.allocate(scores[:, first_candidate:], candidates, layer_idx, num_layers)
        return select_keep(scores, per_head, attn.shape[1], first_candidate)

    @abstractmethod
    def layer_candidates(
        self, candidates: int, available: int, num_layers: int, heads: Sequence[int]
    ) -> list[int]:
        """Per layer, the candidates the KV heads ``heads`` keep together, known on the host
        before any score: what :meth:`allocate` returns summed over those heads (for
        allocations split by the scores, their sum, which is not).

        Args:
            candidates: ``K``.
            available: ``C``, the competing candidates (``T`` minus a shared prefix).
            num_layers: ``L``.
            heads: the model's KV heads counted (all, or a tensor-parallel rank's).

        Returns:
            ``[L]`` Python ints.
        """

    def region_candidates(self, per_head: Tensor, candidates: int) -> int:
        """The per-head ``K`` of BACON's top-2K region for this layer's ``per_head`` counts
        (``[Hkv]``) when the mean is ``candidates``: the layer's mean head count (SnapKV,
        PyramidKV: the layer's capacity; AdaKV: ``K``)."""
        return mean_candidates(per_head)
