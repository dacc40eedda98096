"""Two compressing CPU servers behind sglang-router (the Rust gateway) with cache-aware
routing: requests through the router are compressed, and a follow-up question in the same
conversation lands on the worker that holds its prefix in its radix cache."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from test_compression_e2e import assert_integrity, generate

from bacon_sglang.demo import demo_image, kv_memory
from bacon_sglang.router import running_cluster, worker_list

pytestmark = pytest.mark.engine

pytest.importorskip("sglang_router", reason="sglang-router is in the dev extra")

BUDGET = 64
# --kv-text-prefix share: a conversation's system text (before its image) stays whole and
# enters the radix tree, so the worker that served the first turn holds that prefix.
WORKER_ARGS = ["--kv-policy", "bacon", "--kv-budget", str(BUDGET), "--kv-text-prefix", "share",
               "--max-total-tokens", "4096"]  # fmt: skip
# Cache-aware routing, with load balancing whenever the workers' loads differ (the defaults
# balance only past 64 requests of difference): a new conversation sent while another runs
# goes to the idle worker; a follow-up, sent when both are idle, goes by prefix match.
ROUTER_ARGS = ["--balance-abs-threshold", "0", "--balance-rel-threshold", "1.0"]


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    with running_cluster(
        tiny_model_path, 2, WORKER_ARGS, "cache_aware", ROUTER_ARGS, startup_timeout=900
    ) as c:
        yield c


def conversation(system: str, turns: list[tuple[str, str | None]]) -> str:
    """A Qwen2-VL chat prompt: the system text, the image, then (question, answer) turns;
    the last turn's answer is None (the assistant is to answer it)."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    text += "<|vision_start|><|image_pad|><|vision_end|>"
    for i, (question, answer) in enumerate(turns):
        text += ("" if i == 0 else "<|im_start|>user\n") + f"{question}<|im_end|>\n"
        text += "<|im_start|>assistant\n" + (f"{answer}<|im_end|>\n" if answer else "")
    return text


def compressed_counts(workers) -> list[int]:
    return [kv_memory(w.base_url)["compressed_requests"] for w in workers]


def served_by(workers, before: list[int]) -> int:
    """Index of the one worker whose compressed-request count moved since ``before``
    (waits for it: a request is compressed at the end of its prefill)."""
    deadline = time.monotonic() + 300
    while (after := compressed_counts(workers)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    moved = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a != b]
    assert len(moved) == 1, (before, after)
    return moved[0]


def test_router_lists_both_workers(cluster):
    router, workers = cluster
    listed = worker_list(requests.get(router.base_url + "/workers", timeout=30).json())
    assert len(listed) == 2


def check_first_turn(reply: dict) -> None:
    report = reply["meta_info"]["kv_compression"]
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + BUDGET
    assert report["shared_prefix_tokens"] > 100  # the system text, kept whole


def test_follow_ups_land_on_the_worker_holding_the_prefix(cluster):
    """Two conversations (different system texts and images) through the router: the
    second starts while the first is still decoding and goes to the idle worker; every turn
    is compressed; each follow-up (both workers idle) goes by prefix match to its
    conversation's worker, where the system text is a radix-cache hit."""
    from PIL import Image

    router, workers = cluster
    chats = {
        "grid": ("You are a careful assistant who reads grids of coloured shapes. " * 6,
                 demo_image()),
        "mirror": ("Answer every question about the mirrored picture in one sentence. " * 6,
                   demo_image().transpose(Image.FLIP_LEFT_RIGHT)),
    }  # fmt: skip
    home, first = {}, {}
    (system, img), (system_b, img_b) = chats.values()
    start = compressed_counts(workers)
    running = threading.Thread(
        target=lambda: first.update(grid=generate(
            router.base_url, conversation(system, [("Describe it.", None)]), img, max_new=160))
    )  # fmt: skip
    running.start()
    home["grid"] = served_by(workers, start)
    middle = compressed_counts(workers)
    first["mirror"] = generate(
        router.base_url, conversation(system_b, [("Describe it.", None)]), img_b
    )
    home["mirror"] = served_by(workers, middle)
    running.join()
    assert sorted(home.values()) == [0, 1]
    for reply in first.values():
        check_first_turn(reply)
    for name, (system, img) in chats.items():
        answer = first[name]["text"]
        turns = [("Describe it.", answer), ("And the row below?", None)]
        before = compressed_counts(workers)
        reply = generate(router.base_url, conversation(system, turns), img)
        assert served_by(workers, before) == home[name]
        shared = first[name]["meta_info"]["kv_compression"]["shared_prefix_tokens"]
        assert reply["meta_info"]["cached_tokens"] >= shared
        assert "kv_compression" in reply["meta_info"]
    for w in workers:
        assert_integrity(w.base_url)
