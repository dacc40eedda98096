"""The batched keep-sets the server computes (``kernels.keep_sets``: window scores from K in
the pool, calibration, selection, over all finishing requests of a forward at once) equal
those of the per-request policy objects (``RequestCompression.score_layer``), layer after
layer, with BACON's persistence carried across layers."""

import collections
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bacon_sglang import cells, kernels
from bacon_sglang.compression import plan_request
from bacon_sglang.config import CompressionConfig
from bacon_sglang.kernels import served
from bacon_sglang.policies import RequestState, make_policy
from bacon_sglang.scoring import HISTORY, window_attention
from bacon_sglang.selection import KEEP_PAD

HQ, HKV, D, LAYERS = 4, 2, 64, 5  # one layer more than BACON's 4-layer history

# (prompt length, shared prefix, budget incl. the window, window): the window 16 request has a
# prompt just long enough to be compressed; one has a prefix matched in the radix cache.
REQUESTS = [(300, 0, 64, 32), (181, 48, 96, 32), (120, 0, 40, 16), (90, 20, 37, 32)]


def make_pool(
    gen, page_size, heads=HKV, head_dim=D, lens=tuple(r[0] for r in REQUESTS), layers=LAYERS
):
    """Shuffled whole pages, as after real allocation; one K buffer per layer."""
    lens = list(lens)
    pages_per_req = [-(-n // page_size) for n in lens]
    order = torch.randperm(sum(pages_per_req) + 4, generator=gen) + 1
    slots, at = [], 0
    for n, k in zip(lens, pages_per_req, strict=True):
        pos = torch.arange(n)
        slots.append(order[at : at + k][pos // page_size] * page_size + pos % page_size)
        at += k
    num_slots = (len(order) + 1) * page_size
    keys = [torch.randn(num_slots, heads, head_dim, generator=gen) * 2 for _ in range(layers)]
    return slots, keys


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("policy", ["snapkv", "bacon"])
def test_batched_keep_sets_equal_the_per_request_policy(
    policy, backend, page_size, kernel_device, one_thread
):
    device = kernel_device if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(7)
    slots, keys = make_pool(gen, page_size)
    plans = []
    for (n, prefix, budget, window), row in zip(REQUESTS, slots, strict=True):
        config = CompressionConfig(policy=policy, budget=budget, window=window)
        plans.append(
            [
                plan_request(config, make_policy(policy), n, prefix, row, LAYERS, HKV)
                for _ in ("batched", "reference")
            ]
        )
    assert all(p is not None for pair in plans for p in pair)
    for layer in range(LAYERS):
        q = [torch.randn(w, HQ, D, generator=gen) for *_, w in REQUESTS]
        k_buffer = keys[layer]
        for (_, reference), q_window in zip(plans, q, strict=True):
            reference.score_layer(layer, q_window, k_buffer[reference.slots], None)
        batched = [b for b, _ in plans]
        prev = [
            torch.cat([c.state.evidence[j].T for c in batched]).to(device)
            for j in range(len(batched[0].state.evidence))
        ]
        keep, evidence = kernels.keep_sets(
            torch.cat(q).to(device),
            kernels.indptr(torch.tensor([w for *_, w in REQUESTS])).to(device),
            k_buffer.to(device),
            kernels.KVIndex.from_rows([c.slots.to(device) for c in batched]),
            [c.kept - w for c, (*_, w) in zip(batched, REQUESTS, strict=True)],
            [c.prefix_len for c in batched],
            calibrated=policy == "bacon",
            prev_evidence=prev,
            backend=backend,
        )
        for c, k, e in zip(batched, keep, evidence, strict=True):
            c.record(layer, k.cpu())
            if policy == "bacon":  # the persistence history, as the policy keeps its own
                c.state.evidence.append(e.T.cpu())
                del c.state.evidence[: max(0, len(c.state.evidence) - HISTORY)]
    for batched, reference in plans:
        torch.testing.assert_close(batched.keep, reference.keep, rtol=0, atol=0)
        assert len(batched.state.evidence) == len(reference.state.evidence)
        for got, want in zip(batched.state.evidence, reference.state.evidence, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the keep-sets are real selections: each head keeps distinct, in-range positions
    for batched, _ in plans:
        keep = batched.keep
        assert bool((keep.diff(dim=-1) > 0).all())
        assert int(keep.min()) >= batched.prefix_len and int(keep.max()) < batched.prompt_len


# Operations that make no kernel launch: they may grow with the batch (one view per request).
VIEWS = {
    "aten.alias.default", "aten.expand.default", "aten.permute.default", "aten.select.int",
    "aten.slice.Tensor", "aten.split_with_sizes.default", "aten.transpose.int",
    "aten.unbind.int", "aten.unsqueeze.default", "aten.view.default",
}  # fmt: skip
# Operations that read a value back from the device (int(), .item(), a boolean mask's size).
READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}


class _Operations(TorchDispatchMode):
    """Counts the ATen operations dispatched outside Triton's interpreter (whose launch
    plumbing would otherwise be counted with them)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and not frame.f_globals.get("__name__", "").startswith("triton"):
            frame = frame.f_back
        if frame is None:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def without_sync(call) -> None:
    """Run ``call()`` on CUDA in sync debug mode "error": it raises if ``call`` synchronises
    with the GPU (reads a value back)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _layer_call(batch: int, device: str, calibrated: bool):
    """One layer's ``keep_sets`` call as the integration makes it (``q_indptr`` on the CPU,
    the index from slot rows), for ``batch`` prompts of 200 tokens."""
    gen = torch.Generator().manual_seed(batch)
    n, w = 200, 16
    slots = torch.randperm(batch * n, generator=gen) + 1
    index = kernels.KVIndex.from_rows([r.to(device) for r in slots.split(n)])
    k_buffer = torch.randn(batch * n + 1, HKV, D, generator=gen).to(device)
    q = torch.randn(batch * w, HQ, D, generator=gen).to(device)
    prev = [torch.rand(batch * (n - w), HKV, generator=gen).to(device)] * 4 if calibrated else []
    q_indptr = kernels.indptr(torch.full((batch,), w))
    return lambda: kernels.keep_sets(
        q, q_indptr, k_buffer, index, [48] * batch, [0] * batch,
        calibrated=calibrated, prev_evidence=prev, backend="triton",
    )  # fmt: skip


@pytest.mark.parametrize("calibrated", [False, True])
def test_keep_sets_read_nothing_back_and_do_not_grow_with_the_batch(
    calibrated, kernel_device, one_thread
):
    """The per-layer call only queues work: on CUDA it never synchronises with the GPU (sync
    debug mode raises); on CPU no operation reads a value back, and 4 requests take the same
    operations as 1 apart from views (the selection is batched, not a loop per request)."""
    if kernel_device == "cuda":
        for batch in (1, 4):
            without_sync(_layer_call(batch, kernel_device, calibrated))
        return
    counts = {}
    for batch in (1, 4):
        call = _layer_call(batch, kernel_device, calibrated)
        with _Operations() as ops:
            call()
        counts[batch] = collections.Counter(
            {op: c for op, c in ops.counts.items() if op not in VIEWS}
        )
        assert not READS & set(ops.counts), ops.counts
    assert counts[1] == counts[4]
    assert sum(counts[1].values()) > 20  # the recorder saw the call's operations


# ---------------------------------------------------------------------------------------------
# The served keep-sets (kernels.served: every layer at once), every served policy, ragged ones
# included, against the policy objects; and the cells C the host predicts for them.

SERVED_HQ, SERVED_HKV = 8, 4  # GQA 2; four heads for AdaKV and SparseMM to split


def head_scores(gen, layers=LAYERS, heads=SERVED_HKV) -> list[list[float]]:
    """SparseMM's visual-head scores: skewed, summing to 1 over the model."""
    scores = torch.rand(layers, heads, generator=gen, dtype=torch.float64) ** 4
    return (scores / scores.sum()).tolist()


def served_batch(q, keys, slots, requests, scores, heads=None, backend=None, device="cpu"):
    """``served.PrefillBatch`` of ``requests`` (``(n, prefix, budget, window)``), ``q``
    ``[layers, sum_w, Hq, d]`` and ``keys`` per layer, on ``device``."""
    kept = [min(budget, n - prefix) for n, prefix, budget, _ in requests]
    return served.PrefillBatch(
        q.to(device), [w for *_, w in requests], [k.to(device) for k in keys],
        kernels.KVIndex.from_rows([r.to(device) for r in slots]),
        [k - w for k, (*_, w) in zip(kept, requests, strict=True)],
        [prefix for _, prefix, *_ in requests], backend=backend, head_scores=scores,
        kv_heads=heads,
    )  # fmt: skip


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("policy", list(served.SERVED))
def test_served_keep_sets_and_counts_equal_the_per_request_policy(
    policy, backend, page_size, kernel_device, one_thread
):
    """Every served policy, ragged ones included: keep-sets and counts of every layer and
    request equal ``policy.keep`` run one request and one layer after the other (BACON's
    persistence carried in its state); rows past a head's count are ``KEEP_PAD``."""
    gen = torch.Generator().manual_seed(11)
    slots, keys = make_pool(gen, page_size, SERVED_HKV)
    scores = head_scores(gen)
    q = [torch.randn(LAYERS, w, SERVED_HQ, D, generator=gen) for *_, w in REQUESTS]
    device = kernel_device if backend == "triton" else "cpu"
    batch = served_batch(torch.cat(q, dim=1), keys, slots, REQUESTS, scores, None, backend,
                         device)  # fmt: skip
    keep, counts = (t.cpu() for t in served.keep_sets(policy, batch))
    assert keep.shape[:3] == counts.shape == (LAYERS, len(REQUESTS), SERVED_HKV)
    for b, ((n, prefix, *_), row, q_b, k_b) in enumerate(
        zip(REQUESTS, slots, q, batch.candidates, strict=True)
    ):
        rank, state = make_policy(policy, head_scores=scores), RequestState()
        for layer in range(LAYERS):
            attn = window_attention(q_b[layer].transpose(0, 1), keys[layer][row].transpose(0, 1))
            want = rank.keep(attn, SERVED_HKV, k_b, layer, LAYERS, state, prefix)
            got = keep[layer, b]
            torch.testing.assert_close(got[:, : want.shape[1]], want, rtol=0, atol=0)
            assert bool((got[:, want.shape[1] :] == KEEP_PAD).all())
            torch.testing.assert_close(counts[layer, b], (want != KEEP_PAD).sum(-1))
            kept = want[want != KEEP_PAD]
            assert int(kept.max()) < n and int(kept.min()) >= prefix


@pytest.mark.parametrize("policy", list(served.SERVED))
def test_host_predicted_cells_equal_the_served_counts(policy, one_thread):
    """``cells.kept_cells`` (host data only: prompt, prefix, kept, window, depth, heads, head
    scores) equals the sum of the served counts, for random prompts, prefixes, budgets and
    windows, with all KV heads and with tensor-parallel-like head subsets. The torch backend:
    the counts come from the same allocation code on both, only the scores differ (the
    matrix above holds them equal)."""
    gen = torch.Generator().manual_seed(len(policy))
    layers, group = 3, SERVED_HQ // SERVED_HKV
    scores = head_scores(gen, layers)
    for _ in range(3):
        requests = []
        for _ in range(4):
            n = int(torch.randint(40, 260, (1,), generator=gen))
            prefix = int(torch.randint(0, n // 3, (1,), generator=gen))
            window = [4, 8, 16][int(torch.randint(0, 3, (1,), generator=gen))]
            budget = int(torch.randint(window, n - prefix + 1, (1,), generator=gen))
            requests.append((n, prefix, budget, window))
        slots, keys = make_pool(gen, 1, SERVED_HKV, 16, [r[0] for r in requests], layers)
        q = torch.randn(layers, sum(r[3] for r in requests), SERVED_HQ, 16, generator=gen)
        rank = make_policy(policy, head_scores=scores)
        for heads in ([0, 1, 2, 3], [0, 1], [2, 3], [1]):
            q_heads = [h * group + g for h in heads for g in range(group)]
            batch = served_batch(q[:, :, q_heads], [k[:, heads] for k in keys], slots, requests,
                                 scores, heads, "torch")  # fmt: skip
            counts = served.keep_sets(policy, batch).counts
            for b, (n, prefix, budget, window) in enumerate(requests):
                kept = min(budget, n - prefix)
                want = cells.kept_cells(rank, n, prefix, kept, window, layers, heads)
                assert int(counts[:, b].sum()) == want, (heads, requests[b])
