"""How the served policies split each request's candidates between layers and KV heads.

An allocation is settled on the host before any score where it can be (SnapKV, PyramidKV,
SparseMM: from ``K_b``, ``span_b``, the depth and SparseMM's offline head scores), or split
between the heads by the base score on the device (AdaKV, whose per-layer sum is still known on
the host: ``Hkv * min(K, span)``)::

    allocator(batch) -> Allocation
        region        [layers][B]  BACON's top-2K K: the layer's mean head count (SparseMM: K)
        widths        [B]          no head of request b keeps more candidates
        counts(base)  [layers, B, Hkv] int64 (or broadcastable), each head's candidates, on
                      the device; ``base`` [layers, sum_T, Hkv] is SnapKV's score B

References: ``allocate`` and ``region_candidates`` of the policy objects
(:mod:`bacon_sglang.policies`); the per-request totals on the host:
:func:`bacon_sglang.cells.kept_cells`. Hyperparameters (PyramidKV's ``beta``, the floors of
AdaKV and SparseMM) are the policies' defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from bacon_sglang.allocation import adakv_layers, pyramid_cap, sparsemm_cap
from bacon_sglang.paged import to_device
from bacon_sglang.selection import pad_spans

from .base import PrefillBatch


class Allocation(NamedTuple):
    """One prefill batch's split of candidates (see the module docstring)."""

    region: list[list[int]]  # [layers][B]
    widths: list[int]  # [B]
    counts: Callable[[Tensor], Tensor]  # base [layers, sum_T, Hkv] -> [layers, B, Hkv]


Allocator = Callable[[PrefillBatch], Allocation]


def _fixed(batch: PrefillBatch, region: list[list[int]], per_head: list[list[list[int]]]):
    """An allocation settled on the host: ``per_head`` ``[layers or 1][B][Hkv or 1]``, copied
    to the device at once."""
    flat = list(itertools.chain.from_iterable(itertools.chain(*per_head)))
    counts = to_device(flat, batch.q.device).view(len(per_head), len(batch.windows), -1)
    widths = [max(itertools.chain(*(layer[b] for layer in per_head)), default=0)
              for b in range(len(batch.windows))]  # fmt: skip
    return Allocation(region, widths, lambda base: counts)


def _kept(batch: PrefillBatch) -> list[int]:
    """``min(K_b, span_b)`` per request (at least 0)."""
    return [max(0, min(k, s)) for k, s in zip(batch.candidates, batch.spans(), strict=True)]


def uniform(batch: PrefillBatch) -> Allocation:
    """SnapKV: ``min(K_b, span_b)`` in every layer and head
    (:func:`bacon_sglang.allocation.uniform_candidates`)."""
    kept = _kept(batch)
    return _fixed(batch, [kept] * batch.num_layers, [[[k] for k in kept]])


def pyramid(batch: PrefillBatch) -> Allocation:
    """PyramidKV: ``cap_l`` of request ``b`` in every head of layer ``l``
    (:func:`bacon_sglang.allocation.pyramid_cap`)."""
    caps = [
        [pyramid_cap(k, layer, batch.num_layers, s)
         for k, s in zip(batch.candidates, batch.spans(), strict=True)]
        for layer in range(batch.num_layers)
    ]  # fmt: skip
    return _fixed(batch, caps, [[[c] for c in layer] for layer in caps])


def sparsemm(batch: PrefillBatch) -> Allocation:
    """SparseMM: each head's cap from its visual-head score ``batch.head_scores``
    (:func:`bacon_sglang.allocation.sparsemm_cap`, normalised over all the model's heads
    whichever the pool holds); BACON's region is ``K_b``."""
    scores, layers = batch.head_scores, batch.num_layers
    if len(scores) != layers:
        raise ValueError(f"{len(scores)} layers of head scores for {layers}")
    model_heads = len(scores[0])
    heads = range(batch.num_kv_heads) if batch.kv_heads is None else batch.kv_heads
    if len(heads) != batch.num_kv_heads or not all(0 <= h < model_heads for h in heads):
        raise ValueError(f"KV heads {list(heads)} of a pool of {batch.num_kv_heads} heads, "
                         f"head scores of {model_heads}")  # fmt: skip
    spans = batch.spans()
    caps = [
        [[sparsemm_cap(scores[layer][h], k, layers, model_heads, s) for h in heads]
         for k, s in zip(batch.candidates, spans, strict=True)]
        for layer in range(layers)
    ]  # fmt: skip
    return _fixed(batch, [list(batch.candidates)] * layers, caps)


def adakv(batch: PrefillBatch) -> Allocation:
    """AdaKV: the layer's ``Hkv * min(K_b, span_b)`` split between the heads by their hits in
    its global top-k of the base score (:func:`bacon_sglang.allocation.adakv_layers`); a head
    keeps at most ``min(span_b, Hkv * K_b)``."""
    kept, spans, heads = _kept(batch), batch.spans(), batch.num_kv_heads
    lengths = batch.candidate_lengths()
    widths = [min(s, heads * k) if 0 < k < s else n
              for k, s, n in zip(batch.candidates, spans, kept, strict=True)]  # fmt: skip

    def counts(base: Tensor) -> Tensor:
        return adakv_layers(pad_spans(base, lengths, batch.prefix_lens), batch.candidates, spans)

    return Allocation([kept] * batch.num_layers, widths, counts)
