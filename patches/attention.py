"""Hook on ``sglang.srt.layers.attention.base_attn_backend.AttentionBackend.forward``.

Every attention backend that does not override ``forward`` (torch_native, triton,
flashinfer, fa3, ...) goes through it, once per layer, with the rotated queries of the
forward's new tokens and the layer's KV already written to the pool. When the scheduler
has a compression plan for the current extend batch (``patches/scheduler.py``), after the
layer's attention (AFTER, so this forward's own attention saw the full KV):

1. each planned request's last ``w`` query rows are taken (and stashed for a request whose
   prompt continues in a later chunk);
2. for a request whose prompt ends in this forward, its keys for the whole prompt are read
   from the pool through its ``req_to_token`` snapshot, and the policy's keep-set for this
   layer is recorded;
3. after the last layer, the kept K/V of every layer are compacted, in one call
   (``bacon_sglang.kernels.compact``): in place, or into the fresh slots of a compressed
   copy (``--kv-prefix-cache full``), leaving the prompt's full KV for the radix tree. No
   later layer of this forward reads those layers.

``HybridAttnBackend`` calls its sub-backends' ``forward`` with keywords, hence the
unpacking below.
"""

from __future__ import annotations

import torch

from bacon_sglang import kernels
from bacon_sglang.paged import KVIndex
from bacon_sglang.patches import scheduler as scheduler_patch

_ARG_NAMES = ("q", "k", "v", "layer", "forward_batch")


def _arguments(args, kwargs) -> dict:
    bound = dict(zip(_ARG_NAMES, args, strict=False))
    bound.update({k: kwargs[k] for k in _ARG_NAMES if k in kwargs})
    return bound


def after_attention_forward(result, backend, *args, **kwargs):
    """AFTER ``AttentionBackend.forward(self, q, k, v, layer, forward_batch, ...)``."""
    runtime = scheduler_patch.RUNTIME
    if runtime is None or runtime.plan is None:
        return result
    a = _arguments(args, kwargs)
    layer, forward_batch = a["layer"], a["forward_batch"]
    if forward_batch.forward_mode.name != "EXTEND":
        return result
    q = a["q"].reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    compacting = False
    try:
        with torch.no_grad():
            score_layer(runtime, layer, q)
            if layer.layer_id == runtime.num_layers - 1:
                compacting = True
                compact_all(runtime)
    except Exception as exc:  # noqa: BLE001 - one request's failure must not end the server
        scheduler_patch.contain_forward_failure(runtime, exc, compacting)
    return result


def score_layer(runtime, layer, q: torch.Tensor) -> None:
    """Steps 1-2 for every planned request at this layer."""
    finishing: dict[tuple, list] = {}  # (policy, pool kernel) -> [(compression, q_window)]
    for entry in runtime.plan:
        if entry.window is None:  # keep-set known (a retracted request) or failed
            continue
        rows = q[entry.q_start : entry.q_start + entry.q_len]
        q_window = entry.window.add(layer.layer_id, rows)
        c = entry.compression
        if c is not None:
            key = (c.config.policy, c.config.pool_kernel)
            finishing.setdefault(key, []).append((c, q_window))
    keys_buffer = runtime.kv_pool.get_key_buffer(layer.layer_id)
    for group in finishing.values():
        score_group(layer, group, keys_buffer)


def score_group(layer, group: list, keys_buffer: torch.Tensor) -> None:
    """One batched :func:`bacon_sglang.kernels.keep_sets` call over the pool's K for the
    requests of ``group``: ``(RequestCompression, q_window [w_b, Hq, d])`` pairs sharing a
    policy and pool kernel, each with its own budget, window and shared prefix. Records
    each request's keep-set and, for the next layers' persistence term, its evidence."""
    compressions = [c for c, _ in group]
    windows = [q_window for _, q_window in group]
    config = compressions[0].config
    calibrated = config.policy == "bacon"
    layers_before = len(compressions[0].state.evidence)
    prev_evidence = [
        torch.cat([c.state.evidence[j].T for c in compressions]) for j in range(layers_before)
    ]
    window_lens = torch.tensor([w.shape[0] for w in windows])
    keep, evidence = kernels.keep_sets(
        torch.cat(windows),
        kernels.indptr(window_lens),  # on the CPU: keep_sets reads its lengths without a sync
        keys_buffer,
        KVIndex.from_rows([c.slots for c in compressions]),
        [c.kept - w for c, w in zip(compressions, window_lens.tolist(), strict=True)],
        [c.prefix_len for c in compressions],
        calibrated=calibrated,
        prev_evidence=prev_evidence,
        scale=layer.scaling,
        pool_kernel=config.pool_kernel,
    )
    for c, k, e in zip(compressions, keep, evidence, strict=True):
        c.record(layer.layer_id, k, e.T if calibrated else None)


def compact_all(runtime) -> None:
    """Step 3: move every compressed request's kept tokens, all layers, in one call (in
    place, or into its copy's slots)."""
    plans = [e.compression for e in runtime.plan if e.compression is not None]
    if not plans:
        return
    pool = runtime.kv_pool
    keep, keep_indptr = kernels.pack_keep([c.keep for c in plans])
    prefix_lens = torch.tensor([c.prefix_len for c in plans], device=keep.device)
    index = KVIndex.from_rows([c.slots for c in plans])
    dst = KVIndex.from_rows([c.destination() for c in plans])
    kernels.compact(pool.k_buffer, pool.v_buffer, index, prefix_lens, keep, keep_indptr, dst)


HOOKS = [
    (
        "sglang.srt.layers.attention.base_attn_backend.AttentionBackend.forward",
        after_attention_forward,
        "AFTER",
    ),
]
