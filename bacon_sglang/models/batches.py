"""Model inputs of the tiny models' VQA samples, shared by training, the benchmarks and the
tests (none of which needs to import training for them).

Prompts follow Qwen2-VL's chat template; pixels are patchified exactly as
``Qwen2VLImageProcessor`` does for an image whose sides are multiples of 28 px (no resize),
several times faster than the processor (``training/train.py``'s ``check_patchify`` compares
them). :func:`make_batch` tokenises samples with their answers (teacher forcing) or without
(generation); :func:`greedy_answers` decodes with transformers and a full KV cache;
:func:`evidence_match` scores teacher-forced logits on the answer tokens read from the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bacon_sglang.models import tiny, vqa

# The tiny model's settings with a one-block vision tower (the shapes are told apart within
# one 28 x 28 token; a second block doubled the step time without helping).
SPEC = dataclasses.replace(tiny.DEFAULT_SPEC, vision_depth=1)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt(sample: vqa.VQASample) -> str:
    """The chat-template text of ``sample``'s question (Qwen2-VL's template, one user turn,
    generation prompt added); the image slot holds one ``<|image_pad|>`` placeholder."""
    image = IMAGE_SLOT if sample.image is not None else ""
    return (
        f"{SYSTEM}<|im_start|>user\n{image}{sample.prompt_text}<|im_end|>\n<|im_start|>assistant\n"
    )


def patchify(img, spec: tiny.TinyQwen2VLSpec = SPEC) -> torch.Tensor:
    """``Qwen2VLImageProcessor``'s ``pixel_values`` for an image whose sides are multiples of
    28 px (no resize): ``[grid_h * grid_w, 3 * temporal_patch * patch * patch]`` float32,
    rows in the processor's 2 x 2-merge order."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    x = (x - np.array(tiny.IMAGE_MEAN, np.float32)) / np.array(tiny.IMAGE_STD, np.float32)
    x = x.transpose(2, 0, 1)[None].repeat(spec.temporal_patch_size, 0)  # [T, 3, H, W]
    ps, ms, tps = spec.patch_size, spec.spatial_merge_size, spec.temporal_patch_size
    gh, gw = x.shape[2] // ps, x.shape[3] // ps
    x = x.reshape(1, tps, 3, gh // ms, ms, ps, gw // ms, ms, ps)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(gh * gw, 3 * tps * ps * ps)))


@dataclass
class Batch:
    """Model inputs of B samples, right-padded to the longest (L tokens)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mm_token_type_ids: torch.Tensor  # [B, L], 1 on image tokens
    labels: torch.Tensor  # [B, L], -100 except the answer tokens
    pixel_values: torch.Tensor | None  # [images * 1024, 1176]
    image_grid_thw: torch.Tensor | None  # [images, 3]

    def inputs(self) -> dict:
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.pixel_values is not None:
            out |= {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}
        return out

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            **{f.name: None if (v := getattr(self, f.name)) is None else v.to(device)
               for f in dataclasses.fields(self)}
        )  # fmt: skip


def make_batch(
    tokenizer,
    samples: list[vqa.VQASample],
    with_answers: bool = True,
    turns: list[list[tuple[str, str]]] | None = None,
) -> Batch:
    """Tokenise prompts (+ answers and ``<|im_end|>`` when ``with_answers``, + the extra
    ``turns[i]`` of sample ``i``, each answer supervised); image slots are expanded to
    ``(H / 28) * (W / 28)`` ``<|image_pad|>`` tokens, as the processor does."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|endoftext|>")}
    rows, label_rows, pixels, grids = [], [], [], []
    for i, s in enumerate(samples):
        text = prompt(s)
        if s.image is not None:
            w, h = s.image.size
            merge = SPEC.patch_size * SPEC.spatial_merge_size
            text = text.replace("<|image_pad|>", "<|image_pad|>" * ((h // merge) * (w // merge)))
            pixels.append(patchify(s.image))
            grids.append([1, h // SPEC.patch_size, w // SPEC.patch_size])
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        a = tokenizer(s.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        a = a if with_answers else []
        row, label = p + a, [-100] * len(p) + a
        for question, answer in turns[i] if turns else []:
            q = f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            q = tokenizer(q, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            row, label = row + q + a, label + [-100] * len(q) + a
        rows.append(row)
        label_rows.append(label)
    length = max(len(r) for r in rows)
    pad = ids["<|endoftext|>"]
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (length - len(r)) for r in label_rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        mm_token_type_ids=(input_ids == ids["<|image_pad|>"]).int(),
        labels=labels,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.tensor(grids) if grids else None,
    )


@torch.no_grad()
def greedy_answers(model, tokenizer, samples: list[vqa.VQASample], max_new: int = 12) -> list:
    """Greedy answers of ``model`` (full KV cache) for ``samples``, as text."""
    out = []
    for s in samples:
        b = make_batch(tokenizer, [s], with_answers=False).to(model.device)
        gen = model.generate(**b.inputs(), max_new_tokens=max_new, do_sample=False)
        out.append(tokenizer.decode(gen[0, b.input_ids.shape[1] :], skip_special_tokens=True))
    return out


def evidence_match(
    logits: torch.Tensor, labels: torch.Tensor, is_id: int, a_id: int, digits: Tensor | None = None
) -> float:
    """Share of evidence words predicted right under teacher forcing: the colour after
    "... is" or the shape after "... is a" (the one answer token read from the image), or,
    with ``digits`` (the digit token ids; document task), every answer digit.

    ``logits``: ``[B, L, vocab]``; ``labels``: ``[B, L]`` (-100 outside the answers)."""
    target, before = labels[:, 1:], labels[:, :-1]
    if digits is not None:
        evidence = torch.isin(target, digits)
    else:
        evidence = ((before == is_id) & (target != a_id)) | (before == a_id)
    right = logits[:, :-1].argmax(-1) == target
    return right[evidence].float().mean().item() if evidence.any() else 0.0
