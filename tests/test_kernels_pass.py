"""The one compression pass per prefill (``kernels.served``: every layer and finishing request
at once, then one compaction) against the per-request policy objects, its window buffer
against the queries it copies, and its cost: the same launches and operations for 4 and 28
layers, 1 and 8 requests, nothing read back."""

import collections

import pytest
import torch
from test_kernels_keep_sets import (  # mixed budgets, windows and shared prefixes
    READS,
    REQUESTS,
    VIEWS,
    _Operations,
    make_pool,
    without_sync,
)  # fmt: skip
from triton.runtime.interpreter import InterpretedFunction

from bacon_sglang import kernels
from bacon_sglang.compression import ForwardWindows, WindowQueries, plan_request
from bacon_sglang.config import POLICY_NAMES, CompressionConfig
from bacon_sglang.kernels import served
from bacon_sglang.paged import KVIndex, pack_layers, to_device
from bacon_sglang.policies import make_policy

LAYERS = 6  # two more than BACON's 4-layer history


def test_every_configured_policy_is_served():
    """Every ``--kv-policy`` value but ``none`` is served (the uneven allocations are served
    before the flag offers them: they wait for ``--kv-layout cells``), each under a name
    ``make_policy`` builds."""
    assert set(POLICY_NAMES) - {"none"} <= set(served.SERVED)
    for name in served.SERVED:
        make_policy(name, head_scores=[[1.0]])
    with pytest.raises(ValueError, match="not served"):
        served.keep_sets("h2o", None)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [
    (2, 2, 64), (4, 2, 128), (14, 2, 64),  # GQA 1, 2, 7
])  # fmt: skip
@pytest.mark.parametrize("policy", ["snapkv", "bacon"])
def test_pass_equals_the_per_request_policy(
    policy, num_q_heads, num_kv_heads, head_dim, page_size, kernel_device, one_thread
):
    """Bit-equal keep-sets, every layer and request, to ``RequestCompression.score_layer``
    (the policy objects, one request and one layer at a time), for both backends."""
    gen = torch.Generator().manual_seed(num_q_heads * head_dim + page_size)
    lens = [r[0] for r in REQUESTS]
    slots, keys = make_pool(gen, page_size, num_kv_heads, head_dim, lens, LAYERS)
    q = [torch.randn(LAYERS, w, num_q_heads, head_dim, generator=gen) for *_, w in REQUESTS]
    references = []
    for (n, prefix, budget, window), row, q_b in zip(REQUESTS, slots, q, strict=True):
        config = CompressionConfig(policy=policy, budget=budget, window=window)
        c = plan_request(config, make_policy(policy), n, prefix, row, LAYERS, num_kv_heads)
        for layer in range(LAYERS):
            c.score_layer(layer, q_b[layer], keys[layer][row], None)
        references.append(c)
    windows = [w for *_, w in REQUESTS]
    for backend, device in (("triton", kernel_device), ("torch", "cpu")):
        batch = served.PrefillBatch(
            torch.cat(q, dim=1).to(device), windows, [k.to(device) for k in keys],
            KVIndex.from_rows([r.to(device) for r in slots]),
            [c.kept - w for c, w in zip(references, windows, strict=True)],
            [c.prefix_len for c in references], backend=backend,
        )  # fmt: skip
        keep = served.keep_sets(policy, batch).keep
        packed, keep_indptr = pack_layers([keep], [[c.kept for c in references]])
        bounds = keep_indptr.tolist()
        for c, k0, k1 in zip(references, bounds, bounds[1:], strict=False):
            torch.testing.assert_close(packed[..., k0:k1].cpu(), c.keep, rtol=0, atol=0)


class _Plan:
    """A ``PlanEntry`` as ``patches/scheduler.py`` builds it."""

    def __init__(self, q_start, q_len, window, compression):
        self.q_start, self.q_len, self.window = q_start, q_len, window
        self.compression, self.recomputed = compression, None


def _compression(policy, n, window):
    config = CompressionConfig(policy=policy, budget=window + 8, window=window)
    return plan_request(config, make_policy(policy), n, 0, torch.arange(n), 3, 1)


def test_window_buffer_copies_each_window_once_and_joins_chunks():
    """Two forwards of a chunked batch: request A's prompt (100 tokens, window 32) ends in a
    10-token chunk, shorter than its window, so its window joins 22 stashed rows and 10 new
    ones; B (window 16) and C (SnapKV) finish in the second forward, D's prompt goes on. The
    buffer holds at most the window rows, whatever the chunk lengths."""
    gen = torch.Generator().manual_seed(0)
    layers, heads, dim = 3, 2, 8
    forwards = [torch.randn(layers, 130, heads, dim, generator=gen) for _ in range(2)]
    stash_a, stash_d = WindowQueries(32), WindowQueries(16)
    first = [_Plan(0, 90, stash_a, None), _Plan(90, 40, stash_d, None)]
    windows = ForwardWindows(first, layers, forwards[0][0])
    for layer in range(layers):
        windows.add(layer, forwards[0][layer])
    assert windows.buffer.shape[1] == 32 + 16 and windows.finish() == []
    a = _compression("bacon", 100, 32)
    b = _compression("bacon", 50, 16)
    c = _compression("snapkv", 80, 32)
    second = [_Plan(0, 10, stash_a, a), _Plan(10, 50, WindowQueries(16), b),
              _Plan(60, 40, WindowQueries(32), c), _Plan(100, 30, stash_d, None)]  # fmt: skip
    windows = ForwardWindows(second, layers, forwards[1][0])
    for layer in range(layers):
        windows.add(layer, forwards[1][layer])
    assert windows.buffer.shape[1] == 10 + 16 + 32 + 16
    groups = windows.finish()
    got = {(cs[0].config.policy, len(cs)): (q, w) for cs, q, w in groups}
    q_a = torch.cat([forwards[0][:, 68:90], forwards[1][:, 0:10]], dim=1)
    q_b = forwards[1][:, 44:60]
    torch.testing.assert_close(got["bacon", 2][0], torch.cat([q_a, q_b], dim=1), rtol=0, atol=0)
    assert got["bacon", 2][1] == [32, 16]
    torch.testing.assert_close(got["snapkv", 1][0], forwards[1][:, 68:100], rtol=0, atol=0)
    want_d = torch.cat([forwards[0][:, 90:130], forwards[1][:, 100:130]], dim=1)[:, -16:]
    torch.testing.assert_close(stash_d.rows, want_d, rtol=0, atol=0)


UNIFORM = ("snapkv", "bacon")  # compacted into slots today; the others wait for cells


def _pass(layers: int, batch: int, device: str, policy: str):
    """The whole pass as ``patches/attention.compress`` runs it (keep-sets, packing, one
    compaction into a copy) for ``batch`` prompts of 40 tokens over ``layers`` layers; for an
    uneven allocation its keep-sets only (the compaction into cells and its hook are steps 3
    and 5 of ``patches/head_granular.md``)."""
    gen = torch.Generator().manual_seed(batch)
    n, w, kept = 40, 8, 16
    slots, keys = make_pool(gen, 1, 2, 16, [n] * batch, layers)
    values = [torch.randn_like(k) for k in keys]
    copy = (torch.arange(batch * kept) + len(keys[0])).to(device)  # fresh slots after the pool's
    keys = [torch.cat([k, torch.zeros(batch * kept, 2, 16)]).to(device) for k in keys]
    values = [torch.cat([v, torch.zeros(batch * kept, 2, 16)]).to(device) for v in values]
    rows = [r.to(device) for r in slots]
    q = torch.randn(layers, batch * w, 4, 16, generator=gen).to(device)
    head_scores = (torch.rand(layers, 2, generator=gen) + 0.1).tolist()

    def run():
        prefill = served.PrefillBatch(q, [w] * batch, keys, KVIndex.from_rows(rows),
                                      [kept - w] * batch, [0] * batch,
                                      head_scores=head_scores)  # fmt: skip
        keep_sets = served.keep_sets(policy, prefill)
        if policy not in UNIFORM:
            return
        keep, keep_indptr = pack_layers([keep_sets.keep], [[kept] * batch])
        dst = KVIndex.from_rows(copy.split(kept))
        kernels.compact(keys, values, prefill.index, to_device([0] * batch, device), keep,
                        keep_indptr, dst)  # fmt: skip

    return run


@pytest.mark.parametrize("policy", list(served.SERVED))
def test_pass_launches_do_not_grow_with_depth_or_batch(
    policy, kernel_device, one_thread, monkeypatch
):
    """Counted on CPU: the same Triton launches and ATen operations (views aside) for 4 and
    28 layers, 1 and 8 requests, none reading a value back; on CUDA, no synchronisation
    (``set_sync_debug_mode("error")`` raises on one). The uneven allocations, which launch
    the kernels of SnapKV or BACON and add only ATen operations, over 3 and 12 layers, 1 and
    4 requests (the interpreter's time)."""
    shapes = [(4, 1), (28, 1), (4, 8), (28, 8)] if policy in UNIFORM else [
        (3, 1), (12, 1), (3, 4), (12, 4)]  # fmt: skip
    if kernel_device == "cuda":
        for layers, batch in shapes:
            without_sync(_pass(layers, batch, kernel_device, policy))
        return
    launches = collections.Counter()
    run_kernel = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return run_kernel(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting)
    counts = {}
    for layers, batch in shapes:
        run = _pass(layers, batch, kernel_device, policy)
        launches.clear()
        with _Operations() as ops:
            run()
        assert not READS & set(ops.counts), ops.counts
        aten = collections.Counter({op: c for op, c in ops.counts.items() if op not in VIEWS})
        counts[layers, batch] = (dict(launches), aten)
    assert len({repr(c) for c in counts.values()}) == 1, counts
    triton_launches, aten = counts[shapes[0]]
    compaction = policy in UNIFORM  # the others' keep-sets only (see _pass)
    want = 3 + policy.startswith("bacon") + compaction
    assert sum(triton_launches.values()) == want, triton_launches
    assert sum(aten.values()) > 20  # the recorder saw the pass's operations
    print(f"{policy}: {sum(triton_launches.values())} Triton launches, "
          f"{sum(aten.values())} ATen operations per prefill batch")  # fmt: skip


def _hook_setup(gen, layers, device):
    """A fake scheduler runtime with two finishing requests (SnapKV into a copy, BACON in place
    with a shared prefix) and one middle chunk, their K/V in a pool, and the per-request
    references' keep-sets."""
    from types import SimpleNamespace

    heads, kv_heads, dim = 4, 2, 16
    lens, new = [120, 130, 200], [120, 90, 60]  # request 1 matched 40 tokens in the cache
    slots, keys = make_pool(gen, 1, kv_heads, dim, lens, layers)
    values = [torch.randn_like(k) for k in keys]
    qs = [torch.randn(sum(new), heads * dim, generator=gen) for _ in range(layers)]
    plan, references, start = [], [], 0
    policies = ["snapkv", "bacon", None]  # two policy groups, scored in the other order
    for b, (n, q_len) in enumerate(zip(lens, new, strict=True)):
        config = CompressionConfig(policy=policies[b] or "bacon", budget=48, window=16)
        if b == 2:  # a middle chunk: its prompt goes on
            plan.append(_Plan(start, q_len, WindowQueries(16), None))
            continue
        prefix = n - q_len
        row = slots[b].to(device)
        pair = [plan_request(config, make_policy(config.policy), n, prefix, row, layers,
                             kv_heads) for _ in range(2)]  # fmt: skip
        for layer in range(layers):
            window = qs[layer][start + q_len - 16 : start + q_len].view(16, heads, dim)
            pair[1].score_layer(layer, window, keys[layer][slots[b]], 0.25)
        plan.append(_Plan(start, q_len, WindowQueries(16), pair[0]))
        references.append(pair[1])
        start += q_len
    # request 0 is compressed into a copy (fresh int64 slots past the prompts'), 1 in place
    plan[0].compression.copy_slots = torch.arange(64, device=device) + len(keys[0])
    pad = torch.zeros(64, kv_heads, dim)
    pool = SimpleNamespace(k_buffer=[torch.cat([k, pad]).to(device) for k in keys],
                           v_buffer=[torch.cat([v, pad]).to(device) for v in values])  # fmt: skip
    runtime = SimpleNamespace(
        plan=plan, forward=None, num_layers=layers, kv_pool=pool, compacting=False, kv_heads=None
    )
    return runtime, [q.to(device) for q in qs], references, (heads, dim), keys


def _forward(runtime, qs, heads, dim):
    """The hook as SGLang calls it, once per layer of an extend forward."""
    from types import SimpleNamespace

    from bacon_sglang.patches import attention

    batch = SimpleNamespace(forward_mode=SimpleNamespace(name="EXTEND"))
    for layer_id, q in enumerate(qs):
        layer = SimpleNamespace(layer_id=layer_id, tp_q_head_num=heads, qk_head_dim=dim,
                                scaling=0.25)  # fmt: skip
        attention.after_attention_forward("out", None, q, None, None, layer, batch)
        assert runtime.forward is None or layer_id < len(qs) - 1


def test_attention_hook_runs_one_pass_and_drops_its_buffer(kernel_device, one_thread, monkeypatch):
    """``patches/attention.py`` on a fake runtime: per layer only the buffer copy, after the
    last layer the keep-sets of the per-request references, K/V compacted in place, the
    middle chunk's rows stashed, and the forward's buffer dropped, also when the pass fails
    (the failure handed to the scheduler's containment, saying whether KV may have moved)."""
    from bacon_sglang.patches import scheduler as scheduler_patch

    gen = torch.Generator().manual_seed(3)
    runtime, qs, references, (heads, dim), keys = _hook_setup(gen, 5, kernel_device)
    monkeypatch.setattr(scheduler_patch, "RUNTIME", runtime)
    _forward(runtime, qs, heads, dim)
    for entry, reference in zip(runtime.plan, references, strict=False):
        c = entry.compression
        torch.testing.assert_close(c.keep.cpu(), reference.keep, rtol=0, atol=0)
        moved = runtime.kv_pool.k_buffer[4][torch.cat(c.destination())[c.prefix_len :]].cpu()
        want = keys[4][c.slots.cpu()[reference.keep[4]].T, torch.arange(2)[None, :]]
        torch.testing.assert_close(moved, want, rtol=0, atol=0)  # [kept, Hkv]
    stash = runtime.plan[2].window.rows
    torch.testing.assert_close(stash[:, :, 0, :].cpu(), torch.stack(
        [q[-16:, :dim].cpu() for q in qs]), rtol=0, atol=0)  # fmt: skip

    contained = []
    monkeypatch.setattr(
        scheduler_patch,
        "contain_forward_failure",
        lambda runtime, error, compacting: contained.append((str(error), compacting)),
    )

    def fail(*args, **kwargs):
        raise RuntimeError("pass failed")

    from bacon_sglang import kernels

    for target, name in ((served, "keep_sets"), (kernels, "compact")):
        runtime, qs, *_ = _hook_setup(gen, 5, kernel_device)
        monkeypatch.setattr(scheduler_patch, "RUNTIME", runtime)
        with monkeypatch.context() as m:
            m.setattr(target, name, fail)
            _forward(runtime, qs, heads, dim)  # contained: the forward goes on
        assert runtime.forward is None and not runtime.compacting
    # scoring failed before any KV moved; compaction may have moved some
    assert contained == [("pass failed", False), ("pass failed", True)]
