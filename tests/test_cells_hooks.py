"""The hooks of ``--kv-layout cells`` without an engine: what it refuses at launch
(``patches/cells.problems``, listed by ``patches/scheduler.unsupported``, which
``Scheduler.__init__``'s hook raises on; SGLang's own server-argument resolution,
attention-backend and layer classes, a stand-in scheduler, no model loaded), and the
attention hook's two duties outside the compaction: clear the rows of an extend batch,
overwrite the decode rows of requests holding cells."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

BACKENDS = {
    "torch_native": ("torch_native_backend", "TorchNativeAttnBackend"),
    "triton": ("triton_backend", "TritonAttnBackend"),
    "flashinfer": ("flashinfer_backend", "FlashInferAttnBackend"),
}


@pytest.fixture(scope="module")
def parse(sglang_hooks, tiny_model_path):
    """Resolved server arguments of a cells server (plus ``flags``), as a scheduler gets them."""
    from sglang.srt.server_args import prepare_server_args

    from bacon_sglang.server import CPU_ENGINE_ARGS

    def resolved(*flags):
        argv = ["--model-path", str(tiny_model_path), *CPU_ENGINE_ARGS]
        args = prepare_server_args([*argv, "--kv-policy", "bacon", "--kv-layout", "cells", *flags])
        args.resolve_once()
        return args

    return resolved


def attention(**kwargs) -> torch.nn.Module:
    """A model of one SGLang attention layer (the tiny model's shapes)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    model = torch.nn.Module()
    model.attn = RadixAttention(4, 64, 0.125, 2, 0, **kwargs)
    return model


def stand_in(server_args, backend="torch_native", model=None, dtype=torch.float32):
    """A scheduler (what ``unsupported`` reads of it) and its ``MHATokenToKVPool``."""
    import importlib

    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    module, name = BACKENDS[backend]
    cls = getattr(importlib.import_module(f"sglang.srt.layers.attention.{module}"), name)
    model_runner = SimpleNamespace(attn_backend=object.__new__(cls), model=model or attention())
    tree_cache = SimpleNamespace(supports_swa=lambda: False, supports_mamba=lambda: False)
    scheduler = SimpleNamespace(
        server_args=server_args,
        tp_worker=SimpleNamespace(model_runner=model_runner),
        tree_cache=tree_cache,
    )
    pool = object.__new__(MHATokenToKVPool)
    pool.dtype = dtype
    return scheduler, pool


@pytest.fixture
def cells_built(monkeypatch):
    """The cell tables as ``ModelRunner.alloc_memory_pool``'s hook leaves them."""
    from bacon_sglang.patches import cells

    monkeypatch.setattr(cells, "CELLS", object())


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_tested_setups_are_accepted(parse, cells_built, backend):
    from bacon_sglang.patches.scheduler import unsupported

    assert unsupported(*stand_in(parse(), backend)) == []


class Sinks(torch.nn.Module):
    """An attention with sinks (gpt-oss keeps them as ``self.sinks``)."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.zeros(4))


@pytest.mark.parametrize(
    ("flags", "setup", "refusal"),
    [
        ((), {"backend": "flashinfer"}, "attention backend FlashInferAttnBackend (the decode "
         "over cells is tested with torch_native and triton only)"),
        ((), {"dtype": torch.float8_e4m3fn}, "a torch.float8_e4m3fn KV cache (--kv-cache-dtype: "
         "a layer's scale would have to follow its cells)"),
        ((), {"model": attention(logit_cap=30.0)}, "attention logit soft-capping"),
        ((), {"model": attention(sliding_window_size=4096)}, "sliding-window attention"),
        ((), {"model": Sinks()}, "attention sinks"),
        (("--enable-torch-compile",), {}, "--enable-torch-compile (the decode over cells is "
         "untested compiled)"),
        (("--enable-memory-saver",), {}, "--enable-memory-saver or a KV pool backed after graph "
         "capture (the cell tables hold the pool's buffers)"),
    ],
)  # fmt: skip
def test_what_cells_cannot_serve_is_refused_with_one_line(
    parse, cells_built, flags, setup, refusal
):
    from bacon_sglang.patches.scheduler import unsupported

    assert unsupported(*stand_in(parse(*flags), **setup)) == [refusal]


def test_a_pool_without_cell_tables_is_refused(parse):
    from bacon_sglang.patches import cells
    from bacon_sglang.patches.scheduler import unsupported

    assert cells.CELLS is None  # no alloc_memory_pool ran in this process
    assert unsupported(*stand_in(parse())) == [
        "a pool the cell tables were not built for (see the log)"
    ]


def test_the_slots_layout_refuses_none_of_it(parse, tiny_model_path):
    """The default layout keeps today's refusals only: FlashInfer and FP8 KV are served."""
    from sglang.srt.server_args import prepare_server_args

    from bacon_sglang.patches.scheduler import unsupported
    from bacon_sglang.server import CPU_ENGINE_ARGS

    args = prepare_server_args(["--model-path", str(tiny_model_path), *CPU_ENGINE_ARGS])
    args.resolve_once()
    assert unsupported(*stand_in(args, "flashinfer", dtype=torch.float8_e4m3fn)) == []


def test_attention_hook_clears_extend_rows_and_overwrites_cell_rows(
    sglang_hooks, kernel_device, monkeypatch
):
    """A decode batch of a row holding cells, a dense row and SGLang's padding row: after
    the layer's attention the first row is attention over its cells and ordinary tokens
    (the reference, ``cells.cell_decode_batch``), the others stay as SGLang wrote them; an
    extend batch at layer 0 clears its rows of ``cell_meta``, and only those."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from bacon_sglang.cells import CellIndex, cell_decode_batch
    from bacon_sglang.patches import attention, cells
    from bacon_sglang.patches import scheduler as scheduler_patch

    gen = torch.Generator().manual_seed(0)
    layers, heads, q_heads, dim, slots = 4, 2, 4, 64, 64
    pool = SimpleNamespace(
        k_buffer=[torch.randn(slots, heads, dim, generator=gen) for _ in range(layers)],
        v_buffer=[torch.randn(slots, heads, dim, generator=gen) for _ in range(layers)],
    )
    rows = SimpleNamespace(req_to_token=torch.zeros(4, 32, dtype=torch.int32))
    rows.req_to_token[1, :20] = torch.randperm(slots - 1, generator=gen)[:20] + 1
    rows.req_to_token[2, :12] = torch.arange(40, 52)
    state = cells.build(rows, pool, q_heads)
    # row 1: 2 shared text tokens, 3 cell slots (24 cells: 3 per (layer, head)), 5 generated
    state.tables.meta[1] = torch.tensor([2, 3], dtype=torch.int32)
    state.tables.off[1] = torch.arange(layers * heads + 1, dtype=torch.int32) * 3
    monkeypatch.setattr(cells, "CELLS", state)
    monkeypatch.setattr(scheduler_patch, "RUNTIME", None)

    layer = SimpleNamespace(layer_id=1, tp_q_head_num=q_heads, qk_head_dim=dim, v_head_dim=dim,
                            scaling=dim**-0.5)  # fmt: skip
    batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        req_pool_indices=torch.tensor([1, 2, 0]),
        seq_lens=torch.tensor([10, 12, 1]),
    )
    q = torch.randn(3, q_heads * dim, generator=gen)
    out = torch.randn(3, q_heads * dim, generator=gen)
    sglang_wrote = out.clone()
    result = attention.after_attention_forward(out, object(), q, None, None, layer, batch)
    assert result is out
    expected = sglang_wrote.view(3, q_heads, dim).clone()
    index = CellIndex(rows.req_to_token, batch.req_pool_indices, batch.seq_lens,
                      *state.tables)  # fmt: skip
    cell_decode_batch(q.view(3, q_heads, dim), expected, 1, pool.k_buffer, pool.v_buffer, index,
                      dim**-0.5, only_cells=True)  # fmt: skip
    torch.testing.assert_close(out.view(3, q_heads, dim), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1:], sglang_wrote[1:])
    assert not torch.equal(out[0], sglang_wrote[0])

    state.tables.meta[3] = torch.tensor([0, 7], dtype=torch.int32)
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.tensor([1]))
    layer.layer_id = 0
    attention.after_attention_forward(out, object(), q, None, None, layer, extend)
    assert state.tables.meta[:, 1].tolist() == [0, 0, 0, 7]
