"""``--kv-prefix-cache full`` on a small KV pool (1024 slots, page 16, chunked prefill,
overlap scheduler on, no forced retraction): a follow-up question while the first decodes,
full prompts evicted from the radix tree under load, and the in-place fallback when the pool
has no room for a compressed copy. Every test ends with the allocator integrity check."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from PIL import Image
from test_compression_e2e import (
    assert_follow_up_hit,
    assert_integrity,
    assert_like_reference,
    generate,
    image_prompt,
    prometheus,
)

from bacon_sglang.demo import demo_image, kv_memory
from bacon_sglang.server import running_server

pytestmark = pytest.mark.engine

POOL = 1024
PAGE = 16


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    debug_dir = tmp_path_factory.mktemp("keep")
    args = [
        "--kv-policy", "bacon", "--kv-budget", "64", "--page-size", str(PAGE),
        "--chunked-prefill-size", "128", "--dtype", "float32", "--max-total-tokens", str(POOL),
        "--kv-debug-dir", str(debug_dir), "--enable-metrics",
    ]  # fmt: skip
    with running_server(tiny_model_path, args) as s:
        s.debug_dir = debug_dir
        s.config_name = "small-pool"
        s.page = PAGE
        yield s


def images(n: int) -> list[Image.Image]:
    """``n`` different images (the demo grid, rotated and flipped)."""
    base = demo_image()
    turns = [None, Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270]
    out = []
    for k in range(n):
        img = base if turns[k % 4] is None else base.transpose(turns[k % 4])
        out.append(img.transpose(Image.FLIP_LEFT_RIGHT) if k >= 4 else img)
    return out


def test_follow_up_while_the_first_question_decodes(server, processor, hf_model, hf_eager):
    """The second question arrives while the first decodes from its copy: it matches the
    first's full prompt in the tree, both decode together, both equal the reference."""
    img = images(8)[7]
    first_text, second_text = image_prompt("Which shape is red?"), image_prompt("And blue?")
    before = assert_integrity(server.base_url)
    replies = {}
    worker = threading.Thread(
        target=lambda: replies.update(first=generate(server.base_url, first_text, img, 120))
    )
    worker.start()
    deadline = time.monotonic() + 300
    while kv_memory(server.base_url)["copies"] == before["copies"]:
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.05)
    second = generate(server.base_url, second_text, img)
    overlapped = worker.is_alive()
    worker.join()
    first = replies["first"]
    assert overlapped, "the first request finished before the second was answered"
    assert_follow_up_hit(processor, first, second, first_text, second_text, img, PAGE)
    for reply, text in ((first, first_text), (second, second_text)):
        assert_like_reference(server, processor, hf_model, hf_eager, text, img, reply, "bacon")
    assert_integrity(server.base_url)


def test_full_prompts_are_evicted_under_load(server, processor):
    """Six images, one after the other, leave more full prompts than the pool holds: the
    oldest are evicted (LRU), the newest still hit; then a burst of concurrent requests and
    an abort: every request is answered, nothing leaks."""
    imgs = images(6)
    text = image_prompt("Describe the picture.")
    for img in imgs:
        reply = generate(server.base_url, text, img, max_new=4)
        assert reply["meta_info"]["kv_compression"]["kv_source"] == "copy"
    assert_integrity(server.base_url)
    newest = generate(server.base_url, text, imgs[-1], max_new=4)
    oldest = generate(server.base_url, text, imgs[0], max_new=4)
    prompt = newest["meta_info"]["prompt_tokens"]
    assert newest["meta_info"]["cached_tokens"] == (prompt - 32) // PAGE * PAGE
    assert oldest["meta_info"]["cached_tokens"] < 32  # only the shared chat template

    replies = []
    threads = [
        threading.Thread(
            target=lambda img=img: replies.append(generate(server.base_url, text, img, 32))
        )
        for img in images(8)[2:6]
    ]
    aborted = threading.Thread(
        target=lambda: generate(server.base_url, text, images(8)[6], 400, rid="abort-small")
    )
    aborted.start()
    for t in threads:
        t.start()
    time.sleep(3)
    requests.post(server.base_url + "/abort_request", json={"rid": "abort-small"}, timeout=60)
    for t in threads + [aborted]:
        t.join()
    assert len(replies) == 4
    assert all(r["meta_info"]["completion_tokens"] == 32 for r in replies)
    assert all("kv_compression" in r["meta_info"] for r in replies)
    assert_integrity(server.base_url)


def test_no_room_for_a_copy_falls_back_in_place(server, processor, hf_model, hf_eager):
    """A prompt that leaves fewer free slots than its copy needs, even with the whole radix
    tree evicted, is compacted in place: reported, counted, and still equal to the
    reference (its matched prefix kept whole, as in ``--kv-prefix-cache shared``)."""
    img = images(8)[3].transpose(Image.TRANSPOSE)
    sentence = "Each cell of the grid holds one coloured shape or nothing at all. "

    def prompt(n: int) -> tuple[str, int]:
        text = image_prompt("Which shape is red?", system=sentence * n)
        return text, len(processor(text=[text], images=[img])["input_ids"][0])

    (_, one), (_, two) = prompt(1), prompt(2)
    text, length = prompt(1 + (POOL - 40 - one) // (two - one))
    assert POOL - 64 < -(-length // PAGE) * PAGE and length + 8 < POOL
    before = assert_integrity(server.base_url)
    reply = generate(server.base_url, text, img)
    report = reply["meta_info"]["kv_compression"]
    assert report["kv_source"] == "in_place" and report["copy_fallback"]
    assert report["shared_prefix_tokens"] == report["cached_tokens"]
    assert report["tree_tokens"] == report["cached_tokens"]
    assert_like_reference(server, processor, hf_model, hf_eager, text, img, reply, "bacon")
    after = assert_integrity(server.base_url)
    assert after["copy_fallbacks"] == before["copy_fallbacks"] + 1
    assert after["copies"] == before["copies"]
    fallbacks = prometheus(server.base_url, "sglang:bacon_copy_fallbacks")
    assert fallbacks["sglang:bacon_copy_fallbacks_total"] == after["copy_fallbacks"]
