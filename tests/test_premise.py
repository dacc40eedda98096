"""The premise benchmark (evidence recall of B, Q, S and the answer tokens' attention)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from bacon_sglang.models import visual_heads, vqa

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # premise.py imports its sibling serving.py
_SPEC = importlib.util.spec_from_file_location("premise", BENCHMARKS / "premise.py")
premise = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(premise)


def test_recall_counts_evidence_in_each_heads_top_k():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.0, 0.1, 0.2, 0.3]])
    assert premise.recall(scores, [0, 2], 1).tolist() == [0.5, 0.0]
    assert premise.recall(scores, [0, 2], 2).tolist() == [1.0, 0.5]
    assert premise.recall(scores, [1], 10).tolist() == [1.0, 1.0]  # k capped at T


def test_evidence_positions_and_predicting_queries():
    from transformers import AutoTokenizer

    from bacon_sglang.models import batches

    tokenizer = AutoTokenizer.from_pretrained(vqa.MODEL_DIR)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    s = vqa.sample("test", 0, task="doc")
    batch = batches.make_batch(tokenizer, [s])
    ids = batch.input_ids[0]
    prompt_len = batches.make_batch(tokenizer, [s], with_answers=False).input_ids.shape[1]
    positions = visual_heads.evidence_positions(ids[:prompt_len], s, pad)
    assert all(int(ids[p]) == pad for p in positions) and len(positions) == len(s.answer)
    queries = visual_heads.predicting_positions(
        ids, visual_heads.evidence_token_ids(tokenizer, s), prompt_len
    )
    # the answer's digits 2.. are predicted by the answer's digits 1..n-1
    assert [tokenizer.decode([int(ids[q + 1])]) for q in queries] == list(s.answer[1:])
    shapes = vqa.sample("test", 0)
    ids = batches.make_batch(tokenizer, [shapes]).input_ids[0]
    n = batches.make_batch(tokenizer, [shapes], with_answers=False).input_ids.shape[1]
    (q,) = visual_heads.predicting_positions(
        ids, visual_heads.evidence_token_ids(tokenizer, shapes), n
    )
    assert tokenizer.decode(ids[q + 1 :]).startswith(" " + shapes.answer.rstrip(".").split()[-1])


def test_premise_smoke(tmp_path):
    record = premise.run(premise.parse_args(["--smoke", "--out", str(tmp_path)]))
    assert record["questions"] == 4
    for score in premise.SCORES:
        for k in premise.KS:
            values = record["recall"][score][str(k)]
            assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    # recall cannot fall as K grows (top-K sets of a fixed score are nested; S depends on K)
    for score in ("B", "Q", "D"):
        means = [record["recall_mean_over_layers"][score][str(k)] for k in premise.KS]
        assert means == sorted(means), (score, means)
    saved = json.loads((tmp_path / "premise_shapes_smoke.json").read_text())
    assert saved["recall"] == record["recall"]
    assert (tmp_path / "premise_shapes_smoke.png").stat().st_size > 0
    # report.py renders the same table from the JSON
    assert premise.render(saved) + "\n" == (tmp_path / "premise_shapes_smoke.md").read_text()
