"""The head-granular KV reference (``bacon_sglang/cells.py``): cells numbered without overlap
inside the request's own slots, and decode attention over cells + ordinary tokens equal to
dense attention over the same reduced KV (design: ``patches/head_granular.md``)."""

from __future__ import annotations

import pytest
import torch

from bacon_sglang.cells import (
    CellKeep,
    cell_address,
    cell_decode,
    cell_offsets,
    pack_cells,
    rank_heads,
    slots_needed,
)
from bacon_sglang.selection import KEEP_PAD


@pytest.mark.parametrize("seed", range(20))
def test_cells_fill_their_slots_without_overlap(seed):
    gen = torch.Generator().manual_seed(seed)
    layers, heads = (
        int(torch.randint(1, 9, (1,), generator=gen)),
        int(torch.randint(1, 5, (1,), generator=gen)),
    )
    counts = torch.randint(0, 40, (layers, heads), generator=gen)
    off = cell_offsets(counts)
    total = int(counts.sum())
    assert off[-1] == total and torch.equal(off.diff(), counts.reshape(-1))
    m = slots_needed(total, layers, heads)
    slot, layer, head = cell_address(torch.arange(total), layers, heads)
    assert all(slot < m) and (m == 0 or (m - 1) * layers * heads < total)
    flat = (slot * layers + layer) * heads + head
    assert flat.unique().numel() == total  # a bijection onto the first C of m x L x H


@pytest.mark.parametrize(
    ("kv_heads", "tp", "split"),
    [
        (2, 2, [[0], [1]]),
        (4, 2, [[0, 1], [2, 3]]),
        (2, 4, [[0], [0], [1], [1]]),
        (3, 1, [[0, 1, 2]]),
    ],
)
def test_each_tp_rank_holds_the_heads_sglang_gives_it(kv_heads, tp, split):
    """``Hkv / tp`` consecutive heads per rank, or one head shared by ``tp / Hkv`` ranks
    (SGLang's ``QKVParallelLinear``)."""
    assert [list(rank_heads(r, tp, kv_heads)) for r in range(tp)] == split


def test_tp_ranks_hold_the_largest_ranks_cell_slots():
    """Under TP every rank allocates ``m`` of the rank with most cells; the report counts
    the cells of every rank, the slots of one, and lists each rank's ``C_r``."""
    from bacon_sglang.compression import plan_request
    from bacon_sglang.config import CompressionConfig
    from bacon_sglang.policies import make_policy

    config = CompressionConfig("bacon-pyramidkv", 64, layout="cells")
    c = plan_request(config, make_policy(config.policy), 300, 0, torch.arange(300), 4, 1)
    c.store_in_cells(200, [200, 330])  # rank 0 of 2: 4 x 1 cells a slot
    assert (c.cells, c.cell_slots, c.all_cells) == (200, 83, 530)
    report = c.stats()
    assert (report["cells"], report["cell_slots"], report["rank_cells"]) == (530, 83, [200, 330])
    assert report["slot_equivalent"] == 530 / 8 and report["kept_tokens"] == 83


@pytest.mark.parametrize(("q_heads", "kv_heads", "dim"), [(2, 2, 16), (4, 2, 32), (7, 1, 64)])
@pytest.mark.parametrize("seed", range(3))
def test_decode_over_cells_equals_dense_attention_over_the_reduced_cache(
    q_heads, kv_heads, dim, seed
):
    gen = torch.Generator().manual_seed(seed)
    layers, slots, prompt, shared, generated = 3, 400, 60, 5, 4
    k = [torch.randn(slots, kv_heads, dim, generator=gen) for _ in range(layers)]
    v = [torch.randn(slots, kv_heads, dim, generator=gen) for _ in range(layers)]
    free = torch.randperm(slots - 1, generator=gen) + 1  # slot 0: SGLang's padding slot
    prompt_row, free = free[:prompt], free[prompt:]

    def kept() -> torch.Tensor:  # a sorted random subset of the private prompt, maybe empty
        n = int(torch.randint(0, 30, (1,), generator=gen))
        return torch.randperm(prompt - shared, generator=gen)[:n].sort().values + shared

    keep = [[kept() for _ in range(kv_heads)] for _ in range(layers)]
    counts = torch.tensor([[len(x) for x in per_layer] for per_layer in keep])
    m = slots_needed(int(counts.sum()), layers, kv_heads)
    cell_slots, gen_slots, untouched = free[:m], free[m : m + generated], free[m + generated :]
    q = [torch.randn(q_heads, dim, generator=gen) for _ in range(layers)]
    group = q_heads // kv_heads
    want = []
    for layer in range(layers):  # dense attention over exactly the kept and ordinary tokens
        heads = []
        for h in range(kv_heads):
            rows = torch.cat([prompt_row[:shared], prompt_row[keep[layer][h]], gen_slots])
            kk, vv = k[layer][rows, h], v[layer][rows, h]
            w = torch.softmax(q[layer][h * group : (h + 1) * group] @ kk.T / dim**0.5, dim=-1)
            heads.append(w @ vv)
        want.append(torch.cat(heads))
    before = [x[untouched].clone() for x in k]
    off = pack_cells(k, v, prompt_row, keep, cell_slots)
    assert all(torch.equal(x[untouched], b) for x, b in zip(k, before, strict=True))
    row = torch.cat([prompt_row[:shared], cell_slots, gen_slots])
    for layer in range(layers):
        got = cell_decode(q[layer], layer, k, v, row, shared, m, off, len(row))
        torch.testing.assert_close(got, want[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_padded_keep_sets_pack_on_the_device_as_the_reference(seed):
    """``CellKeep.from_padded`` (a served policy's ``[L, B, Hkv, W]`` batch, counts and the
    host's ``C_b``: nothing read back) equals ``CellKeep.pack`` of the per-request keep-sets,
    also when a row keeps nothing and a request is uniform."""
    gen = torch.Generator().manual_seed(seed)
    layers, batch, heads, width = 3, 3, 2, 7
    counts = torch.randint(0, width + 1, (layers, batch, heads), generator=gen)
    counts[:, 2] = width  # one request without padding
    keep = torch.full((layers, batch, heads, width), KEEP_PAD, dtype=torch.long)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in counts.shape)).tolist():
        n = int(counts[tuple(idx)])
        keep[tuple(idx)][:n] = torch.randperm(40, generator=gen)[:n].sort().values + 5
    cells = counts.sum((0, 2)).tolist()
    got = CellKeep.from_padded(keep, counts, cells)
    want = CellKeep.pack([keep[:, b] for b in range(batch)])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    first, rest = (CellKeep.from_padded(keep[:, s], counts[:, s], cells[s])
                   for s in (slice(0, 1), slice(1, None)))  # fmt: skip
    halves = CellKeep.cat([first, rest])
    for g, w in zip(halves, want, strict=True):
        assert torch.equal(g, w)
