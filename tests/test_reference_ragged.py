"""Per-layer, per-head keep-sets in the transformers reference (PyramidKV, AdaKV, SparseMM)."""

from __future__ import annotations

import math

import pytest
import torch

from bacon_sglang import reference
from bacon_sglang.allocation import sparsemm_candidates
from bacon_sglang.models import batches, visual_heads, vqa
from bacon_sglang.policies import BACON, SparseMM
from bacon_sglang.selection import KEEP_PAD


@pytest.fixture(scope="module")
def models():
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    def load(impl):
        return Qwen2VLForConditionalGeneration.from_pretrained(
            vqa.MODEL_DIR, dtype=torch.float32, attn_implementation=impl
        ).eval()

    tokenizer = AutoTokenizer.from_pretrained(vqa.MODEL_DIR)
    inputs = batches.make_batch(tokenizer, [vqa.sample("test", 1)], with_answers=False).inputs()
    return load("sdpa"), load("eager"), inputs


def test_kept_attention_masks_each_heads_padding():
    torch.manual_seed(0)
    hq, hkv, n, d = 4, 2, 7, 8
    q, k, v = torch.randn(1, hq, 1, d), torch.randn(1, hkv, n + 1, d), torch.randn(1, hkv, n + 1, d)

    class Module:
        kept_bias = torch.zeros(hkv, n).masked_fill(
            torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0] * 7]).bool(), float("-inf")
        )

    out, _ = reference._kept_attention(Module(), q, k, v, None, scaling=d**-0.5)
    for h in range(hq):
        g = h // (hq // hkv)
        keys = [i for i in range(n + 1) if not (g == 0 and i in (5, 6))]  # n: decoded since
        w = torch.softmax(q[0, h, 0] @ k[0, g, keys].T * d**-0.5, -1)
        torch.testing.assert_close(out[0, 0, h], w @ v[0, g, keys])


def test_masked_decode_equals_plain_decode_for_uniform_and_padded_keep_sets(models):
    model, eager, inputs = models
    keep = reference.keep_sets_from_attention(eager, inputs, "snapkv", 64, 0)
    plain = reference.decode_with_keep_sets(model, inputs, keep, 6)
    masked = reference.decode_with_keep_sets(model, inputs, keep, 6, masked=True)
    assert masked[0] == plain[0]
    torch.testing.assert_close(masked[1], plain[1], atol=1e-4, rtol=0)
    # Padding columns (KEEP_PAD) change nothing: they are masked out, not attended.
    padded = [torch.cat([k, torch.full((k.shape[0], 5), KEEP_PAD)], -1) for k in keep]
    assert reference.is_ragged(padded) and not reference.is_ragged(keep)
    again = reference.decode_with_keep_sets(model, inputs, padded, 6)
    assert again[0] == plain[0]
    torch.testing.assert_close(again[1], plain[1], atol=1e-4, rtol=0)
    assert reference.slots_held(padded) == reference.slots_held(keep) == 64
    # One prefill serves several decodes (each reduces its own copy of the cache).
    full = reference.prefill(model, inputs)
    for k in (padded, keep, None):
        reused = reference.decode_with_keep_sets(model, inputs, k, 6, prefilled=full)
        want = plain if k is not None else reference.decode_with_keep_sets(model, inputs, None, 6)
        assert reused[0] == want[0]
        torch.testing.assert_close(reused[1], want[1], atol=1e-4, rtol=0)


def test_ragged_keep_sets_decode(models):
    model, eager, inputs = models
    pyramid = reference.keep_sets_per_layer(eager, inputs, "pyramidkv", 64, 0)
    lengths = [k.shape[-1] for k in pyramid]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    assert reference.slots_held(pyramid) == lengths[0]
    # Layers of different lengths need no mask: both paths agree.
    masked = reference.decode_with_keep_sets(model, inputs, pyramid, 6)
    plain = reference.decode_with_keep_sets(model, inputs, pyramid, 6, masked=False)
    assert masked[0] == plain[0]
    adakv = reference.keep_sets_per_layer(eager, inputs, "bacon-adakv", 64, 0)
    counts = torch.stack([(k != KEEP_PAD).sum(-1) for k in adakv])  # [layers, Hkv]
    assert (counts.sum(-1) == 2 * 64).all()  # the layer's Hkv * K, shared unevenly
    assert reference.slots_held(adakv) == int(counts.max())
    tokens, _ = reference.decode_with_keep_sets(model, inputs, adakv, 6)
    assert len(tokens) == 6


def test_sparsemm_candidates_follow_the_head_scores(models):
    scores = torch.tensor([0.5, 0.25])  # of a 2-layer, 2-head model (the rest elsewhere)
    caps = sparsemm_candidates(scores, 32, num_layers=2, available=1000)
    m = math.floor(0.1 * 32)
    assert caps.tolist() == [round(0.5 * 29 * 4 + m), round(0.25 * 29 * 4 + m)]
    assert sparsemm_candidates(torch.tensor([0.0, 1.0]), 32, 1, 40).tolist() == [3, 40]
    _, eager, inputs = models
    heads = visual_heads.load(vqa.MODEL_DIR)
    assert abs(sum(map(sum, heads)) - 1) < 1e-4
    policy = SparseMM(head_scores=heads)
    for p in (policy, BACON(base=policy)):
        keep = reference.keep_sets_per_layer(eager, inputs, p, 64, 0)
        counts = torch.stack([(k != KEEP_PAD).sum(-1) for k in keep]) - 32
        want = torch.stack(
            [sparsemm_candidates(torch.tensor(r), 32, len(heads), 10**6) for r in heads]
        )
        assert torch.equal(counts, want.clamp(max=inputs["input_ids"].shape[1] - 32))
    with pytest.raises(ValueError, match="layers of head scores"):
        reference.keep_sets_per_layer(eager, inputs, SparseMM(head_scores=heads[:2]), 64, 0)
