"""Tensor parallelism: every TP rank must take the same compression decisions.

Under ``--tp-size N`` each scheduler rank holds ``1/N`` of the KV heads in its own pool and
runs the same batches (SGLang broadcasts the requests from rank 0). Each rank scores and
compacts its own heads, but the kept length is per request, not per head, so the slots a
compressed request keeps, the slots it frees and its decode position offset must be the
same on every rank: they all derive from the request's config, its prompt and shared-prefix
lengths and the allocator's state, which SGLang keeps identical across TP ranks (with
``--kv-layout cells``, the cell slots of the rank with most cells, which every rank computes
on the host: ``scheduler.store_in_cells``). Nothing rank-local enters them;
:func:`assert_tp_ranks_agree` checks it after every extend batch (one gloo all-gather of a
few integers per request on the TP group's CPU group), and :func:`all_ranks` gathers every
rank's pool accounting for ``/server_info``.
"""

from __future__ import annotations

import torch

STATS = {"tp_checked_batches": 0, "tp_checked_requests": 0}


class RankDivergence(RuntimeError):
    """TP ranks reached different compression decisions (a bug; never serve on)."""


def tp_size(scheduler) -> int:
    return int(getattr(scheduler, "tp_size", 1) or 1)


def decisions(scheduler, reqs) -> list[tuple]:
    """Per compressed request of this batch: ``(rid, kept length, position offset, slot
    checksum)``, plus the allocator's free count after the batch's frees."""
    rows = []
    req_to_token = scheduler.req_to_token_pool.req_to_token
    for req in reqs:
        n = int(req.kv.kv_allocated_len)
        slots = req_to_token[req.kv.req_pool_idx, :n].long()
        weights = torch.arange(1, n + 1, device=slots.device)
        checksum = int((slots * weights).sum())
        rows.append((req.rid, n, int(getattr(req, "bacon_position_offset", 0)), checksum))
    rows.append(("available", scheduler.token_to_kv_pool_allocator.available_size()))
    return rows


def gather(scheduler, obj) -> list:
    """``obj`` of every rank of this scheduler's TP group, in rank order."""
    out = [None] * tp_size(scheduler)
    torch.distributed.all_gather_object(out, obj, group=scheduler.tp_cpu_group)
    return out


def assert_tp_ranks_agree(scheduler, compressed_reqs) -> None:
    """After an extend batch's compression: raise :class:`RankDivergence` unless every TP
    rank kept, freed and offset exactly the same slots. Call on every rank, for every
    extend batch (also those without compressed requests: the collective must match)."""
    if tp_size(scheduler) <= 1:
        return
    everyone = gather(scheduler, decisions(scheduler, compressed_reqs))
    if any(rank != everyone[0] for rank in everyone[1:]):
        raise RankDivergence(f"bacon-sglang: TP ranks took different KV decisions: {everyone}")
    STATS["tp_checked_batches"] += 1
    STATS["tp_checked_requests"] += len(compressed_reqs)


def all_ranks(scheduler, memory: dict) -> list[dict] | None:
    """Every TP rank's ``memory`` (None without tensor parallelism). Every rank answers
    ``GET /server_info`` (SGLang broadcasts control requests to the TP group), so the
    collective matches."""
    if tp_size(scheduler) <= 1:
        return None
    return gather(scheduler, memory)
