"""The serving benchmark's ``--workers`` mode without servers: several servers' load
snapshots summed, and the scale-out table's rows."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # noqa: E402
import serving  # noqa: E402
import serving_client  # noqa: E402
import serving_report  # noqa: E402


def test_snapshots_of_several_servers_are_summed():
    a = {
        "num_used_tokens": 10,
        "max_total_num_tokens": 8192,
        "decode_moments": [1.0, 2.0],
        "dp_rank": 0,
        "flag": True,
        "name": "x",
    }
    b = {"num_used_tokens": 5, "max_total_num_tokens": 8192, "decode_moments": [3.0, 4.0],
         "dp_rank": 0, "flag": False, "name": "y"}  # fmt: skip
    total = serving_client.summed([a, b])
    assert total["num_used_tokens"] == 15
    assert total["max_total_num_tokens"] == 16384
    assert total["decode_moments"] == [4.0, 6.0]
    assert total["flag"] is True and total["name"] == "x"  # not numbers: the first's
    assert serving_client.summed([a]) is a


def test_scale_out_rows_label_workers_and_spread():
    sweep = {"policy": "bacon x2", "concurrency": 8, "req_per_s": 5.0, "out_tok_per_s": 160.0,
             "ttft_p50_ms": 100.0, "ttft_p99_ms": 300.0}  # fmt: skip
    runs = [
        {"workers": 0, "sweep": [sweep]},  # a plain server: not in the table
        {"workers": 2, "router_policy": "cache_aware", "sweep": [sweep],
         "capacity": {"max_running": 80, "pool_bound": 82}, "compressed_per_worker": [30, 12]},
    ]  # fmt: skip
    (row,) = serving.scale_out_rows(runs)
    assert row["per_worker"] == "30/12" and row["capacity"] == 80 and row["workers"] == 2
    table = common.columns_table([row], serving_report.SCALE_OUT_COLUMNS)
    assert "| bacon x2 | 2 | cache_aware | 8 | 5.00 |" in table
