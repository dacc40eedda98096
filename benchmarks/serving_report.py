"""Rows, tables and plots of ``benchmarks/serving.py``: one function per table.

Every table is a list of dicts (the JSON rows) printed through one column spec, so the
markdown a person reads and the JSON a script reads hold the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from serving_client import RequestResult, Sampler


def pct(values: list[float], q: float, scale: float = 1e3) -> float | None:
    """The ``q``-th percentile of ``values`` times ``scale`` (ms by default); None if empty."""
    return float(np.percentile(values, q)) * scale if values else None


def decode_moments(before: dict, after: dict) -> tuple[int, float | None, float | None]:
    """Decode steps, mean batch size and mean step time (ms) between two ``/v1/loads``
    snapshots (SGLang sums ``[steps, batch, step_us, batch^2, batch*step_us, tokens]``
    over contiguous decode steps)."""
    a = before.get("decode_moments") or [0.0] * 6
    b = after.get("decode_moments") or [0.0] * 6
    d = [y - x for x, y in zip(a, b, strict=True)]
    if d[0] <= 0:
        return 0, None, None
    return int(d[0]), d[1] / d[0], d[2] / d[0] / 1e3


def sweep_row(
    policy: str,
    concurrency: int,
    results: list[RequestResult],
    sampler: Sampler,
    moments: tuple[dict, dict],
    rate: float | None = None,
) -> dict:
    """One policy at one concurrency level (closed loop), or at one Poisson arrival ``rate``
    (open loop; ``concurrency`` None): throughput, latency, KV slots, load."""
    ok = [r for r in results if r.error is None]
    wall = max(r.end for r in results) - min(r.start for r in results)
    used = [s[1] for s in sampler.samples] or [0]
    itl = [x for r in ok for x in r.itl]
    steps, batch, step_ms = decode_moments(*moments)
    return {
        "policy": policy,
        "concurrency": concurrency,
        "rate": rate,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "duration_s": wall,
        "req_per_s": len(ok) / wall,
        "out_tok_per_s": sum(r.output_tokens for r in ok) / wall,
        "ttft_p50_ms": pct([r.ttft for r in ok], 50),
        "ttft_p99_ms": pct([r.ttft for r in ok], 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "tpot_p50_ms": pct([sum(r.itl) / len(r.itl) for r in ok if r.itl], 50),
        "kv_peak": max(used),
        "kv_mean": float(np.mean(used)),
        "kv_peak_server_info": max((s[1] for s in sampler.kv_samples), default=None),
        "max_running": max((s[2] for s in sampler.samples), default=0),
        "max_waiting": max((s[3] for s in sampler.samples), default=0),
        "retractions": sum(int(r.meta.get("num_retractions", 0)) for r in ok),
        "queue_p50_ms": pct([r.meta["queue_time"] for r in ok if "queue_time" in r.meta], 50),
        "queue_p99_ms": pct([r.meta["queue_time"] for r in ok if "queue_time" in r.meta], 99),
        "decode_steps": steps,
        "decode_batch_mean": batch,
        "decode_step_ms": step_ms,
        "samples": len(sampler.samples),
    }


def footprint(results: list[RequestResult], output_tokens: int) -> dict:
    """Per-request KV of a policy's requests: prompt P, shared prefix S (matched in the radix
    tree, or the compressor's ``shared_prefix_tokens``), private slots kept after prefill and
    ``per_request`` = private kept + N output tokens: what one decoding request holds."""
    ok = [r for r in results if r.error is None and r.meta]
    prompt = int(np.median([r.meta["prompt_tokens"] for r in ok]))
    reports = [r.meta["kv_compression"][0] for r in ok if r.meta.get("kv_compression")]
    if reports:
        shared = int(np.median([c["shared_prefix_tokens"] for c in reports]))
        private = int(np.median([c["kept_tokens"] for c in reports])) - shared
    else:
        shared = int(np.median([r.meta.get("cached_tokens", 0) for r in ok]))
        private = prompt - shared
    return {
        "prompt_tokens": prompt,
        "shared_prefix": shared,
        "private_kept": private,
        "output_tokens": output_tokens,
        "per_request": private + output_tokens,
    }


def pool_bound(pool: int, fp: dict) -> int:
    """Requests that can decode at once in a pool of ``pool`` slots: n requests at full
    length hold ``S + n * per_request``, and SGLang admitted the newest one only with room
    for its whole prompt plus all its output (``ignore_eos``), before it was compressed."""
    s, f, p = fp["shared_prefix"], fp["per_request"], fp["prompt_tokens"]
    return max(0, min((pool - s) // f, (pool - p - fp["output_tokens"]) // f + 1))


def capacity_row(
    policy: str, pool: int, fp: dict, results: list[RequestResult], sampler: Sampler, budget: str
) -> dict:
    """The burst run of one policy: measured concurrent decoders vs the pool bound."""
    ok = [r for r in results if r.error is None]
    return {
        "policy": policy,
        "pool_tokens": pool,
        "budget": budget if policy != "none" else "-",
        **fp,
        "burst_requests": len(results),
        "pool_bound": pool_bound(pool, fp),
        "max_running": max((s[2] for s in sampler.samples), default=0),
        "retractions": sum(int(r.meta.get("num_retractions", 0)) for r in ok),
        "max_waiting": max((s[3] for s in sampler.samples), default=0),
        "kv_peak": max((s[1] for s in sampler.samples), default=0),
        "duration_s": max(r.end for r in results) - min(r.start for r in results),
    }


def add_capacity_gains(rows: list[dict]) -> None:
    """Gain over ``none``: measured (ratio of concurrent decoders), from the pool bound, and
    the issue's rule of thumb ``P / (B + S)`` (kept private slots standing for B)."""
    base = next((r for r in rows if r["policy"] == "none"), None)
    for row in rows:
        if base is None or not base["max_running"]:
            row["gain_measured"] = row["gain_bound"] = row["gain_p_over_b"] = None
            continue
        row["gain_measured"] = row["max_running"] / base["max_running"]
        row["gain_bound"] = row["pool_bound"] / max(1, base["pool_bound"])
        row["gain_p_over_b"] = row["prompt_tokens"] / (row["private_kept"] + row["shared_prefix"])


def server_prefill(results: list[RequestResult]) -> list[float]:
    """Seconds from the scheduler's forward entry to prefill finished (vision encoder, prefill
    forward, scoring and compaction; no HTTP, no image decoding) of each request."""
    return [
        r.meta["prefill_finished_time"] - r.meta["forward_entry_time"]
        for r in results
        if r.error is None and "prefill_finished_time" in r.meta and "forward_entry_time" in r.meta
    ]


def prefill_row(
    policy: str, image_size: int, results: list[RequestResult], reference: list[RequestResult]
) -> dict:
    """Single-request prefill at one prompt length; ``reference``: the same server's requests
    with compression turned off, sent alternately (``vs_none`` = the ratio of the medians)."""
    ok = [r for r in results if r.error is None]
    own, ref = pct(server_prefill(ok), 50), pct(server_prefill(reference), 50)
    return {
        "policy": policy,
        "image_px": image_size,
        "prompt_tokens": int(np.median([r.meta["prompt_tokens"] for r in ok])),
        "repeats": len(ok),
        "ttft_p50_ms": pct([r.ttft for r in ok], 50),
        "prefill_p50_ms": own,
        "none_prefill_p50_ms": ref,
        "vs_none": own / ref if own and ref else None,
    }


def add_relative(rows: list[dict], keys: tuple[str, ...], value: str, out: str) -> None:
    """``row[out] = row[value] / value of the 'none' row with the same ``keys``."""
    base = {tuple(r[k] for k in keys): r[value] for r in rows if r["policy"] == "none"}
    for row in rows:
        ref = base.get(tuple(row[k] for k in keys))
        row[out] = row[value] / ref if ref and row[value] is not None else None


def decode_rows(sweep: list[dict]) -> list[dict]:
    """Time per decode step by batch size (each sweep level's server-side decode steps)."""
    rows = [
        {
            "policy": r["policy"],
            "batch": r["concurrency"],
            "batch_mean": r["decode_batch_mean"],
            "steps": r["decode_steps"],
            "step_ms": r["decode_step_ms"],
            "itl_p50_ms": r["itl_p50_ms"],
        }
        for r in sweep
    ]
    add_relative(rows, ("batch",), "step_ms", "vs_none")
    none = {r["batch"]: r["batch_mean"] for r in rows if r["policy"] == "none"}
    for row in rows:  # compare only at the same batch (a full pool caps none's batch)
        ref = none.get(row["batch"])
        if ref is None or row["batch_mean"] is None or abs(row["batch_mean"] - ref) > 0.1 * ref:
            row["vs_none"] = None
    return rows


# name, header, format: one spec per table, shared by the markdown and the test.
SWEEP_COLUMNS = [
    ("policy", "policy", "{}"),
    ("concurrency", "conc", "{}"),
    ("req_per_s", "req/s", "{:.2f}"),
    ("out_tok_per_s", "out tok/s", "{:.0f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.1f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("kv_peak", "KV peak", "{}"),
    ("kv_mean", "KV mean", "{:.0f}"),
    ("max_running", "max decoding", "{}"),
    ("max_waiting", "max queued", "{}"),
    ("retractions", "retracted", "{}"),
    ("queue_p50_ms", "queue p50 ms", "{:.0f}"),
]
OPEN_LOOP_COLUMNS = [("policy", "policy", "{}"), ("rate", "rate req/s", "{:g}")] + SWEEP_COLUMNS[2:]
CAPACITY_COLUMNS = [
    ("policy", "policy", "{}"),
    ("pool_tokens", "pool", "{}"),
    ("budget", "budget", "{}"),
    ("prompt_tokens", "prompt P", "{}"),
    ("shared_prefix", "shared S", "{}"),
    ("per_request", "slots/req", "{}"),
    ("burst_requests", "burst", "{}"),
    ("pool_bound", "bound", "{}"),
    ("max_running", "measured", "{}"),
    ("retractions", "retracted", "{}"),
    ("max_waiting", "max queued", "{}"),
    ("kv_peak", "KV peak", "{}"),
    ("gain_measured", "gain", "{:.2f}"),
    ("gain_bound", "gain bound", "{:.2f}"),
    ("gain_p_over_b", "P/(B+S)", "{:.2f}"),
]
SCALE_OUT_COLUMNS = [
    ("policy", "run", "{}"),
    ("workers", "workers", "{}"),
    ("router", "router", "{}"),
    ("concurrency", "conc", "{}"),
    ("req_per_s", "req/s", "{:.2f}"),
    ("out_tok_per_s", "out tok/s", "{:.0f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("capacity", "capacity (decoding at once)", "{}"),
    ("capacity_bound", "bound", "{}"),
    ("per_worker", "compressed per worker", "{}"),
]
PREFILL_COLUMNS = [
    ("image_px", "image px", "{}"),
    ("prompt_tokens", "prompt", "{}"),
    ("policy", "policy", "{}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("prefill_p50_ms", "server prefill ms", "{:.0f}"),
    ("none_prefill_p50_ms", "same server, off: ms", "{:.0f}"),
    ("vs_none", "vs off", "{:.2f}"),
]
DECODE_COLUMNS = [
    ("batch", "batch", "{}"),
    ("policy", "policy", "{}"),
    ("batch_mean", "mean batch", "{:.1f}"),
    ("steps", "steps", "{}"),
    ("step_ms", "step ms", "{:.2f}"),
    ("vs_none", "vs none", "{:.2f}"),
]


def plot_throughput(sweep: list[dict], path: Path) -> None:
    """Request throughput and output tokens/s vs concurrency, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in sweep):
        rows = [r for r in sweep if r["policy"] == policy]
        x = [r["concurrency"] for r in rows]
        axes[0].plot(x, [r["req_per_s"] for r in rows], marker="o", label=policy)
        axes[1].plot(x, [r["out_tok_per_s"] for r in rows], marker="o", label=policy)
    for ax, label in zip(axes, ("requests / s", "output tokens / s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kv_timeline(timelines: dict[str, list], pool: int, path: Path) -> None:
    """KV slots in use and requests decoding over time during the burst, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for policy, samples in timelines.items():
        t = [s[0] for s in samples]
        axes[0].plot(t, [s[1] for s in samples], label=policy)
        axes[1].plot(t, [s[2] for s in samples], label=policy)
    axes[0].axhline(pool, color="gray", linestyle="--", label="pool")
    axes[0].set_ylabel("KV slots in use")
    axes[1].set_ylabel("requests decoding")
    axes[1].set_xlabel("seconds since the burst was sent")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
