"""Batched references over SGLang's paged KV pool: the scores and the compaction that the
Triton kernels in ``bacon_sglang.kernels`` compute, written plainly in PyTorch.

They are what the kernel tests compare to and what runs in production on CPU. Each loops over
the requests and calls the per-request functions of :mod:`bacon_sglang.scoring`; nothing here
imports SGLang.

Where a request's tokens live (SGLang's ``MHATokenToKVPool``, NHD layout)::

    k_buffer[layer]   [num_slots + page_size, Hkv, d]   slot 0 is padding, never a token's
    req_to_token      [max_reqs + 1, max_context_len]   token i of the request in row r
                                                        sits in slot req_to_token[r, i]

:class:`KVIndex` names one request's tokens by a start offset into a flat table of slot ids
(``req_to_token`` rows, a row snapshot, FlashInfer's ``kv_indices``) or of page ids
(FlashInfer's paged ``kv_indices``, ``page_size > 1``): token ``i`` is in slot
``table[start + i]``, or ``table[start + i // page_size] * page_size + i % page_size``.

Packed layouts: per-request results are stacked along the token axis, ``[sum_n, Hkv]``, and
request ``b`` owns rows ``[indptr[b], indptr[b + 1])`` (CSR, as FlashInfer's ``qo_indptr``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from bacon_sglang import scoring


class KVIndex(NamedTuple):
    """The KV slots of a batch of requests.

    Attributes:
        table: 1-D int32/int64 slot ids (``page_size == 1``) or page ids.
        start: ``[B]`` int64, offset in ``table`` of each request's first entry.
        seq_lens: ``[B]`` int64, tokens of each request.
        page_size: tokens per ``table`` entry; 1 for token-level tables such as
            ``req_to_token`` (whatever the pool's page size).
    """

    table: Tensor
    start: Tensor
    seq_lens: Tensor
    page_size: int = 1
    host_lens: tuple[int, ...] | None = None  # seq_lens as Python ints, when known

    def lengths(self) -> list[int]:
        """``n_b`` per request as Python ints: ``host_lens``, else read from ``seq_lens`` (a
        device-to-host copy that waits for the GPU)."""
        return list(self.host_lens) if self.host_lens is not None else self.seq_lens.tolist()

    @classmethod
    def from_req_to_token(
        cls, req_to_token: Tensor, req_pool_indices: Tensor, seq_lens: Tensor
    ) -> KVIndex:
        """SGLang's ``req_to_token [max_reqs + 1, max_context_len]`` (contiguous) and the
        batch's ``req_pool_indices [B]`` and ``seq_lens [B]``; no copy of the table."""
        return cls(
            req_to_token.view(-1),
            req_pool_indices.long() * req_to_token.stride(0),
            seq_lens.long(),
        )

    @classmethod
    def from_csr(
        cls,
        kv_indptr: Tensor,
        kv_indices: Tensor,
        seq_lens: Tensor | None = None,
        page_size: int = 1,
    ) -> KVIndex:
        """FlashInfer's ``kv_indptr [B + 1]`` / ``kv_indices``: slot ids, or page ids when
        ``page_size > 1`` (then ``seq_lens`` is required: the last page may be partial)."""
        if seq_lens is None:
            if page_size != 1:
                raise ValueError("page-level kv_indices need seq_lens")
            seq_lens = kv_indptr[1:] - kv_indptr[:-1]
        return cls(kv_indices, kv_indptr[:-1].long(), seq_lens.long(), page_size)

    @classmethod
    def from_rows(cls, rows: Sequence[Tensor | Sequence[Tensor]]) -> KVIndex:
        """Slot-id rows, one per request (e.g. snapshots of ``req_to_token`` rows), each as
        long as its request: a 1-D tensor, or 1-D pieces that make it up end to end. All are
        concatenated in one operation, whatever the batch. The lengths are known on the host
        (``host_lens``), so the launchers read no length back from the GPU."""
        rows = [(r,) if isinstance(r, Tensor) else tuple(r) for r in rows]
        host_lens = tuple(sum(len(p) for p in r) for r in rows)
        lens = to_device(host_lens, rows[0][0].device)
        table = torch.cat([p for r in rows for p in r])  # int32 and int64 pieces: int64
        return cls(table, indptr(lens)[:-1], lens, 1, host_lens)

    def slots(self, b: int) -> Tensor:
        """``[n_b]`` int64 slot ids of request ``b``'s tokens, in token order."""
        start, n = int(self.start[b]), int(self.seq_lens[b])
        if self.page_size == 1:
            return self.table[start : start + n].long()
        pos = torch.arange(n, device=self.table.device)
        pages = self.table[start : start + (n + self.page_size - 1) // self.page_size].long()
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size


def to_device(values: Sequence[int], device: torch.device | str) -> Tensor:
    """``[len(values)]`` int64 on ``device``, copied without waiting for the GPU (a pageable
    source is staged before the call returns, so no synchronisation is needed)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def host_offsets(lengths: Sequence[int]) -> list[int]:
    """``[B + 1]`` CSR offsets of consecutive segments, as Python ints."""
    return [0, *itertools.accumulate(lengths)]


def indptr(lengths: Tensor) -> Tensor:
    """``[B + 1]`` int64 CSR offsets of consecutive segments of the given lengths."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def segments(packed: Tensor, offsets: Tensor | Sequence[int]) -> list[Tensor]:
    """Split a packed ``[sum_n, ...]`` tensor into its per-request ``[n_b, ...]`` views
    (``offsets`` ``[B + 1]``; as Python ints nothing is read back from the GPU)."""
    bounds = offsets.tolist() if isinstance(offsets, Tensor) else list(offsets)
    return [packed[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---------------------------------------------------------------------------------------------
# 1. Window scores


class WindowScores(NamedTuple):
    """Per request and KV head, the two column scores of the window attention ``A``, before
    pooling, over all ``n`` keys (the last ``w`` columns are the window), GQA-reduced.

    ``mean[indptr[b] + j, h]`` = mean over the window rows and over KV head ``h``'s query heads
    of ``A[:, :, j]``; ``last`` the same for the last window row only.
    """

    mean: Tensor  # [sum_n, Hkv] float32
    last: Tensor  # [sum_n, Hkv] float32
    indptr: Tensor  # [B + 1] int64, rows of each request
    lengths: tuple[int, ...]  # n_b as Python ints


def window_scores(
    q: Tensor,
    q_indptr: Tensor,
    k_buffer: Tensor,
    index: KVIndex,
    scale: float | None = None,
    lse: Tensor | None = None,
) -> WindowScores:
    """Window attention column scores of a batch of requests, from K in the pool.

    Args:
        q: ``[sum_w, Hq, d]`` the window queries (after RoPE), the last ``w_b`` prompt
            positions of each request, packed.
        q_indptr: ``[B + 1]`` rows of ``q`` of each request; ``1 <= w_b <= n_b``.
        k_buffer: ``[num_slots, Hkv, d]`` one layer's K.
        index: where the ``n_b`` prompt keys of each request are.
        scale: logit scale, ``1 / sqrt(d)`` when ``None``.
        lse: unused here (the kernel's shortcut, see ``bacon_sglang.kernels``); accepted so
            both backends share one signature.

    Returns:
        :class:`WindowScores`; reference: :func:`scoring.window_attention`.
    """
    del lse
    num_kv_heads = k_buffer.shape[1]
    means, lasts = [], []
    for b, (q0, q1) in enumerate(zip(q_indptr[:-1].tolist(), q_indptr[1:].tolist(), strict=True)):
        keys = k_buffer[index.slots(b)].transpose(0, 1)  # [Hkv, n, d]
        attn = scoring.window_attention(q[q0:q1].transpose(0, 1), keys, scale)  # [Hq, w, n]
        means.append(scoring.gqa_mean(attn.mean(dim=1), num_kv_heads).T)
        lasts.append(scoring.gqa_mean(attn[:, -1], num_kv_heads).T)
    lengths = tuple(index.lengths())
    return WindowScores(torch.cat(means), torch.cat(lasts), indptr(index.seq_lens), lengths)


# ---------------------------------------------------------------------------------------------
# 2. Calibration


class Calibrated(NamedTuple):
    """BACON's per-token results of one layer for a batch, over the candidates ``[0, T_b)``
    (``T_b = n_b - w_b``), packed ``[sum_T, Hkv]``."""

    scores: Tensor  # S = B + lam * V, ranks the candidates
    evidence: Tensor  # E, pass on to later layers in prev_evidence
    base: Tensor  # B, SnapKV's score (the allocation of AdaKV and SparseMM reads this)
    lam: Tensor  # [B, Hkv] lam, including the gate rho
    rho: Tensor  # [B, Hkv]
    indptr: Tensor  # [B + 1] int64, rows of each request
    lengths: tuple[int, ...]  # T_b as Python ints


def candidate_indptr(window_scores: WindowScores, q_indptr: Tensor) -> Tensor:
    """``[B + 1]`` offsets of the packed candidates (``T_b = n_b - w_b``)."""
    n = window_scores.indptr.diff()
    w = q_indptr.to(n.device).diff()
    return indptr(n - w)


def candidate_lengths(window_scores: WindowScores, q_indptr: Tensor) -> list[int]:
    """``T_b = n_b - w_b`` as Python ints (nothing is read back from the GPU when
    ``q_indptr`` is on the CPU)."""
    widths = q_indptr.diff().tolist()
    return [n - w for n, w in zip(window_scores.lengths, widths, strict=True)]


def per_request(value: int | Tensor | Sequence[int], batch: int) -> list[int]:
    """A per-request integer given once for all or per request, as a list."""
    if isinstance(value, int):
        return [value] * batch
    values = value.tolist() if isinstance(value, Tensor) else list(value)
    if len(values) != batch:
        raise ValueError(f"expected {batch} values, got {len(values)}")
    return [int(v) for v in values]


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
) -> Calibrated:
    """BACON steps 1-9 for a batch (1-D coherence, the paper's), from :func:`window_scores`.

    Args:
        window_scores: the layer's column scores.
        q_indptr: ``[B + 1]`` window rows of each request (gives ``w_b``).
        candidates: ``K`` per request (int for all, :mod:`bacon_sglang.config`): the
            top-``2K`` region of steps 7-8.
        prev_evidence: earlier layers' ``Calibrated.evidence`` of this batch, oldest first;
            entries of another shape are ignored, the last ``history`` averaged.
        first_candidate: per request, candidates ``[0, first_candidate)`` are kept elsewhere
            (the shared prefix) and do not enter the top-``2K`` statistics.

    Returns:
        :class:`Calibrated`; reference per request: :func:`scoring.snapkv_scores`,
        :func:`scoring.last_query_scores`, :func:`scoring.calibrate`.
    """
    offsets = candidate_indptr(window_scores, q_indptr)
    batch = len(offsets) - 1
    ks = per_request(candidates, batch)
    firsts = per_request(first_candidate, batch)
    prev = [segments(e, offsets) for e in prev_evidence if e.shape[0] == offsets[-1]]
    out: dict[str, list[Tensor]] = {k: [] for k in ("scores", "evidence", "base", "lam", "rho")}
    means = segments(window_scores.mean, window_scores.indptr)
    lasts = segments(window_scores.last, window_scores.indptr)
    for b in range(batch):
        t = int(offsets[b + 1] - offsets[b])
        base = scoring.avg_pool(means[b][:t].T, pool_kernel)  # [Hkv, T]
        last = scoring.avg_pool(lasts[b][:t].T, pool_kernel)
        evidence = scoring.boundary_evidence(base, last)
        value = (
            evidence
            + scoring.coherence(evidence, coherence_kernel)
            + scoring.persistence(evidence, [p[b].T for p in prev], history)
        )
        f = firsts[b]
        lam, rho = scoring.scale_match(base[:, f:], value[:, f:], ks[b], scale, region, eps)
        for key, x in (
            ("scores", base + lam.unsqueeze(-1) * value),
            ("evidence", evidence),
            ("base", base),
        ):
            out[key].append(x.T)
        out["lam"].append(lam)
        out["rho"].append(rho)
    return Calibrated(
        torch.cat(out["scores"]),
        torch.cat(out["evidence"]),
        torch.cat(out["base"]),
        torch.stack(out["lam"]),
        torch.stack(out["rho"]),
        offsets,
        tuple(offsets.diff().tolist()),
    )


# ---------------------------------------------------------------------------------------------
# 3. Compaction


def pack_keep(keeps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-request keep sets ``[num_layers, Hkv, B_r]`` into ``keep [num_layers, Hkv, sum_B]``
    and ``keep_indptr [R + 1]``."""
    lens = torch.tensor([k.shape[-1] for k in keeps], dtype=torch.long)
    return torch.cat(list(keeps), dim=-1), indptr(lens).to(keeps[0].device)


def pack_layers(keeps: Sequence[Tensor], widths: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Padded keep-sets of groups of requests into :func:`compact`'s packed layout, in a
    fixed number of operations per group (no loop over requests).

    Args:
        keeps: per group ``[num_layers, B_g, Hkv, W_g]``, request ``b``'s first
            ``widths[g][b]`` columns meaningful (as ``selection.select_keep_layers``).
        widths: per group, per request, its keep-set's width (Python ints).

    Returns:
        ``keep [num_layers, Hkv, sum_B]`` and ``keep_indptr [R + 1]`` (groups in order).
    """
    heads = keeps[0].shape[2]
    flat, columns, at = [], [[] for _ in range(heads)], 0
    for keep, group in zip(keeps, widths, strict=True):
        layers, batch, _, width = keep.shape
        flat.append(keep.reshape(layers, -1))  # a view of select_keep_layers' result
        for h, row in enumerate(columns):  # [l, b, h, j] sits at (b * Hkv + h) * W + j
            row += [at + (b * heads + h) * width + j for b, n in enumerate(group) for j in range(n)]
        at += batch * heads * width
    lens = [n for group in widths for n in group]
    packed = torch.cat(flat, dim=-1) if len(flat) > 1 else flat[0]
    meta = to_device([*host_offsets(lens), *itertools.chain(*columns)], keeps[0].device)
    keep_indptr, columns_d = meta.split([len(lens) + 1, heads * sum(lens)])
    return packed[:, columns_d.view(heads, -1)], keep_indptr


def check_keep(index: KVIndex, prefix_lens: Tensor, keep: Tensor, keep_indptr: Tensor) -> None:
    """Raise ``ValueError`` unless every request's keep sets are strictly increasing along the
    token axis and inside ``[prefix_len, seq_len)``: the precondition of :func:`compact`."""
    bounds = keep_indptr.tolist()
    for r, (k0, k1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        kr = keep[..., k0:k1]
        if kr.numel() == 0:
            continue
        lo, hi = int(prefix_lens[r]), int(index.seq_lens[r])
        if int(kr.min()) < lo or int(kr.max()) >= hi:
            raise ValueError(f"request {r}: keep indices outside [{lo}, {hi})")
        if kr.shape[-1] > 1 and not bool((kr.diff(dim=-1) > 0).all()):
            raise ValueError(f"request {r}: keep indices not strictly increasing")


def compact(
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: KVIndex,
    prefix_lens: Tensor,
    keep: Tensor,
    keep_indptr: Tensor,
    dst: KVIndex | None = None,
) -> None:
    """Move each request's kept tokens to the front of its private slots, head by head, in
    every layer, in place (or, with ``dst``, into other slots).

    Per request, layer and KV head ``h`` (row = the request's slot ids): positions
    ``[0, P)`` are never touched, the kept tokens land at ``[P, P + B)`` in order, ``[P + B,
    L)`` is left for the caller to free (the row's picture: ``bacon_sglang/compression.py``).
    K and V of position ``keep[l, h, j]`` go to slot ``row[P + j]`` (head ``h`` only), as if
    all sources were read before any write. Other slots, other heads' bytes: unchanged.

    Args:
        k_buffers: per layer ``[num_slots, Hkv, d_k]`` K of the pool (modified in place).
        v_buffers: per layer ``[num_slots, Hkv, d_v]`` V.
        index: the requests' rows (token positions ``[0, L_r)`` to slots).
        prefix_lens: ``[R]`` ``P_r``, the shared prefix length of each request.
        keep: ``[num_layers, Hkv, sum_B]`` positions to keep, packed per request, each
            request's ``[num_layers, Hkv, B_r]`` strictly increasing along the last axis and
            inside ``[P_r, L_r)`` (see :func:`check_keep`).
        keep_indptr: ``[R + 1]`` offsets of each request in ``keep``'s last axis.
        dst: where position ``P + j`` goes, as rows of at least ``P_r + B_r`` positions
            (default ``index``: in place). Out of place, a request's destination slots of
            ``[P, P + B)`` must be no request's source.
    """
    check_keep(index, prefix_lens, keep, keep_indptr)
    targets = index if dst is None else dst
    bounds = keep_indptr.tolist()
    heads = torch.arange(keep.shape[1], device=keep.device).unsqueeze(1)  # [Hkv, 1]
    for r, (k0, k1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        slots = index.slots(r)
        p = int(prefix_lens[r])
        to = targets.slots(r)[p : p + k1 - k0].unsqueeze(0)  # [1, B]
        for layer, (kb, vb) in enumerate(zip(k_buffers, v_buffers, strict=True)):
            src = slots[keep[layer, :, k0:k1].long()]  # [Hkv, B]
            kb[to, heads] = kb[src, heads]  # advanced indexing copies: all read before any write
            vb[to, heads] = vb[src, heads]
