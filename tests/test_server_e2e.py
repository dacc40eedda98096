"""End to end on SGLang's real engine (CPU when there is no GPU) with the tiny model:
the HTTP server with the OpenAI-compatible API, and sglang.Engine with kv_* keywords."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from bacon_sglang.cpu_shim import cpu_engine_env
from bacon_sglang.demo import chat_request, demo_image
from bacon_sglang.server import CPU_ENGINE_ARGS, cpu_engine, running_server

pytestmark = pytest.mark.engine


def _group_alive(pgid: int, wait: float = 15.0) -> bool:
    """Whether any process of the group is still there after ``wait`` seconds (killed
    children are reaped by init shortly after their parent exits)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)


def test_a_port_taken_before_the_server_binds_it_is_retried(tiny_model_path, monkeypatch):
    """The launcher's first port is held by another socket (as when a starting server's own
    sockets took it): uvicorn cannot bind it, the server exits, and the launcher starts it again
    on the next drawn port instead of failing."""
    import socket

    from bacon_sglang import server as launcher

    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", launcher.free_port()))
    held.listen()
    taken = held.getsockname()[1]
    draws = iter([taken])
    real = launcher.free_port
    monkeypatch.setattr(launcher, "free_port", lambda: next(draws, None) or real())
    try:
        with running_server(
            tiny_model_path, ["--kv-policy", "none", "--max-total-tokens", "4096"]
        ) as s:
            assert not s.base_url.endswith(f":{taken}")
            reply = chat_request(s.base_url, "What colour is the circle?", demo_image(), 4)
    finally:
        held.close()
    assert reply["choices"][0]["message"]["content"]
    assert next(draws, "used") == "used"  # the taken port was drawn first


def test_http_server_chat_with_image(tiny_model_path):
    with running_server(
        tiny_model_path, ["--kv-policy", "none", "--max-total-tokens", "4096"]
    ) as server:
        reply = chat_request(server.base_url, "What colour is the circle?", demo_image(), 8)
        pgid = server.process.pid
    assert server.process.returncode is not None
    assert not _group_alive(pgid), "scheduler or detokenizer left running"
    message = reply["choices"][0]["message"]["content"]
    assert isinstance(message, str) and message
    assert reply["usage"]["completion_tokens"] == 8
    assert reply["usage"]["prompt_tokens_details"]["image_tokens"] == 256
    log = server.log()
    assert "scheduler KV compression config: {'policy': 'none'" in log


ENGINE_SCRIPT = textwrap.dedent(
    """
    import sys
    import sglang
    from transformers import AutoProcessor
    from bacon_sglang.demo import demo_image

    model, device_args = sys.argv[1], eval(sys.argv[2])
    processor = AutoProcessor.from_pretrained(model)
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Which shape is red?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    engine = sglang.Engine(
        model_path=model, kv_policy="snapkv", kv_budget=48, kv_window=16,
        max_total_tokens=4096, skip_server_warmup=True, log_level="info", **device_args)
    out = engine.generate(prompt=prompt, image_data=demo_image(),
                          sampling_params={"max_new_tokens": 6, "temperature": 0})
    engine.shutdown()
    print("ENGINE-OUTPUT", out["meta_info"]["completion_tokens"], repr(out["text"]))
    """
)


def test_engine_takes_kv_keywords(tiny_model_path, tmp_path):
    device_args = (
        {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True}
        if cpu_engine()
        else {}
    )
    assert CPU_ENGINE_ARGS  # the server flags and these keywords describe the same engine
    env = cpu_engine_env() if cpu_engine() else dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, str(tiny_model_path), repr(device_args)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ENGINE-OUTPUT"))
    assert line.split()[1] == "6"
    assert (
        "scheduler KV compression config: {'policy': 'snapkv', 'budget': 48, 'window': 16"
        in out.stderr
    )


def test_readme_demo_answers_with_the_compression_report(tmp_path):
    """The README's demo: the shipped VQA model answers its generated question right with
    --kv-policy bacon --kv-budget 64 (the image's 256 tokens mostly evicted), and its server
    compiles nothing on the first request (TorchInductor's g++ build: 30-45 s cold)."""
    inductor_cache = tmp_path / "inductor"
    out = subprocess.run(
        [sys.executable, "-m", "bacon_sglang.demo"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    if cpu_engine():
        assert not inductor_cache.exists() or not any(inductor_cache.iterdir())
    assert "server policy     : --kv-policy bacon --kv-budget 64" in out.stdout
    assert "kv compression    : kept 64 of " in out.stdout
    assert "model answer      : '" in out.stdout
    assert "correct           : yes" in out.stdout, out.stdout
