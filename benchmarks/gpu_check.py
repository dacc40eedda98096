"""One command for a CUDA machine: every check this project cannot run without a GPU, one JSON
report.

Steps (``--steps``, all by default):

1. ``kernel-tests``: the Triton kernel tests, compiled for the GPU (``TRITON_INTERPRET=0``).
2. ``kernel-bench``: ``benchmarks/kernel_bench.py`` at Qwen2-VL-7B's shapes, with bandwidth-bound
   ratios: the score kernel's time over one read of K at the device's measured read
   bandwidth, and the compaction's time over a plain copy of the same bytes (1.0 = as fast
   as moving the data once).
3. ``e2e``: ``tests/test_backends_e2e.py`` on a GPU: the compression checks on the
   ``flashinfer``, ``triton`` and ``fa3`` attention backends with CUDA graphs on (decode
   graphs; one ``breakable`` prefill-graph configuration).
4. ``serving``: a short ``benchmarks/serving.py`` run (none / snapkv / bacon) on a
   random-weight Qwen2-VL built here at Qwen2-VL-7B's attention shapes (28 query / 4 KV
   heads, head_dim 128, M-RoPE sections 16/24/24; ``--layers`` layers; nothing downloaded).
5. ``compression-cost``: ``benchmarks/compression_cost.py`` at Qwen2-VL-7B's shapes (at most
   8 minutes): the compression pass's launches, host, device and wall time per prefill batch
   next to a random-weight Qwen2-7B-shaped decoder's prefill of the same tokens.

    python benchmarks/gpu_check.py                      # all steps, report under results/
    python benchmarks/gpu_check.py --steps kernel-tests e2e --out report.json

On a machine without SGLang (torch only, no network), ``bash benchmarks/gpu_kit.sh OUT``
installs a carried kit first and runs the end-to-end, serving and compression-cost checks
with SGLang on a plain-PyTorch ``sgl_kernel`` stand-in (``benchmarks/gpu_kit.py --help``).

Without a CUDA device it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STEPS = ("kernel-tests", "kernel-bench", "e2e", "serving", "compression-cost")
KERNEL_TESTS = (
    "tests/test_kernels_scores.py",
    "tests/test_kernels_keep_sets.py",
    "tests/test_kernels_compaction.py",
    "tests/test_cell_decode.py",
    "tests/test_kernels_cells.py",
)
E2E_TESTS = ("tests/test_backends_e2e.py",)
# Qwen2-VL-7B-Instruct's language model: 28 query / 4 KV heads of 128, hidden 3584, MLP
# 18944, M-RoPE sections (16, 24, 24) (they sum to head_dim / 2).
QWEN2VL_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "mrope_section": (16, 24, 24),
}
NO_CUDA = "gpu_check: no CUDA device found; this check needs a GPU, nothing was run"
KIT_HELP = (
    "GPU machine without SGLang (torch only, no network): bash benchmarks/gpu_kit.sh OUT "
    "installs the kit carried in .gpu-kit/ (built here by python benchmarks/gpu_kit.py build) "
    "and runs the end-to-end, serving and compression-cost checks on a plain-PyTorch "
    "sgl_kernel stand-in; see python benchmarks/gpu_kit.py --help and benchmarks/README.md."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=KIT_HELP)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--out", type=Path, help="report path (default: results/<date>-gpu/)")
    parser.add_argument(
        "--layers", type=int, default=4, help="layers of the 7B-shaped random model"
    )
    parser.add_argument("--model-dir", type=Path, help="where to build it (default: a cache)")
    parser.add_argument(
        "--step-timeout", type=float, default=3600.0, help="seconds per step before it is killed"
    )
    parser.add_argument(
        "--serving-args",
        default="",
        help="more benchmarks/serving.py flags for the serving step, appended (they win), e.g. "
        "the GPU kit's --server-args and a shorter run",
    )
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    return args


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def qwen2vl_7b_attention_spec(layers: int, intermediate_size: int | None = None):
    """A :class:`~bacon_sglang.models.tiny.TinyQwen2VLSpec` with Qwen2-VL-7B's language-model
    shapes and ``layers`` layers (the vision tower stays the tiny one: compression never
    touches it). ``intermediate_size`` overrides the MLP width (tests keep it small)."""
    from bacon_sglang.models.tiny import TinyQwen2VLSpec

    shapes = dict(QWEN2VL_7B, num_hidden_layers=layers)
    if intermediate_size is not None:
        shapes["intermediate_size"] = intermediate_size
    spec = TinyQwen2VLSpec(**shapes)
    spec.validate()
    return spec


def build_7b_shaped_model(
    layers: int, path: Path | None = None, intermediate_size: int | None = None, seed: int = 0
) -> Path:
    """Write (or reuse) the random-weight 7B-shaped Qwen2-VL checkpoint; returns its folder."""
    from bacon_sglang.models.tiny import ensure_tiny_model

    return ensure_tiny_model(path, seed, qwen2vl_7b_attention_spec(layers, intermediate_size))


def run_step(name: str, argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one step's command from the repository root; its status, time and output tail."""
    start = time.perf_counter()
    full_env = dict(os.environ if env is None else env)
    try:
        done = subprocess.run(
            argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status, output = "timeout", (exc.stdout or "") + (exc.stderr or "")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
    seconds = time.perf_counter() - start
    ok = status == 0
    print(f"gpu_check: {name}: {'ok' if ok else f'FAILED ({status})'} in {seconds:.0f} s")
    return {"step": name, "ok": ok, "status": status, "seconds": seconds, "argv": argv,
            "output_tail": output[-6000:]}  # fmt: skip


def pytest_env() -> dict:
    """This environment with the Triton kernels compiled (the tests' conftest defaults to
    the interpreter)."""
    return {**os.environ, "TRITON_INTERPRET": "0"}


def read_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """The device's read bandwidth in GB/s: a sum over ``nbytes`` of bf16 (median time)."""
    import torch

    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    x.sum()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def bound_ratios(rows: list[dict], read_gbps: float) -> list[dict]:
    """Per kernel row of ``benchmarks/kernel_bench.py``: its time over the time of moving its
    bytes once (score kernels: one read of K at ``read_gbps``; compaction: the plain copy
    kernel_bench.py timed). 1.0 is bandwidth-bound; rows without a Triton time are skipped."""
    out = []
    for row in rows:
        if row.get("triton_ms") is None:
            continue
        if row["kernel"] == "compact":
            bound_ms, bound = row.get("copy_ms"), "plain copy of the same bytes"
        elif row["kernel"] in ("window_scores", "window_1pass"):
            bound_ms, bound = row["bytes"] / read_gbps / 1e6, "one read of K"
        else:
            continue
        if not bound_ms:
            continue
        out.append({"kernel": row["kernel"], "n": row["n"], "batch": row["batch"],
                    "triton_ms": row["triton_ms"], "bound_ms": bound_ms, "bound": bound,
                    "time_over_bound": row["triton_ms"] / bound_ms})  # fmt: skip
    return out


def kernel_bench(args: argparse.Namespace, workdir: Path) -> dict:
    path = workdir / "kernels_gpu.json"
    argv = [sys.executable, "benchmarks/kernel_bench.py", "--json", str(path)]
    step = run_step("kernel-bench", argv, args.step_timeout)
    if step["ok"]:
        rows = json.loads(path.read_text())["rows"]
        gbps = read_bandwidth_gbps()
        step.update(rows=rows, read_gbps=gbps, bound_ratios=bound_ratios(rows, gbps))
    return step


def serving(args: argparse.Namespace, workdir: Path) -> dict:
    model = build_7b_shaped_model(args.layers, args.model_dir)
    out = workdir / "serving"
    argv = [sys.executable, "benchmarks/serving.py", "--model-path", str(model), "--out", str(out),
            "--levels", "1", "8", "32", "--rounds", "1", "--rates", "8", "--rate-requests", "32",
            "--prefill-sizes", "448", "896", "--prefill-repeats", "2",
            *shlex.split(args.serving_args)]  # fmt: skip
    step = run_step("serving", argv, args.step_timeout)
    step["model"] = {"path": str(model), "layers": args.layers, **QWEN2VL_7B}
    if step["ok"]:
        result = json.loads((out / "serving.json").read_text())
        step["result"] = {k: result[k] for k in ("sweep", "open_loop", "capacity", "prefill",
                                                   "decode")}  # fmt: skip
    return step


def compression_cost(args: argparse.Namespace, workdir: Path) -> dict:
    path = workdir / "compression_cost_gpu.json"
    argv = [sys.executable, "benchmarks/compression_cost.py", "--json", str(path)]
    step = run_step("compression-cost", argv, min(args.step_timeout, 480.0))
    if step["ok"]:
        step["rows"] = json.loads(path.read_text())["rows"]
    return step


def gpu_machine() -> dict:
    """:func:`common.machine` plus the GPU's compute capability, torch and CUDA versions and
    the time of the run."""
    import torch

    return {
        **machine(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_report(report: dict, path: Path) -> Path:
    """Write ``report`` as indented JSON at ``path`` (folders created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


def default_report_path() -> Path:
    day = datetime.date.today().isoformat()
    return RESULTS / f"{day}-gpu" / "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not cuda_available():
        print(NO_CUDA)
        return 2
    out = args.out or default_report_path()
    workdir = out.parent
    report = {"machine": gpu_machine(), "steps": []}
    start = time.perf_counter()
    for name in args.steps:
        if name == "kernel-tests":
            argv = [sys.executable, "-m", "pytest", "-q", *KERNEL_TESTS]
            step = run_step(name, argv, args.step_timeout, pytest_env())
        elif name == "kernel-bench":
            step = kernel_bench(args, workdir)
        elif name == "e2e":
            argv = [sys.executable, "-m", "pytest", "-q", "-rA", *E2E_TESTS]
            step = run_step(name, argv, args.step_timeout, pytest_env())
        elif name == "compression-cost":
            step = compression_cost(args, workdir)
        else:
            step = serving(args, workdir)
        report["steps"].append(step)
        write_report(report, out)  # partial reports survive a later crash
    report["seconds"] = time.perf_counter() - start
    report["ok"] = all(s["ok"] for s in report["steps"])
    write_report(report, out)
    print(f"gpu_check: {'all ok' if report['ok'] else 'FAILURES'}; wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
