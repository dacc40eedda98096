"""How alike the vision tower makes one word printed in two different inks.

    python -m training.ink_similarity bacon_sglang/models/tiny_doc   # repository root

For each ink of :data:`bacon_sglang.models.vqa.COLOURS`, a 16 x 16 document page holding only
the word ``3838`` in its first slot; for each pair of inks, the cosine similarity of the word's
4 image tokens (mean over the 4) at the tower's output (the merged tokens the language model
reads), or with ``--patch-embed`` of its 16 patches after the patch embedding. A pair near 1.0
at the output is a pair of colours the language model can hardly tell apart: the document
model's questions about that pair's words then fail (its model card). ``--stages blue,orange``
follows one pair through the tower instead, module by module: where the two inks fold together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bacon_sglang.models import vqa
from bacon_sglang.models.batches import SPEC, patchify

WORD = "3838"


def word_tokens(model, ink: str, patch_embed: bool = False) -> torch.Tensor:
    """The vision tower's output tokens of :data:`WORD` printed in ``ink`` at the start of an
    otherwise empty 16 x 16 page: ``[len(WORD), hidden]`` float32; with ``patch_embed`` its
    patches after the patch embedding instead, ``[4 * len(WORD), vision embed]``."""
    objects = tuple((0, 1 + i, digit, ink) for i, digit in enumerate(WORD))
    pixels = patchify(vqa.render_doc(objects))
    cells = slice(1, 1 + len(WORD))  # cells (0, 1) .. (0, 4), row-major
    with torch.no_grad():
        if patch_embed:  # rows in 2 x 2-merge order: 4 patches per cell
            merged = SPEC.spatial_merge_size**2
            return model.model.visual.patch_embed(pixels)[
                cells.start * merged : cells.stop * merged
            ]
        side = vqa.GRID * SPEC.spatial_merge_size
        out = model.model.visual(pixels, grid_thw=torch.tensor([[1, side, side]]))
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    return tokens[cells].float()


def tower_stages(model) -> list[tuple[str, torch.nn.Module]]:
    """The vision tower's modules in forward order, named: the patch embedding, each block, the
    merger's LayerNorm, each layer of its MLP."""
    visual = model.model.visual
    stages = [("patch_embed", visual.patch_embed)]
    stages += [(f"blocks.{i}", block) for i, block in enumerate(visual.blocks)]
    stages.append(("merger.ln_q", visual.merger.ln_q))
    stages += [(f"merger.mlp.{i}", layer) for i, layer in enumerate(visual.merger.mlp)]
    return stages


def stage_similarity(model, a: str, b: str) -> dict[str, float]:
    """Cosine similarity of :data:`WORD` printed in ink ``a`` and in ink ``b`` at the output of
    each of :func:`tower_stages` (mean over the word's cells; before the merger a cell is its 4
    patches side by side, ``[4 * vision embed]``, as the merger reads them)."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().float())
        )
        for name, module in tower_stages(model)
    ]
    cells = {}
    try:
        for ink in (a, b):
            word_tokens(model, ink)
            cells[ink] = {
                name: out.reshape(vqa.GRID * vqa.GRID, -1)[1 : 1 + len(WORD)]  # cells (0, 1)..
                for name, out in outputs.items()
            }
    finally:
        for hook in hooks:
            hook.remove()
    cos = torch.nn.functional.cosine_similarity
    return {name: float(cos(cells[a][name], cells[b][name], dim=-1).mean()) for name in cells[a]}


def similarity(model, patch_embed: bool = False) -> dict[tuple[str, str], float]:
    """Cosine similarity of :func:`word_tokens` for every pair of inks (both orders)."""
    tokens = {ink: word_tokens(model, ink, patch_embed) for ink in vqa.COLOURS}
    cos = torch.nn.functional.cosine_similarity
    return {(a, b): float(cos(tokens[a], tokens[b], dim=-1).mean()) for a in tokens for b in tokens}


def markdown(sim: dict[tuple[str, str], float]) -> str:
    """The ink x ink table of :func:`similarity`, 4 decimals."""
    inks = list(vqa.COLOURS)
    lines = ["| ink | " + " | ".join(inks) + " |", "|---|" + "---|" * len(inks)]
    for a in inks:
        lines.append(f"| {a} | " + " | ".join(f"{sim[(a, b)]:.4f}" for b in inks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from transformers import Qwen2VLForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--patch-embed", action="store_true", help="after the patch embedding")
    parser.add_argument(
        "--stages",
        type=lambda v: tuple(v.split(",")),
        default=None,
        metavar="INK,INK",
        help="one pair of inks through the tower, module by module",
    )
    args = parser.parse_args(argv)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    if args.stages:
        a, b = args.stages
        print(f"| tower stage | {a} vs {b} |\n|---|---|")
        print("\n".join(f"| {k} | {v:.4f} |" for k, v in stage_similarity(model, a, b).items()))
    else:
        print(markdown(similarity(model, args.patch_embed)))


if __name__ == "__main__":
    main()
