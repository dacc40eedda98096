"""One request's compression at the end of its prefill, as plain PyTorch (no SGLang import).

The data path, one step per function::

    prefill layer l ──> window queries of the last w prompt tokens,
                       copied into the forward's buffer              (ForwardWindows.add)
    after layer L-1 ──> window scores of every layer from K in the pool, calibration,
                       keep-sets [layers, Hkv, kept], all finishing requests at once
                                                                     (kernels.served)
                   ──> compaction of every layer, in place or a copy (kernels.compact)
    scheduler       ──> slots [ceil(P + kept), L) freed, KV length P + kept

The project's one picture of a request's ``req_to_token`` row after its prefill (positions,
not slots; every other document links here). With a copy, the default
(``--kv-prefix-cache full`` and the radix cache on)::

    positions   0 ...... S-1 | S ........ S+kept-1 | S+kept ...
                shared text  | compressed copy     | generated: KV slot S+kept+t,
                (tree,       | (fresh private      |   rotary position L+t
                 locked)     |  slots: each head's |
                             |  kept K/V in order) |
    radix tree  [0, floor(L)): the prompt's full KV, locked up to S, evictable beyond;
                the tail [floor(L), L) of a partial page is freed

Compacted in place (``--kv-prefix-cache shared``, or no room for a copy)::

    positions   0 ...... P-1 | P ........ P+kept-1 | P+kept ..... L-1 | L ...
                shared prefix| private, kept       | private, evicted| generated: KV slot
                (radix tree: | (each head's kept   | (slots freed,   |   P+kept+t, rotary
                 untouched)  |  K/V, in order)     |  whole pages)   |   position L+t)

With ``--kv-layout cells`` the middle range ``[S, S + m)`` holds ``m`` fresh *cell slots*,
each holding one kept token of every (layer, KV head) pair (``bacon_sglang/cells.py``); the
prompt goes to the tree (``full``) or back to the allocator (``shared``) as above.

``S`` is 0, or with ``--kv-text-prefix share`` the text before the first image (whole pages);
``P`` is ``S`` or what the request matched in the radix tree, whichever is longer. ``kept``
counts the observation window (the last ``w`` prompt tokens, always kept). ``L`` is the
prompt's length; decode positions are logical (``patches/forward_batch.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bacon_sglang.cells import slots_needed
from bacon_sglang.config import CompressionConfig
from bacon_sglang.paged import host_offsets, to_device
from bacon_sglang.policies import Policy, RequestState
from bacon_sglang.scoring import window_attention


@dataclass
class WindowQueries:
    """The rotated queries of a request's last ``w`` prompt tokens, every layer: the stash of
    a request whose prompt continues in a later chunk.

    A chunked prefill may end with a chunk shorter than ``w``; the rows of earlier chunks are
    kept here (the newest ``w`` per layer) so the last chunk sees the whole window."""

    window: int
    rows: Tensor | None = None  # [layers, <= w, Hq, d]

    def extend(self, q: Tensor) -> None:
        """Append one forward's newest rows ``[layers, r, Hq, d]`` (a copy is kept)."""
        if self.rows is not None and q.shape[1] < self.window:
            q = torch.cat([self.rows, q], dim=1)
        self.rows = q[:, -self.window :].clone()

    def before(self, q: Tensor) -> Tensor:
        """The request's newest ``<= w`` rows ``[layers, <= w, Hq, d]`` when this forward
        brings ``q`` ``[layers, r, Hq, d]``: the stash's last ``w - r`` rows, then ``q``."""
        need = self.window - q.shape[1]
        if self.rows is None or need <= 0:
            return q[:, -self.window :]
        return torch.cat([self.rows[:, -need:], q], dim=1)


class ForwardWindows:
    """The window queries of one prefill forward's planned requests, every layer, in one
    buffer allocated once per forward: per layer one copy (:meth:`add`), no per-request work.

    Rows of the buffer ``[layers, rows, Hq, d]``: each planned request's newest
    ``min(w, q_len)`` query rows of this forward; the finishing requests first, grouped by
    policy and pool kernel (each group's rows consecutive), then the middle chunks'. ``rows``
    is at most the sum of the batch's windows, whatever the prompt lengths (Qwen2-VL-7B, 8
    requests, window 32, bf16: 28 x 256 x 28 x 128 x 2 B = 51 MB).

    Args:
        plan: the forward's entries (``q_start``, ``q_len``, ``window``: a
            :class:`WindowQueries`, ``compression``: a :class:`RequestCompression` or None
            for a middle chunk), as ``patches/scheduler.py``'s ``PlanEntry``.
        num_layers: the model's layers.
        q: this forward's first layer's queries ``[tokens, Hq, d]`` (shape, dtype, device).
    """

    def __init__(self, plan: Sequence, num_layers: int, q: Tensor) -> None:
        self.finishing = sorted((e for e in plan if e.compression is not None), key=_group)
        self.middle = [e for e in plan if e.compression is None]
        self.rows = [min(e.window.window, e.q_len) for e in self.finishing + self.middle]
        src = [
            row
            for e, r in zip(self.finishing + self.middle, self.rows, strict=True)
            for row in range(e.q_start + e.q_len - r, e.q_start + e.q_len)
        ]
        self.src = to_device(src, q.device)
        self.buffer = q.new_empty(num_layers, len(src), *q.shape[1:])

    def add(self, layer_id: int, q: Tensor) -> None:
        """Copy layer ``layer_id``'s window rows out of its queries ``q`` ``[tokens, Hq, d]``."""
        torch.index_select(q, 0, self.src, out=self.buffer[layer_id])

    def finish(self) -> list[tuple[list[RequestCompression], Tensor, list[int]]]:
        """After the last layer: stash the middle chunks' rows in their :class:`WindowQueries`
        and return, per group of finishing requests sharing a policy and pool kernel, its
        requests, their window queries ``[layers, sum_w, Hq, d]`` and ``w_b`` per request
        (earlier chunks' rows prepended where this forward brought fewer than ``w``)."""
        bounds = host_offsets(self.rows)
        mine = [self.buffer[:, a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for e, q in zip(self.middle, mine[len(self.finishing) :], strict=True):
            e.window.extend(q)
        out, at = [], 0
        for _, group in itertools.groupby(self.finishing, key=_group):
            entries = list(group)
            rows = self.rows[at : at + len(entries)]
            q = self.buffer[:, bounds[at] : bounds[at + len(entries)]]  # consecutive rows
            if any(e.window.rows is not None and r < e.window.window
                   for e, r in zip(entries, rows, strict=True)):  # fmt: skip
                parts = [e.window.before(m) for e, m in zip(entries, mine[at:], strict=False)]
                q, rows = torch.cat(parts, dim=1), [p.shape[1] for p in parts]
            out.append(([e.compression for e in entries], q, rows))
            at += len(entries)
        return out


def _group(entry) -> tuple[str, int]:
    """Finishing requests that share a policy and pool kernel are scored together."""
    return entry.compression.config.policy, entry.compression.config.pool_kernel


@dataclass
class RequestCompression:
    """Compression of one request whose prompt ends in the current forward.

    Attributes:
        config: the request's effective config.
        policy: its policy object.
        prompt_len: ``L``, prompt tokens in KV after the forward.
        prefix_len: ``P``, tokens shared with the radix tree (never touched).
        kept: private prompt tokens each KV head keeps (window included).
        slots: ``[L]`` slot ids of the prompt (snapshot of the ``req_to_token`` row).
        keep: ``[num_layers, Hkv, kept]`` positions kept per layer and head (filled layer by
            layer).
        cached_len: tokens of the prompt matched in the radix tree (not prefilled).
        copy_slots: ``[>= kept]`` fresh slots the kept K/V are gathered into (their first
            ``kept``), or None: compacted in place, into ``slots[P:P + kept]``. With cells,
            the fresh cell slots (their first :attr:`cell_slots`).
        copy_fallback: a copy was asked for but the pool had no room for it.
        cells: ``C``, kept tokens of all (layer, KV head) pairs together when they are stored
            head-granular (``--kv-layout cells``, :mod:`bacon_sglang.cells`); 0: one slot per
            kept token and every layer and head. With tensor parallelism, this rank's heads'.
        rank_cells: with tensor parallelism, ``C_r`` of every rank in rank order (``cells``
            among them); every rank allocates the largest rank's slots. Empty: one process.
    """

    config: CompressionConfig
    policy: Policy
    prompt_len: int
    prefix_len: int
    kept: int
    slots: Tensor
    keep: Tensor
    cached_len: int = 0
    copy_slots: Tensor | None = None
    copy_fallback: bool = False
    cells: int = 0
    rank_cells: tuple[int, ...] = ()
    state: RequestState = field(default_factory=RequestState)

    def store_in_cells(self, cells: int | None = None, rank_cells: Sequence[int] = ()) -> None:
        """Store the keep-sets head-granular, in ``cells`` cells (``C``, from the policy's
        allocation on the host: :func:`bacon_sglang.cells.kept_cells`); None: uniform
        keep-sets, every (layer, KV head) keeps ``kept`` tokens, so ``C = L * Hkv * kept``
        cells in ``m = kept`` cell slots. ``rank_cells``: every tensor-parallel rank's ``C``."""
        num_layers, num_kv_heads, _ = self.keep.shape
        self.cells = num_layers * num_kv_heads * self.kept if cells is None else cells
        self.rank_cells = tuple(rank_cells)

    @property
    def cell_slots(self) -> int:
        """``m``: the slots the cells take (``ceil(C / (L * Hkv))``), 0 without cells; with
        tensor parallelism the largest rank's (every rank's ``Hkv`` the same), so that the
        allocator, which every rank runs alike, gives every rank the same slots."""
        num_layers, num_kv_heads, _ = self.keep.shape
        cells = (self.cells, *self.rank_cells)
        return max(slots_needed(c, num_layers, num_kv_heads) for c in cells)

    @property
    def all_cells(self) -> int:
        """``C`` of every tensor-parallel rank together (``cells`` with one process)."""
        return sum(self.rank_cells) if self.rank_cells else self.cells

    @property
    def new_len(self) -> int:
        """KV length after compaction: ``P + kept``, or ``P + m`` with cells."""
        return self.prefix_len + (self.cell_slots if self.cells else self.kept)

    @property
    def evicted(self) -> int:
        return self.prompt_len - self.new_len

    def destination(self) -> tuple[Tensor, ...]:
        """Slot of each of the ``P + kept`` positions after compaction, as views to join
        (:meth:`bacon_sglang.paged.KVIndex.from_rows`): the row itself, or with a copy, the
        row's prefix followed by the copy's slots."""
        if self.copy_slots is None:
            return (self.slots[: self.new_len],)
        return self.slots[: self.prefix_len], self.copy_slots[: self.new_len - self.prefix_len]

    def record(self, layer_id: int, keep: Tensor) -> None:
        """Store layer ``layer_id``'s keep-set ``[Hkv, kept]`` (sorted positions in
        ``[P, L)``), after checking its shape and range."""
        if keep.shape != self.keep.shape[1:] or bool((keep < self.prefix_len).any()):
            raise RuntimeError(
                f"policy {self.config.policy} returned a keep-set of shape {tuple(keep.shape)} "
                f"for kept={self.kept}, prefix={self.prefix_len}"
            )
        self.keep[layer_id] = keep

    def score_layer(
        self, layer_id: int, q_window: Tensor, keys: Tensor, scale: float | None
    ) -> Tensor:
        """Compute and record layer ``layer_id``'s keep-set through the policy object, one
        request at a time: the reference of the pass the server runs over every layer and
        request at once (``bacon_sglang.kernels.served``, called by ``patches/attention.py``).

        Args:
            q_window: ``[w, Hq, d]`` rotated queries of the last ``w`` prompt tokens.
            keys: ``[L, Hkv, d]`` rotated keys of the whole prompt (prefix included).
            scale: softmax scale (``1/sqrt(d)`` when None).

        Returns:
            ``[Hkv, kept]`` sorted positions in ``[P, L)``.
        """
        num_layers, num_kv_heads, _ = self.keep.shape
        attn = window_attention(q_window.transpose(0, 1), keys.transpose(0, 1), scale)
        keep = self.policy.keep(
            attn,
            num_kv_heads,
            self.kept - attn.shape[1],
            layer_id,
            num_layers,
            self.state,  # the policy appends its evidence itself
            first_candidate=self.prefix_len,
        )
        self.record(layer_id, keep)
        return keep

    def stats(self, page_size: int = 1, tree_tokens: int | None = None) -> dict:
        """The per-request report that goes into the response's ``meta_info``.

        ``freed_slots``: prompt slots the request no longer holds (back to the allocator or,
        with a copy, left in the radix tree as evictable cache); ``tree_tokens``: prompt
        tokens the radix tree holds for it afterwards (default: its shared prefix). With
        cells, also ``layout`` ("cells"), ``cells`` (C), ``cell_slots`` (m) and
        ``slot_equivalent`` (C / (L * Hkv)); with tensor parallelism ``cells`` counts every
        rank's (the model's, as one process would), ``cell_slots`` is what each rank holds,
        ``slot_equivalent`` the ranks' mean, and ``rank_cells`` lists each rank's ``C_r``."""
        freed_from = -(-self.new_len // page_size) * page_size
        report = {
            "policy": self.config.policy,
            "budget": self.config.budget,
            "prompt_tokens": self.prompt_len,
            "cached_tokens": self.cached_len,
            "shared_prefix_tokens": self.prefix_len,
            "kept_tokens": self.new_len,
            "evicted_tokens": self.evicted,
            "freed_slots": max(0, self.prompt_len - freed_from),
            "kv_source": "copy" if self.copy_slots is not None else "in_place",
            "copy_fallback": self.copy_fallback,
            "tree_tokens": self.prefix_len if tree_tokens is None else tree_tokens,
        }
        if self.cells:  # --kv-layout cells
            num_layers, num_kv_heads, _ = self.keep.shape
            ranks = len(self.rank_cells) or 1
            report["layout"] = "cells"
            report["cells"] = self.all_cells
            report["cell_slots"] = self.cell_slots
            report["slot_equivalent"] = self.all_cells / (num_layers * num_kv_heads * ranks)
            if self.rank_cells:
                report["rank_cells"] = list(self.rank_cells)
        return report


def plan_request(
    config: CompressionConfig,
    policy: Policy,
    prompt_len: int,
    prefix_len: int,
    slots: Tensor,
    num_layers: int,
    num_kv_heads: int,
    cached_len: int = 0,
) -> RequestCompression | None:
    """A :class:`RequestCompression` for a prompt of ``prompt_len`` tokens whose first
    ``prefix_len`` are kept whole, or None when this prompt is not compressed."""
    private = prompt_len - prefix_len
    if not config.should_compress(private):
        return None
    kept = config.kept_tokens(private)
    keep = torch.empty(num_layers, num_kv_heads, kept, dtype=torch.long, device=slots.device)
    return RequestCompression(
        config, policy, prompt_len, prefix_len, kept, slots, keep, cached_len=cached_len
    )
