"""SparseMM's "visual head" scores of a trained tiny model (from the repository root).

    python -m training.visual_heads MODEL_DIR --task shapes --n 200

SparseMM's recipe (arXiv 2506.05344, its release's ``visual_head/qwen_visual_head.py``): at
every answer token that is read from one box of the image, each (layer, query head) whose top-1
attention lands in that box's image tokens gets ``+1 / |box tokens|``; the per-head mean over
those tokens is normalised over all heads and summed over each KV head's query group. Here the
answers are teacher-forced on the **train** split, the box of an evidence token is its grid
cell (one image token), and the query is the position that predicts it (the last prompt
position for the first token of a document-task answer). Writes ``visual_heads.json``
(``[layers][Hkv]``, summing to 1) into ``MODEL_DIR``,
which :class:`bacon_sglang.policies.SparseMM` reads (through
:func:`bacon_sglang.models.visual_heads.load`). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from bacon_sglang.models import vqa
from bacon_sglang.models.batches import make_batch
from bacon_sglang.models.visual_heads import (
    FILENAME,
    evidence_positions,
    evidence_token_ids,
    predicting_positions,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def head_hits(model, tokenizer, s: vqa.VQASample) -> tuple[torch.Tensor, int]:
    """``([layers, Hq] hits, answer tokens counted)`` of one teacher-forced sample: how often
    each query head's top-1 attention lands on the evidence cell of the token it predicts."""
    batch = make_batch(tokenizer, [s], with_answers=True)
    prompt_len = make_batch(tokenizer, [s], with_answers=False).input_ids.shape[1]
    ids = batch.input_ids[0]
    cells = evidence_positions(
        ids[:prompt_len], s, tokenizer.convert_tokens_to_ids("<|image_pad|>")
    )
    queries = predicting_positions(ids, evidence_token_ids(tokenizer, s), prompt_len - 1)
    if s.kind == "doc":
        boxes = cells[: len(queries)]  # digit j of the answer is read from cell j
    else:
        boxes = cells * len(queries)
    model.model.rope_deltas = None
    attentions = model(**batch.inputs(), output_attentions=True).attentions
    hits = torch.zeros(len(attentions), attentions[0].shape[1])
    for layer, a in enumerate(attentions):
        top = a[0, :, queries].argmax(-1)  # [Hq, queries]
        hits[layer] = (top == torch.tensor(boxes)).float().sum(-1)
    return hits, len(queries)


def visual_head_scores(model, tokenizer, samples: list[vqa.VQASample]) -> torch.Tensor:
    """``[layers, Hkv]`` SparseMM scores (sum 1) of ``model`` on ``samples``."""
    total, counted = None, 0
    for s in samples:
        hits, n = head_hits(model, tokenizer, s)
        total = hits if total is None else total + hits
        counted += n
    mean = total / max(counted, 1)
    mean = mean / mean.sum().clamp(min=1e-12)
    kv_heads = model.config.get_text_config().num_key_value_heads
    return mean.reshape(mean.shape[0], kv_heads, -1).sum(-1)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--task", choices=("shapes", "doc"), default="shapes")
    parser.add_argument("--n", type=int, default=200, help="train-split samples")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    samples = vqa.dataset("train", args.n, task=args.task)
    scores = visual_head_scores(model, tokenizer, samples)
    record = {
        "recipe": "SparseMM visual heads: top-1 attention of evidence-predicting answer "
        "tokens on their evidence cell, per-head mean, normalised, summed per KV head",
        "command": "python -m training.visual_heads "
        f"{args.model_dir.name} --task {args.task} --n {args.n}",
        "split": "train",
        "task": args.task,
        "samples": args.n,
        "scores": [[round(float(v), 6) for v in row] for row in scores],
    }
    (args.model_dir / FILENAME).write_text(json.dumps(record, indent=1) + "\n")
    logger.info("%s", json.dumps(record["scores"]))


if __name__ == "__main__":
    main()
