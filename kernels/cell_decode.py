"""Decode attention over head-granular cells and ordinary tokens: two launches per layer.

Reference: :func:`bacon_sglang.cells.cell_decode_batch` (per request
:func:`bacon_sglang.cells.cell_decode`); design: ``patches/head_granular.md`` section 4.4;
modelled on SGLang's two-stage Triton decode (``sglang/kernels/ops/attention/
decode_attention.py``: ``_fwd_grouped_kernel_stage1``, ``_fwd_kernel_stage2``).

Per batch row ``b`` (``req_to_token`` row ``r = req_pool_indices[b]``, ``(S, m) =
cell_meta[r]``, ``T = seq_lens[b]``), layer ``l`` and KV head ``h``, with ``n`` the cells of
``(l, h)`` (``cell_off[r, l*H + h + 1] - cell_off[r, l*H + h]``, 0 when ``m == 0``), the
kernel attends over one virtual sequence of ``n + T - m`` keys::

    j in [0, n)            cell c = cell_off[r, l*H + h] + j: slot row[S + c // (L*H)],
                           layer buffer (c % (L*H)) // H, head c % H
    j in [n, n + S)        shared text: slot row[j - n], layer l, head h
    j in [n + S, n+T-m)    generated tokens (the new one last): slot row[j - n + m]

so a row with ``m == 0`` is plain dense decode over ``row[0:T]``.

    stage 1  grid (batch, H_kv, NSPLIT): the GQA group's G query rows of KV head h in one
             tile; split s takes keys [s * per, (s + 1) * per), per = ceil(n + T - m over
             NSPLIT) rounded up to BLOCK_N (one split may span cells and ordinary tokens);
             online softmax in fp32 (base 2), writes the split's normalised output and
             log2-sum-exp2 (-inf for an empty split) to the scratch
    stage 2  grid (batch, H_q): the splits merged by log-sum-exp, cast, stored into o

The grid depends on the batch size and the scratch's ``NSPLIT`` only, and the launcher reads
nothing from the device: with the layer table (:func:`layer_buffers`) and the scratch
(:func:`scratch`) made once, the two launches can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from bacon_sglang.cells import CellIndex

from .score_kernels import LOG2E, layer_table

SPLITS = 8  # NSPLIT: key splits per (row, KV head); the design's starting value, untuned


class LayerBuffers(NamedTuple):
    """SGLang's per-layer K/V buffers as the kernel reads them: layer 0's buffers (base
    pointers, shape, strides) and each layer's start from them (design section 4.2,
    ``k_layer_off`` / ``v_layer_off``)."""

    k: Tensor  # [num_slots, H, d] layer 0's K
    v: Tensor  # [num_slots, H, d_v] layer 0's V
    k_layer_off: Tensor  # [L] int64, elements from k
    v_layer_off: Tensor  # [L] int64, elements from v
    align: int  # power of two dividing every row start (elements)


class Scratch(NamedTuple):
    """Split results of stage 1, static across calls (``[max_bs, NSPLIT, Hq, ...]``)."""

    o: Tensor  # [max_bs, NSPLIT, Hq, d_v] fp32, each split's normalised output
    lse: Tensor  # [max_bs, NSPLIT, Hq] fp32, each split's log2-sum-exp2 of the logits


def layer_buffers(k_buffers: Sequence[Tensor], v_buffers: Sequence[Tensor]) -> LayerBuffers:
    """The kernel's view of the pool's buffers (per layer ``[num_slots, H, d]``), built once:
    a host-to-device copy of the two ``[L]`` offset tables."""
    if len(k_buffers) != len(v_buffers):
        raise ValueError(f"{len(k_buffers)} K buffers but {len(v_buffers)} V buffers")
    k_off, _, k_align = layer_table(k_buffers)
    v_off, _, v_align = layer_table(v_buffers)
    return LayerBuffers(k_buffers[0], v_buffers[0], k_off, v_off, min(k_align, v_align))


def scratch(
    max_batch: int, num_q_heads: int, dim_v: int, device: torch.device | str, splits: int = SPLITS
) -> Scratch:
    """Stage 1's output for batches of up to ``max_batch`` rows, ``splits`` key splits."""
    o = torch.empty(max_batch, splits, num_q_heads, dim_v, dtype=torch.float32, device=device)
    lse = torch.empty(max_batch, splits, num_q_heads, dtype=torch.float32, device=device)
    return Scratch(o, lse)


@triton.jit
def _key_rows(
    req_to_token, row_start, j, ok, n_cells, first, shared, m, layer, h, k_layer_off,
    v_layer_off, stride_ks, stride_kh, stride_vs, stride_vh,
    CELLS_PER_SLOT: tl.constexpr, NUM_KV_HEADS: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Element offsets of the K and V rows of virtual keys ``j`` (module docstring)."""
    is_cell = j < n_cells
    c = first + j
    t = j - n_cells
    pos = tl.where(is_cell, shared + c // CELLS_PER_SLOT, t + tl.where(t >= shared, m, 0))
    slot = tl.load(req_to_token + row_start + pos, mask=ok, other=0).to(tl.int64)
    buf = tl.where(is_cell, (c % CELLS_PER_SLOT) // NUM_KV_HEADS, layer)
    head = tl.where(is_cell, c % NUM_KV_HEADS, h).to(tl.int64)
    k_row = tl.load(k_layer_off + buf, mask=ok, other=0) + slot * stride_ks + head * stride_kh
    v_row = tl.load(v_layer_off + buf, mask=ok, other=0) + slot * stride_vs + head * stride_vh
    # ALIGN divides every row start (layer_table computes it): 16-byte copies on a GPU
    return tl.multiple_of(k_row, ALIGN), tl.multiple_of(v_row, ALIGN)


@triton.jit(do_not_specialize=["layer"])  # one compiled variant for every layer
def _stage1(
    q, k, v, k_layer_off, v_layer_off, req_to_token, req_pool_indices, seq_lens, cell_meta,
    cell_off, mid_o, mid_lse, layer, qk_scale, stride_qb, stride_qh, stride_ks, stride_kh,
    stride_vs, stride_vh, stride_rt, stride_meta, stride_off, stride_mb, stride_ms, stride_mh,
    stride_lb, stride_ls,
    GROUP: tl.constexpr, NUM_LAYERS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    DIM_K: tl.constexpr, DIM_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    ONLY_CELLS: tl.constexpr, DOT_F32: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One split of one (row, KV head): normalised output and log2-sum-exp2 of its keys."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    row = tl.load(req_pool_indices + b).to(tl.int64)
    shared = tl.load(cell_meta + row * stride_meta)
    m = tl.load(cell_meta + row * stride_meta + 1)
    if ONLY_CELLS:
        if m == 0:
            return
    off = cell_off + row * stride_off + layer * NUM_KV_HEADS + h
    first = tl.load(off)
    n_cells = tl.where(m > 0, tl.load(off + 1) - first, 0)
    total = n_cells + tl.load(seq_lens + b).to(tl.int32) - m
    per = tl.cdiv(tl.cdiv(total, NSPLIT), BLOCK_N) * BLOCK_N
    lo = s * per
    hi = tl.minimum(lo + per, total)

    g = tl.arange(0, BLOCK_H)
    heads = h * GROUP + g
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    qt = tl.load(
        q + b * stride_qb + heads[:, None] * stride_qh + dk[None, :],
        mask=(g < GROUP)[:, None] & (dk < DIM_K)[None, :],
        other=0.0,
    )
    if DOT_F32:  # exact fp32 products (no tf32); bf16 dot is wrong under TRITON_INTERPRET
        qt = qt.to(tl.float32)
    else:
        qt = qt.to(k.dtype.element_ty)
    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < hi
        k_row, v_row = _key_rows(
            req_to_token, row * stride_rt, j, ok, n_cells, first, shared, m, layer, h,
            k_layer_off, v_layer_off, stride_ks, stride_kh, stride_vs, stride_vh,
            NUM_LAYERS * NUM_KV_HEADS, NUM_KV_HEADS, ALIGN,
        )  # fmt: skip
        kt = tl.load(k + k_row[None, :] + dk[:, None], ok[None, :] & (dk < DIM_K)[:, None], 0.0)
        vt = tl.load(v + v_row[:, None] + dv[None, :], ok[:, None] & (dv < DIM_V)[None, :], 0.0)
        if DOT_F32:
            x = tl.dot(qt, kt.to(tl.float32), input_precision="ieee")
        else:
            x = tl.dot(qt, kt)
        x = tl.where(ok[None, :], x * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(x, axis=1))  # finite: every tile has a key
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(x - new_max[:, None])
        if DOT_F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        row_max = new_max

    some = row_sum > 0  # false for an empty split
    out = acc / tl.where(some, row_sum, 1.0)[:, None]
    lse = tl.where(some, row_max + tl.log2(tl.where(some, row_sum, 1.0)), float("-inf"))
    at = b * stride_mb + s * stride_ms + heads * stride_mh
    tl.store(mid_o + at[:, None] + dv[None, :], out, (g < GROUP)[:, None] & (dv < DIM_V)[None, :])
    tl.store(mid_lse + b * stride_lb + s * stride_ls + heads, lse, g < GROUP)


@triton.jit
def _stage2(
    mid_o, mid_lse, o, req_pool_indices, cell_meta, stride_mb, stride_ms, stride_mh, stride_lb,
    stride_ls, stride_ob, stride_oh, stride_meta,
    DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
    ONLY_CELLS: tl.constexpr,
):  # fmt: skip
    """One (row, query head): the splits merged by log-sum-exp into ``o``."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    if ONLY_CELLS:
        row = tl.load(req_pool_indices + b).to(tl.int64)
        if tl.load(cell_meta + row * stride_meta + 1) == 0:
            return
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    s_ok = s < NSPLIT
    lse = tl.load(mid_lse + b * stride_lb + s * stride_ls + hq, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
    part = tl.load(
        mid_o + b * stride_mb + s[:, None] * stride_ms + hq * stride_mh + dv[None, :],
        mask=(weight > 0)[:, None] & (dv < DIM_V)[None, :],
        other=0.0,
    )
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(o + b * stride_ob + hq * stride_oh + dv, out.to(o.dtype.element_ty), dv < DIM_V)


def _check(
    q: Tensor, o: Tensor, layer: int, buffers: LayerBuffers, index: CellIndex, work: Scratch
) -> None:
    """Shapes and strides the kernels assume (host metadata only)."""
    batch, num_q_heads, dim_k = q.shape
    _, num_kv_heads, dim_v = buffers.v.shape
    num_layers = len(buffers.k_layer_off)
    cell_meta, cell_off = index.cell_meta, index.cell_off
    if num_q_heads % num_kv_heads or buffers.k.shape[1:] != (num_kv_heads, dim_k):
        raise ValueError(f"q {tuple(q.shape)} does not match K {tuple(buffers.k.shape)}")
    if o.shape != (batch, num_q_heads, dim_v):
        raise ValueError(f"o {tuple(o.shape)} must be [{batch}, {num_q_heads}, {dim_v}]")
    if cell_off.shape[1] != num_layers * num_kv_heads + 1 or cell_meta.shape[1] != 2:
        raise ValueError("cell_off must be [R + 1, L * H + 1], cell_meta [R + 1, 2]")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} of {num_layers}")
    if work.o.shape[0] < batch or work.o.shape[2:] != (num_q_heads, dim_v):
        raise ValueError(f"scratch {tuple(work.o.shape)} too small for {tuple(o.shape)}")
    tables = (index.req_to_token, cell_meta, cell_off)
    if any(t.stride(-1) != 1 for t in (q, o, *tables, work.o, work.lse)):
        raise ValueError("q, o, req_to_token, the cell tables and the scratch need stride 1 last")


def cell_decode(
    q: Tensor,
    o: Tensor,
    layer: int,
    buffers: LayerBuffers,
    index: CellIndex,
    scale: float | None = None,
    *,
    only_cells: bool = False,
    work: Scratch | None = None,
    block_n: int = 32,
) -> None:
    """Launcher; arguments as :func:`bacon_sglang.cells.cell_decode_batch`, with the pool
    as :func:`layer_buffers` and the stage-1 scratch ``work`` (:func:`scratch`, allocated
    here when None; ``work.o.shape[1]`` is ``NSPLIT``). Everything on one device; nothing is
    read back, allocated (given ``work``) or copied."""
    batch, num_q_heads, dim_k = q.shape
    _, num_kv_heads, dim_v = buffers.v.shape
    work = work or scratch(batch, num_q_heads, dim_v, q.device)
    _check(q, o, layer, buffers, index, work)
    if batch == 0:
        return
    splits, group = work.o.shape[1], num_q_heads // num_kv_heads
    qk_scale = (dim_k**-0.5 if scale is None else scale) * LOG2E
    # bf16 tl.dot is wrong under TRITON_INTERPRET; fp32 must not drop to tf32 on a GPU
    dot_f32 = not q.is_cuda or torch.float32 in (q.dtype, buffers.k.dtype, buffers.v.dtype)
    block_dv = triton.next_power_of_2(dim_v)
    mid = (work.o.stride(0), work.o.stride(1), work.o.stride(2))
    lse = (work.lse.stride(0), work.lse.stride(1))
    rows, meta, off = index.req_to_token, index.cell_meta, index.cell_off
    _stage1[(batch, num_kv_heads, splits)](
        q, buffers.k, buffers.v, buffers.k_layer_off, buffers.v_layer_off, rows,
        index.req_pool_indices, index.seq_lens, meta, off, work.o, work.lse, layer, qk_scale,
        q.stride(0), q.stride(1), buffers.k.stride(0), buffers.k.stride(1), buffers.v.stride(0),
        buffers.v.stride(1), rows.stride(0), meta.stride(0), off.stride(0), *mid, *lse,
        GROUP=group, NUM_LAYERS=len(buffers.k_layer_off), NUM_KV_HEADS=num_kv_heads,
        DIM_K=dim_k, DIM_V=dim_v, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_DK=max(16, triton.next_power_of_2(dim_k)), BLOCK_DV=max(16, block_dv),
        BLOCK_N=block_n, NSPLIT=splits, ONLY_CELLS=only_cells, DOT_F32=dot_f32,
        ALIGN=buffers.align,
    )  # fmt: skip
    _stage2[(batch, num_q_heads)](
        work.o, work.lse, o, index.req_pool_indices, meta, *mid, *lse, o.stride(0), o.stride(1),
        meta.stride(0), DIM_V=dim_v, BLOCK_DV=block_dv, NSPLIT=splits,
        BLOCK_S=triton.next_power_of_2(splits), ONLY_CELLS=only_cells,
    )  # fmt: skip
