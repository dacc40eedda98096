"""Fault soak on the CPU engine: many clients doing what clients do, then the server must be
whole (on 2 cores: 1 to 12 minutes for 1,000 requests and 6 to 11 for 300 on TP=2, idle to
loaded cores; with --kv-layout cells 12 to 28 minutes for 1,000 on cores shared with other jobs).

    python benchmarks/soak.py                       # 1,000 requests, then 300 on TP=2
    python benchmarks/soak.py --requests 100 --tp 1 # a short one
    python benchmarks/soak.py --kv-layout cells     # the same with cells: soak_cells.json
    python benchmarks/soak.py --report-only         # rewrite soak.md from the JSON

A CPU server with the shipped shapes model, ``--kv-policy bacon --kv-budget 64 --page-size 16
--chunked-prefill-size 128`` and SGLang's forced retraction (``SGLANG_TEST_RETRACT=1``, every
3rd decode step while more than one request runs) gets a seeded mix from a few client threads:
image and text requests, long texts before the image (chunked prefill), per-request
overrides, fuzzed bad overrides and malformed images (each must be a 4xx), parallel sampling
(``n`` > 1), streamed requests, aborts at a random moment (waiting, mid chunked prefill, mid
decode), and greedy control requests whose answers are compared with the same request served
alone before the soak. Bounded in count (``--requests``) and time (``--minutes`` per server).
Half the control requests (80 to 85 tokens, under the default ``--kv-min-prompt``, 96) are
served uncompressed next to compressed requests; the others (about 170 tokens, two prefill
chunks) are compressed: by the server's BACON and by SnapKV.

It reports and checks: no 5xx, the server alive, the control answers equal to their solo
answers, retracted or not (it also reports how many were retracted), the pool whole at
idle (``available + evictable == total``, nothing protected), no request holding stashed
state, no compression failure, and the resident memory of the server's processes after the
first and the last hundred requests.

``--kv-layout cells`` (``soak_cells.json``): the server also gets ``--kv-layout cells`` and
``--kv-head-scores`` (made-up, uneven SparseMM scores, :data:`HEAD_SCORES`, in a temporary
file: the model ships none); the overrides also draw the uneven policies
(``config.RAGGED_POLICIES``, alone and with other keys; on TP=2 those a tensor-parallel
server serves: not AdaKV), and the controls gain one compressed control per uneven policy.
It also checks that no cell is held at idle (``cells_held``, ``cell_slots_held``) and
reports ``cell_fallbacks`` and the compressed requests by policy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import requests
from common import machine, markdown_table, results_dir
from serving import Target, wait_idle
from serving_client import grid_image

from bacon_sglang.config import RAGGED_POLICIES, policy_problem
from bacon_sglang.demo import image_data_url
from bacon_sglang.server import running_server

RETRACT_ENV = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}
FLAGS = [
    "--kv-policy", "bacon", "--kv-budget", "64", "--page-size", "16",
    "--chunked-prefill-size", "128", "--dtype", "float32", "--max-total-tokens", "8192",
    "--enable-metrics",
]  # fmt: skip
# How often each kind of request is drawn (weights).
MIX = {
    "image": 30, "override": 10, "text": 10, "long": 5, "stream": 5, "parallel": 5,
    "abort": 10, "bad_override": 10, "bad_image": 5, "control": 10,
}  # fmt: skip
QUESTIONS = ("Which shape is red?", "Describe the picture.", "Count the circles.", "Blue?")
BAD_OVERRIDES = (
    {"pool_kernel": 4611686018427387905}, {"pool_kernel": 4}, {"budget": -1},
    {"budget": "64"}, {"window": 10**9}, {"window": None}, {"policy": ["bacon"]},
    {"min_prompt": 0.5}, {"prefix_cache": {"x": 1}}, {"kv_bugdet": 64}, "bacon", [1, 2],
)  # fmt: skip
GOOD_OVERRIDES = (
    {"budget": 48}, {"budget": 128, "window": 16}, {"budget": 0.3}, {"pool_kernel": 3},
    {"prefix_cache": "shared"}, {"policy": "snapkv"}, {"policy": "none"}, {"window": 8},
)  # fmt: skip
# With --kv-layout cells the overrides also draw the uneven allocations (served with cells
# only), alone and with other keys; budgets under the default so that the 80 to 85 tokens of
# an image request are compressed (the default --kv-min-prompt is budget + window, 96).
UNEVEN_OVERRIDES = (
    *({"policy": p, "budget": 48} for p in RAGGED_POLICIES),
    {"policy": "bacon-pyramidkv", "window": 8}, {"policy": "adakv", "budget": 0.3},
    {"policy": "bacon-sparsemm", "budget": 40, "prefix_cache": "shared"},
)  # fmt: skip
# SparseMM's head scores for the shapes model ([4 layers][2 KV heads], summing to 1), as
# tests/test_cells_e2e.py's: made up and uneven (the model ships none), written to a temporary
# visual_heads.json for --kv-head-scores.
HEAD_SCORES = [[0.25, 0.05], [0.1, 0.15], [0.05, 0.2], [0.15, 0.05]]
BAD_IMAGES = (
    "data:image/png;base64,not-base64!!",
    "data:image/png;base64," + "iVBORw0KGgo" * 3,
    "data:image/png;base64,",
)


def prompt(question: str, text_before: str = "") -> str:
    """Qwen2-VL's chat template around one image."""
    return (
        f"<|im_start|>user\n{text_before}<|vision_start|><|image_pad|><|vision_end|>"
        f"{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def image_url(seed: int) -> str:
    return image_data_url(grid_image(224, seed))


def generate_body(text: str, image: str | None, max_new: int, override=None, **extra) -> dict:
    sampling = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    if override is not None:
        sampling["custom_params"] = {"kv_compression": override}
    sampling.update(extra.pop("sampling", {}))
    body = {"text": text, "sampling_params": sampling, **extra}
    if image is not None:
        body["image_data"] = image
    return body


WORDS = "one two three four five six seven eight nine ten "
# 80 to 85 tokens, under the default --kv-min-prompt (96): served uncompressed.
CONTROLS = [generate_body(prompt(q), image_url(100 + i), 12) for i, q in enumerate(QUESTIONS)]
# Compressed controls (80 words before the image: about 170 tokens, two prefill chunks): the
# server's policy (BACON), SnapKV and, with cells, each uneven policy.
COMPRESSED_CONTROLS = [
    generate_body(prompt(QUESTIONS[i % len(QUESTIONS)], WORDS * 8), image_url(110 + i), 12, o)
    for i, o in enumerate([None, {"policy": "snapkv"}, *({"policy": p} for p in RAGGED_POLICIES)])
]


def override_of(body: dict):
    """The per-request ``kv_compression`` override of ``body``, or None."""
    return body["sampling_params"].get("custom_params", {}).get("kv_compression")


def policy_of(override) -> str | None:
    return override.get("policy") if isinstance(override, dict) else None


def served(overrides, layout: str, tp: int) -> list:
    """``overrides`` without the uneven ones where the server does not serve them (slots;
    AdaKV on TP > 1)."""
    if layout != "cells":
        return [o for o in overrides if policy_of(o) not in RAGGED_POLICIES]
    return [o for o in overrides if policy_of(o) is None or not policy_problem(policy_of(o), tp)]


def controls(layout: str, tp: int = 1) -> list[dict]:
    """The greedy control requests of a server with ``--kv-layout layout``, ``tp`` ranks."""
    return CONTROLS + [b for b in COMPRESSED_CONTROLS if served([override_of(b)], layout, tp)]


def good_overrides(layout: str, tp: int = 1) -> tuple:
    """The per-request overrides drawn for a server with ``--kv-layout layout``."""
    return tuple(served(GOOD_OVERRIDES + UNEVEN_OVERRIDES, layout, tp))


def uneven(body: dict) -> bool:
    """Whether ``body`` asks for an uneven allocation (its policy in ``RAGGED_POLICIES``)."""
    return policy_of(override_of(body)) in RAGGED_POLICIES


def draw(
    kind: str, rng: random.Random, i: int, layout: str = "slots", tp: int = 1
) -> tuple[dict, float | None, bool]:
    """(body, abort after this many seconds or None, whether a 4xx is expected)."""
    image = image_url(rng.randrange(6))
    question = rng.choice(QUESTIONS)
    max_new = rng.randrange(1, 17)
    text = prompt(question)
    if kind == "abort":
        body = generate_body(
            prompt(question, WORDS * rng.choice([0, 100])), image, 200, rid=f"soak-abort-{i}-x"
        )
        return body, rng.uniform(0.0, 2.0), False
    if kind == "text":
        body = generate_body(f"Tell me about {question}", None, max_new)
    elif kind == "long":
        text = prompt(question, WORDS * rng.randrange(20, 120))
        body = generate_body(text, image, max_new, {"window": rng.choice([16, 32, 64])})
    elif kind == "parallel":
        sampling = {"n": rng.choice([2, 3]), "temperature": 0.7}
        body = generate_body(text, image, max_new, sampling=sampling)
    elif kind == "bad_image":
        body = generate_body(text, rng.choice(BAD_IMAGES), max_new)
    else:
        overrides = {"override": good_overrides(layout, tp), "bad_override": BAD_OVERRIDES}
        override = overrides.get(kind)
        extra = {"stream": True} if kind == "stream" else {}
        body = generate_body(text, image, max_new, override and rng.choice(override), **extra)
    return body, None, kind in ("bad_override", "bad_image")


def send(base_url: str, body: dict) -> tuple[int, dict | list | None]:
    """POST /generate; (status, JSON or the last streamed event)."""
    if body.get("stream"):
        reply = requests.post(base_url + "/generate", json=body, stream=True, timeout=600)
        last = None
        for line in reply.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                last = json.loads(line[6:])
        return reply.status_code, last
    reply = requests.post(base_url + "/generate", json=body, timeout=600)
    try:
        return reply.status_code, reply.json()
    except ValueError:
        return reply.status_code, None


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server's process and its children, MiB."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def soak(
    base_url: str, pid: int, requests_total: int, seconds: float, seed: int,
    layout: str = "slots", tp: int = 1,
) -> dict:  # fmt: skip
    """Run the mix against a running server; the record of one server configuration."""
    control_bodies = controls(layout, tp)
    solo = [send(base_url, body)[1]["output_ids"] for body in control_bodies]
    rng = random.Random(seed)
    kinds = list(MIX)
    plan = [rng.choices(kinds, weights=[MIX[k] for k in kinds])[0] for _ in range(requests_total)]
    lock = threading.Lock()
    outcomes: list[dict] = []
    rss: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    next_index = iter(range(requests_total))

    def one(i: int) -> dict:
        kind = plan[i]
        if kind == "control":
            c = i % len(control_bodies)
            status, reply = send(base_url, control_bodies[c])
            equal = status == 200 and reply["output_ids"] == solo[c]
            retracted = status == 200 and reply["meta_info"].get("num_retractions", 0) > 0
            return {
                "kind": kind, "status": status, "control_equal": equal, "retracted": retracted,
                "uneven": uneven(control_bodies[c]), **compressions(status, reply),
            }  # fmt: skip
        rng = random.Random(seed * 100_003 + i)
        body, abort_after, expect_4xx = draw(kind, rng, i, layout, tp)
        if abort_after is not None:
            timer = threading.Timer(
                abort_after,
                lambda: requests.post(
                    base_url + "/abort_request", json={"rid": body["rid"]}, timeout=60
                ),
            )
            timer.start()
        status, reply = send(base_url, body)
        if abort_after is not None:
            timer.join()
        return {
            "kind": kind, "status": status, "expected_4xx": expect_4xx,
            **compressions(status, reply),
        }  # fmt: skip

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                outcome = one(i)
            except requests.RequestException as exc:  # the server went away
                outcome = {"kind": plan[i], "status": -1, "error": repr(exc)}
            with lock:
                outcomes.append(outcome)
                if len(outcomes) == min(100, requests_total):
                    rss["first_100"] = server_rss_mb(pid)

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    alive = requests.get(base_url + "/health", timeout=60).status_code == 200
    mem = wait_idle(Target(base_url, [base_url]))
    rss["last"] = server_rss_mb(pid)
    statuses = Counter(o["status"] for o in outcomes)
    policies = Counter(p for o in outcomes for p in o.get("policies", ()))
    return {
        "requests": len(outcomes),
        "seconds": round(elapsed, 1),
        "by_kind": dict(Counter(o["kind"] for o in outcomes)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k < 0),
        "unexpected_4xx": sum(
            1 for o in outcomes if 400 <= o["status"] < 500 and not o.get("expected_4xx")
        ),
        "bad_accepted": sum(1 for o in outcomes if o.get("expected_4xx") and o["status"] < 400),
        "alive": alive,
        **control_summary(outcomes, layout),
        **(
            {
                "cells_held": mem.get("cells_held"),
                "cell_slots_held": mem.get("cell_slots_held"),
                "cell_fallbacks": mem.get("cell_fallbacks"),
                "compressed_by_policy": dict(sorted(policies.items())),
            }
            if layout == "cells"
            else {}
        ),
        "pool": {k: mem[k] for k in ("total", "available", "evictable", "protected")},
        "stashed_requests": mem.get("stashed_requests"),
        "failures": mem.get("failures"),
        "compressed_requests": mem.get("compressed_requests"),
        "retraction_reuses": mem.get("retraction_reuses"),
        "rss_mb": rss,
    }


def control_summary(outcomes: list[dict], layout: str) -> dict:
    """The control requests' counts: every one must equal its solo answer, retracted or
    not (``controls_changed``, a problem); how many were compressed, retracted, and (cells)
    sent with an uneven policy."""
    controls_run = [o for o in outcomes if o["kind"] == "control"]
    summary = {
        "controls": len(controls_run),
        "controls_equal": sum(o["control_equal"] for o in controls_run),
        "controls_retracted": sum(o.get("retracted", False) for o in controls_run),
        "controls_changed": sum(1 for o in controls_run if not o["control_equal"]),
        "controls_compressed": sum(bool(o.get("policies")) for o in controls_run),
        "controls_compressed_retracted": sum(
            bool(o.get("policies")) and o.get("retracted", False) for o in controls_run
        ),
    }
    if layout == "cells":
        summary["controls_uneven"] = sum(o.get("uneven", False) for o in controls_run)
    return summary


def compressions(status: int, reply) -> dict:
    """What the replies of one request (``n`` of them with parallel sampling) report:
    ``policies``, the policy of each compressed one."""
    replies = reply if isinstance(reply, list) else [reply]
    metas = [r["meta_info"] for r in replies if isinstance(r, dict) and "meta_info" in r]
    if status != 200 or not metas:
        return {}
    return {"policies": [m["kv_compression"].get("policy") for m in metas
                         if m.get("kv_compression")]}  # fmt: skip


def problems(record: dict) -> list[str]:
    """What a soak record shows wrong (empty when it passed)."""
    out = []
    if record["server_errors"]:
        out.append(f"{record['server_errors']} 5xx or dropped requests")
    if not record["alive"]:
        out.append("server not alive")
    if record["bad_accepted"] or record["unexpected_4xx"]:
        out.append(
            f"{record['bad_accepted']} bad accepted, {record['unexpected_4xx']} good refused"
        )
    if record["controls_changed"]:
        out.append(f"{record['controls_changed']} control answers changed")
    pool = record["pool"]
    if pool["available"] + pool["evictable"] != pool["total"] or pool["protected"]:
        out.append(f"pool not whole at idle: {pool}")
    if record["stashed_requests"]:
        out.append(f"{record['stashed_requests']} requests still stashed")
    if record.get("failures"):
        out.append(f"{record['failures']} compression failures (served uncompressed)")
    if record.get("cells_held") or record.get("cell_slots_held"):
        out.append(
            f"cells held at idle: {record['cells_held']} cells in "
            f"{record['cell_slots_held']} cell slots"
        )
    return out


def run(
    model_path: str, tp: int, requests_total: int, minutes: float, seed: int,
    layout: str = "slots",
) -> dict:  # fmt: skip
    """Start a server (``--tp-size tp``, ``--kv-layout layout``), soak it, stop it; the
    record. With cells the server also gets ``--kv-head-scores``: :data:`HEAD_SCORES`,
    written to a temporary ``visual_heads.json``."""
    flags = [*FLAGS, "--tp-size", str(tp)] if tp > 1 else list(FLAGS)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server_flags = list(flags)
        if layout == "cells":
            scores = Path(tmp) / "visual_heads.json"
            scores.write_text(json.dumps({"scores": HEAD_SCORES}))
            flags += ["--kv-layout", "cells", "--kv-head-scores", "visual_heads.json"]
            server_flags = [*flags[:-1], str(scores)]
        with running_server(model_path, server_flags, env={**os.environ, **RETRACT_ENV}) as server:
            record = soak(
                server.base_url, server.process.pid, requests_total, minutes * 60, seed, layout,
                tp,
            )  # fmt: skip
            record["server_exit_code"] = server.process.poll()
    extra = {"layout": layout, "head_scores": HEAD_SCORES} if layout == "cells" else {}
    return {"tp": tp, "flags": flags, **extra, **record, "problems": problems(record)}


def render(result: dict) -> str:
    """The soak's Markdown table (with ``--kv-layout cells``: what cells add)."""
    cells = any(r.get("layout") == "cells" for r in result["runs"])
    header = (
        "server", "requests", "seconds", "5xx / dropped", "bad inputs refused",
        "controls equal to solo (retracted)", "compressed controls (retracted)",
        "pool whole at idle", "stashed at idle", "RSS MiB (first 100 -> last)",
    )  # fmt: skip
    if cells:
        header += ("cells held at idle", "cell fallbacks")
    rows = []
    for r in result["runs"]:
        bad = r["by_kind"].get("bad_override", 0) + r["by_kind"].get("bad_image", 0)
        pool = r["pool"]
        whole = pool["available"] + pool["evictable"] == pool["total"] and not pool["protected"]
        row = (
            server_name(r),
            r["requests"],
            r["seconds"],
            r["server_errors"],
            f"{bad - r['bad_accepted']} of {bad}",
            f"{r['controls_equal']} of {r['controls']} ({r['controls_retracted']})",
            f"{r.get('controls_compressed', '-')} ({r.get('controls_compressed_retracted', '-')})",
            "yes" if whole else "no",
            r["stashed_requests"],
            f"{r['rss_mb'].get('first_100')} -> {r['rss_mb'].get('last')}",
        )  # fmt: skip
        if cells:
            row += (f"{r['cells_held']} cells, {r['cell_slots_held']} slots", r["cell_fallbacks"])
        rows.append(row)
    lines = [markdown_table(header, rows)]
    for r in result["runs"]:
        verdict = "; ".join(r["problems"]) or "passed"
        lines.append(f"\n{server_name(r)}: {verdict}. Requests by kind: {r['by_kind']}.")
        if r.get("layout") == "cells":
            lines.append(
                f"{r['controls_uneven']} of the {r['controls']} controls were sent with an "
                f"uneven policy. Compressed requests by policy (from their reports): "
                f"{r['compressed_by_policy']}; prefills after a retraction that reused a "
                f"keep-set: {r['retraction_reuses']}."
            )
    return "\n".join(lines)


def server_name(record: dict) -> str:
    return f"TP={record['tp']}" + (", cells" if record.get("layout") == "cells" else "")


def output_name(layout: str) -> str:
    """``soak.json`` (slots) or ``soak_cells.json``."""
    return "soak.json" if layout == "slots" else f"soak_{layout}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="per TP=1 server")
    parser.add_argument("--tp-requests", type=int, default=300, help="per TP=2 server")
    parser.add_argument("--tp", type=int, nargs="+", help="default: 1 2")
    parser.add_argument(
        "--kv-layout", choices=("slots", "cells"), default="slots",
        help="cells: --kv-layout cells, uneven policies drawn too; writes soak_cells.json",
    )  # fmt: skip
    parser.add_argument("--minutes", type=float, default=30.0, help="cap per server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    out = args.out or results_dir(info)
    name = output_name(args.kv_layout)
    if args.report_only:
        result = json.loads((out / name).read_text())
        (out / name).with_suffix(".md").write_text(render(result) + "\n")
        return 0
    tps = args.tp or [1, 2]
    from bacon_sglang.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model())
    count = {tp: args.requests if tp == 1 else args.tp_requests for tp in tps}
    runs = [run(model, tp, count[tp], args.minutes, args.seed, args.kv_layout) for tp in tps]
    result = {"machine": info, "seed": args.seed, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    (out / name).with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))
    return 1 if any(r["problems"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
