"""Prefix-cache reuse benchmark: several questions per image and three-turn chats, served
with the full KV cache, with BACON compacting in place (``--kv-prefix-cache shared``) and
with BACON leaving each full prompt in the radix tree (``--kv-prefix-cache full``).

One SGLang server per configuration (same model, pool and flags otherwise), two workloads
driven concurrently by ``--clients`` threads:

1. ``questions``: ``--images`` images, ``--questions`` questions about each; a client takes
   an image and asks its questions one after another, each once the previous was answered;
2. ``chat``: ``--chats`` chats of three turns about one image each; every turn's prompt holds
   the previous questions and answers.

Per configuration and workload: TTFT (p50, p99) of first questions and of follow-ups
(questions 2+, turns 2+), the prompt tokens actually prefilled (prompt - cached), and the KV
slots held per running request (``total - available - evictable`` over the running requests,
averaged over samples taken every 50 ms while requests run); then the capacity run of
``benchmarks/serving.py`` (a burst of one-image requests into the fixed pool). On the
``bacon-full`` server, also a paired run (``--paired`` images, one at a time): a question and
a follow-up about each image, alternately compressed and not (per-request override
``{"policy": "none"}``) on the same server, so the follow-up TTFT ratio is immune to drift in
the machine's load between servers. Writes
``prefix_reuse.json``, ``prefix_reuse.md`` and ``prefix_reuse.png`` under
``benchmarks/results/<date>-<device>/``. On this 2-core CPU with the built-in tiny model it
takes about 15 minutes:

    python benchmarks/prefix_reuse.py
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import common
import numpy as np
import requests
import serving
import serving_report as report
from serving_client import Sampler, Workload, grid_image, loads, send

from bacon_sglang.demo import image_data_url
from bacon_sglang.server import running_server

CONFIGS = {
    "none": ["--kv-policy", "none"],
    "bacon-shared": ["--kv-policy", "bacon", "--kv-prefix-cache", "shared"],
    "bacon-full": ["--kv-policy", "bacon", "--kv-prefix-cache", "full"],
}
QUESTIONS = [
    "Which colour is the shape in row 3, column 5?",
    "How many circles are in row 2?",
    "Which shape is in the top left corner?",
    "Is there a red square in the last row?",
]
TURNS = ["What is in row 3?", "And in row 4?", "And in row 5?"]


def messages_prompt(processor, turns: list[str], answers: list[str]) -> str:
    """The chat template around one image, the questions ``turns`` and the ``answers``
    given so far (one fewer than ``turns``)."""
    messages = []
    for k, question in enumerate(turns):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if k < len(answers):
            messages.append({"role": "assistant", "content": answers[k]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def body(prompt: str, image_url: str, output_tokens: int) -> dict:
    sampling = {"max_new_tokens": output_tokens, "temperature": 0, "ignore_eos": True}
    return {"text": prompt, "image_data": image_url, "sampling_params": sampling, "stream": True}


def conversations(processor, args) -> list[tuple[str, list[str], str]]:
    """``(workload, questions, image data URL)`` per conversation, images seeded by index."""
    out = []
    for i in range(args.images):
        url = image_data_url(grid_image(args.image_size, 1000 + i))
        questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(args.questions)]
        out.append(("questions", questions, url))
    for i in range(args.chats):
        out.append(("chat", TURNS, image_data_url(grid_image(args.image_size, 2000 + i))))
    return out


def converse(base_url: str, processor, kind: str, questions: list[str], url: str, args):
    """One conversation, its requests one after another: ``(kind, turn, RequestResult)``."""
    rows, answers = [], []
    with requests.Session() as session:
        for k in range(len(questions)):
            if kind == "chat":
                prompt = messages_prompt(processor, questions[: k + 1], answers)
            else:
                prompt = messages_prompt(processor, [questions[k]], [])
            result = send(session, base_url, body(prompt, url, args.output_tokens))
            answers.append(result.text)
            rows.append((kind, k, result))
    return rows


def drive(base_url: str, processor, args) -> tuple[list, Sampler]:
    """All conversations from ``--clients`` threads, each taking the next conversation."""
    todo = conversations(processor, args)
    done, lock = [], threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                item = todo.pop(0)
            rows = converse(base_url, processor, *item, args)
            with lock:
                done.extend(rows)

    with Sampler(base_url) as sampler:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return done, sampler


def summary(config: str, kind: str, rows: list, sampler: Sampler) -> dict:
    """One table row: TTFT of first and follow-up requests, tokens prefilled, KV held."""
    ok = [(k, r) for w, k, r in rows if w == kind and r.error is None]
    first = [r.ttft for k, r in ok if k == 0]
    follow = [r.ttft for k, r in ok if k > 0]
    prefilled = [r.meta["prompt_tokens"] - r.meta.get("cached_tokens", 0) for _, r in ok]
    follow_prefilled = [
        r.meta["prompt_tokens"] - r.meta.get("cached_tokens", 0) for k, r in ok if k > 0
    ]
    held = [used / running for _, used, running, _ in sampler.samples if running]
    return {
        "config": config,
        "workload": kind,
        "requests": len(ok),
        "errors": sum(1 for w, _, r in rows if w == kind and r.error is not None),
        "ttft_first_p50_ms": report.pct(first, 50),
        "ttft_follow_p50_ms": report.pct(follow, 50),
        "ttft_follow_p99_ms": report.pct(follow, 99),
        "prompt_tokens": int(sum(r.meta["prompt_tokens"] for _, r in ok)),
        "prefilled_tokens": int(sum(prefilled)),
        "follow_prefilled_mean": float(np.mean(follow_prefilled)) if follow_prefilled else None,
        "kv_held_per_running": float(np.mean(held)) if held else None,
    }


def paired_follow_ups(base_url: str, processor, args) -> list[dict]:
    """Per policy (bacon, then none on the same server, alternating, each with images of its
    own): the follow-up TTFT p50 and the tokens it prefilled; the first ``2`` rounds warm up."""
    first, follow = (messages_prompt(processor, [q], []) for q in QUESTIONS[:2])
    runs: dict[str, list] = {"bacon": [], "none": []}
    for i in range(args.paired + 2):
        for k, policy in enumerate(runs):
            url = image_data_url(grid_image(args.image_size, 3000 + 2 * i + k))
            override = {"custom_params": {"kv_compression": {"policy": policy}}}
            with requests.Session() as session:
                for prompt in (first, follow):
                    probe = body(prompt, url, 4)
                    probe["sampling_params"].update(override)
                    result = send(session, base_url, probe)
            if i >= 2 and result.error is None:
                runs[policy].append(result)
    rows = []
    for policy, results in runs.items():
        rows.append({
            "policy": policy,
            "follow_ups": len(results),
            "ttft_follow_p50_ms": report.pct([r.ttft for r in results], 50),
            "prefilled_mean": float(np.mean(
                [r.meta["prompt_tokens"] - r.meta["cached_tokens"] for r in results]
            )),
        })  # fmt: skip
    base = rows[1]["ttft_follow_p50_ms"]
    for row in rows:
        row["vs_none"] = row["ttft_follow_p50_ms"] / base if base else None
    return rows


def run_config(config: str, args, model_path: str, processor) -> dict:
    """Start one configuration's server and run both workloads and the capacity burst."""
    server_args = CONFIGS[config] + [
        "--kv-budget", args.budget, "--enable-metrics", "--max-total-tokens",
        str(args.max_total_tokens), *args.server_args.split(),
    ]  # fmt: skip
    env = serving.server_env(args.server_threads)
    with running_server(model_path, server_args, env=env) as server:
        url = server.base_url
        probe = body(
            messages_prompt(processor, [QUESTIONS[0]], []),
            image_data_url(grid_image(args.image_size, 0)),
            2,
        )
        with requests.Session() as session:
            warm = send(session, url, probe)
        if warm.error:
            raise RuntimeError(f"{config}: warm-up failed: {warm.error}")
        serving.flush_cache(url)
        rows, sampler = drive(url, processor, args)
        table = [summary(config, kind, rows, sampler) for kind in ("questions", "chat")]
        for row in table:
            print(common.columns_table([row], COLUMNS).splitlines()[-1], flush=True)
        pool = loads(url)["max_total_num_tokens"]
        cap = None
        if args.capacity_output_tokens:
            workload = Workload(
                messages_prompt(processor, [QUESTIONS[0]], []), args.image_size, 2, seed=5000
            )
            burst = serving.burst_size(
                pool, warm.meta["prompt_tokens"], args.budget, args.capacity_output_tokens
            )
            cap, _ = serving.capacity(url, config, workload, args, pool, burst)
            print(f"   capacity: {cap['max_running']} decoding at once", flush=True)
        paired = []
        if config == "bacon-full" and args.paired:
            serving.flush_cache(url)
            paired = paired_follow_ups(url, processor, args)
            print(common.columns_table(paired, PAIRED_COLUMNS), flush=True)
        idle = serving.wait_idle(url)
    return {"config": config, "server_args": server_args, "rows": table, "capacity": cap,
            "paired": paired, "idle_kv": idle}  # fmt: skip


COLUMNS = [
    ("config", "config", "{}"),
    ("workload", "workload", "{}"),
    ("requests", "requests", "{}"),
    ("ttft_first_p50_ms", "TTFT first p50 ms", "{:.0f}"),
    ("ttft_follow_p50_ms", "TTFT follow-up p50 ms", "{:.0f}"),
    ("ttft_follow_p99_ms", "TTFT follow-up p99 ms", "{:.0f}"),
    ("follow_vs_none", "follow-up p50 vs none", "{:.2f}"),
    ("prefilled_tokens", "tokens prefilled", "{}"),
    ("prompt_tokens", "prompt tokens", "{}"),
    ("follow_prefilled_mean", "prefilled per follow-up", "{:.0f}"),
    ("kv_held_per_running", "KV slots per running req", "{:.0f}"),
]
CAPACITY_COLUMNS = [
    ("policy", "config", "{}"),
    ("pool_tokens", "pool", "{}"),
    ("burst_requests", "burst", "{}"),
    ("max_running", "decoding at once", "{}"),
    ("vs_shared", "vs bacon-shared", "{:.2f}"),
    ("retractions", "retractions", "{}"),
]

PAIRED_COLUMNS = [
    ("policy", "policy (bacon-full server)", "{}"),
    ("follow_ups", "follow-ups", "{}"),
    ("ttft_follow_p50_ms", "TTFT follow-up p50 ms", "{:.0f}"),
    ("vs_none", "vs none", "{:.2f}"),
    ("prefilled_mean", "prefilled per follow-up", "{:.0f}"),
]


def add_ratios(result: dict) -> None:
    """Follow-up TTFT vs ``none`` (same workload); capacity vs ``bacon-shared``."""
    rows = result["rows"]
    for row in rows:
        base = next(
            (r for r in rows if r["config"] == "none" and r["workload"] == row["workload"]), None
        )
        ok = base and base["ttft_follow_p50_ms"] and row["ttft_follow_p50_ms"]
        row["follow_vs_none"] = (
            row["ttft_follow_p50_ms"] / base["ttft_follow_p50_ms"] if ok else None
        )
    caps = [c for c in result["capacity"] if c]
    shared = next((c for c in caps if c["policy"] == "bacon-shared"), None)
    for cap in caps:
        ok = shared and shared["max_running"]
        cap["vs_shared"] = cap["max_running"] / shared["max_running"] if ok else None


def tables(result: dict) -> str:
    text = "### Follow-up questions and chat turns\n\n" + common.columns_table(
        result["rows"], COLUMNS
    )
    caps = [c for c in result["capacity"] if c]
    if caps:
        text += "\n\n### Capacity (burst into the fixed pool)\n\n"
        text += common.columns_table(caps, CAPACITY_COLUMNS)
    paired = [row for run in result["runs"] for row in run.get("paired", [])]
    if paired:
        text += "\n\n### Follow-up TTFT, paired on one server (one request at a time)\n\n"
        text += common.columns_table(paired, PAIRED_COLUMNS)
    return text


def plot(result: dict, path: Path) -> None:
    """Follow-up TTFT p50 and tokens prefilled per follow-up, by configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kinds = ("questions", "chat")
    configs = list(dict.fromkeys(r["config"] for r in result["rows"]))
    for ax, key, label in (
        (axes[0], "ttft_follow_p50_ms", "follow-up TTFT p50 (ms)"),
        (axes[1], "follow_prefilled_mean", "tokens prefilled per follow-up"),
    ):
        for i, config in enumerate(configs):
            values = [
                next((r[key] or 0 for r in result["rows"]
                      if r["config"] == config and r["workload"] == k), 0)
                for k in kinds
            ]  # fmt: skip
            ax.bar(np.arange(len(kinds)) + 0.27 * (i - 1), values, 0.27, label=config)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measures follow-up TTFT, tokens prefilled, KV held and capacity for "
        "none / bacon in place / bacon with full prompts cached (about 18 minutes on a 2-core "
        "CPU)."
    )
    parser.add_argument("--model-path", default=None, help="model (default: built-in tiny)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--budget", default="64")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--chats", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--capacity-output-tokens", type=int, default=128, help="0: skip")
    parser.add_argument("--paired", type=int, default=12, help="paired images (0: skip)")
    parser.add_argument("--max-total-tokens", type=int, default=8192)
    parser.add_argument("--server-args", default="--prefill-max-requests 4")
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="results folder (default: dated)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no run: rewrite prefix_reuse.md and .png from prefix_reuse.json in --out "
        "(default: newest)",
    )
    return parser.parse_args(argv)


def write(result: dict, out: Path) -> None:
    """``prefix_reuse.json``, ``.md`` and ``.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_reuse.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "prefix_reuse.md").write_text(tables(result) + "\n")
    plot(result, out / "prefix_reuse.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        path = args.out / "prefix_reuse.json" if args.out else None
        path = path or common.latest_result("prefix_reuse.json")
        result = json.loads(path.read_text())
        (path.parent / "prefix_reuse.md").write_text(tables(result) + "\n")
        plot(result, path.parent / "prefix_reuse.png")
        return 0
    start = time.perf_counter()
    model_path = serving.model_or_tiny(args.model_path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    info = common.machine()
    print(common.columns_table([], COLUMNS), flush=True)
    runs = [run_config(c, args, model_path, processor) for c in args.configs]
    result = {
        "machine": info,
        "model": model_path,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "rows": [row for run in runs for row in run["rows"]],
        "capacity": [run["capacity"] for run in runs],
    }
    add_ratios(result)
    result["seconds"] = time.perf_counter() - start
    out = args.out or common.results_dir(info)
    write(result, out)
    print("\n" + tables(result))
    print(f"\n{result['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
