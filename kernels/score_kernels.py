"""Window-attention column scores of a batch of requests, read straight from the paged K pool.

Reference: :func:`bacon_sglang.paged.window_scores` (per request
:func:`bacon_sglang.scoring.window_attention`, then means over the window rows and the GQA
group). Same arguments, same :class:`~bacon_sglang.paged.WindowScores` result.

Per request ``b`` and KV head ``h`` the ``G * w`` rows (query head ``h * G + g``, window row
``i``) are one tile, so each key block is loaded once per program and ``[Hq, w, n]`` never
exists in memory. The kernels have a layer axis: one launch scores every layer of a prefill
(``q [layers, sum_w, Hq, d]``, each layer's K found from one base pointer plus that layer's
offset, the table the compaction kernel reads too, :func:`layer_table`). Softmax needs each
row's normaliser before any column can be summed, so:

    pass 1  _stats_kernel   per key split: row max m and sum l of exp2(s - m)
    pass 2  _scores_kernel  combine the splits into lse per row, then per key block
                            p = exp2(s - lse), column sums -> mean, last

Pass 2 alone runs when the caller has the rows' log-sum-exp already (``lse``, e.g. from the
prefill attention): K is then read once. Grid of both: (layer x request, KV head, key split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from bacon_sglang.paged import KVIndex, WindowScores, indptr

LOG2E = math.log2(math.e)


@triton.jit
def slot_of(table, start, pos, mask, PAGE: tl.constexpr):
    """Slot id (int64) of token positions ``pos`` of the request whose table starts at
    ``start``: token-level tables when ``PAGE == 1``, page ids otherwise."""
    if PAGE == 1:
        slot = tl.load(table + start + pos, mask=mask, other=0).to(tl.int64)
    else:
        page = tl.load(table + start + pos // PAGE, mask=mask, other=0).to(tl.int64)
        slot = page * PAGE + pos % PAGE
    return slot


def layer_table(buffers: Sequence[Tensor]) -> tuple[Tensor, tuple[int, ...], int]:
    """Where each layer's buffer starts, from the first one: ``[layers]`` int64 offsets in
    elements (on the buffers' device, one non-blocking copy), the common strides, and the
    largest power of two <= 16 bytes (in elements) dividing every row's start (the kernels'
    alignment hint: Triton then moves 16 bytes per instruction)."""
    first = buffers[0]
    for buf in buffers:
        if buf.shape != first.shape or buf.stride() != first.stride() or buf.dtype != first.dtype:
            raise ValueError("all layers' buffers need one shape, stride and dtype")
    if first.stride(-1) != 1:
        raise ValueError("buffers need a contiguous head_dim")
    size = first.dtype.itemsize
    bytes_from_base = [b.data_ptr() - first.data_ptr() for b in buffers]
    if any(d % size for d in bytes_from_base):
        raise ValueError("layer buffers must start at whole elements from one another")
    offsets = [d // size for d in bytes_from_base]
    align = math.gcd(16 // size, first.data_ptr() // size, *first.stride()[:-1], *offsets)
    table = torch.tensor(offsets, dtype=torch.int64).to(first.device, non_blocking=True)
    return table, first.stride(), 1 << (align.bit_length() - 1)


@triton.jit
def _logits(
    qt, k, k_layer, table, start, cols, col_ok, h, stride_ks, stride_kh, dims, dim_ok, qk_scale,
    PAGE: tl.constexpr, DOT_F32: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_R, BLOCK_N]`` base-2 logits of the row tile ``qt`` against key block ``cols``
    of the layer whose K starts ``k_layer`` elements from ``k``."""
    slot = slot_of(table, start, cols, col_ok, PAGE)
    row = tl.multiple_of(k_layer + slot * stride_ks + h * stride_kh, ALIGN)  # the launcher checks
    kt = tl.load(  # K^T tile [BLOCK_D, BLOCK_N]
        k + row[None, :] + dims[:, None],
        mask=dim_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if DOT_F32:  # exact fp32 products (no tf32); bf16 products are exact in fp32 anyway
        x = tl.dot(qt, kt.to(tl.float32), input_precision="ieee")
    else:
        x = tl.dot(qt, kt)
    return x * qk_scale


@triton.jit
def _rows(
    q, q_indptr, seq_lens, b, h, stride_qt, stride_qh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Row tile of request ``b``, KV head ``h``: row ``r = g * w + i`` is query head
    ``h * GROUP + g`` at window row ``i``, token position ``n - w + i``."""
    n = tl.load(seq_lens + b)
    q0 = tl.load(q_indptr + b)
    w = tl.load(q_indptr + b + 1) - q0
    r = tl.arange(0, BLOCK_R)
    row_ok = r < GROUP * w
    i = r % w
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    qt = tl.load(
        q
        + (q0 + i)[:, None] * stride_qt
        + (h * GROUP + r // w)[:, None] * stride_qh
        + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        qt = qt.to(tl.float32)
    return qt, n, q0, w, r, row_ok, i, dims, dim_ok


@triton.jit
def _stats_kernel(
    q, q_indptr, k, k_layers, table, starts, seq_lens, stats,
    stride_ql, stride_qt, stride_qh, stride_ks, stride_kh, qk_scale, num_splits, batch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Pass 1: per row, max and sum of exp2 of its logits over the keys of split ``s``."""
    lb, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    layer, b = lb // batch, lb % batch
    k_layer = tl.load(k_layers + layer)
    qt, n, q0, w, r, row_ok, i, dims, dim_ok = _rows(
        q + layer.to(tl.int64) * stride_ql, q_indptr, seq_lens, b, h, stride_qt, stride_qh,
        GROUP, HEAD_DIM, BLOCK_R, BLOCK_D, DOT_F32,
    )  # fmt: skip
    lo = s * SPLIT
    if lo >= n:
        return
    hi = tl.minimum(lo + SPLIT, n)
    start = tl.load(starts + b)
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        x = _logits(
            qt, k, k_layer, table, start, cols, col_ok, h, stride_ks, stride_kh, dims, dim_ok,
            qk_scale, PAGE, DOT_F32, ALIGN,
        )  # fmt: skip
        x = tl.where(col_ok[None, :] & (cols[None, :] <= (n - w + i)[:, None]), x, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows without a key yet
        row_sum = row_sum * tl.exp2(row_max - shift) + tl.sum(tl.exp2(x - shift[:, None]), axis=1)
        row_max = new_max
    out = stats + ((lb * tl.num_programs(1) + h) * num_splits + s) * 2 * BLOCK_R + r
    tl.store(out, row_max)
    tl.store(out + BLOCK_R, row_sum)


@triton.jit
def _scores_kernel(
    q, q_indptr, k, k_layers, table, starts, seq_lens, stats, lse, out_indptr, out_mean,
    out_last, stride_ql, stride_qt, stride_qh, stride_ks, stride_kh, stride_lt, stride_ol,
    qk_scale, num_splits, batch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr, HAS_LSE: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Pass 2: the rows' log2-sum-exp2, then normalised column sums over the keys of split
    ``s``, written to ``out_mean`` / ``out_last`` ``[layers, sum_n, Hkv]``."""
    lb, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    layer, b = lb // batch, lb % batch
    k_layer = tl.load(k_layers + layer)
    num_kv_heads = tl.num_programs(1)
    qt, n, q0, w, r, row_ok, i, dims, dim_ok = _rows(
        q + layer.to(tl.int64) * stride_ql, q_indptr, seq_lens, b, h, stride_qt, stride_qh,
        GROUP, HEAD_DIM, BLOCK_R, BLOCK_D, DOT_F32,
    )  # fmt: skip
    lo = s * SPLIT
    if lo >= n:
        return
    hi = tl.minimum(lo + SPLIT, n)
    start = tl.load(starts + b)

    if HAS_LSE:  # given in natural log
        row_lse = tl.load(lse + (q0 + i) * stride_lt + h * GROUP + r // w, mask=row_ok, other=0.0)
        row_lse = row_lse.to(tl.float32) * 1.4426950408889634
    else:  # combine the splits of pass 1
        part = stats + (lb * num_kv_heads + h) * num_splits * 2 * BLOCK_R + r
        row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for t in range(0, tl.cdiv(n, SPLIT)):
            row_max = tl.maximum(row_max, tl.load(part + t * 2 * BLOCK_R))
        row_sum = tl.zeros([BLOCK_R], tl.float32)
        for t in range(0, tl.cdiv(n, SPLIT)):
            split_max = tl.load(part + t * 2 * BLOCK_R)
            row_sum += tl.load(part + t * 2 * BLOCK_R + BLOCK_R) * tl.exp2(split_max - row_max)
        row_lse = tl.where(row_ok, row_max + tl.log2(row_sum), 0.0)

    is_last = row_ok & (i == w - 1)
    inv_rows = 1.0 / (GROUP * w).to(tl.float32)
    out0 = tl.load(out_indptr + b)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        x = _logits(
            qt, k, k_layer, table, start, cols, col_ok, h, stride_ks, stride_kh, dims, dim_ok,
            qk_scale, PAGE, DOT_F32, ALIGN,
        )  # fmt: skip
        ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= (n - w + i)[:, None])
        p = tl.where(ok, tl.exp2(x - row_lse[:, None]), 0.0)
        dst = layer.to(tl.int64) * stride_ol + (out0 + cols) * num_kv_heads + h
        tl.store(out_mean + dst, tl.sum(p, axis=0) * inv_rows, mask=col_ok)
        last = tl.sum(tl.where(is_last[:, None], p, 0.0), axis=0) / GROUP
        tl.store(out_last + dst, last, mask=col_ok)


def window_scores(
    q: Tensor,
    q_indptr: Tensor,
    k_buffer: Tensor,
    index: KVIndex,
    scale: float | None = None,
    lse: Tensor | None = None,
    **tiles: int | None,
) -> WindowScores:
    """Launcher for one layer; arguments as :func:`bacon_sglang.paged.window_scores`, plus
    ``tiles`` (``block_n``, ``split``: see :func:`layer_window_scores`).

    Args:
        lse: optional ``[sum_w, Hq]`` natural-log log-sum-exp of ``scale * q · k`` of each
            window row over its causal keys (what FlashAttention returns); skips pass 1.
    """
    if lse is not None:
        lse = lse if lse.stride(1) == 1 else lse.contiguous()
    scores = layer_window_scores(q[None], q_indptr, [k_buffer], index, scale, lse, **tiles)
    return scores._replace(mean=scores.mean[0], last=scores.last[0])


def layer_window_scores(
    q: Tensor,
    q_indptr: Tensor,
    k_buffers: Sequence[Tensor],
    index: KVIndex,
    scale: float | None = None,
    lse: Tensor | None = None,
    *,
    block_n: int | None = None,
    split: int | None = None,
) -> WindowScores:
    """:func:`window_scores` of every layer at once: two launches whatever the depth.

    Args:
        q: ``[layers, sum_w, Hq, d]`` window queries of each layer (any stride on the layer
            and row axes, contiguous ``d``).
        q_indptr: ``[B + 1]`` rows per request, on the CPU (nothing is read back).
        k_buffers: per layer ``[num_slots, Hkv, d]`` (one shape, stride and dtype).
        index, scale: as :func:`window_scores`; ``lse`` only with one layer.
        block_n: keys per tile (64 on GPU; larger under the interpreter, where every
            operation has a fixed cost).
        split: keys per program, rounded to a multiple of ``block_n`` (1024 on GPU).

    Returns:
        :class:`WindowScores` with ``mean``, ``last`` ``[layers, sum_n, Hkv]`` float32.
    """
    num_layers, _, num_q_heads, head_dim = q.shape
    k_buffer = k_buffers[0]
    num_kv_heads = k_buffer.shape[1]
    if len(k_buffers) != num_layers:
        raise ValueError(f"q has {num_layers} layers, got {len(k_buffers)} K buffers")
    if num_q_heads % num_kv_heads or k_buffer.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} does not match K {tuple(k_buffer.shape)}")
    if q.stride(3) != 1:
        raise ValueError("q needs a contiguous head_dim")
    if lse is not None and num_layers != 1:
        raise ValueError("lse is given for one layer only")
    k_layers, k_stride, align = layer_table(k_buffers)
    group = num_q_heads // num_kv_heads
    batch = len(index.seq_lens)
    seq_lens_host = index.lengths()  # no GPU read when the index knows them (from_rows)
    widths = q_indptr.diff().tolist()  # no GPU read when q_indptr is on the CPU
    if any(not 1 <= w <= n for w, n in zip(widths, seq_lens_host, strict=True)):
        raise ValueError("each window must hold 1..n queries")
    out_indptr = indptr(index.seq_lens.to(q.device))
    total = sum(seq_lens_host)
    mean = torch.empty(num_layers, total, num_kv_heads, dtype=torch.float32, device=q.device)
    last = torch.empty_like(mean)
    if total == 0:
        return WindowScores(mean, last, out_indptr, tuple(seq_lens_host))

    block_n = block_n or (64 if q.is_cuda else 256)
    split = split or (1024 if q.is_cuda else 4096)
    split = max(block_n, split // block_n * block_n)
    num_splits = triton.cdiv(max(seq_lens_host), split)
    block_r = max(16, triton.next_power_of_2(group * max(widths)))
    block_d = max(16, triton.next_power_of_2(head_dim))
    qk_scale = (head_dim**-0.5 if scale is None else scale) * LOG2E
    # bf16 tl.dot is wrong under TRITON_INTERPRET; fp32 must not drop to tf32 on GPU
    dot_f32 = torch.float32 in (q.dtype, k_buffer.dtype) or q.dtype != k_buffer.dtype
    dot_f32 = dot_f32 or not q.is_cuda
    grid = (num_layers * batch, num_kv_heads, num_splits)
    common = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE=index.page_size, BLOCK_R=block_r,
        BLOCK_D=block_d, BLOCK_N=block_n, SPLIT=split, DOT_F32=dot_f32, ALIGN=align,
        num_warps=8 if block_r >= 128 else 4,
    )  # fmt: skip
    q_indptr = q_indptr.to(q.device, torch.int64, non_blocking=True)
    starts, seq_lens = index.start.to(q.device), index.seq_lens.to(q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k_stride[0], k_stride[1])
    if lse is None:
        stats = torch.empty(
            num_layers * batch, num_kv_heads, num_splits, 2, block_r,
            dtype=torch.float32, device=q.device,
        )  # fmt: skip
        _stats_kernel[grid](
            q, q_indptr, k_buffer, k_layers, index.table, starts, seq_lens, stats, *strides,
            qk_scale, num_splits, batch, **common,
        )  # fmt: skip
        lse_arg, stride_lt = stats, 0
    else:
        stats, lse_arg, stride_lt = mean, lse, lse.stride(0)
    _scores_kernel[grid](
        q, q_indptr, k_buffer, k_layers, index.table, starts, seq_lens, stats, lse_arg,
        out_indptr, mean, last, *strides, stride_lt, mean.stride(0), qk_scale, num_splits,
        batch, HAS_LSE=lse is not None, **common,
    )  # fmt: skip
    return WindowScores(mean, last, out_indptr, tuple(seq_lens_host))
