"""Hook on ``sglang.srt.layers.attention.base_attn_backend.AttentionBackend.forward``.

Every attention backend that does not override ``forward`` (torch_native, triton,
flashinfer, fa3, ...) goes through it, once per layer, with the rotated queries of the
forward's new tokens and the layer's KV already written to the pool. When the scheduler
has a compression plan for the current extend batch (``patches/scheduler.py``), after the
layer's attention (AFTER, so this forward's own attention saw the full KV):

0. every layer: the rows of a retracted request's generated tokens (its prefill after the
   retraction recomputes them) get the attention output of their decode, over the kept KV
   only (:func:`replay`, ``bacon_sglang/retraction.py``);

1. every layer: the planned requests' last ``w`` query rows are copied into the forward's
   window buffer (:class:`bacon_sglang.compression.ForwardWindows`, allocated at layer 0:
   one copy per layer for the whole batch, no per-request work);
2. after the last layer, one pass: per group of finishing requests sharing a policy and pool
   kernel, the served policy's keep-set function (``bacon_sglang.kernels.served.SERVED``:
   window scores of every layer from the pool's K, calibration, one batched top-k), then
   the kept K/V of every layer and request are compacted in one launch
   (``bacon_sglang.kernels.compact``): in place, or into the fresh slots of a compressed copy
   (``--kv-prefix-cache full``), leaving the prompt's full KV for the radix tree. Middle
   chunks' rows are stashed for their request's last chunk. Nothing is read back from the
   device; the launches do not depend on the depth or the batch.

The buffer is dropped when the pass ends, and by the scheduler when the forward does
(``Runtime.forward``).

With ``--kv-layout cells`` (``patches/cells.py``'s state exists): at layer 0 of every extend
forward the batch's rows of the cell tables are cleared; step 2 gathers the kept K/V into
cells instead (``bacon_sglang.kernels.compact_cells``, which writes the finishing requests'
rows of the tables); and after every layer of a decode forward, the rows of requests that
hold cells are overwritten by attention over their cells (``bacon_sglang.kernels.
decode_attention``), a launch made whatever the batch, so a captured decode contains it.

``HybridAttnBackend`` calls its sub-backends' ``forward`` with keywords, hence the
unpacking below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bacon_sglang import kernels
from bacon_sglang.cells import CellKeep
from bacon_sglang.compression import ForwardWindows
from bacon_sglang.config import HEAD_SCORE_POLICIES, RAGGED_POLICIES
from bacon_sglang.kernels import served
from bacon_sglang.paged import KVIndex, pack_layers, to_device
from bacon_sglang.patches import cells
from bacon_sglang.patches import scheduler as scheduler_patch
from bacon_sglang.selection import KEEP_PAD

_ARG_NAMES = ("q", "k", "v", "layer", "forward_batch")


def _arguments(args, kwargs) -> dict:
    bound = dict(zip(_ARG_NAMES, args, strict=False))
    bound.update({k: kwargs[k] for k in _ARG_NAMES if k in kwargs})
    return bound


def after_attention_forward(result, backend, *args, **kwargs):
    """AFTER ``AttentionBackend.forward(self, q, k, v, layer, forward_batch, ...)``."""
    runtime, cell_state = scheduler_patch.RUNTIME, cells.CELLS
    if cell_state is None and (runtime is None or runtime.plan is None):
        return result
    a = _arguments(args, kwargs)
    layer, forward_batch = a["layer"], a["forward_batch"]
    mode = forward_batch.forward_mode
    if cell_state is not None and mode.is_decode():
        return decode_over_cells(cell_state, a["q"], result, layer, forward_batch)
    if mode.name != "EXTEND":
        return result
    if cell_state is not None and layer.layer_id == 0:
        cell_state.clear(forward_batch.req_pool_indices)
    if runtime is None or runtime.plan is None:
        return result
    q = a["q"].reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    try:
        with torch.no_grad():
            if layer.layer_id == 0 or runtime.forward is None:
                scored = [e for e in runtime.plan if e.window is not None]
                runtime.forward = ForwardWindows(scored, runtime.num_layers, q)
            runtime.forward.add(layer.layer_id, q)
            replayed = [e.recomputed for e in runtime.plan if e.recomputed is not None]
            if replayed:
                result = replay(runtime, replayed, q, layer, result)
            if layer.layer_id == runtime.num_layers - 1:
                compress(runtime, runtime.forward, layer.scaling)
                runtime.forward = None  # on a failure, the handler below drops it
    except Exception as exc:  # noqa: BLE001 - one request's failure must not end the server
        compacting, runtime.forward, runtime.compacting = runtime.compacting, None, False
        scheduler_patch.contain_forward_failure(runtime, exc, compacting)
    return result


def decode_over_cells(cell_state, q: Tensor, out: Tensor, layer, forward_batch) -> Tensor:
    """A decode forward's attention output ``out`` ``[bs, Hq * d_v]`` with the rows of
    requests that hold cells overwritten in place by their attention over their cells and
    ordinary tokens (:meth:`bacon_sglang.patches.cells.CellState.decode`); ``q`` the
    layer's queries (``[bs, Hq * d]`` or ``[bs, Hq, d]``). Launched for every decode batch:
    rows without cells are left as SGLang computed them."""
    with torch.no_grad():
        cell_state.decode(
            q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
            out.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            layer,
            forward_batch,
        )
    return out


def replay(runtime, replayed, q: torch.Tensor, layer, out: torch.Tensor) -> torch.Tensor:
    """The layer's attention output ``out`` with the rows of retracted requests' generated
    tokens replaced by their attention over the kept KV only, as their decode computed it
    (``bacon_sglang/retraction.py``)."""
    pool = runtime.kv_pool
    k, v = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
    o = out.reshape(-1, layer.tp_q_head_num, layer.v_head_dim)
    for rows in replayed:
        attn = rows.attend(layer.layer_id, q, k, v, layer.scaling, layer.logit_cap or 0.0)
        o = o.index_copy(0, rows.rows, attn.to(o.dtype))
    return o.reshape(out.shape)


def compress(runtime, windows: ForwardWindows, scale: float) -> None:
    """The pass after the last layer: keep-sets of every finishing request, every layer
    (one served-policy call per policy group; a retracted request's are known already),
    then one compaction of them all. Ragged keep-sets (``--kv-layout cells`` only) go to
    cell order on the device (:meth:`CellKeep.from_padded`), after the uniform ones."""
    groups = windows.finish()
    known = [e.compression for e in runtime.plan if e.window is None and e.compression]
    if not groups and not known:
        return
    pool = runtime.kv_pool
    keeps, widths, plans, ragged, pieces = [], [], [], [], []
    for compressions, q, window_lens in groups:
        config = compressions[0].config
        batch = served.PrefillBatch(
            q, window_lens, pool.k_buffer, KVIndex.from_rows([c.slots for c in compressions]),
            [c.kept - w for c, w in zip(compressions, window_lens, strict=True)],
            [c.prefix_len for c in compressions], scale, config.pool_kernel,
            head_scores=runtime.head_scores if config.policy in HEAD_SCORE_POLICIES else (),
            kv_heads=runtime.kv_heads,
        )  # fmt: skip
        sets = served.keep_sets(config.policy, batch)
        if config.policy in RAGGED_POLICIES:
            for b, c in enumerate(compressions):  # [L, Hkv, W] padded: report, --kv-debug-dir
                c.keep = sets.keep[:, b]
            pieces.append(
                CellKeep.from_padded(sets.keep, sets.counts, [c.cells for c in compressions])
            )
            ragged += compressions
            continue
        keeps.append(sets.keep)
        widths.append([c.kept for c in compressions])
        plans += compressions
    for c in known:  # prefilled again after a retraction: the keep-set its first prefill chose
        if c.config.policy in RAGGED_POLICIES:
            keep = c.keep.unsqueeze(1)  # [L, 1, Hkv, W]
            pieces.append(CellKeep.from_padded(keep, (keep != KEEP_PAD).sum(-1), [c.cells]))
            ragged.append(c)
            continue
        keeps.append(c.keep.unsqueeze(1))
        widths.append([c.kept])
        plans.append(c)
    keep = keep_indptr = None
    if plans:
        keep, keep_indptr = pack_layers(keeps, widths)
        at = 0
        for c in plans:  # views, for the report and --kv-debug-dir
            c.keep, at = keep[..., at : at + c.kept], at + c.kept
        if plans[0].cells:  # the uniform ones first, as in ``plans``
            pieces.insert(0, CellKeep.uniform([c.keep for c in plans]))
    plans += ragged
    prefix_lens = to_device([c.prefix_len for c in plans], pool.k_buffer[0].device)
    index = KVIndex.from_rows([c.slots for c in plans])
    dst = KVIndex.from_rows([c.destination() for c in plans])
    runtime.compacting = True  # from here on, a failure may leave KV half moved
    if plans[0].cells:  # --kv-layout cells: the server's, so every request's or none
        compact_into_cells(runtime, plans, index, prefix_lens, dst, CellKeep.cat(pieces))
    else:
        kernels.compact(pool.k_buffer, pool.v_buffer, index, prefix_lens, keep, keep_indptr, dst)
    runtime.compacting = False


def compact_into_cells(
    runtime, plans: list, index: KVIndex, prefix_lens: Tensor, dst: KVIndex, keep: CellKeep
) -> None:
    """``--kv-layout cells``: every planned request's kept K/V (``keep``, in cell order, the
    requests as ``plans``) gathered into its cell slots (``dst``: the row's ``[0, S)`` then its
    ``m`` cell slots) and its row of the cell tables written, in one launch
    (``bacon_sglang.kernels.compact_cells``); nothing is read back."""
    pool = runtime.kv_pool
    rows = {id(e.compression): e.req.kv.req_pool_idx for e in runtime.plan if e.compression}
    req_pool_indices = to_device([rows[id(c)] for c in plans], prefix_lens.device)
    kernels.compact_cells(
        pool.k_buffer, pool.v_buffer, index, prefix_lens, keep, dst, cells.CELLS.tables,
        req_pool_indices,
    )  # fmt: skip


HOOKS = [
    (
        "sglang.srt.layers.attention.base_attn_backend.AttentionBackend.forward",
        after_attention_forward,
        "AFTER",
    ),
]
