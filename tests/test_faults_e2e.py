"""No client request can take the server down or leave anything behind (CPU engine).

One server as a user first broke it: the shipped shapes model, ``--kv-policy bacon
--kv-budget 64 --page-size 16 --chunked-prefill-size 128``, keep-set files on, metrics on, and
a test plugin (``fault_plugin/``, loaded through SGLang's own plugin entry point) that makes
compression fail on purpose for requests that ask for one of its magic budgets. Every test
ends with the pool whole and nothing stashed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import requests
from test_compression_e2e import assert_integrity

from bacon_sglang.demo import demo_image, image_data_url, kv_memory
from bacon_sglang.server import running_server

pytestmark = pytest.mark.engine

FAULT_PLUGIN = Path(__file__).with_name("fault_plugin")
ARGS = [
    "--kv-policy", "bacon", "--kv-budget", "64", "--page-size", "16",
    "--chunked-prefill-size", "128", "--dtype", "float32", "--max-total-tokens", "8192",
    "--enable-metrics",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    debug_dir = tmp_path_factory.mktemp("keep") / "sets"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULT_PLUGIN), *_pythonpath()])}
    with running_server(tiny_model_path, [*ARGS, "--kv-debug-dir", str(debug_dir)], env=env) as s:
        s.debug_dir = debug_dir
        yield s


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def image_prompt(question: str, text_before: str = "") -> str:
    return (
        f"<|im_start|>user\n{text_before}<|vision_start|><|image_pad|><|vision_end|>"
        f"{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def body(override=None, max_new: int = 4, text: str | None = None, **extra) -> dict:
    sampling = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    if override is not None:
        sampling["custom_params"] = {"kv_compression": override}
    return {
        "text": text or image_prompt("Which shape is red?"),
        "image_data": image_data_url(demo_image()),
        "sampling_params": sampling,
        **extra,
    }


def post(server, path: str, payload: dict, **kwargs) -> requests.Response:
    return requests.post(server.base_url + path, json=payload, timeout=600, **kwargs)


def assert_whole(server) -> dict:
    """Idle: the pool whole and nothing stashed (:func:`assert_integrity`), the server alive."""
    mem = assert_integrity(server.base_url)
    assert requests.get(server.base_url + "/health", timeout=60).status_code == 200
    return mem


# Per key: values out of range or of the wrong type; each must be refused with the key named.
BAD_VALUES = {
    "policy": ["bogus", 1, None, ["bacon"], {"name": "bacon"}],
    "budget": [0, -1, 16, 10**9, 4611686018427387905, 1.5, 0.0, "64", None, True, [64]],
    "window": [0, -3, 2000, 10**12, 31.5, 32.0, "32", None, False, {"w": 32}],
    "pool_kernel": [4, 0, -1, 33, 2000001, 4611686018427387905, 5.0, "5", None, [5]],
    "min_prompt": [0, -1, 10**9, 1.5, "100", None, {"n": 1}],
    "prefix_cache": ["all", 0, None, ["full"]],
}
CASES = [(key, value) for key, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v!r}"[:40] for k, v in CASES])
def test_bad_override_is_a_400_naming_the_key(server, key, value):
    reply = post(server, "/generate", body({key: value}))
    assert reply.status_code == 400, reply.text
    assert f"kv_compression.{key}" in reply.text, reply.text


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_overrides_on_the_openai_routes_and_streams(server, key):
    """The OpenAI routes answer 400 too; a streamed request gets the same error event SGLang
    sends for its own invalid sampling parameters; the server then serves on."""
    for value in BAD_VALUES[key][:3]:
        bad = {key: value}
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(demo_image())}},
            {"type": "text", "text": "Which shape is red?"},
        ]
        chat = {
            "model": "default",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "custom_params": {"kv_compression": bad},
        }
        for stream in (False, True):
            reply = post(server, "/v1/chat/completions", {**chat, "stream": stream})
            assert reply.status_code == 400, reply.text
            assert f"kv_compression.{key}" in reply.text, reply.text
        completion = {"model": "default", "prompt": "hello", "max_tokens": 2}
        reply = post(
            server, "/v1/completions", {**completion, "custom_params": {"kv_compression": bad}}
        )
        assert reply.status_code == 400 and f"kv_compression.{key}" in reply.text, reply.text
        ours = streamed(server, body(bad))
        sglangs = streamed(
            server, {**body(), "sampling_params": {"max_new_tokens": 4, "temperature": -1}}
        )
        assert ours[0] == sglangs[0]
        assert [set(e) for e in ours[1]] == [set(e) for e in sglangs[1]] == [{"error"}]
        assert f"kv_compression.{key}" in ours[1][0]["error"]["message"]
    assert post(server, "/generate", body()).status_code == 200
    assert_whole(server)


def streamed(server, payload: dict) -> tuple[int, list[dict]]:
    """POST /generate with ``stream``: the status and the JSON events."""
    reply = post(server, "/generate", {**payload, "stream": True}, stream=True)
    events = [
        json.loads(line[len(b"data: ") :])
        for line in reply.iter_lines()
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]
    return reply.status_code, events


def test_the_request_that_killed_the_server_is_refused_and_the_server_serves_on(server):
    reply = post(server, "/generate", body({"pool_kernel": 4611686018427387905}))
    assert reply.status_code == 400
    good = post(server, "/generate", body(max_new=2))
    assert good.status_code == 200, good.text
    assert good.json()["meta_info"]["kv_compression"]["policy"] == "bacon"
    assert_whole(server)


def long_text(tokens: int) -> str:
    return "one two three four five six seven eight nine ten " * (tokens // 10)


def test_abort_mid_chunked_prefill_leaves_nothing_and_the_rid_can_be_reused(server):
    """A 3,000-token text before the image, aborted one second into its chunked prefill:
    nothing stays stashed, and a later request with the same rid and another window is
    served (it used to pick the stale stash up and end the server)."""
    rid = "reused-rid"
    payload = body({"window": 64, "budget": 128}, text=image_prompt("Red?", long_text(3000)))
    done = []
    first = threading.Thread(
        target=lambda: done.append(post(server, "/generate", {**payload, "rid": rid}))
    )
    first.start()
    time.sleep(1.0)
    post(server, "/abort_request", {"rid": rid})
    first.join()
    assert done and done[0].json()["meta_info"]["finish_reason"]["type"] == "abort"
    again = post(server, "/generate", {**body({"window": 32, "budget": 32}), "rid": rid})
    assert again.status_code == 200, again.text
    report = again.json()["meta_info"]["kv_compression"]
    assert report["kept_tokens"] == report["shared_prefix_tokens"] + 32
    assert_whole(server)


def test_keep_set_files_stay_inside_the_debug_dir(server):
    """Client rids name files only through a safe encoding: ``../x`` writes nothing outside
    the folder, ``a/b`` no longer ends the server."""
    for rid in ("../x", "a/b", "plain-rid_1"):
        reply = post(server, "/generate", {**body(max_new=1), "rid": rid})
        assert reply.status_code == 200, reply.text
    files = sorted(p.name for p in server.debug_dir.iterdir())
    assert "plain-rid_1.pt" in files
    assert not (server.debug_dir.parent / "x.pt").exists()
    assert sum(name.startswith("___x-") for name in files) == 1
    assert sum(name.startswith("a_b-") for name in files) == 1
    assert all(
        (server.debug_dir / name).resolve().parent == server.debug_dir.resolve() for name in files
    )
    assert_whole(server)


def test_parallel_sampling_compresses_each_sample_not_the_warm_up(server):
    before = kv_memory(server.base_url)["compressed_requests"]
    payload = body(max_new=3)
    payload["sampling_params"] = {**payload["sampling_params"], "n": 3, "temperature": 0.7}
    reply = post(server, "/generate", payload)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()) == 3
    assert kv_memory(server.base_url)["compressed_requests"] - before == 3
    assert_whole(server)


@pytest.mark.parametrize(
    ("stage", "prefix_cache"),
    [("plan", "full"), ("score", "full"), ("compact", "full"), ("compact", "shared")],
)
def test_a_compression_failure_is_contained(server, stage, prefix_cache):
    """The test plugin raises in one stage of the compression path for a request asking for
    its magic budget. Before any KV moved (planning, scoring, compaction into a copy) the
    request is answered as without compression (the tokens of ``policy none``); compacted in
    place, its KV may be half moved, so it alone is aborted (HTTP 500). Either way the
    failure is counted (/server_info, Prometheus, one log line with the rid) and the server
    serves on."""
    from fault_plugin.bacon_faults import MAGIC_BUDGET

    before = kv_memory(server.base_url)
    override = {"budget": MAGIC_BUDGET[stage], "prefix_cache": prefix_cache}
    text = image_prompt("Red?", f"Case {stage}, {prefix_cache}: ")  # no cache hit in place
    reply = post(server, "/generate", body(override, max_new=6, text=text))
    if prefix_cache == "full":
        plain = post(server, "/generate", body({"policy": "none"}, max_new=6, text=text)).json()
        assert reply.status_code == 200, reply.text
        assert "kv_compression" not in reply.json()["meta_info"]
        assert reply.json()["output_ids"] == plain["output_ids"]
        rid = reply.json()["meta_info"]["id"]
    else:
        assert reply.status_code == 500, reply.text
        assert "KV compaction failed" in reply.text
        rid = None
    after = assert_whole(server)
    assert after["failures"] == before["failures"] + 1
    metrics = requests.get(server.base_url + "/metrics", timeout=60).text
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sglang:bacon_compression_failures_total")
    ]
    assert sum(counted) == after["failures"]
    if rid is not None:
        assert f"compression of {rid} failed ({stage}" in server.log()
    assert post(server, "/generate", body(max_new=2)).json()["meta_info"]["kv_compression"]
