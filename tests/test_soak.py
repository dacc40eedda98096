"""The fault soak, short: 60 requests of every kind against one CPU server with forced
retraction (the committed run has 1,000, then 300 on TP=2: ``benchmarks/soak.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak  # noqa: E402

pytestmark = pytest.mark.engine


def test_short_soak_leaves_the_server_whole(tiny_model_path):
    record = soak.run(str(tiny_model_path), tp=1, requests_total=60, minutes=10, seed=1)
    assert record["problems"] == [], record
    assert record["requests"] == 60
    assert record["server_errors"] == 0 and record["alive"]
    assert record["stashed_requests"] == 0
    bad = record["by_kind"].get("bad_override", 0) + record["by_kind"].get("bad_image", 0)
    assert bad > 0 and record["bad_accepted"] == 0


def test_soak_problems_are_found():
    """The verdict sees each kind of damage (a soak that cannot fail proves nothing)."""
    whole = {
        "server_errors": 0, "alive": True, "bad_accepted": 0, "unexpected_4xx": 0,
        "controls_changed": 0, "stashed_requests": 0,
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
    ]
    for change in broken:
        assert len(soak.problems({**whole, **change})) == 1, change
