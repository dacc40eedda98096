"""A plain transformers reference for compressed decoding (tests and the accuracy benchmark).

Given a Qwen2-VL model in transformers and a request's keep-sets (as the server writes them
with ``--kv-debug-dir``), :func:`decode_with_keep_sets` decodes greedily from a KV cache
reduced to the shared prefix plus each head's kept positions, at the logical (mrope)
positions the server uses; :func:`keep_sets_from_attention` recomputes the keep-sets with the
per-request policy objects from the model's own attention weights of the whole prompt.
No SGLang import: this is what the server is checked against.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from bacon_sglang.policies import RequestState, make_policy


def kept_positions(keep: Tensor, prefix_len: int) -> Tensor:
    """``[layers, Hkv, P + kept]``: the shared prefix ``[0, P)`` followed by ``keep``
    (``[layers, Hkv, kept]`` private positions, as the server records them)."""
    prefix = torch.arange(prefix_len, device=keep.device).expand(*keep.shape[:2], -1)
    return torch.cat([prefix, keep], dim=-1)


@torch.no_grad()
def decode_with_keep_sets(
    model,
    inputs: dict,
    keep: Tensor | None,
    max_new: int,
    stop: Collection[int] = (),
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities after a full prefill of ``inputs`` (a
    processor's output for one prompt), with the KV cache reduced to ``keep``.

    Args:
        model: ``Qwen2VLForConditionalGeneration`` (any attention implementation).
        inputs: ``input_ids [1, L]`` and, with images, ``pixel_values``/``image_grid_thw``.
        keep: ``[layers, Hkv, n]`` positions each layer and KV head keeps (see
            :func:`kept_positions`), or None for the full cache.
        max_new: tokens to generate; decoding also stops after a token in ``stop``.
    """
    prompt_len = inputs["input_ids"].shape[1]
    model.model.rope_deltas = None  # cached by the model across calls
    out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    if keep is not None:
        for layer_id, layer in enumerate(cache.layers):
            idx = keep[layer_id][None, :, :, None]  # [1, Hkv, n, 1]
            layer.keys = layer.keys.gather(2, idx.expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.expand(-1, -1, -1, layer.values.shape[-1]))
    delta = model.model.rope_deltas
    delta = int(delta.flatten()[0]) if delta is not None else 0
    kv_len = keep.shape[-1] if keep is not None else prompt_len
    logits = out.logits[0, -1].float()
    tokens, logprobs = [], []
    for t in range(max_new):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        if t == max_new - 1 or token in stop:
            break
        step = model(
            input_ids=torch.tensor([[token]]),
            past_key_values=cache,
            position_ids=torch.full((3, 1, 1), prompt_len + t + delta, dtype=torch.long),
            cache_position=torch.tensor([kv_len + t]),
            use_cache=True,
        )
        cache = step.past_key_values
        logits = step.logits[0, -1].float()
    return tokens, logprobs


@torch.no_grad()
def keep_sets_from_attention(
    model_eager, inputs: dict, policy: str, kept: int, prefix_len: int, window: int = 32
) -> Tensor:
    """``[layers, Hkv, kept]`` keep-sets of the policy objects (the per-request reference
    path) applied to the attention weights of the whole, unchunked prompt.

    Args:
        model_eager: the model loaded with ``attn_implementation="eager"`` (attention weights
            are returned only then).
        kept: private tokens each head keeps, window included.
        prefix_len: ``P``; positions ``[0, P)`` are shared and never selected.
    """
    model_eager.model.rope_deltas = None
    attentions = model_eager(**inputs, output_attentions=True).attentions
    heads = model_eager.config.get_text_config().num_key_value_heads
    rank, state = make_policy(policy), RequestState()
    layers = len(attentions)
    keep = [
        rank.keep(a[0, :, -window:].float(), heads, kept - window, i, layers, state, prefix_len)
        for i, a in enumerate(attentions)
    ]
    return torch.stack(keep)
