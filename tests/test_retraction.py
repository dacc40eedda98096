"""The prefill after a retraction (``bacon_sglang/retraction.py``): the rows of generated
tokens attend to what their decode saw, the kept KV of each layer and head."""

import pytest
import torch
import torch.nn.functional as F

from bacon_sglang.retraction import recomputed_rows
from bacon_sglang.selection import KEEP_PAD

LAYERS, HQ, HKV, D = 3, 4, 2, 8


def decode_reference(q_row, k_pool, v_pool, slots_per_head, scale):
    """One decode step as SGLang's torch_native backend computes it: SDPA of one query over a
    KV cache holding, per KV head, exactly ``slots_per_head[h]``."""
    outs = []
    for h in range(HQ):
        kv = HKV * h // HQ
        k = k_pool[slots_per_head[kv], kv]  # [n, d]
        v = v_pool[slots_per_head[kv], kv]
        outs.append(F.scaled_dot_product_attention(q_row[h][None, None], k[None], v[None],
                                                   scale=scale)[0, 0])  # fmt: skip
    return torch.stack(outs)


@pytest.mark.parametrize("ragged", [False, True])  # uniform; heads keeping 1 to 5 tokens
@pytest.mark.parametrize("start", [0, 20, 23])  # whole prefill; chunks starting inside
def test_generated_rows_attend_to_the_kept_kv_as_their_decode_did(start, ragged):
    """Every recomputed row equals one SDPA decode step over exactly the KV its layer and
    head kept; with ragged keep-sets the ``KEEP_PAD`` places are no keys."""
    gen = torch.Generator().manual_seed(3)
    prefix, prompt, end, kept = 4, 20, 26, 5
    row = torch.randperm(64, generator=gen)[:end]  # the request's req_to_token row
    keep = torch.stack([
        torch.stack([torch.randperm(prompt - prefix, generator=gen)[:kept].sort().values + prefix
                     for _ in range(HKV)])
        for _ in range(LAYERS)
    ])  # fmt: skip
    if ragged:  # layer l, head h keeps kept - (l + 2 * h) % kept tokens, then KEEP_PAD
        for layer in range(LAYERS):
            for h in range(HKV):
                keep[layer, h, kept - (layer + 2 * h) % kept :] = KEEP_PAD
        assert len((keep != KEEP_PAD).sum(-1).unique()) > 1
    k_pool = torch.randn(64, HKV, D, generator=gen)
    v_pool = torch.randn(64, HKV, D, generator=gen)
    q = torch.randn(7 + end - start, HQ, D, generator=gen)  # 7 rows of another request first
    rows = recomputed_rows(keep, prefix, prompt, row, start, end, q_start=7)
    assert rows.rows.tolist() == list(range(7 + max(start, prompt) - start, 7 + end - start))
    for layer in range(LAYERS):
        got = rows.attend(layer, q, k_pool, v_pool, scale=0.3)
        for g, t in enumerate(range(max(start, prompt), end)):
            kept_h = [keep[layer, h][keep[layer, h] != KEEP_PAD] for h in range(HKV)]
            slots = [
                row[torch.cat([torch.arange(prefix), kept_h[h], torch.arange(prompt, t + 1)])]
                for h in range(HKV)
            ]
            want = decode_reference(q[7 + t - start], k_pool, v_pool, slots, 0.3)
            torch.testing.assert_close(got[g], want, rtol=1e-5, atol=1e-6)


def test_a_forward_of_prompt_tokens_only_recomputes_nothing():
    keep = torch.zeros(LAYERS, HKV, 2, dtype=torch.long)
    assert recomputed_rows(keep, 0, 20, torch.arange(20), 0, 20, 0) is None
    assert recomputed_rows(keep, 0, 20, torch.arange(21), 0, 21, 0).rows.tolist() == [20]
