"""The compaction kernel against an out-of-place oracle: bit-exact moves, overlapping source
and destination ranges, and no byte outside the destinations touched.

On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, which must be set
before triton is first imported); on CUDA when interpreting is off and a GPU is present.
"""

import math

import pytest
import torch

from bacon_sglang import kernels, paged

LAYERS = 3


@pytest.fixture(scope="module")
def device(kernel_device) -> str:
    """CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), else CUDA."""
    return kernel_device


def allocate(lens, page_size, gen):
    """Shuffled whole pages per request (page 0 reserved), as ``MHATokenToKVPool`` hands
    them out: ``(rows [n_r] int64, num_slots)``."""
    need = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(need) + 4
    order = torch.randperm(num_pages - 1, generator=gen) + 1
    rows, at = [], 0
    for n, k in zip(lens, need, strict=True):
        pages = order[at : at + k]
        at += k
        pos = torch.arange(n)
        rows.append(pages[pos // page_size] * page_size + pos % page_size)
    return rows, num_pages * page_size


def keep_sets(kind, n, prefix, budget, heads, gen):
    """``[LAYERS, heads, budget]`` sorted positions in ``[prefix, n)``."""
    span = n - prefix
    if kind == "tail":  # the last tokens: every source overlaps some destination
        one = torch.arange(n - budget, n)
        return one.expand(LAYERS, heads, budget).clone()
    if kind == "in_place":  # already at the front: nothing to move
        one = torch.arange(prefix, prefix + budget)
        return one.expand(LAYERS, heads, budget).clone()
    sets = [
        torch.randperm(span, generator=gen)[:budget].sort().values + prefix
        for _ in range(LAYERS * heads)
    ]
    return torch.stack(sets).reshape(LAYERS, heads, budget)


def oracle(k_buffers, v_buffers, rows, prefixes, keeps):
    """Out of place: every slot keeps its old bytes except the destinations."""
    k_out = [k.clone() for k in k_buffers]
    v_out = [v.clone() for v in v_buffers]
    for row, p, keep in zip(rows, prefixes, keeps, strict=True):
        dst = row[p : p + keep.shape[-1]]
        for layer in range(LAYERS):
            for h in range(keep.shape[1]):
                src = row[keep[layer, h]]
                k_out[layer][dst, h] = k_buffers[layer][src, h]
                v_out[layer][dst, h] = v_buffers[layer][src, h]
    return k_out, v_out


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


CASES = [  # dtype, heads, (head_dim_k, head_dim_v), page_size, lens, prefixes, budgets
    (torch.bfloat16, 2, (64, 64), 1, (40, 100, 33), (0, 7, 0), (8, 50, 33)),
    (torch.bfloat16, 4, (128, 128), 16, (40, 100, 70), (0, 32, 16), (24, 40, 0)),
    (torch.float32, 1, (64, 128), 16, (300, 17), (48, 0), (64, 16)),
    (torch.float8_e4m3fn, 2, (128, 128), 1, (90, 64), (10, 0), (30, 32)),
    (torch.float16, 7, (64, 64), 16, (64, 130), (16, 0), (32, 100)),
]


@pytest.mark.parametrize("kind", ["random", "tail", "in_place"])
@pytest.mark.parametrize("rows_as", ["req_to_token", "rows_int64", "rows_int32"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compact_matches_oracle(device, case, rows_as, kind):
    dtype, heads, (dk, dv), page, lens, prefixes, budgets = CASES[case]
    gen = torch.Generator().manual_seed(case)
    rows, num_slots = allocate(lens, page, gen)
    slots = num_slots + page  # the pool's padding page
    k_buffers = [torch.randn(slots, heads, dk, generator=gen).to(dtype) for _ in range(LAYERS)]
    v_buffers = [torch.randn(slots, heads, dv, generator=gen).to(dtype) for _ in range(LAYERS)]
    keeps = [
        keep_sets(kind, n, p, b, heads, gen)
        for n, p, b in zip(lens, prefixes, budgets, strict=True)
    ]
    k_want, v_want = oracle(k_buffers, v_buffers, rows, prefixes, keeps)

    if rows_as == "req_to_token":
        req_to_token = torch.zeros(len(lens) + 3, 512, dtype=torch.int32)
        for r, row in enumerate(rows):
            req_to_token[r + 2, : len(row)] = row.int()
        index = paged.KVIndex.from_req_to_token(
            req_to_token.to(device), torch.arange(2, len(lens) + 2).to(device), torch.tensor(lens)
        )
    else:
        index = paged.KVIndex.from_rows(
            [r.to(device, torch.int64 if rows_as == "rows_int64" else torch.int32) for r in rows]
        )
    keep, keep_indptr = paged.pack_keep(keeps)
    k_got = [k.to(device) for k in k_buffers]
    v_got = [v.to(device) for v in v_buffers]
    kernels.compact(
        k_got, v_got, index, torch.tensor(prefixes), keep.to(device), keep_indptr,
        check=True, backend="triton",
    )  # fmt: skip
    for got, want in zip(k_got + v_got, k_want + v_want, strict=True):
        assert torch.equal(bits(got.cpu()), bits(want))  # moved bits and untouched sentinels


def test_torch_backend_equals_oracle_on_stacked_layers():
    """The reference also takes views of one stacked tensor, as SGLang's fused K/V halves."""
    gen = torch.Generator().manual_seed(5)
    rows, num_slots = allocate((60, 45), 1, gen)
    fused = torch.randn(LAYERS, 2, num_slots + 1, 2, 64, generator=gen).to(torch.bfloat16)
    k_buffers = [fused[layer, 0] for layer in range(LAYERS)]
    v_buffers = [fused[layer, 1] for layer in range(LAYERS)]
    keeps = [keep_sets("random", 60, 4, 20, 2, gen), keep_sets("tail", 45, 0, 30, 2, gen)]
    k_want, v_want = oracle(k_buffers, v_buffers, rows, (4, 0), keeps)
    keep, keep_indptr = paged.pack_keep(keeps)
    index = paged.KVIndex.from_rows(rows)
    kernels.compact(k_buffers, v_buffers, index, torch.tensor([4, 0]), keep, keep_indptr,
                    backend="torch")  # fmt: skip
    for got, want in zip(k_buffers + v_buffers, k_want + v_want, strict=True):
        assert torch.equal(bits(got), bits(want))


def test_fused_layer_views_through_kernel(device):
    """Non-contiguous layer views (K and V halves of one allocation) in one launch."""
    gen = torch.Generator().manual_seed(6)
    rows, num_slots = allocate((80,), 16, gen)
    fused = torch.randn(LAYERS, 2, num_slots + 16, 2, 64, generator=gen).to(torch.bfloat16)
    keeps = [keep_sets("random", 80, 16, 40, 2, gen)]
    k_want, v_want = oracle([f[0] for f in fused], [f[1] for f in fused], rows, (16,), keeps)
    fused = fused.to(device)
    k_buffers, v_buffers = [f[0] for f in fused], [f[1] for f in fused]
    keep, keep_indptr = paged.pack_keep(keeps)
    index = paged.KVIndex.from_rows([r.to(device) for r in rows])
    kernels.compact(k_buffers, v_buffers, index, torch.tensor([16]), keep.to(device), keep_indptr,
                    backend="triton")  # fmt: skip
    for got, want in zip(k_buffers + v_buffers, k_want + v_want, strict=True):
        assert torch.equal(bits(got.cpu()), bits(want))


@pytest.mark.parametrize(
    "bad", ["below_prefix", "past_end", "unsorted", "duplicate"], ids=lambda b: b
)
def test_check_keep_rejects_broken_contract(bad):
    rows, _ = allocate((50,), 1, torch.Generator().manual_seed(0))
    keep = torch.arange(20, 30).expand(LAYERS, 2, 10).clone()
    if bad == "below_prefix":
        keep[1, 0, 0] = 3
    elif bad == "past_end":
        keep[2, 1, -1] = 50
    elif bad == "unsorted":
        keep[0, 1, 4], keep[0, 1, 5] = keep[0, 1, 5].item(), keep[0, 1, 4].item()
    else:
        keep[0, 0, 3] = keep[0, 0, 2]
    with pytest.raises(ValueError):
        paged.check_keep(paged.KVIndex.from_rows(rows), torch.tensor([10]), keep, paged.indptr(
            torch.tensor([10])))  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", [1, 2, 4])
def test_compact_into_copies_matches_oracle(device, case, backend):
    """Out of place (``dst``): requests with a copy get their kept K/V in fresh slots and
    their own slots untouched (the radix tree keeps them); the others, in the same launch,
    are compacted in place."""
    dtype, heads, (dk, dv), page, lens, prefixes, budgets = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    rows, num_slots = allocate(list(lens) + list(budgets), page, gen)
    rows, copies = rows[: len(lens)], rows[len(lens) :]
    with_copy = [r % 2 == 0 for r in range(len(lens))]
    slots = num_slots + page
    k_buffers = [torch.randn(slots, heads, dk, generator=gen).to(dtype) for _ in range(LAYERS)]
    v_buffers = [torch.randn(slots, heads, dv, generator=gen).to(dtype) for _ in range(LAYERS)]
    keeps = [
        keep_sets("random", n, p, b, heads, gen)
        for n, p, b in zip(lens, prefixes, budgets, strict=True)
    ]
    targets = [
        torch.cat([row[:p], copy[:b]]) if c else row
        for row, copy, p, b, c in zip(rows, copies, prefixes, budgets, with_copy, strict=True)
    ]
    k_want = [k.clone() for k in k_buffers]
    v_want = [v.clone() for v in v_buffers]
    for row, target, p, keep in zip(rows, targets, prefixes, keeps, strict=True):
        to = target[p : p + keep.shape[-1]]
        for layer in range(LAYERS):
            for h in range(heads):
                k_want[layer][to, h] = k_buffers[layer][row[keep[layer, h]], h]
                v_want[layer][to, h] = v_buffers[layer][row[keep[layer, h]], h]
    on = device if backend == "triton" else "cpu"
    index = paged.KVIndex.from_rows([r.to(on) for r in rows])
    dst = paged.KVIndex.from_rows([t.to(on) for t in targets])
    keep, keep_indptr = paged.pack_keep(keeps)
    k_got = [k.to(on) for k in k_buffers]
    v_got = [v.to(on) for v in v_buffers]
    kernels.compact(
        k_got, v_got, index, torch.tensor(prefixes), keep.to(on), keep_indptr, dst,
        check=True, backend=backend,
    )  # fmt: skip
    for got, want in zip(k_got + v_got, k_want + v_want, strict=True):
        assert torch.equal(bits(got.cpu()), bits(want))
