"""Decode attention over head-granular cells (``kernels/cell_decode.py``, its reference
``bacon_sglang.cells.cell_decode_batch``) against dense attention over the reduced cache: per
(layer, KV head), SDPA over exactly the tokens that head keeps, gathered from the prompt's
slots before any cell is written (design: ``patches/head_granular.md``, section 6 step 4).

A batch mixes compressed rows (shared text or none, 0 to many generated tokens, heads that
keep nothing, fewer keys than splits), dense rows whose table rows hold a previous request's
stale offsets, and SGLang's padding row (``req_pool_idx`` 0, ``seq_len`` 1). On CPU the kernel
runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from bacon_sglang import kernels
from bacon_sglang.cells import CellIndex, pack_cells, slots_needed
from bacon_sglang.kernels.cell_decode import layer_buffers, scratch

LAYERS = 3
SLOTS = 1024
MAX_CONTEXT = 256


class Row(NamedTuple):
    """One request of the batch: ``prompt`` tokens, ``shared`` of them shared text, each
    (layer, head) keeping ``keep[0]..keep[1]`` private ones (``None``: a dense row),
    ``generated`` tokens after the cell slots."""

    prompt: int
    shared: int
    keep: tuple[int, int] | None
    generated: int


PAD = Row(1, 0, None, 0)  # SGLang's padding row: req_pool_idx 0, seq_len 1, slot 0
MIXED = (  # a compressed row with many generated tokens spans several key splits
    Row(60, 5, (0, 30), 150),
    Row(45, 0, None, 0),  # dense, 45 tokens
    Row(40, 0, (1, 20), 0),  # cells only: no shared text, no generated token
    PAD,
    Row(10, 0, (0, 2), 1),  # at most 2 * 3 + 1 keys: fewer than the 8 splits
    Row(3, 0, None, 0),  # dense, fewer tokens than splits
)


class Batch(NamedTuple):
    q: torch.Tensor  # [layers, bs, Hq, d]
    k: list[torch.Tensor]  # per layer [SLOTS, H, d]
    v: list[torch.Tensor]
    index: CellIndex
    want: torch.Tensor  # [layers, bs, Hq, d] float32, dense attention over the kept tokens
    compressed: torch.Tensor  # [bs] bool


def pool(kv_heads, dim, dtype, gen):
    """Per layer one ``[2, SLOTS, H, d]`` allocation, K and V its halves (as SGLang's pool)."""
    kv = [torch.randn(2, SLOTS, kv_heads, dim, generator=gen).to(dtype) for _ in range(LAYERS)]
    return [x[0] for x in kv], [x[1] for x in kv]


def dense(q, k, v, heads):
    """``[Hq, d]`` float32: each KV head's query group attends over its rows ``heads[h]``."""
    group = q.shape[0] // len(heads)
    out = []
    for h, rows in enumerate(heads):
        qh = q[h * group : (h + 1) * group].float()
        out.append(F.scaled_dot_product_attention(qh, k[rows, h].float(), v[rows, h].float()))
    return torch.cat(out)


def take(free, n: int) -> torch.Tensor:
    return torch.tensor([next(free) for _ in range(n)], dtype=torch.long)


def cell_row(row: Row, k, v, free, gen):
    """Compress ``row`` into fresh cell slots (:func:`bacon_sglang.cells.pack_cells`):
    ``(req_to_token row, per layer and head the slots of its kept keys, (S, m), offsets)``;
    the keys are the prompt's own slots, which the cells leave as they were."""
    layers, kv_heads = len(k), k[0].shape[1]
    prompt = take(free, row.prompt)
    keep = [[kept(row, gen) + row.shared for _ in range(kv_heads)] for _ in range(layers)]
    m = slots_needed(sum(len(x) for per in keep for x in per), layers, kv_heads)
    cells, generated = take(free, m), take(free, row.generated)
    keys = [[torch.cat([prompt[: row.shared], prompt[x], generated]) for x in per] for per in keep]
    off = pack_cells(k, v, prompt, keep, cells)
    return torch.cat([prompt[: row.shared], cells, generated]), keys, (row.shared, m), off


def build(rows, kv_heads, group, dim, dtype, seed) -> Batch:
    """The batch ``rows`` on CPU, with table row ``b + 1`` for request ``b``; ``PAD`` (that
    object) takes row 0 and slot 0, as SGLang's padding."""
    gen = torch.Generator().manual_seed(seed)
    k, v = pool(kv_heads, dim, dtype, gen)
    q = torch.randn(LAYERS, len(rows), kv_heads * group, dim, generator=gen).to(dtype)
    free = iter((torch.randperm(SLOTS - 1, generator=gen) + 1).tolist())  # slot 0: padding
    req_to_token = torch.zeros(len(rows) + 1, MAX_CONTEXT, dtype=torch.int32)
    cell_meta = torch.zeros(len(rows) + 1, 2, dtype=torch.int32)
    cell_off = torch.randint(0, 500, (len(rows) + 1, LAYERS * kv_heads + 1), generator=gen)
    cell_off = cell_off.to(torch.int32)  # stale offsets: only rows with m > 0 are read
    want = torch.empty(LAYERS, len(rows), kv_heads * group, dim)
    pools, lens = [], []
    for b, row in enumerate(rows):
        pools.append(0 if row is PAD else b + 1)
        if row.keep is None:
            table = torch.zeros(1, dtype=torch.long) if row is PAD else take(free, row.prompt)
            keys = [[table] * kv_heads] * LAYERS
            cell_meta[pools[-1], 0] = row.prompt // 2  # a stale S: m == 0 says dense
        else:
            table, keys, meta, cell_off[pools[-1]] = cell_row(row, k, v, free, gen)
            cell_meta[pools[-1]] = torch.tensor(meta)
        req_to_token[pools[-1], : len(table)] = table
        lens.append(len(table))
        for layer in range(LAYERS):
            want[layer, b] = dense(q[layer, b], k[layer], v[layer], keys[layer])
    compressed = torch.tensor([row.keep is not None for row in rows])
    index = CellIndex(req_to_token, torch.tensor(pools), torch.tensor(lens), cell_meta, cell_off)
    return Batch(q, k, v, index, want, compressed)


def kept(row: Row, gen) -> torch.Tensor:
    """A sorted random subset of ``row``'s private prompt positions (minus ``shared``)."""
    low, high = row.keep
    n = int(torch.randint(low, high + 1, (1,), generator=gen))
    return torch.randperm(row.prompt - row.shared, generator=gen)[:n].sort().values


def tensors(batch: Batch) -> list[torch.Tensor]:
    return [batch.q, *batch.k, *batch.v, *batch.index, batch.want, batch.compressed]


def to(batch: Batch, device) -> Batch:
    q, *rest = (t.to(device) for t in tensors(batch))
    k, v, index = rest[:LAYERS], rest[LAYERS : 2 * LAYERS], CellIndex(*rest[2 * LAYERS : -2])
    return Batch(q, k, v, index, *rest[-2:])


def decode(batch: Batch, layer: int, o: torch.Tensor, backend: str, **options) -> torch.Tensor:
    kernels.decode_attention(
        batch.q[layer], o, layer, batch.k, batch.v, batch.index, backend=backend, **options
    )
    return o


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize(
    ("group", "kv_heads", "dim", "dtype"),
    [
        (1, 2, 64, torch.float32),
        (2, 2, 128, torch.float32),
        (7, 1, 64, torch.float32),
        (2, 2, 64, torch.bfloat16),
        (7, 2, 128, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cell_decode_equals_dense_attention_over_the_kept_tokens(
    kernel_device, one_thread, group, kv_heads, dim, dtype, backend
):
    batch = build(MIXED, kv_heads, group, dim, dtype, seed=group * 10 + dim)
    device = kernel_device if backend == "triton" else "cpu"
    batch = to(batch, device)
    for layer in range(LAYERS):
        got = decode(batch, layer, torch.empty_like(batch.q[layer]), backend)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.float().cpu(), batch.want[layer].cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_only_cells_leaves_dense_rows_bit_for_bit(kernel_device, one_thread, backend):
    """What the decode hook runs: rows without cells keep what SGLang's decode wrote."""
    device = kernel_device if backend == "triton" else "cpu"
    batch = to(build(MIXED, 2, 2, 64, torch.bfloat16, seed=3), device)
    sglang = torch.randn(batch.q.shape[1:], generator=torch.Generator().manual_seed(0))
    sglang = sglang.to(device, torch.bfloat16)
    got = decode(batch, 1, sglang.clone(), backend, only_cells=True)
    dense_rows = ~batch.compressed
    assert torch.equal(got[dense_rows].view(torch.int16), sglang[dense_rows].view(torch.int16))
    want = batch.want[1, ~dense_rows]
    torch.testing.assert_close(got[~dense_rows].float(), want, rtol=1e-2, atol=1e-2)


def sglang_decode(batch: Batch, layer: int, splits: int = 8) -> torch.Tensor:
    """SGLang's Triton decode (``decode_attention_fwd``) over each row's ``row[0:seq_len]``,
    as the decode forward computes it before the hook: ``[bs, Hq, d]``."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    q = batch.q[layer]
    bs, num_q_heads, dim = q.shape
    index = batch.index
    lens = zip(index.req_pool_indices, index.seq_lens, strict=True)
    rows = [index.req_to_token[r, :n] for r, n in lens]
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=q.device)
    kv_indptr[1:] = index.seq_lens.cumsum(0)
    o = torch.empty_like(q)
    logits = q.new_empty(bs, num_q_heads, splits, dim, dtype=torch.float32)
    lse = q.new_empty(bs, num_q_heads, splits, dtype=torch.float32)
    num_splits = torch.full((bs,), splits, dtype=torch.int32, device=q.device)
    decode_attention_fwd(
        q, batch.k[layer], batch.v[layer], o, kv_indptr, torch.cat(rows), logits, lse,
        num_splits, splits, dim**-0.5, 1.0, 1.0,
    )  # fmt: skip
    return o


@pytest.mark.parametrize("group", [1, 7])  # SGLang's MHA and grouped kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # SGLang's padding head rows: -inf - -inf
def test_the_hooks_order_over_sglangs_decode(kernel_device, one_thread, group):
    """Section 4.4's order: SGLang's decode writes every row, then ``only_cells`` overwrites
    the compressed rows. Dense rows stay SGLang's bit for bit, and computed by this kernel
    they equal SGLang's; compressed rows equal the dense attention over their kept tokens."""
    pytest.importorskip("sglang.kernels.ops.attention.decode_attention")
    batch = to(build(MIXED, 2, group, 64, torch.float32, seed=11), kernel_device)
    sglang = sglang_decode(batch, 2)
    dense_rows, cell_rows = ~batch.compressed, batch.compressed
    ours = decode(batch, 2, torch.empty_like(sglang), "triton")
    tol = 1e-5 if kernels.interpreted() else 1e-2  # SGLang's fp32 tl.dot is TF32 on a GPU
    torch.testing.assert_close(ours[dense_rows], sglang[dense_rows], rtol=tol, atol=tol)
    got = decode(batch, 2, sglang.clone(), "triton", only_cells=True)
    assert torch.equal(got[dense_rows], sglang[dense_rows])
    want = batch.want[2, cell_rows]
    torch.testing.assert_close(got[cell_rows], want, rtol=1e-5, atol=1e-5)


def test_split_count_and_scratch_reuse(kernel_device, one_thread):
    """One split, or more splits than keys: the same result; a larger scratch made once
    serves a smaller batch."""
    batch = to(build(MIXED, 1, 7, 64, torch.float32, seed=5), kernel_device)
    buffers = layer_buffers(batch.k, batch.v)
    for splits in (1, 16):
        work = scratch(len(MIXED) + 3, 7, 64, kernel_device, splits=splits)
        got = decode(batch, 2, torch.empty_like(batch.q[2]), "triton", buffers=buffers, work=work)
        torch.testing.assert_close(got, batch.want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_follows_the_tables():
    """Both launches captured once; new tables, lengths, queries and K/V copied into the
    static tensors; the replay equals an eager call on the new batch (bit for bit) and the
    dense attention over its kept tokens."""
    if kernels.interpreted():
        pytest.skip("needs the compiled kernels (TRITON_INTERPRET=0)")

    shapes = (Row(60, 5, (0, 30), 100), Row(45, 0, None, 0), PAD, Row(40, 0, (1, 20), 3))
    changed = (Row(50, 0, (1, 40), 7), Row(80, 3, (0, 25), 60), PAD, Row(9, 0, None, 0))
    static = to(build(shapes, 4, 7, 128, torch.bfloat16, seed=1), "cuda")
    new = to(build(changed, 4, 7, 128, torch.bfloat16, seed=2), "cuda")
    buffers = layer_buffers(static.k, static.v)
    work = scratch(len(shapes), 28, 128, "cuda")
    o = torch.empty_like(static.q[1])
    options = dict(buffers=buffers, work=work)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode(static, 1, o, "triton", **options)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(static, 1, o, "triton", **options)
    for dst, src in zip(tensors(static), tensors(new), strict=True):
        dst.copy_(src)
    graph.replay()
    eager = decode(new, 1, torch.empty_like(o), "triton")
    assert torch.equal(o, eager)
    torch.testing.assert_close(o.float(), new.want[1], rtol=1e-2, atol=1e-2)


PTX_OF_CELL_DECODE = """
import importlib, json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
c = importlib.import_module("bacon_sglang.kernels.cell_decode")
elem = {"bf16": "*bf16", "fp32": "*fp32"}
out = {}
for dtype, dot_f32 in (("bf16", False), ("fp32", True)):
    ptrs = {"q": elem[dtype], "k": elem[dtype], "v": elem[dtype], "k_layer_off": "*i64",
            "v_layer_off": "*i64", "req_to_token": "*i32", "req_pool_indices": "*i64",
            "seq_lens": "*i64", "cell_meta": "*i32", "cell_off": "*i32", "mid_o": "*fp32",
            "mid_lse": "*fp32", "o": elem[dtype]}
    consts = dict(GROUP=7, NUM_LAYERS=28, NUM_KV_HEADS=4, DIM_K=128, DIM_V=128, BLOCK_H=16,
                  BLOCK_DK=128, BLOCK_DV=128, BLOCK_N=32, NSPLIT=8, ONLY_CELLS=True,
                  DOT_F32=dot_f32, ALIGN=8 if dtype == "bf16" else 4, BLOCK_S=8)
    for fn in (c._stage1, c._stage2):
        scalars = {"qk_scale": "fp32", "layer": "i32"}
        sig = {n: ptrs.get(n, "constexpr" if n in consts else scalars.get(n, "i64"))
               for n in fn.arg_names}
        hints = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n in ptrs or "stride" in n}
        keep = {n: v for n, v in consts.items() if n in fn.arg_names}
        src = ASTSource(fn, sig, keep, hints)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        found = re.findall(r"(?:ld\\.global|cp\\.async)\\.[\\w.]+", ptx)
        out[f"{fn.fn.__name__}_{dtype}"] = sorted(set(found))
print(json.dumps(out))
"""


def test_kernels_compile_for_cuda():
    """Compiled for an H100/H200 (PTX only; no GPU needed): both stages, bf16 and fp32, and
    stage 1 copies K/V rows 16 bytes per instruction (``cp.async.cg``, Triton's pipelined
    loads into shared memory). Without the alignment hint bf16 rows are read one element per
    load (``ld.global.b16``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PTX_OF_CELL_DECODE], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loads = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(loads) == {f"{s}_{d}" for s in ("_stage1", "_stage2") for d in ("bf16", "fp32")}
    for dtype in ("bf16", "fp32"):
        assert "cp.async.cg.shared.global" in loads[f"_stage1_{dtype}"], loads
        assert "ld.global.b16" not in loads[f"_stage1_{dtype}"], loads
