"""Train the tiny Qwen2-VL model on the synthetic sparse-evidence VQA task (CPU, or a GPU
with ``--device cuda``), from the repository root:

    python -m training.train OUT_DIR [--steps N] [--batch B] [--lr LR] [--seed S]

The model directory is first written by :func:`bacon_sglang.models.tiny.write_tiny_model`
(same config keys, tokenizer, processor and chat template as the random tiny model, so SGLang
and transformers load it through the same code paths); training then replaces
``model.safetensors`` with the trained weights, cast to bf16, under the hub's names.

The model is built from the config with transformers' own initialisation (seeded) and trained
with AdamW (linear warm-up, cosine decay), cross-entropy on the answer tokens only (the
answer and its ``<|im_end|>``). Batches are rebuilt from ``(split, index)`` on the fly
(:mod:`bacon_sglang.models.vqa`) by :mod:`bacon_sglang.models.batches`, whose pixels are
patchified exactly as ``Qwen2VLImageProcessor`` does for a 448 x 448 image (no resize), which
is several times faster than the processor (``check_patchify`` compares them).
``--prefetch N`` builds the batches of the next ``N`` steps in ``N`` worker processes (the
same batches: each is a pure function of its step), for a GPU that would otherwise wait on
the CPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from bacon_sglang.models import tiny, vqa
from bacon_sglang.models.batches import (
    SPEC,
    Batch,
    evidence_match,
    greedy_answers,
    make_batch,
    patchify,
)

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"  # optimiser etc. of a checkpoint (``--resume``)


def follow_ups(s: vqa.VQASample, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to ``n`` more ``(question, answer)`` turns about ``s``'s image (training only: one
    image's vision cost buys several supervised answers)."""
    if n <= 0 or s.image is None:
        return []
    every = s.questions or vqa.all_questions(s.objects)
    others = [qa for qa in every if qa[0] != s.question]
    order = np.random.default_rng(seed).permutation(len(others))
    return [others[int(i)] for i in order[:n]]


def ink_labels(s: vqa.VQASample) -> torch.Tensor:
    """The ink probe's target for each of ``s``'s image tokens (row-major cells): the index in
    :data:`vqa.MARK_COLOURS` of a cell printed in colour, -100 (ignored) for black and empty
    cells. ``[rows * columns]`` int64."""
    cols, rows = (side // vqa.CELL for side in s.image.size)
    labels = torch.full((rows * cols,), -100)
    for row, col, _, ink in s.objects:
        if ink in vqa.MARK_COLOURS:
            labels[row * cols + col] = vqa.MARK_COLOURS.index(ink)
    return labels


class CosineProbe(torch.nn.Module):
    """Logits ``scale * cos(token, class weight)``: ``[N, hidden] -> [N, classes]``. Its loss
    falls only as far as the classes' tokens point apart (a linear probe's loss also falls as
    its weights grow, with the tokens barely moved)."""

    def __init__(self, hidden: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, hidden) * 0.02)
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize
        return self.scale * unit(tokens, dim=-1) @ unit(self.weight, dim=-1).T


def check_patchify(model_dir: Path) -> None:
    """Raise if :func:`patchify` differs from the processor's ``pixel_values``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    img = vqa.sample("val", 0).image
    ref = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(patchify(img), ref.float(), atol=1e-4, rtol=0)


def hub_state_dict(model, spec: tiny.TinyQwen2VLSpec = SPEC) -> dict[str, torch.Tensor]:
    """The model's weights under the hub names of :func:`tiny.weight_shapes`, bf16."""
    out = {}
    for name, tensor in model.state_dict().items():
        hub = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[hub] = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    expected = tiny.weight_shapes(spec, model.config.text_config.vocab_size)
    if set(out) != set(expected) or any(tuple(out[k].shape) != v for k, v in expected.items()):
        raise RuntimeError("trained weights do not match the checkpoint layout")
    return out


def evaluate(
    model, tokenizer, split: str, n: int, text_fraction: float, task: str = "shapes"
) -> dict[str, float]:
    """Exact-match accuracy on the first ``n`` samples of ``split``, per task kind."""
    samples = vqa.dataset(split, n, text_fraction=text_fraction, task=task)
    model.eval()
    answers = greedy_answers(model, tokenizer, samples)
    model.train()
    acc: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers, strict=True):
        acc.setdefault(s.kind, []).append(vqa.exact_match(a, s))
        acc.setdefault("all", []).append(vqa.exact_match(a, s))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def progress(step: int, elapsed: float, args: argparse.Namespace) -> float:
    """Share of training done: by steps (``--steps``) or by wall time (``--minutes``), so
    that a run on a busy shared CPU still finishes on time with its whole schedule."""
    if args.minutes:
        return elapsed / (args.minutes * 60)
    return step / args.steps


def lr_at(step: int, done: float, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of ``lr`` at the end
    (``done`` = share of training done)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def small_grid(
    grids: tuple[int | tuple[int, int], ...], step: int, done: float
) -> int | tuple[int, int]:
    """The grid of a small-grid step: one grid per step (no padding to the largest), cycling
    through the first ``k`` of ``grids``, ``k`` growing from 1 to all of them as the share
    ``done`` of the small-grid phase grows (the easiest images first)."""
    k = min(len(grids), 1 + int(done * len(grids)))
    return grids[step % k]


def parse_grids(value: str) -> tuple[int | tuple[int, int], ...]:
    """``"1x5,2x5,10"`` -> ``((1, 5), (2, 5), 10)``: the ``--small-grids`` list."""
    grids: list[int | tuple[int, int]] = []
    for item in value.split(","):
        rows, _, cols = item.partition("x")
        grids.append((int(rows), int(cols)) if cols else int(rows))
    return tuple(grids)


def spec_of(args: argparse.Namespace) -> tiny.TinyQwen2VLSpec:
    """The model settings of a run: :data:`SPEC` with ``--layers`` decoder layers."""
    return dataclasses.replace(SPEC, num_hidden_layers=args.layers)


def step_plan(step: int, done: float, args: argparse.Namespace) -> tuple[bool, object, int]:
    """``(small, grid, batch size)`` of step ``step`` with the share ``done`` of training done."""
    small = done < args.small_fraction
    grid = small_grid(args.small_grids, step, done / args.small_fraction) if small else vqa.GRID
    return small, grid, args.small_batch if small else args.batch


def training_batch(
    tokenizer, args: argparse.Namespace, seen: int, batch: int, grid, done: float
) -> tuple[Batch, Tensor | None]:
    """The batch of train-split samples ``[seen, seen + batch)`` (with their follow-up turns)
    and, with ``--ink-loss``, the ink probe's labels of their image tokens."""
    samples = vqa.dataset(
        "train",
        batch,
        start=seen,
        text_fraction=args.text_fraction,
        grids=(grid,),
        distinct_fraction=args.distinct_fraction,
        task=args.task,
        max_marks=1 if done < args.single_mark_fraction else None,
        include=args.include,
        include_fraction=args.include_fraction,
    )
    turns = [follow_ups(s, args.follow_ups, seen + j) for j, s in enumerate(samples)]
    ink = None
    if args.ink_loss:
        ink = torch.cat([ink_labels(s) for s in samples if s.image is not None])
    return make_batch(tokenizer, samples, turns=turns), ink


_WORKER: dict = {}


def _worker_init(model_dir: str, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    _WORKER.update(tokenizer=AutoTokenizer.from_pretrained(model_dir), args=args)


def _worker_batch(seen: int, batch: int, grid, done: float) -> tuple[Batch, Tensor | None]:
    return training_batch(_WORKER["tokenizer"], _WORKER["args"], seen, batch, grid, done)


class Prefetcher:
    """Builds the batches of the next ``n`` steps of a ``--steps`` run in ``n`` processes."""

    def __init__(self, n: int, model_dir: Path, args: argparse.Namespace, step: int, seen: int):
        import multiprocessing

        self.args, self.step, self.seen = args, step, seen  # the next step to submit
        self.pending: collections.deque[tuple[int, Future]] = collections.deque()
        self.pool = ProcessPoolExecutor(
            n, multiprocessing.get_context("spawn"), _worker_init, (str(model_dir), args)
        )
        self.n = n

    def get(self, step: int) -> tuple[Batch, Tensor | None]:
        """The batch of ``step`` (steps are taken in order)."""
        last = min(self.args.steps, self.args.until or self.args.steps)
        while len(self.pending) < self.n and self.step < last:
            done = progress(self.step, 0.0, self.args)  # by steps: --prefetch needs --steps
            _, grid, batch = step_plan(self.step, done, self.args)
            future = self.pool.submit(_worker_batch, self.seen, batch, grid, done)
            self.pending.append((self.step, future))
            self.step, self.seen = self.step + 1, self.seen + batch
        queued, future = self.pending.popleft()
        if queued != step:
            raise RuntimeError(f"prefetched step {queued}, asked for {step}")
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def train(args: argparse.Namespace) -> dict:
    """Build, train and save the model into ``args.out_dir``; returns the training record.

    With ``--resume DIR`` (a directory this function saved, which holds ``trainer_state.pt``)
    the weights, optimiser, step, data position, elapsed time and history continue from there,
    so a stopped run goes on with the same schedule."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = spec_of(args)
    out = Path(args.out_dir)
    work = Path(tempfile.mkdtemp(prefix="tiny-vqa-"))
    tiny.write_tiny_model(work / "model", seed=args.seed, spec=spec)
    check_patchify(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    config = AutoConfig.from_pretrained(work / "model")
    model = Qwen2VLForConditionalGeneration._from_config(
        config, dtype=torch.float32, attn_implementation="sdpa"
    )
    init = args.resume or args.init
    if init:
        from safetensors.torch import load_file

        model.load_state_dict(_from_hub(load_file(Path(init) / "model.safetensors")))
    device = torch.device(args.device)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}]
    # --ink-loss: a probe on the vision tower's output tokens must tell each coloured cell's
    # ink; training only (never saved with the model).
    probe, vision = None, {}
    if args.ink_loss and args.ink_probe_scale:
        probe = CosineProbe(spec.hidden_size, len(vqa.MARK_COLOURS), args.ink_probe_scale)
    elif args.ink_loss:
        probe = torch.nn.Linear(spec.hidden_size, len(vqa.MARK_COLOURS))
        torch.nn.init.zeros_(probe.weight)  # no gradient into the tower until the probe reads
    if probe is not None:
        probe.to(device)
        model.model.visual.merger.register_forward_hook(
            lambda module, inputs, output: vision.__setitem__("tokens", output)
        )
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    probe_group = {"params": list(probe.parameters()), "weight_decay": 0.0} if probe else None
    is_id, a_id = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" is", " a"))
    digits = None
    if args.task == "doc":
        digits = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
        digits = digits.to(device)
    history = []
    smooth = match = None
    seen = args.offset  # next train-split index
    small_steps = None  # the step at which the full-grid phase began
    step, already, stages = 0, 0.0, []
    if args.resume:
        state = torch.load(
            Path(args.resume) / TRAINER_STATE, weights_only=False, map_location="cpu"
        )
        model.load_state_dict(state["model"])
        if probe is not None and "ink_probe" in state:
            probe.load_state_dict(state["ink_probe"])
            opt.add_param_group(probe_group)
            probe_group = None
        elif "ink_probe" in state:
            raise SystemExit(f"{args.resume} was trained with --ink-loss: resume it with it")
        opt.load_state_dict(state["optimizer"])
        step, seen, already = state["step"], state["seen"], state["seconds"]
        history, small_steps = state["history"], state["small_steps"]
        torch.set_rng_state(state["torch_rng"])
        stages = state.get("stages", [])
        logger.info("resumed %s at step %d (%.0f s done)", args.resume, step, already)
    if probe_group is not None:  # a new probe (also one added on resume): a fresh AdamW group
        opt.add_param_group(probe_group)
    stages.append({"from_step": step, "command": "python -m training.train " + " ".join(args.argv)})
    start = time.perf_counter() - already
    last_save = time.perf_counter()
    prefetch = (
        Prefetcher(args.prefetch, work / "model", args, step, seen) if args.prefetch else None
    )

    def save() -> dict:
        args.small_steps, args.samples, args.stages = small_steps, seen - args.offset, stages
        state = {
            "optimizer": opt.state_dict(),
            "step": step + 1,
            "seen": seen,
            "seconds": time.perf_counter() - start,
            "history": history,
            "small_steps": small_steps,
            "torch_rng": torch.get_rng_state(),
            "stages": stages,
        }
        if probe is not None:
            state["ink_probe"] = probe.state_dict()
        return _save(model, work, out, args, step + 1, state["seconds"], history, spec, state)

    while True:
        elapsed = time.perf_counter() - start
        done = progress(step, elapsed, args)
        if done >= 1.0 or step == args.until:
            break
        small, grid, batch = step_plan(step, done, args)
        if not small and small_steps is None:
            small_steps = step
            logger.info("step %d: %d x %d grids from now on", step, vqa.GRID, vqa.GRID)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, done, args.lr, args.warmup)
        if prefetch is not None:
            b, ink_target = prefetch.get(step)
        else:
            b, ink_target = training_batch(tokenizer, args, seen, batch, grid, done)
        seen += batch
        b = b.to(device)
        result = model(**b.inputs(), labels=b.labels)
        loss = result.loss
        ink = None
        if probe is not None:
            ink_target = ink_target.to(device)
            ink = torch.nn.functional.cross_entropy(probe(vision["tokens"]), ink_target)
            loss = loss + args.ink_loss * ink
        hit = evidence_match(result.logits.detach(), b.labels, is_id, a_id, digits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        match = hit if match is None else 0.95 * match + 0.05 * hit
        elapsed = time.perf_counter() - start
        if step % args.log_every == 0:
            logger.info(
                "step %d grid %s loss %.4f (smoothed %.4f) evidence right %.2f %.0f s%s",
                step, grid, loss.item(), smooth, match, elapsed,
                "" if ink is None else f" (ink probe loss {ink.item():.4f})",
            )  # fmt: skip
        if args.eval_every and (step + 1) % args.eval_every == 0:
            acc = evaluate(model, tokenizer, "val", args.eval_n, args.text_fraction, args.task)
            history.append({"step": step + 1, "seconds": round(elapsed), "val": acc})
            logger.info("step %d val %s", step + 1, json.dumps(acc))
            save()
            last_save = time.perf_counter()
        elif args.save_minutes and time.perf_counter() - last_save > 60 * args.save_minutes:
            save()
            last_save = time.perf_counter()
            logger.info("step %d saved to %s", step + 1, out)
        step += 1
    step -= 1  # save() records step + 1 = the steps taken
    if prefetch is not None:
        prefetch.close()
    record = save()
    shutil.rmtree(work, ignore_errors=True)
    return record


def _from_hub(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub names back to transformers v5 names (``--init`` from a saved checkpoint)."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = name.replace("model.", "model.language_model.", 1)
        out[name] = tensor.float()
    return out


def _save(
    model,
    work: Path,
    out: Path,
    args,
    steps: int,
    seconds: float,
    history,
    spec: tiny.TinyQwen2VLSpec = SPEC,
    trainer_state: dict | None = None,
) -> dict:
    """Write the model directory (config, tokenizer, processor, bf16 weights, record) and,
    with ``trainer_state``, ``trainer_state.pt`` (fp32 optimiser state etc. for ``--resume``;
    not part of a shipped model). The folder is replaced atomically (rename)."""
    tmp = work / "save"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "model", tmp)
    weights = hub_state_dict(model, spec)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if trainer_state is not None:
        # fp32 weights too: resuming from the bf16 export alone would round them every time.
        trainer_state = trainer_state | {"model": model.state_dict()}
        torch.save(trainer_state, tmp / TRAINER_STATE)
    record = {
        "task": f"bacon_sglang.models.vqa, task {args.task!r} (train split)",
        "layers": spec.num_hidden_layers,
        "command": args.stages[-1]["command"],  # this run's
        "stages": args.stages,  # every command of a resumed run, with its first step
        "seed": args.seed,
        "steps": steps,
        "batch": args.batch,
        "small_batch": args.small_batch,
        "samples": args.samples,
        "text_fraction": args.text_fraction,
        "follow_ups": args.follow_ups,
        "distinct_fraction": args.distinct_fraction,
        "single_mark_fraction": args.single_mark_fraction,
        "include": list(args.include),
        "include_fraction": args.include_fraction,
        "ink_loss": args.ink_loss,
        "ink_probe_scale": args.ink_probe_scale,
        "until": args.until,
        "init": str(args.init) if args.init else None,
        "small_grids": list(args.small_grids),
        "small_fraction": args.small_fraction,
        "small_steps": getattr(args, "small_steps", None),
        "seconds": round(seconds),
        "threads": args.threads,
        "device": args.device,
        "history": history,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    staged = out.with_name(out.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(tmp, staged)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staged.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=0, help="training steps (or --minutes)")
    parser.add_argument("--minutes", type=float, default=0, help="wall-time budget (or --steps)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the full-grid steps")
    parser.add_argument("--small-batch", type=int, default=16, help="batch of small-grid steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--small-grids",
        type=parse_grids,
        default=(2, 3, 4, 6, 8),
        help="grid sizes of the cheap early steps, easiest first (comma-separated; N for N x N"
        " cells, RxC for R rows of C columns: document task)",
    )
    parser.add_argument(
        "--small-fraction", type=float, default=0.7, help="share of training on small grids"
    )
    parser.add_argument(
        "--follow-ups", type=int, default=0, help="extra questions per training image"
    )
    parser.add_argument("--text-fraction", type=float, default=0.0)
    parser.add_argument(
        "--distinct-fraction",
        type=float,
        default=0.0,
        help="share of training images whose objects all have different colours",
    )
    parser.add_argument(
        "--single-mark-fraction",
        type=float,
        default=0.0,
        help="document task: share of training (from the start) with one coloured word per page",
    )
    parser.add_argument(
        "--include",
        type=lambda v: tuple(c for c in v.split(",") if c),
        default=(),
        help="document task: colours (comma-separated) that --include-fraction of the training"
        " pages all hold, the question asking about one of them (colours the model confuses)",
    )
    parser.add_argument("--include-fraction", type=float, default=0.0)
    parser.add_argument(
        "--ink-loss",
        type=float,
        default=0.0,
        help="weight of an auxiliary loss: a linear probe (training only) names the ink of every"
        " coloured cell from the vision tower's output tokens",
    )
    parser.add_argument(
        "--ink-probe-scale",
        type=float,
        default=0.0,
        help="with --ink-loss: the probe compares unit vectors, logits = this x cosine (0: a"
        " linear probe), so that its loss falls only as the inks' tokens point apart",
    )
    parser.add_argument(
        "--until",
        type=int,
        default=None,
        help="stop (and save) after this many steps, keeping the schedule of --steps: a stage"
        " that a --resume with other settings continues",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="where to train: cpu, cuda (the data is built on the CPU)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="build the next N steps' batches in N worker processes (needs --steps)",
    )
    parser.add_argument("--offset", type=int, default=0, help="first train-split index")
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue a run from its saved folder (weights, optimiser, step, data position)",
    )
    parser.add_argument("--task", choices=("shapes", "doc"), default="shapes")
    parser.add_argument("--layers", type=int, default=SPEC.num_hidden_layers)
    parser.add_argument(
        "--save-minutes", type=float, default=0, help="also save every this many minutes"
    )
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-n", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not (args.steps or args.minutes):
        parser.error("give --steps or --minutes")
    if unknown := [c for c in args.include if c not in vqa.MARK_COLOURS]:
        parser.error(f"--include: unknown colour(s) {unknown}; known: {vqa.MARK_COLOURS}")
    if bool(args.include) != (args.include_fraction > 0):
        parser.error("--include and --include-fraction go together (one alone does nothing)")
    if args.prefetch and args.minutes:
        parser.error("--prefetch needs --steps (a --minutes schedule depends on the clock)")
    if args.ink_probe_scale and not args.ink_loss:
        parser.error("--ink-probe-scale needs --ink-loss (without it there is no probe)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = train(args)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
