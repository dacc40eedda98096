"""Full-cache exact match of a checkpoint on a split, wrong answers per question, mix-ups.

    python -m training.evaluate bacon_sglang/models/tiny_doc --task doc --split val   # repo root

Greedy decoding by transformers (fp32 compute on the checkpoint's weights, full KV cache), one
question at a time: the number a training stage is judged by before it is shipped (the test
split's numbers come from ``benchmarks/paper_table.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bacon_sglang.models import vqa
from bacon_sglang.models.batches import greedy_answers

NOT_ON_THE_PAGE = "none of the page's coloured words"


def mix_ups(answers: list[str], samples: list[vqa.VQASample]) -> dict[str, dict[str, int]]:
    """``{asked question: {question whose word was answered instead: count}}`` over the wrong
    answers (``NOT_ON_THE_PAGE`` when the answer is no other coloured word of the page)."""
    out: dict[str, dict[str, int]] = {}
    for answer, s in zip(answers, samples, strict=True):
        if not vqa.exact_match(answer, s):
            instead = vqa.question_answered(answer, s) or NOT_ON_THE_PAGE
            tally = out.setdefault(s.question, {})
            tally[instead] = tally.get(instead, 0) + 1
    return {q: dict(sorted(t.items())) for q, t in sorted(out.items())}


def evaluate(model_dir: Path, task: str, split: str, n: int, start: int = 0) -> dict:
    """Exact match of ``model_dir`` on samples ``start .. start + n - 1`` of ``split``, per
    distinct question ``[wrong, asked]``, and (document task) whose word each wrong answer
    is (:func:`mix_ups`)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = vqa.dataset(split, n, start=start, task=task)
    with torch.no_grad():
        answers = greedy_answers(model, tokenizer, samples)
    right = [vqa.exact_match(a, s) for a, s in zip(answers, samples, strict=True)]
    return {
        "model": str(model_dir),
        "task": task,
        "split": split,
        "start": start,
        "questions": n,
        "right": sum(right),
        "exact_match": sum(right) / n,
        "wrong_by_question": vqa.wrong_by_question([s.question for s in samples], right),
        "answered_instead": mix_ups(answers, samples) if task == "doc" else {},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--task", choices=("shapes", "doc"), default="doc")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.model_dir, args.task, args.split, args.n, args.start)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
