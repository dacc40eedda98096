"""What every served policy shares: the prefill batch it ranks, and the stages it chains.

A served policy's keep-set function takes one :class:`PrefillBatch` (every layer of the
forward's finishing requests) and returns their keep-sets, ``[layers, B, Hkv, width]``,
in a number of kernel launches and PyTorch operations that does not depend on the depth or
on the batch. The stages below dispatch like ``bacon_sglang.kernels``: the Triton kernels on
CUDA tensors or under ``TRITON_INTERPRET=1``, else the per-request PyTorch references of
:mod:`bacon_sglang.paged`, layer by layer (production on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from bacon_sglang import paged, scoring
from bacon_sglang.paged import KVIndex, WindowScores
from bacon_sglang.selection import select_keep_layers

from .. import Backend, pick_backend


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

    def q_indptr(self) -> Tensor:
        """``[B + 1]`` window rows per request, on the CPU."""
        return paged.indptr(torch.tensor(list(self.windows), dtype=torch.long))

    def candidate_lengths(self) -> list[int]:
        """``T_b = n_b - w_b`` per request."""
        return [n - w for n, w in zip(self.index.lengths(), self.windows, strict=True)]

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


def select(batch: PrefillBatch, scores: Tensor) -> Tensor:
    """Each head's top-``K_b`` of ``scores`` ``[layers, sum_T, Hkv]`` plus the window, every
    layer and request at once: ``[layers, B, Hkv, width]`` (see
    :func:`bacon_sglang.selection.select_keep_layers`)."""
    return select_keep_layers(scores, batch.candidate_lengths(), batch.candidates,
                              batch.windows, batch.prefix_lens)  # fmt: skip
