"""``benchmarks/compression_cost.py`` as a CPU smoke run (tiny shapes, kernels interpreted):
it writes its JSON and table, the pass's launches do not grow with the depth or the batch,
and the per-layer path it replaced launches 4 kernels per layer plus the compaction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import compression_cost  # noqa: E402


def test_compression_cost_smoke_run(tmp_path, one_thread, kernel_device):
    path = tmp_path / "cost.json"
    compression_cost.main(["--device", kernel_device, "--shape", "tiny", "--layers", "1", "5",
                           "--n", "80", "--batch", "1", "2", "--repeats", "1",
                           "--json", str(path)])  # fmt: skip
    assert torch.is_grad_enabled()  # the run left the caller's autograd as it was
    report = json.loads(path.read_text())
    assert report["shape"]["layers"] == [1, 5]
    assert path.with_suffix(".md").read_text() == compression_cost.render(report) + "\n"
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # layers x batch x path x policy
    for policy, launches in (("snapkv", 4), ("bacon", 5)):
        fused = [r for r in rows if r["mode"] == "pass" and r["policy"] == policy]
        assert {(r["triton_launches"], r["aten_ops"]) for r in fused} == {
            (launches, fused[0]["aten_ops"])
        }, fused
        for r in rows:
            if r["mode"] == "per-layer" and r["policy"] == policy:
                assert r["triton_launches"] == 4 * r["layers"] + 1
                assert r["aten_ops"] > fused[0]["aten_ops"]
    assert all(r["prefill_ms"] > 0 and r["host_ms"] > 0 for r in rows)
