"""Window-score and calibration kernels against their PyTorch references.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which must be set
before triton is first imported); on CUDA when interpreting is off and a GPU is present.
"""

import math

import pytest
import torch

from bacon_sglang import kernels, paged, scoring

WINDOW = 32
LENS = (33, 120, 300)  # prompts just above and far above the window, one batch


@pytest.fixture(scope="module")
def device(kernel_device) -> str:
    """CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), else CUDA."""
    return kernel_device


def allocate(lens, page_size, gen, max_context=512):
    """A fake ``MHATokenToKVPool`` allocation: shuffled whole pages (page 0 reserved), so
    slots are non-contiguous across pages and ``slot % page_size == position % page_size``.
    Returns ``(req_to_token int32 [R + 2, max_context], req_pool_indices, pages per request,
    num_slots)``; row 0 and the last row are unused."""
    need = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(need) + 8
    order = torch.randperm(num_pages - 1, generator=gen) + 1
    req_to_token = torch.zeros(len(lens) + 2, max_context, dtype=torch.int32)
    pages, at = [], 0
    for r, (n, k) in enumerate(zip(lens, need, strict=True)):
        mine = order[at : at + k]
        at += k
        pos = torch.arange(n)
        req_to_token[r + 1, :n] = (mine[pos // page_size] * page_size + pos % page_size).int()
        pages.append(mine)
    return req_to_token, torch.arange(1, len(lens) + 1), pages, num_pages * page_size


def make_batch(lens, num_q_heads, num_kv_heads, head_dim, page_size, layout, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    req_to_token, pool_idx, pages, num_slots = allocate(lens, page_size, gen)
    seq_lens = torch.tensor(lens)
    if layout == "req_to_token":
        index = paged.KVIndex.from_req_to_token(
            req_to_token.to(device), pool_idx.to(device), seq_lens.to(device)
        )
    else:  # FlashInfer CSR: page ids when page_size > 1, slot ids otherwise
        entries = pages if page_size > 1 else [req_to_token[r + 1, :n] for r, n in enumerate(lens)]
        kv_indptr = paged.indptr(torch.tensor([len(e) for e in entries]))
        index = paged.KVIndex.from_csr(
            kv_indptr.to(device),
            torch.cat(entries).int().to(device),
            seq_lens.to(device),
            page_size,
        )
    k_buffer = (2 * torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)).to(dtype)
    q = torch.randn(WINDOW * len(lens), num_q_heads, head_dim, generator=gen).to(dtype)
    q_indptr = torch.arange(len(lens) + 1) * WINDOW
    return q.to(device), q_indptr.to(device), k_buffer.to(device), index


def assert_close(actual, expected, rtol):
    """Relative to each tensor's scale: cancellations (E = relu(Q - B)) make elementwise
    relative errors meaningless near 0."""
    expected = expected.to(actual.device)
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


HEADS = {"mha": (2, 2), "gqa2": (4, 2), "gqa7": (14, 2)}
PAGING = [(1, "req_to_token"), (1, "csr"), (16, "req_to_token"), (16, "csr")]
WINDOW_CASES = [  # every fp32 combination, a spread of bf16 ones
    *((torch.float32, h, d, p, layout) for h in HEADS for d in (64, 128) for p, layout in PAGING),
    (torch.bfloat16, "mha", 128, 1, "csr"),
    (torch.bfloat16, "gqa2", 64, 1, "req_to_token"),
    (torch.bfloat16, "gqa2", 64, 16, "req_to_token"),
    (torch.bfloat16, "gqa7", 128, 16, "csr"),
]


@pytest.mark.parametrize(
    "dtype,heads,head_dim,page_size,layout",
    WINDOW_CASES,
    ids=[f"{h}-{d}-p{p}-{layout}-{str(t)[6:]}" for t, h, d, p, layout in WINDOW_CASES],
)
def test_window_scores_match_reference(device, dtype, heads, head_dim, page_size, layout):
    heads = HEADS[heads]
    q, q_indptr, k_buffer, index = make_batch(
        LENS, *heads, head_dim, page_size, layout, dtype, device, seed=head_dim + page_size
    )
    got = kernels.window_scores(q, q_indptr, k_buffer, index, backend="triton")
    want = kernels.window_scores(q, q_indptr, k_buffer, index, backend="torch")
    assert got.mean.shape == (sum(LENS), heads[1])
    assert torch.equal(got.indptr.cpu(), want.indptr.cpu())
    assert_close(got.mean, want.mean, RTOL[dtype])
    assert_close(got.last, want.last, RTOL[dtype])
    # every window row is a distribution: the column means sum to 1 per request and head
    for seg in paged.segments(got.mean, got.indptr):
        assert_close(seg.sum(0), torch.ones(heads[1]), 1e-5)


@pytest.mark.parametrize("split", [64, 128])
def test_window_scores_key_splits(device, split):
    """Rows spread over several key splits are combined exactly (pass 1 -> pass 2)."""
    from bacon_sglang.kernels.score_kernels import window_scores

    q, q_indptr, k_buffer, index = make_batch(
        LENS, 4, 2, 64, 16, "req_to_token", torch.float32, device, seed=split
    )
    got = window_scores(q, q_indptr, k_buffer, index, block_n=32, split=split)
    want = paged.window_scores(q, q_indptr, k_buffer, index)
    assert_close(got.mean, want.mean, 1e-5)
    assert_close(got.last, want.last, 1e-5)


def test_window_scores_with_lse_and_uneven_windows(device):
    """Windows of different sizes per request, and the one-pass path given the rows' lse."""
    q, _, k_buffer, index = make_batch(LENS, 4, 2, 64, 1, "csr", torch.float32, device, seed=3)
    widths = [1, 17, 32]
    q_indptr = paged.indptr(torch.tensor(widths)).to(device)
    q = q[: sum(widths)]
    lse = []
    for b, (q0, q1) in enumerate(zip(q_indptr[:-1].tolist(), q_indptr[1:].tolist(), strict=True)):
        keys = k_buffer[index.slots(b)].float()  # [n, Hkv, d]
        w, n = q1 - q0, len(keys)
        logits = torch.einsum("ihd,nhd->ihn", q[q0:q1].float(), keys.repeat_interleave(2, 1))
        causal = torch.arange(n) <= torch.arange(w)[:, None] + n - w  # [w, n]
        logits = logits * 64**-0.5
        lse.append(logits.masked_fill(~causal[:, None].to(device), -math.inf).logsumexp(-1))
    lse = torch.cat(lse)  # [sum_w, Hq]
    want = kernels.window_scores(q, q_indptr, k_buffer, index, backend="torch")
    for given in (None, lse):
        got = kernels.window_scores(q, q_indptr, k_buffer, index, lse=given, backend="triton")
        assert_close(got.mean, want.mean, 1e-5)
        assert_close(got.last, want.last, 1e-5)


def layer_inputs(heads, head_dim, dtype, device, layers, seed):
    """Window scores of several layers of one batch (fresh K per layer), page size 16."""
    out = []
    for layer in range(layers):
        q, q_indptr, k_buffer, index = make_batch(
            LENS, *heads, head_dim, 16, "req_to_token", dtype, device, seed=seed + layer
        )
        out.append((q, q_indptr, k_buffer, index))
    return out


@pytest.mark.parametrize("k,first", [(4, 0), ([2, 16, 200], [0, 5, 100])])
def test_calibrate_matches_reference_over_layers(device, k, first):
    """Six layers: Tr over the last 4 layers, per-request ``K`` (one above T), a shared
    prefix outside the top-2K statistics, a request with T = 1."""
    prev_kernel, prev_ref = [], []
    for q, q_indptr, k_buffer, index in layer_inputs((4, 2), 64, torch.float32, device, 6, 7):
        scores = kernels.window_scores(q, q_indptr, k_buffer, index, backend="torch")
        got = kernels.calibrate(scores, q_indptr, k, prev_kernel, first, backend="triton")
        want = kernels.calibrate(scores, q_indptr, k, prev_ref, first, backend="torch")
        for name in ("scores", "evidence", "base", "lam", "rho"):
            assert_close(getattr(got, name), getattr(want, name), 1e-5)
        assert torch.equal(got.indptr.cpu(), want.indptr.cpu())
        prev_kernel.append(got.evidence)
        prev_ref.append(want.evidence)


@pytest.mark.parametrize(
    "heads,head_dim,dtype",
    [
        ("mha", 64, torch.float32),
        ("gqa7", 128, torch.float32),
        ("gqa2", 128, torch.bfloat16),
        ("gqa7", 64, torch.bfloat16),
    ],
    ids=["mha-64-fp32", "gqa7-128-fp32", "gqa2-128-bf16", "gqa7-64-bf16"],
)
def test_kernels_end_to_end_equal_scoring(device, heads, head_dim, dtype):
    """window_scores -> calibrate on the paged pool equals scoring.bacon_scores and
    scoring.snapkv_scores on each request's own copy of its K."""
    heads = HEADS[heads]
    k = 8
    prev_kernel: list[torch.Tensor] = []
    prev_ref: list[list[torch.Tensor]] = [[] for _ in LENS]
    for q, q_indptr, k_buffer, index in layer_inputs(heads, head_dim, dtype, device, 3, 11):
        scores = kernels.window_scores(q, q_indptr, k_buffer, index, backend="triton")
        got = kernels.calibrate(scores, q_indptr, k, prev_kernel, backend="triton")
        prev_kernel.append(got.evidence)
        for b in range(len(LENS)):
            keys = k_buffer[index.slots(b)].transpose(0, 1)
            attn = scoring.window_attention(q[b * WINDOW : (b + 1) * WINDOW].transpose(0, 1), keys)
            want = scoring.bacon_scores(attn, heads[1], k, prev_ref[b])
            prev_ref[b].append(want.evidence)
            rows = slice(int(got.indptr[b]), int(got.indptr[b + 1]))
            assert_close(got.scores[rows].T, want.scores, RTOL[dtype])
            assert_close(got.evidence[rows].T, want.evidence, RTOL[dtype])
            assert_close(got.base[rows].T, scoring.snapkv_scores(attn, heads[1]), RTOL[dtype])


def test_dispatcher(device):
    q, q_indptr, k_buffer, index = make_batch(
        (40,), 2, 2, 64, 1, "req_to_token", torch.float32, device, seed=0
    )
    assert kernels.pick_backend(q) == "triton"
    assert kernels.pick_backend(q, "torch") == "torch"
    with pytest.raises(ValueError):
        kernels.pick_backend(q, "cuda")  # type: ignore[arg-type]
    auto = kernels.window_scores(q, q_indptr, k_buffer, index)
    want = kernels.window_scores(q, q_indptr, k_buffer, index, backend="triton")
    assert torch.equal(auto.mean, want.mean)


@pytest.mark.parametrize("page_size", [1, 16])
def test_index_layouts_name_the_same_slots(page_size):
    gen = torch.Generator().manual_seed(page_size)
    req_to_token, pool_idx, pages, _ = allocate(LENS, page_size, gen)
    lens = torch.tensor(LENS)
    rows = [req_to_token[r + 1, :n] for r, n in enumerate(LENS)]
    entries = pages if page_size > 1 else rows
    layouts = [
        paged.KVIndex.from_req_to_token(req_to_token, pool_idx, lens),
        paged.KVIndex.from_rows(rows),
        paged.KVIndex.from_csr(
            paged.indptr(torch.tensor([len(e) for e in entries])), torch.cat(entries), lens,
            page_size,
        ),
    ]  # fmt: skip
    for b, row in enumerate(rows):
        for index in layouts:
            assert torch.equal(index.slots(b), row.long())
    slots = torch.cat(rows).long()
    assert len(set(slots.tolist())) == len(slots) and int(slots.min()) >= page_size  # page 0 free
    assert torch.equal(slots % page_size, torch.cat([torch.arange(n) for n in LENS]) % page_size)
