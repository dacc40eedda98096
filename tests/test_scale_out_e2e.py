"""Compression beyond one scheduler process, on SGLang's real engine (CPU without a GPU):
tensor parallelism (``--tp-size 2``: each rank scores and compacts its own KV heads),
data parallelism (``--dp-size 2``: one scheduler and pool per replica). One module-scoped
server per configuration; the router tests are in ``test_router_e2e.py``, the refused
setups in ``test_scale_out_flags.py``."""

from __future__ import annotations

import threading

import pytest
import requests
import torch
from test_compression_e2e import (
    QUESTIONS,
    chat_prompt,
    generate,
    reference_decode,
    reference_keep_sets,
    served_tokens,
)

from bacon_sglang.demo import demo_image
from bacon_sglang.server import running_server

pytestmark = pytest.mark.engine

BUDGET = 64
# Two scheduler ranks load the model on 2 shared cores: slower to start than one.
STARTUP_S = 900
COMMON = ["--kv-policy", "bacon", "--kv-budget", str(BUDGET), "--dtype", "float32",
          "--max-total-tokens", "4096"]  # fmt: skip


def rank_pools(base_url: str) -> list[dict]:
    """``bacon_kv`` of every scheduler: one per DP replica (``internal_states``), and under
    each, with tensor parallelism, every TP rank's (``tp_ranks``)."""
    info = requests.get(base_url + "/server_info", timeout=60).json()
    return [state["bacon_kv"] for state in info["internal_states"]]


def whole(pool: dict) -> bool:
    return pool["available"] + pool["evictable"] == pool["total"] and pool["protected"] == 0


def wait_whole(base_url: str, timeout: float = 30.0) -> list[dict]:
    """Every pool of every rank once idle (waits for the last frees)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        pools = rank_pools(base_url)
        flat = [p for pool in pools for p in pool.get("tp_ranks", [pool])]
        if all(whole(p) for p in flat) or time.monotonic() > deadline:
            assert all(whole(p) for p in flat), pools
            return pools
        time.sleep(0.5)


def check_against_reference(records, reply, text, img, processor, hf_model, hf_eager):  # noqa: F811
    """The per-rank keep-sets, concatenated over the ranks' heads, equal the reference
    keep-sets of the unsplit model; the greedy tokens equal a decode from that cache."""
    keep = torch.cat([r["keep"] for r in records], dim=1)  # [layers, all KV heads, kept]
    expected = reference_keep_sets(hf_eager, processor, text, img, "bacon", records[0])
    assert torch.equal(keep, expected)
    full = {**records[0], "keep": keep}
    tokens, logprobs = served_tokens(reply)
    ref_tokens, ref_logprobs = reference_decode(hf_model, processor, text, img, full, 8)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )


# --- data parallelism ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp_server(tiny_model_path, tmp_path_factory):
    debug_dir = tmp_path_factory.mktemp("keep-dp")
    args = COMMON + ["--dp-size", "2", "--load-balance-method", "round_robin",
                     "--kv-debug-dir", str(debug_dir)]  # fmt: skip
    with running_server(tiny_model_path, args, startup_timeout=STARTUP_S) as server:
        server.debug_dir = debug_dir
        yield server


def test_dp_replicas_both_compress_and_report_their_pools(
    dp_server,
    processor,  # noqa: F811
    hf_model,  # noqa: F811
    hf_eager,  # noqa: F811
):
    """Four concurrent requests, round-robin over two replicas: every one compressed
    (keep-sets and tokens as the reference's), both replicas' counters move, both pools are
    reported and whole afterwards."""
    before = wait_whole(dp_server.base_url)
    assert len(before) == 2
    img = demo_image()
    texts = [chat_prompt(processor, q) for q in QUESTIONS * 2]
    replies: dict[int, dict] = {}
    threads = [
        threading.Thread(target=lambda i=i: replies.update({i: generate(
            dp_server.base_url, texts[i], img)}))
        for i in range(4)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 4
    for i, reply in replies.items():
        report = reply["meta_info"]["kv_compression"]
        assert report["kept_tokens"] == report["shared_prefix_tokens"] + BUDGET
        record = torch.load(dp_server.debug_dir / f"{reply['meta_info']['id']}.pt")
        check_against_reference([record], reply, texts[i], img, processor, hf_model, hf_eager)
    after = wait_whole(dp_server.base_url)
    pairs = list(zip(after, before, strict=True))
    moved = [a["compressed_requests"] - b["compressed_requests"] for a, b in pairs]
    assert moved == [2, 2], (before, after)
    assert all(a["freed_slots"] > b["freed_slots"] for a, b in pairs)


# --- tensor parallelism ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_server(tiny_model_path, tmp_path_factory):
    debug_dir = tmp_path_factory.mktemp("keep-tp")
    args = COMMON + ["--tp-size", "2", "--kv-debug-dir", str(debug_dir)]
    with running_server(tiny_model_path, args, startup_timeout=STARTUP_S) as server:
        server.debug_dir = debug_dir
        yield server


@pytest.mark.parametrize("question", QUESTIONS)
def test_tp_ranks_compress_their_own_heads_like_the_unsplit_model(
    tp_server,
    processor,  # noqa: F811
    hf_model,  # noqa: F811
    hf_eager,  # noqa: F811
    question,
):
    """Each TP rank holds one of the model's two KV heads: its keep-sets are the unsplit
    model's reference keep-sets of that head; together the ranks decode the reference's
    greedy tokens; every rank took the same free decision (checked inside the server after
    every extend batch) and every rank's pool is whole afterwards."""
    img = demo_image()
    text = chat_prompt(processor, question)
    reply = generate(tp_server.base_url, text, img)
    report = reply["meta_info"]["kv_compression"]
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + BUDGET
    rid = reply["meta_info"]["id"]
    records = [torch.load(tp_server.debug_dir / f"{rid}.tp{r}.pt") for r in (0, 1)]
    assert [(r["tp_rank"], r["tp_size"], r["keep"].shape[1]) for r in records] == [
        (0, 2, 1),
        (1, 2, 1),
    ]
    check_against_reference(records, reply, text, img, processor, hf_model, hf_eager)
    (pool,) = wait_whole(tp_server.base_url)
    ranks = pool["tp_ranks"]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["compressed_requests"] == pool["compressed_requests"] > 0
        assert rank["freed_slots"] == pool["freed_slots"]
        # every compressed request went through the all-rank agreement check
        assert rank["tp_checked_requests"] == rank["compressed_requests"]
