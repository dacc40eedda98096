"""SparseMM's "visual head" scores as a trained tiny model ships them, and where a sample's
evidence is.

:func:`load` reads ``visual_heads.json`` (``[layers][Hkv]``, summing to 1), which
:class:`bacon_sglang.policies.SparseMM` uses; ``python -m training.visual_heads`` (repository
root) computes it. The other functions find a sample's evidence: the image tokens the answer is
read from and the answer positions that predict it (shared by that script, the premise
benchmark and the tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bacon_sglang.models import vqa

FILENAME = "visual_heads.json"


def evidence_positions(input_ids: torch.Tensor, s: vqa.VQASample, image_token: int) -> list[int]:
    """Token positions of ``s``'s evidence cells, in answer order: the first image token +
    ``row * cols + col`` (one 28-px cell is one merged image token, row-major)."""
    first = int((input_ids == image_token).nonzero()[0])
    cols = s.image.size[0] // vqa.CELL
    return [first + r * cols + c for r, c in s.evidence]


def evidence_token_ids(tokenizer, s: vqa.VQASample) -> set[int]:
    """The answer's token ids that are read from the image: every digit (document task) or
    the first token of the colour / shape word of the shapes task."""
    if s.kind == "doc":
        return {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    word = s.answer.rstrip(".").split()[-1]
    return {tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]}


def predicting_positions(
    input_ids: torch.Tensor, evidence_tokens: set[int], first: int
) -> list[int]:
    """Positions ``>= first`` of ``input_ids`` (``[L]``, prompt + answer) whose next token is
    one of ``evidence_tokens``."""
    return [
        pos
        for pos in range(first, input_ids.shape[0] - 1)
        if int(input_ids[pos + 1]) in evidence_tokens
    ]


def load(model_dir: Path) -> tuple[tuple[float, ...], ...]:
    """The scores ``model_dir`` ships (``visual_heads.json``), ``[layers][Hkv]``."""
    return read(Path(model_dir) / FILENAME)


def read(path: Path | str) -> tuple[tuple[float, ...], ...]:
    """The scores of one ``visual_heads.json`` (``{"scores": [layers][Hkv]}``), as
    ``--kv-head-scores PATH`` names it."""
    data = json.loads(Path(path).read_text())
    return tuple(tuple(float(v) for v in row) for row in data["scores"])
