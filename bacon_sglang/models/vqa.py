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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The trained model shipped with the package (bacon_sglang/models/train.py wrote it).
MODEL_DIR = Path(__file__).resolve().parent / "tiny_vqa"

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
KINDS: tuple[str, ...] = ("colour", "shape", "text")


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


def sample(
    split: str,
    index: int,
    text_fraction: float = 0.0,
    grid: int = GRID,
    distinct_fraction: float = 0.0,
) -> VQASample:
    """Sample ``index`` of ``split``: the text task with probability ``text_fraction``,
    otherwise an image question (colour or shape, even odds) on a ``grid`` x ``grid`` image,
    whose objects all differ in colour with probability ``distinct_fraction`` (training only,
    see :func:`image_sample`). A fraction of 0 draws nothing, so the splits stay as they are."""
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
    grids: tuple[int, ...] = (),
    distinct_fraction: float = 0.0,
) -> list[VQASample]:
    """Samples ``start .. start + n - 1`` of ``split`` (see :func:`sample`); sample ``i`` uses
    the grid ``grids[i % len(grids)]`` (default: :data:`GRID`)."""
    return [
        sample(split, i, text_fraction, grids[i % len(grids)] if grids else GRID, distinct_fraction)
        for i in range(start, start + n)
    ]


def exact_match(prediction: str, sample_: VQASample) -> bool:
    """Whether ``prediction`` is the expected answer (surrounding whitespace ignored)."""
    return prediction.strip() == sample_.answer
