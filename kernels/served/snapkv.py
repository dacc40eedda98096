"""SnapKV's score, served: each head keeps its top-``k`` candidates by the pooled window score
``B`` (no calibration), ``k`` from the allocation: SnapKV's uniform ``K``, PyramidKV's, AdaKV's
or SparseMM's (:mod:`.allocation`). References: :class:`bacon_sglang.policies.SnapKV` and its
subclasses ``PyramidKV``, ``AdaKV``, ``SparseMM``."""

from __future__ import annotations

import torch

from bacon_sglang import paged

from . import allocation
from .base import KeepSets, PrefillBatch, select, window_scores


def keep_sets(batch: PrefillBatch, allocate: allocation.Allocator = allocation.uniform) -> KeepSets:
    """:class:`~.base.KeepSets` of ``batch``: three launches (window scores in two, the
    pooling in one), then the batched allocation and selection."""
    split = allocate(batch)
    scores = window_scores(batch)
    if batch.on_triton():
        from ..calibration import pool_layers

        base = pool_layers(scores, batch.q_indptr(), pool_kernel=batch.pool_kernel)
    else:
        base = torch.stack([
            paged.calibrate(
                scores._replace(mean=mean, last=last), batch.q_indptr(), batch.candidates,
                pool_kernel=batch.pool_kernel,
            ).base
            for mean, last in zip(scores.mean, scores.last, strict=True)
        ])  # fmt: skip
    return select(batch, base, split, base)
