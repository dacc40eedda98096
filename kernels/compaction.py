"""Per-head compaction of the kept tokens, all layers and requests in one launch: in place,
or into other slots (a destination table, e.g. a compressed copy's fresh slots).

Reference: :func:`bacon_sglang.paged.compact` (same arguments; the picture of the slot ranges
is there). Bytes are copied as integers of the element's width, so the result is bit-exact
for any K/V dtype (bf16, fp16, fp32, fp8).

Grid: (request, layer, KV head). A program walks its keep list in chunks of ``BLOCK_J``
entries, in order; per chunk it loads all source rows, waits at a barrier, then stores.

Why no staging buffer is needed: within one (layer, head) the keep positions are strictly
increasing and ``>= P``, so ``keep[j] >= P + j``. A chunk writes positions
``[P + c, P + c + BLOCK_J)``; every later chunk reads positions ``keep[j] >= P + c + BLOCK_J``,
never one already written, and the chunk's own sources are all loaded before the barrier,
so it may overwrite them. Different (layer, head) pairs touch disjoint bytes, different
requests disjoint slots. Out of place the destination slots are no one's source.

:func:`compact_cells` (reference :func:`bacon_sglang.cells.compact_cells`, layout in
``bacon_sglang/cells.py`` and ``patches/head_granular.md`` section 4.2) gathers ragged
keep-sets into head-granular *cells* instead, in fresh slots only (no cell slot is a source,
so one pass is exact whatever the order), and writes each request's row of the decode's
tables (:class:`~bacon_sglang.cells.CellTables`) in the same launch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from bacon_sglang.cells import CellKeep, CellTables
from bacon_sglang.paged import KVIndex

from .score_kernels import layer_table, slot_of

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _move_rows(
    k_base, v_base, k_from, v_from, src, src_head, k_to, v_to, dst, dst_head, ok, stride_ks,
    stride_kh, stride_vs, stride_vh, DIM_K: tl.constexpr, DIM_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Copy the K and V rows of head ``src_head`` of slots ``src`` (``[BLOCK_J]``) in the
    layer whose buffers start ``k_from``/``v_from`` elements from the bases, where ``ok``, to
    head ``dst_head`` of slots ``dst`` in the layer at ``k_to``/``v_to`` (scalars or
    ``[BLOCK_J]``). Every source is read before any write."""
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    k_mask = ok[:, None] & (dk < DIM_K)[None, :]
    v_mask = ok[:, None] & (dv < DIM_V)[None, :]
    # Row starts in elements from the base; ALIGN divides each of them (the launcher
    # checks), which lets Triton move 16 bytes per instruction instead of one element.
    k_src = tl.multiple_of(k_from + src * stride_ks + src_head * stride_kh, ALIGN)
    v_src = tl.multiple_of(v_from + src * stride_vs + src_head * stride_vh, ALIGN)
    k_dst = tl.multiple_of(k_to + dst * stride_ks + dst_head * stride_kh, ALIGN)
    v_dst = tl.multiple_of(v_to + dst * stride_vs + dst_head * stride_vh, ALIGN)
    k_rows = tl.load(k_base + k_src[:, None] + dk[None, :], k_mask)
    v_rows = tl.load(v_base + v_src[:, None] + dv[None, :], v_mask)
    tl.debug_barrier()  # in place, a chunk's destinations may be its own sources
    tl.store(k_base + k_dst[:, None] + dk[None, :], k_rows, k_mask)
    tl.store(v_base + v_dst[:, None] + dv[None, :], v_rows, v_mask)


@triton.jit
def _compact_kernel(
    k_base, v_base, k_layer_offsets, v_layer_offsets, table, starts, dst_table, dst_starts,
    prefix_lens, keep, keep_indptr, keep_stride_l, keep_stride_h, stride_ks, stride_kh,
    stride_vs, stride_vh, PAGE: tl.constexpr, DST_PAGE: tl.constexpr, DIM_K: tl.constexpr,
    DIM_V: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    req = tl.program_id(0)
    layer = tl.program_id(1)
    h = tl.program_id(2)
    k_layer = tl.load(k_layer_offsets + layer)
    v_layer = tl.load(v_layer_offsets + layer)
    start = tl.load(starts + req)
    dst_start = tl.load(dst_starts + req)
    prefix = tl.load(prefix_lens + req)
    k0 = tl.load(keep_indptr + req)
    count = tl.load(keep_indptr + req + 1) - k0
    keep_row = keep + layer * keep_stride_l + h * keep_stride_h + k0
    for c in range(0, count, BLOCK_J):
        j = c + tl.arange(0, BLOCK_J)
        valid = j < count
        src_pos = tl.load(keep_row + j, mask=valid, other=0)
        src = slot_of(table, start, src_pos, valid, PAGE)
        dst = slot_of(dst_table, dst_start, prefix + j, valid, DST_PAGE)
        move = valid & (src != dst)  # tokens already in place stay
        _move_rows(
            k_base, v_base, k_layer, v_layer, src, h, k_layer, v_layer, dst, h, move,
            stride_ks, stride_kh, stride_vs, stride_vh, DIM_K, DIM_V, BLOCK_DK, BLOCK_DV, ALIGN,
        )  # fmt: skip


@triton.jit
def _compact_cells_kernel(
    k_base, v_base, k_layer_offsets, v_layer_offsets, table, starts, dst_table, dst_starts,
    dst_lens, prefix_lens, keep, keep_indptr, counts, req_pool_indices, cell_meta, cell_off,
    stride_meta, stride_off, stride_ks, stride_kh, stride_vs, stride_vh, PAGE: tl.constexpr,
    DST_PAGE: tl.constexpr, HEADS: tl.constexpr, PER_SLOT: tl.constexpr, DIM_K: tl.constexpr,
    DIM_V: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_LH: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    # Grid (request, layer, KV head), as _compact_kernel and the design note (section 4.3):
    # one program per (layer, head) of a request moves that head's n[l, h] cells. A skewed
    # allocation (SparseMM: one head keeps its whole prompt) makes one program long, no
    # longer than a _compact_kernel program at budget = prompt; a grid over cell blocks
    # would balance it at the price of a search per cell: to be measured on a GPU first.
    req = tl.program_id(0)
    layer = tl.program_id(1)
    h = tl.program_id(2)
    i = layer * HEADS + h  # this (layer, head)'s index in the request's counts and offsets
    lh = tl.arange(0, BLOCK_LH)
    n = tl.load(counts + req * PER_SLOT + lh, mask=lh < PER_SLOT, other=0).to(tl.int64)
    first = tl.sum(tl.where(lh < i, n, 0))  # off[i]: the head's first cell
    count = tl.sum(tl.where(lh == i, n, 0))  # n[l, h]
    prefix = tl.load(prefix_lens + req)
    row = tl.load(req_pool_indices + req).to(tl.int64)
    tl.store(cell_off + row * stride_off + i + 1, (first + count).to(tl.int32))
    first_program = i == 0  # also writes the row's off[0] = 0 and meta = (S, m)
    two = tl.arange(0, 2)
    m = tl.load(dst_lens + req) - prefix
    meta = tl.where(two == 0, prefix, m).to(tl.int32)
    tl.store(cell_meta + row * stride_meta + two, meta, mask=(two < 2) & first_program)
    zero = tl.zeros([2], dtype=tl.int32)
    tl.store(cell_off + row * stride_off + two, zero, mask=(two == 0) & first_program)
    k_layer = tl.load(k_layer_offsets + layer)
    v_layer = tl.load(v_layer_offsets + layer)
    start = tl.load(starts + req)
    dst_start = tl.load(dst_starts + req)
    keep_row = keep + tl.load(keep_indptr + req) + first
    for c in range(0, count, BLOCK_J):
        j = c + tl.arange(0, BLOCK_J)
        valid = j < count
        src_pos = tl.load(keep_row + j, mask=valid, other=0)
        src = slot_of(table, start, src_pos, valid, PAGE)
        cell = first + j  # bacon_sglang.cells.cell_address
        dst = slot_of(dst_table, dst_start, prefix + cell // PER_SLOT, valid, DST_PAGE)
        dst_layer = (cell % PER_SLOT) // HEADS
        dst_head = cell % HEADS
        k_to = tl.load(k_layer_offsets + dst_layer, mask=valid, other=0)
        v_to = tl.load(v_layer_offsets + dst_layer, mask=valid, other=0)
        _move_rows(
            k_base, v_base, k_layer, v_layer, src, h, k_to, v_to, dst, dst_head, valid,
            stride_ks, stride_kh, stride_vs, stride_vh, DIM_K, DIM_V, BLOCK_DK, BLOCK_DV, ALIGN,
        )  # fmt: skip


def _layer_offsets(buffers: Sequence[Tensor]) -> tuple[Tensor, Tensor, tuple[int, ...], int]:
    """The first layer's buffer viewed as integers of the element's width (the kernel's base
    pointer), then :func:`~.score_kernels.layer_table`'s offsets, strides and alignment."""
    size = buffers[0].dtype.itemsize
    if size not in _INT_OF_WIDTH:
        raise ValueError(f"unsupported K/V dtype {buffers[0].dtype}")
    table, strides, align = layer_table(buffers)
    return buffers[0].view(_INT_OF_WIDTH[size]), table, strides, align


class _Pool(NamedTuple):
    """The pool's K and V layers as the kernels address them: base pointers, ``[layers]``
    offsets, slot and head strides (elements), a common row alignment, head dims."""

    args: tuple  # k_base, v_base, k_layer_offsets, v_layer_offsets
    strides: tuple[int, int, int, int]  # stride_ks, stride_kh, stride_vs, stride_vh
    align: int
    dims: tuple[int, int]  # d_k, d_v


def _pool(k_buffers: Sequence[Tensor], v_buffers: Sequence[Tensor], num_layers: int) -> _Pool:
    """Checks the buffers against the keep-sets' ``num_layers`` and each other, then
    :func:`_layer_offsets` of K and of V."""
    if len(k_buffers) != num_layers or len(v_buffers) != num_layers:
        raise ValueError(f"keep has {num_layers} layers, got {len(k_buffers)} K buffers")
    if k_buffers[0].dtype.itemsize != v_buffers[0].dtype.itemsize:
        raise ValueError(
            f"K and V elements differ in width: {k_buffers[0].dtype}, {v_buffers[0].dtype}"
        )
    k_base, k_layers, k_stride, k_align = _layer_offsets(k_buffers)
    v_base, v_layers, v_stride, v_align = _layer_offsets(v_buffers)
    return _Pool(
        (k_base, v_base, k_layers, v_layers),
        (k_stride[0], k_stride[1], v_stride[0], v_stride[1]),
        min(k_align, v_align),
        (k_buffers[0].shape[2], v_buffers[0].shape[2]),
    )


def _widths(pool: _Pool, block_j: int) -> dict[str, int]:
    """The constexprs of the pool's rows and the chunk width, common to the kernels."""
    dim_k, dim_v = pool.dims
    return dict(
        DIM_K=dim_k, DIM_V=dim_v, BLOCK_J=block_j, BLOCK_DK=triton.next_power_of_2(dim_k),
        BLOCK_DV=triton.next_power_of_2(dim_v), ALIGN=pool.align,
    )  # fmt: skip


def compact(
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: KVIndex,
    prefix_lens: Tensor,
    keep: Tensor,
    keep_indptr: Tensor,
    dst: KVIndex | None = None,
    *,
    block_j: int = 64,
) -> None:
    """Launcher; arguments as :func:`bacon_sglang.paged.compact` (the precondition on
    ``keep`` is not checked here: call :func:`bacon_sglang.paged.check_keep` to check it)."""
    dst = index if dst is None else dst
    num_layers, heads, _ = keep.shape
    pool = _pool(k_buffers, v_buffers, num_layers)
    if keep.stride(2) != 1:
        keep = keep.contiguous()
    dev = k_buffers[0].device
    batch = len(keep_indptr) - 1
    if batch == 0 or keep.shape[-1] == 0:
        return
    _compact_kernel[(batch, num_layers, heads)](
        *pool.args, index.table, index.start.to(dev), dst.table, dst.start.to(dev),
        prefix_lens.to(dev), keep, keep_indptr.to(dev), keep.stride(0), keep.stride(1),
        *pool.strides, PAGE=index.page_size, DST_PAGE=dst.page_size, **_widths(pool, block_j),
    )  # fmt: skip


def compact_cells(
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: KVIndex,
    prefix_lens: Tensor,
    keep: CellKeep,
    dst: KVIndex,
    tables: CellTables,
    req_pool_indices: Tensor,
    *,
    block_j: int = 64,
) -> None:
    """Launcher; arguments as :func:`bacon_sglang.cells.compact_cells` (the precondition is
    not checked here: call :func:`bacon_sglang.cells.check_cells` to check it). One launch
    for the batch, every layer and head; nothing is read back from the device."""
    batch, num_layers, heads = keep.counts.shape
    if batch == 0:
        return
    pool = _pool(k_buffers, v_buffers, num_layers)
    if tables.off.shape[1] != num_layers * heads + 1 or tables.off.stride(1) != 1:
        raise ValueError(f"tables.off needs {num_layers * heads + 1} contiguous columns")
    if tables.meta.stride(1) != 1:
        raise ValueError("tables.meta needs contiguous columns")
    dev = k_buffers[0].device
    _compact_cells_kernel[(batch, num_layers, heads)](
        *pool.args, index.table, index.start.to(dev), dst.table, dst.start.to(dev),
        dst.seq_lens.to(dev), prefix_lens.to(dev), keep.positions.contiguous(),
        keep.indptr.to(dev), keep.counts.contiguous(), req_pool_indices.to(dev), tables.meta,
        tables.off, tables.meta.stride(0), tables.off.stride(0), *pool.strides,
        PAGE=index.page_size, DST_PAGE=dst.page_size, HEADS=heads, PER_SLOT=num_layers * heads,
        BLOCK_LH=triton.next_power_of_2(num_layers * heads), **_widths(pool, block_j),
    )  # fmt: skip
