"""BACON's calibration (the paper's steps 1-9) for a batch, on packed scores.

Reference: :func:`bacon_sglang.paged.calibrate` (per request the functions of
:mod:`bacon_sglang.scoring`). Same arguments, same :class:`~bacon_sglang.paged.Calibrated`.

    _evidence_kernel   per (layer x request, block of candidates), all KV heads at once:
                       B = pool(mean), E = relu(pool(last) - B)
    _value_kernel      V = E + pool(E) + Tr, same grid; Tr given (one layer, from the
                       earlier layers' E) or read from the earlier layers of the same pass
    torch              the top-2K statistics (torch.topk over requests padded to the
                       longest, all layers at once), lam, rho, S = B + lam * V

:func:`calibrate` is one layer; :func:`calibrate_layers` every layer of a prefill at once, in
the same launches (E of a layer depends on that layer only, so the persistence term of layer
``l`` is the mean of the rows ``l-4 .. l-1`` of the pass's own ``[layers, sum_T, Hkv]`` E).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from bacon_sglang import scoring
from bacon_sglang.paged import (
    Calibrated,
    WindowScores,
    candidate_lengths,
    host_offsets,
    per_request,
    to_device,
)


@triton.jit
def _pooled(
    src, row0, pos, t, heads, head_ok,
    NUM_HEADS: tl.constexpr, KERNEL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """avg-pool (zero padding outside ``[0, t)``, divided by ``KERNEL``) of the packed scores
    ``src`` of the request whose rows start at ``row0``, at positions ``pos``."""
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for u in tl.static_range(KERNEL):
        p = pos + (u - KERNEL // 2)
        ok = (p >= 0) & (p < t)
        acc += tl.load(
            src + (row0 + p)[:, None] * NUM_HEADS + heads[None, :],
            mask=ok[:, None] & head_ok[None, :],
            other=0.0,
        )
    return acc / KERNEL


@triton.jit
def _evidence_kernel(
    mean, last, n_indptr, t_indptr, base_out, evidence_out, stride_nl, stride_tl, batch,
    NUM_HEADS: tl.constexpr, POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Steps 1-3 per (layer x request, block of candidates): ``B = pool(mean)``,
    ``E = relu(pool(last) - B)``; ``mean``/``last`` rows start at ``n_indptr[b]`` in their
    layer (``stride_nl`` apart), outputs at ``t_indptr[b]`` (``stride_tl`` apart)."""
    layer, b = tl.program_id(0) // batch, tl.program_id(0) % batch
    mean += layer.to(tl.int64) * stride_nl
    last += layer.to(tl.int64) * stride_nl
    base_out += layer.to(tl.int64) * stride_tl
    evidence_out += layer.to(tl.int64) * stride_tl
    n0 = tl.load(n_indptr + b)
    t0 = tl.load(t_indptr + b)
    t = tl.load(t_indptr + b + 1) - t0
    if tl.program_id(1) * BLOCK_T >= t:
        return
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < NUM_HEADS
    base = _pooled(mean, n0, pos, t, heads, head_ok, NUM_HEADS, POOL, BLOCK_T, BLOCK_H)
    last_q = _pooled(last, n0, pos, t, heads, head_ok, NUM_HEADS, POOL, BLOCK_T, BLOCK_H)
    out = (t0 + pos)[:, None] * NUM_HEADS + heads[None, :]
    ok = (pos < t)[:, None] & head_ok[None, :]
    tl.store(base_out + out, base, mask=ok)
    tl.store(evidence_out + out, tl.maximum(last_q - base, 0.0), mask=ok)


@triton.jit
def _value_kernel(
    evidence, trace, t_indptr, value_out, stride_tl, batch,
    NUM_HEADS: tl.constexpr, COHERENCE: tl.constexpr, HAS_TRACE: tl.constexpr,
    HISTORY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Steps 4-6: ``V = E + pool(E) + Tr`` on the packed candidates of each layer: ``Tr``
    read from ``trace`` (``HAS_TRACE``, one layer), or with ``HISTORY > 0`` the mean of the
    earlier layers' rows of ``evidence`` (the last ``HISTORY``, summed oldest first as
    :func:`bacon_sglang.scoring.persistence` does)."""
    layer, b = tl.program_id(0) // batch, tl.program_id(0) % batch
    t0 = tl.load(t_indptr + b)
    t = tl.load(t_indptr + b + 1) - t0
    if tl.program_id(1) * BLOCK_T >= t:
        return
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < NUM_HEADS
    out = (t0 + pos)[:, None] * NUM_HEADS + heads[None, :]
    ok = (pos < t)[:, None] & head_ok[None, :]
    here = evidence + layer.to(tl.int64) * stride_tl
    value = tl.load(here + out, mask=ok, other=0.0)
    value += _pooled(here, t0, pos, t, heads, head_ok, NUM_HEADS, COHERENCE, BLOCK_T, BLOCK_H)
    if HAS_TRACE:
        value += tl.load(trace + out, mask=ok, other=0.0)
    if HISTORY > 0:
        first = tl.maximum(layer - HISTORY, 0)
        if layer > 0:
            acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
            earlier = evidence + first.to(tl.int64) * stride_tl
            for _ in range(first, layer):
                acc += tl.load(earlier + out, mask=ok, other=0.0)
                earlier += stride_tl
            value += acc / (layer - first).to(tl.float32)
    tl.store(value_out + layer.to(tl.int64) * stride_tl + out, value, mask=ok)


def _top_region_stats(
    base: Tensor,
    value: Tensor,
    first: Tensor,
    spans: Tensor,
    k2: Tensor,
    top: int,
    width: int,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Steps 7-8 per layer, request and head over candidates ``[first, T)``: ``(lam, rho)``
    ``[layers, B, Hkv]`` (``lam`` includes ``rho``), as :func:`bacon_sglang.scoring.scale_match`.

    ``base``, ``value`` ``[layers, sum_T, Hkv]``; ``first`` ``[B]`` packed row of each
    request's first candidate, ``spans`` ``[B]`` its candidates, ``k2`` ``[1 or layers, B]``
    the size of its top region (in every layer, or per layer); ``top`` and ``width`` their
    maxima, given as Python ints so that nothing is read back from the GPU."""
    layers, batch, heads, dev = base.shape[0], k2.shape[-1], base.shape[2], base.device
    if top == 0:
        zeros = torch.zeros(layers, batch, heads, device=dev)
        return zeros, zeros.clone()
    cols = torch.arange(width, device=dev)
    rows = (first[:, None] + cols).clamp(max=base.shape[1] - 1)  # [B, width]
    inside = (cols < spans[:, None])[..., None]  # [B, width, 1]

    def top_values(x: Tensor) -> Tensor:  # [layers, B, top, Hkv], the top-k2 in front
        padded = torch.where(inside, x[:, rows], float("-inf"))
        return torch.topk(padded, top, dim=2).values

    ranked = (torch.arange(top, device=dev) < k2[..., None])[..., None]  # [., B, top, 1]
    count = k2.clamp(min=1)[..., None].float()  # [., B, 1]

    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.where(ranked, x, 0.0)
        mean = x.sum(dim=2) / count
        var = torch.where(ranked, x - mean[:, :, None], 0.0).square().sum(dim=2) / count
        return mean, var.sqrt()

    b_mean, b_std = moments(top_values(base))
    v_mean, v_std = moments(top_values(value))
    lam = scale * b_std / (v_std + eps)
    rho = (v_mean / (b_mean + eps)).clamp(0.0, 1.0)
    present = (k2 > 0)[..., None]
    return torch.where(present, rho * lam, 0.0), torch.where(present, rho, 0.0)


def calibrate(
    window_scores: WindowScores,
    q_indptr: Tensor,
    candidates: int | Tensor | Sequence[int],
    prev_evidence: Sequence[Tensor] = (),
    first_candidate: int | Tensor | Sequence[int] = 0,
    *,
    pool_kernel: int = scoring.POOL_KERNEL,
    coherence_kernel: int = scoring.COHERENCE_KERNEL,
    history: int = scoring.HISTORY,
    scale: float = scoring.SCALE,
    region: int = scoring.REGION,
    eps: float = scoring.EPS,
    block_t: int | None = None,
) -> Calibrated:
    """Launcher for one layer; arguments and result as :func:`bacon_sglang.paged.calibrate`,
    plus ``block_t``, candidates per program (128 on GPU, up to 1024 under the interpreter)."""
    scores = window_scores._replace(mean=window_scores.mean[None], last=window_scores.last[None])
    total = sum(candidate_lengths(window_scores, q_indptr))
    heads = window_scores.mean.shape[1]
    same = [e for e in prev_evidence if e.shape == (total, heads)]
    same = same[-history:] if history > 0 else []
    trace = torch.stack([e.float() for e in same]).mean(dim=0) if same else None
    options = dict(
        pool_kernel=pool_kernel, coherence_kernel=coherence_kernel, scale=scale, region=region,
        eps=eps, block_t=block_t,
    )  # fmt: skip
    cal = _calibrate(scores, q_indptr, candidates, first_candidate, trace, 0, **options)
    return cal._replace(
        scores=cal.scores[0], evidence=cal.evidence[0], base=cal.base[0], lam=cal.lam[0],
        rho=cal.rho[0],
    )  # fmt: skip


def calibrate_layers(
    window_scores: WindowScores,
    q_indptr: Tensor,
    candidates: int | Sequence[int] | Sequence[Sequence[int]],
    first_candidate: int | Sequence[int] = 0,
    *,
    history: int = scoring.HISTORY,
    **options: float | None,
) -> Calibrated:
    """:func:`calibrate` of every layer of a prefill at once (two launches and a fixed
    number of PyTorch operations whatever the depth), layer ``l``'s persistence term from
    the evidence of layers ``l - history .. l - 1`` of the same pass.

    Args:
        window_scores: :func:`~.score_kernels.layer_window_scores`, ``[layers, sum_n, Hkv]``.
        q_indptr: ``[B + 1]`` window rows per request, on the CPU.
        candidates: as :func:`calibrate`, or per layer and request ``[layers][B]`` (the
            top-2K region of an allocation that changes with depth, as PyramidKV's).
        first_candidate, options: as :func:`calibrate` (``pool_kernel``, ...).

    Returns:
        :class:`Calibrated` whose ``scores``, ``evidence``, ``base`` are ``[layers, sum_T,
        Hkv]`` and ``lam``, ``rho`` ``[layers, B, Hkv]``.
    """
    return _calibrate(
        window_scores, q_indptr, candidates, first_candidate, None, history, **options
    )


def pool_layers(
    window_scores: WindowScores,
    q_indptr: Tensor,
    *,
    pool_kernel: int = scoring.POOL_KERNEL,
    block_t: int | None = None,
) -> Tensor:
    """SnapKV's score ``B = avgpool(mean)`` (step 1) of every layer at once, one launch.

    Args:
        window_scores: ``[layers, sum_n, Hkv]`` (:func:`~.score_kernels.layer_window_scores`).
        q_indptr: ``[B + 1]`` window rows per request, on the CPU.

    Returns:
        ``[layers, sum_T, Hkv]`` float32, request ``b``'s candidates ``[0, T_b)`` packed.
    """
    mean = window_scores.mean
    lens = candidate_lengths(window_scores, q_indptr)
    base = torch.empty(mean.shape[0], sum(lens), mean.shape[2], device=mean.device)
    if base.numel():
        offsets = to_device(host_offsets(lens), mean.device)
        _launch_evidence(window_scores, offsets, lens, base, torch.empty_like(base), pool_kernel,
                         block_t)  # fmt: skip
    return base


def _launch_evidence(
    window_scores: WindowScores,
    offsets: Tensor,
    lens: Sequence[int],
    base: Tensor,
    evidence: Tensor,
    pool_kernel: int,
    block_t: int | None,
) -> dict:
    """Steps 1-3 into ``base`` and ``evidence`` ``[layers, sum_T, Hkv]``; returns the grid and
    tiles, for the value kernel."""
    mean, dev = window_scores.mean, window_scores.mean.device
    layers, _, heads = mean.shape
    if block_t is None:
        block_t = 128 if dev.type == "cuda" else min(1024, triton.next_power_of_2(max(lens)))
    grid = (layers * len(lens), triton.cdiv(max(lens), block_t))
    tiles = dict(NUM_HEADS=heads, BLOCK_T=block_t, BLOCK_H=triton.next_power_of_2(heads))
    _evidence_kernel[grid](
        mean, window_scores.last, window_scores.indptr.to(dev), offsets, base, evidence,
        mean.stride(0), base.stride(0), len(lens), POOL=pool_kernel, **tiles,
    )  # fmt: skip
    return dict(grid=grid, tiles=tiles)


def _calibrate(
    window_scores: WindowScores,
    q_indptr: Tensor,
    candidates: int | Tensor | Sequence[int] | Sequence[Sequence[int]],
    first_candidate: int | Tensor | Sequence[int],
    trace: Tensor | None,
    history: int,
    *,
    pool_kernel: int = scoring.POOL_KERNEL,
    coherence_kernel: int = scoring.COHERENCE_KERNEL,
    scale: float = scoring.SCALE,
    region: int = scoring.REGION,
    eps: float = scoring.EPS,
    block_t: int | None = None,
) -> Calibrated:
    """Both launchers: ``window_scores`` ``[layers, sum_n, Hkv]``; ``candidates`` per request
    or per layer and request; ``trace`` the persistence term of a single layer, or ``history``
    > 0 to take it from the pass's earlier layers."""
    for kernel in (pool_kernel, coherence_kernel):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"pool kernel must be odd and positive, got {kernel}")
    layers, _, heads = window_scores.mean.shape
    dev = window_scores.mean.device
    lens = candidate_lengths(window_scores, q_indptr)  # T_b, on the host
    batch, total = len(lens), sum(lens)
    per_layer = not isinstance(candidates, int | Tensor) and any(
        isinstance(c, Sequence) for c in candidates
    )
    ks = [per_request(c, batch) for c in candidates] if per_layer else [
        per_request(candidates, batch)]  # fmt: skip
    if per_layer and len(ks) != layers:
        raise ValueError(f"candidates of {len(ks)} layers for {layers}")
    firsts = per_request(first_candidate, batch)
    if any(not 0 <= f <= t for f, t in zip(firsts, lens, strict=True)):
        raise ValueError("first_candidate must lie in [0, T]")
    spans = [t - f for t, f in zip(lens, firsts, strict=True)]
    k2 = [max(0, min(region * k, s)) for row in ks for k, s in zip(row, spans, strict=True)]
    starts = host_offsets(lens)
    # the batch's small integers in one copy: offsets, first candidate rows, spans, k2
    first_rows = [o + f for o, f in zip(starts[:-1], firsts, strict=True)]
    packed = to_device([*starts, *first_rows, *spans, *k2], dev)
    offsets, first_d, spans_d, k2_d = packed.split([batch + 1, batch, batch, len(k2)])
    k2_d = k2_d.view(len(ks), batch)  # [1 or layers, B]

    base, evidence, value = (torch.empty(layers, total, heads, device=dev) for _ in range(3))
    if total:
        launch = _launch_evidence(window_scores, offsets, lens, base, evidence, pool_kernel,
                                  block_t)  # fmt: skip
        _value_kernel[launch["grid"]](
            evidence, evidence if trace is None else trace, offsets, value, base.stride(0),
            batch, COHERENCE=coherence_kernel, HAS_TRACE=trace is not None, HISTORY=history,
            **launch["tiles"],
        )  # fmt: skip
    lam, rho = _top_region_stats(
        base, value, first_d, spans_d, k2_d, max(k2, default=0), max(spans, default=0),
        scale, eps,
    )  # fmt: skip
    lam_rows = lam.repeat_interleave(offsets.diff(), dim=1, output_size=total)
    return Calibrated(base + lam_rows * value, evidence, base, lam, rho, offsets, tuple(lens))
