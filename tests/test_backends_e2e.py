"""Compression on the attention backends GPU users run. Without a GPU: SGLang's Triton
backend in Triton's interpreter on CPU, which builds ``kv_indptr`` / ``kv_indices`` from
``req_to_token`` and the shortened ``seq_lens`` before every forward (``torch_native`` reads
the rows directly). On a CUDA machine (``benchmarks/gpu_check.py``): Triton, FlashInfer and
FA3 with decode CUDA graphs, and one breakable prefill graph. On both, Triton with
``--kv-layout cells`` (head-granular KV: SGLang's decode over the rows, then the cells'
decode launch over them; on a GPU inside the captured decode graph). The same checks as
``tests/test_compression_e2e.py`` (keep-sets equal to the transformers reference, greedy
decode equal to the reduced-cache reference, pool integrity) on a small prompt set:
interpreted Triton attention is slow."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import requests
import torch
from test_compression_e2e import (
    MAX_NEW,
    QUESTIONS,
    assert_integrity,
    chat_prompt,
    generate,
    reference_decode,
    reference_keep_sets,
    served_tokens,
)

from bacon_sglang.demo import demo_image
from bacon_sglang.server import cpu_engine, running_server

pytestmark = pytest.mark.engine

BACON_64 = ["--kv-policy", "bacon", "--kv-budget", "64"]
SNAPKV_96_PAGED_CHUNKED = [
    "--kv-policy", "snapkv", "--kv-budget", "96", "--page-size", "16",
    "--chunked-prefill-size", "128",
]  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One server: attention backend, compression flags, dtype, extra SGLang flags."""

    backend: str
    kv_args: tuple[str, ...]
    dtype: str = "float32"
    extra: tuple[str, ...] = ()

    @property
    def policy(self) -> tuple[str, int]:
        args = dict(zip(self.kv_args[::2], self.kv_args[1::2], strict=True))
        return args["--kv-policy"], int(args["--kv-budget"])


CELLS = ("--kv-layout", "cells")  # patches/head_granular.md, step 6

# The overlap scheduler stays on (SGLang's default) everywhere.
if cpu_engine():  # Triton interpreted on CPU; SGLang's CPU engine has no decode graphs
    CONFIGS = {
        "triton-page1": Config("triton", tuple(BACON_64)),
        "triton-page16-chunked": Config("triton", tuple(SNAPKV_96_PAGED_CHUNKED)),
        "triton-cells-page1": Config("triton", tuple(BACON_64), extra=CELLS),
    }
else:  # a CUDA machine (benchmarks/gpu_check.py): decode CUDA graphs on (SGLang's default)
    CONFIGS = {
        "triton-page16-chunked": Config("triton", tuple(SNAPKV_96_PAGED_CHUNKED)),
        # FlashInfer and FA3 have no float32 kernels.
        "flashinfer-page16-chunked": Config(
            "flashinfer", tuple(SNAPKV_96_PAGED_CHUNKED), "bfloat16"
        ),
        "fa3-page1": Config("fa3", tuple(BACON_64), "bfloat16"),
        # head-granular KV: its decode launch inside SGLang's captured decode graphs
        "triton-cells-page1": Config("triton", tuple(BACON_64), extra=CELLS),
        # SGLang turns the breakable prefill graph off for Qwen2-VL unless asked for.
        "flashinfer-breakable-prefill": Config(
            "flashinfer", tuple(BACON_64), "bfloat16",
            ("--cuda-graph-backend-prefill", "breakable"),
        ),
    }  # fmt: skip
BACKEND_CLASSES = {
    "triton": "TritonAttnBackend",
    "flashinfer": "FlashInferAttnBackend",
    "fa3": "FlashAttentionBackend",
}


@contextlib.contextmanager
def config_server(config: Config, model_path, debug_dir):
    """A server of ``model_path`` with ``config``, writing its keep-sets to ``debug_dir``
    (also used by ``tests/test_gpu_kit_e2e.py``)."""
    args = ["--attention-backend", config.backend, *config.kv_args, *config.extra,
            "--dtype", config.dtype, "--max-total-tokens", "6144",
            "--kv-debug-dir", str(debug_dir)]  # fmt: skip
    with running_server(model_path, args) as s:
        s.debug_dir = debug_dir
        s.config = config
        yield s


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def server(request, tiny_model_path, tmp_path_factory):
    with config_server(
        CONFIGS[request.param], tiny_model_path, tmp_path_factory.mktemp("keep")
    ) as s:
        yield s


def test_server_runs_the_backend(server):
    """Not a silent fallback: the scheduler's model runner holds the asked-for SGLang
    backend, and decodes eagerly on CPU, through a captured decode graph on a GPU."""
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    assert info["attention_backend"] == server.config.backend
    execution = info["internal_states"][0]["bacon_execution"]
    assert execution["attention_backend"] == BACKEND_CLASSES[server.config.backend]
    if cpu_engine():
        assert execution["decode_graph_runner"] is None
        # SGLang's resolution, read in the scheduler as the launch-time refusal reads it.
        assert execution["prefill_graph_backend"] == "disabled"
    else:
        assert execution["decode_graph_runner"] is not None
    if "breakable" in server.config.extra:
        assert execution["prefill_graph_backend"] == "breakable"
        assert execution["prefill_graph_runner"] is not None


# Fixed before any GPU run: bf16 scores against the fp32 reference's keep-sets.
BF16_MIN_AGREEMENT = 0.9


def keep_set_agreement(keep: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean share of kept positions two ``[layers, kv_heads, kept]`` keep-sets have in
    common."""
    shared = [
        len(set(a.tolist()) & set(b.tolist())) / a.numel()
        for a, b in zip(keep.flatten(0, 1), expected.flatten(0, 1), strict=True)
    ]
    return sum(shared) / len(shared)


def test_compressed_decode_matches_reference(server, processor, hf_model, hf_eager):
    """One image question on the page-1 server; on the page-16 server with 128-token
    chunks also the 286-token prompt whose last chunk (30 tokens) is shorter than the
    window; both are in flight together (a batched decode of two compressed requests),
    then each is checked against the references. float32 (CPU, Triton on a GPU): exactly;
    bfloat16 (FlashInfer, FA3): keep-sets mostly equal, first token equal."""
    import threading

    policy, budget = server.config.policy
    chunked = "--chunked-prefill-size" in server.config.kv_args
    questions = QUESTIONS if chunked else QUESTIONS[:1]
    img = demo_image()
    texts = [chat_prompt(processor, q) for q in questions]
    replies = [None] * len(texts)

    def send(i):
        replies[i] = generate(server.base_url, texts[i], img)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text, reply in zip(texts, replies, strict=True):
        report = reply["meta_info"]["kv_compression"]
        assert report["budget"] == budget
        assert report["kept_tokens"] == report["shared_prefix_tokens"] + budget
        if "cells" in server.config.extra:  # uniform: L x Hkv x budget cells in budget slots
            assert (report["layout"], report["cell_slots"]) == ("cells", budget)
        record = torch.load(server.debug_dir / f"{reply['meta_info']['id']}.pt")
        expected = reference_keep_sets(hf_eager, processor, text, img, policy, record)
        tokens, logprobs = served_tokens(reply)
        ref_tokens, ref_logprobs = reference_decode(hf_model, processor, text, img, record, MAX_NEW)
        if server.config.dtype == "float32":
            assert torch.equal(record["keep"], expected)
            assert tokens == ref_tokens
            torch.testing.assert_close(
                torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
            )
        else:  # bf16 kernels against the fp32 reference: near ties may rank differently
            assert keep_set_agreement(record["keep"], expected) >= BF16_MIN_AGREEMENT
            assert tokens[0] == ref_tokens[0]
            torch.testing.assert_close(
                torch.tensor(logprobs[:1]), torch.tensor(ref_logprobs[:1]), atol=0.1, rtol=0
            )
    assert_integrity(server.base_url)
