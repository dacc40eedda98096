"""BACON over SnapKV, served: each head keeps its top-``K`` candidates by the calibrated score
``S = B + lam * (E + L + Tr)``, every layer calibrated in the same launches, layer ``l``'s
persistence ``Tr`` from the evidence of layers ``l-4 .. l-1`` of the pass. Reference:
``BACON(base=SnapKV())`` (:mod:`bacon_sglang.policies.bacon`)."""

from __future__ import annotations

import torch
from torch import Tensor

from bacon_sglang import paged

from .base import PrefillBatch, select, window_scores


def keep_sets(batch: PrefillBatch) -> Tensor:
    """``[layers, B, Hkv, width]`` keep-sets (see :mod:`.base`): four launches (window
    scores in two, calibration in two), then the batched statistics and selection."""
    scores = window_scores(batch)
    q_indptr = batch.q_indptr()
    if batch.on_triton():
        from ..calibration import calibrate_layers

        calibrated = calibrate_layers(scores, q_indptr, batch.candidates, batch.prefix_lens,
                                      pool_kernel=batch.pool_kernel).scores  # fmt: skip
        return select(batch, calibrated)
    layers, evidence = [], []
    for mean, last in zip(scores.mean, scores.last, strict=True):
        cal = paged.calibrate(
            scores._replace(mean=mean, last=last), q_indptr, batch.candidates, evidence,
            batch.prefix_lens, pool_kernel=batch.pool_kernel,
        )  # fmt: skip
        layers.append(cal.scores)
        evidence.append(cal.evidence)
    return select(batch, torch.stack(layers))
