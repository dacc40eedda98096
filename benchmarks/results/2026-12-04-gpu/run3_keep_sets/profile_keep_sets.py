"""Device-only: where one layer's keep_sets call spends its time (torch.profiler)."""

import sys
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from bacon_sglang import kernels
from kernels import BUDGET, KV_HEADS, WINDOW, batch_of

torch.set_grad_enabled(False)
dev = torch.device("cuda")
for n, batch in [(4096, 1), (4096, 8)]:
    gen = torch.Generator().manual_seed(0)
    q, q_indptr, k_buffer, index = batch_of(n, batch, dev, torch.bfloat16, gen)
    prev = [torch.rand(batch * (n - WINDOW), KV_HEADS, generator=gen).to(dev)] * 4
    fn = partial(
        kernels.keep_sets,
        q,
        q_indptr,
        k_buffer,
        index,
        [BUDGET - WINDOW] * batch,
        [0] * batch,
        calibrated=True,
        prev_evidence=prev,
    )
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(f"\n=== keep_sets bacon, n={n}, batch={batch}, 10 calls ===")
    print(
        prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60)
    )
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60
        )
    )
