"""What the benchmark scripts share: the machine a run was taken on, where results go, the VQA
task arguments, one Markdown-table writer and a progress bar with the time left.

No benchmark logic here, no SGLang import; each script imports what it needs from this file.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were taken on: CPU model and cores, the GPU (None without one),
    Python's version."""
    from bacon_sglang.server import cpu_engine

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
    gpu = None
    if not cpu_engine():
        import torch

        gpu = torch.cuda.get_device_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def results_dir(info: dict) -> Path:
    """``benchmarks/results/<date>-<device>``, e.g. ``2026-11-25-cpu-2core``."""
    device = info["gpu"] or f"cpu-{info['cores']}core"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return RESULTS / f"{datetime.date.today().isoformat()}-{slug}"


def latest_result(name: str) -> Path:
    """The newest ``benchmarks/results/<date>-<device>/<name>`` (folder names sort by date)."""
    found = sorted(RESULTS.glob(f"*/{name}"), key=lambda p: p.parent.name)
    if not found:
        raise FileNotFoundError(f"no {RESULTS}/*/{name}: run the benchmark first")
    return found[-1]


def latest_results(*names: str) -> list[Path]:
    """:func:`latest_result` of each of ``names`` that some run wrote (the others skipped)."""
    return [latest_result(n) for n in names if any(RESULTS.glob(f"*/{n}"))]


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The VQA benchmarks' ``--task`` and ``--model-path`` (see :func:`task_model_path`)."""
    parser.add_argument("--task", choices=("shapes", "doc"), default="shapes")
    parser.add_argument(
        "--model-path", type=lambda p: Path(p).resolve(), help="default: the task's shipped model"
    )


def task_model_path(args: argparse.Namespace) -> Path:
    """``--model-path``, or the shipped model trained on ``--task``."""
    from bacon_sglang.models import vqa

    return args.model_path or vqa.shipped_model(args.task)


def task_record(args: argparse.Namespace, questions: int) -> dict:
    """The head of a VQA benchmark's JSON record: model, task, split, questions, first
    question (``--start``)."""
    return {
        "model": str(args.model_path),
        "task": args.task,
        "split": "test",
        "questions": questions,
        "start": args.start,
    }


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: ``header`` cells, then one line per row (cells shown with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def columns_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` ``(key, header, format)``; ``-`` where a
    value is missing or NaN."""

    def cell(value, fmt: str) -> str:
        bad = value is None or (isinstance(value, float) and math.isnan(value))
        return "-" if bad else fmt.format(value)

    table = [[cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    return markdown_table([header for _, header, _ in columns], table)


def progress(items: Iterable, total: int | None = None, what: str = ""):
    """``items`` with a progress bar on stderr that estimates the time left (tqdm, which
    SGLang brings): the long runs (the paper table takes 45 minutes on 2 cores) say where
    they are."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit="q", mininterval=10, dynamic_ncols=True)
