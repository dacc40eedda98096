"""``--kv-layout cells`` inside SGLang's real engine (CPU, torch_native, the Triton kernels
interpreted): head-granular KV served end to end (``patches/cells.py``, design
``patches/head_granular.md``). With the uniform policies served today (SnapKV, BACON) every
(layer, KV head) keeps ``kept`` tokens, so a request holds ``C = L * Hkv * kept`` cells in
``m = kept`` cell slots, the memory of the slots layout, and must answer exactly as it does:
keep-sets equal to the transformers reference's, greedy tokens and log-probabilities equal
to a decode from a cache reduced to them. The uneven allocations (bacon-pyramidkv,
bacon-sparsemm, by per-request override) hold the sum of their keep-sets instead. Every test
ends idle with the pool whole and no cell held."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from PIL import Image
from test_compression_e2e import (
    QUESTIONS,
    RETRACT_ENV,
    assert_follow_up_hit,
    assert_integrity,
    assert_like_reference,
    chat_prompt,
    generate,
    image_prompt,
    reference_decode,
    served_tokens,
)

from bacon_sglang.demo import demo_image, kv_memory
from bacon_sglang.policies import make_policy
from bacon_sglang.reference import keep_sets_per_layer
from bacon_sglang.selection import KEEP_PAD
from bacon_sglang.server import running_server

pytestmark = pytest.mark.engine

LAYERS, KV_HEADS = 4, 2  # the tiny model: a cell slot holds 8 cells
# SparseMM's head scores for the tiny model ([layers][KV heads], summing to 1): made up,
# uneven, so that its heads keep different numbers of tokens (the model ships none).
HEAD_SCORES = [[0.25, 0.05], [0.1, 0.15], [0.05, 0.2], [0.15, 0.05]]

SERVER_CONFIGS = {
    "bacon-page1": ["--kv-policy", "bacon", "--kv-budget", "64"],
    "snapkv-page16-chunked": [
        "--kv-policy", "snapkv", "--kv-budget", "96", "--page-size", "16",
        "--chunked-prefill-size", "128", "--kv-text-prefix", "share",
    ],
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SERVER_CONFIGS))
def server(request, tiny_model_path, tmp_path_factory):
    """A cells server with SGLang's forced retraction on (every 3rd decode step while more
    than one request runs), as ``tests/test_compression_e2e.py``'s."""
    debug_dir = tmp_path_factory.mktemp("keep")
    head_scores = debug_dir / "visual_heads.json"
    head_scores.write_text(json.dumps({"scores": HEAD_SCORES}))
    args = SERVER_CONFIGS[request.param] + [
        "--kv-layout", "cells", "--dtype", "float32", "--max-total-tokens", "6144",
        "--kv-debug-dir", str(debug_dir), "--kv-head-scores", str(head_scores),
    ]  # fmt: skip
    with running_server(tiny_model_path, args, env={**os.environ, **RETRACT_ENV}) as s:
        s.debug_dir = debug_dir
        s.policy = "bacon" if request.param == "bacon-page1" else "snapkv"
        s.budget = 64 if request.param == "bacon-page1" else 96
        s.page = 16 if "page16" in request.param else 1
        s.text_shared = "--kv-text-prefix" in SERVER_CONFIGS[request.param]
        yield s


# Interpreted Triton decodes a request stored in cells at about 0.7 s a token on 2 CPU cores
# (the two launches of every layer): the checks that need no paged server run on page 1 only.
PAGE1_ONLY = pytest.mark.parametrize("server", ["bacon-page1"], indirect=True)


def assert_idle(base_url: str) -> dict:
    """The pool whole (:func:`assert_integrity`) and no request holding cells."""
    mem = assert_integrity(base_url)
    assert mem["cells_held"] == 0 and mem["cell_slots_held"] == 0, mem
    return mem


def assert_cells_report(reply: dict, budget: int) -> dict:
    """The report of a request stored in cells: uniform keep-sets, so ``C = L * Hkv *
    budget`` cells in ``budget`` cell slots, the slots layout's memory."""
    report = reply["meta_info"]["kv_compression"]
    assert report["layout"] == "cells"
    assert report["cells"] == LAYERS * KV_HEADS * budget
    assert report["cell_slots"] == budget and report["slot_equivalent"] == budget
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + budget
    assert report["evicted_tokens"] == report["prompt_tokens"] - report["kept_tokens"]
    return report


@pytest.mark.parametrize("question", QUESTIONS)
def test_cells_decode_matches_reference(server, processor, hf_model, hf_eager, question):
    """Keep-sets equal the policy's on transformers' attention; greedy tokens and
    log-probabilities (2e-3) equal a decode from the cache reduced to them. With 128-token
    chunks the second prompt's last chunk is shorter than the window."""
    img = demo_image()
    text = chat_prompt(processor, question)
    reply = generate(server.base_url, text, img)
    report = assert_cells_report(reply, server.budget)
    assert report["kv_source"] == "copy" and report["tree_tokens"] > 0
    assert_like_reference(server, processor, hf_model, hf_eager, text, img, reply, server.policy)
    assert_idle(server.base_url)


@PAGE1_ONLY
@pytest.mark.parametrize("policy", ["bacon-pyramidkv", "bacon-sparsemm"])
def test_uneven_policy_per_request_holds_the_sum_of_its_keep_sets(
    server, processor, hf_model, hf_eager, policy
):
    """An uneven allocation by per-request override: its keep-sets, ragged across layers
    (PyramidKV) or heads (SparseMM, the made-up scores of ``--kv-head-scores``), equal the
    policy object's on transformers' attention of the whole prompt; greedy tokens and
    log-probabilities equal a decode from the cache reduced to them; the request holds
    ``C = sum n[l, h]`` cells in ``ceil(C / (L * Hkv))`` slots, fewer than the widest
    head's ``L * Hkv * max n`` of the slots layout."""
    img = demo_image().transpose(Image.TRANSPOSE)
    text = chat_prompt(processor, "Which shape is yellow?")
    reply = generate(server.base_url, text, img, override={"policy": policy})
    record = torch.load(server.debug_dir / f"{reply['meta_info']['id']}.pt")
    keep, prefix = record["keep"], record["prefix_len"]
    rank = make_policy(policy, head_scores=HEAD_SCORES if "sparsemm" in policy else ())
    inputs = processor(text=[text], images=[img], return_tensors="pt")
    expected = keep_sets_per_layer(hf_eager, inputs, rank, record["kept"], prefix)
    for layer, want in enumerate(expected):
        assert torch.equal(keep[layer, :, : want.shape[-1]], want), layer
        assert bool((keep[layer, :, want.shape[-1] :] == KEEP_PAD).all()), layer
    counts = (keep != KEEP_PAD).sum(-1)
    assert len(counts.unique()) > 1  # ragged
    tokens, logprobs = served_tokens(reply)
    ref_tokens, ref_logprobs = reference_decode(hf_model, processor, text, img, record, 8)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )
    report = reply["meta_info"]["kv_compression"]
    cells = int(counts.sum())
    assert (report["policy"], report["layout"], report["cells"]) == (policy, "cells", cells)
    assert report["cell_slots"] == -(-cells // (LAYERS * KV_HEADS))
    assert report["slot_equivalent"] == cells / (LAYERS * KV_HEADS)
    assert cells < LAYERS * KV_HEADS * int(counts.max())
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + report["cell_slots"]
    print(f"{policy}: {cells} cells in {report['cell_slots']} slots; slots layout: "
          f"{int(counts.max())} slots (widest head)")  # fmt: skip
    assert_idle(server.base_url)


@PAGE1_ONLY
def test_compressed_and_uncompressed_decode_together(server, processor, hf_model, hf_eager):
    """A request stored in cells and one served uncompressed (per-request policy none)
    decode in the same batches: the decode over cells overwrites only the first's rows,
    both answer as their references."""
    img = demo_image().transpose(Image.FLIP_TOP_BOTTOM)
    texts = (chat_prompt(processor, "Which shape is green?"), chat_prompt(processor, "Blue?"))
    replies = [None, None]

    def send(i: int) -> None:
        override = {"policy": "none"} if i else None
        replies[i] = generate(server.base_url, texts[i], img, 12, override)

    threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    compressed, plain = replies
    assert_cells_report(compressed, server.budget)
    assert_like_reference(
        server, processor, hf_model, hf_eager, texts[0], img, compressed, server.policy
    )
    assert "kv_compression" not in plain["meta_info"]
    prompt = plain["meta_info"]["prompt_tokens"]
    full = {"keep": torch.arange(prompt).expand(LAYERS, KV_HEADS, -1), "prompt_len": prompt}
    ref_tokens, ref_logprobs = reference_decode(hf_model, processor, texts[1], img, full, 12)
    tokens, logprobs = served_tokens(plain)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )
    assert_idle(server.base_url)


@PAGE1_ONLY
def test_cells_are_counted_while_held(server, processor):
    """While a request decodes, ``/server_info`` counts its cells and cell slots, and the
    pool holds its shared text, cell slots and generated tokens, not its prompt."""
    text = chat_prompt(processor, "Describe the picture.")
    result, samples = {}, []
    worker = threading.Thread(
        target=lambda: result.update(generate(server.base_url, text, demo_image(), max_new=24))
    )
    worker.start()
    while worker.is_alive():
        mem = kv_memory(server.base_url)
        in_use = mem["total"] - mem["available"] - mem["evictable"]
        samples.append((mem["cells_held"], mem["cell_slots_held"], in_use))
        time.sleep(0.1)
    worker.join()
    report = assert_cells_report(result, server.budget)
    held = [s for s in samples if s[0]]
    assert held, "the request was never observed holding cells"
    assert {s[:2] for s in held} == {(report["cells"], report["cell_slots"])}
    bound = -(-report["kept_tokens"] // server.page) * server.page + 24 + server.page
    assert bound < report["prompt_tokens"]
    assert sorted(s[2] for s in held)[len(held) // 2] <= bound
    assert_idle(server.base_url)


@PAGE1_ONLY
def test_follow_up_question_hits_the_full_prompt(server, processor, hf_model, hf_eager):
    """``--kv-prefix-cache full``: the first question's whole prompt stays in the radix tree
    with its full KV while the request decodes from cells; a second question about the same
    image matches it but for its window and is stored in its own cells; both equal the
    reference."""
    img = demo_image().transpose(Image.ROTATE_90)
    first_text, second_text = image_prompt("Which shape is red?"), image_prompt("And blue?")
    first = generate(server.base_url, first_text, img)
    second = generate(server.base_url, second_text, img)
    assert_follow_up_hit(
        processor, first, second, first_text, second_text, img, server.page, server.text_shared
    )
    for reply, text in ((first, first_text), (second, second_text)):
        assert_cells_report(reply, server.budget)
        assert_like_reference(
            server, processor, hf_model, hf_eager, text, img, reply, server.policy
        )
    assert_idle(server.base_url)


@PAGE1_ONLY
def test_shared_prefix_mode_frees_the_prompt(server, processor, hf_model, hf_eager):
    """``--kv-prefix-cache shared`` (per request): the cells go to fresh slots too, the
    private prompt goes back to the allocator at once and nothing of it enters the tree;
    the answer equals the reference."""
    img = demo_image().transpose(Image.ROTATE_180)
    text = chat_prompt(processor, "Name every shape in row 2.")
    before = kv_memory(server.base_url)["evictable"]
    reply = generate(server.base_url, text, img, override={"prefix_cache": "shared"})
    report = assert_cells_report(reply, server.budget)
    assert report["tree_tokens"] == report["shared_prefix_tokens"]
    assert_like_reference(server, processor, hf_model, hf_eager, text, img, reply, server.policy)
    tree_growth = assert_idle(server.base_url)["evictable"] - before
    assert tree_growth <= report["shared_prefix_tokens"] + server.page  # no compressed prompt


@PAGE1_ONLY
@pytest.mark.parametrize("policy", [None, "bacon-sparsemm"])  # the server's BACON; uneven
def test_retracted_requests_answer_as_if_never_retracted(server, processor, policy):
    """SGLang's forced retraction: two concurrent requests stored in cells are retracted
    and prefilled again; the prefill after a retraction stores the first keep-set and the
    tokens generated so far in cells again (a ragged keep-set too: each head its own count,
    then every generated token), and each request answers the tokens it answers alone
    (never retracted), its report the prompt's."""
    questions = ("Describe the picture.", "Which shape is red?")
    texts = [chat_prompt(processor, q) for q in questions]
    img = demo_image().rotate(90 if policy is None else 180)
    override = None if policy is None else {"policy": policy}
    reuses = kv_memory(server.base_url)["retraction_reuses"]
    replies = [None] * len(texts)

    def send(i: int) -> None:
        replies[i] = generate(server.base_url, texts[i], img, 12, override)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kv_memory(server.base_url)["retraction_reuses"] > reuses
    assert any(r["meta_info"]["num_retractions"] for r in replies)
    for text, reply in zip(texts, replies, strict=True):
        meta = reply["meta_info"]
        if policy is None:
            report = assert_cells_report(reply, server.budget)
        else:
            report = meta["kv_compression"]
            first = torch.load(server.debug_dir / f"{meta['id']}.pt")
            counts = (first["keep"] != KEEP_PAD).sum(-1)
            assert len(counts.unique()) > 1 and report["cells"] == int(counts.sum())
            if meta["num_retractions"]:
                assert_ragged_keep_again(server.debug_dir / f"{meta['id']}.retracted.pt", first)
        assert report["prompt_tokens"] == meta["prompt_tokens"]
        alone = generate(server.base_url, text, img, 12, override)
        assert alone["meta_info"]["num_retractions"] == 0
        assert reply["output_ids"] == alone["output_ids"], meta["num_retractions"]
    assert_idle(server.base_url)


def assert_ragged_keep_again(path, first: dict) -> None:
    """The keep-sets of the prefill after a retraction (``<rid>.retracted.pt``): every
    (layer, head) keeps what its first prefill kept, then every generated token."""
    last = torch.load(path)
    generated = torch.arange(first["prompt_len"], last["prompt_len"])
    assert len(generated) > 0
    for layer in range(LAYERS):
        for h in range(KV_HEADS):
            row, was = last["keep"][layer, h], first["keep"][layer, h]
            want = torch.cat([was[was != KEEP_PAD], generated])
            assert torch.equal(row[row != KEEP_PAD], want), (layer, h)


def test_no_request_fell_back_to_uncompressed(server):
    """Last on each server: every compressed request of the module was stored in cells (no
    failure, no lack of room for cell slots), and none is held at rest."""
    mem = assert_idle(server.base_url)
    assert mem["compressed_requests"] > 0 and mem["copies"] > 0, mem
    assert mem["cell_fallbacks"] == 0 and mem["failures"] == 0, mem
