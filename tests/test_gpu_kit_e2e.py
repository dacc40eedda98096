"""End to end on a GPU through the kit (``benchmarks/gpu_kit.py run``): SGLang on its Triton
attention backend with decode CUDA graphs, its norms and activations on the plain-PyTorch
``sgl_kernel`` stand-in, with the checks of ``tests/test_backends_e2e.py`` (the scheduler
runs the asked-for backend and a decode graph; keep-sets equal to the transformers
reference, greedy tokens equal to the reduced-cache reference, pool whole) on two models:
the built-in tiny Qwen2-VL (SnapKV, pages of 16, 128-token chunks, two requests in flight)
and a random-weight Qwen2-VL at Qwen2-VL-7B's attention shapes (28 query / 4 KV heads,
head_dim 128, M-RoPE 16/24/24; ``BACON_E2E_LAYERS`` layers, default 2; BACON, budget 64).
float32 throughout, so the comparison is exact. Skipped without a CUDA device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_backends_e2e import (  # noqa: F401  (the tests, run here with this module's server)
    BACON_64,
    SNAPKV_96_PAGED_CHUNKED,
    Config,
    config_server,
    test_compressed_decode_matches_reference,
    test_server_runs_the_backend,
)

from bacon_sglang.server import cpu_engine

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(cpu_engine(), reason="needs a CUDA device (benchmarks/gpu_kit.py run)"),
]

# Without sgl_kernel and FlashInfer: vision attention on Triton (sm90's default, fa3, needs
# sgl_kernel), sampling in PyTorch; decode graphs captured up to batch 8 (a fast start).
KIT_ARGS = ("--mm-attention-backend", "triton_attn", "--sampling-backend", "pytorch",
            "--cuda-graph-max-bs-decode", "8")  # fmt: skip
CASES = {
    "tiny-snapkv-page16-chunked": ("tiny", Config("triton", tuple(SNAPKV_96_PAGED_CHUNKED),
                                                  extra=KIT_ARGS)),
    "qwen2vl-7b-shapes-bacon-page1": ("7b-shapes", Config("triton", tuple(BACON_64),
                                                          extra=KIT_ARGS)),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_model_path(case, tmp_path_factory) -> Path:
    """This case's model (overrides conftest's: the processor and references follow it)."""
    if CASES[case][0] == "tiny":
        from bacon_sglang.models.tiny import ensure_tiny_model

        return ensure_tiny_model()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    layers = int(os.environ.get("BACON_E2E_LAYERS", "2"))
    return gpu_check.build_7b_shaped_model(layers, tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def server(case, tiny_model_path, tmp_path_factory):
    with config_server(CASES[case][1], tiny_model_path, tmp_path_factory.mktemp("keep")) as s:
        yield s
