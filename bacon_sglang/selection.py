"""Keep-sets: per KV head, the top-scored candidates plus the always-kept window.

    keys:  0 ...... first_candidate-1 | first_candidate ........ T-1 | T ...... n-1
           shared prefix (kept           candidates: top-k_h by       window (always
           elsewhere, never selected)    score per head               kept, w tokens)

Ranking is deterministic: by score descending, ties to the lower token index. The top-k is
found from ``torch.topk``'s k-th value (well defined whatever its tie order), then the ties at
that value are resolved by index, which avoids a full sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bacon_sglang.paged import host_offsets, to_device

KEEP_PAD = -1
"""Fills the tail of a keep-set row whose head keeps fewer tokens than the widest head."""


def top_mask(scores: Tensor, k: int | Tensor) -> Tensor:
    """Per row, the ``k_h`` highest scores; among equal scores the lower indices win.

    Args:
        scores: ``[H, T]`` float scores (no NaN).
        k: how many to take, for every row or ``[H]`` per row; clamped to ``[0, T]``.

    Returns:
        ``[H, T]`` bool with exactly ``min(k_h, T)`` true entries in row ``h``.
    """
    heads, t = scores.shape
    k = torch.as_tensor(k, dtype=torch.long, device=scores.device).expand(heads).clamp(0, t)
    width = int(k.max()) if heads else 0
    if width == 0:
        return torch.zeros(heads, t, dtype=torch.bool, device=scores.device)
    top = torch.topk(scores, width, dim=-1).values  # [H, width], descending
    kth = top.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))  # [H, 1] the k-th largest value
    above = scores > kth  # fewer than k of these
    tied = scores == kth
    need = k.unsqueeze(-1) - above.sum(-1, keepdim=True)  # >= 1 tied entries to take
    mask = above | (tied & (tied.cumsum(-1) <= need))
    return mask & (k > 0).unsqueeze(-1)


def select_keep(
    scores: Tensor,
    candidates: int | Tensor,
    window: int,
    first_candidate: int = 0,
) -> Tensor:
    """Sorted absolute indices of the tokens each KV head keeps.

    Args:
        scores: ``[Hkv, T]`` candidate scores (``T = n - w``), higher is kept first.
        candidates: ``K`` for every head, or ``[Hkv]`` per-head counts ``k_h``
            (:mod:`bacon_sglang.config`); the window comes on top. Clamped to the
            ``T - first_candidate`` candidates there are (all are kept when there are fewer).
        window: ``w``; indices ``[T, T + w)`` are always kept.
        first_candidate: indices ``[0, first_candidate)`` are never selected and do not count
            in ``K`` (a shared prefix kept elsewhere).

    Returns:
        ``[Hkv, max_h(k_h) + w]`` int64. Row ``h`` holds its ``k_h + w`` kept indices in
        ascending order, then :data:`KEEP_PAD` up to the common width. With one ``K`` for all
        there is no padding: ``[Hkv, min(K, T - first_candidate) + w]``.
    """
    heads, t = scores.shape
    if not 0 <= first_candidate <= t:
        raise ValueError(f"first_candidate {first_candidate} outside [0, {t}]")
    if window < 0:
        raise ValueError(f"negative window {window}")
    device = scores.device
    per_head = torch.as_tensor(candidates, dtype=torch.long, device=device)
    per_head = per_head.expand(heads).clamp(0, t - first_candidate)
    width = int(per_head.max()) if heads else 0

    keep = torch.full((heads, width + window), KEEP_PAD, dtype=torch.long, device=device)
    # nonzero() walks row-major: each head's chosen candidates come out in ascending order.
    rows, cols = top_mask(scores[:, first_candidate:].float(), per_head).nonzero(as_tuple=True)
    starts = per_head.cumsum(0) - per_head
    slot = torch.arange(rows.numel(), device=device) - starts[rows]
    keep[rows, slot] = cols + first_candidate
    after = per_head.unsqueeze(1) + torch.arange(window, device=device)  # [Hkv, w] slots
    keep.scatter_(1, after, torch.arange(t, t + window, device=device).expand(heads, window))
    return keep


def select_keep_packed(
    scores: Tensor,
    lengths: Sequence[int],
    candidates: Sequence[int],
    windows: Sequence[int],
    first_candidates: Sequence[int],
) -> list[Tensor]:
    """:func:`select_keep` for every request of a batch at once, from packed scores.

    Args:
        scores: ``[sum_T, Hkv]`` candidate scores, request ``b`` owning ``T_b`` consecutive
            rows (as :class:`bacon_sglang.paged.Calibrated`).
        lengths, candidates, windows, first_candidates: ``T_b``, ``K_b``, ``w_b``, ``f_b`` per
            request, as Python ints (nothing is read back from the GPU).

    Returns:
        Per request ``[Hkv, min(K_b, T_b - f_b) + w_b]`` int64, equal to
        ``select_keep(scores_b.T, K_b, w_b, f_b)``: views into one ``[B, Hkv, width]`` tensor.
    """
    keep = select_keep_layers(scores[None], lengths, candidates, windows, first_candidates)[0]
    kept = kept_widths(lengths, candidates, windows, first_candidates)
    return [keep[b, :, : kept[b]] for b in range(len(kept))]


def kept_widths(
    lengths: Sequence[int],
    candidates: Sequence[int],
    windows: Sequence[int],
    first_candidates: Sequence[int],
) -> list[int]:
    """Per request the keep-set's width ``min(K_b, T_b - f_b) + w_b`` (Python ints)."""
    spans = [t - f for t, f in zip(lengths, first_candidates, strict=True)]
    if any(s < 0 for s in spans) or any(w < 0 for w in windows):
        raise ValueError("need 0 <= first_candidate <= T and windows >= 0")
    return [max(0, min(k, s)) + w for k, s, w in zip(candidates, spans, windows, strict=True)]


def pad_spans(scores: Tensor, lengths: Sequence[int], first_candidates: Sequence[int]) -> Tensor:
    """Each request's competing candidates side by side: ``scores`` ``[layers, sum_T, Hkv]``
    (request ``b`` owning ``T_b`` consecutive rows in every layer) as ``[layers, B, Hkv,
    widest]`` float32, request ``b``'s candidates ``[f_b, T_b)`` in columns ``[0, span_b)``
    (``span_b = T_b - f_b``, ``widest`` the largest), ``-inf`` after: never above a real
    score's rank."""
    spans = [t - f for t, f in zip(lengths, first_candidates, strict=True)]
    rows0 = [o + f for o, f in zip(host_offsets(lengths), first_candidates, strict=False)]
    row0, span = to_device([*rows0, *spans], scores.device).view(2, len(spans))
    return _padded(scores, row0, span, torch.arange(max(spans, default=0), device=scores.device))


def _padded(scores: Tensor, row0: Tensor, span: Tensor, cols: Tensor) -> Tensor:
    """:func:`pad_spans` from ``row0``, ``span`` ``[B]`` on the device, ``cols`` ``[widest]``
    the column indices."""
    rows = (row0[:, None] + cols).clamp(max=max(scores.shape[1] - 1, 0))  # [B, widest]
    padded = scores[:, rows].float().transpose(2, 3)  # [layers, B, Hkv, widest]
    return padded.masked_fill((cols >= span[:, None])[:, None], float("-inf"))


def select_keep_layers(
    scores: Tensor,
    lengths: Sequence[int],
    candidates: Sequence[int],
    windows: Sequence[int],
    first_candidates: Sequence[int],
) -> Tensor:
    """:func:`select_keep` for every layer and request at once, one ``K_b`` per request: one
    batched top-k over ``[layers, B, Hkv, T]``, a fixed number of operations whatever the
    depth and the batch (:func:`select_keep_heads` with ``k = min(K_b, T_b - f_b)`` in every
    head).

    Args:
        scores: ``[layers, sum_T, Hkv]`` candidate scores, request ``b`` owning ``T_b``
            consecutive rows in every layer.
        lengths, candidates, windows, first_candidates: as :func:`select_keep_packed`.

    Returns:
        ``[layers, B, Hkv, width]`` int64: request ``b``'s keep-set of layer ``l`` in
        ``[l, b, :, :kept_b]`` (``kept_b`` from :func:`kept_widths`), ``KEEP_PAD`` after.
    """
    widths = kept_widths(lengths, candidates, windows, first_candidates)
    kept = [n - w for n, w in zip(widths, windows, strict=True)]
    counts = to_device(kept, scores.device)[:, None]  # [B, 1]: every layer and head
    return select_keep_heads(scores, counts, kept, lengths, windows, first_candidates)


def select_keep_heads(
    scores: Tensor,
    counts: Tensor,
    widths: Sequence[int],
    lengths: Sequence[int],
    windows: Sequence[int],
    first_candidates: Sequence[int],
) -> Tensor:
    """:func:`select_keep` for every layer, request and head at once, each (layer, request,
    head) with its own count: one batched top-k, a fixed number of operations whatever the
    depth and the batch, nothing read back.

    Args:
        scores: ``[layers, sum_T, Hkv]`` candidate scores, request ``b`` owning ``T_b``
            consecutive rows in every layer.
        counts: ``k`` per (layer, request, head), ``[layers, B, Hkv]`` or broadcastable to it
            (int64, in ``[0, T_b - f_b]``).
        widths: per request, an upper bound of its ``k`` (Python ints, ``<= T_b - f_b``).
        lengths, windows, first_candidates: ``T_b``, ``w_b``, ``f_b`` (Python ints).

    Returns:
        ``[layers, B, Hkv, max_b(widths_b + w_b)]`` int64: row ``[l, b, h]`` holds its ``k``
        chosen positions ascending, then the window ``[T_b, T_b + w_b)``, then
        :data:`KEEP_PAD`.
    """
    layers, heads, device = scores.shape[0], scores.shape[2], scores.device
    batch = len(lengths)
    spans = [t - f for t, f in zip(lengths, first_candidates, strict=True)]
    out_width = max((k + w for k, w in zip(widths, windows, strict=True)), default=0)
    width, widest = max(widths, default=0), max(spans, default=0)
    rows0 = [o + f for o, f in zip(host_offsets(lengths), first_candidates, strict=False)]
    meta = to_device([*rows0, *spans, *first_candidates, *lengths, *windows], device)
    row0, span, first, t, w = meta.view(5, batch)
    first, t, w = (x[:, None, None] for x in (first, t, w))  # [B, 1, 1] each
    k = counts.expand(layers, batch, heads)[..., None]  # [layers, B, Hkv, 1]

    j = torch.arange(out_width, device=device)
    keep = torch.where(j < k + w, t + j - k, KEEP_PAD)  # the window after the k candidates
    if width == 0:
        return keep
    cols = torch.arange(widest, device=device)
    padded = _padded(scores, row0, span, cols)  # [layers, B, Hkv, widest]
    kth = torch.topk(padded, width, dim=-1).values.gather(-1, (k - 1).clamp(min=0))
    above, tied = padded > kth, padded == kth
    mask = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    # the chosen columns in ascending order: the largest values of widest - col
    order = torch.topk(torch.where(mask & (k > 0), widest - cols, 0), width, dim=-1).values
    chosen = first + widest - order  # [layers, B, Hkv, width], absolute positions
    at = j.clamp(max=width - 1).expand(layers, batch, heads, out_width)
    return torch.where(j < k, chosen.gather(-1, at), keep)
