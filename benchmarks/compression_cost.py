"""What compression costs one prefill batch: the pass after the last layer (keep-sets of every
layer and request, then the compaction), counted and timed, next to the prefill it follows.

Per policy (SnapKV, BACON), prompt length ``n`` and batch, at Qwen2-VL-7B's shapes (28 layers,
28 query / 4 KV heads, head_dim 128, bf16; window 32, budget 64, compressed into a copy):

- ``pass``: what ``patches/attention.py`` runs (``kernels.served`` keep-sets, one compaction);
- ``per-layer``: the path it replaced, one ``kernels.keep_sets`` call per layer (scores,
  calibration with the earlier layers' evidence, selection), then the same compaction.

Columns: Triton launches and ATen operations (views aside) of one call; on a GPU the CUDA
kernel launches and synchronisations ``torch.profiler`` records, the host time (the call
returns; nothing waits for the GPU), the device time (CUDA events) and the wall time (call to
idle GPU), and the prefill time of a Qwen2-7B-shaped decoder with random weights
(``transformers.Qwen2Model`` built from a config here) over the same tokens, so the pass's
wall time is shown as a share of prefill. On CPU the kernels run interpreted when
``TRITON_INTERPRET=1`` (counts only; times mean nothing then), else the PyTorch references.

    python benchmarks/compression_cost.py                       # GPU: the table above
    python benchmarks/compression_cost.py --shape tiny --n 64 --batch 1 2   # CPU smoke run
    python benchmarks/compression_cost.py --report-only         # the .md again from the JSON
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch
from common import columns_table, machine, results_dir
from torch.utils._python_dispatch import TorchDispatchMode

from bacon_sglang import kernels
from bacon_sglang.kernels import served
from bacon_sglang.paged import KVIndex, pack_keep, pack_layers, to_device

WINDOW, BUDGET = 32, 64
SHAPES = {  # layers, query heads, KV heads, head_dim, hidden, MLP
    "qwen2-vl-7b": dict(layers=28, q_heads=28, kv_heads=4, head_dim=128, hidden=3584,
                        intermediate=18944),
    "tiny": dict(layers=4, q_heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128),
}  # fmt: skip
# Operations that make no kernel launch (tests/test_kernels_keep_sets.py counts the same way)
VIEWS = {
    "aten.alias.default", "aten.expand.default", "aten.permute.default", "aten.select.int",
    "aten.slice.Tensor", "aten.split_with_sizes.default", "aten.transpose.int",
    "aten.unbind.int", "aten.unsqueeze.default", "aten.view.default",
}  # fmt: skip
CUDA_LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"}
CUDA_SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


class Operations(TorchDispatchMode):
    """Counts ATen operations (views aside) outside Triton's own launch plumbing."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import sys

        frame = sys._getframe(1)
        while frame is not None and not frame.f_globals.get("__name__", "").startswith("triton"):
            frame = frame.f_back
        if frame is None and str(func) not in VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_triton_launches(fn) -> int:
    """Triton kernel launches of ``fn()`` (compiled or interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = [0]
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def counting(original):
        def run(self, *args, **kwargs):
            launches[0] += 1
            return original(self, *args, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        fn()
    finally:
        for cls, original in originals.items():
            cls.run = original
    return launches[0]


def make_batch(shape: dict, n: int, batch: int, device: str, gen: torch.Generator):
    """Pool, window queries and rows of ``batch`` prompts of ``n`` tokens at shuffled slots,
    with room for each one's compressed copy."""
    layers, kv, d = shape["layers"], shape["kv_heads"], shape["head_dim"]
    slots = torch.randperm(batch * n, generator=gen) + 1
    copy = torch.arange(batch * BUDGET) + batch * n + 1
    pool = batch * (n + BUDGET) + 1
    k0 = torch.randn(pool, kv, d, generator=gen).to(device, torch.bfloat16)
    keys = [k0] + [k0.clone() for _ in range(layers - 1)]
    values = [k.clone() for k in keys]
    q = torch.randn(layers, batch * WINDOW, shape["q_heads"], d, generator=gen)
    rows = [r.to(device) for r in slots.split(n)]
    copies = [c.to(device) for c in copy.split(BUDGET)]
    return q.to(device, torch.bfloat16), keys, values, rows, copies


def pass_call(policy: str, data, batch: int):
    """The pass as ``patches/attention.compress`` runs it."""
    q, keys, values, rows, copies = data

    def run():
        prefill = served.PrefillBatch(q, [WINDOW] * batch, keys, KVIndex.from_rows(rows),
                                      [BUDGET - WINDOW] * batch, [0] * batch)  # fmt: skip
        keep = served.keep_sets(policy, prefill).keep
        keep, keep_indptr = pack_layers([keep], [[BUDGET] * batch])
        prefix = to_device([0] * batch, q.device)  # as patches/attention.compress
        kernels.compact(keys, values, prefill.index, prefix, keep, keep_indptr,
                        KVIndex.from_rows(copies))  # fmt: skip

    return run


def per_layer_call(policy: str, data, batch: int):
    """The replaced path: one ``kernels.keep_sets`` per layer, then the compaction."""
    q, keys, values, rows, copies = data
    calibrated = policy == "bacon"

    def run():
        index = KVIndex.from_rows(rows)
        q_indptr = kernels.indptr(torch.full((batch,), WINDOW))
        layers, evidence = [], []
        for layer, k_buffer in enumerate(keys):
            keep, e = kernels.keep_sets(
                q[layer], q_indptr, k_buffer, index, [BUDGET - WINDOW] * batch, [0] * batch,
                calibrated=calibrated, prev_evidence=evidence[-4:],
            )  # fmt: skip
            if calibrated:
                evidence.append(torch.cat(e))
            layers.append(torch.stack(keep))
        keep, keep_indptr = pack_keep(list(torch.stack(layers).unbind(1)))
        prefix = to_device([0] * batch, q.device)
        kernels.compact(keys, values, index, prefix, keep, keep_indptr,
                        KVIndex.from_rows(copies))  # fmt: skip

    return run


def cuda_counts(fn) -> dict:
    """CUDA kernel launches and synchronisations of one ``fn()`` (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = collections.Counter(e.name for e in prof.events())
    return {
        "cuda_launches": sum(names[n] for n in CUDA_LAUNCHES),
        "cuda_syncs": max(0, sum(names[n] for n in CUDA_SYNCS) - 1),  # less the one above
    }


def timed(fn, device: str, repeats: int) -> dict:
    """Host, device and wall milliseconds of ``fn()`` (medians; one warm-up call)."""
    fn()
    host, dev, wall = [], [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
            dev.append(start.elapsed_time(end))
        wall.append((time.perf_counter() - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
    med = statistics.median
    return {"host_ms": med(host), "device_ms": med(dev) if dev else None, "wall_ms": med(wall)}


def decoder(shape: dict, device: str):
    """A Qwen2-7B-shaped decoder (``transformers.Qwen2Model``) with random weights, bf16."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["q_heads"],
        num_key_value_heads=shape["kv_heads"], vocab_size=1024, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):
        return Qwen2Model._from_config(config, dtype=torch.bfloat16).eval()


def prefill_ms(model, n: int, batch: int, device: str, repeats: int) -> float:
    """Wall milliseconds of the decoder's forward over ``batch`` prompts of ``n`` tokens."""
    ids = torch.randint(0, 1024, (batch, n), device=device)
    return timed(lambda: model(input_ids=ids, use_cache=False), device, repeats)["wall_ms"]


def run(args: argparse.Namespace) -> list[dict]:
    return [
        row
        for layers in args.layers or [SHAPES[args.shape]["layers"]]
        for row in run_depth({**SHAPES[args.shape], "layers": layers}, args)
    ]


def run_depth(shape: dict, args: argparse.Namespace) -> list[dict]:
    """The rows of one model depth."""
    device, gen, rows = args.device, torch.Generator().manual_seed(0), []
    model = decoder(shape, device) if args.prefill else None
    for n in args.n:
        for batch in args.batch:
            data = make_batch(shape, n, batch, device, gen)
            prefill = (
                prefill_ms(model, n, batch, device, max(1, args.repeats // 2)) if model else None
            )
            for mode, make in (("pass", pass_call), ("per-layer", per_layer_call)):
                for policy in ("snapkv", "bacon"):
                    fn = make(policy, data, batch)
                    with Operations() as ops:
                        launches = count_triton_launches(fn)
                    row = {"mode": mode, "policy": policy, "n": n, "batch": batch,
                           "layers": shape["layers"], "triton_launches": launches,
                           "aten_ops": ops.count, "prefill_ms": prefill}  # fmt: skip
                    if device == "cuda":
                        row |= cuda_counts(fn)
                    if args.repeats:
                        row |= timed(fn, device, args.repeats)
                        row["share"] = row["wall_ms"] / prefill if prefill else None
                    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)  # fmt: skip
                    rows.append(row)
            del data
    return rows


COLUMNS = [  # key, header, format
    ("mode", "path", "{}"), ("policy", "policy", "{}"), ("layers", "layers", "{}"),
    ("n", "n", "{}"), ("batch", "batch", "{}"), ("triton_launches", "Triton launches", "{}"),
    ("aten_ops", "ATen ops", "{}"), ("cuda_launches", "CUDA launches", "{}"),
    ("cuda_syncs", "syncs", "{}"), ("host_ms", "host ms", "{:.2f}"),
    ("device_ms", "device ms", "{:.2f}"), ("wall_ms", "wall ms", "{:.2f}"),
    ("prefill_ms", "prefill ms", "{:.1f}"), ("share", "share of prefill", "{:.1%}"),
]  # fmt: skip


def render(report: dict) -> str:
    """The markdown table of a run's JSON record (``-``: not measured on this device)."""
    head = f"{report['device']}, torch {report['torch']}; shape: {report['shape']}"
    return head + "\n\n" + columns_table(report["rows"], COLUMNS)


def write_report(report: dict, path: Path) -> None:
    """The JSON at ``path`` and its table next to it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(report) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=SHAPES, default="qwen2-vl-7b")
    parser.add_argument("--layers", type=int, nargs="+", help="depths (default: the shape's)")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs (CPU 2, GPU 10; 0: count only)"
    )
    parser.add_argument("--no-prefill", dest="prefill", action="store_false",
                        help="skip the decoder's prefill time")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true",
                        help="no run: rewrite the .md next to --json from it")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.n) <= BUDGET:
        parser.error(f"--n: prompts must be longer than the budget ({BUDGET})")
    cpu = args.device == "cpu"
    path = args.json or results_dir(machine()) / f"compression_cost_{'cpu' if cpu else 'gpu'}.json"
    if args.report_only:
        write_report(json.loads(path.read_text()), path)
        return
    if args.repeats is None:
        args.repeats = 2 if cpu else 10
    with torch.no_grad():  # not set_grad_enabled: a caller's (a test's) autograd stays on
        rows = run(args)
    device = torch.cuda.get_device_name() if not cpu else "cpu"
    shape = {**SHAPES[args.shape], "window": WINDOW, "budget": BUDGET}
    shape["layers"] = args.layers or [shape["layers"]]
    report = {"device": device, "torch": torch.__version__, "shape": shape, "rows": rows}
    write_report(report, path)
    print(render(report))


if __name__ == "__main__":
    main()
