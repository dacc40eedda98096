"""Head-granular compressed KV in the server (``--kv-layout cells``): the cell tables and the
decode over cells (design: ``patches/head_granular.md``, sections 4.2, 4.4 and 4.6).

* ``ModelRunner.alloc_memory_pool`` (AFTER): with ``--kv-layout cells`` and a policy on,
  builds :data:`CELLS` from the pool SGLang has just allocated: the zeroed tables
  ``cell_meta [R + 1, 2]`` and ``cell_off [R + 1, L * H + 1]`` int32, one row per
  ``req_pool_idx`` (:class:`bacon_sglang.cells.CellTables`), and what the decode kernel keeps
  across calls (the layer offset table, the split scratch). It runs before SGLang builds its
  attention backends and captures its graphs (``Scheduler.init_memory_pools``, then
  ``init_all_attention_backends``, ``init_all_cuda_graphs``), so a captured decode already
  contains the decode over cells.

No hook here touches a request. ``patches/attention.py`` uses the state, per forward:

    extend, layer 0     cell_meta[req_pool_indices] = 0: a row reused by a new request, or
                        prefilled again, is never read as cells  (:meth:`CellState.clear`)
    extend, last layer  finishing requests compacted into their cell slots, their rows of
                        the tables written (``kernels.compact_cells``)
    decode, each layer  rows with m > 0: SGLang's output replaced by attention over the
                        request's cells and ordinary tokens  (:meth:`CellState.decode`)

The decode launch depends on nothing but the batch's shape: no branch on data, nothing read
back, nothing allocated (the state exists before graph capture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from bacon_sglang import kernels
from bacon_sglang.cells import CellIndex, CellTables
from bacon_sglang.patches.server_args import config_of

logger = logging.getLogger(__name__)


@dataclass
class CellState:
    """The cell tables of one scheduler process and the pool they index.

    Attributes:
        tables: ``meta [R + 1, 2]`` (S, m) and ``off [R + 1, L * H + 1]`` int32 per
            ``req_pool_idx``; row 0 (SGLang's padding row) stays 0.
        req_to_token: SGLang's ``[R + 1, max_context]`` int32 rows of slots.
        k_buffers, v_buffers: the pool's per-layer ``[slots, H, d]`` K / V.
        buffers, work: the Triton kernel's layer table and ``[max_bs, NSPLIT, Hq, d_v]``
            scratch, made once (None where the PyTorch reference runs: CPU, not interpreted).
    """

    tables: CellTables
    req_to_token: Tensor
    k_buffers: list[Tensor]
    v_buffers: list[Tensor]
    buffers: object | None = None
    work: object | None = None

    def clear(self, req_pool_indices: Tensor) -> None:
        """``cell_meta[req_pool_indices] = 0``: those rows hold no cells (yet)."""
        self.tables.meta.index_fill_(0, req_pool_indices.long(), 0)

    def decode(self, q: Tensor, o: Tensor, layer, forward_batch) -> None:
        """Overwrite the rows of ``o`` ``[bs, Hq, d_v]`` whose request holds cells with layer
        ``layer``'s attention of ``q`` ``[bs, Hq, d]`` over its cells and ordinary tokens;
        the other rows stay as SGLang computed them."""
        index = CellIndex(
            self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
            self.tables.meta, self.tables.off,
        )  # fmt: skip
        kernels.decode_attention(
            q, o, layer.layer_id, self.k_buffers, self.v_buffers, index, layer.scaling,
            only_cells=True, buffers=self.buffers, work=self.work,
        )  # fmt: skip


CELLS: CellState | None = None


def build(req_to_token_pool, kv_pool, num_q_heads: int) -> CellState:
    """The state for SGLang's ``req_to_token_pool`` and ``MHATokenToKVPool`` ``kv_pool``:
    zeroed tables of ``R + 1`` rows and, for the Triton kernel, its layer table and a
    scratch for decode batches of up to ``R + 1`` rows (every decode batch, captured or
    not: each row is a request's) of ``num_q_heads`` query heads."""
    k_buffers, v_buffers = list(kv_pool.k_buffer), list(kv_pool.v_buffer)
    device = k_buffers[0].device
    rows = req_to_token_pool.req_to_token.shape[0]
    tables = CellTables.zeros(rows, len(k_buffers), k_buffers[0].shape[1], device)
    state = CellState(tables, req_to_token_pool.req_to_token, k_buffers, v_buffers)
    if kernels.pick_backend(k_buffers[0]) == "triton":
        from bacon_sglang.kernels.cell_decode import layer_buffers, scratch

        state.buffers = layer_buffers(k_buffers, v_buffers)
        state.work = scratch(rows, num_q_heads, v_buffers[0].shape[2], device)
    return state


def after_alloc_memory_pool(result, model_runner, *args, **kwargs):
    """AFTER ``ModelRunner.alloc_memory_pool(self, ...)``: builds :data:`CELLS` when the
    config asks for cells (the target model's runner only; anything else about the pool
    that cells cannot serve is refused by the scheduler hook right after)."""
    global CELLS
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if getattr(model_runner, "is_draft_worker", False):
        return result
    CELLS = None
    config = config_of(model_runner.server_args)
    pool = model_runner.token_to_kv_pool
    if not (config.enabled and config.layout == "cells" and type(pool) is MHATokenToKVPool):
        return result
    layers = attention_layers(model_runner.model)
    CELLS = build(model_runner.req_to_token_pool, pool, layers[0].tp_q_head_num)
    logger.info(
        "bacon-sglang: head-granular KV (--kv-layout cells): tables for %d rows, %d layers x "
        "%d KV heads; decode by the %s", CELLS.tables.meta.shape[0], len(pool.k_buffer),
        pool.head_num, "Triton kernel" if CELLS.buffers is not None else "PyTorch reference",
    )  # fmt: skip
    return result


def attention_layers(model: torch.nn.Module) -> list:
    """The model's ``RadixAttention`` layers, in order."""
    from sglang.srt.layers.radix_attention import RadixAttention

    return [m for m in model.modules() if isinstance(m, RadixAttention)]


# What the decode over cells is tested with (patches/README.md, --kv-layout cells).
ATTENTION_BACKENDS = ("TorchNativeAttnBackend", "TritonAttnBackend")


def problems(scheduler, kv_pool) -> list[str]:
    """What ``--kv-layout cells`` cannot serve in ``scheduler`` (empty when all is fine),
    one short reason each (``patches/scheduler.unsupported`` lists them at launch)."""
    server_args = scheduler.server_args
    model_runner = scheduler.tp_worker.model_runner
    found = []
    backend = type(model_runner.attn_backend).__name__
    if backend not in ATTENTION_BACKENDS:
        found.append(
            f"attention backend {backend} (the decode over cells is tested with "
            "torch_native and triton only)"
        )
    if kv_pool.dtype.itemsize < 2:
        found.append(
            f"a {kv_pool.dtype} KV cache (--kv-cache-dtype: a layer's scale would have to "
            "follow its cells)"
        )
    found += model_problems(model_runner.model)
    if getattr(server_args, "enable_torch_compile", False):
        found.append("--enable-torch-compile (the decode over cells is untested compiled)")
    if getattr(server_args, "enable_memory_saver", False) or kv_pool.post_capture_active:
        found.append(
            "--enable-memory-saver or a KV pool backed after graph capture (the cell tables "
            "hold the pool's buffers)"
        )
    if CELLS is None:
        found.append("a pool the cell tables were not built for (see the log)")
    return found


def model_problems(model: torch.nn.Module) -> list[str]:
    """The model's attention features the decode over cells does not compute: logit
    soft-capping, sliding windows, attention sinks."""
    layers = attention_layers(model)
    found = []
    if any((layer.logit_cap or 0) > 0 for layer in layers):
        found.append("attention logit soft-capping")
    if any((layer.sliding_window_size or -1) > -1 for layer in layers):
        found.append("sliding-window attention")
    if any(
        getattr(m, name, None) is not None
        for m in model.modules()
        for name in ("sinks", "attention_sink_bias")
    ):
        found.append("attention sinks")
    return found


HOOKS = [
    (
        "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool",
        after_alloc_memory_pool,
        "AFTER",
    ),
]
