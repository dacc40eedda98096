"""Head-granular compressed KV, the PyTorch reference (design: ``patches/head_granular.md``).

A *cell* holds one token of one (layer, KV head). A compressed request keeps ``n[l, h]``
tokens in (layer ``l``, KV head ``h``), so it needs ``C = sum n`` cells; they live inside
SGLang's own pool: ``m = ceil(C / (L * H))`` ordinary slots, each used as ``L x H`` cells
(one per layer buffer and head). Cell ``c`` of a request sits at::

    slot    = cell_slots[c // (L * H)]       # a slot the request owns: req_to_token[row, S + .]
    layer'  = (c % (L * H)) // H             # whose K/V buffer holds it
    head'   = c % H

and (layer ``l``, head ``h``) owns cells ``[off[l * H + h], off[l * H + h + 1])``, ``off`` the
prefix sums of ``n`` (:func:`cell_offsets`). Decode attention of layer ``l``, KV head ``h``
reads that head's cells, then the request's ordinary tokens (shared text ``row[0:S]`` and
generated tokens ``row[S + m : seq_len]``), one softmax over both (:func:`cell_decode`; for a
decode batch read through the design's tables, :class:`CellIndex`, :func:`cell_decode_batch`,
the reference of ``kernels/cell_decode.py``).

A batch's compaction into cells (:func:`compact_cells`, the reference of the kernel
``kernels/compaction.py`` ``compact_cells``) also writes, per ``req_pool_idx``, where decode
finds the cells (:class:`CellTables`). Its keep-sets come ragged, in cell order
(:class:`CellKeep`).

These are the references the Triton kernels are tested against; the server stores KV this
way with ``--kv-layout cells`` (``patches/cells.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from bacon_sglang.paged import KVIndex, indptr
from bacon_sglang.policies import Policy
from bacon_sglang.selection import KEEP_PAD


def cell_offsets(counts: Tensor) -> Tensor:
    """``[L * H + 1]`` int64 prefix sums of the kept counts ``counts`` ``[L, H]``: (layer
    ``l``, head ``h``) owns cells ``[off[l * H + h], off[l * H + h + 1])``."""
    flat = counts.reshape(-1).to(torch.int64)
    return torch.cat([flat.new_zeros(1), flat.cumsum(0)])


def slots_needed(cells: int, num_layers: int, num_kv_heads: int) -> int:
    """``m``: the slots ``cells`` cells take (each slot holds ``L x H`` cells)."""
    per_slot = num_layers * num_kv_heads
    return -(-cells // per_slot)


def kept_cells(
    policy: Policy,
    prompt_len: int,
    prefix_len: int,
    kept: int,
    window: int,
    num_layers: int,
    heads: int | Sequence[int],
) -> int:
    """``C``: the cells a compressed request needs, ``sum n[l, h]`` over every layer and the
    given KV heads (window included), on the host before its forward (the scheduler then
    allocates ``slots_needed(C, L, H)`` slots). Every served allocation has a host-computable
    total: SnapKV's and PyramidKV's depend on ``K, l, L, T`` only, SparseMM's on the offline
    head scores too, AdaKV's per-layer sum is ``Hkv * min(K, T)``, BACON keeps its base's.

    Args:
        policy: the request's policy object (``layer_candidates``).
        prompt_len: ``N``.
        prefix_len: ``P``, positions never selected (a shared prefix: no cells).
        kept: the budget resolved for this prompt, window included (``RequestCompression.kept``).
        window: ``w``, kept in every head.
        num_layers: ``L``.
        heads: ``Hkv`` (all heads), or the model's KV heads a tensor-parallel rank holds.

    Returns:
        ``C`` as an int.
    """
    heads = range(heads) if isinstance(heads, int) else heads
    available = prompt_len - window - prefix_len
    per_layer = policy.layer_candidates(kept - window, available, num_layers, heads)
    return sum(per_layer) + num_layers * len(heads) * window


def rank_heads(rank: int, tp_size: int, num_kv_heads: int) -> range:
    """The model's KV heads tensor-parallel rank ``rank`` of ``tp_size`` holds, as SGLang's
    ``QKVParallelLinear`` splits them: ``Hkv / tp`` consecutive heads each, or with more
    ranks than heads one head per rank, shared by ``tp / Hkv`` consecutive ranks."""
    replicas = max(1, tp_size // num_kv_heads)
    per_rank = max(1, num_kv_heads // tp_size)
    first = rank // replicas * per_rank
    return range(first, first + per_rank)


def cell_address(
    cells: Tensor, num_layers: int, num_kv_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Where cells ``cells`` (any shape, int) live: ``(slot index into the request's cell
    slots, layer buffer, head)``, each shaped as ``cells``."""
    per_slot = num_layers * num_kv_heads
    return cells // per_slot, (cells % per_slot) // num_kv_heads, cells % num_kv_heads


def pack_cells(
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    row: Tensor,
    keep: Sequence[Sequence[Tensor]],
    cell_slots: Tensor,
) -> Tensor:
    """Gather a request's kept tokens into its cells (the reference of the compaction into
    cells), reading every source before writing any cell.

    Args:
        k_buffers, v_buffers: per layer ``[num_slots, H, d]`` (modified in place).
        row: ``[>= N]`` the request's slot of each prompt position (``req_to_token`` row).
        keep: ``keep[l][h]``: ``[n[l, h]]`` prompt positions (layer ``l``, head ``h``) keeps.
        cell_slots: ``[m]`` slots the request owns for its cells.

    Returns:
        ``[L * H + 1]`` the cell offsets (:func:`cell_offsets`).
    """
    num_layers, num_kv_heads = len(k_buffers), k_buffers[0].shape[1]
    counts = torch.tensor(
        [[len(keep[layer][h]) for h in range(num_kv_heads)] for layer in range(num_layers)]
    )
    off = cell_offsets(counts)
    assert slots_needed(int(off[-1]), num_layers, num_kv_heads) <= len(cell_slots)
    sources = []
    for layer in range(num_layers):
        for h in range(num_kv_heads):
            src = row[keep[layer][h].long()].long()
            sources.append((k_buffers[layer][src, h].clone(), v_buffers[layer][src, h].clone()))
    for i, (k, v) in enumerate(sources):
        cells = torch.arange(int(off[i]), int(off[i + 1]))
        slot, layer, head = cell_address(cells, num_layers, num_kv_heads)
        for layer_id in layer.unique().tolist():
            mine = layer == layer_id
            target = cell_slots[slot[mine]].long()
            k_buffers[layer_id][target, head[mine]] = k[mine]
            v_buffers[layer_id][target, head[mine]] = v[mine]
    return off


class CellKeep(NamedTuple):
    """A batch's ragged keep-sets in cell order: request ``r``'s cell ``c`` keeps prompt
    position ``positions[indptr[r] + c]``, so (layer ``l``, head ``h``)'s positions, ascending,
    sit at ``[indptr[r] + off[l * H + h], indptr[r] + off[l * H + h + 1])``, ``off`` the
    :func:`cell_offsets` of ``counts[r]``."""

    positions: Tensor  # [sum_C] int, C_r = counts[r].sum()
    counts: Tensor  # [R, L, H] int, n[l, h] per request (window included)
    indptr: Tensor  # [R + 1] int64

    @classmethod
    def pack(cls, keeps: Sequence[Tensor]) -> CellKeep:
        """Per-request ``[L, H, W_r]`` keep-sets, each row its sorted positions then
        ``KEEP_PAD`` (the policies' ragged form), in cell order. Reads the counts back."""
        valid = [k != KEEP_PAD for k in keeps]
        counts = torch.stack([v.sum(-1) for v in valid])
        positions = torch.cat([k[v] for k, v in zip(keeps, valid, strict=True)])
        return cls(positions, counts, indptr(counts.sum((1, 2))))

    @classmethod
    def from_padded(cls, keep: Tensor, counts: Tensor, cells: Sequence[int]) -> CellKeep:
        """A served policy's batch of ragged keep-sets in cell order, with nothing read back.

        Args:
            keep: ``[L, B, Hkv, W]`` each row's sorted positions then ``KEEP_PAD``
                (``kernels.served.KeepSets.keep``).
            counts: ``[L, B, Hkv]`` the kept positions of each row (``KeepSets.counts``).
            cells: ``C_b`` per request, known on the host (:func:`kept_cells`); must equal
                ``counts[:, b].sum()``, which is not checked (that would read it back).

        Every kept position goes to its place in cell order, ``(b, l, h, j)``: the running
        count of kept entries before it (a cumsum over the mask); the padding goes to one
        spare place past the end, then cut off. The output sizes are the host's ``cells``.
        """
        rows = keep.permute(1, 0, 2, 3).reshape(-1)
        kept = rows != KEEP_PAD
        total = int(sum(cells))
        place = torch.where(kept, kept.cumsum(0) - 1, total)
        positions = rows.new_empty(total + 1).scatter_(0, place, rows)[:total]
        device = keep.device
        host = torch.tensor(list(cells), dtype=torch.long)
        counts = counts.permute(1, 0, 2).contiguous()
        return cls(positions, counts, indptr(host).to(device, non_blocking=True))

    @classmethod
    def cat(cls, parts: Sequence[CellKeep]) -> CellKeep:
        """The batches ``parts`` one after the other, as one (their requests in order)."""
        if len(parts) == 1:
            return parts[0]
        sizes = torch.cat([p.indptr.diff() for p in parts])
        return cls(
            torch.cat([p.positions for p in parts]),
            torch.cat([p.counts.to(parts[0].counts.dtype) for p in parts]),
            indptr(sizes),
        )

    @classmethod
    def uniform(cls, keeps: Sequence[Tensor]) -> CellKeep:
        """Per-request ``[L, H, n_r]`` keep-sets in which every (layer, head) keeps ``n_r``
        positions (uniform policies: SnapKV, BACON), in cell order. The counts are the
        shapes, known on the host: nothing is read back from the device."""
        num_layers, num_kv_heads = keeps[0].shape[:2]
        widths = torch.tensor([k.shape[-1] for k in keeps], dtype=torch.long)
        counts = widths.view(-1, 1, 1).expand(-1, num_layers, num_kv_heads).contiguous()
        device = keeps[0].device
        return cls(
            torch.cat([k.reshape(-1) for k in keeps]),  # (layer, head, j) is cell order
            counts.to(device, non_blocking=True),
            indptr(widths * num_layers * num_kv_heads).to(device, non_blocking=True),
        )


class CellTables(NamedTuple):
    """Where decode finds each request's cells: one row per ``req_pool_idx`` of SGLang's
    ``req_to_token`` (row 0, its padding row, stays 0), written by :func:`compact_cells`."""

    meta: Tensor  # [R + 1, 2] int32: S (row position of the first cell slot), m (0: no cells)
    off: Tensor  # [R + 1, L * H + 1] int32: the request's cell_offsets

    @classmethod
    def zeros(
        cls, rows: int, num_layers: int, num_kv_heads: int, device: torch.device | str = "cpu"
    ) -> CellTables:
        """Tables of ``rows`` (``R + 1``) request rows, none head-granular."""
        meta = torch.zeros(rows, 2, dtype=torch.int32, device=device)
        off = torch.zeros(rows, num_layers * num_kv_heads + 1, dtype=torch.int32, device=device)
        return cls(meta, off)


def check_cells(index: KVIndex, prefix_lens: Tensor, keep: CellKeep, dst: KVIndex) -> None:
    """Raise ``ValueError`` unless :func:`compact_cells`' precondition holds: per request,
    ``indptr`` spans ``counts``, each (layer, head)'s positions strictly increase inside
    ``[P_r, L_r)``, the ``m_r`` cell slots hold its cells, and no cell slot is a kept token's
    slot (the kernel reads and writes in one pass)."""
    num_layers, num_kv_heads = keep.counts.shape[1:]
    if not torch.equal(keep.indptr.diff().cpu(), keep.counts.sum((1, 2)).cpu()):
        raise ValueError("keep.indptr does not span keep.counts")
    sources, cells = [], []
    bounds = keep.indptr.tolist()
    for r, (k0, k1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        p = int(prefix_lens[r])
        cells.append(dst.slots(r)[p:])
        if slots_needed(k1 - k0, num_layers, num_kv_heads) > len(cells[-1]):
            raise ValueError(f"request {r}: {k1 - k0} cells, {len(cells[-1])} cell slots")
        lo, hi = p, int(index.seq_lens[r])
        for pos in keep.positions[k0:k1].split(keep.counts[r].reshape(-1).tolist()):
            if len(pos) and (int(pos.min()) < lo or int(pos.max()) >= hi):
                raise ValueError(f"request {r}: keep positions outside [{lo}, {hi})")
            if not bool((pos.diff() > 0).all()):
                raise ValueError(f"request {r}: keep positions not strictly increasing")
        sources.append(index.slots(r)[keep.positions[k0:k1].long()])
    if sources and bool(torch.isin(torch.cat(cells), torch.cat(sources)).any()):
        raise ValueError("a cell slot is also a kept token's slot")


def compact_cells(
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: KVIndex,
    prefix_lens: Tensor,
    keep: CellKeep,
    dst: KVIndex,
    tables: CellTables,
    req_pool_indices: Tensor,
) -> None:
    """Gather every request's kept K/V, every layer and KV head, into its cells
    (:func:`pack_cells` per request), and record where they are in ``tables``.

    Args:
        k_buffers, v_buffers: per layer ``[num_slots, H, d_k]`` / ``[..., d_v]`` (modified
            in place).
        index: the requests' prompt rows (``req_to_token`` row snapshots): position to slot.
        prefix_lens: ``[R]`` ``P_r`` (the design's ``S``): the row position of the first cell
            slot; positions below it are shared and never kept.
        keep: the kept positions of each (layer, head), in cell order (:class:`CellKeep`),
            inside ``[P_r, L_r)``.
        dst: the rows after compaction: ``[0, P_r)`` untouched, ``[P_r, P_r + m_r)`` the
            request's cell slots (``m_r >= ceil(C_r / (L * H))``), none of them a kept
            token's slot (see :func:`check_cells`).
        tables: rows ``req_pool_indices`` get ``meta = (P_r, m_r)`` and
            ``off = cell_offsets(counts[r])``; other rows and cells are left as they are.
        req_pool_indices: ``[R]`` each request's row of ``tables``.
    """
    check_cells(index, prefix_lens, keep, dst)
    heads = keep.counts.shape[2]
    bounds = keep.indptr.tolist()
    for r, (k0, k1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        per_head = keep.positions[k0:k1].split(keep.counts[r].reshape(-1).tolist())
        per_layer = [per_head[i : i + heads] for i in range(0, len(per_head), heads)]
        p = int(prefix_lens[r])
        cell_slots = dst.slots(r)[p:]
        off = pack_cells(k_buffers, v_buffers, index.slots(r), per_layer, cell_slots)
        row = int(req_pool_indices[r])
        tables.meta[row] = torch.tensor([p, len(cell_slots)], dtype=torch.int32)
        tables.off[row] = off.to(torch.int32)


def gather_cells(
    buffers: Sequence[Tensor], cell_slots: Tensor, off: Tensor, layer: int, head: int
) -> Tensor:
    """``[n[layer, head], d]``: the cells of (``layer``, ``head``), in order, from
    ``buffers`` (per layer ``[num_slots, H, d]``, K or V)."""
    num_layers, num_kv_heads = len(buffers), buffers[0].shape[1]
    i = layer * num_kv_heads + head
    cells = torch.arange(int(off[i]), int(off[i + 1]))
    slot, where, at = cell_address(cells, num_layers, num_kv_heads)
    out = buffers[0].new_empty(len(cells), buffers[0].shape[-1])
    for layer_id in where.unique().tolist():
        mine = where == layer_id
        out[mine] = buffers[layer_id][cell_slots[slot[mine]].long(), at[mine]]
    return out


def cell_decode(
    q: Tensor,
    layer: int,
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    row: Tensor,
    shared: int,
    num_cell_slots: int,
    off: Tensor,
    seq_len: int,
    scale: float | None = None,
) -> Tensor:
    """Decode attention of one request at ``layer`` over its cells and its ordinary tokens.

    Args:
        q: ``[Hq, d]`` the new token's rotated queries.
        k_buffers, v_buffers: per layer ``[num_slots, H, d]``.
        row: the request's ``req_to_token`` row: ``[0, S)`` shared text, ``[S, S + m)`` its
            cell slots, ``[S + m, seq_len)`` generated tokens (the new one included).
        shared: ``S``; num_cell_slots: ``m``; off: :func:`cell_offsets` of the request.
        seq_len: the request's KV length ``S + m + t``.
        scale: softmax scale, ``1 / sqrt(d)`` when None.

    Returns:
        ``[Hq, d_v]``: per query head, softmax over (its KV head's cells, then the ordinary
        tokens) of ``q . k`` times ``v``; the query heads of a GQA group share their KV head.
    """
    num_q_heads, dim = q.shape
    num_kv_heads = k_buffers[0].shape[1]
    group = num_q_heads // num_kv_heads
    scale = dim**-0.5 if scale is None else scale
    cell_slots = row[shared : shared + num_cell_slots]
    ordinary = torch.cat([row[:shared], row[shared + num_cell_slots : seq_len]]).long()
    out = []
    for h in range(num_kv_heads):
        k = torch.cat(
            [gather_cells(k_buffers, cell_slots, off, layer, h), k_buffers[layer][ordinary, h]]
        )
        v = torch.cat(
            [gather_cells(v_buffers, cell_slots, off, layer, h), v_buffers[layer][ordinary, h]]
        )
        heads = q[h * group : (h + 1) * group].float()
        weights = torch.softmax(heads @ k.float().T * scale, dim=-1)
        out.append(weights @ v.float())
    return torch.cat(out).to(q.dtype)


class CellIndex(NamedTuple):
    """Where the keys of a decode batch are: SGLang's rows plus the cell tables of
    ``patches/head_granular.md`` (section 4.2), all indexed by ``req_pool_idx``."""

    req_to_token: Tensor  # [R + 1, max_context] int32, SGLang's rows of slots
    req_pool_indices: Tensor  # [bs] each batch row's req_to_token row (0: padding)
    seq_lens: Tensor  # [bs] KV length S + m + t (the new token included)
    cell_meta: Tensor  # [R + 1, 2] int32 (S, m); m == 0: a dense row, S and cell_off unread
    cell_off: Tensor  # [R + 1, L * H + 1] int32 the row's cell_offsets


def cell_decode_batch(
    q: Tensor,
    o: Tensor,
    layer: int,
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: CellIndex,
    scale: float | None = None,
    *,
    only_cells: bool = False,
) -> None:
    """:func:`cell_decode` of every row of a decode batch, written into ``o``: the reference
    of ``kernels/cell_decode.py``. A row with ``m == 0`` is dense decode over
    ``row[0:seq_len]``.

    Args:
        q: ``[bs, Hq, d]``; o: ``[bs, Hq, d_v]`` (written).
        k_buffers, v_buffers: per layer ``[num_slots, H, d]``.
        index: the batch's rows and cell tables (:class:`CellIndex`).
        only_cells: leave the rows with ``m == 0`` of ``o`` as they are.
    """
    no_cells = index.cell_off.new_zeros(index.cell_off.shape[1])
    rows = zip(index.req_pool_indices.tolist(), index.seq_lens.tolist(), strict=True)
    for b, (rpi, seq_len) in enumerate(rows):
        shared, m = index.cell_meta[rpi].tolist()
        if m == 0 and only_cells:
            continue
        off = index.cell_off[rpi] if m else no_cells
        o[b] = cell_decode(
            q[b], layer, k_buffers, v_buffers, index.req_to_token[rpi], shared if m else 0, m,
            off, seq_len, scale,
        ).to(o.dtype)  # fmt: skip
