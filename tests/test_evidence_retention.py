"""The sparse-evidence benchmark on a small scene and fixed seeds: the shape the paper claims."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence_retention.py"
_SPEC = importlib.util.spec_from_file_location("evidence_retention", _PATH)
er = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = er  # dataclasses look their module up by name
_SPEC.loader.exec_module(er)


pytestmark = pytest.mark.usefixtures("one_thread")


SCENE = er.Scene(rows=16, cols=16, num_layers=6, num_kv_heads=2)
SEEDS = [0, 1, 2, 3]
TIGHT = (64, 32)


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, int], dict]:
    rows = er.retention(SCENE, SEEDS, ks=TIGHT)
    return {(r["method"], r["budget"]): r for r in rows}


def test_synthetic_request_has_the_advertised_structure():
    request = er.make_request(SCENE, seed=0)
    n, w = SCENE.length, SCENE.window
    assert len(request.attn) == len(request.spikes) == SCENE.num_layers
    assert request.attn[0].shape == (SCENE.num_kv_heads * SCENE.group, w, n)
    torch.testing.assert_close(request.attn[0].sum(-1), torch.ones(4, w))
    # Evidence: a rectangle of patches inside the image, the same in every layer.
    start, rows, cols = request.grid
    patches = request.evidence - start
    assert patches.min() >= 0 and patches.max() < rows * cols
    height = len(set((patches // cols).tolist()))
    assert height * len(set((patches % cols).tolist())) == len(patches)
    # Spikes: isolated candidates, away from the evidence, new in every layer.
    for spikes in request.spikes:
        assert len(spikes) == SCENE.spikes and spikes.max() < n - w
        assert torch.all(spikes.diff() > 1)
        patches = spikes[(spikes >= start) & (spikes < start + rows * cols)] - start
        y, x = patches // cols, patches % cols
        apart = ((y[:, None] - y).abs() > 1) | ((x[:, None] - x).abs() > 1)
        assert apart.sum() == len(patches) * (len(patches) - 1)  # isolated on the grid too
        assert not torch.isin(spikes, request.evidence).any()
    assert not torch.equal(request.spikes[0], request.spikes[1])
    # The last query attends far more to the evidence than the window does on average.
    attn = request.attn[-1]
    last, mean = (
        attn[:, -1, request.evidence].sum(-1),
        attn[:, :, request.evidence].sum(-1).mean(-1),
    )
    assert torch.all(last > 3 * mean)


@pytest.mark.parametrize("k", TIGHT)
def test_bacon_recovers_more_evidence_than_snapkv(results, k):
    bacon = results["bacon-1d", k]["evidence_recall"]
    snapkv = results["snapkv", k]["evidence_recall"]
    assert bacon >= snapkv + 0.12 and bacon >= 2 * snapkv


@pytest.mark.parametrize("k", TIGHT)
def test_bacon_keeps_fewer_spikes_than_last_query(results, k):
    bacon = results["bacon-1d", k]["noise_share"]
    last = results["last-query", k]["noise_share"]
    assert bacon <= last - 0.03


@pytest.mark.parametrize("k", TIGHT)
def test_bacon_keeps_most_of_the_window_mass(results, k):
    bacon = results["bacon-1d", k]["window_mass"]
    assert bacon >= 0.9 * results["snapkv", k]["window_mass"]
    assert bacon >= results["last-query", k]["window_mass"] + 0.2


def test_report_helpers(results, tmp_path):
    rows = list(results.values())
    table = er.retention_table(rows, ks=TIGHT)
    assert table.count("| bacon-2d |") == len(er.METRICS)
    cost = er.cost(
        lengths=(300,), num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, repeats=1
    )
    assert cost[0]["score_ratio"] > 0 and "| 300 |" in er.cost_table(cost)
    png = tmp_path / "plot.png"
    assert er.plot(rows, png, ks=TIGHT) == png.exists()
