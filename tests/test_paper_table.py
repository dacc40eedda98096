"""The paper-table benchmark: its statistics and an offline smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # paper_table.py imports its siblings
_SPEC = importlib.util.spec_from_file_location("paper_table", BENCHMARKS / "paper_table.py")
paper_table = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(paper_table)


def test_wilson_interval():
    assert paper_table.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert paper_table.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert paper_table.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert paper_table.wilson(191, 200) == pytest.approx((0.9167, 0.9762), abs=1e-4)


def test_exact_mcnemar():
    base = [True] * 10 + [False] * 5
    other = [True] * 10 + [True] * 5  # 5 questions right only with the other method
    assert paper_table.mcnemar(base, other) == {"base_only": 0, "other_only": 5, "p": 0.0625}
    swapped = paper_table.mcnemar(other, base)
    assert (swapped["base_only"], swapped["other_only"], swapped["p"]) == (5, 0, 0.0625)
    same = paper_table.mcnemar(base, base)
    assert same == {"base_only": 0, "other_only": 0, "p": 1.0}
    # 2 vs 8 discordant: p = 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56 / 1024
    mixed = [True, True] + [False] * 8, [False, False] + [True] * 8
    assert paper_table.mcnemar(*mixed)["p"] == pytest.approx(112 / 1024)


def test_errors_by_question():
    record = {
        "answers": {"full@None": ["12", "34 ", "56", "7"]},
        "expected": ["12", "34", "65", "8"],
        "asked": ["in red?", "in blue?", "in blue?", "in red?"],
    }
    assert paper_table.errors_by_question(record) == "in blue? 1/2; in red? 1/2"
    assert "wrong answers by question: in blue? 1/2" in paper_table.markdown(
        {"rows": [], "mcnemar": [], **record}, [64], 4, "doc"
    )


def test_paper_table_smoke_offline(tmp_path):
    """Every method at budgets 64 and 48 on 4 questions, all offline: uniform methods hold
    their budget, PyramidKV/SparseMM/AdaKV at least theirs; the files are written."""
    args = paper_table.parse_args(["--smoke", "--offline-only", "--out", str(tmp_path)])
    record = paper_table.run(args)
    rows = {(r["method"], r["budget"]): r for r in record["rows"]}
    assert set(rows) == {("full", None), (paper_table.NO_IMAGE, None)} | {
        (m, b) for m in paper_table.method_names() for b in (64, 48)
    }
    for b in (64, 48):
        assert rows[("snapkv", b)]["slots"] == rows[("bacon-snapkv", b)]["slots"] == b
        for m in ("pyramidkv", "adakv", "sparsemm"):
            assert rows[(m, b)]["slots"] >= b
            assert rows[(m, b)]["slots"] == rows[(f"bacon-{m}", b)]["slots"]  # same allocation
        assert rows[("pyramidkv", b)]["slots"] > b  # the first layer keeps about 2K
    for r in record["rows"]:
        low, high = r["ci95"]
        assert low <= r["exact_match"] <= high
    assert len(record["mcnemar"]) == 4 * 2
    assert rows[("full", None)]["exact_match"] >= 0.75
    # no image KV: every text token of the prompt kept, none of its 256 image tokens
    from bacon_sglang.models import vqa

    lengths = [paper_table._prompt_len(args.model_path, s) - 256 for s in vqa.dataset("test", 4)]
    assert rows[(paper_table.NO_IMAGE, None)]["slots"] == sum(lengths) / 4
    saved = json.loads((tmp_path / "paper_table_shapes_smoke.json").read_text())
    assert saved["rows"] == record["rows"]
    table = (tmp_path / "paper_table_shapes_smoke.md").read_text()
    assert "McNemar" in table and "no image KV" in table
    assert paper_table.render(saved) + "\n" == table  # report.py renders the same table


def test_merge_of_shards_recomputes_the_table(tmp_path):
    from bacon_sglang.models import vqa

    samples = vqa.dataset("test", 6)
    machine = {"cpu": "x", "cores": 2, "gpu": None, "python": "3"}

    def shard(start, n, right_base, right_bacon, slots):
        exp = [s.answer for s in samples[start : start + n]]
        answers = {
            "full@None": exp,
            "adakv@64": [a if i < right_base else "?" for i, a in enumerate(exp)],
            "bacon-adakv@64": [a if i < right_bacon else "?" for i, a in enumerate(exp)],
        }
        rows = [
            {"method": m, "budget": b, "slots": None if m == "full" else slots}
            for m, b in (("full", None), ("adakv", 64), ("bacon-adakv", 64))
        ]
        record = {
            "model": "m", "task": "shapes", "split": "test", "start": start, "questions": n,
            "budgets": [64], "window": 32, "machine": machine, "seconds": {"total": 1},
            "rows": rows, "answers": answers,
        }  # fmt: skip
        path = tmp_path / f"shard{start}.json"
        path.write_text(json.dumps(record))
        return path

    merged = paper_table.merge([shard(3, 3, 1, 3, 70.0), shard(0, 3, 3, 3, 76.0)], tmp_path)
    rows = {(r["method"], r["budget"]): r for r in merged["rows"]}
    assert merged["questions"] == 6 and merged["expected"] == [s.answer for s in samples]
    assert rows[("full", None)]["exact_match"] == 1.0
    assert rows[("adakv", 64)]["exact_match"] == 4 / 6
    assert rows[("bacon-adakv", 64)]["exact_match"] == 1.0
    assert rows[("adakv", 64)]["slots"] == 73.0
    (test,) = merged["mcnemar"]
    assert (test["base_only"], test["other_only"]) == (0, 2)
    with pytest.raises(SystemExit):
        paper_table.merge([shard(0, 3, 3, 3, 1.0), shard(4, 2, 2, 2, 1.0)], tmp_path)


def test_full_cache_row_decodes_as_evaluate_does():
    """Two greedy decoders judge the document model: transformers' ``generate``
    (``batches.greedy_answers``: training's val numbers and ``training/evaluate.py``, by which a
    stage is shipped) and :func:`paper_table.full_cache_answers` (the table's full-cache row,
    the keep-set decoder with no keep-set). They must give the same answers, or the two
    numbers are not comparable."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from bacon_sglang.models import batches, vqa

    samples = vqa.dataset("val", 6, start=40, task="doc")
    table = paper_table.full_cache_answers(vqa.DOC_MODEL_DIR, samples)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        vqa.DOC_MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(vqa.DOC_MODEL_DIR)
    with torch.no_grad():
        generated = batches.greedy_answers(model, tokenizer, samples, max_new=paper_table.MAX_NEW)
    assert table == generated
    assert sum(vqa.exact_match(a, s) for a, s in zip(table, samples, strict=True)) >= 3
