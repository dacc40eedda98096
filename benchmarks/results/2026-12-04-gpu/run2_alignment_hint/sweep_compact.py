"""Device-only: compact()'s time against block_j, at a few sizes (7B shapes, 28 layers)."""

import json
import sys
from functools import partial

import torch

sys.path.insert(0, ".")
import importlib

from bacon_sglang import paged

compaction = importlib.import_module("bacon_sglang.kernels.compaction")
sys.path.insert(0, "benchmarks")
from kernels import HEAD_DIM, KV_HEADS, timed  # noqa: E402

torch.set_grad_enabled(False)
dev = torch.device("cuda")
out = []
for n, batch in [(1024, 32), (16384, 1), (16384, 8), (65536, 1)]:
    gen = torch.Generator().manual_seed(0)
    layers = 28
    slots = torch.randperm(batch * n, generator=gen) + 1
    index = paged.KVIndex.from_rows([r.to(dev) for r in slots.split(n)])
    k_pool = [
        torch.randn(batch * n + 1, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        for _ in range(layers)
    ]
    v_pool = [k.clone() for k in k_pool]
    kept = n // 4
    keeps = [
        torch.stack([torch.randperm(n, generator=gen)[:kept] for _ in range(layers * KV_HEADS)])
        .sort(dim=-1)
        .values.reshape(layers, KV_HEADS, kept)
        for _ in range(batch)
    ]
    keep, keep_indptr = paged.pack_keep(keeps)
    prefix = torch.zeros(batch, dtype=torch.long)
    nbytes = 2 * layers * KV_HEADS * batch * kept * 2 * HEAD_DIM * 2
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    copy_ms = timed(partial(torch.Tensor.copy_, torch.empty_like(src), src), dev, 20) * 1e3
    for bj in (16, 32, 64, 128, 256):
        fn = partial(
            compaction.compact, k_pool, v_pool, index, prefix, keep.to(dev), keep_indptr, block_j=bj
        )
        ms = timed(fn, dev, 20) * 1e3
        row = dict(n=n, batch=batch, block_j=bj, ms=ms, gbps=nbytes / ms / 1e6, copy_ms=copy_ms)
        print(row, flush=True)
        out.append(row)
    del k_pool, v_pool
json.dump(out, open(sys.argv[1], "w"), indent=1)
