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


def select_keep_layers(
    scores: Tensor,
    lengths: Sequence[int],
    candidates: Sequence[int],
    windows: Sequence[int],
    first_candidates: Sequence[int],
) -> Tensor:
    """:func:`select_keep` for every layer and request at once: one batched top-k over
    ``[layers, B, Hkv, T]``, a fixed number of operations whatever the depth and
    the batch.

    Args:
        scores: ``[layers, sum_T, Hkv]`` candidate scores, request ``b`` owning ``T_b``
            consecutive rows in every layer.
        lengths, candidates, windows, first_candidates: as :func:`select_keep_packed`.

    Returns:
        ``[layers, B, Hkv, width]`` int64: request ``b``'s keep-set of layer ``l`` in
        ``[l, b, :, :kept_b]`` (``kept_b`` from :func:`kept_widths`), ``KEEP_PAD`` after.
    """
    layers, heads, device = scores.shape[0], scores.shape[2], scores.device
    batch = len(lengths)
    out_width = max(kept_widths(lengths, candidates, windows, first_candidates), default=0)
    spans = [t - f for t, f in zip(lengths, first_candidates, strict=True)]
    kept = [max(0, min(k, s)) for k, s in zip(candidates, spans, strict=True)]
    width, widest = max(kept, default=0), max(spans, default=0)
    rows0 = [o + f for o, f in zip(host_offsets(lengths), first_candidates, strict=False)]
    meta = to_device([*rows0, *spans, *kept, *first_candidates, *lengths, *windows], device)
    row0, span, k, first, t, w = meta.view(6, batch)[..., None, None]  # [B, 1, 1] each

    j = torch.arange(out_width, device=device)
    keep = torch.where(j < k + w, t + j - k, KEEP_PAD)  # the window after the k candidates
    if width == 0:
        return keep.expand(layers, batch, heads, out_width).contiguous()
    cols = torch.arange(widest, device=device)
    rows = (row0[:, 0] + cols).clamp(max=scores.shape[1] - 1)  # [B, widest]
    padded = scores[:, rows].float().transpose(2, 3)  # [layers, B, Hkv, widest]
    # -inf past each request's span: never above a real score's rank (k_b <= span)
    padded = padded.masked_fill(cols >= span, float("-inf"))
    kth = torch.topk(padded, width, dim=-1).values.gather(
        -1, (k - 1).clamp(min=0).expand(layers, batch, heads, 1)
    )
    above, tied = padded > kth, padded == kth
    mask = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    # the chosen columns in ascending order: the largest values of widest - col
    order = torch.topk(torch.where(mask & (k > 0), widest - cols, 0), width, dim=-1).values
    chosen = first + widest - order  # [layers, B, Hkv, width], absolute positions
    at = j.clamp(max=width - 1).expand(layers, batch, heads, out_width)
    return torch.where(j < k, chosen.gather(-1, at), keep)
