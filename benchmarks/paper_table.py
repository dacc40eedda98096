"""The paper's table on our model: 4 base methods x (base, +BACON) x 4 budgets, + full cache.

    python benchmarks/paper_table.py --task shapes --n 200      # the shipped model, old task
    python benchmarks/paper_table.py --task doc --n 500         # the document model
    python benchmarks/paper_table.py --smoke --offline-only     # 4 questions (the test)
    python benchmarks/paper_table.py --offline-only --n 100 --start 100 --out B  # one shard
    python benchmarks/paper_table.py --merge A/paper_table_shapes.json B/paper_table_shapes.json

Methods (``bacon_sglang.policies``): SnapKV, PyramidKV, AdaKV, SparseMM (per-head budgets from
the model's ``visual_heads.json``, :mod:`bacon_sglang.models.visual_heads`), each as the base
method and wrapped by BACON. Budgets count the 32-token window (budget 64 = 32 selected
candidates per KV head on average).

- Uniform rows (snapkv, bacon = bacon-snapkv) are served by SGLang on CPU, per-request
  overrides, and decoded again offline by transformers from the server's keep-sets
  (``benchmarks/accuracy.py``): ``agreement`` is the share of identical answers.
- Variable-budget rows (pyramidkv, adakv, sparsemm and their +BACON) run offline only: the
  policy objects choose per-layer, per-head keep-sets from the eager model's attention of the
  whole prompt (:func:`bacon_sglang.reference.keep_sets_per_layer`) and transformers decodes
  from them (:func:`bacon_sglang.reference.decode_with_keep_sets`, padding masked).
- ``slots``: KV slots a request holds in SGLang's pool, which all layers and heads share:
  the largest number of positions any (layer, KV head) keeps, window included (mean over
  questions). A variable-budget method at nominal budget ``b`` holds more than ``b``.
- Exact match with a Wilson 95% interval; each +BACON vs base pair gets an exact McNemar
  test (two-sided binomial on the discordant questions).
- ``no image``: every layer and head keeps all text tokens and no image token (offline): does
  the answer depend on the image? Compared with ``chance``, the share of the most frequent
  expected answer among the questions (what a model that ignores the image can at best get).

Outputs ``paper_table_<task>.{md,json}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import accuracy
import torch
from common import (
    add_task_arguments,
    machine,
    markdown_table,
    progress,
    results_dir,
    task_model_path,
    task_record,
)

from bacon_sglang.models import batches, visual_heads, vqa
from bacon_sglang.policies import make_policy
from bacon_sglang.reference import (
    decode_with_keep_sets,
    keep_sets_from_windows,
    prefill,
    slots_held,
    window_attentions,
)

logger = logging.getLogger(__name__)

BUDGETS = (256, 128, 64, 48)
BASES = ("snapkv", "pyramidkv", "adakv", "sparsemm")
SERVED = ("snapkv", "bacon")  # the server's names of snapkv and bacon-snapkv
WINDOW = 32
MAX_NEW = 16


def method_names() -> list[str]:
    """Every row's method: ``<base>`` and ``bacon-<base>`` for each base."""
    return [name for base in BASES for name in (base, f"bacon-{base}")]


def served_name(method: str) -> str | None:
    """The server's policy name of ``method``, or None when SGLang does not serve it."""
    return {"snapkv": "snapkv", "bacon-snapkv": "bacon"}.get(method)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) of ``k`` successes in ``n`` trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(base: list[bool], other: list[bool]) -> dict:
    """Exact McNemar test of paired outcomes: ``b`` = right only with ``base``, ``c`` = right
    only with ``other``; two-sided p = ``min(1, 2 * P(X <= min(b, c)))``, X ~ Bin(b + c, 1/2)."""
    b = sum(x and not y for x, y in zip(base, other, strict=True))
    c = sum(y and not x for x, y in zip(base, other, strict=True))
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n if n else 1.0
    return {"base_only": b, "other_only": c, "p": min(1.0, 2 * tail)}


def policy_for(method: str, head_scores):
    """The policy object of ``method`` (SparseMM gets the model's visual-head scores)."""
    return make_policy(method, head_scores=head_scores)


NO_IMAGE = "no-image"  # the row without image KV (every text token kept, no image token)


def text_only_keep(inputs: dict, layers: int, kv_heads: int) -> torch.Tensor:
    """``[layers, Hkv, n_text]``: every prompt position that is not an image token."""
    text = (inputs["mm_token_type_ids"][0] == 0).nonzero().flatten()
    return text.expand(layers, kv_heads, -1)


def offline_rows(model_path: Path, samples, methods, budgets, policies=None) -> dict:
    """``{(method, budget): {"answers": [...], "slots": [...]}}`` of the offline methods, and
    ``(NO_IMAGE, None)``: the answers with every image token dropped from the cache.
    ``policies`` maps a method name to its policy object (default: :func:`policy_for`)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    def load(impl):
        return Qwen2VLForConditionalGeneration.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation=impl
        ).eval()

    model, eager = load("sdpa"), load("eager")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    heads = visual_heads.load(model_path) if any("sparsemm" in m for m in methods) else ()
    text_config = model.config.get_text_config()
    kv_heads, layers = text_config.num_key_value_heads, text_config.num_hidden_layers
    out = {(m, b): {"answers": [], "slots": []} for m in methods for b in budgets}
    out[(NO_IMAGE, None)] = {"answers": [], "slots": []}
    for i, s in enumerate(progress(samples, what="offline rows")):
        inputs = batches.make_batch(tokenizer, [s], with_answers=False).inputs()
        windows = window_attentions(eager, inputs, WINDOW)
        full = prefill(model, inputs)
        keep = text_only_keep(inputs, layers, kv_heads)
        tokens, _ = decode_with_keep_sets(model, inputs, keep, MAX_NEW, stop=eos, prefilled=full)
        out[(NO_IMAGE, None)]["answers"].append(tokenizer.decode(tokens, skip_special_tokens=True))
        out[(NO_IMAGE, None)]["slots"].append(slots_held(keep))
        for m in methods:
            policy = policies[m] if policies else policy_for(m, heads)
            for b in budgets:
                keep = keep_sets_from_windows(windows, kv_heads, policy, b, 0)
                tokens, _ = decode_with_keep_sets(
                    model, inputs, keep, MAX_NEW, stop=eos, prefilled=full
                )
                out[(m, b)]["answers"].append(tokenizer.decode(tokens, skip_special_tokens=True))
                out[(m, b)]["slots"].append(slots_held(keep))
        if (i + 1) % 10 == 0:
            logger.info("offline: %d / %d questions", i + 1, len(samples))
    return out


def served_rows(args, samples, budgets) -> tuple[dict, dict]:
    """Server and offline-from-server answers of the uniform methods and the full cache:
    ``({(method, budget): answers}, {(method, budget): agreement})``."""
    pairs = accuracy.configs(SERVED, budgets)
    debug_dir = Path(tempfile.mkdtemp(prefix="bacon-keep-"))
    served = accuracy.serve_all(args.model_path, samples, pairs, debug_dir, "float32", args.workers)
    offline = accuracy.offline_all(args.model_path, samples, pairs, debug_dir, "float32")
    answers, agreement = {}, {}
    for p, b in pairs:
        rids = [accuracy.rid_of(p, b, i) for i in range(len(samples))]
        method = "full" if p == "none" else ("bacon-snapkv" if p == "bacon" else p)
        answers[(method, b)] = [served[r] for r in rids]
        agreement[(method, b)] = sum(served[r] == offline[r] for r in rids) / len(rids)
    return answers, agreement


def full_cache_answers(model_path: Path, samples) -> list[str]:
    """transformers' greedy full-cache answers (``--offline-only`` runs)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    out = []
    for s in samples:
        inputs = batches.make_batch(tokenizer, [s], with_answers=False).inputs()
        tokens, _ = decode_with_keep_sets(model, inputs, None, MAX_NEW, stop=eos)
        out.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return out


def summarise(samples, answers: dict, slots: dict, agreement: dict, budgets) -> dict:
    """Rows with exact match, Wilson interval and slots; McNemar per pair and budget."""
    rows = []
    right = {}
    for key, texts in answers.items():
        hits = [vqa.exact_match(t, s) for t, s in zip(texts, samples, strict=True)]
        right[key] = hits
        method, budget = key
        low, high = wilson(sum(hits), len(hits))
        row = {
            "method": method,
            "budget": budget,
            "source": "server" if key in agreement else "offline",
            "exact_match": sum(hits) / len(hits),
            "ci95": [round(low, 4), round(high, 4)],
            "slots": slots.get(key),
        }
        if key in agreement:
            row["server_offline_agreement"] = agreement[key]
        rows.append(row)
    tests = []
    for base in BASES:
        for b in budgets:
            if (base, b) in right and (f"bacon-{base}", b) in right:
                test = mcnemar(right[(base, b)], right[(f"bacon-{base}", b)])
                tests.append({"base": base, "budget": b, **test})
    return {"rows": rows, "mcnemar": tests}


def chance(expected: list[str]) -> float:
    """Share of the most frequent expected answer: the best exact match without the image."""
    return max(expected.count(a) for a in set(expected)) / len(expected)


def errors_by_question(record: dict) -> str:
    """The full cache's wrong answers per distinct question of a run's JSON record, e.g.
    ``What number is printed in blue? 3/78; ...`` (sorted by question)."""
    answers = record["answers"]["full@None"]
    right = [vqa.is_answer(t, e) for t, e in zip(answers, record["expected"], strict=True)]
    wrong = vqa.wrong_by_question(record["asked"], right)
    return "; ".join(f"{q} {w}/{n}" for q, (w, n) in wrong.items())


def render(record: dict) -> str:
    """The markdown of a run's JSON record (what the run printed and wrote)."""
    return markdown(record, record["budgets"], record["questions"], record["task"])


def markdown(result: dict, budgets, n: int, task: str) -> str:
    """Two tables: exact match [95% CI] and slots per method and budget; McNemar per pair;
    the no-image row against chance when ``result`` has it (and ``expected``)."""
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    head = [f"budget {b}" for b in budgets]
    table = []
    full = rows.get(("full", None))
    if full:
        low, high = full["ci95"]
        table.append(
            ["full cache", *[f"{full['exact_match']:.3f} [{low:.2f}, {high:.2f}]"] * len(budgets)]
        )
    for method in method_names():
        cells = []
        for b in budgets:
            r = rows.get((method, b))
            if r is None:
                cells.append("-")
                continue
            low, high = r["ci95"]
            cells.append(f"{r['exact_match']:.3f} [{low:.2f}, {high:.2f}] ({r['slots']:.0f})")
        served = any(rows.get((method, b), {}).get("source") == "server" for b in budgets)
        source = " (server)" if served else ""
        table.append([f"{method}{source}", *cells])
    tests = {(t["base"], t["budget"]): t for t in result["mcnemar"]}
    mcnemar = [
        [base]
        + [
            "-" if t is None else f"{t['base_only']} / {t['other_only']}, p={t['p']:.3g}"
            for t in (tests.get((base, b)) for b in budgets)
        ]
        for base in BASES
    ]
    lines = [
        f"exact match [Wilson 95% CI] (slots held per request), task {task}, n={n}",
        "",
        markdown_table(["method", *head], table),
        "",
        "McNemar (exact), +BACON vs base: right only with base / only with +BACON, p",
        "",
        markdown_table(["base", *head], mcnemar),
    ]
    no_image = rows.get((NO_IMAGE, None))
    if no_image and result.get("expected"):
        low, high = no_image["ci95"]
        lines.append(
            f"\nno image KV (all {no_image['slots']:.0f} text tokens kept, no image token): "
            f"{no_image['exact_match']:.3f} [{low:.2f}, {high:.2f}]; chance (most frequent "
            f"answer): {chance(result['expected']):.3f}"
        )
    if result.get("asked") and "full@None" in result.get("answers", {}):
        lines.append(f"\nfull cache, wrong answers by question: {errors_by_question(result)}")
    agree = [
        r["server_offline_agreement"] for r in result["rows"] if "server_offline_agreement" in r
    ]
    if agree:
        lines.append(
            f"\nserver vs offline answers identical: {min(agree):.3f} (lowest over configs)"
        )
    return "\n".join(lines)


def merge(paths: list[Path], out: Path | None) -> dict:
    """One table from shard records of the same task and budgets (consecutive test indices):
    answers are concatenated, rows, intervals and tests recomputed, slots averaged."""
    records = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["start"])
    first = records[0]
    for a, b in zip(records, records[1:], strict=False):
        if b["start"] != a["start"] + a["questions"] or b["task"] != a["task"]:
            raise SystemExit("shards must be consecutive runs of one task")
    n = sum(r["questions"] for r in records)
    samples = vqa.dataset("test", n, start=first["start"], task=first["task"])
    answers, slots, agreement = {}, {}, {}
    for row in first["rows"]:
        key = (row["method"], row["budget"])
        name = f"{row['method']}@{row['budget']}"
        answers[key] = [t for r in records for t in r["answers"][name]]
        rows = [next(x for x in r["rows"] if (x["method"], x["budget"]) == key) for r in records]
        if row["slots"] is not None:
            slots[key] = (
                sum(x["slots"] * r["questions"] for x, r in zip(rows, records, strict=True)) / n
            )
        if "server_offline_agreement" in row:
            agreement[key] = min(x["server_offline_agreement"] for x in rows)
    result = summarise(samples, answers, slots, agreement, first["budgets"])
    record = {
        **{k: first[k] for k in ("model", "task", "split", "start", "budgets", "window")},
        "questions": n,
        "machine": first["machine"],
        "merged_from": [str(p) for p in paths],
        "seconds": {"total": sum(r["seconds"]["total"] for r in records)},
        **result,
        "answers": {f"{m}@{b}": texts for (m, b), texts in answers.items()},
        "expected": [s.answer for s in samples],
        "asked": [s.question for s in samples],
    }
    out = Path(out) if out else results_dir(record["machine"])
    out.mkdir(parents=True, exist_ok=True)
    table = render(record)
    (out / f"paper_table_{first['task']}.md").write_text(table + "\n")
    (out / f"paper_table_{first['task']}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    return record


def run(args: argparse.Namespace) -> dict:
    """Measure every row, write ``paper_table_<task>.{md,json}``; returns the JSON record."""
    samples = vqa.dataset("test", args.n, start=args.start, task=args.task)
    budgets = list(args.budgets)
    start = time.perf_counter()
    answers, agreement = {}, {}
    if args.offline_only:
        answers[("full", None)] = full_cache_answers(args.model_path, samples)
        offline_methods = method_names()
    else:
        answers, agreement = served_rows(args, samples, budgets)
        offline_methods = [m for m in method_names() if served_name(m) is None]
    served_s = time.perf_counter() - start
    measured = offline_rows(args.model_path, samples, offline_methods, budgets)
    slots = {}
    for key, value in measured.items():
        answers[key] = value["answers"]
        slots[key] = sum(value["slots"]) / len(value["slots"])
    prompt_len = None
    for method, b in list(answers):
        if (method, b) not in slots and b is not None:
            if prompt_len is None:  # uniform: every head keeps min(b, prompt) positions
                prompt_len = _prompt_len(args.model_path, samples[0])
            slots[(method, b)] = min(b, prompt_len)
    result = summarise(samples, answers, slots, agreement, budgets)
    record = {
        **task_record(args, len(samples)),
        "budgets": budgets,
        "window": WINDOW,
        "machine": machine(),
        "seconds": {"served": round(served_s), "total": round(time.perf_counter() - start)},
        **result,
        "answers": {f"{m}@{b}": texts for (m, b), texts in answers.items()},
        "expected": [s.answer for s in samples],
        "asked": [s.question for s in samples],
    }
    table = render(record)
    out = Path(args.out) if args.out else results_dir(record["machine"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"paper_table_{args.task}" + ("_smoke" if args.smoke else "")
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    return record


def _prompt_len(model_path: Path, s) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return batches.make_batch(tokenizer, [s], with_answers=False).input_ids.shape[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_arguments(parser)
    parser.add_argument("--n", type=int, default=200, help="test questions")
    parser.add_argument("--start", type=int, default=0, help="first test-split index")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--workers", type=int, default=8, help="concurrent server requests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (offline rows)")
    parser.add_argument(
        "--offline-only", action="store_true", help="no server: every row offline (smoke test)"
    )
    parser.add_argument("--out", type=Path, help="results folder (default: dated, per device)")
    parser.add_argument("--smoke", action="store_true", help="4 questions, budgets 64 and 48")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="merge these shard JSONs into one table (no run)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.budgets = 4, [64, 48]
    args.model_path = task_model_path(args)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return 0
    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
