"""Launch-time refusals of the execution paths compression cannot run on
(``patches/cuda_graph.py``): SGLang's real server-argument resolution and attention-backend
classes, a stand-in scheduler (no model is loaded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bacon_sglang.patches import cuda_graph


@pytest.fixture(scope="module")
def parse(tiny_model_path):
    """Server arguments as a scheduler receives them: parsed and resolved by SGLang (the
    model's config is read; nothing is loaded). The Triton attention backend: SGLang turns
    every graph off for torch_native."""
    from sglang.srt.server_args import prepare_server_args

    from bacon_sglang.server import CPU_ENGINE_ARGS

    def resolved(*flags):
        cpu = [a for a in CPU_ENGINE_ARGS if a != "--disable-cuda-graph"]
        argv = ["--model-path", str(tiny_model_path), *cpu, "--attention-backend", "triton"]
        args = prepare_server_args(argv + list(flags))
        args.resolve_once()
        return args

    return resolved


def backend_of(module: str, name: str):
    """An instance of SGLang's attention backend class ``module.name``, without running its
    ``__init__`` (which needs a model runner): only its class matters here."""
    import importlib

    cls = getattr(importlib.import_module(f"sglang.srt.layers.attention.{module}"), name)
    return object.__new__(cls)


def scheduler(server_args, attn_backend=None):
    model_runner = SimpleNamespace(attn_backend=attn_backend)
    return SimpleNamespace(
        server_args=server_args, tp_worker=SimpleNamespace(model_runner=model_runner)
    )


@pytest.mark.parametrize(
    ("flags", "backend"),
    [
        ((), "disabled"),  # CPU: SGLang's default prefill graph is off
        (("--cuda-graph-backend-prefill", "breakable"), "breakable"),
        (("--cuda-graph-backend-prefill", "full"), "full"),
        (("--cuda-graph-config", '{"prefill": {"backend": "full"}}'), "full"),
    ],
)
def test_prefill_graph_backend_is_read_from_sglangs_resolution(sglang_hooks, parse, flags, backend):
    assert cuda_graph.prefill_graph_backend(parse(*flags)) == backend


def test_full_prefill_graph_is_refused_with_one_line(sglang_hooks, parse):
    refused = cuda_graph.refused_execution_paths(
        scheduler(parse("--cuda-graph-backend-prefill", "full"))
    )
    assert refused == [cuda_graph.PREFILL_FULL_GRAPH]
    assert "\n" not in refused[0] and refused[0].startswith("--cuda-graph-backend-prefill full")


@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("--cuda-graph-backend-prefill", "breakable"),
        ("--cuda-graph-backend-prefill", "disabled"),
        ("--cuda-graph-backend-decode", "full"),
        ("--cuda-graph-backend-decode", "breakable"),
        ("--enable-torch-compile",),
    ],
)
def test_graph_paths_whose_hooks_run_are_accepted(sglang_hooks, parse, flags):
    triton = backend_of("triton_backend", "TritonAttnBackend")
    assert cuda_graph.refused_execution_paths(scheduler(parse(*flags), triton)) == []


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch_native_backend", "TorchNativeAttnBackend"),
        ("triton_backend", "TritonAttnBackend"),
        ("flashinfer_backend", "FlashInferAttnBackend"),
        ("trtllm_mha_backend", "TRTLLMHAAttnBackend"),
        ("intel_amx_backend", "IntelAMXAttnBackend"),
    ],
)
def test_backends_that_go_through_the_hooked_forward_are_accepted(sglang_hooks, module, name):
    assert cuda_graph.forward_overriding_backend(backend_of(module, name)) is None


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("tbo_backend", "TboAttnBackend"),
        ("minimax_sparse_backend", "MiniMaxSparseAttnBackend"),
        ("hybrid_linear_attn_backend", "HybridLinearAttnBackend"),
    ],
)
def test_backends_that_bypass_the_hooked_forward_are_refused(sglang_hooks, parse, module, name):
    refused = cuda_graph.refused_execution_paths(scheduler(parse(), backend_of(module, name)))
    assert refused == [
        f"attention backend {name} (it overrides AttentionBackend.forward, where the "
        "per-layer scoring runs)"
    ]


def test_hybrid_backend_is_judged_by_its_prefill_backend(sglang_hooks):
    """``--prefill-attention-backend`` / ``--decode-attention-backend``: extend batches go
    to the prefill backend, whose ``forward`` must be the hooked one."""
    hybrid = backend_of("hybrid_attn_backend", "HybridAttnBackend")
    hybrid.prefill_backend = backend_of("triton_backend", "TritonAttnBackend")
    hybrid.decode_backend = backend_of("tbo_backend", "TboAttnBackend")
    assert cuda_graph.forward_overriding_backend(hybrid) is None
    hybrid.prefill_backend, hybrid.decode_backend = hybrid.decode_backend, hybrid.prefill_backend
    assert cuda_graph.forward_overriding_backend(hybrid) == "TboAttnBackend"


def test_scheduler_refusal_lists_the_graph_option(sglang_hooks, parse):
    """``patches/scheduler.unsupported`` (what ``Scheduler.__init__``'s hook raises on)
    includes the execution-path refusals."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from bacon_sglang.patches.scheduler import unsupported

    tree_cache = SimpleNamespace(supports_swa=lambda: False, supports_mamba=lambda: False)
    fake = scheduler(
        parse("--cuda-graph-backend-prefill", "full"),
        backend_of("torch_native_backend", "TorchNativeAttnBackend"),
    )
    fake.tree_cache = tree_cache
    kv_pool = object.__new__(MHATokenToKVPool)
    assert unsupported(fake, kv_pool) == [cuda_graph.PREFILL_FULL_GRAPH]


def test_execution_paths_name_the_real_backend_and_graph_runners(sglang_hooks, parse):
    """What ``/server_info`` reports: the prefill backend of a hybrid backend, and no graph
    runner where SGLang routes a phase to its eager runner."""
    eager, graph = object(), SimpleNamespace()
    hybrid = backend_of("hybrid_attn_backend", "HybridAttnBackend")
    hybrid.prefill_backend = backend_of("triton_backend", "TritonAttnBackend")
    fake = scheduler(parse("--cuda-graph-backend-prefill", "breakable"), hybrid)
    runner = fake.tp_worker.model_runner
    runner.eager_runner, runner.decode_cuda_graph_runner = eager, graph
    runner.prefill_cuda_graph_runner = eager
    assert cuda_graph.execution_paths(fake) == {
        "attention_backend": "TritonAttnBackend",
        "decode_graph_runner": "SimpleNamespace",
        "prefill_graph_runner": None,
        "prefill_graph_backend": "breakable",
    }
