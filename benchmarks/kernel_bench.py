"""Time the paged-KV Triton kernels (``bacon_sglang.kernels``) against their PyTorch references;
on CPU (2 cores) only the references run, in about a minute.

Shapes of Qwen2-VL-7B (28 query heads, 4 KV heads, head_dim 128, 28 layers, bf16), window 32,
prompts of ``n`` tokens in batches of ``batch`` requests at non-contiguous slots. Per kernel
and size it prints time, achieved bandwidth (bytes the operation must move / time) and the
speed-up over the reference, as a table, and writes the same rows as JSON.

- ``window_scores``: bytes = the K of all prompt tokens (read once). Reference: per request,
  gather K, ``scoring.window_attention``, means. ``window_1pass`` (GPU only): the kernel given
  the rows' log-sum-exp, so it reads K once instead of twice.
- ``calibrate``: bytes = the packed column scores read and B, E, V written (fp32).
- ``keepset_bacon`` / ``keepset_snapkv``: one layer's ``kernels.keep_sets`` (scores,
  calibration with 4 earlier layers' evidence, selection of ``BUDGET - WINDOW`` per head), the
  per-layer call the integration made before its one pass per prefill
  (``benchmarks/compression_cost.py`` compares the two); bytes as ``window_scores``.
- ``compact`` (all layers, K and V, keeping ``--keep`` of each private prompt per head):
  bytes = kept bytes read + written; ``copy`` = a plain device copy of as many bytes, the
  bound the kernel is measured against.

On CPU only the references run (Triton kernels need a GPU; the interpreter is for tests):

    python benchmarks/kernel_bench.py                   # CPU: sizes up to --max-tokens
    python benchmarks/kernel_bench.py --n 1024 --batch 1 8
    python benchmarks/kernel_bench.py --report-only     # kernels_<device>.md again from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from common import columns_table, machine, results_dir

from bacon_sglang import kernels, paged

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS, WINDOW, BUDGET = 28, 4, 128, 28, 32, 64


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds of ``fn()`` after one warm-up call: the median on GPU, the minimum on CPU
    (shared CPU machines add large one-off delays)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if device.type == "cuda" else min(times)


def batch_of(n: int, batch: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator):
    """Window queries, one layer's K pool and the index of ``batch`` prompts of ``n`` tokens
    at shuffled slots (slot 0 reserved)."""
    slots = torch.randperm(batch * n, generator=gen) + 1
    index = paged.KVIndex.from_rows([r.to(device) for r in slots.split(n)])
    k_buffer = torch.randn(batch * n + 1, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    q = torch.randn(batch * WINDOW, Q_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    q_indptr = (torch.arange(batch + 1) * WINDOW).to(device)
    return q, q_indptr, k_buffer, index


def time_backends(fn, backends: list[str], device: torch.device, repeats: int) -> dict:
    return {b: timed(partial(fn, backend=b), device, repeats) for b in backends}


def bench_size(n: int, batch: int, args: argparse.Namespace, gen: torch.Generator) -> list[dict]:
    device, dtype = torch.device(args.device), torch.bfloat16
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    q, q_indptr, k_buffer, index = batch_of(n, batch, device, dtype, gen)
    rows = []

    fn = partial(kernels.window_scores, q, q_indptr, k_buffer, index)
    times = time_backends(fn, backends, device, args.repeats)
    rows.append(result("window_scores", n, batch, k_buffer[1:].nbytes, times))
    if "triton" in times:  # one pass, given the rows' log-sum-exp (values do not matter here)
        lse = torch.zeros(q.shape[0], Q_HEADS, device=device)
        fn = partial(kernels.window_scores, q, q_indptr, k_buffer, index, None, lse)
        times = {
            "torch": times["torch"],
            "triton": timed(partial(fn, backend="triton"), device, args.repeats),
        }
        rows.append(result("window_1pass", n, batch, k_buffer[1:].nbytes, times))

    scores = kernels.window_scores(q, q_indptr, k_buffer, index)
    fn = partial(kernels.calibrate, scores, q_indptr, BUDGET - WINDOW)
    times = time_backends(fn, backends, device, args.repeats)
    nbytes = (2 * batch * n + 3 * batch * (n - WINDOW)) * KV_HEADS * 4
    rows.append(result("calibrate", n, batch, nbytes, times))

    # One layer's whole call from the integration (scores, calibration, selection), BACON
    # with the persistence term over 4 earlier layers, and SnapKV.
    prev = [torch.rand(batch * (n - WINDOW), KV_HEADS, generator=gen).to(device)] * 4
    # q_indptr on the CPU, as the integration passes it: the call then reads nothing back.
    for name, calibrated in (("keepset_bacon", True), ("keepset_snapkv", False)):
        fn = partial(
            kernels.keep_sets, q, q_indptr.cpu(), k_buffer, index, [BUDGET - WINDOW] * batch,
            [0] * batch, calibrated=calibrated, prev_evidence=prev if calibrated else (),
        )  # fmt: skip
        times = time_backends(fn, backends, device, args.repeats)
        rows.append(result(name, n, batch, k_buffer[1:].nbytes, times))
    del q, k_buffer, scores

    layers = args.layers
    if 2 * layers * (batch * n + 1) * KV_HEADS * HEAD_DIM * dtype.itemsize > args.max_pool_gb * 1e9:
        return rows
    k_pool = [torch.randn(batch * n + 1, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)]
    k_pool += [k_pool[0].clone() for _ in range(layers - 1)]
    v_pool = [k.clone() for k in k_pool]
    kept = max(1, int(args.keep * (n - WINDOW)))
    keeps = [
        torch.stack([torch.randperm(n, generator=gen)[:kept] for _ in range(layers * KV_HEADS)])
        .sort(dim=-1)
        .values.reshape(layers, KV_HEADS, kept)
        for _ in range(batch)
    ]
    keep, keep_indptr = paged.pack_keep(keeps)
    prefix = torch.zeros(batch, dtype=torch.long)
    fn = partial(kernels.compact, k_pool, v_pool, index, prefix, keep.to(device), keep_indptr)
    times = time_backends(fn, backends, device, args.repeats)
    nbytes = 2 * layers * KV_HEADS * batch * kept * 2 * HEAD_DIM * dtype.itemsize  # K, V
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    times["copy"] = timed(
        partial(torch.Tensor.copy_, torch.empty_like(src), src), device, args.repeats
    )
    rows.append(result("compact", n, batch, nbytes, times))
    return rows


def result(kernel: str, n: int, batch: int, nbytes: int, times: dict[str, float]) -> dict:
    row = {"kernel": kernel, "n": n, "batch": batch, "bytes": nbytes}
    for name, seconds in times.items():
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_gbps"] = nbytes / seconds / 1e9
    best = times.get("triton")
    base = times.get("copy") if kernel == "compact" else times.get("torch")
    row["ratio"] = None if best is None or base is None else base / best
    print(format_row(row), flush=True)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    print(header())
    return [
        row
        for n in args.n
        for batch in args.batch
        if n * batch <= args.max_tokens
        for row in bench_size(n, batch, args, gen)
    ]


COLUMNS = [  # name, width, format
    ("kernel", 14, "{}"),
    ("n", 6, "{}"),
    ("batch", 5, "{}"),
    ("torch_ms", 10, "{:.2f}"),
    ("torch_gbps", 10, "{:.2f}"),
    ("triton_ms", 10, "{:.3f}"),
    ("triton_gbps", 11, "{:.1f}"),
    ("copy_ms", 8, "{:.3f}"),
    ("ratio", 6, "{:.2f}"),
]


def header() -> str:
    return " ".join(
        name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w, _) in enumerate(COLUMNS)
    )


def format_row(row: dict) -> str:
    cells = ["-" if row.get(name) is None else fmt.format(row[name]) for name, _, fmt in COLUMNS]
    return " ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS, strict=True))
    )


MARKDOWN_COLUMNS = [  # name, header, format
    ("kernel", "kernel", "{}"),
    ("n", "n", "{}"),
    ("batch", "batch", "{}"),
    ("torch_ms", "reference ms", "{:.2f}"),
    ("torch_gbps", "reference GB/s", "{:.2f}"),
    ("triton_ms", "Triton ms", "{:.3f}"),
    ("triton_gbps", "Triton GB/s", "{:.1f}"),
    ("copy_ms", "copy ms", "{:.3f}"),
    ("ratio", "speed-up", "{:.2f}"),
]


def render(report: dict) -> str:
    """The markdown table of a run's JSON record (``-``: not run on this device)."""
    head = f"{report['device']}, torch {report['torch']}; shape: {report['shape']}"
    return head + "\n\n" + columns_table(report["rows"], MARKDOWN_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="skip sizes with more tokens in the batch (CPU default 65536)",
    )
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers compacted")
    parser.add_argument("--keep", type=float, default=0.25, help="kept share of each prompt")
    parser.add_argument(
        "--max-pool-gb",
        type=float,
        default=None,
        help="skip compaction above this K+V pool size (CPU 1, GPU 40)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (CPU 5, GPU 20)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no run: rewrite the .md next to --json (default kernels_<device>.json) from it",
    )
    args = parser.parse_args()
    cpu = args.device == "cpu"
    path = args.json or results_dir(machine()) / f"kernels_{'cpu' if cpu else 'gpu'}.json"
    if args.report_only:
        write_report(json.loads(path.read_text()), path)
        return
    args.max_tokens = args.max_tokens or (65536 if cpu else 1 << 30)
    args.max_pool_gb = args.max_pool_gb or (1.0 if cpu else 40.0)
    args.repeats = args.repeats or (5 if cpu else 20)
    with torch.no_grad():
        rows = run(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {
        "device": device,
        "torch": torch.__version__,
        "shape": dict(
            q_heads=Q_HEADS,
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            layers=args.layers,
            window=WINDOW,
            budget=BUDGET,
            keep=args.keep,
            dtype="bfloat16",
        ),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{device}; ratio = torch / triton time (compact: copy / triton); wrote {path}")
    write_report(report, path)


def write_report(report: dict, json_path: Path) -> None:
    """The markdown table next to the JSON (same stem, ``.md``); printed too."""
    markdown = render(report)
    json_path.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
