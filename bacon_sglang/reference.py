"""A plain transformers reference for compressed decoding (tests and the accuracy benchmark).

Given a Qwen2-VL model in transformers and a request's keep-sets (as the server writes them
with ``--kv-debug-dir``), :func:`decode_with_keep_sets` decodes greedily from a KV cache
reduced to the shared prefix plus each head's kept positions, at the logical (mrope)
positions the server uses; :func:`keep_sets_from_attention` recomputes the keep-sets with the
per-request policy objects from the model's own attention weights of the whole prompt.
No SGLang import: this is what the server is checked against.

Keep-sets may also differ per layer (PyramidKV) and per KV head (AdaKV, SparseMM: rows padded
with ``KEEP_PAD``), which SGLang does not serve: :func:`decode_with_keep_sets` then decodes
through :data:`KEPT_ATTENTION`, an attention function that masks each head's padding.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from bacon_sglang.policies import Policy, RequestState, make_policy
from bacon_sglang.selection import KEEP_PAD

# transformers attention implementation of ragged decoding (registered on first use).
KEPT_ATTENTION = "bacon_kept"


def _kept_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of decode queries over a reduced cache, with ``module.kept_bias``
    (``[Hkv, n]``: 0 for kept slots, -inf for a head's padding) added to every query head of
    the KV group; columns past ``n`` (tokens decoded since) are visible. Same signature and
    output as transformers' ``sdpa_attention_forward``; ``query``: ``[B, Hq, q, d]``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    mask = attention_mask
    bias = getattr(module, "kept_bias", None)
    if bias is not None:
        full = torch.zeros(bias.shape[0], key.shape[2], dtype=query.dtype, device=query.device)
        full[:, : bias.shape[1]] = bias
        full = full.repeat_interleave(groups, dim=0)[None, :, None, :]  # [1, Hq, 1, n]
        mask = full if mask is None else mask + full
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def _ragged_decoding(model, keep: Sequence[Tensor]):
    """Decode ``model``'s text layers with :func:`_kept_attention` and each layer's padding
    mask (``keep[l] < 0``); restores the attention implementation afterwards."""
    from transformers import AttentionInterface

    AttentionInterface.register(KEPT_ATTENTION, _kept_attention)
    text = model.model.language_model
    layers = [layer.self_attn for layer in text.layers]
    before = text.config._attn_implementation
    for attn, k in zip(layers, keep, strict=True):
        bias = torch.zeros(k.shape, dtype=torch.float32)
        attn.kept_bias = bias.masked_fill(k < 0, float("-inf"))
    text.config._attn_implementation = KEPT_ATTENTION
    try:
        yield
    finally:
        text.config._attn_implementation = before
        for attn in layers:
            del attn.kept_bias


def kept_positions(keep: Tensor, prefix_len: int) -> Tensor:
    """``[layers, Hkv, P + kept]``: the shared prefix ``[0, P)`` followed by ``keep``
    (``[layers, Hkv, kept]`` private positions, as the server records them)."""
    prefix = torch.arange(prefix_len, device=keep.device).expand(*keep.shape[:2], -1)
    return torch.cat([prefix, keep], dim=-1)


@dataclass
class Prefill:
    """A full-cache prefill of one prompt, reusable by several :func:`decode_with_keep_sets`
    calls (each reduces its own copy of the cache)."""

    output: object  # the model's output (logits, past_key_values)
    rope_deltas: Tensor | None


@torch.no_grad()
def prefill(model, inputs: dict) -> Prefill:
    """Run ``model`` over the prompt ``inputs`` with a full KV cache."""
    model.model.rope_deltas = None  # cached by the model across calls
    out = model(**inputs, use_cache=True)
    return Prefill(out, model.model.rope_deltas)


def is_ragged(keep: Tensor | Sequence[Tensor] | None) -> bool:
    """Whether ``keep`` differs in length between layers or pads some head's row."""
    if keep is None:
        return False
    return len({k.shape[-1] for k in keep}) > 1 or any(bool((k < 0).any()) for k in keep)


@torch.no_grad()
def decode_with_keep_sets(
    model,
    inputs: dict,
    keep: Tensor | Sequence[Tensor] | None,
    max_new: int,
    stop: Collection[int] = (),
    masked: bool | None = None,
    prefilled: Prefill | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities after a full prefill of ``inputs`` (a
    processor's output for one prompt), with the KV cache reduced to ``keep``.

    Args:
        model: ``Qwen2VLForConditionalGeneration`` (any attention implementation).
        inputs: ``input_ids [1, L]`` and, with images, ``pixel_values``/``image_grid_thw``.
        keep: ``[layers, Hkv, n]`` positions each layer and KV head keeps (see
            :func:`kept_positions`), or one ``[Hkv, n_l]`` per layer whose rows may end in
            ``KEEP_PAD`` (per-layer, per-head counts), or None for the full cache.
        max_new: tokens to generate; decoding also stops after a token in ``stop``.
        masked: decode through :data:`KEPT_ATTENTION` (default: only when ``keep`` is ragged,
            see :func:`is_ragged`); the tests force it to compare both paths.
        prefilled: :func:`prefill` of the same ``model`` and ``inputs`` to start from
            (its cache is copied, not changed); None runs the prefill here.
    """
    prompt_len = inputs["input_ids"].shape[1]
    if prefilled is None:
        prefilled = prefill(model, inputs)
        cache = prefilled.output.past_key_values
    else:
        cache = copy.deepcopy(prefilled.output.past_key_values)
    model.model.rope_deltas = prefilled.rope_deltas
    out = prefilled.output
    if keep is not None:
        for layer_id, layer in enumerate(cache.layers):
            idx = keep[layer_id].clamp(min=0)[None, :, :, None]  # [1, Hkv, n, 1]
            layer.keys = layer.keys.gather(2, idx.expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.expand(-1, -1, -1, layer.values.shape[-1]))
    masked = is_ragged(keep) if masked is None else masked
    if masked and keep is None:
        raise ValueError("masked decoding needs keep-sets")
    if masked:
        with _ragged_decoding(model, keep):
            return _decode(model, out, cache, prompt_len, keep[0].shape[-1], max_new, stop)
    kv_len = keep[0].shape[-1] if keep is not None else prompt_len
    return _decode(model, out, cache, prompt_len, kv_len, max_new, stop)


def _decode(model, out, cache, prompt_len: int, kv_len: int, max_new: int, stop) -> tuple:
    """The greedy loop of :func:`decode_with_keep_sets` after its prefill ``out``."""
    delta = model.model.rope_deltas
    delta = int(delta.flatten()[0]) if delta is not None else 0
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
def keep_sets_per_layer(
    model_eager,
    inputs: dict,
    policy: str | Policy,
    kept: int,
    prefix_len: int,
    window: int = 32,
) -> list[Tensor]:
    """One ``[Hkv, k_l + window]`` keep-set per layer (rows padded with ``KEEP_PAD`` where
    the policy gives heads different counts) of the policy objects (the per-request
    reference path) applied to the attention weights of the whole, unchunked prompt.

    Args:
        model_eager: the model loaded with ``attn_implementation="eager"`` (attention weights
            are returned only then).
        policy: a policy name for :func:`make_policy` or a policy object.
        kept: the budget (:mod:`bacon_sglang.config`): private tokens each head keeps (the
            mean, for uneven allocations).
        prefix_len: ``P``; positions ``[0, P)`` are shared and never selected.
    """
    windows = window_attentions(model_eager, inputs, window)
    heads = model_eager.config.get_text_config().num_key_value_heads
    return keep_sets_from_windows(windows, heads, policy, kept, prefix_len)


@torch.no_grad()
def window_attentions(model_eager, inputs: dict, window: int = 32) -> list[Tensor]:
    """Each layer's ``[Hq, window, L]`` float32 attention of the last ``window`` prompt
    queries (``model_eager`` loaded with ``attn_implementation="eager"``)."""
    model_eager.model.rope_deltas = None
    attentions = model_eager(**inputs, output_attentions=True).attentions
    return [a[0, :, -window:].float() for a in attentions]


def keep_sets_from_windows(
    windows: Sequence[Tensor], num_kv_heads: int, policy: str | Policy, kept: int, prefix_len: int
) -> list[Tensor]:
    """:func:`keep_sets_per_layer` from :func:`window_attentions` computed once."""
    rank = make_policy(policy) if isinstance(policy, str) else policy
    state = RequestState()
    window = windows[0].shape[1]
    return [
        rank.keep(a, num_kv_heads, kept - window, i, len(windows), state, prefix_len)
        for i, a in enumerate(windows)
    ]


def keep_sets_from_attention(
    model_eager, inputs: dict, policy: str, kept: int, prefix_len: int, window: int = 32
) -> Tensor:
    """``[layers, Hkv, kept]`` keep-sets of a uniform policy (see :func:`keep_sets_per_layer`)."""
    return torch.stack(keep_sets_per_layer(model_eager, inputs, policy, kept, prefix_len, window))


def slots_held(keep: Tensor | Sequence[Tensor]) -> int:
    """KV slots a request would hold in a pool shared by all layers and heads: the largest
    number of positions any (layer, KV head) keeps (``KEEP_PAD`` not counted)."""
    return max(int((k != KEEP_PAD).sum(-1).max()) for k in keep)
