"""The serving benchmark (``benchmarks/serving.py --smoke``) end to end on SGLang's real
engine: one server per policy, the report has every column, and BACON holds fewer KV slots
than the full cache for the same work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import serving_report  # noqa: E402

# What the issue asks the report to show, by table.
REQUIRED = {
    "sweep": ["req_per_s", "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
              "itl_p99_ms", "kv_peak", "kv_mean", "max_running", "retractions", "max_waiting"],
    "open_loop": ["rate", "req_per_s", "ttft_p50_ms", "itl_p50_ms", "kv_peak", "max_waiting"],
    "capacity": ["max_running", "pool_bound", "gain_measured", "gain_p_over_b"],
    "prefill": ["ttft_p50_ms", "vs_none"],
    "decode": ["step_ms", "batch_mean"],
}  # fmt: skip
COLUMNS = {
    "sweep": serving_report.SWEEP_COLUMNS,
    "open_loop": serving_report.OPEN_LOOP_COLUMNS,
    "capacity": serving_report.CAPACITY_COLUMNS,
    "prefill": serving_report.PREFILL_COLUMNS,
    "decode": serving_report.DECODE_COLUMNS,
}


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_path) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("serving")
    command = [sys.executable, str(BENCHMARKS / "serving.py"), "--smoke", "--out", str(out)]
    command += ["--policies", "none", "bacon"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "serving.json").read_text()), out


@pytest.mark.parametrize("table", sorted(REQUIRED))
def test_report_has_every_column(report, table):
    result, out = report
    rows = result[table]
    assert {r["policy"] for r in rows} == {"none", "bacon"}
    names = [name for name, _, _ in COLUMNS[table]]
    assert set(REQUIRED[table]) <= set(names)
    # Decode steps are compared with none's only at the same mean batch ("-" otherwise: on a
    # busy machine the levels' mean batches can differ by more than 10%).
    optional = {"vs_none"} if table == "decode" else set()
    for row in rows:
        assert set(names) <= set(row), (table, row)
        missing = [n for n in names if row[n] is None and n not in optional]
        assert not missing, (table, row)
    markdown = (out / "serving.md").read_text()
    assert all(header in markdown for _, header, _ in COLUMNS[table])


def test_outputs_written_and_server_left_clean(report):
    result, out = report
    for name in ("serving.json", "serving.md", "serving_throughput.png", "serving_kv_slots.png"):
        assert (out / name).stat().st_size > 0
    for policy in result["policies"]:
        assert policy["idle_kv"]["idle_ok"], policy["idle_kv"]
        assert all(row["errors"] == 0 for row in policy["sweep"])


def test_bacon_holds_fewer_kv_slots_than_full_cache(report):
    result, _ = report
    peak = {(r["policy"], r["concurrency"]): r["kv_peak"] for r in result["sweep"]}
    for (policy, level), slots in peak.items():
        if policy == "bacon":
            assert 0 < slots < peak[("none", level)], peak
    capacity = {r["policy"]: r for r in result["capacity"]}
    assert capacity["bacon"]["max_running"] > capacity["none"]["max_running"], capacity
