"""Full-cache exact match of a trained checkpoint on a split, with the wrong answers per question.

    python -m bacon_sglang.models.evaluate bacon_sglang/models/tiny_doc --task doc --split val

Greedy decoding by transformers (fp32 compute on the checkpoint's weights, full KV cache), one
question at a time: the number a training stage is judged by before it is shipped (the test
split's numbers come from ``benchmarks/paper_table.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bacon_sglang.models import train, vqa


def evaluate(model_dir: Path, task: str, split: str, n: int, start: int = 0) -> dict:
    """Exact match of ``model_dir`` on samples ``start .. start + n - 1`` of ``split``, and per
    distinct question ``[wrong, asked]``."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = vqa.dataset(split, n, start=start, task=task)
    with torch.no_grad():
        answers = train.greedy_answers(model, tokenizer, samples)
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
