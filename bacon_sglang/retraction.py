"""The prefill after a retraction, as plain PyTorch (no SGLang import).

SGLang frees a retracted request's KV and later prefills it again from its tokens: the
prompt and every token it had generated. Without compression that recomputes the same KV.
A compressed request's generated tokens, though, were decoded over the *compressed* prompt:
token ``t`` attended to the kept KV of each layer and head (the shared prefix, the keep-set)
and the generated tokens before it. The prefill after the retraction recomputes the prompt
as its first prefill did (full attention, then compaction to the same keep-set) and, for
the rows of generated tokens, replaces each layer's attention output by that of the decode:
the same tokens, the same KV, the same rotary positions, so the request answers as if it
had never been retracted::

    row of generated token t attends, per layer and KV head h:
        [0, S)                    shared prefix, kept whole
        keep[layer, h]            the prompt tokens the first prefill kept
        [L, t]                    generated tokens up to itself (causal)

``S`` is the shared prefix, ``L`` the prompt length (the row picture:
``bacon_sglang/compression.py``). Ragged keep-sets (uneven policies, ``--kv-layout cells``)
pad a head that keeps fewer tokens with ``KEEP_PAD``: those places are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bacon_sglang.paged import to_device
from bacon_sglang.scoring import window_attention
from bacon_sglang.selection import KEEP_PAD


@dataclass
class RecomputedRows:
    """The rows of one forward that recompute a retracted request's generated tokens.

    Attributes:
        rows: ``[G]`` rows of the forward's flat query tensor.
        slots: ``[layers, Hkv, n]`` the KV slots each layer and KV head attends to; their
            last ``G`` are the rows' own tokens, so the rows are a causal window over them.
        present: ``[layers, Hkv, n]`` False at the padding of ragged keep-sets (its slot
            is a stand-in, never attended); None: every place is a kept token.
    """

    rows: Tensor
    slots: Tensor
    present: Tensor | None = None

    def attend(
        self,
        layer_id: int,
        q: Tensor,
        k_buffer: Tensor,
        v_buffer: Tensor,
        scale: float | None = None,
        logit_cap: float = 0.0,
    ) -> Tensor:
        """Layer ``layer_id``'s attention output of the rows, over the kept KV only.

        Args:
            q: ``[tokens, Hq, d]`` the layer's rotated queries of the whole forward.
            k_buffer, v_buffer: ``[slots, Hkv, d]`` / ``[slots, Hkv, dv]`` the layer's pool.
            scale: softmax scale (``1/sqrt(d)`` when None); ``logit_cap`` > 0: tanh capping.

        Returns:
            ``[G, Hq, dv]`` in fp32.
        """
        slots = self.slots[layer_id]  # [Hkv, n]
        heads = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)
        rows = q.index_select(0, self.rows).transpose(0, 1)  # [Hq, G, d]
        present = None if self.present is None else self.present[layer_id]
        keys = k_buffer[slots, heads]
        attn = window_attention(rows, keys, scale, logit_cap, present)  # [Hq, G, n]
        v = v_buffer[slots, heads].float()  # [Hkv, n, dv]
        v = v.repeat_interleave(attn.shape[0] // v.shape[0], dim=0)  # GQA: [Hq, n, dv]
        return torch.einsum("hgn,hnd->ghd", attn, v)


def recomputed_rows(
    keep: Tensor,
    prefix_len: int,
    prompt_len: int,
    row_slots: Tensor,
    start: int,
    end: int,
    q_start: int,
) -> RecomputedRows | None:
    """The generated tokens among a forward's tokens ``[start, end)`` of a retracted request
    (its prompt: ``prompt_len`` tokens), or None when the forward brings none.

    Args:
        keep: ``[layers, Hkv, kept]`` the prompt positions its first prefill kept, in
            ``[prefix_len, prompt_len)``, or ``KEEP_PAD`` past a head's own count.
        prefix_len: ``S``, prompt tokens kept whole.
        row_slots: ``[>= end]`` the request's ``req_to_token`` row.
        q_start: the forward's row of token ``start``.
    """
    first = max(start, prompt_len)
    if first >= end:
        return None
    num_layers, num_kv_heads, _ = keep.shape
    device = keep.device
    whole = torch.arange(prefix_len, device=device).expand(num_layers, num_kv_heads, -1)
    generated = torch.arange(prompt_len, end, device=device).expand(num_layers, num_kv_heads, -1)
    positions = torch.cat([whole, keep, generated], dim=-1)
    rows = range(q_start + first - start, q_start + end - start)
    slots = row_slots.to(device)[positions.clamp(min=0)]  # padding: position 0's slot
    return RecomputedRows(to_device(list(rows), device), slots, positions != KEEP_PAD)
