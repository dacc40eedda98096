"""One contract, every policy: a new method is one line in POLICY_MATRIX."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bacon_sglang.policies import (
    BACON,
    POLICIES,
    AdaKV,
    Policy,
    PyramidKV,
    RequestState,
    SnapKV,
    SparseMM,
    make_policy,
)
from bacon_sglang.scoring import bacon_scores, snapkv_scores, window_attention
from bacon_sglang.selection import KEEP_PAD, select_keep

pytestmark = pytest.mark.usefixtures("one_thread")


POLICY_MATRIX: dict[str, Policy] = {
    "snapkv": SnapKV(),
    "pyramidkv": PyramidKV(),
    "adakv": AdaKV(),
    "bacon": BACON(),
    "bacon-pyramidkv": BACON(base=PyramidKV()),
    "bacon-adakv": BACON(base=AdaKV()),
    "bacon-2d": BACON(coherence_2d=True),
}
UNIFORM = {"snapkv", "pyramidkv", "bacon", "bacon-pyramidkv", "bacon-2d"}

HQ, HKV, W, N, LAYERS = 6, 2, 4, 64, 6
T = N - W
# SparseMM's visual-head scores [LAYERS][HKV], summing to 1: one head gets most of a layer
HEAD_SCORES = tuple((0.02 * (i + 1), 0.003 * (LAYERS - i)) for i in range(LAYERS))
HEAD_SCORES = tuple(tuple(s / sum(map(sum, HEAD_SCORES)) for s in row) for row in HEAD_SCORES)


def layer_attention(layer: int, n: int = N) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + layer)
    q = 2.0 * torch.randn(HQ, W, 8, generator=gen)
    k = torch.randn(HKV, n, 8, generator=gen)
    return window_attention(q, k)


def run_layers(policy: Policy, k: int, first: int = 0, dtype=torch.float32, n: int = N):
    state = RequestState(image_grids=((3, 6, 8),))  # tokens 3..50 form a 6x8 image
    keeps = [
        policy.keep(layer_attention(i, n).to(dtype), HKV, k, i, LAYERS, state, first)
        for i in range(LAYERS)
    ]
    return keeps, state


@pytest.mark.parametrize("name", POLICY_MATRIX)
@pytest.mark.parametrize("k,first", [(8, 0), (8, 11), (1, 0), (0, 5)])
def test_keep_contract(name, k, first):
    policy = POLICY_MATRIX[name]
    keeps, _ = run_layers(policy, k, first)
    window = list(range(T, N))
    for layer, keep in enumerate(keeps):
        base = policy.score(layer_attention(layer), HKV)[:, first:]
        per_head = policy.allocate(base, k, layer, LAYERS).tolist()
        assert keep.dtype == torch.long and keep.shape[0] == HKV
        assert keep.shape[1] == max(per_head) + W
        for row, k_h in zip(keep.tolist(), per_head, strict=True):
            valid = [i for i in row if i != KEEP_PAD]
            assert row == valid + [KEEP_PAD] * (len(row) - len(valid))  # padding only at the end
            assert valid == sorted(set(valid))  # sorted, unique
            assert valid[-W:] == window  # the window is always kept
            assert len(valid) == k_h + W
            assert all(first <= i < T for i in valid[:-W])  # the shared prefix is never selected
        if name in UNIFORM:
            assert len(set(per_head)) == 1 and KEEP_PAD not in keep.tolist()


@pytest.mark.parametrize("name", POLICY_MATRIX)
def test_keep_all_when_asked_for_every_candidate(name):
    keeps, _ = run_layers(POLICY_MATRIX[name], k=T, first=9)
    for keep in keeps:
        assert keep.tolist() == [list(range(9, N))] * HKV


@pytest.mark.parametrize("name", POLICY_MATRIX)
def test_keep_is_deterministic_and_bf16_ready(name):
    policy = POLICY_MATRIX[name]
    first, _ = run_layers(policy, 8)
    again, _ = run_layers(policy, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    grids = ((3, 6, 8),)
    state = RequestState(image_grids=grids)
    for i in range(LAYERS):
        bf16 = layer_attention(i).bfloat16()
        twin = RequestState(list(state.evidence), grids)
        got = policy.keep(bf16, HKV, 8, i, LAYERS, state)
        assert torch.equal(got, policy.keep(bf16.float(), HKV, 8, i, LAYERS, twin))


@pytest.mark.parametrize("name", POLICY_MATRIX)
def test_layer_candidates_follow_the_base_allocation(name):
    policy = POLICY_MATRIX[name]
    widths = [k.shape[1] - W for k in run_layers(policy, 8)[0]]
    if isinstance(policy, BACON):
        policy = policy.base
    if type(policy) is SnapKV:
        assert widths == [8] * LAYERS
    if type(policy) is PyramidKV:
        assert widths == sorted(widths, reverse=True) and widths[0] > 8 > widths[-1]


def test_snapkv_keep_is_top_k_of_window_score():
    attn = layer_attention(0)
    got = SnapKV().keep(attn, HKV, 8, 0, LAYERS, RequestState())
    assert torch.equal(got, select_keep(snapkv_scores(attn, HKV), 8, W))


def test_bacon_keep_follows_bacon_scores_and_bounds_its_history():
    policy, state, prev = BACON(), RequestState(), []
    for i in range(LAYERS):
        attn = layer_attention(i)
        got = policy.keep(attn, HKV, 8, i, LAYERS, state, first_candidate=3)
        scores, evidence = bacon_scores(attn, HKV, 8, prev, first_candidate=3)
        assert torch.equal(got, select_keep(scores, 8, W, first_candidate=3))
        prev.append(evidence)
        assert len(state.evidence) == min(i + 1, 4)
        assert all(torch.equal(a, b) for a, b in zip(state.evidence, prev[-4:], strict=True))


@pytest.mark.parametrize("base", [SnapKV(), PyramidKV(), AdaKV()], ids=lambda p: type(p).__name__)
def test_bacon_without_evidence_is_its_base(base):
    state = RequestState()
    for i in range(LAYERS):
        attn = layer_attention(i)
        attn[:, -1] = 0.0
        attn[:, -1, -1] = 1.0  # the last query sees only itself: E = 0 everywhere
        got = BACON(base=base).keep(attn, HKV, 8, i, LAYERS, state)
        assert torch.equal(got, base.keep(attn, HKV, 8, i, LAYERS, RequestState()))


def test_bacon_2d_without_grids_is_1d():
    keeps_1d, _ = run_layers(BACON(), 8)
    state = RequestState()
    for i, want in enumerate(keeps_1d):
        got = BACON(coherence_2d=True).keep(layer_attention(i), HKV, 8, i, LAYERS, state)
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", [*POLICY_MATRIX, "sparsemm", "bacon-sparsemm"])
def test_layer_candidates_are_the_allocation_summed(name):
    """What the host plans per layer before any score (``layer_candidates``, the cells of
    ``cells.kept_cells``) is what ``allocate`` returns from the scores, summed over all the KV
    heads or a tensor-parallel rank's (AdaKV splits over the rank's heads, SparseMM normalises
    over the model's)."""
    policy = POLICY_MATRIX.get(name) or make_policy(name, head_scores=HEAD_SCORES)
    gen = torch.Generator().manual_seed(len(name))
    for k, available in [(8, T), (8, 11), (0, T), (T, T), (T + 5, 20), (3, 0)]:
        for layer in range(LAYERS):
            scores = torch.rand(HKV, available, generator=gen)
            full = policy.allocate(scores, k, layer, LAYERS)
            assert policy.layer_candidates(k, available, LAYERS, range(HKV))[layer] == full.sum()
            for heads in ([0], [1]):
                mine = (full[heads] if "sparsemm" in name else
                        policy.allocate(scores[heads], k, layer, LAYERS))  # fmt: skip
                assert policy.layer_candidates(k, available, LAYERS, heads)[layer] == mine.sum()


def test_make_policy_and_registry():
    assert {"snapkv", "pyramidkv", "adakv", "sparsemm", "bacon"} <= set(POLICIES)
    assert make_policy("bacon") == BACON(base=SnapKV())
    assert make_policy("snapkv", pool_kernel=7) == SnapKV(pool_kernel=7)
    assert make_policy("BACON-AdaKV", 3) == BACON(base=AdaKV(pool_kernel=3))
    assert make_policy("bacon-sparsemm", 3, HEAD_SCORES) == BACON(
        base=SparseMM(pool_kernel=3, head_scores=HEAD_SCORES)
    )
    for name, cls in POLICIES.items():
        assert isinstance(make_policy(name, head_scores=HEAD_SCORES), cls)
    with pytest.raises(ValueError, match="visual-head scores"):
        make_policy("sparsemm")
    with pytest.raises(ValueError):
        make_policy("h2o")
    with pytest.raises(TypeError):
        BACON(base=BACON())
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_policy("bacon").scale = 1.0  # type: ignore[misc]
