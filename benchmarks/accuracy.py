"""Exact-match accuracy vs KV budget of the tiny VQA model, served by SGLang and checked offline
in transformers; on CPU (2 cores) about 6 minutes with --n 200 (the published run).

    python benchmarks/accuracy.py --n 200  # test questions -> benchmarks/results/<date>-<dev>/
    python benchmarks/accuracy.py --smoke  # 8 questions, budgets 64 and 32 (the test runs it)
    python benchmarks/accuracy.py --report-only   # accuracy.md again from accuracy.json
    python benchmarks/accuracy.py --task doc --n 200   # the document model -> accuracy_doc.*

One CPU (or GPU) SGLang server runs the task's shipped model (``bacon_sglang/models/tiny_vqa``
for ``--task shapes``, ``tiny_doc`` for ``--task doc``)
with ``--kv-policy bacon --kv-debug-dir DIR --disable-radix-cache``; every test question is
sent once per (policy, budget), the policy and budget chosen per request (``custom_params``
``kv_compression`` override: ``none`` is the full cache). Greedy decoding. The radix cache is
off so that a full-cache request never becomes the shared (uncompressed) prefix of a
compressed one.

Offline, transformers decodes every compressed question again from a KV cache reduced to the
keep-sets the server wrote (``DIR/<rid>.pt``), at the same logical M-RoPE positions
(:func:`bacon_sglang.reference.decode_with_keep_sets`), so that scoring quality is separated
from integration effects: the ``offline`` rows must equal the ``server`` rows (``agreement``
is the share of identical answers). ``--kv-budget`` counts the 32-token observation window:
budget 32 keeps the window only, budget 64 keeps 32 selected prompt tokens per KV head and
layer (of about 290, 256 of them the image's).
Outputs: ``<name>.{md,json,png}`` in ``--out`` (``--name``: ``accuracy``, or ``accuracy_doc``
for the document task).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from common import (
    add_task_arguments,
    latest_result,
    machine,
    markdown_table,
    results_dir,
    task_model_path,
    task_record,
)

from bacon_sglang.config import POLICY_NAMES, RAGGED_POLICIES
from bacon_sglang.demo import image_data_url
from bacon_sglang.models import batches, vqa
from bacon_sglang.reference import decode_with_keep_sets, kept_positions
from bacon_sglang.server import running_server

logger = logging.getLogger(__name__)

BUDGETS = (256, 128, 64, 32)
# Every compressing policy a server with the slots layout serves (this benchmark's server).
# The uneven ones (PyramidKV, AdaKV, SparseMM, alone or with BACON) need --kv-layout cells:
# in slots a compacted request keeps one number of slots for every layer and KV head.
POLICIES = tuple(p for p in POLICY_NAMES if p != "none" and p not in RAGGED_POLICIES)
MAX_NEW = 16


def configs(policies, budgets) -> list[tuple[str, int | None]]:
    """``(policy, budget)`` pairs: the full cache first, then every policy at every budget."""
    return [("none", None)] + [(p, b) for p in policies for b in budgets]


def rid_of(policy: str, budget: int | None, index: int) -> str:
    return f"{policy}-{budget or 0}-{index}"


def request_body(
    s: vqa.VQASample, policy: str | None, budget: int | None, max_new: int, **sampling
) -> dict:
    """A greedy ``/generate`` body of ``s`` (its image when it has one), ``policy`` and
    ``budget`` overriding the server's when given; ``sampling``: more sampling parameters."""
    sampling = {"max_new_tokens": max_new, "temperature": 0, **sampling}
    if policy is not None:
        override = {"policy": policy} if budget is None else {"policy": policy, "budget": budget}
        sampling["custom_params"] = {"kv_compression": override}
    body = {"text": batches.prompt(s), "sampling_params": sampling}
    if s.image is not None:
        body["image_data"] = image_data_url(s.image)
    return body


def serve_one(
    base_url: str,
    s: vqa.VQASample,
    policy: str | None = None,
    budget: int | None = None,
    rid: str | None = None,
) -> tuple[str, dict]:
    """One greedy ``/generate`` request (``policy``/``budget`` override the server's when
    given); returns ``(answer text, meta_info)``."""
    body = request_body(s, policy, budget, MAX_NEW)
    if rid is not None:
        body["rid"] = rid
    reply = requests.post(base_url + "/generate", json=body, timeout=600)
    reply.raise_for_status()
    out = reply.json()
    return out["text"], out["meta_info"]


def serve_all(model_path, samples, pairs, debug_dir: Path, dtype: str, workers: int) -> dict:
    """Answers of the server for every ``(policy, budget)`` and sample: ``{rid: text}``."""
    args = [
        "--kv-policy", "bacon", "--kv-debug-dir", str(debug_dir), "--dtype", dtype,
        "--disable-radix-cache", "--max-total-tokens", "16384",
    ]  # fmt: skip
    jobs = [(p, b, i) for i in range(len(samples)) for p, b in pairs]
    with running_server(model_path, args) as server:
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            futures = {
                rid_of(p, b, i): pool.submit(
                    serve_one, server.base_url, samples[i], p, b, rid_of(p, b, i)
                )
                for p, b, i in jobs
            }
            answers = {rid: f.result() for rid, f in futures.items()}
        logger.info("%d requests in %.0f s", len(jobs), time.perf_counter() - start)
    for rid, (_, meta) in answers.items():
        compressed = "kv_compression" in meta
        if compressed != (not rid.startswith("none-")):
            raise RuntimeError(f"{rid}: compression report {meta.get('kv_compression')}")
    return {rid: text for rid, (text, _) in answers.items()}


def offline_all(model_path, samples, pairs, debug_dir: Path, dtype: str) -> dict:
    """transformers' answers for every ``(policy, budget)`` and sample, with the server's
    keep-sets: ``{rid: text}``."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_path, dtype=torch_dtype, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    answers = {}
    for i, s in enumerate(samples):
        inputs = batches.make_batch(tokenizer, [s], with_answers=False).inputs()
        for p, b in pairs:
            rid = rid_of(p, b, i)
            keep = None
            if p != "none":
                record = torch.load(debug_dir / f"{rid}.pt")
                if record["prompt_len"] != inputs["input_ids"].shape[1]:
                    raise RuntimeError(f"{rid}: server prompt {record['prompt_len']} tokens")
                keep = kept_positions(record["keep"], record["prefix_len"])
            tokens, _ = decode_with_keep_sets(model, inputs, keep, MAX_NEW, stop=eos)
            answers[rid] = tokenizer.decode(tokens, skip_special_tokens=True)
    return answers


def accuracy(answers: dict, rids: list[str], samples) -> float:
    """Exact-match share of ``answers[rid]`` against the samples, in order."""
    hits = [vqa.exact_match(answers[r], s) for r, s in zip(rids, samples, strict=True)]
    return sum(hits) / len(hits)


def summarise(samples, pairs, served: dict, offline: dict | None) -> list[dict]:
    """One row per ``(policy, budget)``: server and offline accuracy, agreement."""
    rows = []
    for p, b in pairs:
        rids = [rid_of(p, b, i) for i in range(len(samples))]
        row = {"policy": p, "budget": b, "server": accuracy(served, rids, samples)}
        if offline is not None:
            row["offline"] = accuracy(offline, rids, samples)
            row["agreement"] = sum(served[r] == offline[r] for r in rids) / len(rids)
        rows.append(row)
    return rows


def values(rows: list[dict], policy: str, budgets, key: str) -> list[float]:
    """``row[key]`` of ``policy`` at each budget, in order."""
    by_budget = {r["budget"]: r[key] for r in rows if r["policy"] == policy}
    return [by_budget[b] for b in budgets]


def markdown(rows: list[dict], budgets, n: int) -> str:
    """The accuracy table: one line per policy and source, one column per budget."""
    full = next(r for r in rows if r["policy"] == "none")
    has_offline = "offline" in full
    header = [f"exact match (n={n})", "full cache", *(f"budget {b}" for b in budgets)]
    sources = ("server", "offline") if has_offline else ("server",)
    table = [
        [f"{policy} ({source})", f"{full[source]:.3f}"]
        + [f"{v:.3f}" for v in values(rows, policy, budgets, source)]
        for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "none")
        for source in sources
    ]
    lines = [markdown_table(header, table)]
    if has_offline:
        agree = min(r["agreement"] for r in rows)
        lines.append(f"\nserver vs offline answers identical: {agree:.3f} (lowest over configs)")
    return "\n".join(lines)


def render(record: dict) -> str:
    """The markdown table of a run's JSON record (what the run printed and wrote)."""
    rows = record["rows"]
    budgets = list(dict.fromkeys(r["budget"] for r in rows if r["policy"] != "none"))
    return markdown(rows, budgets, record["questions"])


def plot(rows: list[dict], budgets, path: Path, task: str = "shapes") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["policy"] == "none")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "none"):
        ax.plot(budgets, values(rows, policy, budgets, "server"), marker="o", label=policy)
    ax.axhline(full["server"], color="gray", linestyle="--", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets), [str(b) for b in budgets])
    ax.set_xlabel("KV budget per head (incl. 32-token window)")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"tiny Qwen2-VL, {task} task (test split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Serve, decode offline, write the table, JSON and plot; returns the JSON record."""
    samples = vqa.dataset("test", args.n, start=args.start, task=args.task)
    pairs = configs(args.policies, args.budgets)
    debug_dir = Path(tempfile.mkdtemp(prefix="bacon-keep-"))
    start = time.perf_counter()
    served = serve_all(args.model_path, samples, pairs, debug_dir, args.dtype, args.workers)
    serve_s = time.perf_counter() - start
    offline = None
    if not args.no_offline:
        offline = offline_all(args.model_path, samples, pairs, debug_dir, args.dtype)
    rows = summarise(samples, pairs, served, offline)
    record = {
        **task_record(args, len(samples)),
        "dtype": args.dtype,
        "machine": machine(),
        "seconds": {"serve": round(serve_s), "total": round(time.perf_counter() - start)},
        "rows": rows,
        "answers": {
            rid: {"server": served[rid], "offline": offline[rid] if offline else None}
            for rid in served
        },
        "expected": [s.answer for s in samples],
    }
    out = Path(args.out) if args.out else results_dir(record["machine"])
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("_smoke" if args.smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_report(record, out, stem)
    return record


def write_report(record: dict, out: Path, stem: str = "accuracy") -> None:
    """``<stem>.md`` and ``<stem>.png`` under ``out`` from the JSON record; prints the table."""
    table = render(record)
    (out / f"{stem}.md").write_text(table + "\n")
    budgets = list(dict.fromkeys(r["budget"] for r in record["rows"] if r["policy"] != "none"))
    plot(record["rows"], budgets, out / f"{stem}.png", record.get("task", "shapes"))
    print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_arguments(parser)
    parser.add_argument("--name", help="output file stem (default: accuracy[_TASK])")
    parser.add_argument("--n", type=int, default=100, help="test questions")
    parser.add_argument("--start", type=int, default=0, help="first test-split index")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--workers", type=int, default=8, help="concurrent requests")
    parser.add_argument("--no-offline", action="store_true", help="skip the transformers check")
    parser.add_argument("--out", type=Path, help="results folder (default: dated, per device)")
    parser.add_argument("--smoke", action="store_true", help="8 questions, budgets 64 and 32")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no run: rewrite accuracy.md and .png from accuracy.json in --out (default: newest)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.budgets = 8, [64, 32]
    args.model_path = task_model_path(args)
    if args.name is None:
        args.name = "accuracy" if args.task == "shapes" else f"accuracy_{args.task}"
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.report_only:
        name = f"{args.name}.json"
        path = args.out / name if args.out else latest_result(name)
        write_report(json.loads(path.read_text()), path.parent, args.name)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
