"""Per-token scores that rank prompt tokens at the end of prefill (one request, one layer).

Pure PyTorch, no SGLang. Everything here is a function of the window attention
``A = softmax(q_win · kᵀ / sqrt(d))`` of the last ``w`` prompt queries over all ``n`` prompt
keys, shape ``[Hq, w, n]``. The window size ``w`` is always ``A.shape[1]``; the candidate
tokens are the first ``T = n - w`` keys, the window keys ``[T, n)`` are always kept.

    keys:     0 ............................ T-1 | T ........ n-1
              candidates (ranked by a score)       window (always kept)

Data path of BACON ("Last But Not Least", EMNLP 2026), each step a function below::

    A ─┬─ snapkv_scores ──────── B  [Hkv, T]   step 1 (the base score)
       └─ last_query_scores ──── Q  [Hkv, T]   step 2
    boundary_evidence(B, Q) ──── E             step 3   (stored for later layers)
    coherence(E) ─────────────── L             step 4   (1-D, or 2-D over image grids)
    persistence(E_prev) ──────── Tr            step 5
    V = E + L + Tr                             step 6
    scale_match(B, V, K) ─────── lam, rho      steps 7-8
    S = B + lam * V                            step 9

All scores are float32 whatever the input dtype; nothing here depends on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Named defaults of the paper's release (BACON.md, "No thresholds and no learned weights").
POOL_KERNEL = 5
COHERENCE_KERNEL = 5
HISTORY = 4
SCALE = 0.5
REGION = 2
EPS = 1e-8

ImageGrid = tuple[int, int, int]
"""``(start, rows, cols)``: an image whose patch tokens occupy ``[start, start + rows * cols)``
in row-major order."""


def window_attention(
    q_window: Tensor,
    keys: Tensor,
    scale: float | None = None,
    logit_cap: float = 0.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention of the last ``w`` prompt queries over all ``n`` prompt keys.

    Args:
        q_window: ``[Hq, w, d]`` queries of the last ``w`` prompt positions (after RoPE).
        keys: ``[Hkv, n, d]`` keys of the whole prompt (after RoPE); ``Hq % Hkv == 0``.
            Query head ``i`` reads KV head ``i // (Hq // Hkv)`` (GQA by head groups).
        scale: logit scale, ``1 / sqrt(d)`` when ``None``.
        logit_cap: > 0: logits soft-capped to ``cap * tanh(logit / cap)`` (SGLang's
            ``RadixAttention.logit_cap``).
        key_mask: ``[Hkv, n]`` bool, False where a key is no key (padding of a head that
            holds fewer): it gets exactly 0. None: every key is one.

    Returns:
        ``[Hq, w, n]`` float32 attention. Causal inside the window: query ``i`` sees keys
        ``[0, n - w + i]``; later keys get exactly 0.
    """
    num_q_heads, w, d = q_window.shape
    num_kv_heads, n, _ = keys.shape
    _check_heads(num_q_heads, num_kv_heads)
    if w > n:
        raise ValueError(f"window {w} is longer than the prompt {n}")
    scale = d**-0.5 if scale is None else scale
    # One batched matmul per KV head: its query group's rows stacked, [Hkv, G * w, d].
    q = q_window.float().reshape(num_kv_heads, num_q_heads // num_kv_heads * w, d)
    logits = torch.bmm(q * scale, keys.float().transpose(1, 2)).reshape(num_q_heads, w, n)
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    rows = torch.arange(w, device=keys.device).unsqueeze(1)
    cols = torch.arange(n, device=keys.device).unsqueeze(0)
    logits.masked_fill_(cols > rows + (n - w), float("-inf"))
    if key_mask is not None:  # query head i reads KV head i // group
        absent = ~key_mask.repeat_interleave(num_q_heads // num_kv_heads, dim=0).unsqueeze(1)
        logits.masked_fill_(absent, float("-inf"))
    return torch.softmax(logits, dim=-1)


def avg_pool(x: Tensor, kernel: int) -> Tensor:
    """Moving average along the last axis: stride 1, ``kernel // 2`` zero padding each side,
    always divided by ``kernel`` (torch's ``count_include_pad=True``).

    Args:
        x: ``[..., T]`` scores.
        kernel: odd window length; 1 is the identity.

    Returns:
        ``[..., T]`` float32.
    """
    _check_kernel(kernel)
    x = x.float()
    t = x.shape[-1]
    if kernel == 1 or t == 0:
        return x.clone()
    # The sum of `kernel` shifted copies, left to right, then one division: the same numbers
    # as F.avg_pool1d(count_include_pad=True), several times faster on CPU.
    padded = F.pad(x, (kernel // 2, kernel // 2))
    total = padded[..., :t].clone()
    for shift in range(1, kernel):
        total += padded[..., shift : shift + t]
    return total / kernel


def gqa_mean(x: Tensor, num_kv_heads: int) -> Tensor:
    """Mean over the query heads that share a KV head.

    Args:
        x: ``[Hq, T]`` per-query-head scores; query head ``i`` belongs to KV head
            ``i // (Hq // Hkv)``.
        num_kv_heads: ``Hkv``.

    Returns:
        ``[Hkv, T]`` float32.
    """
    num_q_heads, t = x.shape
    _check_heads(num_q_heads, num_kv_heads)
    return x.float().reshape(num_kv_heads, num_q_heads // num_kv_heads, t).mean(dim=1)


def snapkv_scores(attn: Tensor, num_kv_heads: int, pool_kernel: int = POOL_KERNEL) -> Tensor:
    """SnapKV's window score (BACON step 1, ``B``): mean over the window rows, mean over each
    KV head's query group, avg-pool along the tokens; window columns dropped before pooling.

    Args:
        attn: ``[Hq, w, n]`` window attention (any float dtype).
        num_kv_heads: ``Hkv``.
        pool_kernel: odd avg-pool kernel (see :func:`avg_pool`).

    Returns:
        ``[Hkv, n - w]`` float32.
    """
    t = attn.shape[2] - attn.shape[1]
    rows_mean = attn[:, :, :t].mean(dim=1, dtype=torch.float32)  # [Hq, T]
    return avg_pool(gqa_mean(rows_mean, num_kv_heads), pool_kernel)


def last_query_scores(attn: Tensor, num_kv_heads: int, pool_kernel: int = POOL_KERNEL) -> Tensor:
    """The last prompt query's score (BACON step 2, ``Q``): :func:`snapkv_scores` on the last
    window row only.

    Args:
        attn: ``[Hq, w, n]`` window attention.
        num_kv_heads: ``Hkv``.
        pool_kernel: odd avg-pool kernel.

    Returns:
        ``[Hkv, n - w]`` float32.
    """
    t = attn.shape[2] - attn.shape[1]
    return avg_pool(gqa_mean(attn[:, -1, :t], num_kv_heads), pool_kernel)


def boundary_evidence(base: Tensor, last: Tensor) -> Tensor:
    """Step 3: ``E = relu(Q - B)``, what the last query sees beyond the window's consensus.

    Args:
        base: ``[Hkv, T]`` ``B``.
        last: ``[Hkv, T]`` ``Q``.

    Returns:
        ``[Hkv, T]`` float32.
    """
    return torch.relu(last.float() - base.float())


def coherence(
    evidence: Tensor,
    kernel: int = COHERENCE_KERNEL,
    image_grids: Sequence[ImageGrid] | None = None,
) -> Tensor:
    """Step 4: intra-layer coherence ``L``, ``E`` averaged over its neighbourhood.

    By default (the paper) a 1-D :func:`avg_pool` along the flattened token order. With
    ``image_grids`` (the 2-D variant), tokens of each listed image are instead averaged over a
    ``kernel x kernel`` square of their patch grid (zero padding, divided by ``kernel**2``);
    tokens outside every grid keep the 1-D value. Grid tokens that fall in the window (a grid
    that ends inside the last ``w`` positions) count as ``E = 0``.

    Args:
        evidence: ``[Hkv, T]`` ``E``.
        kernel: odd pool kernel.
        image_grids: ``(start, rows, cols)`` per image, absolute token positions; grids must
            lie inside the prompt but may overlap the window.

    Returns:
        ``[Hkv, T]`` float32.
    """
    pooled = avg_pool(evidence, kernel)
    if not image_grids:
        return pooled
    heads, t = evidence.shape
    for start, rows, cols in image_grids:
        end = start + rows * cols
        if start < 0 or rows <= 0 or cols <= 0:
            raise ValueError(f"bad image grid {(start, rows, cols)}")
        if start >= t:
            continue  # entirely inside the window: nothing to score
        patch = torch.zeros(heads, rows * cols, device=evidence.device)
        patch[:, : min(end, t) - start] = evidence[:, start:end].float()
        grid = F.avg_pool2d(
            patch.reshape(heads, 1, rows, cols), kernel, stride=1, padding=kernel // 2
        )
        pooled[:, start : min(end, t)] = grid.reshape(heads, rows * cols)[:, : min(end, t) - start]
    return pooled


def persistence(
    evidence: Tensor, prev_evidence: Sequence[Tensor], history: int = HISTORY
) -> Tensor:
    """Step 5: inter-layer persistence ``Tr``, the mean ``E`` of the last ``history`` earlier
    layers of this request (same KV head index); 0 when there is none.

    Args:
        evidence: ``[Hkv, T]`` this layer's ``E`` (only its shape, dtype and device are used).
        prev_evidence: earlier layers' ``E``, oldest first; entries whose shape differs from
            ``evidence`` are ignored, then the last ``history`` are averaged.
        history: how many earlier layers count.

    Returns:
        ``[Hkv, T]`` float32.
    """
    same = [e for e in prev_evidence if e.shape == evidence.shape]
    same = same[-history:] if history > 0 else []
    if not same:
        return torch.zeros_like(evidence, dtype=torch.float32)
    return torch.stack([e.float() for e in same]).mean(dim=0)


class ScaleMatch(NamedTuple):
    """Steps 7-8 per KV head: ``lam`` already includes the presence gate ``rho``."""

    lam: Tensor  # [Hkv] float32
    rho: Tensor  # [Hkv] float32


def scale_match(
    base: Tensor,
    value: Tensor,
    candidates: int,
    scale: float = SCALE,
    region: int = REGION,
    eps: float = EPS,
) -> ScaleMatch:
    """Steps 7-8: match the spread of ``V`` to that of ``B`` over their top ``min(2K, T)``.

    ``Bt``, ``Vt`` = the top-``K2`` values of ``B`` and of ``V`` (each sorted on its own),
    ``lam = c * std(Bt) / (std(Vt) + eps)`` (population std),
    ``rho = clamp(mean(Vt) / (mean(Bt) + eps), 0, 1)``, returned ``lam`` is ``rho * lam``.
    With ``K2 == 0`` (no candidates there or none asked for) both are 0.

    Args:
        base: ``[Hkv, T]`` ``B``.
        value: ``[Hkv, T]`` ``V``.
        candidates: ``K`` (:mod:`bacon_sglang.config`; for uneven head counts, their mean).
        scale: ``c``.
        region: the top-region factor (2 in ``2K``).
        eps: the denominators' epsilon.

    Returns:
        :class:`ScaleMatch` of ``[Hkv]`` float32 tensors.
    """
    heads, t = base.shape
    k2 = min(region * candidates, t)
    if k2 <= 0:
        zeros = torch.zeros(heads, device=base.device)
        return ScaleMatch(zeros, zeros.clone())
    bt = torch.topk(base.float(), k2, dim=-1).values
    vt = torch.topk(value.float(), k2, dim=-1).values
    lam = scale * bt.std(dim=-1, correction=0) / (vt.std(dim=-1, correction=0) + eps)
    rho = (vt.mean(dim=-1) / (bt.mean(dim=-1) + eps)).clamp(0.0, 1.0)
    return ScaleMatch(rho * lam, rho)


class BaconScores(NamedTuple):
    scores: Tensor  # [Hkv, T] calibrated score S, ranks the candidates
    evidence: Tensor  # [Hkv, T] boundary evidence E of this layer: pass on to later layers


def calibrate(
    base: Tensor,
    last: Tensor,
    candidates: int,
    prev_evidence: Sequence[Tensor] = (),
    *,
    coherence_kernel: int = COHERENCE_KERNEL,
    history: int = HISTORY,
    scale: float = SCALE,
    region: int = REGION,
    eps: float = EPS,
    first_candidate: int = 0,
    image_grids: Sequence[ImageGrid] | None = None,
) -> BaconScores:
    """Steps 3-9 from a base score ``B`` and a last-query score ``Q`` (see :func:`bacon_scores`).

    Args:
        base: ``[Hkv, T]`` ``B``.
        last: ``[Hkv, T]`` ``Q``.
        candidates: ``K`` (:mod:`bacon_sglang.config`).
        prev_evidence: earlier layers' ``E`` of this request, oldest first.
        first_candidate: tokens ``[0, first_candidate)`` are kept elsewhere and do not compete;
            the top-``2K`` statistics of steps 7-8 are taken over ``[first_candidate, T)``.
            Pooling still sees every token.

    Returns:
        :class:`BaconScores` ``(scores S, evidence E)``, both ``[Hkv, T]`` float32.
    """
    base = base.float()
    evidence = boundary_evidence(base, last)
    value = (
        evidence
        + coherence(evidence, coherence_kernel, image_grids)
        + persistence(evidence, prev_evidence, history)
    )
    lam, _ = scale_match(
        base[:, first_candidate:], value[:, first_candidate:], candidates, scale, region, eps
    )
    return BaconScores(base + lam.unsqueeze(-1) * value, evidence)


def bacon_scores(
    attn: Tensor,
    num_kv_heads: int,
    candidates: int,
    prev_evidence: Sequence[Tensor] = (),
    *,
    pool_kernel: int = POOL_KERNEL,
    coherence_kernel: int = COHERENCE_KERNEL,
    history: int = HISTORY,
    scale: float = SCALE,
    region: int = REGION,
    eps: float = EPS,
    first_candidate: int = 0,
    image_grids: Sequence[ImageGrid] | None = None,
) -> BaconScores:
    """BACON's calibrated score for one layer of one request (the paper's steps 1-9).

    ``S = B + lam * (E + L + Tr)`` with ``B`` SnapKV's window score, ``E = relu(Q - B)`` the
    last query's excess, ``L`` its pooled neighbourhood, ``Tr`` its mean over the last
    ``history`` layers, and ``lam`` the per-head scale match gated by presence.

    Args:
        attn: ``[Hq, w, n]`` window attention (any float dtype; computed in float32).
        num_kv_heads: ``Hkv``.
        candidates: ``K`` (:mod:`bacon_sglang.config`; the mean per-head count when the base
            method allocates unevenly).
        prev_evidence: ``E`` of earlier layers of this request, oldest first, each
            ``[Hkv, n - w]``; the last ``history`` of matching shape are used.
        pool_kernel: avg-pool kernel of ``B`` and ``Q``.
        coherence_kernel: pool kernel of ``L``.
        history: layers back for ``Tr``.
        scale: ``c`` of the scale match.
        region: ``2`` in the ``top-2K`` region.
        eps: denominators' epsilon.
        first_candidate: start of the competing candidates (see :func:`calibrate`).
        image_grids: ``(start, rows, cols)`` per image to pool ``L`` in 2-D; ``None`` (the
            paper) pools in 1-D.

    Returns:
        :class:`BaconScores` ``(scores [Hkv, n - w], evidence [Hkv, n - w])``, float32; store
        ``evidence`` and pass it in ``prev_evidence`` for the following layers.
    """
    return calibrate(
        snapkv_scores(attn, num_kv_heads, pool_kernel),
        last_query_scores(attn, num_kv_heads, pool_kernel),
        candidates,
        prev_evidence,
        coherence_kernel=coherence_kernel,
        history=history,
        scale=scale,
        region=region,
        eps=eps,
        first_candidate=first_candidate,
        image_grids=image_grids,
    )


def _check_heads(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV heads")


def _check_kernel(kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be odd and positive, got {kernel}")
