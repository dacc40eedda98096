"""Wall time of the README's demo (``python -m bacon_sglang.demo``) as a new user meets it, and of
its one answer; on CPU (2 cores) one to five minutes per run, depending on the machine's load.

    python benchmarks/demo_time.py --runs 2                          # -> results/<date>-<dev>/
    python benchmarks/demo_time.py --runs 2 --also TORCHDYNAMO_DISABLE=0   # and the old setup
    python benchmarks/demo_time.py --report-only                     # demo_time.md from the JSON

Each run starts the demo as a subprocess with a fresh, empty TorchInductor cache
(``TORCHINDUCTOR_CACHE_DIR``), as on a machine where nothing was compiled yet, and records:
``wall_s``, the whole command; ``answer_s``, the one chat request (the demo's ``request
time`` line: the first request the server sees); ``start_and_stop_s``, from the demo's first
line to its report (server start-up, the request, shutdown); the load average before and after
(the machine is shared: compare runs taken under a similar load). ``--also ENV=VALUE`` adds
runs with that environment, alternating with the default ones so that both see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import latest_result, machine, markdown_table, results_dir

DEMO = [sys.executable, "-m", "bacon_sglang.demo"]


def run_once(extra_env: dict[str, str]) -> dict:
    """One demo run with a fresh TorchInductor cache; its timings and load."""
    with tempfile.TemporaryDirectory(prefix="demo-inductor-") as cache:
        env = {**os.environ, **extra_env, "TORCHINDUCTOR_CACHE_DIR": cache}
        load_before = os.getloadavg()
        start = time.perf_counter()
        process = subprocess.Popen(
            DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=tempfile.gettempdir(),
        )  # fmt: skip
        first_line = None
        lines = []
        for line in process.stdout:
            now = time.perf_counter() - start
            first_line = now if first_line is None else first_line
            lines.append((now, line.rstrip("\n")))
        stderr = process.stderr.read()
        rc = process.wait()
        wall = time.perf_counter() - start
        compiled = any(Path(cache).iterdir())
    if rc != 0:
        raise RuntimeError(f"demo failed ({rc}):\n{stderr[-3000:]}")
    text = "\n".join(line for _, line in lines)
    answer = float(re.search(r"request time\s*:\s*([\d.]+) s", text).group(1))
    report_at = next(t for t, line in lines if line.startswith("image "))
    return {
        "env": extra_env,
        "wall_s": wall,
        "answer_s": answer,
        "start_and_stop_s": report_at - first_line,
        "correct": "correct           : yes" in text,
        "inductor_compiled": compiled,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "output": [line for _, line in lines],
    }


def parse_env(items: list[str]) -> list[dict[str, str]]:
    variants = [{}]
    for item in items:
        key, _, value = item.partition("=")
        variants.append({key: value})
    return variants


def render(record: dict) -> str:
    """One line per run, then the medians per setup."""
    header = (
        "setup", "wall s", "answer s", "start, answer, stop s", "correct", "inductor compiled",
        "load before", "load after",
    )  # fmt: skip
    yes = {True: "yes", False: "no"}
    rows = [
        (
            " ".join(f"{k}={v}" for k, v in r["env"].items()) or "default",
            f"{r['wall_s']:.1f}",
            f"{r['answer_s']:.2f}",
            f"{r['start_and_stop_s']:.1f}",
            yes[bool(r["correct"])],
            yes[bool(r["inductor_compiled"])],
            f"{r['loadavg_before'][0]:.1f}",
            f"{r['loadavg_after'][0]:.1f}",
        )  # fmt: skip
        for r in record["runs"]
    ]
    return markdown_table(header, rows)


def medians(record: dict, env: dict | None = None) -> dict[str, float]:
    """Median wall, answer time and 1-minute load of the runs with environment ``env``."""
    runs = [r for r in record["runs"] if r["env"] == (env or {})]
    return {key: statistics.median(r[key] for r in runs) for key in ("wall_s", "answer_s")} | {
        "load": statistics.median(r["loadavg_before"][0] for r in runs),
        "runs": len(runs),
    }


def write_report(record: dict, out: Path) -> None:
    markdown = render(record)
    (out / "demo_time.md").write_text(markdown + "\n")
    print(markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per setup")
    parser.add_argument("--also", nargs="*", default=[], help="ENV=VALUE: another setup")
    parser.add_argument("--out", type=Path, help="results folder (default: dated)")
    parser.add_argument(
        "--report-only", action="store_true", help="no run: demo_time.md from demo_time.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        path = args.out / "demo_time.json" if args.out else latest_result("demo_time.json")
        write_report(json.loads(path.read_text()), path.parent)
        return 0
    runs = []
    for i in range(args.runs):
        for env in parse_env(args.also):
            runs.append(run_once(env))
            print(f"run {i}: {runs[-1]}", flush=True)
    record = {"machine": machine(), "command": " ".join(DEMO[1:]), "runs": runs}
    out = args.out or results_dir(record["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_time.json").write_text(json.dumps(record, indent=1) + "\n")
    write_report(record, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
