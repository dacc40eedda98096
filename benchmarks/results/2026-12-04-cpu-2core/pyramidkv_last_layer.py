"""Ad-hoc ablation (issue 13): is PyramidKV's collapse on tiny_doc its starved last layer?

SnapKV with only the last layer's per-head budget set to PyramidKV's last-layer cap, and
PyramidKV with only its last layer given SnapKV's uniform budget, at budgets 128 and 64; offline
as ``paper_table.py``'s variable-budget rows (the shipped document model, test questions
0..n-1, the same window and decoding). From the repository root:

    python benchmarks/results/2026-12-04-cpu-2core/pyramidkv_last_layer.py 500

(printed: ``pyramidkv_last_layer.txt`` next to this file; 41 min at nice 10 beside a CI run on 2
cores).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from bacon_sglang.budgets import pyramid_budgets
from bacon_sglang.models import train, vqa
from bacon_sglang.policies import PyramidKV, SnapKV
from bacon_sglang.reference import (
    decode_with_keep_sets,
    keep_sets_from_windows,
    prefill,
    window_attentions,
)

WINDOW, MAX_NEW, BUDGETS = 32, 16, (128, 64)  # paper_table.py's window and answer length


@dataclass(frozen=True)
class SnapKVStarvedLast(SnapKV):
    """SnapKV, except that the last layer keeps PyramidKV's last-layer cap per head."""

    def allocate(self, scores, budget, layer_idx, num_layers):
        if layer_idx == num_layers - 1:
            heads, candidates = scores.shape
            return pyramid_budgets(budget, layer_idx, num_layers, heads, candidates)
        return super().allocate(scores, budget, layer_idx, num_layers)


@dataclass(frozen=True)
class PyramidKVFedLast(PyramidKV):
    """PyramidKV, except that the last layer keeps SnapKV's uniform budget per head."""

    def allocate(self, scores, budget, layer_idx, num_layers):
        if layer_idx == num_layers - 1:
            return SnapKV.allocate(self, scores, budget, layer_idx, num_layers)
        return super().allocate(scores, budget, layer_idx, num_layers)


def main(n: int) -> None:
    path = vqa.shipped_model("doc")
    model, eager = (
        Qwen2VLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("sdpa", "eager")
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    kv_heads = model.config.get_text_config().num_key_value_heads
    policies = {
        "snapkv": SnapKV(),
        "snapkv, last layer at pyramid's cap": SnapKVStarvedLast(),
        "pyramidkv": PyramidKV(),
        "pyramidkv, last layer at snapkv's budget": PyramidKVFedLast(),
    }
    right = dict.fromkeys(((p, b) for p in policies for b in BUDGETS), 0)
    for s in vqa.dataset("test", n, task="doc"):
        inputs = train.make_batch(tokenizer, [s], with_answers=False).inputs()
        windows = window_attentions(eager, inputs, WINDOW)
        full = prefill(model, inputs)
        for (name, budget), count in right.items():
            keep = keep_sets_from_windows(windows, kv_heads, policies[name], budget, 0)
            tokens, _ = decode_with_keep_sets(
                model, inputs, keep, MAX_NEW, stop=eos, prefilled=full
            )
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            right[(name, budget)] = count + vqa.exact_match(answer, s)
    for (name, budget), r in right.items():
        print(f"{name:45s} budget {budget}: {r}/{n} = {r / n:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
