"""The equal-memory benchmark (``benchmarks/equal_memory.py``): its choice of the capacity
configurations, and a smoke run on the cells server whose answers must equal the committed
paper table's (the offline reference of the uneven methods, the slots server's of SnapKV and
BACON) and whose requests hold what their keep-sets count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # equal_memory.py imports its siblings
_SPEC = importlib.util.spec_from_file_location("equal_memory", BENCHMARKS / "equal_memory.py")
equal_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(equal_memory)


def row(method: str, level: int | None, exact: float, memory: float | None) -> dict:
    return {"method": method, "level": level, "exact_match": exact, "slot_equivalent": memory}


def test_capacity_configurations_are_the_smallest_within_two_points():
    rows = [
        row("full", None, 0.936, None),
        row("snapkv", 256, 0.930, 256),
        row("bacon-snapkv", 256, 0.936, 256),
        row("bacon-snapkv", 128, 0.868, 128),  # 6.8 points below: not equal accuracy
        row("sparsemm", 48, 0.894, 46),
        row("bacon-sparsemm", 48, 0.928, 46),
        row("bacon-sparsemm", 64, 0.936, 61),
        row("adakv", 48, 0.920, 48),
    ]
    chosen = equal_memory.capacity_configs(rows)
    assert [(c["why"], c["method"], c["level"]) for c in chosen] == [
        ("full", "full", None),
        ("uniform", "bacon-snapkv", 256),  # tie at 256 slots: the more accurate
        ("head-granular", "bacon-sparsemm", 48),
    ]
    best = equal_memory.goal_line(rows, 64)
    assert (best["method"], best["met"]) == ("bacon-sparsemm", True)
    assert equal_memory.goal_line(rows[:4] + [row("bacon-adakv", 64, 0.90, 64)], 64)["met"] is False


@pytest.mark.engine
def test_equal_memory_smoke(tmp_path):
    """4 test pages at level 64, every method on the cells server, then the capacity burst:
    uniform methods hold 64 slot equivalents, the uneven ones what their keep-sets count (at
    most the widest head's slots of the slots layout); every served answer equals the
    reference's; the Markdown is what ``render`` makes of the JSON."""
    args = equal_memory.parse_args(["--smoke", "--out", str(tmp_path)])
    record = equal_memory.run(args)
    rows = {(r["method"], r["level"]): r for r in record["rows"]}
    assert set(rows) == {("full", None)} | {(m, 64) for m in equal_memory.METHODS[1:]}
    for method in equal_memory.UNIFORM:
        assert rows[(method, 64)]["slot_equivalent"] == 64
    for key, r in rows.items():
        assert r["agreement"] == 1.0, key  # served in cells == the reference's answers
        if key[0] not in ("full", *equal_memory.UNIFORM):
            assert r["slot_equivalent"] <= r["slots_layout"], key
    # SparseMM's shipped scores give one head more than the prompt: the slots layout holds
    # the whole prompt, the cells the sum of the keep-sets
    assert (
        rows[("bacon-sparsemm", 64)]["slots_layout"]
        > 2 * rows[("bacon-sparsemm", 64)]["slot_equivalent"]
    )
    cap = record["capacity"]
    assert [c["why"] for c in cap][0] == "full"
    for c in cap:
        assert 0 < c["max_running"] <= c["pool_bound"], c
    written = json.loads((tmp_path / "equal_memory_smoke.json").read_text())
    text = (tmp_path / "equal_memory_smoke.md").read_text()
    assert text == equal_memory.render(written) + "\n"
