"""What every served policy shares: the prefill batch it ranks, and the stages it chains.

A served policy's keep-set function takes one :class:`PrefillBatch` (every layer of the
forward's finishing requests) and returns their :class:`KeepSets`, ``[layers, B, Hkv, width]``
padded with ``KEEP_PAD`` and the counts ``[layers, B, Hkv]``, in a number of kernel launches
and PyTorch operations that does not depend on the depth or on the batch. The stages below
dispatch like ``bacon_sglang.kernels``: the Triton kernels on CUDA tensors or under
``TRITON_INTERPRET=1``, else the per-request PyTorch references of :mod:`bacon_sglang.paged`,
layer by layer (production on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from bacon_sglang import paged, scoring
from bacon_sglang.paged import KVIndex, WindowScores
from bacon_sglang.selection import KEEP_PAD, select_keep_heads

from .. import Backend, pick_backend

if TYPE_CHECKING:
    from .allocation import Allocation


class PrefillBatch(NamedTuple):
    """The finishing requests of one prefill forward, every layer.

    Attributes:
        q: ``[layers, sum_w, Hq, d]`` rotated window queries, request ``b`` owning ``w_b``
            consecutive rows (any stride on the first two axes).
        windows: ``w_b`` per request (Python ints: nothing is read back).
        k_buffers: per layer ``[num_slots, Hkv, d]``, the pool's K.
        index: the requests' prompt keys (``n_b`` each; :meth:`KVIndex.from_rows` knows the
            lengths on the host).
        candidates: ``K_b`` (:mod:`bacon_sglang.config`).
        prefix_lens: ``P_b``: positions ``[0, P_b)`` are never selected.
        scale: logit scale (``1 / sqrt(d)`` when None).
        pool_kernel: avg-pool kernel of the window scores.
        backend: as ``bacon_sglang.kernels`` (None: by device).
        head_scores: SparseMM's offline visual-head scores of the model, ``[L][Hkv of the
            model]`` (:func:`bacon_sglang.models.visual_heads.load`), also when the pool holds
            a few of the heads; other policies ignore them.
        kv_heads: which of the model's KV heads the pool holds, in order (a tensor-parallel
            rank's); None: all.
    """

    q: Tensor
    windows: Sequence[int]
    k_buffers: Sequence[Tensor]
    index: KVIndex
    candidates: Sequence[int]
    prefix_lens: Sequence[int]
    scale: float | None = None
    pool_kernel: int = scoring.POOL_KERNEL
    backend: Backend | None = None
    head_scores: Sequence[Sequence[float]] = ()
    kv_heads: Sequence[int] | None = None

    def q_indptr(self) -> Tensor:
        """``[B + 1]`` window rows per request, on the CPU."""
        return paged.indptr(torch.tensor(list(self.windows), dtype=torch.long))

    def candidate_lengths(self) -> list[int]:
        """``T_b = n_b - w_b`` per request."""
        return [n - w for n, w in zip(self.index.lengths(), self.windows, strict=True)]

    def spans(self) -> list[int]:
        """``span_b = T_b - P_b`` per request: the candidates that compete."""
        return [t - p for t, p in zip(self.candidate_lengths(), self.prefix_lens, strict=True)]

    @property
    def num_layers(self) -> int:
        return len(self.k_buffers)

    @property
    def num_kv_heads(self) -> int:
        return self.k_buffers[0].shape[1]

    def on_triton(self) -> bool:
        """Whether the stages run the Triton kernels."""
        return pick_backend(self.q, self.backend) == "triton"


def window_scores(batch: PrefillBatch) -> WindowScores:
    """Column scores of every layer's window attention, ``[layers, sum_n, Hkv]`` (two
    launches: :func:`bacon_sglang.kernels.score_kernels.layer_window_scores`)."""
    if batch.on_triton():
        from ..score_kernels import layer_window_scores

        return layer_window_scores(batch.q, batch.q_indptr(), batch.k_buffers, batch.index,
                                   batch.scale)  # fmt: skip
    layers = [
        paged.window_scores(q, batch.q_indptr(), k, batch.index, batch.scale)
        for q, k in zip(batch.q, batch.k_buffers, strict=True)
    ]
    first = layers[0]
    return first._replace(
        mean=torch.stack([s.mean for s in layers]), last=torch.stack([s.last for s in layers])
    )


class KeepSets(NamedTuple):
    """A served policy's keep-sets of one prefill batch, every layer."""

    keep: Tensor
    """``[layers, B, Hkv, width]`` int64: row ``(l, b, h)`` holds its kept positions ascending
    (the window ``[T_b, n_b)`` last), then ``KEEP_PAD``; ``width`` is a host bound
    (:attr:`.allocation.Allocation.widths`), exactly ``min(K_b, span_b) + w_b`` for one ``K``
    in every head."""
    counts: Tensor
    """``[layers, B, Hkv]`` int64: ``n[l, b, h]``, the kept positions of each row (window
    included); on the device, nothing read back."""


def select(batch: PrefillBatch, scores: Tensor, allocation: Allocation, base: Tensor) -> KeepSets:
    """Each head's top-``k`` of ``scores`` ``[layers, sum_T, Hkv]`` plus the window, every
    layer and request at once, ``k`` per (layer, request, head) from ``allocation`` (which may
    read the base score ``base``, same shape): see
    :func:`bacon_sglang.selection.select_keep_heads`."""
    keep = select_keep_heads(
        scores, allocation.counts(base), allocation.widths, batch.candidate_lengths(),
        batch.windows, batch.prefix_lens,
    )  # fmt: skip
    return KeepSets(keep, (keep != KEEP_PAD).sum(-1))
