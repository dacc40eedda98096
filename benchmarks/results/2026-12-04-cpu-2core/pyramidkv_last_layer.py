"""Ad-hoc ablation (issue 13): is PyramidKV's collapse on tiny_doc its starved last layer?

SnapKV with only the last layer's per-head candidates set to PyramidKV's last-layer cap, and
PyramidKV with only its last layer given SnapKV's uniform ``K``, at budgets 128 and 64; run by
``paper_table.offline_rows`` as the paper table's variable-budget rows (the shipped document
model, test questions 0..n-1). From the repository root:

    python benchmarks/results/2026-12-04-cpu-2core/pyramidkv_last_layer.py 500

(printed: ``pyramidkv_last_layer.txt`` next to this file; 7 min 42 s on 2 otherwise idle
cores).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: paper_table
import paper_table  # noqa: E402

from bacon_sglang.allocation import pyramid_candidates  # noqa: E402
from bacon_sglang.models import vqa  # noqa: E402
from bacon_sglang.policies import PyramidKV, SnapKV  # noqa: E402

BUDGETS = (128, 64)


@dataclass(frozen=True)
class SnapKVStarvedLast(SnapKV):
    """SnapKV, except that the last layer keeps PyramidKV's last-layer cap per head."""

    def allocate(self, scores, candidates, layer_idx, num_layers):
        if layer_idx == num_layers - 1:
            heads, available = scores.shape
            return pyramid_candidates(candidates, layer_idx, num_layers, heads, available)
        return super().allocate(scores, candidates, layer_idx, num_layers)


@dataclass(frozen=True)
class PyramidKVFedLast(PyramidKV):
    """PyramidKV, except that the last layer keeps SnapKV's uniform ``K`` per head."""

    def allocate(self, scores, candidates, layer_idx, num_layers):
        if layer_idx == num_layers - 1:
            return SnapKV.allocate(self, scores, candidates, layer_idx, num_layers)
        return super().allocate(scores, candidates, layer_idx, num_layers)


POLICIES = {
    "snapkv": SnapKV(),
    "snapkv, last layer at pyramid's cap": SnapKVStarvedLast(),
    "pyramidkv": PyramidKV(),
    "pyramidkv, last layer at snapkv's budget": PyramidKVFedLast(),
}


def main(n: int) -> None:
    samples = vqa.dataset("test", n, task="doc")
    rows = paper_table.offline_rows(
        vqa.shipped_model("doc"), samples, list(POLICIES), BUDGETS, policies=POLICIES
    )
    for name in POLICIES:
        for budget in BUDGETS:
            answers = rows[(name, budget)]["answers"]
            r = sum(vqa.exact_match(a, s) for a, s in zip(answers, samples, strict=True))
            print(f"{name:45s} budget {budget}: {r}/{n} = {r / n:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
