"""The compaction into head-granular cells (``kernels.compact_cells``, design:
``patches/head_granular.md`` section 4.3) against its PyTorch reference
(``bacon_sglang.cells.compact_cells``) and against the cell layout written out cell by cell:
bit-exact moves, the decode's tables, and no byte outside the requests' cells touched.

On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_compaction import POOL_POINTERS, WIDTHS, allocate, assert_16_byte_moves, bits

from bacon_sglang import cells, kernels
from bacon_sglang.cells import CellKeep, CellTables, slots_needed
from bacon_sglang.paged import KVIndex
from bacon_sglang.selection import KEEP_PAD

LAYERS, HEADS = 3, 2  # 6 cells per slot
COUNTS = {  # n[l, h] of each request of the batch, and what it asks of the layout
    "whole slots": [[4, 4], [4, 4], [4, 4]],  # C = 24: 4 full cell slots
    "part slot": [[10, 1], [0, 3], [2, 1]],  # C = 17: the last slot has one free cell
    "empty heads": [[0, 0], [70, 0], [0, 5]],  # C = 75: 2 chunks in one head, 3 free cells
    "nothing kept": [[0, 0], [0, 0], [0, 0]],  # C = 0: no cell slot
}
PROMPTS = (40, 36, 100, 24)
EXTRA_SLOTS = (1, 0, 0, 0)  # allocated beyond ceil(C / (L * H)) (TP ranks agree on the max)
POOL_ROWS = (5, 2, 7, 3)  # each request's req_pool_idx, in tables of 9 rows
SENTINEL = -7  # what the tables hold before the launch


@pytest.fixture(scope="module")
def device(kernel_device) -> str:
    return kernel_device


def keep_sets(prompt: int, prefix: int, counts: list[list[int]], gen) -> torch.Tensor:
    """``[L, H, W]`` sorted random positions in ``[prefix, prompt)``, then ``KEEP_PAD``."""
    width = max(max(row) for row in counts)
    keep = torch.full((LAYERS, HEADS, width), KEEP_PAD)
    for layer, row in enumerate(counts):
        for h, n in enumerate(row):
            keep[layer, h, :n] = torch.randperm(prompt - prefix, generator=gen)[:n].sort().values
            keep[layer, h, :n] += prefix
    return keep


def batch(dtype, page: int, seed: int):
    """A pool with random bytes everywhere, the four requests' prompt rows and fresh cell
    slots (shuffled whole pages, some pages nobody's), and their keep-sets."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = (0, page, 0, page) if page > 1 else (0, 5, 0, 3)
    keeps = [
        keep_sets(n, p, c, gen) for n, p, c in zip(PROMPTS, prefixes, COUNTS.values(), strict=True)
    ]
    m = [
        slots_needed(int((k != KEEP_PAD).sum()), LAYERS, HEADS) + extra
        for k, extra in zip(keeps, EXTRA_SLOTS, strict=True)
    ]
    rows, num_slots = allocate([*PROMPTS, *m], page, gen)
    slots = num_slots + page  # the pool's padding page
    k = [torch.randn(slots, HEADS, 32, generator=gen).to(dtype) for _ in range(LAYERS)]
    v = [torch.randn(slots, HEADS, 16, generator=gen).to(dtype) for _ in range(LAYERS)]
    return k, v, rows[:4], rows[4:], prefixes, keeps


def layout(prompts, cell_slots, keeps):
    """The layout written out cell by cell (``bacon_sglang/cells.py``'s formula, not its
    code): per request, ``[(src slot, src layer, src head, dst slot, dst layer, dst head)]``."""
    moves = []
    for prompt, slots, keep in zip(prompts, cell_slots, keeps, strict=True):
        c = 0
        for layer in range(LAYERS):
            for h in range(HEADS):
                for pos in keep[layer, h][keep[layer, h] != KEEP_PAD].tolist():
                    per_slot = c % (LAYERS * HEADS)
                    to = int(slots[c // (LAYERS * HEADS)])
                    moves.append((int(prompt[pos]), layer, h, to, per_slot // HEADS, c % HEADS))
                    c += 1
    return moves


def expected(k, v, moves):
    """The buffers after the moves (all read first), and ``[slots, H]`` masks per layer of
    the cells written."""
    k_out, v_out = [x.clone() for x in k], [x.clone() for x in v]
    written = [torch.zeros(x.shape[:2], dtype=torch.bool) for x in k]
    for src, layer, h, to, to_layer, to_head in moves:
        k_out[to_layer][to, to_head] = k[layer][src, h]
        v_out[to_layer][to, to_head] = v[layer][src, h]
        written[to_layer][to, to_head] = True
    return k_out, v_out, written


def assert_untouched(before, after, written) -> None:
    """Every cell outside ``written`` keeps its bytes: the other requests' slots, the free
    cells at the end of a request's last cell slot, slots nobody owns."""
    for b, a, w in zip(before, after, written, strict=True):
        assert torch.equal(bits(a.cpu())[~w], bits(b)[~w]), "a byte outside the cells changed"


def rows_after(prompts, prefixes, cell_slots, device="cpu") -> KVIndex:
    """The rows after compaction: each prompt's first ``P`` slots, then its cell slots."""
    pieces = zip(prompts, prefixes, cell_slots, strict=True)
    return KVIndex.from_rows([(r[:p].to(device), s.to(device)) for r, p, s in pieces])


def launch(k, v, prompts, cell_slots, prefixes, keeps, device, backend):
    """``kernels.compact_cells`` on copies of the pool; returns them and the tables."""
    k, v = [x.to(device) for x in k], [x.to(device) for x in v]
    tables = CellTables.zeros(9, LAYERS, HEADS, device)
    tables.meta.fill_(SENTINEL)
    tables.off.fill_(SENTINEL)
    index = KVIndex.from_rows([r.to(device) for r in prompts])
    dst = rows_after(prompts, prefixes, cell_slots, device)
    keep = CellKeep.pack([x.to(device) for x in keeps])
    kernels.compact_cells(
        k, v, index, torch.tensor(prefixes), keep, dst, tables, torch.tensor(POOL_ROWS),
        check=True, backend=backend,
    )  # fmt: skip
    return k, v, tables


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compact_cells_matches_reference_and_layout(device, dtype, page):
    k, v, prompts, cell_slots, prefixes, keeps = batch(dtype, page, seed=page)
    k_want, v_want, written = expected(k, v, layout(prompts, cell_slots, keeps))
    args = (k, v, prompts, cell_slots, prefixes, keeps)
    k_ref, v_ref, ref_tables = launch(*args, "cpu", "torch")
    k_got, v_got, tables = launch(*args, device, "triton")
    for got, ref, want in zip(k_got + v_got, k_ref + v_ref, k_want + v_want, strict=True):
        assert torch.equal(bits(ref), bits(want))  # the reference writes the layout
        assert torch.equal(bits(got.cpu()), bits(ref))  # the kernel, bit for bit
    assert_untouched(k + v, k_got + v_got, written + written)
    assert torch.equal(tables.meta.cpu(), ref_tables.meta)
    assert torch.equal(tables.off.cpu(), ref_tables.off)
    for rpi, p, slots, counts in zip(POOL_ROWS, prefixes, cell_slots, COUNTS.values(), strict=True):
        assert tables.meta[rpi].tolist() == [p, len(slots)]
        assert tables.off[rpi].tolist() == cells.cell_offsets(torch.tensor(counts)).tolist()
    others = [r for r in range(9) if r not in POOL_ROWS]
    assert bool((tables.meta[others] == SENTINEL).all() and (tables.off[others] == SENTINEL).all())


def test_the_sentinel_check_sees_an_off_by_one():
    """A writer that puts every cell one further (an extra cell in front of (layer 0, head
    0)) fails the check: the request with a free cell in its last slot writes into it."""
    k, v, prompts, cell_slots, prefixes, keeps = batch(torch.float32, 1, seed=3)
    _, _, written = expected(k, v, layout(prompts, cell_slots, keeps))
    r = list(COUNTS).index("part slot")
    per_head = [[row[row != KEEP_PAD] for row in layer] for layer in keeps[r]]
    per_head[0][0] = torch.cat([per_head[0][0][:1], per_head[0][0]])
    k_bad, v_bad = [x.clone() for x in k], [x.clone() for x in v]
    cells.pack_cells(k_bad, v_bad, prompts[r], per_head, cell_slots[r])
    with pytest.raises(AssertionError, match="outside the cells"):
        assert_untouched(k + v, k_bad + v_bad, written + written)


@pytest.mark.parametrize("bad", ["shared_source", "too_few_slots", "indptr", "unsorted", "prefix"])
def test_check_cells_rejects_broken_contract(bad):
    k, v, prompts, cell_slots, prefixes, keeps = batch(torch.float32, 1, seed=4)
    keep = CellKeep.pack(keeps)
    if bad == "shared_source":  # a cell slot that is also a kept token's slot
        cell_slots[0] = cell_slots[0].clone()
        cell_slots[0][0] = prompts[0][keep.positions[0]]
    elif bad == "too_few_slots":
        cell_slots[2] = cell_slots[2][:-1]
    elif bad == "indptr":
        keep = keep._replace(indptr=keep.indptr + torch.tensor([0, 1, 1, 1, 1]))
    elif bad == "unsorted":
        keep.positions[[0, 1]] = keep.positions[[1, 0]]
    else:
        keep.positions[keep.indptr[1]] = prefixes[1] - 1
    index = KVIndex.from_rows(prompts)
    dst = rows_after(prompts, prefixes, cell_slots)
    with pytest.raises(ValueError):
        cells.check_cells(index, torch.tensor(prefixes), keep, dst)


def test_compact_cells_moves_16_bytes_per_instruction():
    """Compiled for an H100/H200 on CPU: the cell moves are 16-byte vector loads and stores
    (the same alignment hint as ``_compact_kernel``)."""
    pointers = {
        **POOL_POINTERS, "dst_lens": "*i64", "counts": "*i64", "req_pool_indices": "*i64",
        "cell_meta": "*i32", "cell_off": "*i32",
    }  # fmt: skip
    consts = {**WIDTHS, "HEADS": 4, "PER_SLOT": 112, "BLOCK_LH": 128}  # Qwen2-VL-7B: 28 x 4
    assert_16_byte_moves("_compact_cells_kernel", pointers, consts)
