"""The document-style VQA task (``vqa.doc_sample``) and its training hooks: fast, no server."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bacon_sglang.models import batches, tiny, vqa
from training import train


def _key(s: vqa.VQASample) -> tuple:
    return (s.question, s.answer, s.objects, s.evidence, s.questions)


def test_doc_generator_is_deterministic_and_splits_differ():
    first, again = vqa.dataset("test", 5, task="doc"), vqa.dataset("test", 5, task="doc")
    assert [_key(s) for s in first] == [_key(s) for s in again]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again, strict=True))
    assert _key(vqa.sample("test", 3, task="doc")) == _key(first[3])  # random access by index
    pages = {
        split: {s.objects for s in vqa.dataset(split, 40, task="doc")}
        for split in vqa.DOC_SPLIT_SEEDS
    }
    assert len(pages["test"]) == 40  # no two pages alike within a split
    assert not pages["train"] & pages["test"] and not pages["val"] & pages["test"]
    assert not pages["train"] & pages["val"]
    with pytest.raises(ValueError, match="unknown task"):
        vqa.sample("test", 0, task="forms")


def test_shapes_task_streams_are_unchanged():
    """The document task added a keyword, not a draw: the old splits are what they were."""
    blob = repr(
        [
            (s.kind, s.question, s.answer, s.objects, s.facts)
            for s in vqa.dataset("test", 30, text_fraction=0.2)
        ]
        + [
            (s.question, s.objects)
            for s in vqa.dataset("train", 30, grids=(4, 16), distinct_fraction=0.3)
        ]
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()
    assert digest == "00d6d3dfdbd79a8347ad4e75725cd17ced1ae37763800e94ae77b85b1268d53a"


def _read_cell(pixels: np.ndarray, row: int, col: int) -> tuple[str, str]:
    """What a page cell shows, read back from its pixels: ``(digit, ink colour)``, or
    ``("", "")`` for an empty cell."""
    cell = pixels[row * vqa.CELL : (row + 1) * vqa.CELL, col * vqa.CELL : (col + 1) * vqa.CELL]
    if (cell == 255).all():
        return "", ""
    x0, y0 = (vqa.CELL - 3 * vqa.DIGIT_SCALE) // 2, (vqa.CELL - 5 * vqa.DIGIT_SCALE) // 2
    half = vqa.DIGIT_SCALE // 2
    centres = [
        [cell[y0 + y * vqa.DIGIT_SCALE + half, x0 + x * vqa.DIGIT_SCALE + half] for x in range(3)]
        for y in range(5)
    ]
    bits = tuple("".join("0" if (px == 255).all() else "1" for px in line) for line in centres)
    inks = {tuple(int(v) for v in px) for line in centres for px in line if not (px == 255).all()}
    (ink,) = inks  # one colour per glyph
    colours = {rgb: name for name, rgb in vqa.COLOURS.items()}
    return {glyph: d for d, glyph in vqa.DIGIT_FONT.items()}[bits], colours[ink]


@pytest.mark.parametrize("index", range(4))
def test_doc_answer_is_the_word_printed_in_the_asked_colour(index):
    s = vqa.sample("test", index, task="doc")
    pixels = np.asarray(s.image)
    assert s.image.size == (vqa.IMAGE_SIZE, vqa.IMAGE_SIZE)
    colour = _colour(s.question)
    cells = {(r, c): _read_cell(pixels, r, c) for r in range(vqa.GRID) for c in range(vqa.GRID)}
    assert sorted(cell for cell, (_, ink) in cells.items() if ink == colour) == list(s.evidence)
    read = "".join(cells[cell][0] for cell in s.evidence)
    assert read == s.answer and vqa.MIN_WORD <= len(read) <= vqa.MAX_WORD
    (row, col0), *_ = s.evidence
    assert cells[row, col0 - 1] == ("", "")  # the word starts after an empty cell ...
    assert not cells.get((row, col0 + len(read)), ("", ""))[0]  # ... and ends with the answer
    # Every colour but black prints one word, and each question's answer is that word.
    inks = {ink for _, ink in cells.values()} - {"", "black"}
    assert len(inks) == len(s.questions) and (s.question, s.answer) in s.questions


def _colour(question: str) -> str:
    return question.removeprefix("What number is printed in ").removesuffix("?")


def _inks(s: vqa.VQASample) -> list[str]:
    return [_colour(q) for q, _ in s.questions]


def test_included_colours_are_on_the_page_and_asked():
    """``include`` (training only, ``train.py --include``): the page holds those colours and the
    question asks about one of them, whose word is printed in it; ``include_fraction`` draws
    one number first only when it is above 0, so the splits stay as they are."""
    pair = ("blue", "orange")
    pages = vqa.dataset("train", 40, 500, task="doc", include=pair, include_fraction=1.0)
    asked = [_colour(s.question) for s in pages]
    assert set(asked) == set(pair)
    for s in pages:
        assert set(pair) <= set(_inks(s)) and len(set(_inks(s))) == len(s.questions)
        assert vqa.MIN_MARKS <= len(s.questions) <= vqa.MAX_MARKS
    pixels = np.asarray(pages[0].image)
    assert "".join(_read_cell(pixels, *cell)[0] for cell in pages[0].evidence) == pages[0].answer
    assert {_read_cell(pixels, *cell)[1] for cell in pages[0].evidence} == {asked[0]}
    plain = [_key(s) for s in vqa.dataset("train", 40, 500, task="doc")]
    off = vqa.dataset("train", 40, 500, task="doc", include=pair, include_fraction=0.0)
    assert [_key(s) for s in off] == plain
    half = vqa.dataset("train", 40, 500, task="doc", include=pair, include_fraction=0.5)
    assert 0 < sum(not set(pair) <= set(_inks(s)) for s in half) < 40
    for ignored_or_wrong in (
        ["--include", "blue,teal", "--include-fraction", "0.5"],
        ["--include", "blue,orange"],
        ["--include-fraction", "0.5"],
        ["--ink-probe-scale", "16"],
    ):
        with pytest.raises(SystemExit):
            train.main(["unused", "--task", "doc", "--steps", "1", *ignored_or_wrong])


def test_ink_labels_name_the_coloured_cells():
    """The ink probe's targets (``train.py --ink-loss``): each coloured digit cell's colour,
    nothing for black or empty cells, in the vision tokens' row-major order."""
    for s in [vqa.sample("train", 3, task="doc"), vqa.sample("train", 4, task="doc", grid=(3, 10))]:
        labels = train.ink_labels(s)
        cols, rows = (side // vqa.CELL for side in s.image.size)
        assert labels.shape == (rows * cols,)
        pixels = np.asarray(s.image)
        for cell in range(rows * cols):
            _, ink = _read_cell(pixels, cell // cols, cell % cols)
            named = vqa.MARK_COLOURS[int(labels[cell])] if labels[cell] >= 0 else None
            assert named == (ink if ink not in ("", "black") else None)
        assert int((labels >= 0).sum()) == sum(len(a) for _, a in s.questions)


def test_doc_page_is_dense():
    """Candidate evidence is at least 3x the 32 tokens a budget-64 keep-set selects per head."""
    for s in vqa.dataset("test", 20, task="doc"):
        digits = len(s.objects)  # one object per digit cell
        assert digits >= 3 * 32
        assert vqa.MIN_MARKS <= len(s.questions) <= vqa.MAX_MARKS
    small = vqa.sample("train", 0, task="doc", grid=5)
    assert small.image.size == (5 * vqa.CELL, 5 * vqa.CELL)
    with pytest.raises(ValueError, match="at least"):
        vqa.sample("train", 0, task="doc", grid=4)


def test_doc_answers_are_one_token_per_digit():
    """Any tokenizer of ``tiny`` splits digits one by one: the answer is its evidence tokens."""
    tok = tiny.build_tokenizer()
    for s in vqa.dataset("val", 10, task="doc"):
        ids = tok.encode(s.answer, add_special_tokens=False).ids
        assert [tok.decode([i]) for i in ids] == list(s.answer)
        colour = s.question.split()[-1].removesuffix("?")
        assert len(tok.encode(" " + colour, add_special_tokens=False).ids) == 1


def test_doc_training_batch_supervises_every_coloured_word():
    """Follow-ups of a document page are its other coloured words' questions; the evidence metric
    counts every answer digit."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vqa.MODEL_DIR)
    s = vqa.sample("train", 7, task="doc", grid=10)
    turns = train.follow_ups(s, 10, seed=0)
    assert sorted([(s.question, s.answer), *turns]) == sorted(s.questions)
    b = batches.make_batch(tokenizer, [s], turns=[turns])
    digits = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    labels = b.labels[0][b.labels[0] != -100]
    assert int(torch.isin(labels, digits).sum()) == sum(len(a) for _, a in s.questions)
    assert int((b.input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 100
    logits = torch.nn.functional.one_hot(b.labels.clamp(min=0).roll(-1, 1), 1024).float()
    assert batches.evidence_match(logits, b.labels, 0, 0, digits) == 1.0


def test_spec_of_sets_the_depth():
    spec = train.spec_of(argparse.Namespace(layers=8))
    assert spec.num_hidden_layers == 8 and spec.vision_depth == batches.SPEC.vision_depth


def test_curriculum_pages():
    """``grid=(rows, columns)`` pages for the training curriculum: a one-line page holds one
    word, printed in colour."""
    assert train.parse_grids("1x5,2x5,10") == ((1, 5), (2, 5), 10)
    line = vqa.sample("train", 3, task="doc", grid=(1, 5))
    assert line.image.size == (5 * vqa.CELL, vqa.CELL) and len(line.questions) == 1
    pixels = np.asarray(line.image)
    read = [_read_cell(pixels, 0, c) for c in range(5)]
    assert read[0] == ("", "") and "".join(d for d, _ in read) == line.answer
    page = vqa.sample("train", 3, task="doc", grid=(3, 10))
    assert page.image.size == (10 * vqa.CELL, 3 * vqa.CELL)
    assert vqa.MIN_MARKS <= len(page.questions) <= 3 * 2  # at most one per slot
    assert all(r < 3 and c < 10 for r, c in page.evidence)


PAIRS = ["--include", "blue,orange", "--include-fraction", "0.5", "--ink-loss", "1"]


@pytest.mark.parametrize("extra", [[], PAIRS, [*PAIRS, "--ink-probe-scale", "16"]])
def test_a_stopped_and_resumed_run_equals_the_straight_run(tmp_path, extra):
    """``--until`` stops a run with its schedule intact; ``--resume`` continues it to the
    same fp32 weights as a run that never stopped (the stages of tiny_doc's training), also
    with the ink probe (its state resumes too)."""
    common = [
        "--task", "doc", "--layers", "1", "--steps", "4", "--small-grids", "1x5,2x5",
        "--small-fraction", "0.5", "--small-batch", "2", "--batch", "1", "--follow-ups", "1",
        "--warmup", "1", "--threads", "1", "--eval-every", "0", "--log-every", "100", *extra,
    ]  # fmt: skip
    train.main([str(tmp_path / "straight"), *common])
    train.main([str(tmp_path / "staged"), *common, "--until", "2"])
    stopped = json.loads((tmp_path / "staged" / "training.json").read_text())
    assert stopped["steps"] == 2 and stopped["until"] == 2
    train.main([str(tmp_path / "staged"), *common, "--resume", str(tmp_path / "staged")])
    record = json.loads((tmp_path / "staged" / "training.json").read_text())
    assert record["steps"] == 4 and [st["from_step"] for st in record["stages"]] == [0, 2]
    assert "--until 2" in record["stages"][0]["command"] and "--resume" in record["command"]
    straight, staged = (
        torch.load(tmp_path / run / train.TRAINER_STATE, weights_only=False)["model"]
        for run in ("straight", "staged")
    )
    assert straight.keys() == staged.keys()
    assert all(torch.equal(straight[k], staged[k]) for k in straight)
    probes = [
        torch.load(tmp_path / run / train.TRAINER_STATE, weights_only=False).get("ink_probe")
        for run in ("straight", "staged")
    ]
    assert (probes[0] is None) == (not extra)
    if extra:  # trained (the linear one starts at zero), resumed, not part of the saved model
        assert probes[0]["weight"].abs().sum() > 0
        assert torch.equal(probes[0]["weight"], probes[1]["weight"])
        with safe_open(tmp_path / "staged" / "model.safetensors", "pt") as f:
            assert not any("probe" in k for k in f.keys())
            assert len(list(f.keys())) == len(tiny.weight_shapes(train.spec_of(
                argparse.Namespace(layers=1)), 1024))  # fmt: skip


def test_prefetched_batches_train_the_same_weights(tmp_path):
    """``--prefetch 2`` (batches built ahead in worker processes, for a GPU run) trains the
    same fp32 weights and probe as batches built in the loop, across a stop and a resume."""
    common = [
        "--task", "doc", "--layers", "1", "--steps", "4", "--small-grids", "1x5,2x5",
        "--small-fraction", "0.5", "--small-batch", "2", "--batch", "1", "--follow-ups", "1",
        "--warmup", "1", "--threads", "1", "--eval-every", "0", "--log-every", "100", *PAIRS,
        "--ink-probe-scale", "16",
    ]  # fmt: skip
    train.main([str(tmp_path / "inline"), *common])
    ahead = [str(tmp_path / "ahead"), *common, "--prefetch", "2"]
    train.main([*ahead, "--until", "3"])
    train.main([*ahead, "--resume", str(tmp_path / "ahead")])
    inline, prefetched = (
        torch.load(tmp_path / run / train.TRAINER_STATE, weights_only=False)
        for run in ("inline", "ahead")
    )
    assert prefetched["step"] == 4 and prefetched["seen"] == inline["seen"]
    assert all(torch.equal(inline["model"][k], prefetched["model"][k]) for k in inline["model"])
    assert torch.equal(inline["ink_probe"]["weight"], prefetched["ink_probe"]["weight"])
    record = json.loads((tmp_path / "ahead" / "training.json").read_text())
    assert record["device"] == "cpu" and "--prefetch 2" in record["command"]
    with pytest.raises(SystemExit):  # a --minutes schedule depends on the clock
        train.main([str(tmp_path / "x"), "--minutes", "1", "--prefetch", "2"])


def test_a_probe_added_on_resume_starts_fresh_and_keeps_the_model_state(tmp_path):
    """``--resume`` with ``--ink-loss`` added (a probe from a later stage on): the probe and
    its AdamW group start fresh, the model's optimiser state, schedule and data continue. With
    a negligible probe weight (1e-30) the weights equal those of a run without the probe; a
    run that had a probe cannot be resumed without it."""
    common = [
        "--task", "doc", "--layers", "1", "--steps", "4", "--small-grids", "1x5,2x5",
        "--small-fraction", "0.5", "--small-batch", "2", "--batch", "1", "--follow-ups", "1",
        "--warmup", "1", "--threads", "1", "--eval-every", "0", "--log-every", "100",
    ]  # fmt: skip
    probe = ["--ink-loss", "1e-30", "--ink-probe-scale", "16"]
    train.main([str(tmp_path / "straight"), *common])
    train.main([str(tmp_path / "staged"), *common, "--until", "2"])
    train.main([str(tmp_path / "staged"), *common, *probe, "--resume", str(tmp_path / "staged")])
    straight, staged = (
        torch.load(tmp_path / run / train.TRAINER_STATE, weights_only=False)
        for run in ("straight", "staged")
    )
    assert staged["step"] == 4 and staged["ink_probe"]["weight"].shape[0] == len(vqa.MARK_COLOURS)
    assert len(staged["optimizer"]["param_groups"]) == 3
    assert all(torch.equal(straight["model"][k], staged["model"][k]) for k in straight["model"])
    with pytest.raises(SystemExit):
        train.main([str(tmp_path / "again"), *common, "--resume", str(tmp_path / "staged")])


def test_cosine_probe_reads_directions_only():
    """``--ink-probe-scale S``: logits are S x the cosine of token and class weight, so
    scaling a token (or a class weight) changes nothing; only the direction counts."""
    torch.manual_seed(0)
    probe = train.CosineProbe(8, 3, scale=16.0)
    tokens = torch.randn(5, 8)
    logits = probe(tokens)
    cos = torch.nn.functional.cosine_similarity(tokens[:, None], probe.weight[None], dim=-1)
    torch.testing.assert_close(logits, 16.0 * cos)
    torch.testing.assert_close(probe(7.0 * tokens), logits)
    with torch.no_grad():
        probe.weight.mul_(100.0)
    torch.testing.assert_close(probe(tokens), logits)


def test_ink_similarity_table():
    """``python -m training.ink_similarity``: an ink x ink cosine table of one word's
    output tokens (symmetric, 1 on the diagonal, distinct inks not identical)."""
    from transformers import Qwen2VLForConditionalGeneration

    from training import ink_similarity

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        vqa.DOC_MODEL_DIR, dtype=torch.float32
    ).eval()
    tokens = ink_similarity.word_tokens(model, "red")
    assert tokens.shape == (len(ink_similarity.WORD), batches.SPEC.hidden_size)
    sim = ink_similarity.similarity(model)
    inks = list(vqa.COLOURS)
    assert all(sim[(a, a)] == pytest.approx(1.0, abs=1e-5) for a in inks)
    assert all(sim[(a, b)] == pytest.approx(sim[(b, a)], abs=1e-6) for a in inks for b in inks)
    assert sim[("red", "black")] < 0.99
    assert ink_similarity.markdown(sim).count("\n") == len(inks) + 1
    patches = ink_similarity.word_tokens(model, "red", patch_embed=True)
    assert patches.shape == (4 * len(ink_similarity.WORD), model.config.vision_config.embed_dim)
    assert ink_similarity.similarity(model, patch_embed=True)[("red", "red")] == pytest.approx(1.0)
    # --stages: one pair module by module; the last stage is the tower's output (the table)
    stages = ink_similarity.stage_similarity(model, "red", "black")
    assert list(stages) == [name for name, _ in ink_similarity.tower_stages(model)]
    assert list(stages)[0] == "patch_embed" and len(stages) == 1 + 1 + 1 + 3
    assert stages["merger.mlp.2"] == pytest.approx(sim[("red", "black")], abs=1e-6)
    assert ink_similarity.stage_similarity(model, "red", "red")["blocks.0"] == pytest.approx(1.0)


def test_evaluate_counts_right_answers_per_question():
    """``python -m training.evaluate``: its count equals greedy decoding checked
    against the expected answers, split per question."""
    from training import evaluate

    result = evaluate.evaluate(vqa.DOC_MODEL_DIR, "doc", "val", 3, start=5)
    samples = vqa.dataset("val", 3, start=5, task="doc")
    assert result["questions"] == 3 and 0 <= result["right"] <= 3
    assert sum(n for _, n in result["wrong_by_question"].values()) == 3
    assert sum(w for w, _ in result["wrong_by_question"].values()) == 3 - result["right"]
    assert set(result["wrong_by_question"]) == {s.question for s in samples}
    instead = result["answered_instead"]
    assert sum(sum(t.values()) for t in instead.values()) == 3 - result["right"]


def test_mix_ups_name_the_word_answered_instead():
    """A wrong answer that is another coloured word of the page is tallied under that word's
    question; one that is none of them under ``NOT_ON_THE_PAGE``; right answers not at all."""
    from training import evaluate

    s = vqa.sample("val", 7, task="doc")
    (other_q, other_a), *_ = [(q, a) for q, a in s.questions if q != s.question]
    samples = [s, s, s, s]
    answers = [s.answer, f" {other_a}", other_a + "0", other_a]
    assert vqa.question_answered(answers[1], s) == other_q
    assert vqa.question_answered(answers[0], s) == s.question
    assert evaluate.mix_ups(answers, samples) == {
        s.question: {other_q: 2, evaluate.NOT_ON_THE_PAGE: 1}
    }


def test_train_script_runs_five_stages_once_with_the_extra_flags(tmp_path):
    """``training/tiny_doc/train.sh OUT FLAG...``: five stages of ``python -m training.train``
    in order, each with FLAGs, the ink probe from stage 2 on (as the shipped run), stages 2-3
    resuming OUT (stage 3 stopping at step 6,500) and 4-5 starting from the stage before; run
    again, it starts nothing (each stage is skipped once its ``training.json`` reaches its
    steps). ``python`` is a stub that records each training command and writes the steps it
    would reach."""
    import os
    import subprocess
    import sys

    log = tmp_path / "commands.txt"
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(
        f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
if args[0] == "-c":
    sys.exit(subprocess.call([{sys.executable!r}, *args]))
out = next(a for i, a in enumerate(args) if a.startswith({str(tmp_path)!r})
           and args[i - 1] not in ("--init", "--resume"))
with open({str(log)!r}, "a") as f:
    f.write(out + "|" + " ".join(args) + "\\n")
os.makedirs(out, exist_ok=True)
stop = "--until" if "--until" in args else "--steps"
steps = int(args[args.index(stop) + 1])
json.dump({{"steps": steps}}, open(os.path.join(out, "training.json"), "w"))
"""
    )
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    script = Path(train.__file__).parent / "tiny_doc" / "train.sh"
    out = tmp_path / "run"
    for _ in range(2):
        subprocess.run(
            ["bash", str(script), str(out), "--eval-n", "12"],
            env=env, cwd=tmp_path, check=True, capture_output=True,
        )  # fmt: skip
    outs, commands = zip(*(line.split("|") for line in log.read_text().splitlines()), strict=True)
    assert len(commands) == 5
    assert all(c.startswith("-m training.train ") for c in commands)
    assert all(" --eval-n 12" in c for c in commands)
    probe = [" --ink-loss 1 --ink-probe-scale 16 " in c for c in commands]
    assert probe == [False, True, True, True, True]
    assert " --until 6500" in commands[2]
    assert outs == (str(out),) * 3 + (str(out / "stage4"), str(out / "stage5"))
    assert [f"--resume {out} " in c for c in commands] == [False, True, True, False, False]
    assert f"--init {out} " in commands[3] and f"--init {out / 'stage4'} " in commands[4]
