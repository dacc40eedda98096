"""Compression beyond one scheduler process, on SGLang's real engine (CPU without a GPU):
tensor parallelism (``--tp-size 2``: each rank scores and compacts its own KV heads, in
slots or in cells), data parallelism (``--dp-size 2``: one scheduler and pool per replica).
One module-scoped server per configuration, one at a time; the router tests are in
``test_router_e2e.py``, the refused setups in ``test_scale_out_flags.py``."""

from __future__ import annotations

import json
import threading

import pytest
import requests
import torch
from test_cells_e2e import HEAD_SCORES, LAYERS
from test_compression_e2e import (
    MAX_NEW,
    QUESTIONS,
    chat_prompt,
    generate,
    reference_decode,
    reference_keep_sets,
    served_tokens,
)

from bacon_sglang.cells import slots_needed
from bacon_sglang.demo import demo_image
from bacon_sglang.policies import make_policy
from bacon_sglang.reference import keep_sets_per_layer
from bacon_sglang.selection import KEEP_PAD
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


# Each configuration's extra flags (its keep-set directory is appended).
SERVERS = {
    "dp": COMMON + ["--dp-size", "2", "--load-balance-method", "round_robin"],
    "tp": COMMON + ["--tp-size", "2"],
    "tp-cells": [
        "--kv-policy", "bacon-sparsemm", "--kv-budget", str(BUDGET), "--kv-layout", "cells",
        "--dtype", "float32", "--max-total-tokens", "4096", "--tp-size", "2",
    ],
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request, tiny_model_path, tmp_path_factory):
    """One server per configuration, each test naming its own (``indirect``): pytest runs
    them one configuration at a time, so idle servers never share the 2 cores."""
    debug_dir = tmp_path_factory.mktemp(f"keep-{request.param}")
    args = SERVERS[request.param] + ["--kv-debug-dir", str(debug_dir)]
    if "--kv-layout" in args:  # SparseMM's scores, made up (the tiny model ships none)
        scores = debug_dir / "visual_heads.json"
        scores.write_text(json.dumps({"scores": HEAD_SCORES}))
        args += ["--kv-head-scores", str(scores)]
    with running_server(tiny_model_path, args, startup_timeout=STARTUP_S) as s:
        s.debug_dir = debug_dir
        yield s


# --- data parallelism ------------------------------------------------------------------


@pytest.mark.parametrize("server", ["dp"], indirect=True)
def test_dp_replicas_both_compress_and_report_their_pools(
    server,
    processor,  # noqa: F811
    hf_model,  # noqa: F811
    hf_eager,  # noqa: F811
):
    """Four concurrent requests, round-robin over two replicas: every one compressed
    (keep-sets and tokens as the reference's), both replicas' counters move, both pools are
    reported and whole afterwards."""
    before = wait_whole(server.base_url)
    assert len(before) == 2
    img = demo_image()
    texts = [chat_prompt(processor, q) for q in QUESTIONS * 2]
    replies: dict[int, dict] = {}
    threads = [
        threading.Thread(target=lambda i=i: replies.update({i: generate(
            server.base_url, texts[i], img)}))
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
        record = torch.load(server.debug_dir / f"{reply['meta_info']['id']}.pt")
        check_against_reference([record], reply, texts[i], img, processor, hf_model, hf_eager)
    after = wait_whole(server.base_url)
    pairs = list(zip(after, before, strict=True))
    moved = [a["compressed_requests"] - b["compressed_requests"] for a, b in pairs]
    assert moved == [2, 2], (before, after)
    assert all(a["freed_slots"] > b["freed_slots"] for a, b in pairs)


# --- tensor parallelism ----------------------------------------------------------------


@pytest.mark.parametrize("server", ["tp"], indirect=True)
@pytest.mark.parametrize("question", QUESTIONS)
def test_tp_ranks_compress_their_own_heads_like_the_unsplit_model(
    server,
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
    reply = generate(server.base_url, text, img)
    report = reply["meta_info"]["kv_compression"]
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + BUDGET
    rid = reply["meta_info"]["id"]
    records = [torch.load(server.debug_dir / f"{rid}.tp{r}.pt") for r in (0, 1)]
    assert [(r["tp_rank"], r["tp_size"], r["keep"].shape[1]) for r in records] == [
        (0, 2, 1),
        (1, 2, 1),
    ]
    check_against_reference(records, reply, text, img, processor, hf_model, hf_eager)
    (pool,) = wait_whole(server.base_url)
    ranks = pool["tp_ranks"]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["compressed_requests"] == pool["compressed_requests"] > 0
        assert rank["freed_slots"] == pool["freed_slots"]
        # every compressed request went through the all-rank agreement check
        assert rank["tp_checked_requests"] == rank["compressed_requests"]


# --- tensor parallelism, head-granular KV (--kv-layout cells) ---------------------------


def rank_keep(keep: torch.Tensor) -> list[list[torch.Tensor]]:
    """``keep[l][h]``: the kept positions of (layer, head), the ``KEEP_PAD`` tail dropped."""
    return [[row[row != KEEP_PAD] for row in layer] for layer in keep]


@pytest.mark.parametrize("server", ["tp-cells"], indirect=True)
@pytest.mark.parametrize(("policy", "question"), [("bacon-sparsemm", 0), ("bacon-pyramidkv", 1)])
def test_tp_ranks_store_their_own_heads_in_cells_and_agree_on_the_slots(
    server,
    processor,  # noqa: F811
    hf_model,  # noqa: F811
    hf_eager,  # noqa: F811
    policy,
    question,
):
    """``--tp-size 2 --kv-layout cells``, one KV head per rank (the server's policy, then a
    per-request override): each rank's ragged keep-sets are the unsplit model's for its head
    (SparseMM's caps from the scores of all heads); the ranks' cell counts ``C_r`` differ
    with SparseMM's uneven scores, yet both hold ``m = max_r ceil(C_r / L)`` cell slots; the
    report counts both ranks' cells; the greedy tokens are the single-process reference's;
    both pools are whole and hold no cell afterwards."""
    img = demo_image()
    text = chat_prompt(processor, QUESTIONS[question])
    override = None if policy == "bacon-sparsemm" else {"policy": policy}
    reply = generate(server.base_url, text, img, override=override)
    rid = reply["meta_info"]["id"]
    records = [torch.load(server.debug_dir / f"{rid}.tp{r}.pt") for r in (0, 1)]
    inputs = processor(text=[text], images=[img], return_tensors="pt")
    rank = make_policy(policy, head_scores=HEAD_SCORES if "sparsemm" in policy else ())
    expected = rank_keep(keep_sets_per_layer(hf_eager, inputs, rank, records[0]["kept"], 0))
    cells = []
    for head, record in enumerate(records):
        got = rank_keep(record["keep"])
        for layer in range(LAYERS):
            assert torch.equal(got[layer][0], expected[layer][head]), (head, layer)
        cells.append(sum(len(got[layer][0]) for layer in range(LAYERS)))
    m = max(slots_needed(c, LAYERS, 1) for c in cells)
    assert [(r["cells"], r["cell_slots"]) for r in records] == [(c, m) for c in cells]
    if policy == "bacon-sparsemm":
        assert cells[0] != cells[1]  # the ranks agree on the larger one's slots
    report = reply["meta_info"]["kv_compression"]
    assert (report["policy"], report["cells"], report["rank_cells"]) == (policy, sum(cells), cells)
    assert report["cell_slots"] == m and report["kept_tokens"] == m
    assert report["slot_equivalent"] == sum(cells) / (LAYERS * 2)
    print(f"{policy}: C_r {cells}, m {m}")
    width = max(r["keep"].shape[-1] for r in records)
    padded = [torch.nn.functional.pad(r["keep"], (0, width - r["keep"].shape[-1]), value=KEEP_PAD)
              for r in records]  # fmt: skip
    full = {**records[0], "keep": torch.cat(padded, dim=1)}  # [layers, both heads, width]
    tokens, logprobs = served_tokens(reply)
    ref_tokens, ref_logprobs = reference_decode(hf_model, processor, text, img, full, MAX_NEW)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )
    (pool,) = wait_whole(server.base_url)
    for mem in pool["tp_ranks"]:
        assert (mem["cells_held"], mem["cell_slots_held"], mem["failures"]) == (0, 0, 0), mem
        assert mem["tp_checked_requests"] == mem["compressed_requests"] > 0
