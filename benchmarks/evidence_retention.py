"""Sparse-evidence retention of SnapKV and BACON on synthetic window attention, and the CPU cost
of BACON's score; on CPU (2 cores) about a minute (--quick: seconds).

The synthetic prompts reproduce the motivation of the BACON paper ("Last But Not Least",
EMNLP 2026; the algorithm as this project implements it: ``bacon_sglang/scoring.py``)::

    keys:  [sink][system text] [ image: rows x cols patch grid ] [question ... | window w ]

- every window query attends to an attention sink, a few large salient "objects" in the image
  (smooth 2-D bumps) and a little to everything else: this consensus is what SnapKV keeps;
- a small rectangle of patches (the evidence, e.g. the text a DocVQA answer needs) gets strong
  attention from the last query and only weak attention from the rest of the window; it
  persists across layers with a strength that varies per layer and head;
- the last query also puts equally strong attention on isolated "noise" tokens (no two
  adjacent, none next to the evidence, in the token order or on the patch grid), new ones in
  every layer.

For each method and ``K`` (candidates per KV head, ``bacon_sglang/config.py``; the ``w`` window
tokens come on top) it reports, averaged over layers, KV heads and seeds:

- evidence recall: the share of the evidence tokens kept;
- noise share: the share of the ``K`` kept candidates that are noise spikes (chance level is
  ``spikes / T``, about 4% here);
- window mass: the share of the window's mean attention over the candidates (what SnapKV
  ranks by, before pooling) that the kept candidates hold; what a method gives up of the
  context every window query uses.

It also times ``bacon_scores`` against ``snapkv_scores`` for a 28-layer model with 28 query
and 4 KV heads on CPU (:func:`cost`).

    python benchmarks/evidence_retention.py            # full run, writes benchmarks/results/
    python benchmarks/evidence_retention.py --quick    # a small run (seconds), *_quick.*
    python benchmarks/evidence_retention.py --report-only   # the .md again from the JSON

The JSON records (``retention`` and ``cost`` rows) store ``K`` under the key ``budget``, as the
results written before the names were fixed do; the key stays so that those still render.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import latest_result, machine, markdown_table, results_dir

from bacon_sglang.policies import BACON, RequestState, SnapKV
from bacon_sglang.scoring import (
    bacon_scores,
    last_query_scores,
    snapkv_scores,
    window_attention,
)
from bacon_sglang.selection import select_keep

METHODS = ("snapkv", "bacon-1d", "bacon-2d", "last-query")
KS = (256, 128, 64, 32)


@dataclass(frozen=True)
class Scene:
    """Shape of a synthetic request and strengths of its attention components (logits)."""

    rows: int = 24  # image patch grid
    cols: int = 24
    system: int = 16  # text tokens before the image (token 0 is the sink)
    question: int = 48  # text tokens after the image; the window is its tail
    window: int = 32
    num_layers: int = 12
    num_kv_heads: int = 4
    group: int = 2  # query heads per KV head
    sink: float = 6.0
    objects: int = 3  # salient 2-D bumps every query attends to
    object_gain: float = 2.5
    background: float = 1.0  # std of the smooth per-patch background
    row_noise: float = 0.3  # per (query head, row, key) jitter
    evidence_last: tuple[float, float] = (4.0, 6.0)  # last query's boost on evidence
    evidence_rest: tuple[float, float] = (0.0, 1.0)  # the other window rows' boost
    spikes: int = 24  # isolated noise tokens per layer
    spike_last: tuple[float, float] = (4.0, 6.0)  # last query's boost on a spike: as strong

    @property
    def image_start(self) -> int:
        return self.system

    @property
    def length(self) -> int:
        return self.system + self.rows * self.cols + self.question


@dataclass
class Request:
    """One synthetic request: per-layer window attention and the ground truth."""

    attn: list[torch.Tensor]  # per layer, [Hq, w, n] float32
    evidence: torch.Tensor  # [E] token indices of the evidence region
    spikes: list[torch.Tensor]  # per layer, [spikes] token indices of the noise
    grid: tuple[int, int, int]  # (start, rows, cols) of the image


def _smooth_field(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, cols]`` zero-mean, unit-std, spatially smooth noise."""
    field = torch.randn(1, 1, rows + 8, cols + 8, generator=gen)
    field = F.avg_pool2d(field, 5, stride=1)[0, 0, 2 : rows + 2, 2 : cols + 2]
    return (field - field.mean()) / field.std()


def _uniform(lo_hi: tuple[float, float], shape: tuple[int, ...], gen: torch.Generator):
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _forbid_around(free: torch.Tensor, idx: int, scene: Scene) -> None:
    """Mark token ``idx`` and its neighbours (in the token order and, for a patch, on the
    grid) as taken."""
    free[max(0, idx - 1) : idx + 2] = False
    patch = idx - scene.image_start
    if 0 <= patch < scene.rows * scene.cols:
        y, x = divmod(patch, scene.cols)
        for yy in range(max(0, y - 1), min(scene.rows, y + 2)):
            for xx in range(max(0, x - 1), min(scene.cols, x + 2)):
                free[scene.image_start + yy * scene.cols + xx] = False


def make_request(scene: Scene, seed: int) -> Request:
    """Draw one request's window attention for every layer (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    s, n, w = scene, scene.length, scene.window
    hkv, hq = s.num_kv_heads, s.num_kv_heads * s.group
    start, npatch = s.image_start, s.rows * s.cols
    t = n - w

    # Persistent content: background field and salient objects of the image.
    yy, xx = torch.meshgrid(torch.arange(s.rows), torch.arange(s.cols), indexing="ij")
    image = s.background * _smooth_field(s.rows, s.cols, gen)
    for _ in range(s.objects):
        cy, cx = torch.rand(2, generator=gen) * torch.tensor([s.rows, s.cols])
        radius = 1.5 + 2.0 * torch.rand((), generator=gen)
        image += s.object_gain * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    content = torch.zeros(n)
    content[0] = s.sink
    content[1:start] = 0.5 + 0.5 * torch.randn(start - 1, generator=gen)
    content[start : start + npatch] = image.flatten()
    content[start + npatch :] = 0.5 + 0.5 * torch.randn(s.question, generator=gen)

    # Evidence: a small rectangle of patches, same place in every layer.
    eh, ew = (int(v) for v in torch.randint(2, 5, (2,), generator=gen))
    y0 = int(torch.randint(0, s.rows - eh + 1, (), generator=gen))
    x0 = int(torch.randint(0, s.cols - ew + 1, (), generator=gen))
    evidence = torch.tensor(
        [start + (y0 + dy) * s.cols + x0 + dx for dy in range(eh) for dx in range(ew)]
    )

    # Keys a spike may land on: candidates away from the evidence, the sink and each other.
    allowed = torch.ones(n, dtype=torch.bool)
    allowed[0] = allowed[t:] = False
    for idx in evidence.tolist():
        _forbid_around(allowed, idx, scene)

    causal = torch.arange(n)[None, :] > torch.arange(w)[:, None] + (n - w)  # [w, n]
    attn, spikes = [], []
    for _ in range(s.num_layers):
        free = allowed.clone()
        layer_spikes = []
        for idx in torch.randperm(n, generator=gen).tolist():
            if free[idx]:
                layer_spikes.append(idx)
                _forbid_around(free, idx, scene)
                if len(layer_spikes) == s.spikes:
                    break
        layer_spikes = torch.tensor(sorted(layer_spikes), dtype=torch.long)
        logits = content + 0.5 * s.row_noise * torch.randn(n, generator=gen)  # layer drift
        logits = logits.expand(hq, w, n) + s.row_noise * torch.randn(hq, w, n, generator=gen)
        # Evidence: strong from the last query, weak from the rest; per layer and KV head.
        last = _uniform(s.evidence_last, (hkv,), gen).repeat_interleave(s.group)
        rest = _uniform(s.evidence_rest, (hkv,), gen).repeat_interleave(s.group)
        boost = rest[:, None].expand(hq, w).clone()
        boost[:, -1] = last
        logits[:, :, evidence] += boost[:, :, None]
        # Noise: isolated spikes of the last query only, new in each layer.
        logits[:, -1, layer_spikes] += _uniform(s.spike_last, (hq, len(layer_spikes)), gen)
        attn.append(torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1))
        spikes.append(layer_spikes)
    return Request(attn, evidence, spikes, (start, s.rows, s.cols))


def keep_sets(request: Request, scene: Scene, method: str, k: int) -> list[torch.Tensor]:
    """Per layer, ``[Hkv, K + w]`` kept indices of one method."""
    hkv, n_layers = scene.num_kv_heads, scene.num_layers
    if method == "last-query":
        return [select_keep(last_query_scores(a, hkv), k, scene.window) for a in request.attn]
    policy = {
        "snapkv": SnapKV(),
        "bacon-1d": BACON(),
        "bacon-2d": BACON(coherence_2d=True),
    }[method]
    state = RequestState(image_grids=(request.grid,))
    return [policy.keep(a, hkv, k, i, n_layers, state) for i, a in enumerate(request.attn)]


METRICS = {
    "evidence_recall": "evidence recall",
    "noise_share": "share of K spent on noise",
    "window_mass": "window attention mass kept",
}


def retention(scene: Scene, seeds: list[int], ks=KS, methods=METHODS) -> list[dict]:
    """The :data:`METRICS` per (method, ``K``), averaged over layers, KV heads and seeds."""
    hkv, t = scene.num_kv_heads, scene.length - scene.window
    sums: dict[tuple[str, int], torch.Tensor] = {}
    for seed in seeds:
        request = make_request(scene, seed)
        # [L, Hkv, T]: window attention averaged over rows and each KV head's query group.
        mass = torch.stack(
            [a[:, :, :t].mean(1).reshape(hkv, scene.group, t).mean(1) for a in request.attn]
        )
        mass = mass / mass.sum(-1, keepdim=True)
        for method in methods:
            for k in ks:
                acc = sums.setdefault((method, k), torch.zeros(4, dtype=torch.float64))
                keeps = keep_sets(request, scene, method, k)
                for layer, (keep, spikes) in enumerate(zip(keeps, request.spikes, strict=True)):
                    for head, row in enumerate(keep):
                        kept = row[(row >= 0) & (row < t)]
                        acc[0] += torch.isin(request.evidence, kept).double().mean()
                        acc[1] += torch.isin(spikes, kept).sum() / k
                        acc[2] += mass[layer, head, kept].sum()
                        acc[3] += 1
    return [
        {"method": m, "budget": k, **dict(zip(METRICS, (acc[:3] / acc[3]).tolist(), strict=True))}
        for (m, k), acc in sums.items()
    ]


def cost(
    lengths=(4096, 16384),
    num_layers: int = 28,
    num_kv_heads: int = 4,
    num_q_heads: int = 28,
    window: int = 32,
    candidates: int = 64,
    head_dim: int = 128,
    repeats: int = 15,
    threads: int = 1,
) -> list[dict]:
    """CPU time of one prefill's scoring (all layers): ``bacon_scores`` vs ``snapkv_scores``,
    and the whole keep-set (score, allocation, selection) of ``BACON()`` vs ``SnapKV()``.
    For scale, the time of ``window_attention`` itself (one layer timed, times the layers),
    which any query-aware method pays before scoring.

    The candidates are timed in turn within each repeat and the fastest repeat is reported
    (other processes only ever add time); ``threads`` intra-op threads (1 by default: with a
    shared CPU, more threads mostly add noise).
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for n in lengths:
            gen = torch.Generator().manual_seed(n)
            attn = torch.softmax(torch.randn(num_q_heads, window, n, generator=gen), dim=-1)

            def snap(attn=attn):
                for _ in range(num_layers):
                    snapkv_scores(attn, num_kv_heads)

            def bacon(attn=attn):
                prev: list[torch.Tensor] = []
                for _ in range(num_layers):
                    _, evidence = bacon_scores(attn, num_kv_heads, candidates, prev)
                    prev = [*prev[-3:], evidence]

            def keep_with(policy, attn=attn):
                def run():
                    state = RequestState()
                    for layer in range(num_layers):
                        policy.keep(attn, num_kv_heads, candidates, layer, num_layers, state)

                return run

            fns = {
                "snapkv_scores": snap,
                "bacon_scores": bacon,
                "keep_snapkv": keep_with(SnapKV()),
                "keep_bacon": keep_with(BACON()),
            }
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * min(v) for name, v in samples.items()}
            q = torch.randn(num_q_heads, window, head_dim, generator=gen)
            k = torch.randn(num_kv_heads, n, head_dim, generator=gen)
            one_layer = []
            for _ in range(3):
                start = time.perf_counter()
                window_attention(q, k)
                one_layer.append(time.perf_counter() - start)
            ms["window_attention"] = 1e3 * num_layers * min(one_layer)
            rows.append(
                {
                    "n": n,
                    "layers": num_layers,
                    "kv_heads": num_kv_heads,
                    "q_heads": num_q_heads,
                    "window": window,
                    "budget": candidates,
                    "head_dim": head_dim,
                    "threads": threads,
                    **{f"{name}_ms": v for name, v in ms.items()},
                    "score_ratio": ms["bacon_scores"] / ms["snapkv_scores"],
                    "keep_ratio": ms["keep_bacon"] / ms["keep_snapkv"],
                }
            )
    finally:
        torch.set_num_threads(saved_threads)
    return rows


def retention_table(rows: list[dict], ks=KS, methods=METHODS) -> str:
    """Markdown: one line per method, one column per (metric, ``K``)."""
    by_key = {(r["method"], r["budget"]): r for r in rows}
    lines = []
    for metric, title in METRICS.items():
        rows = [[m, *(f"{by_key[m, k][metric]:.3f}" for k in ks)] for m in methods]
        lines.append(markdown_table([title, *(f"K={k}" for k in ks)], rows))
    return "\n\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    """Markdown: per prompt length, total ms per prefill (all layers) and the ratios."""
    header = (
        "n", "snapkv_scores ms", "bacon_scores ms", "ratio", "SnapKV keep ms", "BACON keep ms",
        "ratio", "window_attention ms",
    )  # fmt: skip
    cells = [
        (
            r["n"],
            f"{r['snapkv_scores_ms']:.1f}",
            f"{r['bacon_scores_ms']:.1f}",
            f"{r['score_ratio']:.2f}",
            f"{r['keep_snapkv_ms']:.1f}",
            f"{r['keep_bacon_ms']:.1f}",
            f"{r['keep_ratio']:.2f}",
            f"{r['window_attention_ms']:.0f}",
        )  # fmt: skip
        for r in rows
    ]
    return markdown_table(header, cells)


def plot(rows: list[dict], path: Path, ks=KS, methods=METHODS) -> bool:
    """Each metric against ``K``, one panel each; False (nothing written) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_key = {(r["method"], r["budget"]): r for r in rows}
    xs = sorted(ks)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (metric, title) in zip(axes, METRICS.items(), strict=True):
        for m in methods:
            ax.plot(xs, [by_key[m, k][metric] for k in xs], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(k) for k in xs])
        ax.set_xlabel("K (candidates per KV head)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(report: dict) -> str:
    """The markdown of a run's JSON record: the retention tables, then the cost table."""
    text = retention_table(report["retention"])
    if report.get("cost"):
        text += (
            "\n\nCPU cost per prefill (all 28 layers; Hq=28, Hkv=4, w=32, K=64, head_dim=128;"
            f" 1 thread; best of 15)\n\n{cost_table(report['cost'])}"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="small scene, 2 seeds, no cost")
    parser.add_argument("--no-cost", action="store_true", help="skip the timing")
    parser.add_argument("--out", type=Path, help="default: results/<date>-<device>/")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no run: rewrite evidence_retention.md from evidence_retention.json in --out",
    )
    args = parser.parse_args()
    if args.out is None:
        done = args.report_only
        args.out = (
            latest_result("evidence_retention.json").parent if done else results_dir(machine())
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "evidence_retention_quick" if args.quick else "evidence_retention"
    json_path = args.out / f"{stem}.json"
    if args.report_only:
        report = json.loads(json_path.read_text())
    else:
        scene = Scene(rows=16, cols=16, num_layers=6, num_kv_heads=2) if args.quick else Scene()
        seeds = list(range(2 if args.quick else args.seeds))
        report = {"scene": asdict(scene), "seeds": seeds}
        report["retention"] = retention(scene, seeds)
        if not (args.quick or args.no_cost):
            report["cost"] = cost()
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"scene: {report['scene']}")
    markdown = render(report)
    print(markdown)
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    print(f"\nwrote {args.out / stem}.md" + ("" if args.report_only else f" and {json_path}"))
    rows = report["retention"]
    png = args.out / f"{stem}.png"
    if plot(rows, png):
        print(f"wrote {png}")
    else:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
