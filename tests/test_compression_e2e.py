"""Compression inside SGLang's real engine (CPU without a GPU), checked against a plain
transformers reference that decodes the same tiny model from a KV cache reduced to the same
per-head keep-sets at the same logical positions. Every test ends with the allocator
integrity check: when idle, every slot is free or owned by the radix tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from bacon_sglang.demo import demo_image, image_data_url, kv_memory
from bacon_sglang.reference import decode_with_keep_sets, keep_sets_from_attention, kept_positions
from bacon_sglang.server import running_server

pytestmark = pytest.mark.engine

MAX_NEW = 8


def reference_keep_sets(hf_eager, processor, text: str, img, policy: str, record: dict):
    """The keep-sets the policy objects compute from transformers' attention weights."""
    inputs = processor(text=[text], images=[img], return_tensors="pt")
    return keep_sets_from_attention(
        hf_eager, inputs, policy, record["keep"].shape[-1], record["prefix_len"]
    )


def chat_prompt(processor, question: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def generate(
    base_url: str, text: str, img=None, max_new: int = MAX_NEW, override=None, **extra
) -> dict:
    """POST /generate (greedy, logprobs); ``override`` is a per-request kv_compression."""
    sampling = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    if override is not None:
        sampling["custom_params"] = {"kv_compression": override}
    body = {"text": text, "sampling_params": sampling, "return_logprob": True, **extra}
    if img is not None:
        body["image_data"] = image_data_url(img)
    reply = requests.post(base_url + "/generate", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    return reply.json()


def assert_integrity(base_url: str) -> dict:
    """Idle server: free + tree-owned == total, nothing protected, no request holding
    stashed window queries."""
    deadline = time.monotonic() + 30
    while True:
        mem = kv_memory(base_url)
        ok = mem["available"] + mem["evictable"] == mem["total"] and mem["protected"] == 0
        if (ok and mem["stashed_requests"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mem["available"] + mem["evictable"] == mem["total"], mem
    assert mem["protected"] == 0 and mem["stashed_requests"] == 0, mem
    return mem


def reference_decode(hf_model, processor, text: str, img, record: dict, n: int):
    """Greedy tokens and their logprobs from transformers with the KV cache reduced to the
    request's shared prefix and keep-sets, at logical positions."""
    inputs = processor(text=[text], images=[img] if img is not None else None, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == record["prompt_len"]
    keep = kept_positions(record["keep"], record.get("prefix_len", 0))
    return decode_with_keep_sets(hf_model, inputs, keep, n)


def served_tokens(reply: dict) -> tuple[list[int], list[float]]:
    pairs = reply["meta_info"]["output_token_logprobs"]
    return [int(p[1]) for p in pairs], [float(p[0]) for p in pairs]


def assert_like_reference(
    server, processor, hf_model, hf_eager, text: str, img, reply: dict, policy: str
) -> dict:
    """The reply's keep-sets equal the policy's on transformers' attention over the whole
    unchunked prompt, and its first ``MAX_NEW`` greedy tokens (and logprobs) equal a
    transformers decode from a KV cache reduced to them. Returns the keep-set record."""
    record = torch.load(server.debug_dir / f"{reply['meta_info']['id']}.pt")
    expected = reference_keep_sets(hf_eager, processor, text, img, policy, record)
    assert torch.equal(record["keep"], expected)
    tokens, logprobs = served_tokens(reply)
    ref_tokens, ref_logprobs = reference_decode(hf_model, processor, text, img, record, MAX_NEW)
    assert tokens[:MAX_NEW] == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs[:MAX_NEW]), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )
    return record


def image_prompt(question: str, system: str = "You are a helpful assistant.") -> str:
    """A chat prompt: system text, one image, a question (Qwen2-VL's template)."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        f"<|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def common_prefix(processor, img, *texts: str) -> int:
    """Tokens the prompts ``texts`` about ``img`` have in common, from the start."""
    ids = [processor(text=[t], images=[img])["input_ids"][0] for t in texts]
    n = 0
    while all(len(x) > n and x[n] == ids[0][n] for x in ids):
        n += 1
    return n


SERVER_CONFIGS = {
    "page1-overlap": ["--kv-policy", "bacon", "--kv-budget", "64"],
    "page16-chunked-no-overlap": [
        "--kv-policy", "snapkv", "--kv-budget", "96", "--page-size", "16",
        "--chunked-prefill-size", "128", "--disable-overlap-schedule", "--kv-text-prefix", "share",
    ],
}  # fmt: skip
# SGLang's own test switch: every 3rd decode step retracts requests while more than one is
# running (they are prefilled, and so compressed, again later). Single requests never are.
RETRACT_ENV = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}


@pytest.fixture(scope="module", params=sorted(SERVER_CONFIGS))
def server(request, tiny_model_path, tmp_path_factory):
    debug_dir = tmp_path_factory.mktemp("keep")
    args = SERVER_CONFIGS[request.param] + [
        "--dtype", "float32", "--max-total-tokens", "6144", "--kv-debug-dir", str(debug_dir),
        "--enable-metrics",
    ]  # fmt: skip
    with running_server(tiny_model_path, args, env={**os.environ, **RETRACT_ENV}) as s:
        s.debug_dir = debug_dir
        s.config_name = request.param
        s.page = 16 if "page16" in request.param else 1
        yield s


# 296 and 286 prompt tokens: with 128-token chunks the second prompt's last chunk (30 tokens)
# is shorter than the 32-token window, whose queries then straddle two chunks.
QUESTIONS = ("Describe the picture in detail, row by row.", "Red?")


def policy_of(server) -> str:
    return "bacon" if server.config_name == "page1-overlap" else "snapkv"


@pytest.mark.parametrize("question", QUESTIONS)
def test_compressed_decode_matches_reference(server, processor, hf_model, hf_eager, question):
    img = demo_image()
    text = chat_prompt(processor, question)
    reply = generate(server.base_url, text, img)
    report = reply["meta_info"]["kv_compression"]
    budget = 64 if server.config_name == "page1-overlap" else 96
    assert report["budget"] == budget
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + budget
    assert report["evicted_tokens"] == report["prompt_tokens"] - report["kept_tokens"]
    record = assert_like_reference(
        server, processor, hf_model, hf_eager, text, img, reply, policy_of(server)
    )
    assert record["keep"].shape[-1] == budget
    assert_integrity(server.base_url)


def test_follow_up_question_hits_the_full_prompt(server, processor, hf_model, hf_eager):
    """``--kv-prefix-cache full`` (the default): the first question's whole prompt stays in
    the radix tree with its full KV; a second question about the same image matches all of
    it but its observation window (whose queries its prefill must compute), scores its
    window over exact full keys and compresses its whole prompt into its own copy: keep-sets
    and decode equal the reference. (Asked while the first decodes:
    ``tests/test_prefix_cache_e2e.py``.)"""
    from PIL import Image

    img = demo_image().transpose(Image.ROTATE_90)
    first_text, second_text = image_prompt("Which shape is red?"), image_prompt("And blue?")
    first = generate(server.base_url, first_text, img)
    second = generate(server.base_url, second_text, img)
    share = "share" in SERVER_CONFIGS[server.config_name]
    assert_follow_up_hit(processor, first, second, first_text, second_text, img, server.page, share)
    for reply, text in ((first, first_text), (second, second_text)):
        assert_like_reference(
            server, processor, hf_model, hf_eager, text, img, reply, policy_of(server)
        )
    assert_integrity(server.base_url)


def assert_follow_up_hit(
    processor, first, second, first_text, second_text, img, page, text_shared=False
) -> None:
    """Both replies were compressed into copies, each leaving its prompt in the tree, and
    the second matched the first's prompt but for its own observation window; only the
    text before the image is kept whole, with ``--kv-text-prefix share`` (``text_shared``)."""
    prompt = second["meta_info"]["prompt_tokens"]
    window = 32
    matched = min(common_prefix(processor, img, first_text, second_text), prompt - window)
    assert second["meta_info"]["cached_tokens"] == matched // page * page
    ids = processor(text=[second_text], images=[img])["input_ids"][0]
    image_end = ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    assert matched >= image_end - window  # system text and image cached, but the window
    image_start = ids.index(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    kept_whole = image_start // page * page if text_shared else 0
    for reply in (first, second):
        report = reply["meta_info"]["kv_compression"]
        assert report["kv_source"] == "copy" and not report["copy_fallback"]
        assert report["cached_tokens"] == reply["meta_info"]["cached_tokens"]
        assert report["tree_tokens"] == report["prompt_tokens"] // page * page
        assert report["shared_prefix_tokens"] == kept_whole  # the rest is all compressed


def test_uncompressed_when_budget_exceeds_prompt(server, processor, hf_model):
    """A short prompt is served exactly as without compression (no report)."""
    text = chat_prompt(processor, "Hi.", with_image=False)
    reply = generate(server.base_url, text)
    assert "kv_compression" not in reply["meta_info"]
    full = {"keep": torch.arange(reply["meta_info"]["prompt_tokens"]).expand(4, 2, -1)}
    full["prompt_len"] = reply["meta_info"]["prompt_tokens"]
    tokens, logprobs = served_tokens(reply)
    ref_tokens, ref_logprobs = reference_decode(hf_model, processor, text, None, full, MAX_NEW)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )
    assert_integrity(server.base_url)


def test_memory_is_freed_while_decoding(server, processor):
    """During decode a compressed request holds kept + generated slots, not its prompt."""
    text = chat_prompt(processor, "Describe the picture.")
    before = assert_integrity(server.base_url)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(generate(server.base_url, text, demo_image(), max_new=120))
    )
    worker.start()
    samples = []
    while worker.is_alive():
        mem = kv_memory(server.base_url)
        samples.append(mem["total"] - mem["available"] - mem["evictable"])
        time.sleep(0.1)
    worker.join()
    report = result["meta_info"]["kv_compression"]
    after = assert_integrity(server.base_url)
    assert after["freed_slots"] - before["freed_slots"] == report["freed_slots"]
    page = server.page
    kept_slots = -(-report["kept_tokens"] // page) * page  # whole pages
    assert report["freed_slots"] == report["prompt_tokens"] - kept_slots > 0
    in_use = [n for n in samples if n > 0]
    assert in_use, "the request was never observed"
    bound = kept_slots + 120 + page
    assert bound < report["prompt_tokens"]
    # Most samples fall in the decode phase, where the request holds at most `bound` slots.
    assert sorted(in_use)[len(in_use) // 2] <= bound


def test_concurrent_mixed_requests_retraction_and_abort_leak_nothing(server, processor):
    """Compressed and uncompressed requests decode together, are retracted (and compressed
    again when prefilled again), one is aborted mid-decode: all answer, nothing leaks."""
    retracted = "sglang:num_retracted_requests_total"
    before = prometheus(server.base_url, retracted).get(retracted, 0.0)
    long_text = chat_prompt(processor, "Tell me about the shapes.")
    short_text = chat_prompt(processor, "Hello there.", with_image=False)
    replies = []

    def send(text, img):
        replies.append(generate(server.base_url, text, img, max_new=12))

    threads = [threading.Thread(target=send, args=(long_text, demo_image())) for _ in range(3)]
    threads += [threading.Thread(target=send, args=(short_text, None)) for _ in range(2)]
    # An aborted request, mid-decode.
    aborted = threading.Thread(
        target=lambda: generate(
            server.base_url, long_text, demo_image(), max_new=400, rid="abort-me"
        )
    )
    aborted.start()
    for t in threads:
        t.start()
    time.sleep(3)
    requests.post(server.base_url + "/abort_request", json={"rid": "abort-me"}, timeout=60)
    for t in threads:
        t.join()
    aborted.join()
    assert len(replies) == 5
    compressed = [r for r in replies if "kv_compression" in r["meta_info"]]
    assert len(compressed) == 3
    assert all(r["meta_info"]["completion_tokens"] == 12 for r in replies)
    assert prometheus(server.base_url, retracted)[retracted] > before
    assert_integrity(server.base_url)


@pytest.mark.parametrize("prefix_cache", ["full", "shared"])
def test_retracted_requests_answer_as_if_never_retracted(server, processor, prefix_cache):
    """SGLang's forced retraction (every 3rd decode step while more than one request runs):
    three concurrent greedy image requests are retracted and prefilled again. Each answers
    the tokens it answers alone (never retracted), reports its prompt only, as at its first
    prefill (the tokens it had generated are no prompt and are never compressed away), and
    the prefill after the retraction (its keep-set file ``<rid>.retracted.pt``) keeps the
    prompt tokens its first prefill chose, then every generated token."""
    retracted = "sglang:num_retracted_requests_total"
    before = prometheus(server.base_url, retracted).get(retracted, 0.0)
    reuses = kv_memory(server.base_url)["retraction_reuses"]
    override = {"prefix_cache": prefix_cache}
    questions = ("Describe the picture.", "Which shape is red?", "Count the circles, please.")
    texts = [chat_prompt(processor, q) for q in questions]
    # An image of its own: compacted in place, a prompt matched in the tree stays whole.
    img = demo_image().rotate(90 if prefix_cache == "full" else 270)
    replies = [None] * len(texts)

    def send(i: int) -> None:
        replies[i] = generate(server.base_url, texts[i], img, 24, override)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert prometheus(server.base_url, retracted)[retracted] > before
    assert kv_memory(server.base_url)["retraction_reuses"] > reuses
    retracted_seen = 0
    for reply in replies:
        report, meta = reply["meta_info"]["kv_compression"], reply["meta_info"]
        assert report["prompt_tokens"] == meta["prompt_tokens"]
        assert report["kept_tokens"] + report["evicted_tokens"] == meta["prompt_tokens"]
        assert meta["completion_tokens"] == 24
        first = torch.load(server.debug_dir / f"{meta['id']}.pt")
        assert first["prompt_len"] == meta["prompt_tokens"]
        assert first["keep"].shape[-1] == report["kept_tokens"] - report["shared_prefix_tokens"]
        again = server.debug_dir / f"{meta['id']}.retracted.pt"
        if meta["num_retractions"] == 0:
            assert not again.exists()
            continue
        retracted_seen += 1
        last = torch.load(again)
        generated = last["prompt_len"] - meta["prompt_tokens"]
        assert 0 < generated < 24
        prompt_kept = first["keep"].shape[-1]
        assert torch.equal(last["keep"][..., :prompt_kept], first["keep"])
        tail = torch.arange(meta["prompt_tokens"], last["prompt_len"])
        assert torch.equal(last["keep"][..., prompt_kept:], tail.expand(4, 2, -1))
    assert retracted_seen > 0
    for text, reply in zip(texts, replies, strict=True):  # one request alone is never retracted
        alone = generate(server.base_url, text, img, 24, override)
        assert alone["meta_info"]["num_retractions"] == 0
        assert reply["output_ids"] == alone["output_ids"], reply["meta_info"]["num_retractions"]
    assert_integrity(server.base_url)


def test_in_place_mode_shares_the_matched_prefix_and_never_inserts(
    server, processor, hf_model, hf_eager
):
    """``prefix_cache: shared`` (compaction in place): an uncompressed request (per-request
    override: none) puts its prompt in the radix tree; longer compressed requests starting
    with it reuse it as their shared prefix and compress only the rest; compressed KV is
    never inserted, so identical compressed requests match the same prefix and decode
    identically, and exactly as a reference without any cache that keeps the same prefix
    whole and the same keep-sets."""
    img = demo_image()
    head = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Look at the grid."
    tail = " Now describe every row of the grid, one by one, and name each shape." * 6
    plain = generate(server.base_url, head, img, override={"policy": "none"})
    assert "kv_compression" not in plain["meta_info"]
    in_place = {"prefix_cache": "shared"}
    second = generate(server.base_url, head + tail, img, override=in_place)
    third = generate(server.base_url, head + tail, img, override=in_place)
    for reply in (second, third):
        report = reply["meta_info"]["kv_compression"]
        cached = reply["meta_info"]["cached_tokens"]
        assert 0 < cached <= plain["meta_info"]["prompt_tokens"]
        assert report["shared_prefix_tokens"] == cached
        assert report["kept_tokens"] == cached + report["budget"]
        assert report["kv_source"] == "in_place" and report["tree_tokens"] == cached
    assert served_tokens(second) == served_tokens(third)
    record = torch.load(server.debug_dir / f"{second['meta_info']['id']}.pt")
    assert record["prefix_len"] == second["meta_info"]["cached_tokens"]
    policy = "bacon" if server.config_name == "page1-overlap" else "snapkv"
    expected = reference_keep_sets(hf_eager, processor, head + tail, img, policy, record)
    assert torch.equal(record["keep"], expected)
    ref_tokens, ref_logprobs = reference_decode(
        hf_model, processor, head + tail, img, record, MAX_NEW
    )
    tokens, logprobs = served_tokens(second)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=2e-3, rtol=0
    )
    fourth = generate(server.base_url, head + tail + " More.", img, override=in_place)
    assert fourth["meta_info"]["cached_tokens"] == second["meta_info"]["cached_tokens"]
    assert_integrity(server.base_url)


@pytest.mark.parametrize("mode", ["shared", "full"])
def test_text_before_the_first_image_is_shared_or_compressed(
    server, processor, hf_model, hf_eager, mode
):
    """With ``--kv-text-prefix share`` (the page-16 server) a long system text before the
    image is kept whole and enters the radix tree, so a later request with the same text and
    another image reuses its KV; by default (the page-1 server) it is compressed like the
    rest. In place (``shared``), nothing else of a compressed request is ever matched; with
    a copy (``full``), the first request's whole prompt is in the tree, and the second,
    another image behind the same text, matches exactly the text (never the other image)."""
    from PIL import Image

    system = f"You are a careful assistant who reads grids of coloured shapes ({mode}). " * 8
    share = "share" in SERVER_CONFIGS[server.config_name]
    page = server.page
    replies = []
    for question, img in (
        ("Describe the picture.", demo_image()),
        ("Which shapes are red?", demo_image().transpose(Image.FLIP_LEFT_RIGHT)),
    ):
        text = image_prompt(question, system)
        reply = generate(server.base_url, text, img, override={"prefix_cache": mode})
        replies.append(reply)
        ids = processor(text=[text], images=[img], return_tensors="pt")["input_ids"][0].tolist()
        text_len = ids.index(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        shared = text_len // page * page if share else 0
        report = reply["meta_info"]["kv_compression"]
        assert report["cached_tokens"] == reply["meta_info"]["cached_tokens"]
        if mode == "shared":
            # earlier tests' uncompressed prompts in the tree may match a few first tokens
            shared = max(shared, reply["meta_info"]["cached_tokens"])
        assert report["shared_prefix_tokens"] == shared
        assert report["kept_tokens"] == shared + report["budget"]
        assert report["kv_source"] == ("copy" if mode == "full" else "in_place")
        record = torch.load(server.debug_dir / f"{reply['meta_info']['id']}.pt")
        policy = "bacon" if server.config_name == "page1-overlap" else "snapkv"
        expected = reference_keep_sets(hf_eager, processor, text, img, policy, record)
        assert torch.equal(record["keep"], expected)
        ref_tokens, _ = reference_decode(hf_model, processor, text, img, record, MAX_NEW)
        assert served_tokens(reply)[0] == ref_tokens
    first, second = (r["meta_info"]["cached_tokens"] for r in replies)
    if mode == "full":
        assert second == text_len // page * page > 100 > first
    elif share:
        assert second == shared > 100 > first
    else:
        assert second == first < 16  # the first request's KV never entered the tree
    assert_integrity(server.base_url)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"policy": "bogus"}, "kv_compression.policy: must be one of none, snapkv, bacon"),
        ({"policy": "adakv"}, "kv_compression.policy: adakv keeps a different number"),
        ({"budget": 0}, "kv_compression.budget: must be an integer >= 1"),
        ({"kv_bugdet": 64}, "unknown key 'kv_bugdet'"),
        ("bacon", "must be a JSON object"),
    ],
)
def test_malformed_override_is_a_clear_400(server, override, message):
    body = {
        "text": "hello",
        "sampling_params": {"max_new_tokens": 2, "custom_params": {"kv_compression": override}},
    }
    reply = requests.post(server.base_url + "/generate", json=body, timeout=60)
    assert reply.status_code == 400
    assert message in reply.text
    assert_integrity(server.base_url)


def test_override_changes_the_budget(server, processor):
    text = chat_prompt(processor, "Describe the picture.")
    reply = generate(server.base_url, text, demo_image(), override={"budget": 128})
    report = reply["meta_info"]["kv_compression"]
    assert report["budget"] == 128
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + 128
    assert_integrity(server.base_url)


def prometheus(base_url: str, prefix: str) -> dict[str, float]:
    """Counters ``<prefix>*_total`` of ``/metrics``, summed over labels."""
    values: dict[str, float] = {}
    for line in requests.get(base_url + "/metrics", timeout=60).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith(prefix) and name.endswith("_total"):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_prometheus_counters_match_the_pool_accounting(server, processor):
    generate(server.base_url, chat_prompt(processor, "Describe the picture."), demo_image())
    mem = assert_integrity(server.base_url)
    values = prometheus(server.base_url, "sglang:bacon_")
    assert values["sglang:bacon_compressed_requests_total"] == mem["compressed_requests"] > 0
    assert values["sglang:bacon_evicted_tokens_total"] == mem["evicted_tokens"]
    assert values["sglang:bacon_freed_slots_total"] == mem["freed_slots"]
    assert values.get("sglang:bacon_copy_fallbacks_total", 0.0) == mem["copy_fallbacks"]


def test_frontend_program_three_turn_chat_hits_the_cache(server, tmp_path):
    """An SGLang frontend program (sgl.image + sgl.gen, three turns about one image)
    against the compressing server: every turn is answered and compressed, and turns 2 and 3
    match the previous turn's whole prompt in the radix cache (``--kv-prefix-cache full``;
    the previous answers were decoded from compressed KV, so they are not cached)."""
    import sglang as sgl

    @sgl.function
    def chat(s, image_path):
        s += sgl.system("You answer questions about grids of shapes.")
        s += sgl.user(sgl.image(image_path) + "What is in row 3?")
        s += sgl.assistant(sgl.gen("turn1", max_tokens=24, temperature=0, ignore_eos=True))
        s += sgl.user("And in row 4?")
        s += sgl.assistant(sgl.gen("turn2", max_tokens=24, temperature=0, ignore_eos=True))
        s += sgl.user("And in row 5?")
        s += sgl.assistant(sgl.gen("turn3", max_tokens=24, temperature=0, ignore_eos=True))

    from PIL import Image

    path = tmp_path / "grid.png"
    demo_image().transpose(Image.TRANSPOSE).save(path)
    state = chat.run(image_path=str(path), backend=sgl.RuntimeEndpoint(server.base_url))
    metas = [state.get_meta_info(f"turn{k}") for k in (1, 2, 3)]
    page = server.page
    for k, meta in enumerate(metas):
        assert state[f"turn{k + 1}"] and meta["completion_tokens"] == 24
        report = meta["kv_compression"]
        assert report["kept_tokens"] == report["shared_prefix_tokens"] + report["budget"]
        assert report["kv_source"] == "copy"
        if k:
            previous = metas[k - 1]["prompt_tokens"]
            assert meta["prompt_tokens"] > previous
            assert meta["cached_tokens"] >= previous // page * page
    assert_integrity(server.base_url)


def test_sglang_bench_serving_runs_unchanged(server, tiny_model_path, tmp_path):
    """SGLang's own throughput benchmark (``sglang.bench_serving``, its offline ``image``
    dataset of random images) against the compressing server: every request completes, every
    one (and the warm-up) is compressed, and the pool is whole afterwards."""
    before = assert_integrity(server.base_url)["compressed_requests"]
    port = server.base_url.rsplit(":", 1)[1]
    out = tmp_path / "bench.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--port", port,
         "--model", str(tiny_model_path), "--dataset-name", "image", "--num-prompts", "4",
         "--image-count", "1", "--image-resolution", "448x448", "--random-input-len", "16",
         "--random-output-len", "4", "--max-concurrency", "2", "--seed", "1",
         "--disable-tqdm", "--output-file", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 4 and result["total_output_tokens"] > 0, result
    assert result["total_input_vision_tokens"] >= 4 * 256
    after = assert_integrity(server.base_url)["compressed_requests"]
    # 4 requests + bench_serving's warm-up; a request the test servers' forced retraction
    # (SGLANG_TEST_RETRACT) sends back is compressed again when it is prefilled again.
    assert after - before >= 5
