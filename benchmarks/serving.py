"""Serving benchmark, full KV cache vs SnapKV vs BACON on one SGLang build: throughput, latency,
KV slots, capacity, prefill and decode cost; on CPU (2 cores) about 10 minutes.

One SGLang HTTP server per ``--kv-policy`` (same model, same ``--max-total-tokens``, same
flags otherwise, ``--enable-metrics``), driven with multimodal requests: a chat prompt with
one generated image (its own per request, so the radix cache shares only the template text)
and a question, ``N`` output tokens with ``ignore_eos``. Per policy:

1. sweep: closed-loop clients at each ``--levels`` concurrency (``--rounds`` requests per
   client): request throughput, output tokens/s, TTFT and inter-token latency (p50, p99), KV
   slots in use (peak, mean; sampled from ``/v1/loads`` every 50 ms, cross-checked against
   ``/server_info``'s ``bacon_kv``), the most requests decoding at once and queued, retractions
   (``meta_info["num_retractions"]``) and queue time;
   and open-loop runs at each ``--rates`` (Poisson arrivals, ``--rate-requests`` requests):
   the same columns at a given offered load;
2. capacity: a burst of requests sent at once into the fixed pool; the most requests decoding
   at once vs the pool bound (``serving_report.pool_bound``) and the gain over ``none``;
3. prefill overhead: single-request TTFT by prompt length (``--prefill-sizes`` image sizes),
   relative to ``none``;
4. decode latency: time per decode step by batch size (the sweep levels), from SGLang's own
   decode-step sums in ``/v1/loads``.

It prints markdown tables and writes ``serving.json``, ``serving.md``,
``serving_throughput.png`` and ``serving_kv_slots.png`` under
``benchmarks/results/<date>-<device>/``. With no GPU it runs SGLang's CPU engine with the
built-in tiny Qwen2-VL (28 x 28 px per image token: 448 px = 256 tokens) in a few minutes:

    python benchmarks/serving.py                    # CPU defaults
    python benchmarks/serving.py --smoke            # smallest size (the test)
    python benchmarks/serving.py --model-path Qwen/Qwen2-VL-7B-Instruct   # GPU
    python benchmarks/serving.py --report-only      # serving.md and plots again from the JSON

``--workers N [N ...]``: instead of one server per policy, N servers (same flags) behind
sglang-router (``--router-policy``, cache-aware by default), requests sent to the router,
load, KV and cache calls to every worker (numbers summed), once per N: the rows are
labelled ``<policy> xN``. The scale-out table compares them (throughput, TTFT, capacity,
and how the router spread the requests):

    python benchmarks/serving.py --workers 1 2 --policies bacon     # 1 vs 2 workers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import serving_report as report
from common import columns_table, latest_result, machine, results_dir
from serving_client import (
    Sampler,
    Workload,
    chat_prompt,
    kv_memory_of,
    loads,
    run_closed_loop,
    run_open_loop,
)

from bacon_sglang.server import cpu_engine, running_server

MAX_BURST = 512
# (CPU engine + built-in model, GPU) defaults; --smoke overrides on top of them.
DEFAULTS = {
    "image_size": (448, 896),
    "output_tokens": (32, 128),
    "levels": ([1, 8, 32, 64], [1, 8, 32, 64, 128]),
    "rates": ([1.0, 2.0, 4.0], [2.0, 8.0, 32.0]),
    "rate_requests": (24, 256),
    # The built-in model's processor caps images at 896 x 896 px (1024 tokens).
    "prefill_sizes": ([448, 672, 896], [448, 896, 1344, 1792]),
    "capacity_output_tokens": (128, 256),
    "max_total_tokens": (8192, None),
    # The CPU engine's vision attention builds a dense mask over all patches of a prefill
    # batch (quadratic in its number of images): at most 4 images per prefill batch.
    "server_args": ("--prefill-max-requests 4", ""),
    "server_threads": (1, None),
}
SMOKE = {
    "levels": [1, 4],
    "rates": [4.0],
    "rate_requests": 4,
    "rounds": 1,
    "output_tokens": 16,
    "capacity_output_tokens": 16,
    "prefill_sizes": [448],
    "prefill_repeats": 1,
    "max_total_tokens": 1024,
}


@dataclass
class Target:
    """Where a run's requests go (``url``: a server, or the router in front of several)
    and the servers whose load, KV and cache it reads (``workers``)."""

    url: str
    workers: list[str]


@contextlib.contextmanager
def serving(model_path: str, flags: list[str], env: dict, workers: int, args):
    """One server (``workers == 0``), or ``workers`` servers behind sglang-router
    (``--router-policy``, ``--router-args``)."""
    if not workers:
        with running_server(model_path, flags, env=env) as server:
            yield Target(server.base_url, [server.base_url])
        return
    from bacon_sglang.router import running_cluster

    router_args = shlex.split(args.router_args)
    cluster = running_cluster(model_path, workers, flags, args.router_policy, router_args, env=env)
    with cluster as (router, ws):
        yield Target(router.base_url, [w.base_url for w in ws])


def server_env(threads: int | None) -> dict[str, str]:
    """The servers' environment: this one without ``TRITON_INTERPRET``, so the plugin runs
    what it runs in production (Triton on a GPU, its PyTorch path on CPU), and with
    ``OMP_NUM_THREADS=threads`` if given (on a shared CPU, torch's spinning intra-op threads
    make decode steps 10-20x slower than one thread does)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def server_args(policy: str, args: argparse.Namespace) -> list[str]:
    """Flags of one policy's server; everything but ``--kv-policy`` is the same for all."""
    extra = ["--kv-policy", policy, "--kv-budget", args.budget, "--enable-metrics"]
    if args.max_total_tokens:
        extra += ["--max-total-tokens", str(args.max_total_tokens)]
    return extra + shlex.split(args.server_args)


def wait_idle(target: Target, timeout: float = 60.0) -> dict:
    """Wait until no request holds KV (``available + evictable == total``, nothing
    protected, nothing stashed, summed over the workers); return ``bacon_kv`` with
    ``idle_ok`` telling whether that happened."""
    deadline = time.monotonic() + timeout
    while True:
        kv = kv_memory_of(target.workers)
        free = kv.get("available", 0) + kv.get("evictable", 0)
        ok = free == kv.get("total") and not kv.get("protected") and not kv.get("stashed_requests")
        if ok or time.monotonic() > deadline:
            return {**kv, "idle_ok": ok}
        time.sleep(0.5)


def flush_cache(target: Target) -> None:
    """Empty the radix trees between experiments (SGLang refuses while requests run)."""
    for url in target.workers:
        requests.post(url + "/flush_cache", timeout=60)


def warm_up(base_url: str, workload: Workload, sizes: list[int]) -> list:
    """One request per image size, then a small concurrent batch; returns the results."""
    results = [run_closed_loop(base_url, workload.bodies(1, size), 1)[0] for size in sizes]
    return results + run_closed_loop(base_url, workload.bodies(4), 4)


def sweep(target: Target, policy: str, workload: Workload, args) -> list[dict]:
    """Closed-loop runs at every concurrency level (the ``sweep`` table)."""
    rows = []
    for level in args.levels:
        bodies = workload.bodies(max(2, level * args.rounds))
        flush_cache(target)
        before = loads(target.workers)
        with Sampler(target.workers) as sampler:
            results = run_closed_loop(target.url, bodies, level)
        row = report.sweep_row(policy, level, results, sampler, (before, loads(target.workers)))
        rows.append(row)
        print(columns_table([row], report.SWEEP_COLUMNS).splitlines()[-1], flush=True)
    return rows


def open_loop(target: Target, policy: str, workload: Workload, args) -> list[dict]:
    """Poisson arrivals at every ``--rates`` rate (the ``open_loop`` table); the arrival
    times are seeded, the same for every policy."""
    rows = []
    for i, rate in enumerate(args.rates):
        bodies = workload.bodies(args.rate_requests)
        flush_cache(target)
        before = loads(target.workers)
        with Sampler(target.workers) as sampler:
            results = run_open_loop(target.url, bodies, rate, seed=i)
        moments = (before, loads(target.workers))
        rows.append(report.sweep_row(policy, None, results, sampler, moments, rate=rate))
    return rows


def burst_size(pool: int, prompt: int, budget: str, output_tokens: int) -> int:
    """Requests sent at once in the capacity run: 1.25 x the compressed policies' pool bound
    (so they too run out of slots), the same number for every policy, at most ``MAX_BURST``
    (one client thread each; on a large GPU pool, set ``--max-total-tokens``)."""
    b = float(budget)
    kept = b if b >= 1 else b * prompt
    bound = (pool - prompt - output_tokens) // (kept + output_tokens) + 1
    return min(MAX_BURST, math.ceil(1.25 * bound))


def capacity(target: Target, policy: str, workload: Workload, args, pool: int, burst: int):
    """The burst run (``--capacity-output-tokens`` each, long enough that the requests
    admitted first still decode when the last ones arrive); returns the capacity row and the
    sampled timeline."""
    long = Workload(workload.prompt, workload.image_size, args.capacity_output_tokens)
    long.seed = workload.seed
    bodies = long.bodies(burst)
    workload.seed = long.seed
    flush_cache(target)
    with Sampler(target.workers) as sampler:
        results = run_closed_loop(target.url, bodies, burst)
    fp = report.footprint(results, long.output_tokens)
    row = report.capacity_row(policy, pool, fp, results, sampler, args.budget)
    return row, sampler.samples


def prefill_overhead(target: Target, policy: str, workload: Workload, args) -> list[dict]:
    """Single requests (2 output tokens) at each ``--prefill-sizes`` image size, alternating
    with requests that turn compression off (``{"policy": "none"}``) on the same server, so
    the ratio to ``none`` is paired and immune to drift in the machine's load."""
    probe = Workload(workload.prompt, workload.image_size, 2, seed=workload.seed)
    rows = []
    for size in args.prefill_sizes:
        own, ref = [], []
        for _ in range(args.prefill_repeats):
            own += run_closed_loop(target.url, probe.bodies(1, size), 1)
            if not policy.startswith("none"):
                ref += run_closed_loop(target.url, probe.bodies(1, size, {"policy": "none"}), 1)
        rows.append(report.prefill_row(policy, size, own, ref or own))
    workload.seed = probe.seed
    return rows


def run_policy(
    policy: str, args, model_path: str, prompt: str, state: dict, workers: int = 0
) -> dict:
    """Start ``policy``'s server (or ``workers`` servers and the router) and run every
    experiment against it; rows are labelled ``policy`` (or ``<policy> x<workers>``)."""
    workload = Workload(prompt, args.image_size, args.output_tokens, seed=state["seed"])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    env = server_env(args.server_threads)
    flags = server_args(policy, args)
    label = f"{policy} x{workers}" if workers else policy
    with serving(model_path, flags, env, workers, args) as url:
        started = time.perf_counter() - t0
        served_before = [kv_memory_of(w).get("compressed_requests", 0) for w in url.workers]
        warm = warm_up(url.url, workload, sorted({args.image_size, *args.prefill_sizes}))
        if any(r.error for r in warm):
            raise RuntimeError(f"{policy}: warm-up request failed: {warm[0].error}")
        pool = loads(url.workers)["max_total_num_tokens"]
        burst_key = f"burst x{workers}"  # the same burst for every policy, per pool size
        if burst_key not in state:
            prompt_tokens = warm[-1].meta["prompt_tokens"]
            state[burst_key] = args.burst or burst_size(
                pool, prompt_tokens, args.budget, args.capacity_output_tokens
            )
        print(f"== {label}: server up in {started:.0f} s, pool {pool} slots", flush=True)
        rows = sweep(url, label, workload, args)
        rate_rows = open_loop(url, label, workload, args)
        cap, timeline = capacity(url, label, workload, args, pool, state[burst_key])
        print(f"   capacity: {cap['max_running']} decoding at once (bound {cap['pool_bound']})")
        prefill = prefill_overhead(url, label, workload, args)
        idle = wait_idle(url)
        served = [
            kv_memory_of(w).get("compressed_requests", 0) - before
            for w, before in zip(url.workers, served_before, strict=True)
        ]
    state["seed"] = workload.seed
    return {
        "policy": label,
        "kv_policy": policy,
        "workers": workers,
        "router_policy": f"{args.router_policy} {args.router_args}".strip() if workers else None,
        "compressed_per_worker": served,
        "server_args": server_args(policy, args),
        "startup_s": started,
        "seconds": time.perf_counter() - t0,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "pool_tokens": pool,
        "idle_kv": idle,
        "sweep": rows,
        "open_loop": rate_rows,
        "capacity": cap,
        "burst_timeline": timeline,
        "prefill": prefill,
    }


def model_or_tiny(model_path: str | None) -> str:
    """``model_path``, or the built-in tiny model's folder (built on first use)."""
    if model_path is not None:
        return model_path
    from bacon_sglang.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model())


def scale_out_rows(policies: list[dict]) -> list[dict]:
    """The scale-out table: per run (policy, worker count) and concurrency level, the
    throughput and TTFT of the sweep, the capacity run's requests decoding at once, and how
    the router spread the run's compressed requests over the workers."""
    rows = []
    for run in policies:
        if not run.get("workers"):
            continue
        for row in run["sweep"]:
            rows.append({
                **{k: row[k] for k in ("policy", "concurrency", "req_per_s", "out_tok_per_s",
                                       "ttft_p50_ms", "ttft_p99_ms")},
                "workers": run["workers"],
                "router": run["router_policy"],
                "capacity": run["capacity"]["max_running"],
                "capacity_bound": run["capacity"]["pool_bound"],
                "per_worker": "/".join(str(n) for n in run["compressed_per_worker"]),
            })  # fmt: skip
    return rows


def tables(result: dict) -> str:
    """The markdown tables of a run (five, and the scale-out table with ``--workers``)."""
    sections = [
        ("Serving (closed loop)", "sweep", report.SWEEP_COLUMNS),
        ("Serving (open loop, Poisson arrivals)", "open_loop", report.OPEN_LOOP_COLUMNS),
        ("Capacity (burst into the fixed pool)", "capacity", report.CAPACITY_COLUMNS),
        ("Prefill overhead (single request)", "prefill", report.PREFILL_COLUMNS),
        ("Decode step time (server side)", "decode", report.DECODE_COLUMNS),
    ]
    if result.get("scale_out"):
        sections.insert(0, ("Scale-out (workers behind sglang-router)", "scale_out",
                            report.SCALE_OUT_COLUMNS))  # fmt: skip
    return "\n\n".join(
        f"### {title}\n\n" + columns_table(result[key], columns) for title, key, columns in sections
    )


def write(result: dict, out: Path, stem: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and the two plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out, stem)


def write_report(result: dict, out: Path, stem: str = "serving") -> None:
    """``<stem>.md`` and the two plots under ``out``, from the run's JSON record."""
    (out / f"{stem}.md").write_text(tables(result) + "\n")
    report.plot_throughput(result["sweep"], out / f"{stem}_throughput.png")
    timelines = {p["policy"]: p["burst_timeline"] for p in result["policies"]}
    pool = result["policies"][0]["pool_tokens"]
    report.plot_kv_timeline(timelines, pool, out / f"{stem}_kv_slots.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="model (default: built-in tiny)")
    parser.add_argument("--policies", nargs="+", default=["none", "snapkv", "bacon"])
    parser.add_argument("--budget", default="64", help="--kv-budget of the servers")
    parser.add_argument("--image-size", type=int, help="image side in px (CPU 448, GPU 896)")
    parser.add_argument("--output-tokens", type=int, help="tokens per request (CPU 32, GPU 128)")
    parser.add_argument("--levels", type=int, nargs="+", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--rates", type=float, nargs="+", help="open-loop arrival rates, req/s")
    parser.add_argument("--rate-requests", type=int, help="requests per open-loop rate")
    parser.add_argument("--burst", type=int, help="capacity run size (default: 1.25 x bound)")
    parser.add_argument(
        "--capacity-output-tokens", type=int, help="tokens per burst request (CPU 128, GPU 256)"
    )
    parser.add_argument("--prefill-sizes", type=int, nargs="+", help="image sizes for TTFT")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--max-total-tokens", type=int, help="KV pool (CPU 8192, GPU auto)")
    parser.add_argument(
        "--server-args", help="more flags for every server (CPU: --prefill-max-requests 4)"
    )
    parser.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS (CPU 1, GPU unset)")
    parser.add_argument("--question", default="Which colour is the shape in row 3, column 5?")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="run N servers behind sglang-router, per N"
    )
    parser.add_argument(
        "--router-policy", default="cache_aware", help="sglang-router --policy (--workers)"
    )
    parser.add_argument(
        "--router-args",
        default="--balance-abs-threshold 0 --balance-rel-threshold 1.0",
        help="more sglang-router flags (default: balance on any load difference: the "
        "requests' texts are the same, so cache-aware routing alone sends them all to one worker)",
    )
    parser.add_argument("--smoke", action="store_true", help="smallest size (the test)")
    parser.add_argument("--out", type=Path, help="results folder (default: dated)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no run: rewrite serving.md and plots from serving.json in --out (default: newest)",
    )
    args = parser.parse_args(argv)
    gpu = not cpu_engine()
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[gpu])
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        path = args.out / "serving.json" if args.out else latest_result("serving.json")
        result = json.loads(path.read_text())
        write_report(result, path.parent)
        print(tables(result))
        return 0
    start = time.perf_counter()
    model_path = model_or_tiny(args.model_path)
    info = machine()
    print(f"{info}; model {model_path}", flush=True)
    prompt = chat_prompt(model_path, args.question)
    state = {"seed": 0}
    print(columns_table([], report.SWEEP_COLUMNS), flush=True)
    policies = [
        run_policy(p, args, model_path, prompt, state, workers)
        for workers in args.workers or [0]
        for p in args.policies
    ]
    sweep_rows = [row for p in policies for row in p["sweep"]]
    capacity_rows = [p["capacity"] for p in policies]
    report.add_capacity_gains(capacity_rows)
    prefill_rows = sorted((r for p in policies for r in p["prefill"]), key=lambda r: r["image_px"])
    result = {
        "machine": info,
        "model": model_path,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": None,
        "policies": policies,
        "sweep": sweep_rows,
        "open_loop": [row for p in policies for row in p["open_loop"]],
        "capacity": capacity_rows,
        "prefill": prefill_rows,
        "decode": sorted(report.decode_rows(sweep_rows), key=lambda r: r["batch"]),
        "scale_out": scale_out_rows(policies),
    }
    result["seconds"] = time.perf_counter() - start
    out = args.out or results_dir(info)
    stem = "serving_workers" if args.workers else "serving"
    write(result, out, f"{stem}_smoke" if args.smoke and args.out is None else stem)
    print("\n" + tables(result))
    print(f"\n{info['gpu'] or info['cpu']}, {info['cores']} cores; {result['seconds']:.0f} s; "
          f"wrote {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
