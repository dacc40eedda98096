"""Scores, selection and allocation against hand-computed cases and naive references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from bacon_sglang.allocation import (
    adakv_candidates,
    adakv_layers,
    mean_candidates,
    pyramid_cap,
    uniform_candidates,
)
from bacon_sglang.scoring import (
    avg_pool,
    bacon_scores,
    boundary_evidence,
    calibrate,
    coherence,
    last_query_scores,
    persistence,
    scale_match,
    snapkv_scores,
    window_attention,
)
from bacon_sglang.selection import (
    KEEP_PAD,
    pad_spans,
    select_keep,
    select_keep_heads,
    select_keep_packed,
    top_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Naive references: plain Python floats, loops, float64.


def naive_pool(x: list[float], kernel: int) -> list[float]:
    r = kernel // 2
    return [
        sum(x[j] for j in range(i - r, i + r + 1) if 0 <= j < len(x)) / kernel
        for i in range(len(x))
    ]


def naive_window_attention(q, k, scale):
    hq, w, d = q.shape
    hkv, n, _ = k.shape
    out = torch.zeros(hq, w, n, dtype=torch.float64)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(w):
            logits = [float(q[h, i].double() @ k[kv, j].double()) * scale for j in range(n)]
            visible = [j <= n - w + i for j in range(n)]
            top = max(v for v, ok in zip(logits, visible, strict=True) if ok)
            exps = [math.exp(v - top) if ok else 0.0 for v, ok in zip(logits, visible, strict=True)]
            for j in range(n):
                out[h, i, j] = exps[j] / sum(exps)
    return out


def naive_bacon(attn, hkv: int, candidates: int, prev: list[list[list[float]]]):
    """Returns (S, E) as nested lists [Hkv][T] following BACON.md literally."""
    hq, w, n = attn.shape
    t, g = n - w, hq // hkv
    a = attn.double().tolist()
    scores, evidences = [], []
    for h in range(hkv):
        heads = range(h * g, (h + 1) * g)
        b = naive_pool(
            [statistics.fmean(a[q][r][j] for q in heads for r in range(w)) for j in range(t)], 5
        )
        q_ = naive_pool([statistics.fmean(a[q][w - 1][j] for q in heads) for j in range(t)], 5)
        e = [max(qj - bj, 0.0) for qj, bj in zip(q_, b, strict=True)]
        lo = naive_pool(e, 5)
        back = [p[h] for p in prev[-4:]]
        tr = [statistics.fmean(p[j] for p in back) if back else 0.0 for j in range(t)]
        v = [e[j] + lo[j] + tr[j] for j in range(t)]
        k2 = min(2 * candidates, t)
        bt, vt = sorted(b, reverse=True)[:k2], sorted(v, reverse=True)[:k2]
        lam = 0.5 * statistics.pstdev(bt) / (statistics.pstdev(vt) + 1e-8)
        rho = min(max(statistics.fmean(vt) / (statistics.fmean(bt) + 1e-8), 0.0), 1.0)
        scores.append([b[j] + rho * lam * v[j] for j in range(t)])
        evidences.append(e)
    return scores, evidences


def random_attention(hq: int, hkv: int, w: int, n: int, seed: int, d: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = 2.0 * torch.randn(hq, w, d, generator=gen)
    k = torch.randn(hkv, n, d, generator=gen)
    return window_attention(q, k)


# ---------------------------------------------------------------------------------------------
# window_attention


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_matches_naive(hq, hkv, dtype):
    gen = torch.Generator().manual_seed(0)
    w, n, d = 4, 11, 8
    q = torch.randn(hq, w, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    got = window_attention(q, k)
    assert got.dtype == torch.float32 and got.shape == (hq, w, n)
    torch.testing.assert_close(
        got.double(), naive_window_attention(q, k, d**-0.5), atol=1e-6, rtol=1e-5
    )
    for i in range(w):  # causal inside the window: exact zeros after key n - w + i
        assert torch.all(got[:, i, n - w + i + 1 :] == 0)
        assert torch.all(got[:, i, : n - w + i + 1] > 0)
    torch.testing.assert_close(got.sum(-1), torch.ones(hq, w))


def test_window_attention_scale_and_shape_checks():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 4, generator=gen), torch.randn(1, 5, 4, generator=gen)
    torch.testing.assert_close(
        window_attention(q, k, scale=0.3).double(),
        naive_window_attention(q, k, 0.3),
        atol=1e-6,
        rtol=1e-5,
    )
    with pytest.raises(ValueError):
        window_attention(torch.randn(3, 2, 4), torch.randn(2, 5, 4))  # 3 query heads, 2 KV heads
    with pytest.raises(ValueError):
        window_attention(torch.randn(2, 6, 4), torch.randn(1, 5, 4))  # window longer than prompt


# ---------------------------------------------------------------------------------------------
# Steps 1-2: pooling, SnapKV and last-query scores


def test_avg_pool_hand_computed():
    x = torch.tensor([[1.0, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(avg_pool(x, 5), torch.tensor([[1.2, 2.0, 3.0, 4.0, 3.6, 3.0]]))
    torch.testing.assert_close(avg_pool(x, 3), torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 11 / 3]]))
    torch.testing.assert_close(avg_pool(x, 1), x)
    assert avg_pool(torch.zeros(2, 0), 5).shape == (2, 0)
    with pytest.raises(ValueError):
        avg_pool(x, 4)


def test_avg_pool_matches_naive_on_short_rows():
    gen = torch.Generator().manual_seed(2)
    for t in (1, 2, 3, 7):
        x = torch.rand(3, t, generator=gen)
        want = torch.tensor([naive_pool(row, 5) for row in x.tolist()], dtype=torch.float64)
        torch.testing.assert_close(avg_pool(x, 5).double(), want, atol=1e-7, rtol=0)
        torch_pool = F.avg_pool1d(x.unsqueeze(1), 5, stride=1, padding=2, count_include_pad=True)
        torch.testing.assert_close(avg_pool(x, 5), torch_pool.squeeze(1), atol=1e-7, rtol=0)


# Hq=2 query heads share Hkv=1; w=2 window rows over n=4 keys, so T=2 candidates.
HAND_ATTN = torch.tensor(
    [
        [[0.2, 0.4, 0.4, 0.0], [0.1, 0.3, 0.2, 0.4]],
        [[0.6, 0.2, 0.2, 0.0], [0.3, 0.1, 0.1, 0.5]],
    ]
)


def test_snapkv_and_last_query_hand_computed():
    # rows mean: head 0 [0.15, 0.35], head 1 [0.45, 0.15]; group mean [0.30, 0.25].
    torch.testing.assert_close(snapkv_scores(HAND_ATTN, 1, 1), torch.tensor([[0.30, 0.25]]))
    torch.testing.assert_close(snapkv_scores(HAND_ATTN, 1, 3), torch.tensor([[0.55 / 3, 0.55 / 3]]))
    # Two KV heads: no group mean.
    torch.testing.assert_close(
        snapkv_scores(HAND_ATTN, 2, 1), torch.tensor([[0.15, 0.35], [0.45, 0.15]])
    )
    # Last row: head 0 [0.1, 0.3], head 1 [0.3, 0.1]; group mean [0.2, 0.2].
    torch.testing.assert_close(last_query_scores(HAND_ATTN, 1, 1), torch.tensor([[0.2, 0.2]]))
    torch.testing.assert_close(last_query_scores(HAND_ATTN, 2, 5), torch.tensor([[0.08, 0.08]] * 2))


def test_window_columns_are_dropped_before_pooling():
    attn = random_attention(4, 2, 4, 20, seed=3)
    changed = attn.clone()
    changed[:, :, -4:] *= 7.0
    torch.testing.assert_close(snapkv_scores(attn, 2), snapkv_scores(changed, 2), rtol=0, atol=0)
    torch.testing.assert_close(
        last_query_scores(attn, 2), last_query_scores(changed, 2), rtol=0, atol=0
    )


# ---------------------------------------------------------------------------------------------
# Steps 3-9, each by hand


def test_boundary_evidence_hand_computed():
    b, q = torch.tensor([[0.2, 0.5, 0.1]]), torch.tensor([[0.4, 0.3, 0.1]])
    torch.testing.assert_close(boundary_evidence(b, q), torch.tensor([[0.2, 0.0, 0.0]]))


def test_coherence_1d_hand_computed():
    e = torch.tensor([[0.3, 0.0, 0.0, 0.6]])
    torch.testing.assert_close(coherence(e, 3), torch.tensor([[0.1, 0.1, 0.2, 0.2]]))


def test_coherence_2d_pools_over_the_patch_grid():
    # T=11: token 0 is text, tokens 1..9 a 3x3 image, token 10 text.
    e = torch.zeros(1, 11)
    e[0, 0], e[0, 5] = 0.3, 0.45  # text token, image centre
    got = coherence(e, 3, image_grids=[(1, 3, 3)])
    want = torch.full((1, 11), 0.45 / 9)  # every patch is a neighbour of the centre
    want[0, 0] = 0.3 / 3  # 1-D outside the grid (token 1 is 0)
    want[0, 10] = 0.0
    torch.testing.assert_close(got, want)
    # A grid running into the window: its window tokens count as E = 0 and are not returned.
    e = torch.zeros(2, 6)
    e[:, 5] = 0.9  # last candidate; grid (2, 3, 3) covers tokens 2..10 = candidates 2..5
    got = coherence(e, 3, image_grids=[(2, 3, 3)])
    assert got.shape == (2, 6)
    # Token 5 is patch (1, 0); of the candidate patches (0,0) (0,1) (0,2) (1,0) = tokens 2..5,
    # all but (0, 2) are within its 3x3 square. Tokens 0, 1 are text (1-D, all zero).
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.0, 0.1]] * 2))
    torch.testing.assert_close(coherence(e, 3, image_grids=[]), coherence(e, 3))


def test_persistence_uses_only_the_last_four_layers():
    e = torch.zeros(2, 3)
    layers = [torch.full((2, 3), float(v)) for v in range(1, 7)]
    torch.testing.assert_close(persistence(e, []), torch.zeros(2, 3))  # first layer: Tr = 0
    torch.testing.assert_close(persistence(e, layers[:2]), torch.full((2, 3), 1.5))
    torch.testing.assert_close(persistence(e, layers), torch.full((2, 3), 4.5))  # (3+4+5+6)/4
    odd = [torch.ones(2, 4), layers[1]]  # another shape is ignored
    torch.testing.assert_close(persistence(e, odd), torch.full((2, 3), 2.0))
    per_head = [torch.tensor([[1.0, 1, 1], [3.0, 3, 3]])]
    torch.testing.assert_close(persistence(e, per_head), per_head[0])


def test_scale_match_hand_computed():
    b = torch.tensor([[4.0, 3, 2, 1, 0]])
    v = torch.tensor([[0.0, 1, 0, 3, 0]])
    # K=1 -> K2=2: Bt=[4,3] (std 0.5, mean 3.5), Vt=[3,1] (std 1, mean 2).
    lam, rho = scale_match(b, v, 1)
    torch.testing.assert_close(rho, torch.tensor([2 / 3.5]))
    torch.testing.assert_close(lam, torch.tensor([2 / 3.5 * 0.5 * 0.5 / 1.0]))
    # rho is clamped to 1: Vt=[10, 0] (std 5, mean 5 > 3.5).
    lam, rho = scale_match(b, torch.tensor([[10.0, 0, 0, 0, 0]]), 1)
    torch.testing.assert_close((lam, rho), (torch.tensor([0.05]), torch.tensor([1.0])))
    # K2 = min(2K, T): K=10 takes all 5 tokens; Bt std sqrt(2), Vt=[3,1,0,0,0] std sqrt(1.36).
    lam, rho = scale_match(b, v, 10)
    torch.testing.assert_close(rho, torch.tensor([0.4]))
    torch.testing.assert_close(lam, torch.tensor([0.4 * 0.5 * math.sqrt(2) / math.sqrt(1.36)]))
    # No candidates asked for: no calibration.
    assert torch.equal(scale_match(b, v, 0).lam, torch.zeros(1))


def test_calibrate_hand_computed():
    b = torch.tensor([[4.0, 3, 2, 1, 0]])
    q = torch.tensor([[4.0, 4, 2, 4, 0]])
    # E=[0,1,0,3,0]; L=E (kernel 1); Tr=0 -> V=[0,2,0,6,0]; K=1: Bt=[4,3], Vt=[6,2]
    # lam = 0.5 * 0.5 / 2 = 0.125, rho = clamp(4 / 3.5) = 1 -> S = B + V / 8.
    s, e = calibrate(b, q, 1, coherence_kernel=1)
    torch.testing.assert_close(e, torch.tensor([[0.0, 1, 0, 3, 0]]))
    torch.testing.assert_close(s, torch.tensor([[4.0, 3.25, 2, 1.75, 0]]))
    # With one earlier layer: Tr = E_prev, V = 2E + E_prev.
    prev = [torch.tensor([[2.0, 0, 0, 0, 0]])]  # V=[2,2,0,6,0]: Vt=[6,2], same lam
    s, _ = calibrate(b, q, 1, prev, coherence_kernel=1)
    torch.testing.assert_close(s, torch.tensor([[4.25, 3.25, 2, 1.75, 0]]))
    # first_candidate: statistics over candidates [2, 5) only: Bt=[2,1], Vt=[6,0] (std 3, mean 3)
    # lam = 0.5 * 0.5 / 3 = 1/12, rho = clamp(3 / 1.5) = 1.
    s, _ = calibrate(b, q, 1, coherence_kernel=1, first_candidate=2)
    torch.testing.assert_close(s, b + torch.tensor([[0.0, 2, 0, 6, 0]]) / 12)


def test_no_evidence_means_base_score():
    attn = random_attention(4, 2, 4, 30, seed=4)
    attn[:, -1] = 0.0
    attn[:, -1, -1] = 1.0  # the last query looks only at itself: Q = 0 <= B, so E = 0
    scores, evidence = bacon_scores(attn, 2, 5, [])
    assert torch.equal(evidence, torch.zeros_like(evidence))
    assert torch.equal(scores, snapkv_scores(attn, 2))


def test_bacon_scores_match_naive_reference_over_layers():
    hq, hkv, w, n, candidates = 6, 2, 5, 40, 4
    prev_t: list[torch.Tensor] = []
    prev_n: list[list[list[float]]] = []
    for layer in range(7):  # layers 0-6: Tr from 0, 1, 2, 3, then the last 4 of 4-6 earlier
        attn = random_attention(hq, hkv, w, n, seed=10 + layer)
        scores, evidence = bacon_scores(attn, hkv, candidates, prev_t)
        want_s, want_e = naive_bacon(attn, hkv, candidates, prev_n)
        assert scores.shape == evidence.shape == (hkv, n - w)
        torch.testing.assert_close(
            evidence.double(), torch.tensor(want_e, dtype=torch.float64), atol=1e-7, rtol=1e-5
        )
        torch.testing.assert_close(
            scores.double(), torch.tensor(want_s, dtype=torch.float64), atol=1e-7, rtol=1e-5
        )
        prev_t.append(evidence)
        prev_n.append(want_e)


def test_bacon_first_layer_and_history_window():
    attn = random_attention(4, 2, 4, 30, seed=5)
    others = [random_attention(4, 2, 4, 30, seed=s) for s in range(20, 25)]
    evs = [bacon_scores(a, 2, 3, []).evidence for a in others]
    # First layer: nothing earlier, or nothing of the same shape, gives Tr = 0.
    first = bacon_scores(attn, 2, 3, [])
    assert torch.equal(first.scores, bacon_scores(attn, 2, 3, [torch.ones(2, 7)]).scores)
    # Only the last four layers count.
    assert torch.equal(
        bacon_scores(attn, 2, 3, evs).scores, bacon_scores(attn, 2, 3, evs[1:]).scores
    )
    assert not torch.equal(
        bacon_scores(attn, 2, 3, evs).scores, bacon_scores(attn, 2, 3, evs[:4]).scores
    )
    # History does not change E itself.
    assert torch.equal(first.evidence, bacon_scores(attn, 2, 3, evs).evidence)


def test_bacon_scores_bf16_input_is_scored_in_fp32():
    attn = random_attention(4, 2, 4, 30, seed=6).bfloat16()
    got = bacon_scores(attn, 2, 3, [])
    want = bacon_scores(attn.float(), 2, 3, [])
    assert got.scores.dtype == got.evidence.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Selection


def naive_keep(scores: list[float], candidates: int, window: int, first: int = 0) -> list[int]:
    t = len(scores)
    order = sorted(range(first, t), key=lambda j: (-scores[j], j))
    return sorted(order[:candidates]) + list(range(t, t + window))


def test_select_keep_hand_computed():
    got = select_keep(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2, 2)
    assert got.tolist() == [[1, 3, 4, 5]]
    # Ties go to the lower index: the 5s, then the first two 3s.
    got = select_keep(torch.tensor([[1.0, 5, 3, 5, 3, 3]]), 3, 1)
    assert got.tolist() == [[1, 2, 3, 6]]
    got = select_keep(torch.zeros(2, 10), 4, 3)
    assert got.tolist() == [[0, 1, 2, 3, 10, 11, 12]] * 2


@pytest.mark.parametrize("k,first", [(0, 0), (3, 0), (7, 5), (30, 0), (30, 20), (5, 25)])
def test_select_keep_matches_naive_with_ties(k, first):
    gen = torch.Generator().manual_seed(k + first)
    scores = torch.randint(0, 4, (3, 25), generator=gen).float()  # many ties
    got = select_keep(scores, k, 6, first)
    want = [naive_keep(row, k, 6, first) for row in scores.tolist()]
    assert got.tolist() == want
    assert got.shape == (3, min(k, 25 - first) + 6)  # keeps all when short of candidates


def test_select_keep_packed_equals_select_keep_per_request():
    """The batched selection of ``kernels.keep_sets`` over ragged requests with many ties,
    empty spans, zero candidates and windows, equals :func:`select_keep` request by request."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        lengths = torch.randint(0, 40, (batch,), generator=gen).tolist()
        firsts = [int(torch.randint(0, t + 1, (1,), generator=gen)) for t in lengths]
        ks = torch.randint(0, 30, (batch,), generator=gen).tolist()
        windows = torch.randint(0, 5, (batch,), generator=gen).tolist()
        scores = torch.randint(0, 4, (sum(lengths), 3), generator=gen).float()
        got = select_keep_packed(scores, lengths, ks, windows, firsts)
        for b, rows in enumerate(scores.split(lengths)):
            assert torch.equal(got[b], select_keep(rows.T, ks[b], windows[b], firsts[b]))
    with pytest.raises(ValueError):
        select_keep_packed(torch.zeros(4, 1), [4], [2], [1], [5])


def test_adakv_split_and_per_head_selection_of_all_layers_equal_the_per_request_ones():
    """The served pass's AdaKV allocation (``adakv_layers``) and selection with a count per
    (layer, request, head) (``select_keep_heads``), over ragged requests with many ties,
    empty spans, ``K`` of 0, below and above the span, equal :func:`adakv_candidates` and
    :func:`select_keep` layer by layer and request by request."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        layers, batch, heads = (int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(3))
        lengths = torch.randint(0, 40, (batch,), generator=gen).tolist()
        firsts = [int(torch.randint(0, t + 1, (1,), generator=gen)) for t in lengths]
        ks = torch.randint(0, 45, (batch,), generator=gen).tolist()
        windows = torch.randint(0, 5, (batch,), generator=gen).tolist()
        scores = torch.rand(layers, sum(lengths), heads, generator=gen)
        if trial % 2:
            scores = (scores * 4).floor()  # ties inside and across heads
        spans = [t - f for t, f in zip(lengths, firsts, strict=True)]
        counts = adakv_layers(pad_spans(scores, lengths, firsts), ks, spans)
        widths = [min(s, heads * k) if k < s else s for k, s in zip(ks, spans, strict=True)]
        keep = select_keep_heads(scores, counts, widths, lengths, windows, firsts)
        for layer in range(layers):
            for b, rows in enumerate(scores[layer].split(lengths)):
                per_head = adakv_candidates(rows.T[:, firsts[b] :], ks[b])
                assert torch.equal(counts[layer, b], per_head)
                want = select_keep(rows.T, per_head, windows[b], firsts[b])
                assert torch.equal(keep[layer, b, :, : want.shape[1]], want)
                assert bool((keep[layer, b, :, want.shape[1] :] == KEEP_PAD).all())


def test_top_mask_matches_naive_with_ties_and_row_counts():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 3, (4, 30), generator=gen).float()
    ks = [0, 3, 30, 7]
    got = top_mask(scores, torch.tensor(ks))
    for row, k, mask in zip(scores.tolist(), ks, got.tolist(), strict=True):
        chosen = sorted(range(30), key=lambda j: (-row[j], j))[:k]
        assert [j for j, m in enumerate(mask) if m] == sorted(chosen)


def test_select_keep_per_head_counts_pad_at_the_end():
    scores = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    got = select_keep(scores, torch.tensor([2, 0, 3]), 2)
    assert got.tolist() == [
        [6, 7, 8, 9, KEEP_PAD],
        [8, 9, KEEP_PAD, KEEP_PAD, KEEP_PAD],
        [5, 6, 7, 8, 9],
    ]
    with pytest.raises(ValueError):
        select_keep(scores, 2, 2, first_candidate=9)


# ---------------------------------------------------------------------------------------------
# Allocation


def test_pyramid_schedule_28_layers_budget_64():
    # "Budget 64" = 32 kept candidates + the 32-token window: K = 32.
    caps = [pyramid_cap(32, layer, 28, 10_000) for layer in range(28)]
    assert caps[0] == 63 and caps[27] == 9  # layer 0 keeps 63 + 32, layer 27 keeps 9 + 32
    lo, hi = 32 // 20, 2 * 32 - 32 // 20
    assert caps == [hi - layer * ((hi - lo) // 27) for layer in range(28)]


def test_pyramid_schedule_caps():
    # max = 63 >= T = 50: max = T, min = 2K - T = 14, steps (50 - 14) // 27 = 1.
    assert [pyramid_cap(32, layer, 28, 50) for layer in (0, 1, 27)] == [50, 49, 23]
    assert {pyramid_cap(32, layer, 28, 20) for layer in range(28)} == {20}  # K >= T: keep all
    assert pyramid_cap(32, 0, 1, 1000) == 32


def test_uniform_candidates():
    assert uniform_candidates(8, 3, 100).tolist() == [8, 8, 8]
    assert uniform_candidates(8, 2, 5).tolist() == [5, 5]


def test_adakv_candidates_hand_computed():
    # Head 0 wins the whole global top 20: c = [20, 0] -> [0.8*20 + 2, 0.2*10] = [18, 2].
    scores = torch.stack([torch.full((30,), 2.0), torch.ones(30)])
    assert adakv_candidates(scores, 10).tolist() == [18, 2]
    # c = [5, 4, 3], K=4: shares [4.8, 4.0, 3.2] -> floors [4, 4, 3], one left -> head 0.
    scores = torch.tensor([[10.0] * 5 + [0.0], [9.0] * 4 + [0.0] * 2, [8.0] * 3 + [0.0] * 3])
    assert adakv_candidates(scores, 4).tolist() == [5, 4, 3]
    # All tied: the global top goes to the lower head first: c = [5, 1] -> [4.6, 1.4] -> [5, 1].
    assert adakv_candidates(torch.zeros(2, 5), 3).tolist() == [5, 1]
    assert adakv_candidates(torch.zeros(2, 5), 9).tolist() == [5, 5]  # K >= T: keep all


@pytest.mark.parametrize("seed", range(5))
def test_adakv_candidates_sum_and_floor(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, t, k = 4, 50, 13
    scores = torch.rand(heads, t, generator=gen) ** (1 + 4 * torch.rand(heads, 1, generator=gen))
    caps = adakv_candidates(scores, k)
    assert int(caps.sum()) == heads * k
    assert int(caps.min()) >= int(0.2 * k) and int(caps.max()) <= t
    assert mean_candidates(caps) == k
