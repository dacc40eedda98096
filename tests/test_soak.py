"""The fault soak, short: requests of every kind against one CPU server with forced
retraction, with each KV layout (the committed runs have 1,000 requests, then 300 on TP=2,
and 1,000 with ``--kv-layout cells``: ``benchmarks/soak.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak  # noqa: E402

from bacon_sglang.config import RAGGED_POLICIES  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    "layout, requests_total, seed",
    # cells: 16 requests; seed 10 draws every kind but one, a compressed control with an
    # uneven policy and an AdaKV override
    [("slots", 60, 1), ("cells", 16, 10)],
)
def test_short_soak_leaves_the_server_whole(
    tiny_model_path, monkeypatch, layout, requests_total, seed
):
    if layout == "cells":
        # The server runs the PyTorch references, as the committed soak (production on CPU):
        # interpreted, the decode over cells takes about 0.7 s a token on 2 cores, and the
        # 12 solo controls alone took 100 s. tests/test_cells_e2e.py runs the kernels.
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    record = soak.run(str(tiny_model_path), 1, requests_total, 10, seed, layout)
    assert record["problems"] == [], record
    assert record["requests"] == requests_total
    assert record["server_errors"] == 0 and record["alive"]
    assert record["stashed_requests"] == 0
    bad = record["by_kind"].get("bad_override", 0) + record["by_kind"].get("bad_image", 0)
    assert bad > 0 and record["bad_accepted"] == 0
    assert record["controls_compressed"] > 0 and record["failures"] == 0, record
    if layout == "cells":
        assert record["cells_held"] == 0 and record["cell_slots_held"] == 0, record
        assert record["controls_uneven"] > 0, record
        assert set(record["compressed_by_policy"]) & set(RAGGED_POLICIES), record


def test_soak_problems_are_found():
    """The verdict sees each kind of damage (a soak that cannot fail proves nothing)."""
    whole = {
        "server_errors": 0, "alive": True, "bad_accepted": 0, "unexpected_4xx": 0,
        "controls_changed": 0, "stashed_requests": 0, "failures": 0,
        "cells_held": 0, "cell_slots_held": 0,
        "pool": {"total": 10, "available": 6, "evictable": 4, "protected": 0},
    }  # fmt: skip
    assert soak.problems(whole) == []
    broken = [
        {"server_errors": 1},
        {"alive": False},
        {"bad_accepted": 2},
        {"controls_changed": 1},
        {"stashed_requests": 1},
        {"pool": {"total": 10, "available": 5, "evictable": 4, "protected": 0}},
        {"pool": {"total": 10, "available": 6, "evictable": 4, "protected": 3}},
        {"failures": 1},  # a request served uncompressed
        {"cells_held": 8, "cell_slots_held": 1},
        {"cell_slots_held": 1},
    ]
    for change in broken:
        assert len(soak.problems({**whole, **change})) == 1, change


def test_every_changed_control_is_counted():
    """Every control must answer as alone, compressed or not, retracted or not."""
    outcomes = [
        {"kind": "control", "status": 200, "control_equal": False, "retracted": True,
         "uneven": True, "policies": ["bacon-pyramidkv"]},
        {"kind": "control", "status": 200, "control_equal": False, "retracted": False,
         "uneven": False, "policies": ["bacon"]},
        {"kind": "control", "status": 200, "control_equal": True, "retracted": True,
         "uneven": False, "policies": ["snapkv"]},
        {"kind": "control", "status": 200, "control_equal": True, "retracted": False,
         "uneven": False},
    ]  # fmt: skip
    summary = soak.control_summary(outcomes, "cells")
    assert summary["controls_changed"] == 2 and summary["controls_retracted"] == 2
    assert summary["controls_compressed"] == 3 and summary["controls_compressed_retracted"] == 2
    assert summary["controls_uneven"] == 1
    assert "controls_uneven" not in soak.control_summary(outcomes, "slots")


def test_servers_are_sent_what_they_serve():
    """Uneven policies only to a cells server, AdaKV not to a tensor-parallel one."""

    def policies(layout: str, tp: int) -> set:
        overrides = [soak.override_of(b) for b in soak.controls(layout, tp)]
        overrides += soak.good_overrides(layout, tp)
        return {soak.policy_of(o) for o in overrides} - {None}

    assert policies("slots", 1) == {"snapkv", "none"}
    assert policies("cells", 1) == {"snapkv", "none", *RAGGED_POLICIES}
    assert policies("cells", 2) == {"snapkv", "none", *RAGGED_POLICIES} - {"adakv", "bacon-adakv"}


@pytest.mark.parametrize(
    "reply, expected",
    [
        ({"meta_info": {"num_retractions": 1, "kv_compression": {"policy": "adakv"}}},
         {"policies": ["adakv"]}),
        ([{"meta_info": {"num_retractions": 0, "kv_compression": {"policy": "sparsemm"}}},
          {"meta_info": {"num_retractions": 2}}],
         {"policies": ["sparsemm"]}),
        ({"error": "bad"}, {}),
    ],
)  # fmt: skip
def test_compressions_read_from_the_replies(reply, expected):
    assert soak.compressions(200, reply) == expected
