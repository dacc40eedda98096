"""Allocation: how many candidates each (layer, KV head) keeps (see :mod:`bacon_sglang.config`).

BACON never changes these; it changes only the score used inside each head. Every allocator
returns ``[Hkv]`` int64 counts in ``[0, T]`` for one layer, ``T`` being the candidates there
are (all are kept when a head's count exceeds them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bacon_sglang.paged import to_device
from bacon_sglang.selection import top_mask


def uniform_candidates(candidates: int, num_kv_heads: int, available: int) -> Tensor:
    """SnapKV: ``K`` for every head of every layer.

    Returns:
        ``[Hkv]`` int64, all ``min(K, T)``.
    """
    return torch.full((num_kv_heads,), max(0, min(candidates, available)), dtype=torch.long)


def pyramid_cap(
    candidates: int, layer_idx: int, num_layers: int, available: int, beta: int = 20
) -> int:
    """PyramidKV: per-layer candidates falling linearly with depth, the same for every head.

    ``min = K // beta``, ``max = 2K - min``, ``cap_l = max - l * ((max - min) // (L - 1))``.
    When ``max >= T`` the release sets ``max = T`` and ``min = 2K - T`` (keeping the mean
    near ``K``); every ``cap_l`` is finally clamped to ``[0, T]``. One layer gets ``K``.

    Args:
        candidates: ``K``, the mean per-head count over layers.
        layer_idx: ``l`` in ``[0, L)``.
        num_layers: ``L``.
        available: ``T``.
        beta: ratio of ``K`` to the smallest count.

    Returns:
        ``cap_l`` as an int.
    """
    low = candidates // beta
    high = 2 * candidates - low
    if high >= available:
        high = available
        low = 2 * candidates - available
    if num_layers <= 1:
        cap = candidates
    else:
        cap = high - layer_idx * ((high - low) // (num_layers - 1))
    return max(0, min(cap, available))


def pyramid_candidates(
    candidates: int,
    layer_idx: int,
    num_layers: int,
    num_kv_heads: int,
    available: int,
    beta: int = 20,
) -> Tensor:
    """:func:`pyramid_cap` for every head of layer ``layer_idx``.

    Returns:
        ``[Hkv]`` int64.
    """
    cap = pyramid_cap(candidates, layer_idx, num_layers, available, beta)
    return torch.full((num_kv_heads,), cap, dtype=torch.long)


def adakv_candidates(scores: Tensor, candidates: int, floor: float = 0.2) -> Tensor:
    """AdaKV: split the layer's ``Hkv * K`` tokens between heads by where the top scores are.

    Take the global top ``Hkv * K`` of all heads' scores (ties to the lower head, then the
    lower token), count the hits ``c_h`` per head, and give head ``h``
    ``(1 - floor) * c_h + floor * K`` rounded so that the counts still sum to ``Hkv * K``
    (largest remainder, ties to the lower head): each is the floor or the ceiling of its
    share, so every head keeps at least ``floor(floor * K)``.

    Args:
        scores: ``[Hkv, T]`` the base score of the candidates.
        candidates: ``K``, the mean per-head count.
        floor: the share of ``K`` every head keeps whatever its scores.

    Returns:
        ``[Hkv]`` int64 summing to ``Hkv * min(K, T)``.
    """
    heads, t = scores.shape
    device = scores.device
    if candidates >= t or candidates <= 0:
        return torch.full((heads,), max(0, min(candidates, t)), dtype=torch.long, device=device)
    total = heads * candidates
    hits = top_mask(scores.float().reshape(1, -1), total).reshape(heads, t).sum(-1).double()
    share = (1.0 - floor) * hits + floor * candidates  # sums to `total`
    whole = torch.floor(share + 1e-9)
    missing = int(total - whole.sum().item())
    bonus = top_mask((share - whole).unsqueeze(0), max(missing, 0))[0]
    return (whole + bonus.double()).long().clamp(0, t)


def adakv_layers(
    scores: Tensor, candidates: Sequence[int], spans: Sequence[int], floor: float = 0.2
) -> Tensor:
    """:func:`adakv_candidates` of every layer and request at once, in a fixed number of
    operations whatever the depth and the batch, nothing read back.

    Args:
        scores: ``[layers, B, Hkv, widest]`` request ``b``'s base scores of its ``span_b``
            candidates in columns ``[0, span_b)``, ``-inf`` after
            (:func:`bacon_sglang.selection.pad_spans`).
        candidates: ``K_b`` per request (Python ints).
        spans: ``span_b`` per request (Python ints).
        floor: the share of ``K`` every head keeps whatever its scores.

    Returns:
        ``[layers, B, Hkv]`` int64, ``[l, b]`` equal to ``adakv_candidates`` of request ``b``'s
        layer ``l`` (each summing to ``Hkv * min(K_b, span_b)``).
    """
    layers, batch, heads, widest = scores.shape
    split = [0 < k < s for k, s in zip(candidates, spans, strict=True)]  # else all min(K, T)
    totals = [heads * k if on else 0 for k, on in zip(candidates, split, strict=True)]
    plain = [max(0, min(k, s)) for k, s in zip(candidates, spans, strict=True)]
    meta = to_device([*totals, *candidates, *plain, *split], scores.device)
    total, k, plain_d, split_d = meta.view(4, batch)[..., None]  # [B, 1] each
    top = max(totals, default=0)
    if top == 0:
        return plain_d.expand(layers, batch, heads)
    flat = scores.reshape(layers, batch, heads * widest)  # ties: lower head, then lower token
    kth = torch.topk(flat, top, dim=-1).values.gather(-1, (total - 1).clamp(min=0).expand(
        layers, batch, 1))  # fmt: skip
    above, tied = flat > kth, flat == kth
    hit = above | (tied & (tied.cumsum(-1) <= total - above.sum(-1, keepdim=True)))
    hits = hit.view(layers, batch, heads, widest).sum(-1).double()
    share = (1.0 - floor) * hits + floor * k.double()  # sums to `total`
    whole = torch.floor(share + 1e-9)
    missing = total - whole.sum(-1, keepdim=True)
    # the `missing` largest remainders get one more, ties to the lower head: head h's rank
    rest = share - whole
    h = torch.arange(heads, device=scores.device)
    ahead = (rest[..., None, :] > rest[..., None]) | (
        (rest[..., None, :] == rest[..., None]) & (h < h[:, None])
    )  # [layers, B, Hkv (h), Hkv (h')]: h' ranks before h
    counts = whole + (ahead.sum(-1) < missing).double()
    return torch.where(split_d.bool(), counts.long(), plain_d)


def mean_candidates(per_head: Tensor) -> int:
    """The average per-head count of a layer, rounded half up; used for BACON's top-2K region.

    Args:
        per_head: ``[Hkv]`` int64.
    """
    return math.floor(per_head.double().mean().item() + 0.5) if per_head.numel() else 0


def sparsemm_cap(
    score: float,
    candidates: int,
    num_layers: int,
    num_kv_heads: int,
    available: int,
    floor: float = 0.1,
) -> int:
    """SparseMM: one head's candidates from its offline "visual head" score.

    ``cap = round(score * (K - m) * L * Hkv + m)`` with ``m = floor(floor * K)`` (rounded half
    to even), clamped to ``[0, T]``; the scores of all ``L * Hkv`` heads of the model sum to 1,
    so the caps average ``K`` over the model (not over one layer). Plain Python floats, so the
    host (cell planning, the served allocation) computes what :func:`sparsemm_candidates` does.

    Args:
        score: the head's score.
        candidates: ``K``, the model-wide mean per-head count.
        num_layers: ``L``.
        num_kv_heads: ``Hkv`` of the model (all heads, also when a rank holds a few).
        available: ``T``.
        floor: the share of ``K`` every head keeps whatever its score.
    """
    low = math.floor(floor * candidates)
    cap = round(score * (candidates - low) * num_layers * num_kv_heads + low)
    return max(0, min(cap, available))


def sparsemm_candidates(
    head_scores: Tensor, candidates: int, num_layers: int, available: int, floor: float = 0.1
) -> Tensor:
    """SparseMM: :func:`sparsemm_cap` of every head of one layer.

    Args:
        head_scores: ``[Hkv]`` this layer's scores (a slice of the model's ``[L, Hkv]``).
        candidates: ``K``, the model-wide mean per-head count.
        num_layers: ``L``.
        available: ``T``.
        floor: the share of ``K`` every head keeps whatever its score.

    Returns:
        ``[Hkv]`` int64.
    """
    heads = head_scores.shape[0]
    caps = [
        sparsemm_cap(s, candidates, num_layers, heads, available, floor)
        for s in head_scores.double().tolist()
    ]
    return torch.tensor(caps, dtype=torch.long)
