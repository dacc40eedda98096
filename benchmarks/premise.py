"""BACON's premise on a real (tiny) model: which score finds the answer's evidence tokens?

    python benchmarks/premise.py --task shapes --n 300   # the shipped model, old task
    python benchmarks/premise.py --task doc --n 300      # the document model
    python benchmarks/premise.py --smoke                 # 4 questions (the test runs it)

For each test question the model (transformers, eager attention, fp32, full cache) reads the
prompt *and its reference answer* (teacher forcing) in one pass. From that pass, per layer and
KV head, over the prompt's candidate tokens (all but the last 32):

- ``B``: SnapKV's window score (mean of the last 32 prompt queries, pooled; BACON step 1);
- ``Q``: the last prompt query's score (step 2);
- ``S@K``: BACON's calibrated score for ``K`` kept candidates per head (steps 3-9, with the
  earlier layers' boundary evidence, as the server computes it);
- ``D``: the attention of the answer tokens that *predict an evidence token* (the query
  positions whose next token is read from the image; the last prompt position excluded, it is
  ``Q``'s), averaged over those queries and gqa-averaged and pooled like ``B`` and ``Q``.

Each score's top-``K`` (K = 16, 32, 64; a budget of ``K + 32`` tokens) is compared with the
evidence tokens (the image token(s) of the cell(s) that hold the answer): recall = share of
them in the top-``K``, averaged over KV heads and questions. This is the paper's motivation
figure (top-64 recall: window mean ~29%, last query ~61%, answer tokens ~98% on Qwen2-VL-7B).
Outputs ``premise_<task>.{md,json,png}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import (
    add_task_arguments,
    machine,
    markdown_table,
    results_dir,
    task_model_path,
    task_record,
)

from bacon_sglang import scoring
from bacon_sglang.models import batches, vqa
from bacon_sglang.models.visual_heads import (
    evidence_positions,
    evidence_token_ids,
    predicting_positions,
)

logger = logging.getLogger(__name__)

WINDOW = 32
KS = (16, 32, 64)
SCORES = ("B", "Q", "S", "D")
LABELS = {
    "B": "window mean B",
    "Q": "last query Q",
    "S": "BACON S",
    "D": "answer tokens D",
}


def recall(scores: torch.Tensor, evidence: list[int], k: int) -> torch.Tensor:
    """``[Hkv]`` share of ``evidence`` positions among each row's top-``k`` of ``scores``
    (``[Hkv, T]``)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices  # [Hkv, k]
    hits = torch.isin(top, torch.tensor(evidence)).sum(-1)
    return hits.float() / len(evidence)


@torch.no_grad()
def question_recalls(model, tokenizer, s: vqa.VQASample, image_token: int) -> torch.Tensor:
    """``[layers, len(SCORES), len(KS)]`` evidence recall of one question (mean over heads)."""
    batch = batches.make_batch(tokenizer, [s], with_answers=True)
    prompt_len = batches.make_batch(tokenizer, [s], with_answers=False).input_ids.shape[1]
    ids = batch.input_ids[0]
    evidence = evidence_positions(ids[:prompt_len], s, image_token)
    queries = predicting_positions(ids, evidence_token_ids(tokenizer, s), prompt_len)
    if not queries:
        raise RuntimeError(f"no evidence-predicting answer token in {s.answer!r}")
    model.model.rope_deltas = None
    attentions = model(**batch.inputs(), output_attentions=True).attentions
    kv_heads = model.config.get_text_config().num_key_value_heads
    t = prompt_len - WINDOW
    out = torch.zeros(len(attentions), len(SCORES), len(KS))
    prev: list[torch.Tensor] = []
    for layer, a in enumerate(attentions):
        a = a[0].float()  # [Hq, L, L]
        window = a[:, prompt_len - WINDOW : prompt_len, :prompt_len]  # [Hq, w, prompt]
        base = scoring.snapkv_scores(window, kv_heads)
        last = scoring.last_query_scores(window, kv_heads)
        answer = scoring.avg_pool(
            scoring.gqa_mean(a[:, queries, :t].mean(dim=1), kv_heads), scoring.POOL_KERNEL
        )
        for j, k in enumerate(KS):
            calibrated, evidence_e = scoring.calibrate(base, last, k, prev)
            for i, score in enumerate((base, last, calibrated, answer)):
                out[layer, i, j] = recall(score, evidence, k).mean()
        prev = [*prev, evidence_e][-scoring.HISTORY :]
    return out


def markdown(mean: torch.Tensor, n: int, task: str) -> str:
    """Per-layer table: one row per layer (+ the mean), one column per score and K."""
    head = [f"{s}@{k}" for k in KS for s in SCORES]
    rows = [(str(i), mean[i]) for i in range(mean.shape[0])] + [("mean", mean.mean(0))]
    table = [
        [name, *(f"{float(row[i, j]):.2f}" for j in range(len(KS)) for i in range(len(SCORES)))]
        for name, row in rows
    ]
    return "\n".join(
        [
            f"evidence recall, task {task}, n={n} (top-K of candidates per KV head; mean over "
            "heads)",
            "",
            markdown_table(["layer", *head], table),
        ]
    )


def mean_from_record(record: dict) -> torch.Tensor:
    """``[layers, scores, Ks]`` mean recalls of a run's JSON record."""
    return torch.tensor(
        [[record["recall"][s][str(k)] for k in record["ks"]] for s in record["scores"]]
    ).permute(2, 0, 1)


def render(record: dict) -> str:
    """The markdown table of a run's JSON record (what the run printed and wrote)."""
    return markdown(mean_from_record(record), record["questions"], record["task"])


def plot(mean: torch.Tensor, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KS), figsize=(4 * len(KS), 3.4), sharey=True)
    layers = list(range(mean.shape[0]))
    for j, (ax, k) in enumerate(zip(axes, KS, strict=True)):
        for i, s in enumerate(SCORES):
            ax.plot(layers, mean[:, i, j].tolist(), marker="o", label=LABELS[s])
        ax.set_title(f"top-{k} (budget {k + WINDOW})")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("evidence recall")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"evidence recall per score, {task} task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Measure, write ``premise_<task>.{md,json,png}``; returns the JSON record."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    samples = vqa.dataset("test", args.n, start=args.start, task=args.task)
    start = time.perf_counter()
    per_question = torch.stack(
        [question_recalls(model, tokenizer, s, image_token) for s in samples]
    )
    mean = per_question.mean(0)  # [layers, scores, Ks]
    table = markdown(mean, len(samples), args.task)
    record = {
        **task_record(args, len(samples)),
        "window": WINDOW,
        "ks": list(KS),
        "scores": list(SCORES),
        "seconds": round(time.perf_counter() - start),
        "machine": machine(),
        "recall": {
            s: {str(k): [round(float(v), 4) for v in mean[:, i, j]] for j, k in enumerate(KS)}
            for i, s in enumerate(SCORES)
        },
        "recall_mean_over_layers": {
            s: {str(k): round(float(mean[:, i, j].mean()), 4) for j, k in enumerate(KS)}
            for i, s in enumerate(SCORES)
        },
    }
    out = Path(args.out) if args.out else results_dir(record["machine"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"premise_{args.task}" + ("_smoke" if args.smoke else "")
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(mean, args.task, out / f"{stem}.png")
    print(table)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_arguments(parser)
    parser.add_argument("--n", type=int, default=300, help="test questions")
    parser.add_argument("--start", type=int, default=0, help="first test-split index")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="results folder (default: dated, per device)")
    parser.add_argument("--smoke", action="store_true", help="4 questions")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n = 4
    args.model_path = task_model_path(args)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
