"""SGLang's radix cache and KV allocator, as ``--kv-prefix-cache full`` uses them.

No hook lives here: ``patches/scheduler.py`` calls these helpers around the prefill forward
of a request whose prompt ends in it.

With ``full``, a compressed request's whole prompt stays in the radix tree with its
uncompressed KV, and the request decodes from a private compressed copy::

    before the forward    copy slots allocated (page-rounded ``kept``), evicting LRU cache
                          if needed; none free: the request is compacted in place instead
    in the forward        every layer's kept K/V gathered into the copy (kernels.compact)
    after the forward     prompt [0, floor(L)) inserted into the tree (tree_cache.checkpoint);
                          the tail [floor(L), L) freed; the request's tree lock moved back
                          from the end of the prompt to the end of its shared text S;
                          req_to_token[row, S:S+kept] = copy slots

The row and the tree afterwards: the picture in ``bacon_sglang/compression.py``.

So the next question about the same image (or the next turn of a chat) matches the full
prompt, and scores its own window over exact, uncompressed keys.
"""

from __future__ import annotations

import torch


def alloc_copy(tree_cache, kept: int) -> torch.Tensor | None:
    """``[ceil(kept / page) * page]`` fresh slots (whole pages) for a compressed copy of
    ``kept`` tokens, evicting unlocked radix-cache entries (LRU) when the pool is short;
    None when even that leaves too few free slots."""
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    allocator = tree_cache.token_to_kv_pool_allocator
    page = allocator.page_size
    need = -(-kept // page) * page
    evict_from_tree_cache(tree_cache, need)
    if allocator.available_size() < need:
        return None
    return allocator.alloc(need)


def free_copy(tree_cache, slots: torch.Tensor) -> None:
    """Give back copy slots that were allocated but never used (a failed forward)."""
    tree_cache.token_to_kv_pool_allocator.free(slots)


def publish_prompt(
    tree_cache, req, prompt_len: int, shared_len: int, row_len: int | None = None
) -> int:
    """Insert the request's prompt ``[0, floor(prompt_len))`` with its full KV into the tree,
    free the unpublished rest of its row up to ``row_len`` (default ``prompt_len``; more
    after a retraction, whose generated tokens are in the copy), and leave the request
    locking only its shared text ``[0, shared_len)`` (``shared_len`` page-aligned), so the
    rest is evictable cache.

    Must run before the row is repointed at the compressed copy (the tree takes the slots
    the row holds). Returns the prompt tokens the tree now holds for this prompt."""
    row_len = prompt_len if row_len is None else row_len
    tree_cache.checkpoint(req, up_to=prompt_len)
    published = req.kv.cache_protected_len
    if published < row_len:
        tree_cache.free_kv_row(req.kv, [(published, row_len)])
    relock(tree_cache, req, shared_len)
    return published


def relock(tree_cache, req, shared_len: int) -> None:
    """Move the request's tree lock to the node ending at ``shared_len`` (an ancestor of the
    node it locks now, on the path of its own prompt; the root when 0)."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    if shared_len > 0:
        key = RadixKey(
            req.full_untruncated_fill_ids[:shared_len],
            req.extra_key,
            cache_salt=req.cache_salt,
        )
        match = tree_cache.match_prefix(MatchPrefixParams(key=key))
        if match.device_prefix_len != shared_len:
            raise RuntimeError(
                f"bacon-sglang: {req.rid}: shared text of {shared_len} tokens not in the "
                f"radix tree after insert (matched {match.device_prefix_len})"
            )
        node, lock = match.last_device_node, tree_cache.lock(match.last_device_node)
    else:
        node, lock = tree_cache.root_node_handle(req.extra_key), None
    tree_cache.unlock(req.lock)
    req.lock = lock
    req.last_node = node
    req.kv.cache_protected_len = shared_len


def point_row_at(req_to_token_pool, req, start: int, slots: torch.Tensor) -> None:
    """``req_to_token[row, start:start + len(slots)] = slots``."""
    row = req.kv.req_pool_idx
    req_to_token_pool.write((row, slice(start, start + len(slots))), slots.to(torch.int32))
