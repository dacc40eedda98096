"""Results pages from the committed benchmark JSON, no benchmark run: benchmarks/results/README.md
(every full table), each run's .md and the generated blocks of README.md and benchmarks/README.md;
seconds on CPU.

    python benchmarks/report.py            # rewrite them from benchmarks/results/**/*.json
    python benchmarks/report.py --check    # exit 1 if one is not what the JSON gives (a test)

Each table is rendered by the function of the benchmark script that wrote its JSON (the same
one its ``--report-only`` option uses), so a table never drifts from its data. The newest
``benchmarks/results/<date>-<device>/`` folder holding a benchmark's JSON is the one shown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import accuracy
import common
import compression_cost
import demo_time
import equal_memory
import evidence_retention
import gpu_kit
import kernel_bench
import paper_table
import prefix_reuse
import premise
import serving
import soak

from bacon_sglang.models import vqa

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_README = RESULTS / "README.md"
README = ROOT / "README.md"
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"
MARKERS = {  # README block: (first line, last line); the text between is written here
    "summary": (
        "<!-- results summary: written by benchmarks/report.py from the JSON -->",
        "<!-- end of results summary -->",
    ),
    "demo": (
        "<!-- demo timing: written by benchmarks/report.py from the JSON -->",
        "<!-- end of demo timing -->",
    ),
    "demo output": (
        "<!-- demo output: written by benchmarks/report.py from the JSON -->",
        "<!-- end of demo output -->",
    ),
    "premise": (
        "<!-- premise: written by benchmarks/report.py from the JSON -->",
        "<!-- end of premise -->",
    ),
    "paper table": (
        "<!-- paper table: written by benchmarks/report.py from the JSON -->",
        "<!-- end of paper table -->",
    ),
}
TASKS = ("shapes", "doc")  # the VQA tasks, in the order their tables are shown
POLICY_NAMES = {"none": "full cache", "snapkv": "SnapKV", "bacon": "BACON"}


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return "#" + slug.replace(" ", "-")


def rel(path: Path, start: Path = RESULTS) -> str:
    return path.relative_to(start).as_posix()


def files(data: Path, *plots: Path) -> str:
    """``Data: [json](json), plots: [png](png)`` links, relative to the results page."""
    text = f"Data: [{rel(data)}]({rel(data)})"
    if plots:
        text += ", plots: " + ", ".join(f"[{rel(p)}]({rel(p)})" for p in plots)
    return text + "."


def machine_line(info: dict) -> str:
    device = info.get("gpu") or f"CPU only, {info['cpu']}, {info['cores']} cores"
    return f"{device}, Python {info['python']}"


def answers_by_kind(record: dict) -> str:
    """Correct server answers per question kind (colour, shape) and config: which questions a
    budget loses. The kinds come from rebuilding the test questions (a pure function of index)."""
    kinds = [vqa.sample("test", record["start"] + i).kind for i in range(record["questions"])]
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    table = []
    for row in record["rows"]:
        policy, budget = row["policy"], row["budget"]
        hits = dict.fromkeys(counts, 0)
        for i, kind in enumerate(kinds):
            rid = accuracy.rid_of(policy, budget, i)
            s = vqa.sample("test", record["start"] + i)
            hits[kind] += vqa.exact_match(record["answers"][rid]["server"], s)
        label = "full cache" if policy == "none" else f"{policy}, budget {budget}"
        table.append([label, *(hits[k] for k in counts)])
    header = ["correct answers (server)", *(f"{k} ({n})" for k, n in counts.items())]
    return common.markdown_table(header, table)


def accuracy_section(path: Path) -> str:
    record = json.loads(path.read_text())
    return "\n\n".join(
        [
            "## Accuracy vs KV budget",
            f"`python benchmarks/accuracy.py --n {record['questions']}`: the shipped tiny "
            f"Qwen2-VL, test questions {record['start']}-"
            f"{record['start'] + record['questions'] - 1}, {record['dtype']}, greedy; "
            f"{machine_line(record['machine'])}; {record['seconds']['total']} s. "
            + files(path, path.with_suffix(".png")),
            accuracy.render(record),
            answers_by_kind(record),
            "The budget counts the 32-token observation window: budget 32 keeps no image token. "
            "`offline` rows: transformers decoding from a KV cache reduced to the keep-sets the "
            "server wrote; identical answers mean the differences are the policies', not the "
            "integration's. One task, one tiny model: not a general ranking of the policies.",
        ]
    )


def serving_section(path: Path) -> str:
    result = json.loads(path.read_text())
    config = result["config"]
    stem = path.with_suffix("")
    plots = [Path(f"{stem}_{name}.png") for name in ("throughput", "kv_slots")]
    tables = serving.tables(result).replace("### ", "#### ")
    return "\n\n".join(
        [
            "## Serving: throughput, latency, KV slots, capacity, prefill and decode cost",
            "`python benchmarks/serving.py`: one server per policy "
            f"({', '.join(config['policies'])}), "
            f"`--kv-budget {config['budget']}`, pool {config['max_total_tokens']} slots, "
            f"{config['image_size']} px images, {config['output_tokens']} output tokens "
            f"(capacity burst: {config['capacity_output_tokens']}), server flags "
            f"`{config['server_args']}`, {config['server_threads']} thread(s) per server; "
            f"{machine_line(result['machine'])}; {result['seconds']:.0f} s. " + files(path, *plots),
            tables,
            "KV slots, capacity and retractions are exact counts; the timings come from a shared "
            "2-core machine and vary by tens of percent between runs (a level where one policy "
            "is far ahead of the others is usually such noise: compare its TTFT and queue "
            "columns). `gain bound` is the pool arithmetic (`serving_report.pool_bound`), "
            "`P/(B+S)` the rule of thumb that ignores the output tokens each request also holds.",
        ]
    )


def scale_out_section(paths: list[Path]) -> str:
    parts = [
        "## Scale-out: 1 vs 2 workers behind sglang-router",
        "`python benchmarks/serving.py --workers 1 2 --policies bacon ...`: N CPU servers "
        "(one thread each) behind `sglang_router.launch_router`, requests sent to the router. "
        "Two identical runs 20 minutes apart on a shared machine: only the capacity and "
        "per-worker columns are exact, the timings moved with the other jobs' load.",
    ]
    for path in paths:
        result = json.loads(path.read_text())
        parts += [
            f"{machine_line(result['machine'])}; {result['seconds']:.0f} s. " + files(path),
            serving.tables(result).replace("### ", "#### "),
        ]
    return "\n\n".join(parts)


def prefix_reuse_section(path: Path) -> str:
    result = json.loads(path.read_text())
    config = result["config"]
    return "\n\n".join(
        [
            "## Prefix-cache reuse: follow-up questions and chat turns",
            "`python benchmarks/prefix_reuse.py`: one server per configuration "
            f"({', '.join(config['configs'])}), `--kv-budget {config['budget']}`, pool "
            f"{config['max_total_tokens']} slots; {config['images']} images x "
            f"{config['questions']} questions and {config['chats']} three-turn chats, "
            f"{config['clients']} clients, {config['output_tokens']} output tokens; "
            f"{machine_line(result['machine'])}; {result['seconds']:.0f} s. "
            + files(path, path.with_suffix(".png")),
            prefix_reuse.tables(result).replace("### ", "#### "),
            "Tokens prefilled, KV slots and capacity are counts; the TTFT columns of the first "
            "table compare servers run one after another on a shared machine whose load moved "
            "between them, the paired table alternates both policies on one server.",
        ]
    )


def evidence_section(path: Path) -> str:
    report = json.loads(path.read_text())
    scene = report["scene"]
    return "\n\n".join(
        [
            "## Evidence retention on synthetic attention",
            f"`python benchmarks/evidence_retention.py`: {len(report['seeds'])} seeds, a "
            f"{scene['rows']}x{scene['cols']} image, {scene['num_layers']} layers, "
            f"{scene['num_kv_heads']} KV heads, isolated high-attention spikes in the last "
            "query; `K` = kept candidates per head, the window on top. "
            + files(path, path.with_suffix(".png")),
            evidence_retention.render(report),
        ]
    )


def kernels_section(paths: list[Path]) -> str:
    parts = [
        "## Kernels",
        "`python benchmarks/kernel_bench.py`: each kernel against its PyTorch reference on "
        "Qwen2-VL-7B's shapes; on CPU only the references run (Triton needs a GPU). The GPU "
        "table is the one `python benchmarks/gpu_check.py --steps kernel-tests kernel-bench` "
        "wrote; its report (the compiled kernel tests' result, each row's time over moving "
        "its bytes once) is the newest `<date>-gpu/gpu_check.json`.",
    ]
    return "\n\n".join(parts + runs(paths, kernel_bench.render))


def runs(paths: list[Path], render) -> list[str]:
    """Per run: its files' line, then its table (``render`` of its JSON)."""
    return [part for path in paths for part in (files(path), render(json.loads(path.read_text())))]


def compression_cost_section(paths: list[Path]) -> str:
    parts = [
        "## Compression cost per prefill",
        "`python benchmarks/compression_cost.py`: the compression pass after the last layer "
        "(keep-sets of every layer and request, one compaction) against the per-layer path it "
        "replaced, counted per prefill batch; on a GPU also timed next to the prefill of a "
        "random-weight Qwen2-7B-shaped decoder (`benchmarks/gpu_check.py --steps "
        "compression-cost`). On CPU the kernels ran in Triton's interpreter: the counts hold, "
        "the times do not describe a GPU.",
    ]
    return "\n\n".join(parts + runs(paths, compression_cost.render))


def task_results(stem: str) -> list[Path]:
    """The newest ``<stem>_<task>.json`` of each task that has one, in :data:`TASKS` order."""
    found = []
    for task in TASKS:
        try:
            found.append(common.latest_result(f"{stem}_{task}.json"))
        except FileNotFoundError:
            continue
    return found


def premise_overview() -> str:
    """One row per task: each score's evidence recall at each K, mean over layers."""
    records = [json.loads(p.read_text()) for p in task_results("premise")]
    ks, scores = premise.KS, premise.SCORES
    table = []
    for r in records:
        per_layer = premise.mean_from_record(r)  # [layers, scores, Ks], as its own table
        mean = per_layer.mean(0)
        cells = [f"{float(mean[i, j]):.2f}" for j in range(len(ks)) for i in range(len(scores))]
        table.append([f"{r['task']} ({per_layer.shape[0]}, {r['questions']})", *cells])
    header = ["task (layers, questions)", *(f"{s}@{k}" for k in ks for s in scores)]
    return common.markdown_table(header, table)


def premise_section() -> str:
    parts = [
        "## Quality: BACON's premise (evidence recall per score)",
        "`python benchmarks/premise.py --task TASK`: per layer, the share of the answer's "
        "evidence tokens in each KV head's top-K candidates by the window mean `B`, the last "
        "query `Q`, BACON's calibrated `S` and the answer tokens' own attention `D`; mean over "
        "heads and questions.",
    ]
    for path in task_results("premise"):
        record = json.loads(path.read_text())
        parts += [
            f"### {record['task']} task",
            f"{machine_line(record['machine'])}; {record['seconds']} s. "
            + files(path, path.with_suffix(".png")),
            premise.render(record),
        ]
    return "\n\n".join(parts)


def paper_table_section() -> str:
    parts = [
        "## Quality: the paper's table (4 base methods x base/+BACON)",
        "`python benchmarks/paper_table.py --task TASK`: exact match [Wilson 95% CI] (KV slots "
        "a request holds in SGLang's shared pool); exact McNemar test of each +BACON vs base "
        "pair; `(server)` rows were served by SGLang and decoded again by transformers.",
    ]
    for path in task_results("paper_table"):
        record = json.loads(path.read_text())
        parts += [
            f"### {record['task']} task",
            f"{machine_line(record['machine'])}; {record['seconds']['total']} s. " + files(path),
            paper_table.render(record),
        ]
        served = path.with_name(path.stem + "_served.json")
        if served.exists():
            parts += [
                "The uniform rows served by SGLang (`benchmarks/accuracy.py`), each answer "
                "also decoded by transformers from the server's keep-sets. " + files(served),
                accuracy.render(json.loads(served.read_text())),
            ]
    return "\n\n".join(parts)


def equal_memory_section(path: Path) -> str:
    record = json.loads(path.read_text())
    return "\n\n".join(
        [
            "## Quality at equal memory: head-granular KV (`--kv-layout cells`)",
            "`python benchmarks/equal_memory.py`: every base method alone and with BACON, "
            "served by SGLang with each (layer, KV head) holding exactly the tokens it keeps, "
            "on the document task's held-out pages; memory level `M` = the prompt memory of "
            "uniform budget `M`, each cell showing the slot equivalent a request actually held. "
            "Then the capacity of a fixed pool at equal accuracy. "
            f"{machine_line(record['machine'])}; {record['seconds']['total']} s. " + files(path),
            equal_memory.render(record),
        ]
    )


def paper_tables() -> str:
    """benchmarks/README.md's copy of every task's paper table (the newest run of each)."""
    return "\n\n".join(
        paper_table.render(json.loads(p.read_text())) for p in task_results("paper_table")
    )


def demo_section(path: Path) -> str:
    record = json.loads(path.read_text())
    return "\n\n".join(
        [
            "## Demo time",
            f"`python benchmarks/demo_time.py`: `python {record['command']}` as a subprocess, "
            "each run with an empty TorchInductor cache; `answer s` is the demo's one chat "
            "request (the first the server sees). "
            f"{machine_line(record['machine'])}. " + files(path),
            demo_time.render(record),
        ]
    )


def soak_section(path: Path, cells_path: Path | None = None) -> str:
    record = json.loads(path.read_text())
    runs = ", ".join(f"TP={r['tp']}: {r['requests']} requests" for r in record["runs"])
    parts = [
        "## Fault soak",
        "`python benchmarks/soak.py`: a CPU server with the shipped shapes model, "
        "`--kv-policy bacon --kv-budget 64 --page-size 16 --chunked-prefill-size 128` and "
        "SGLang's forced retraction, four clients drawing a seeded mix of image, text, "
        "long (chunked) and streamed requests, per-request overrides, fuzzed bad overrides "
        "and malformed images, parallel sampling, aborts at a random moment and greedy "
        "control requests, uncompressed and compressed (BACON, SnapKV), each checked against "
        f"its solo answer ({runs}); {machine_line(record['machine'])}. " + files(path),
        soak.render(record),
    ]
    if cells_path is not None:
        cells = json.loads(cells_path.read_text())
        runs = ", ".join(f"TP={r['tp']}: {r['requests']} requests" for r in cells["runs"])
        parts += [
            "`python benchmarks/soak.py --kv-layout cells`: the same server and mix with "
            "`--kv-layout cells` (head-granular KV) and `--kv-head-scores` (made-up, uneven "
            "SparseMM scores: the model ships none); the per-request overrides also draw the "
            "uneven policies (on TP=2 not AdaKV, which a tensor-parallel server refuses), and "
            f"a compressed control is added per uneven policy ({runs}); "
            f"{machine_line(cells['machine'])}. " + files(cells_path),
            soak.render(cells),
        ]
    return "\n\n".join(parts)


def demo_timing() -> str:
    """The README's sentence on how long the demo takes (from the newest demo_time.json)."""
    record = json.loads(common.latest_result("demo_time.json").read_text())
    now = demo_time.medians(record)
    runs = f"median of {now['runs']} runs" if now["runs"] > 1 else "1 run"
    text = (
        "Measured on a shared 2-core machine while other jobs kept its load near "
        f"{now['load']:.0f}, the demo took {now['wall_s']:.0f} s, its answer "
        f"{now['answer_s']:.1f} s of it ({runs}, from an empty compile cache); nearly all the "
        "rest is SGLang's start-up, three processes importing torch, transformers and SGLang"
    )
    old = [r["env"] for r in record["runs"] if r["env"]]
    if old:
        then = demo_time.medians(record, old[0])
        setting = " ".join(f"{k}={v}" for k, v in old[0].items())
        text += (
            f". With `{setting}` (SGLang's `torch.compile`d helpers built with g++ on the "
            f"first request, as before) {then['wall_s']:.0f} s and {then['answer_s']:.1f} s"
        )
    return text + f" ([runs]({'benchmarks/results/README.md' + anchor('Demo time')}))."


def demo_output() -> str:
    """What the demo printed in the newest default run, as a code block (the model path
    shortened: it names the machine's checkout)."""
    record = json.loads(common.latest_result("demo_time.json").read_text())
    run = [r for r in record["runs"] if not r["env"]][-1]
    lines = [re.sub(r"with \S*/bacon_sglang/", "with .../bacon_sglang/", x) for x in run["output"]]
    return "```\n" + "\n".join(lines) + "\n```"


def run_tables() -> dict[Path, str]:
    """Each run's own ``.md`` next to its JSON, as its script's ``--report-only`` writes it."""
    renderers = {
        "accuracy.json": accuracy.render,
        "serving.json": serving.tables,
        "prefix_reuse.json": prefix_reuse.tables,
        "serving_workers.json": serving.tables,
        "serving_workers_run2.json": serving.tables,
        "demo_time.json": demo_time.render,
        "evidence_retention.json": evidence_retention.render,
        "kernels_cpu.json": kernel_bench.render,
        "kernels_gpu.json": kernel_bench.render,
        "soak.json": soak.render,
        "equal_memory.json": equal_memory.render,
        "soak_cells.json": soak.render,
        "gpu_kit.json": gpu_kit.render,
        "compression_cost_cpu.json": compression_cost.render,
        "compression_cost_gpu.json": compression_cost.render,
    }
    for task in TASKS:
        renderers |= {
            f"premise_{task}.json": premise.render,
            f"paper_table_{task}.json": paper_table.render,
            f"paper_table_{task}_served.json": accuracy.render,
        }
    return {
        path.with_suffix(".md"): renderers[path.name](json.loads(path.read_text())) + "\n"
        for path in sorted(RESULTS.glob("**/*.json"))
        if path.name in renderers
    }


def results_readme() -> str:
    """The whole of ``benchmarks/results/README.md``."""
    sections = [
        accuracy_section(common.latest_result("accuracy.json")),
        serving_section(common.latest_result("serving.json")),
        prefix_reuse_section(common.latest_result("prefix_reuse.json")),
        scale_out_section(sorted(RESULTS.glob("*/serving_workers*.json"))),
        premise_section(),
        paper_table_section(),
        *optional_section(equal_memory_section, "equal_memory.json"),
        evidence_section(common.latest_result("evidence_retention.json")),
        kernels_section(common.latest_results("kernels_cpu.json", "kernels_gpu.json")),
        compression_cost_section(
            common.latest_results("compression_cost_cpu.json", "compression_cost_gpu.json")
        ),
        demo_section(common.latest_result("demo_time.json")),
        soak_section(common.latest_result("soak.json"), *common.latest_results("soak_cells.json")),
    ]
    head = (
        "# Benchmark results\n\n"
        "Written by `python benchmarks/report.py` from the JSON files in this folder; do not "
        "edit by hand. Each benchmark script's `--report-only` option rewrites its own `.md` "
        "from the same JSON with the same functions.\n\n"
        + "\n".join(
            f"- [{s.splitlines()[0][3:]}]({anchor(s.splitlines()[0][3:])})" for s in sections
        )
    )
    return "\n\n".join([head, *sections]) + "\n"


def optional_section(section, name: str) -> list[str]:
    """``[section(newest name)]``, or ``[]`` before the benchmark's first committed run."""
    found = common.latest_results(name)
    return [section(found[0])] if found else []


def rows_by(rows: list[dict], key: str, value) -> dict[str, dict]:
    return {r["policy"]: r for r in rows if r.get(key) == value}


def summary() -> str:
    """The README's results table: one line per headline number, each linking to its table."""
    acc = json.loads(common.latest_result("accuracy.json").read_text())
    srv = json.loads(common.latest_result("serving.json").read_text())
    evid = json.loads(common.latest_result("evidence_retention.json").read_text())
    page = "benchmarks/results/README.md"
    link = {
        "serving": page + anchor("Serving (closed loop)"),
        "capacity": page + anchor("Capacity (burst into the fixed pool)"),
        "prefill": page + anchor("Prefill overhead (single request)"),
        "decode": page + anchor("Decode step time (server side)"),
        "accuracy": page + anchor("Accuracy vs KV budget"),
        "paper table": page + anchor("Quality: the paper's table (4 base methods x base/+BACON)"),
        "evidence": page + anchor("Evidence retention on synthetic attention"),
        "prefix reuse": page + anchor("Prefix-cache reuse: follow-up questions and chat turns"),
        "equal memory": page
        + anchor("Quality at equal memory: head-granular KV (`--kv-layout cells`)"),
    }
    policies = ["none", "snapkv", "bacon"]
    budget = srv["config"]["budget"]
    rows = []

    def line(what: str, cells: dict[str, str], table: str) -> None:
        rows.append([what, *(cells.get(p, "-") for p in policies), f"[{table}]({link[table]})"])

    levels = sorted({r["concurrency"] for r in srv["sweep"]})
    for level in levels[:2]:
        peak = rows_by(srv["sweep"], "concurrency", level)
        clients = "1 request" if level == 1 else f"{level} clients"
        line(f"KV slots held, {clients}, budget {budget} (peak)",
             {p: str(r["kv_peak"]) for p, r in peak.items()},
             "serving")  # fmt: skip
    cap = {r["policy"]: r for r in srv["capacity"]}
    pool = next(iter(cap.values()))["pool_tokens"]
    line(
        f"requests decoding at once in {pool} slots, budget {budget} (bound)",
        {p: f"{r['max_running']} ({r['pool_bound']})" for p, r in cap.items()},
        "capacity",
    )
    sizes = sorted({r["image_px"] for r in srv["prefill"]})
    ends = [min(sizes), max(sizes)]
    prefill = {
        p: " / ".join(
            f"{r['vs_none']:.2f}"
            for r in srv["prefill"]
            if r["policy"] == p and r["image_px"] in ends
        )
        for p in policies
        if p != "none"
    }
    prompts = " / ".join(
        str(next(r["prompt_tokens"] for r in srv["prefill"] if r["image_px"] == s)) for s in ends
    )
    line(f"prefill time vs compression off, {prompts} tokens", prefill, "prefill")
    decode = rows_by(srv["decode"], "batch", 1)
    line("decode step ms, batch 1", {p: f"{r['step_ms']:.1f}" for p, r in decode.items()}, "decode")
    budgets = [b for b in (256, 128, 64) if any(r["budget"] == b for r in acc["rows"])]
    full = next(r["server"] for r in acc["rows"] if r["policy"] == "none")
    exact = {"none": f"{full:.3f}"}
    for p in ("snapkv", "bacon"):
        by_budget = {r["budget"]: r["server"] for r in acc["rows"] if r["policy"] == p}
        exact[p] = " / ".join(f"{by_budget[b]:.3f}" for b in budgets)
    budget_text = " / ".join(map(str, budgets))
    line(
        f"exact match, shapes task, budget {budget_text} (n={acc['questions']})", exact, "accuracy"
    )
    table = json.loads(common.latest_result("paper_table_doc.json").read_text())
    cell = {(r["method"], r["budget"]): r["exact_match"] for r in table["rows"]}
    doc = {"none": f"{cell[('full', None)]:.3f}"}
    for p, method in (("snapkv", "snapkv"), ("bacon", "bacon-snapkv")):
        doc[p] = " / ".join(f"{cell[(method, b)]:.3f}" for b in table["budgets"])
    line(
        f"exact match, document task, budget {' / '.join(map(str, table['budgets']))}"
        f" (n={table['questions']})",
        doc,
        "paper table",
    )
    ks = (128, 64, 32)
    recall = {
        p: " / ".join(
            f"{r['evidence_recall']:.2f}"
            for k in ks
            for r in evid["retention"]
            if r["method"] == m and r["budget"] == k
        )
        for p, m in (("snapkv", "snapkv"), ("bacon", "bacon-1d"))
    }
    line(f"evidence recall at K = {' / '.join(map(str, ks))} (synthetic)", recall, "evidence")
    reuse = json.loads(common.latest_result("prefix_reuse.json").read_text())
    follow = {r["config"]: r for r in reuse["rows"] if r["workload"] == "questions"}
    line(
        "prompt tokens prefilled per follow-up question (BACON: in place / full prompts cached)",
        {
            "none": f"{follow['none']['follow_prefilled_mean']:.0f}",
            "bacon": f"{follow['bacon-shared']['follow_prefilled_mean']:.0f} / "
            f"{follow['bacon-full']['follow_prefilled_mean']:.0f}",
        },
        "prefix reuse",
    )
    found = common.latest_results("equal_memory.json")
    if found:
        equal_memory_lines(json.loads(found[0].read_text()), line)
    header = ["2 CPU cores, tiny Qwen2-VL", "full cache", "SnapKV", "BACON", "table"]
    return common.markdown_table(header, rows)


def equal_memory_lines(record: dict, line) -> None:
    """The summary's head-granular lines: exact match at the memory of uniform budget 64
    (each base method, without and with BACON), and the capacity at equal accuracy."""
    rows = {(r["method"], r["level"]): r for r in record["rows"]}
    level = 64 if any(k[1] == 64 for k in rows) else record["levels"][0]
    bases = ("snapkv", "adakv", "sparsemm")

    def exact(method: str) -> str:
        r = rows.get((method, level))
        return "-" if r is None else f"{r['exact_match']:.3f}"

    line(
        f"exact match, document task, memory of budget {level}, cells: SnapKV / AdaKV / SparseMM",
        {
            "none": f"{rows[('full', None)]['exact_match']:.3f}",
            "snapkv": " / ".join(exact(b) for b in bases),
            "bacon": " / ".join(exact(f"bacon-{b}") for b in bases),
        },
        "equal memory",
    )
    cap = {r["why"]: r for r in record.get("capacity", [])}
    if "uniform" in cap and "head-granular" in cap:
        pool = cap["full"]["pool_tokens"]
        uniform, ragged = cap["uniform"], cap["head-granular"]
        line(
            f"requests decoding at once in {pool} slots, at most 2 points below the full "
            f"cache (BACON: {uniform['policy']} / {ragged['policy']})",
            {
                "none": str(cap["full"]["max_running"]),
                "bacon": f"{uniform['max_running']} / {ragged['max_running']}",
            },
            "equal memory",
        )


def with_block(readme: str, name: str, text: str) -> str:
    """``readme`` with the text between the ``name`` markers replaced by ``text``."""
    begin, end = MARKERS[name]
    start, stop = readme.index(begin), readme.index(end)
    return readme[: start + len(begin)] + "\n" + text + "\n" + readme[stop:]


def readme() -> str:
    """The repository README with its generated blocks up to date."""
    text = with_block(README.read_text(), "summary", summary())
    text = with_block(text, "demo output", demo_output())
    return with_block(text, "demo", demo_timing())


def benchmarks_readme() -> str:
    """``benchmarks/README.md`` with its generated blocks (the quality discussion's tables)."""
    text = with_block(BENCHMARKS_README.read_text(), "premise", premise_overview())
    return with_block(text, "paper table", paper_tables())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    wanted = {
        RESULTS_README: results_readme(),
        README: readme(),
        BENCHMARKS_README: benchmarks_readme(),
        **run_tables(),
    }
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: stale, run benchmarks/report.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
