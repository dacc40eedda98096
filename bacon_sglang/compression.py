"""One request's compression at the end of its prefill, as plain PyTorch (no SGLang import).

The data path, one step per function::

    prefill layer l ──> window queries of the last w prompt tokens  (WindowQueries)
                   ──> window scores from K in the pool, calibration, keep-set [Hkv, kept],
                       batched over the finishing requests           (kernels.keep_sets)
                   ──> recorded per request                          (RequestCompression.record)
    after layer L-1 ──> compaction of every layer, in place          (kernels.compact)
    scheduler       ──> slots [ceil(P + kept), L) freed, KV length P + kept

The ranges of one request's ``req_to_token`` row (positions, not slots)::

    0 ............ P-1 | P ............. P+kept-1 | P+kept ........ L-1 | L ...
    shared prefix      | private, kept           | private, evicted   | generated
    (radix tree: never | (K/V of the kept tokens | (slots freed to the | (decode writes
     touched or freed) |  of each head, moved    |  allocator, whole  |  at P+kept+t,
                       |  here in order)         |  pages)            |  position L+t)

``kept`` counts the observation window (the last ``w`` prompt tokens, always kept).

With a copy (``--kv-prefix-cache full``), the kept K/V go to ``copy_slots`` instead, the
request's row is pointed at them for ``[P, P + kept)``, and the slots of ``[P, L)`` stay
untouched, for the radix tree (``patches/radix_cache.py`` draws the picture).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bacon_sglang.config import CompressionConfig
from bacon_sglang.policies import Policy, RequestState
from bacon_sglang.scoring import HISTORY, window_attention


@dataclass
class WindowQueries:
    """The rotated queries of a request's last ``w`` prompt tokens, per layer.

    A chunked prefill may end with a chunk shorter than ``w``; the rows of earlier chunks are
    kept here (the newest ``w`` per layer) so the last chunk sees the whole window."""

    window: int
    rows: dict[int, Tensor] = field(default_factory=dict)  # layer -> [<= w, Hq, d]

    def add(self, layer_id: int, q: Tensor) -> Tensor:
        """Append this forward's query rows ``[n, Hq, d]`` of the request for ``layer_id``;
        returns the newest ``<= w`` rows."""
        q = q[-self.window :]
        previous = self.rows.get(layer_id)
        if previous is not None and q.shape[0] < self.window:
            q = torch.cat([previous, q])[-self.window :]
        self.rows[layer_id] = q.detach().clone()
        return self.rows[layer_id]


@dataclass
class RequestCompression:
    """Compression of one request whose prompt ends in the current forward.

    Attributes:
        config: the request's effective config.
        policy: its policy object.
        prompt_len: ``L``, prompt tokens in KV after the forward.
        prefix_len: ``P``, tokens shared with the radix tree (never touched).
        kept: private prompt tokens each KV head keeps (window included).
        slots: ``[L]`` slot ids of the prompt (snapshot of the ``req_to_token`` row).
        keep: ``[num_layers, Hkv, kept]`` positions kept per layer and head (filled layer by
            layer).
        cached_len: tokens of the prompt matched in the radix tree (not prefilled).
        copy_slots: ``[>= kept]`` fresh slots the kept K/V are gathered into (their first
            ``kept``), or None: compacted in place, into ``slots[P:P + kept]``.
        copy_fallback: a copy was asked for but the pool had no room for it.
    """

    config: CompressionConfig
    policy: Policy
    prompt_len: int
    prefix_len: int
    kept: int
    slots: Tensor
    keep: Tensor
    cached_len: int = 0
    copy_slots: Tensor | None = None
    copy_fallback: bool = False
    state: RequestState = field(default_factory=RequestState)

    @property
    def new_len(self) -> int:
        """KV length after compaction: ``P + kept``."""
        return self.prefix_len + self.kept

    @property
    def evicted(self) -> int:
        return self.prompt_len - self.new_len

    def destination(self) -> Tensor:
        """``[P + kept]`` slot of each kept position after compaction: the row itself, or
        with a copy, the row's prefix followed by the copy's slots."""
        if self.copy_slots is None:
            return self.slots[: self.new_len]
        copy = self.copy_slots[: self.kept].to(self.slots.dtype)
        return torch.cat([self.slots[: self.prefix_len], copy])

    def record(self, layer_id: int, keep: Tensor, evidence: Tensor | None = None) -> None:
        """Store layer ``layer_id``'s keep-set ``[Hkv, kept]`` (sorted positions in
        ``[P, L)``) and, for BACON, its evidence ``[Hkv, T]`` (the newest ``HISTORY`` layers
        are kept for the persistence term of the next layers)."""
        if keep.shape != self.keep.shape[1:] or bool((keep < self.prefix_len).any()):
            raise RuntimeError(
                f"policy {self.config.policy} returned a keep-set of shape {tuple(keep.shape)} "
                f"for kept={self.kept}, prefix={self.prefix_len}"
            )
        self.keep[layer_id] = keep
        if evidence is not None:
            self.state.evidence.append(evidence)
            del self.state.evidence[: max(0, len(self.state.evidence) - HISTORY)]

    def score_layer(
        self, layer_id: int, q_window: Tensor, keys: Tensor, scale: float | None
    ) -> Tensor:
        """Compute and record layer ``layer_id``'s keep-set through the policy object, one
        request at a time: the reference of the batched path the server runs
        (``bacon_sglang.kernels.keep_sets``, called by ``patches/attention.py``).

        Args:
            q_window: ``[w, Hq, d]`` rotated queries of the last ``w`` prompt tokens.
            keys: ``[L, Hkv, d]`` rotated keys of the whole prompt (prefix included).
            scale: softmax scale (``1/sqrt(d)`` when None).

        Returns:
            ``[Hkv, kept]`` sorted positions in ``[P, L)``.
        """
        num_layers, num_kv_heads, _ = self.keep.shape
        attn = window_attention(q_window.transpose(0, 1), keys.transpose(0, 1), scale)
        keep = self.policy.keep(
            attn,
            num_kv_heads,
            self.kept - attn.shape[1],
            layer_id,
            num_layers,
            self.state,  # the policy appends its evidence itself
            first_candidate=self.prefix_len,
        )
        self.record(layer_id, keep)
        return keep

    def stats(self, page_size: int = 1, tree_tokens: int | None = None) -> dict:
        """The per-request report that goes into the response's ``meta_info``.

        ``freed_slots``: prompt slots the request no longer holds (back to the allocator or,
        with a copy, left in the radix tree as evictable cache); ``tree_tokens``: prompt
        tokens the radix tree holds for it afterwards (default: its shared prefix)."""
        freed_from = -(-self.new_len // page_size) * page_size
        return {
            "policy": self.config.policy,
            "budget": self.config.budget,
            "prompt_tokens": self.prompt_len,
            "cached_tokens": self.cached_len,
            "shared_prefix_tokens": self.prefix_len,
            "kept_tokens": self.new_len,
            "evicted_tokens": self.evicted,
            "freed_slots": max(0, self.prompt_len - freed_from),
            "kv_source": "copy" if self.copy_slots is not None else "in_place",
            "copy_fallback": self.copy_fallback,
            "tree_tokens": self.prefix_len if tree_tokens is None else tree_tokens,
        }


def plan_request(
    config: CompressionConfig,
    policy: Policy,
    prompt_len: int,
    prefix_len: int,
    slots: Tensor,
    num_layers: int,
    num_kv_heads: int,
    cached_len: int = 0,
) -> RequestCompression | None:
    """A :class:`RequestCompression` for a prompt of ``prompt_len`` tokens whose first
    ``prefix_len`` are kept whole, or None when this prompt is not compressed."""
    private = prompt_len - prefix_len
    if not config.should_compress(private):
        return None
    kept = config.kept_tokens(private)
    keep = torch.empty(num_layers, num_kv_heads, kept, dtype=torch.long, device=slots.device)
    return RequestCompression(
        config, policy, prompt_len, prefix_len, kept, slots, keep, cached_len=cached_len
    )
