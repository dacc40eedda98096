"""BACON, served: each head keeps its top-``k`` candidates by the calibrated score
``S = B + lam * (E + L + Tr)``, every layer calibrated in the same launches, layer ``l``'s
persistence ``Tr`` from the evidence of layers ``l-4 .. l-1`` of the pass; ``k`` and the
top-2K region from the base's allocation (:mod:`.allocation`), itself from ``B``.
Reference: ``BACON(base=...)`` (:mod:`bacon_sglang.policies.bacon`)."""

from __future__ import annotations

import torch

from bacon_sglang import paged

from . import allocation
from .base import KeepSets, PrefillBatch, select, window_scores


def keep_sets(batch: PrefillBatch, allocate: allocation.Allocator = allocation.uniform) -> KeepSets:
    """:class:`~.base.KeepSets` of ``batch``: four launches (window scores in two, calibration
    in two), then the batched statistics, allocation and selection."""
    split = allocate(batch)
    scores = window_scores(batch)
    q_indptr = batch.q_indptr()
    if batch.on_triton():
        from ..calibration import calibrate_layers

        cal = calibrate_layers(scores, q_indptr, split.region, batch.prefix_lens,
                               pool_kernel=batch.pool_kernel)  # fmt: skip
        return select(batch, cal.scores, split, cal.base)
    layers, bases, evidence = [], [], []
    for mean, last, region in zip(scores.mean, scores.last, split.region, strict=True):
        cal = paged.calibrate(
            scores._replace(mean=mean, last=last), q_indptr, region, evidence,
            batch.prefix_lens, pool_kernel=batch.pool_kernel,
        )  # fmt: skip
        layers.append(cal.scores)
        bases.append(cal.base)
        evidence.append(cal.evidence)
    return select(batch, torch.stack(layers), split, torch.stack(bases))
