"""Scores and compaction on SGLang's paged KV pool: the entry points the integration calls.

Each function has one signature and two backends:

- ``"triton"``: the kernels of this folder (``score_kernels.py``, ``calibration.py``,
  ``compaction.py``); runs on CUDA tensors, and on CPU tensors when the kernels were defined
  under ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run them).
- ``"torch"``: the references of :mod:`bacon_sglang.paged`, per request in plain PyTorch.

``backend=None`` picks ``"triton"`` for CUDA tensors or when the kernels are interpreted, else
``"torch"`` (production on CPU). Triton decides at import time: ``TRITON_INTERPRET=1`` must be
set before triton is first imported (``import sglang`` imports it) and the kernel modules,
imported here on first use, then hold interpreted functions. This package reads no
environment variable itself; :func:`interpreted` inspects the kernels.

What the server runs at the end of a prefill is :mod:`bacon_sglang.kernels.served`: one pass
over every layer and finishing request (``SERVED[policy]``, then :func:`compact`). The
functions here are its per-layer building blocks and the path it replaced::

    window_scores(q, ...)  -> WindowScores  (column means of the window attention)
    calibrate(scores, ...) -> Calibrated    (B, E, S per candidate; .base for SnapKV)
    ... keep-set per head (bacon_sglang.selection) ...
    compact(k_buffers, v_buffers, ...)      (all layers at once, after the last layer)
      or compact_cells(...)                 (into head-granular cells, --kv-layout cells:
                                             patches/head_granular.md)

:func:`keep_sets` chains the first three for one layer of a batch (the per-layer path, kept
as a reference for the tests and ``benchmarks/compression_cost.py``); :func:`compact` runs
once after the last layer.

:func:`decode_attention` is the decode side of head-granular KV (``patches/head_granular.md``):
attention of one layer of a decode batch over each request's cells and ordinary tokens (the
kernel is ``cell_decode.py``; the entry point does not take the module's name, which importing
the module would rebind on this package).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from bacon_sglang import cells, paged, scoring
from bacon_sglang.cells import CellIndex, CellKeep, CellTables, cell_decode_batch, check_cells
from bacon_sglang.paged import (
    Calibrated,
    KVIndex,
    WindowScores,
    check_keep,
    host_offsets,
    indptr,
    pack_keep,
    segments,
)
from bacon_sglang.selection import select_keep_packed

if TYPE_CHECKING:  # the kernel modules are imported on first use (module docstring)
    from .cell_decode import LayerBuffers, Scratch

__all__ = [
    "Backend",
    "Calibrated",
    "CellKeep",
    "CellTables",
    "CellIndex",
    "KVIndex",
    "WindowScores",
    "calibrate",
    "check_cells",
    "check_keep",
    "compact",
    "compact_cells",
    "decode_attention",
    "indptr",
    "interpreted",
    "keep_sets",
    "pack_keep",
    "pick_backend",
    "window_scores",
]

Backend = Literal["triton", "torch"]


def _kernel_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (so on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel_module("compaction")._compact_kernel, InterpretedFunction)


def pick_backend(tensor: Tensor, backend: Backend | None = None) -> Backend:
    """The backend for data on ``tensor``'s device: ``backend`` if given, else ``"triton"``
    on CUDA or under the interpreter, ``"torch"`` otherwise."""
    if backend is not None:
        if backend not in ("triton", "torch"):
            raise ValueError(f"unknown backend {backend!r}")
        if backend == "triton" and not tensor.is_cuda and not interpreted():
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
        return backend
    return "triton" if tensor.is_cuda or interpreted() else "torch"


def window_scores(
    q: Tensor,
    q_indptr: Tensor,
    k_buffer: Tensor,
    index: KVIndex,
    scale: float | None = None,
    lse: Tensor | None = None,
    *,
    backend: Backend | None = None,
) -> WindowScores:
    """Column scores of the window attention of a batch, from one layer's K in the pool.

    Args:
        q: ``[sum_w, Hq, d]`` window queries (after RoPE), the last ``w_b`` prompt positions
            of each request, packed.
        q_indptr: ``[B + 1]`` rows of ``q`` per request, ``1 <= w_b <= n_b``.
        k_buffer: ``[num_slots, Hkv, d]`` the layer's K (NHD, as ``MHATokenToKVPool``).
        index: where each request's ``n_b`` prompt keys are (:class:`KVIndex`).
        scale: logit scale, ``1 / sqrt(d)`` when ``None``.
        lse: optional ``[sum_w, Hq]`` natural-log log-sum-exp of the window rows' logits over
            their causal keys (from the prefill attention); the kernel then reads K once.

    Returns:
        :class:`WindowScores`: ``mean``, ``last`` ``[sum_n, Hkv]`` float32 and ``indptr``.
    """
    if pick_backend(q, backend) == "torch":
        return paged.window_scores(q, q_indptr, k_buffer, index, scale, lse)
    return _kernel_module("score_kernels").window_scores(q, q_indptr, k_buffer, index, scale, lse)


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
    backend: Backend | None = None,
) -> Calibrated:
    """BACON steps 1-9 (1-D coherence) for a batch: see :func:`bacon_sglang.paged.calibrate`.

    Args:
        window_scores: this layer's :func:`window_scores`.
        q_indptr: ``[B + 1]`` window rows per request.
        candidates: ``K`` per request (or one int): the top-``2K`` region.
        prev_evidence: earlier layers' ``Calibrated.evidence`` of this batch, oldest first.
        first_candidate: per request, candidates ``[0, f)`` (a shared prefix) stay out of the
            top-``2K`` statistics.

    Returns:
        :class:`Calibrated`: ``scores``, ``evidence``, ``base`` ``[sum_T, Hkv]`` float32,
        ``lam``, ``rho`` ``[B, Hkv]``, ``indptr`` ``[B + 1]``.
    """
    options = dict(
        pool_kernel=pool_kernel, coherence_kernel=coherence_kernel, history=history,
        scale=scale, region=region, eps=eps,
    )  # fmt: skip
    args = (window_scores, q_indptr, candidates, prev_evidence, first_candidate)
    if pick_backend(window_scores.mean, backend) == "torch":
        return paged.calibrate(*args, **options)
    return _kernel_module("calibration").calibrate(*args, **options)


def keep_sets(
    q: Tensor,
    q_indptr: Tensor,
    k_buffer: Tensor,
    index: KVIndex,
    candidates: Sequence[int],
    prefix_lens: Sequence[int],
    *,
    calibrated: bool,
    prev_evidence: Sequence[Tensor] = (),
    scale: float | None = None,
    pool_kernel: int = scoring.POOL_KERNEL,
    backend: Backend | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """One layer's keep-sets for a batch of requests: SnapKV (``calibrated=False``, the
    pooled window score ``B``) or BACON over SnapKV (the calibrated ``S``), one ``K`` per head.
    The per-layer path (4 launches and about 140 operations per layer) that the served pass
    (:mod:`bacon_sglang.kernels.served`, all layers at once) replaced.

    Args:
        q, q_indptr, k_buffer, index, scale: as :func:`window_scores`. Nothing is read back
            from the GPU when ``q_indptr`` is on the CPU and ``index`` knows its lengths
            (:meth:`KVIndex.from_rows`): the call then queues its work and returns.
        candidates: ``K_b`` per request (:mod:`bacon_sglang.config`).
        prefix_lens: ``P_b``: positions ``[0, P_b)`` (a shared prefix) are never selected.
        prev_evidence: earlier layers' evidence of this batch (second return value), oldest
            first.

    Returns:
        ``keep``: per request ``[Hkv, min(K_b, T_b - P_b) + w_b]`` sorted positions, as
        :func:`bacon_sglang.selection.select_keep`; ``evidence``: per request ``[T_b, Hkv]``
        this layer's ``E`` (concatenated, the next layers' ``prev_evidence``).
    """
    q_indptr = q_indptr.cpu()  # free when given on the CPU, as the integration does
    scores = window_scores(q, q_indptr, k_buffer, index, scale, backend=backend)
    cal = calibrate(
        scores, q_indptr, candidates, prev_evidence, prefix_lens,
        pool_kernel=pool_kernel, backend=backend,
    )  # fmt: skip
    keep = select_keep_packed(
        cal.scores if calibrated else cal.base, cal.lengths, candidates,
        q_indptr.diff().tolist(), prefix_lens,
    )  # fmt: skip
    return keep, segments(cal.evidence, host_offsets(cal.lengths))


def compact(
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: KVIndex,
    prefix_lens: Tensor,
    keep: Tensor,
    keep_indptr: Tensor,
    dst: KVIndex | None = None,
    *,
    check: bool = False,
    backend: Backend | None = None,
) -> None:
    """Move each request's kept tokens, per layer and KV head, to the front of its private
    slots, in place, or into ``dst``'s slots (ranges and contract:
    :func:`bacon_sglang.paged.compact`).

    Args:
        k_buffers, v_buffers: per layer ``[num_slots, Hkv, d]`` (e.g. ``pool.k_buffer``).
        index: the requests' rows: token-level ``req_to_token`` rows or row snapshots
            (:meth:`KVIndex.from_rows`), or page tables.
        prefix_lens: ``[R]`` shared prefix length ``P_r`` (never touched).
        keep: ``[num_layers, Hkv, sum_B]`` positions, per request strictly increasing in
            ``[P_r, L_r)`` (:func:`pack_keep` packs per-request ``[num_layers, Hkv, B_r]``).
        keep_indptr: ``[R + 1]``.
        dst: destination rows, ``[>= P_r + B_r]`` positions each (default: ``index``).
        check: verify the precondition on ``keep`` first (syncs; the torch backend always
            checks).
    """
    if pick_backend(k_buffers[0], backend) == "torch":
        paged.compact(k_buffers, v_buffers, index, prefix_lens, keep, keep_indptr, dst)
        return
    if check:
        check_keep(index, prefix_lens, keep, keep_indptr)
    _kernel_module("compaction").compact(
        k_buffers, v_buffers, index, prefix_lens, keep, keep_indptr, dst
    )


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
    check: bool = False,
    backend: Backend | None = None,
) -> None:
    """Gather each request's kept tokens, every layer and KV head, into its cells (fresh
    slots, each holding one token of every (layer, KV head) pair) and write its row of the
    decode's ``tables`` (layout and contract: :func:`bacon_sglang.cells.compact_cells`).

    Args:
        k_buffers, v_buffers: per layer ``[num_slots, Hkv, d]`` (e.g. ``pool.k_buffer``).
        index: the requests' prompt rows.
        prefix_lens: ``[R]`` ``P_r``: the row position of the first cell slot.
        keep: ``[sum_C]`` kept positions in cell order, ``counts [R, L, Hkv]``, ``indptr``
            (:meth:`CellKeep.pack` from the policies' ``KEEP_PAD``-padded keep-sets).
        dst: rows ``[0, P_r)`` then the ``m_r`` cell slots, none of them a source.
        tables: ``meta [R_pool + 1, 2]``, ``off [R_pool + 1, L * Hkv + 1]`` int32.
        req_pool_indices: ``[R]`` each request's row of ``tables``.
        check: verify the precondition first (syncs; the torch backend always checks).
    """
    args = (k_buffers, v_buffers, index, prefix_lens, keep, dst, tables, req_pool_indices)
    if pick_backend(k_buffers[0], backend) == "torch":
        cells.compact_cells(*args)
        return
    if check:
        check_cells(index, prefix_lens, keep, dst)
    _kernel_module("compaction").compact_cells(*args)


def decode_attention(
    q: Tensor,
    o: Tensor,
    layer: int,
    k_buffers: Sequence[Tensor],
    v_buffers: Sequence[Tensor],
    index: CellIndex,
    scale: float | None = None,
    *,
    only_cells: bool = False,
    buffers: LayerBuffers | None = None,
    work: Scratch | None = None,
    backend: Backend | None = None,
) -> None:
    """Decode attention of ``layer`` for a batch whose rows may hold head-granular cells,
    written into ``o`` (contract: :func:`bacon_sglang.cells.cell_decode_batch`).

    Args:
        q: ``[bs, Hq, d]`` the new tokens' queries; o: ``[bs, Hq, d_v]`` (written).
        k_buffers, v_buffers: per layer ``[num_slots, H, d]`` (e.g. ``pool.k_buffer``).
        index: the batch's ``req_to_token`` rows and cell tables (:class:`CellIndex`; a row
            with ``m == 0`` is dense decode over ``row[0:seq_len]``).
        only_cells: leave rows with ``m == 0`` untouched (what SGLang's decode computed).
        buffers, work: for the Triton kernel, :func:`.cell_decode.layer_buffers` of the
            buffers and a :func:`.cell_decode.scratch` made once (CUDA-graph capture needs
            both); built per call when None.
    """
    if pick_backend(q, backend) == "torch":
        cell_decode_batch(q, o, layer, k_buffers, v_buffers, index, scale, only_cells=only_cells)
        return
    kernel = _kernel_module("cell_decode")
    buffers = buffers or kernel.layer_buffers(k_buffers, v_buffers)
    kernel.cell_decode(q, o, layer, buffers, index, scale, only_cells=only_cells, work=work)
