"""Equal-memory table and capacity on the document task: every base method of the paper,
alone and with BACON, served by SGLang with ``--kv-layout cells`` (head-granular KV, design
``patches/head_granular.md``), scored against the memory each request actually held.

    python benchmarks/equal_memory.py --n 500      # the published run (2 CPU cores: ~1 hour)
    python benchmarks/equal_memory.py --smoke      # 4 questions, level 64, a small burst (test)
    python benchmarks/equal_memory.py --report-only     # equal_memory.md again from the JSON

1. Accuracy. One CPU server (the shipped ``tiny_doc`` model, float32, ``--kv-layout cells
   --kv-head-scores <model>/visual_heads.json --disable-radix-cache``) answers every held-out
   test page once per (method, memory level ``M``), method and budget chosen per request
   (``custom_params``). Level ``M`` is the nominal budget: the prompt memory of uniform
   budget ``M`` (``L * Hkv * M`` cells, the 32-token window included). Allocations whose
   per-head caps are clamped at the prompt hold less; nothing is redistributed (not in the
   methods' recipes). Each cell of the table: exact match [Wilson 95%] and the mean slot
   equivalent each request held (``cells / (L * Hkv)`` from its ``meta_info.kv_compression``);
   the slots column of the reference is what the same keep-sets cost in the slots layout
   (the widest head). Below: exact McNemar, +BACON vs base, per level.
   Served vs offline: ``--reference`` (default: the newest ``paper_table_doc.json``, the
   paper table of ``benchmarks/paper_table.py``) holds, for the same questions, the answers
   of transformers decoding from the policy objects' keep-sets on the eager model's attention
   (uneven methods) and of the slots-layout server (SnapKV, BACON): ``agreement`` is the
   share of identical answers.
2. Capacity at equal accuracy. A server with a fixed pool (``--max-total-tokens 8192``, as
   ``benchmarks/serving.py``'s CPU capacity run, radix cache on) gets a burst of distinct
   test pages at once, ``--capacity-output-tokens`` each (``ignore_eos``), once for the full
   cache, once for the smallest uniform configuration (SnapKV or BACON) within 2 points of
   the full cache, once for the smallest head-granular one within 2 points: the most
   requests decoding at once (sampled from ``/v1/loads``) and the pool bound of
   ``serving_report.pool_bound``.

Outputs ``equal_memory.{md,json}`` under ``--out`` (default: the dated results folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import accuracy
import paper_table
import serving_report
from common import latest_result, machine, markdown_table, progress, results_dir, task_record
from paper_table import BASES, mcnemar, wilson
from serving import Target, burst_size, flush_cache, server_env
from serving_client import Sampler, run_closed_loop

from bacon_sglang.models import visual_heads, vqa
from bacon_sglang.server import running_server

logger = logging.getLogger(__name__)

LEVELS = (256, 128, 64, 48)
METHODS = ("full", *paper_table.method_names())
UNIFORM = ("snapkv", "bacon-snapkv")
WITHIN = 0.02  # "equal accuracy": exact match at most 2 points below the full cache
POOL = 8192


def server_policy(method: str) -> str:
    """The server's policy name of a table method (BACON over SnapKV is ``bacon``)."""
    return {"full": "none", "bacon-snapkv": "bacon"}.get(method, method)


def report_of(meta: dict) -> dict | None:
    """The request's ``kv_compression`` report (a list when streamed: empty when not
    compressed), or None."""
    report = meta.get("kv_compression")
    if isinstance(report, list):
        return report[0] if report else None
    return report


def body(sample: vqa.VQASample, method: str, level: int | None, max_new: int, **extra) -> dict:
    """A greedy ``/generate`` body of one test page with the method's per-request override."""
    return accuracy.request_body(sample, server_policy(method), level, max_new, **extra)


def cells_server_args(model_path: Path, *extra: str) -> list[str]:
    """Flags of the cells server: every method by override, SparseMM's head scores shipped
    with the model."""
    scores = Path(model_path) / visual_heads.FILENAME
    return [
        "--kv-policy", "bacon", "--kv-layout", "cells", "--kv-head-scores", str(scores),
        "--dtype", "float32", *extra,
    ]  # fmt: skip


def serve_table(args, samples, pairs) -> dict:
    """Every ``(method, level)`` pair on every sample: ``{(method, level): [(answer,
    report)]}``, in sample order."""
    flags = cells_server_args(
        args.model_path, "--disable-radix-cache", "--max-total-tokens", "16384"
    )
    jobs = [(m, lv, i) for i in range(len(samples)) for m, lv in pairs]

    def one(url: str, job) -> tuple[str, dict | None]:
        method, level, i = job
        text, meta = accuracy.serve_one(url, samples[i], server_policy(method), level)
        report = report_of(meta)
        if (report is None) != (method == "full"):
            raise RuntimeError(f"{job}: compression report {report}")
        if report is not None and report.get("layout") != "cells":
            raise RuntimeError(f"{job}: not stored in cells: {report}")
        return text, report

    with running_server(args.model_path, flags, env=server_env(1)) as server:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            futures = [pool.submit(one, server.base_url, job) for job in jobs]
            results = [f.result() for f in progress(futures, what="served")]
        logger.info("%d requests in %.0f s", len(jobs), time.perf_counter() - start)
    out = {pair: [] for pair in pairs}
    for (method, level, _), result in zip(jobs, results, strict=True):
        out[(method, level)].append(result)
    return out


def reference_answers(path: Path | None, samples, start: int) -> tuple[dict, dict, str | None]:
    """``({(method, level): answers}, {(method, level): slots held in the slots layout},
    source)`` of the reference record for these questions, or empty when it does not cover
    them."""
    try:
        path = path or latest_result("paper_table_doc.json")
    except FileNotFoundError:
        return {}, {}, None
    record = json.loads(Path(path).read_text())
    offset = start - record["start"]
    if record["task"] != "doc" or offset < 0 or offset + len(samples) > record["questions"]:
        logger.warning("%s does not cover these questions: no agreement column", path)
        return {}, {}, None
    answers, slots = {}, {}
    for name, texts in record["answers"].items():
        method, level = name.split("@")
        key = (method, None if level == "None" else int(level))
        answers[key] = texts[offset : offset + len(samples)]
    for row in record["rows"]:
        slots[(row["method"], row["budget"])] = row.get("slots")
    return answers, slots, str(path)


def table_rows(samples, served: dict, reference: dict, ref_slots: dict) -> list[dict]:
    """One row per ``(method, level)``: exact match, Wilson interval, memory held, agreement
    with the reference's answers."""
    rows = []
    for (method, level), results in served.items():
        hits = [vqa.exact_match(text, s) for (text, _), s in zip(results, samples, strict=True)]
        low, high = wilson(sum(hits), len(hits))
        reports = [r for _, r in results if r is not None]
        row = {
            "method": method,
            "level": level,
            "exact_match": sum(hits) / len(hits),
            "ci95": [round(low, 4), round(high, 4)],
            "right": hits,
        }
        if reports:
            row["slot_equivalent"] = sum(r["slot_equivalent"] for r in reports) / len(reports)
            row["cell_slots_mean"] = sum(r["cell_slots"] for r in reports) / len(reports)
            row["cell_slots_max"] = max(r["cell_slots"] for r in reports)
        key = ("full", None) if method == "full" else (method, level)
        if key in reference:
            same = [t == ref for (t, _), ref in zip(results, reference[key], strict=True)]
            row["agreement"] = sum(same) / len(same)
            row["slots_layout"] = ref_slots.get(key)
        rows.append(row)
    return rows


def mcnemar_rows(rows: list[dict], levels) -> list[dict]:
    """Exact McNemar of +BACON vs its base at every level."""
    right = {(r["method"], r["level"]): r["right"] for r in rows}
    return [
        {"base": base, "level": lv, **mcnemar(right[(base, lv)], right[(f"bacon-{base}", lv)])}
        for base in BASES
        for lv in levels
        if (base, lv) in right and (f"bacon-{base}", lv) in right
    ]


def smallest_within(rows: list[dict], methods, full: float) -> dict | None:
    """The configuration of ``methods`` holding the least memory among those at most
    ``WITHIN`` below ``full`` (ties: the more accurate), or None."""
    fit = [r for r in rows if r["method"] in methods and r["exact_match"] >= full - WITHIN - 1e-9]
    return min(fit, key=lambda r: (r["slot_equivalent"], -r["exact_match"]), default=None)


def capacity_configs(rows: list[dict]) -> list[dict]:
    """The capacity run's configurations: full cache, the smallest uniform and the smallest
    head-granular configuration within ``WITHIN`` of it (each with why it was chosen)."""
    full = next(r for r in rows if r["method"] == "full")
    out = [{"method": "full", "level": None, "exact_match": full["exact_match"], "why": "full"}]
    uneven = [m for m in METHODS if m not in ("full", *UNIFORM)]
    for kind, methods in (("uniform", UNIFORM), ("head-granular", uneven)):
        best = smallest_within(rows, methods, full["exact_match"])
        if best is None:
            logger.warning("no %s configuration within %.2f of the full cache", kind, WITHIN)
            continue
        out.append({**{k: best[k] for k in ("method", "level", "exact_match")}, "why": kind})
    return out


def run_capacity(args, configs: list[dict]) -> list[dict]:
    """The burst of each configuration into a fixed pool: most requests decoding at once and
    the pool bound (``serving_report``), the same burst size for every configuration."""
    flags = cells_server_args(
        args.model_path, "--max-total-tokens", str(args.pool), "--enable-metrics"
    )
    smallest = min((c["level"] for c in configs if c["level"]), default=None)
    rows = []
    with running_server(args.model_path, flags, env=server_env(1)) as server:
        url = server.base_url
        probe = vqa.dataset("test", 1, start=args.capacity_start, task="doc")[0]
        warm = run_closed_loop(url, [{**body(probe, "full", None, 2), "stream": True}], 1)[0]
        if warm.error:
            raise RuntimeError(f"warm-up failed: {warm.error}")
        prompt = warm.meta["prompt_tokens"]
        budget = str(smallest) if smallest else "1"
        burst = args.burst or burst_size(args.pool, prompt, budget, args.capacity_output_tokens)
        pages = vqa.dataset("test", burst, start=args.capacity_start, task="doc")
        for c in configs:
            bodies = [
                {**body(s, c["method"], c["level"], args.capacity_output_tokens,
                        ignore_eos=True), "stream": True}
                for s in pages
            ]  # fmt: skip
            flush_cache(Target(url, [url]))
            with Sampler(url) as sampler:
                results = run_closed_loop(url, bodies, burst)
            errors = [r.error for r in results if r.error]
            if errors:
                raise RuntimeError(f"{c['method']}@{c['level']}: {errors[0]}")
            fp = serving_report.footprint(results, args.capacity_output_tokens)
            label = c["method"] if c["level"] is None else f"{c['method']}@{c['level']}"
            row = serving_report.capacity_row(label, args.pool, fp, results, sampler, "-")
            reports = [report_of(r.meta) for r in results if report_of(r.meta)]
            row["slot_equivalent"] = (
                sum(r["slot_equivalent"] for r in reports) / len(reports) if reports else None
            )
            rows.append({**c, **row})
            print(f"   {label}: {row['max_running']} decoding at once (bound {row['pool_bound']})")
    full = rows[0]["max_running"] or 1
    for row in rows:
        row["vs_full"] = row["max_running"] / full
    return rows


def cell(row: dict | None, with_memory: bool = True) -> str:
    if row is None:
        return "-"
    low, high = row["ci95"]
    text = f"{row['exact_match']:.3f} [{low:.2f}, {high:.2f}]"
    if with_memory and row.get("slot_equivalent") is not None:
        text += f" ({row['slot_equivalent']:.0f}"
        if row.get("slots_layout") is not None:
            text += f"; slots {row['slots_layout']:.0f}"
        text += ")"
    return text


def render(record: dict) -> str:
    """The Markdown of a run's JSON record: the table, McNemar, agreement, goal, capacity."""
    levels = record["levels"]
    rows = {(r["method"], r["level"]): r for r in record["rows"]}
    full = rows[("full", None)]
    head = ["method", *(f"M = {lv}" for lv in levels)]
    table = [["full cache", *[cell(full, False)] * len(levels)]]
    table += [[m, *(cell(rows.get((m, lv))) for lv in levels)] for m in METHODS[1:]]
    tests = {(t["base"], t["level"]): t for t in record["mcnemar"]}
    mc = [
        [base, *("-" if t is None else f"{t['base_only']} / {t['other_only']}, p={t['p']:.3g}"
                 for t in (tests.get((base, lv)) for lv in levels))]
        for base in BASES
    ]  # fmt: skip
    lines = [
        f"exact match [Wilson 95% CI] (slot equivalent held: cells / (layers x KV heads); "
        f"slots: the same keep-sets in the slots layout, widest head), task doc, "
        f"n={record['questions']}, served with `--kv-layout cells`",
        "",
        markdown_table(head, table),
        "",
        "McNemar (exact), +BACON vs base: right only with base / only with +BACON, p",
        "",
        markdown_table(["base", *(f"M = {lv}" for lv in levels)], mc),
    ]
    agree = [r["agreement"] for r in record["rows"] if "agreement" in r]
    if agree:
        worst = min((r for r in record["rows"] if "agreement" in r), key=lambda r: r["agreement"])
        which = f" ({worst['method']}@{worst['level']})" if min(agree) < 1 else ""
        lines.append(
            f"\nserved (cells) vs reference answers identical: {min(agree):.3f} lowest over "
            f"{len(agree)} configurations{which}; reference: "
            f"`{Path(record['reference']).name}` (uneven methods: transformers from the policy "
            "objects' keep-sets; SnapKV, BACON: the slots-layout server)"
        )
    goal = record.get("goal")
    if goal:
        lines.append(
            f"\nat M = {goal['level']}: best head-granular + BACON {goal['method']} "
            f"{goal['exact_match']:.3f} vs full cache {full['exact_match']:.3f} "
            f"(goal: within {WITHIN:.2f}): {'met' if goal['met'] else 'NOT met'}"
        )
    cap = record.get("capacity")
    if cap:
        c0 = cap[0]
        lines += [
            "",
            f"capacity: a burst of {c0['burst_requests']} test pages into a "
            f"{c0['pool_tokens']}-slot pool, {c0['output_tokens']} output tokens each "
            f"(ignore_eos); configurations chosen by the table (smallest memory within "
            f"{WITHIN:.2f} of the full cache)",
            "",
            markdown_table(
                ["config", "chosen as", "exact match", "slot equivalent", "private kept",
                 "decoding at once (bound)", "vs full", "retractions"],
                [
                    [r["policy"], r["why"], f"{r['exact_match']:.3f}",
                     "-" if r["slot_equivalent"] is None else f"{r['slot_equivalent']:.0f}",
                     r["private_kept"], f"{r['max_running']} ({r['pool_bound']})",
                     f"{r['vs_full']:.2f}x", r["retractions"]]
                    for r in cap
                ],
            ),
        ]  # fmt: skip
        ratio = record.get("capacity_ratio")
        if ratio is not None:
            lines.append(
                f"\nhead-granular vs uniform at equal accuracy: {ratio:.2f}x the requests "
                "decoding at once (goal: 1.5x)"
            )
    return "\n".join(lines)


def goal_line(rows: list[dict], level: int = 64) -> dict | None:
    """The best head-granular method with BACON at ``level`` and whether it is within
    ``WITHIN`` of the full cache."""
    full = next(r for r in rows if r["method"] == "full")["exact_match"]
    uneven = [
        r for r in rows
        if r["level"] == level and r["method"].startswith("bacon-") and r["method"] not in UNIFORM
    ]  # fmt: skip
    best = max(uneven, key=lambda r: r["exact_match"], default=None)
    if best is None:
        return None
    met = best["exact_match"] >= full - WITHIN - 1e-9
    return {
        "level": level,
        "method": best["method"],
        "exact_match": best["exact_match"],
        "met": met,
    }


def write(record: dict, args) -> Path:
    """``equal_memory.{json,md}`` (``_smoke`` with ``--smoke``) under ``--out``; the JSON's
    path."""
    out = Path(args.out) if args.out else results_dir(record["machine"])
    out.mkdir(parents=True, exist_ok=True)
    stem = "equal_memory" + ("_smoke" if args.smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = render(record)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return out / f"{stem}.json"


def add_capacity(record: dict, args) -> None:
    """Run the capacity bursts of the configurations the table chose, into ``record``."""
    start = time.perf_counter()
    cap = run_capacity(args, capacity_configs(record["rows"]))
    record["capacity"] = cap
    by_kind = {r["why"]: r for r in cap}
    if "uniform" in by_kind and "head-granular" in by_kind:
        uniform = by_kind["uniform"]["max_running"] or 1
        record["capacity_ratio"] = by_kind["head-granular"]["max_running"] / uniform
    record["seconds"]["capacity"] = round(time.perf_counter() - start)
    record["seconds"]["total"] += record["seconds"]["capacity"]


def run(args) -> dict:
    """Serve the table (written as soon as it is complete), run the capacity bursts, write
    ``equal_memory.{md,json}`` again."""
    samples = vqa.dataset("test", args.n, start=args.start, task="doc")
    levels = list(args.levels)
    pairs = [("full", None)] + [(m, lv) for m in METHODS[1:] for lv in levels]
    start = time.perf_counter()
    served = serve_table(args, samples, pairs)
    served_s = time.perf_counter() - start
    reference, ref_slots, ref_path = reference_answers(args.reference, samples, args.start)
    rows = table_rows(samples, served, reference, ref_slots)
    record = {
        **task_record(args, len(samples)),
        "levels": levels,
        "window": paper_table.WINDOW,
        "machine": machine(),
        "reference": ref_path,
        "rows": rows,
        "mcnemar": mcnemar_rows(rows, levels),
        "goal": goal_line(rows, 64 if 64 in levels else levels[0]),
        "answers": {f"{m}@{lv}": [t for t, _ in res] for (m, lv), res in served.items()},
    }
    record["seconds"] = {"served": round(served_s), "total": round(time.perf_counter() - start)}
    write(record, args)
    if not args.no_capacity:
        add_capacity(record, args)
        write(record, args)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="test pages")
    parser.add_argument("--start", type=int, default=0, help="first test-split index")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--workers", type=int, default=8, help="concurrent requests (table)")
    parser.add_argument("--reference", type=Path, help="default: newest paper_table_doc.json")
    parser.add_argument("--pool", type=int, default=POOL, help="capacity run's KV pool")
    parser.add_argument("--capacity-output-tokens", type=int, default=128)
    parser.add_argument("--capacity-start", type=int, default=0, help="burst's first page")
    parser.add_argument("--burst", type=int, help="burst size (default: 1.25 x the bound)")
    parser.add_argument("--no-capacity", action="store_true", help="the table only")
    parser.add_argument(
        "--capacity-only", action="store_true",
        help="no table: the capacity bursts for the table in --out (default: newest) added",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="results folder (default: dated, per device)")
    parser.add_argument("--smoke", action="store_true", help="4 pages, level 64, burst 6")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.levels = 4, [64]
        args.burst, args.pool, args.capacity_output_tokens = args.burst or 6, 2048, 16
    args.task, args.model_path = "doc", vqa.shipped_model("doc")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.report_only or args.capacity_only:
        path = args.out / "equal_memory.json" if args.out else latest_result("equal_memory.json")
        record = json.loads(path.read_text())
        if args.capacity_only:
            os.environ.pop("TRITON_INTERPRET", None)
            add_capacity(record, args)
            path.write_text(json.dumps(record, indent=1) + "\n")
        text = render(record)
        path.with_suffix(".md").write_text(text + "\n")
        print(text)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
