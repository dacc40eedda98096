"""What ``--kv-layout cells`` refuses at launch (``patches/cells.problems``, listed by
``patches/scheduler.unsupported``, which ``Scheduler.__init__``'s hook raises on): SGLang's
own server-argument resolution, attention-backend and layer classes, a stand-in scheduler
(no model is loaded)."""

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
