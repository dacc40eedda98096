"""SnapKV, served: each head keeps its top-``K`` candidates by the pooled window score ``B``
(no calibration). Reference: :class:`bacon_sglang.policies.SnapKV`."""

from __future__ import annotations

import torch
from torch import Tensor

from bacon_sglang import paged

from .base import PrefillBatch, select, window_scores


def keep_sets(batch: PrefillBatch) -> Tensor:
    """``[layers, B, Hkv, width]`` keep-sets (see :mod:`.base`): three launches (window
    scores in two, the pooling in one), then the batched selection."""
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
    return select(batch, base)
