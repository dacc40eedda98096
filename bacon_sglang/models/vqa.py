"""Synthetic sparse-evidence VQA: grids of coloured shapes, one question, one short answer.

Every sample is a pure function of ``(split, index)``: the random generator is seeded with
``(SPLIT_SEEDS[split], index)``, so the train, validation and test splits never share a
stream and any sample can be rebuilt on its own (the benchmark and the tests rebuild the test
split from its indices).

Image task (:func:`image_sample`). A 448 x 448 white image holds a 16 x 16 grid of 28-pixel
cells. Qwen2-VL merges 28 x 28 pixels (2 x 2 patches of 14 px) into one LLM token, so the image
is 256 visual tokens and each cell is exactly one of them. Between :data:`MIN_OBJECTS` and
:data:`MAX_OBJECTS` cells hold a coloured shape; the rest are empty. One question about one
object, whose answer is in its one visual token (0.4% of the image)::

    colour  "What colour is the circle?"  -> "The circle is red."    (only one circle)
    shape   "Which shape is blue?"        -> "The blue one is a cross."  (only one blue shape)

The answers restate the question, so the evidence word (``red``, ``cross``) is generated a few
tokens after the prompt, by decode steps that read the (possibly compressed) KV cache, not by
the prefill's last position.

Text task (:func:`text_sample`): a list of ``key: value`` facts (single-token keys, two-digit
values) and one question, ``"What is the value of cat?" -> "The cat is 47."``.

Every colour and key is a single token of the tiny model's tokenizer (with its leading space);
shape names are short fixed token sequences.

Document task (:func:`doc_sample`, ``task="doc"``; its own split seeds
:data:`DOC_SPLIT_SEEDS`): a dense page of short numbers. The same 16 x 16 grid of 28-px cells
is cut into 5-cell slots (three per row, the last column empty); every slot holds a *word* of 2-4
adjacent digit glyphs (a 3 x 5 bitmap font drawn 4x on white) after an empty separator cell.
Most words are printed in black; a few (3-7) are printed in colour, each colour at most once.
One question points at one word through its ink; the answer starts with the evidence and is the
whole word::

    doc  "What number is printed in blue?"  -> "0471"

About 144 of the 256 image tokens are digits, so the candidate evidence is several times what a
budget-64 keep-set (32 selected tokens per head) can hold. Every digit is a single token of any
tokenizer built by :mod:`bacon_sglang.models.tiny` (Qwen2's pre-tokenizer splits digits one by
one), so the answer is 2-4 evidence tokens plus ``<|im_end|>``: the first comes from the
full-cache prefill, the others from decode steps that read the (compressed) cache.

(A first version put a coloured square in the separator cell and asked for "the number that
follows the blue mark": an 8-layer model stayed at chance on it for 3,330 steps, because
finding the mark and reading the cells after it each give no gradient until the other works.
With the colour in the word's own glyphs every evidence token carries its cue.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The trained model shipped with the package (training/train.py wrote it).
MODEL_DIR = Path(__file__).resolve().parent / "tiny_vqa"
# The 8-layer model of the document task (its model card says how it is trained and installed).
DOC_MODEL_DIR = Path(__file__).resolve().parent / "tiny_doc"


def shipped_model(task: str) -> Path:
    """The folder of the shipped model trained on ``task`` (``shapes`` or ``doc``)."""
    return {"shapes": MODEL_DIR, "doc": DOC_MODEL_DIR}[task]


IMAGE_SIZE = 448
GRID = 16
CELL = IMAGE_SIZE // GRID  # 28 px = one LLM token
MARGIN = 3  # px between a shape and its cell's border
MIN_OBJECTS = 6
MAX_OBJECTS = 12

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (250, 130, 0),
    "black": (20, 20, 20),
    "pink": (250, 120, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Single-token keys of the text task (each " word" is one token of the tiny tokenizer).
KEYS: tuple[str, ...] = (
    "cat", "dog", "car", "bus", "cow", "cup", "book", "ball", "bread", "desk", "map", "pen",
    "river", "room", "sky", "snow", "sun", "table", "train", "wall", "forest", "flowers",
    "birds", "fence", "hat", "image", "light", "model", "park", "picture", "rain",
    "sign", "song", "text", "wind", "winter", "night", "morning", "evening",
)  # fmt: skip
MIN_FACTS = 16
MAX_FACTS = 32

SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
KINDS: tuple[str, ...] = ("colour", "shape", "text", "doc")

# Document task: its splits never share a stream with the shapes task's.
DOC_SPLIT_SEEDS: dict[str, int] = {"train": 10, "val": 11, "test": 12}
SLOT = 5  # cells per slot: an empty separator cell and up to 4 digits
MIN_WORD, MAX_WORD = 2, 4
MIN_MARKS, MAX_MARKS = 3, 7
MARK_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != "black")  # other words: black
DIGIT_SCALE = 4  # px per font pixel: a digit is 12 x 20 px, centred in its cell
# 3 x 5 bitmap font (rows top to bottom, "1" = ink).
DIGIT_FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}


@dataclass(frozen=True)
class VQASample:
    """One question. ``image`` is None for the text task; ``evidence`` lists the grid cells
    ``(row, col)`` the answer depends on (empty for text); ``facts`` is the text task's prompt
    body (empty for images)."""

    kind: str
    question: str
    answer: str
    image: Image.Image | None = None
    evidence: tuple[tuple[int, int], ...] = ()
    facts: str = ""
    objects: tuple[tuple[int, int, str, str], ...] = field(default=(), repr=False)
    # Every (question, answer) the image answers (the document task's follow-ups).
    questions: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def prompt_text(self) -> str:
        """The user turn's text: the facts (text task) followed by the question."""
        return f"{self.facts}{self.question}" if self.facts else self.question


def rng_for(split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split`` (independent streams per sample)."""
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def draw_shape(draw: ImageDraw.ImageDraw, row: int, col: int, shape: str, colour: str) -> None:
    """Draw ``shape`` filled with ``colour`` inside grid cell ``(row, col)`` (``MARGIN`` px
    from the cell's border, so one shape lies in one LLM token)."""
    x0, y0 = col * CELL + MARGIN, row * CELL + MARGIN
    x1, y1 = x0 + CELL - 1 - 2 * MARGIN, y0 + CELL - 1 - 2 * MARGIN
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        t = (x1 - x0) // 3
        draw.rectangle([x0 + t, y0, x1 - t, y1], fill=fill)
        draw.rectangle([x0, y0 + t, x1, y1 - t], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(objects: tuple[tuple[int, int, str, str], ...], grid: int = GRID) -> Image.Image:
    """The RGB image (``grid * 28`` px square, 448 by default) of ``objects`` =
    ``(row, col, shape, colour)`` on white."""
    img = Image.new("RGB", (grid * CELL, grid * CELL), "white")
    draw = ImageDraw.Draw(img)
    for row, col, shape, colour in objects:
        draw_shape(draw, row, col, shape, colour)
    return img


def image_sample(
    rng: np.random.Generator,
    kind: str | None = None,
    grid: int = GRID,
    distinct_colours: bool = False,
) -> VQASample:
    """A ``grid`` x ``grid`` image (28-px cells, so ``grid**2`` visual tokens) and a
    question (``kind`` "colour" or "shape"; random when None) whose answer is determined by the
    one object with the asked shape or colour. Smaller grids (fewer tokens; 1 to
    ``min(MAX_OBJECTS, cells / 2)`` objects, so some questions need no search) are the training
    curriculum's cheap early steps; the splits use ``GRID``. ``distinct_colours`` (training
    only) gives every object its own colour (at most 8 objects), so that every colour in the
    image asks a shape question."""
    if distinct_colours:
        kind = "shape"
    kind = kind or ("colour", "shape")[int(rng.integers(2))]
    cells_n = grid * grid
    high = min(len(COLOURS) if distinct_colours else MAX_OBJECTS, cells_n // 2)
    low = MIN_OBJECTS if grid == GRID else 1
    n = int(rng.integers(low, high + 1))
    cells = rng.choice(cells_n, size=n, replace=False)
    colours, shapes = list(COLOURS), list(SHAPES)
    target_shape = shapes[int(rng.integers(len(shapes)))]
    target_colour = colours[int(rng.integers(len(colours)))]
    objects = [(int(cells[0]) // grid, int(cells[0]) % grid, target_shape, target_colour)]
    others = [c for c in colours if c != target_colour]
    if distinct_colours:  # (no draw otherwise: the splits' streams stay as they were)
        others = [others[int(i)] for i in rng.permutation(len(others))]
    for i, cell in enumerate(cells[1:]):
        if distinct_colours:
            shape, colour = shapes[int(rng.integers(len(shapes)))], others[i]
        elif kind == "colour":  # every other object has another shape, any colour
            shape = [s for s in shapes if s != target_shape][int(rng.integers(len(shapes) - 1))]
            colour = colours[int(rng.integers(len(colours)))]
        else:  # every other object has another colour, any shape
            shape = shapes[int(rng.integers(len(shapes)))]
            colour = others[int(rng.integers(len(others)))]
        objects.append((int(cell) // grid, int(cell) % grid, shape, colour))
    objects_t = tuple(sorted(objects))
    if kind == "colour":
        question = f"What colour is the {target_shape}?"
        answer = f"The {target_shape} is {target_colour}."
    else:
        question = f"Which shape is {target_colour}?"
        answer = f"The {target_colour} one is a {target_shape}."
    return VQASample(
        kind=kind,
        question=question,
        answer=answer,
        image=render(objects_t, grid),
        evidence=(objects[0][:2],),
        objects=objects_t,
    )


def all_questions(objects: tuple[tuple[int, int, str, str], ...]) -> list[tuple[str, str]]:
    """Every ``(question, answer)`` the image of ``objects`` answers: a colour question for
    each shape present once, a shape question for each colour present once."""
    out = []
    for _, _, shape, colour in objects:
        if sum(o[2] == shape for o in objects) == 1:
            out.append((f"What colour is the {shape}?", f"The {shape} is {colour}."))
        if sum(o[3] == colour for o in objects) == 1:
            out.append((f"Which shape is {colour}?", f"The {colour} one is a {shape}."))
    return out


def text_sample(rng: np.random.Generator) -> VQASample:
    """A list of ``key: value`` facts and a question about one key."""
    n = int(rng.integers(MIN_FACTS, MAX_FACTS + 1))
    keys = [KEYS[int(i)] for i in rng.choice(len(KEYS), size=n, replace=False)]
    values = [int(v) for v in rng.integers(10, 100, size=n)]
    target = int(rng.integers(n))
    facts = "".join(f"{k}: {v}\n" for k, v in zip(keys, values, strict=True))
    return VQASample(
        kind="text",
        question=f"What is the value of {keys[target]}?",
        answer=f"The {keys[target]} is {values[target]}.",
        facts=facts,
    )


def draw_digit(
    draw: ImageDraw.ImageDraw, row: int, col: int, digit: str, ink: str = "black"
) -> None:
    """Draw ``digit`` (:data:`DIGIT_FONT`, in colour ``ink``) centred in grid cell
    ``(row, col)``."""
    glyph, fill = DIGIT_FONT[digit], COLOURS[ink]
    x0 = col * CELL + (CELL - 3 * DIGIT_SCALE) // 2
    y0 = row * CELL + (CELL - 5 * DIGIT_SCALE) // 2
    for y, bits in enumerate(glyph):
        for x, bit in enumerate(bits):
            if bit == "1":
                left, top = x0 + x * DIGIT_SCALE, y0 + y * DIGIT_SCALE
                draw.rectangle(
                    [left, top, left + DIGIT_SCALE - 1, top + DIGIT_SCALE - 1], fill=fill
                )


def page_shape(grid: int | tuple[int, int]) -> tuple[int, int]:
    """``(rows, columns)`` of a page: ``grid`` x ``grid``, or ``grid = (rows, columns)``."""
    return grid if isinstance(grid, tuple) else (grid, grid)


def render_doc(
    objects: tuple[tuple[int, int, str, str], ...], grid: int | tuple[int, int] = GRID
) -> Image.Image:
    """The RGB page (:func:`page_shape` of ``grid``, 28 px per cell) of ``objects`` =
    ``(row, col, digit, ink)`` on white."""
    rows, cols = page_shape(grid)
    img = Image.new("RGB", (cols * CELL, rows * CELL), "white")
    draw = ImageDraw.Draw(img)
    for row, col, digit, ink in objects:
        draw_digit(draw, row, col, digit, ink)
    return img


def doc_question(colour: str) -> str:
    """The document task's question about the word printed in ``colour``."""
    return f"What number is printed in {colour}?"


def doc_sample(
    rng: np.random.Generator,
    grid: int | tuple[int, int] = GRID,
    max_marks: int | None = None,
    include: tuple[str, ...] = (),
) -> VQASample:
    """A ``grid`` x ``grid`` page, or ``grid = (rows, columns)`` (training curricula; at least
    ``SLOT`` columns): ``columns // SLOT`` slots per row, each an empty cell and a 2-4 digit
    word; 3-7 words (fewer on small pages, at most ``max_marks``) are printed in distinct
    colours, the rest in black. The question asks for the word of one colour; ``evidence`` is
    that word's cells, left to right. ``include`` (training only) puts these colours on the page
    and asks about one of them, on pages with room for them (the splits draw without it)."""
    rows, cols = page_shape(grid)
    if cols < SLOT:
        raise ValueError(f"a document page needs at least {SLOT} columns, not {cols}")
    per_row = cols // SLOT
    slots = rows * per_row
    lengths = rng.integers(MIN_WORD, MAX_WORD + 1, size=slots)
    digits = rng.integers(10, size=(slots, MAX_WORD))
    most = min(MAX_MARKS, slots, max_marks or MAX_MARKS)
    n_marks = int(rng.integers(min(MIN_MARKS, most), most + 1))
    include = include if len(include) <= most else ()  # a page too small for them: as usual
    if include:
        n_marks = max(n_marks, len(include))
    marked = rng.choice(slots, size=n_marks, replace=False)
    if include:  # the included colours first, then others; the target among the included
        others = [i for i, c in enumerate(MARK_COLOURS) if c not in include]
        extra = rng.choice(others, size=n_marks - len(include), replace=False)
        colours = [MARK_COLOURS.index(c) for c in include] + [int(c) for c in extra]
        target = int(rng.integers(len(include)))
    else:
        colours = rng.choice(len(MARK_COLOURS), size=n_marks, replace=False)
        target = int(rng.integers(n_marks))
    ink = ["black"] * slots
    for slot, c in zip(marked, colours, strict=True):
        ink[int(slot)] = MARK_COLOURS[int(c)]
    objects, words = [], []
    for slot in range(slots):
        row, col = slot // per_row, (slot % per_row) * SLOT
        word = "".join(str(int(d)) for d in digits[slot, : int(lengths[slot])])
        words.append((row, col, word))
        objects += [(row, col + 1 + i, d, ink[slot]) for i, d in enumerate(word)]
    questions = [(doc_question(ink[int(slot)]), words[int(slot)][2]) for slot in marked]
    row, col, word = words[int(marked[target])]
    objects_t = tuple(sorted(objects))
    return VQASample(
        kind="doc",
        question=questions[target][0],
        answer=word,
        image=render_doc(objects_t, grid),
        evidence=tuple((row, col + 1 + i) for i in range(len(word))),
        objects=objects_t,
        questions=tuple(questions),
    )


def doc_rng_for(split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of the document task's ``split``."""
    return np.random.default_rng([DOC_SPLIT_SEEDS[split], index])


def sample(
    split: str,
    index: int,
    text_fraction: float = 0.0,
    grid: int | tuple[int, int] = GRID,
    distinct_fraction: float = 0.0,
    task: str = "shapes",
    max_marks: int | None = None,
    include: tuple[str, ...] = (),
    include_fraction: float = 0.0,
) -> VQASample:
    """Sample ``index`` of ``split``: the text task with probability ``text_fraction``,
    otherwise an image question (colour or shape, even odds) on a ``grid`` x ``grid`` image,
    whose objects all differ in colour with probability ``distinct_fraction`` (training only,
    see :func:`image_sample`). A fraction of 0 draws nothing, so the splits stay as they are.
    ``task="doc"`` gives the document task instead (:func:`doc_sample`, with at most
    ``max_marks`` coloured words, on ``grid`` x ``grid`` cells or ``grid = (rows, columns)``;
    with probability ``include_fraction`` the page holds the colours ``include`` and the
    question asks about one of them; the shapes task's fractions are ignored)."""
    if task == "doc":
        rng = doc_rng_for(split, index)
        chosen = include if include_fraction > 0 and rng.random() < include_fraction else ()
        return doc_sample(rng, grid=grid, max_marks=max_marks, include=chosen)
    if task != "shapes":
        raise ValueError(f"unknown task {task!r}; known: shapes, doc")
    rng = rng_for(split, index)
    if text_fraction > 0 and rng.random() < text_fraction:
        return text_sample(rng)
    distinct = distinct_fraction > 0 and bool(rng.random() < distinct_fraction)
    return image_sample(rng, grid=grid, distinct_colours=distinct)


def dataset(
    split: str,
    n: int,
    start: int = 0,
    text_fraction: float = 0.0,
    grids: tuple[int | tuple[int, int], ...] = (),
    distinct_fraction: float = 0.0,
    task: str = "shapes",
    max_marks: int | None = None,
    include: tuple[str, ...] = (),
    include_fraction: float = 0.0,
) -> list[VQASample]:
    """Samples ``start .. start + n - 1`` of ``split`` (see :func:`sample`); sample ``i`` uses
    the grid ``grids[i % len(grids)]`` (default: :data:`GRID`)."""
    return [
        sample(
            split,
            i,
            text_fraction,
            grids[i % len(grids)] if grids else GRID,
            distinct_fraction,
            task,
            max_marks,
            include,
            include_fraction,
        )
        for i in range(start, start + n)
    ]


def is_answer(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` is ``answer`` (surrounding whitespace ignored): the one rule of
    exact match, for samples and for recorded (answer, expected) strings alike."""
    return prediction.strip() == answer


def exact_match(prediction: str, sample_: VQASample) -> bool:
    """Whether ``prediction`` is the expected answer of ``sample_`` (``is_answer``)."""
    return is_answer(prediction, sample_.answer)


def question_answered(prediction: str, sample_: VQASample) -> str | None:
    """The question of ``sample_``'s page (``questions``: one per coloured word) whose answer
    ``prediction`` is, or None: for a wrong answer, the other coloured word it read instead."""
    return next((q for q, a in sample_.questions if is_answer(prediction, a)), None)


def wrong_by_question(questions: list[str], right: list[bool]) -> dict[str, list[int]]:
    """``{question: [wrong, asked]}`` over parallel lists of questions and whether each was
    answered right, sorted by question."""
    counts: dict[str, list[int]] = {}
    for question, ok in zip(questions, right, strict=True):
        tally = counts.setdefault(question, [0, 0])
        tally[0] += not ok
        tally[1] += 1
    return dict(sorted(counts.items()))
