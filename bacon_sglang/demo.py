"""The README's demo: a compressing SGLang server on the shipped tiny model answers one visual
question and reports what it compressed; on CPU (2 cores) 1-5 minutes, depending on the load,
nearly all of it SGLang's start-up.

    python -m bacon_sglang.demo [--policy bacon] [--budget 64] [--index N] [--model-path DIR]

Starts SGLang's HTTP server with ``--kv-policy`` on the shipped tiny Qwen2-VL model trained on
synthetic sparse-evidence VQA (``bacon_sglang/models/tiny_vqa``; ``--model-path`` serves
another one), asks it question ``--index`` of the VQA test split about its generated image
(a grid of coloured shapes whose answer lives in one cell) through the OpenAI-compatible chat
API, prints the question, the expected and the model's answer and the KV-compression report,
and stops the server. With no GPU the server runs SGLang's real engine on CPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time

import requests
from PIL import Image, ImageDraw

from bacon_sglang.models import vqa
from bacon_sglang.server import cpu_engine, running_server


def demo_image(size: int = 448) -> Image.Image:
    """A grid of coloured shapes, the kind of picture whose answer lives in one cell."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    colours = ["red", "green", "blue", "orange", "purple", "black", "brown", "gray"]
    cells = 8
    step = size // cells
    for r in range(cells):
        for c in range(cells):
            x, y = c * step, r * step
            colour = colours[(r * 3 + c) % len(colours)]
            if (r + c) % 2:
                draw.ellipse([x + 6, y + 6, x + step - 6, y + step - 6], fill=colour)
            else:
                draw.rectangle([x + 6, y + 6, x + step - 6, y + step - 6], fill=colour)
    return img


def image_data_url(img: Image.Image) -> str:
    """``img`` as a ``data:image/png;base64,...`` URL (what SGLang's ``image_data`` and the
    OpenAI ``image_url`` accept)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_request(base_url: str, question: str, img: Image.Image, max_tokens: int) -> dict:
    """POST /v1/chat/completions with one image and one question; returns the JSON reply."""
    body = {
        "model": "default",
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(img)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }
    reply = requests.post(base_url + "/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply.json()


def kv_memory(base_url: str) -> dict:
    """The server's KV accounting and compression counters (``GET /server_info``)."""
    info = requests.get(base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0].get("bacon_kv", {})


def report(reply: dict, policy: str, budget: str, seconds: float, before: dict, after: dict) -> str:
    """Human-readable summary of one chat reply and what the server compressed for it."""
    usage = reply.get("usage", {})
    details = usage.get("prompt_tokens_details") or {}
    compression = {
        key: after.get(key, 0) - before.get(key, 0)
        for key in ("compressed_requests", "evicted_tokens", "freed_slots")
    }
    lines = [
        f"model answer      : {reply['choices'][0]['message']['content']!r}",
        f"prompt tokens     : {usage.get('prompt_tokens')} "
        f"(image tokens: {details.get('image_tokens')})",
        f"completion tokens : {usage.get('completion_tokens')}",
        f"request time      : {seconds:.2f} s",
        f"server policy     : --kv-policy {policy} --kv-budget {budget}",
    ]
    if compression["compressed_requests"]:
        kept = usage.get("prompt_tokens", 0) - compression["evicted_tokens"]
        lines.append(
            f"kv compression    : kept {kept} of {usage.get('prompt_tokens')} prompt tokens per "
            f"KV head, evicted {compression['evicted_tokens']}, freed "
            f"{compression['freed_slots']} KV slots"
        )
    else:
        lines.append("kv compression    : none (policy none, or prompt below --kv-min-prompt)")
    lines.append(
        f"kv pool after     : {after.get('available')} of {after.get('total')} slots free, "
        f"{after.get('evictable')} cached in the radix tree"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="bacon", help="--kv-policy of the server")
    parser.add_argument("--budget", default="64", help="--kv-budget of the server")
    parser.add_argument(
        "--model-path", default=str(vqa.MODEL_DIR), help="model directory (default: shipped)"
    )
    # Question 0: "Which shape is purple?" (the model answers 199 of the first 200 test
    # questions with the full cache; see bacon_sglang/models/tiny_vqa/README.md).
    parser.add_argument("--index", type=int, default=0, help="question of the VQA test split")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    sample = vqa.sample("test", args.index)
    engine = "CPU engine (no GPU found)" if cpu_engine() else "GPU"
    print(f"starting SGLang ({engine}) with {args.model_path} ...", flush=True)
    extra = ["--kv-policy", args.policy, "--kv-budget", args.budget, "--max-total-tokens", "8192"]
    with running_server(args.model_path, extra) as server:
        before = kv_memory(server.base_url)
        start = time.perf_counter()
        reply = chat_request(server.base_url, sample.question, sample.image, args.max_tokens)
        seconds = time.perf_counter() - start
        after = kv_memory(server.base_url)
    answer = reply["choices"][0]["message"]["content"]
    row, col = sample.evidence[0]
    print(
        f"image             : {vqa.GRID} x {vqa.GRID} grid, {len(sample.objects)} shapes "
        f"(VQA test split, question {args.index}); evidence in row {row + 1}, column {col + 1}"
    )
    print(f"question          : {sample.question!r}")
    print(f"expected answer   : {sample.answer!r}")
    print(report(reply, args.policy, args.budget, seconds, before, after))
    print(f"correct           : {'yes' if vqa.exact_match(answer, sample) else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
