"""Hooks on ``sglang.srt.managers.schedule_batch.Req``.

* ``Req.reset_for_retract`` (AFTER): a retracted request gives back all its private KV
  (SGLang's ``release_req`` frees ``[cache_protected_len, kv_committed_len)``, which after
  compaction is exactly what the request still holds) and is prefilled again from its tokens
  later. Its position offset belongs to the released KV, so it is dropped here, and so are
  any stashed window queries and its count of cells held (``--kv-layout cells``); the
  keep-set its prefill chose stays on the request (``req.bacon_keep``): the prefill after
  the retraction compacts its prompt to the same tokens (into cells again with ``--kv-layout
  cells``), recomputes the tokens it generated over the kept KV and keeps them whole
  (``patches/scheduler.py``, ``bacon_sglang/retraction.py``).
* ``ScheduleBatch._get_decode_retraction_order`` (AFTER): compressed requests are the last
  to be retracted (:func:`retraction_order`).
* ``Req._compute_max_prefix_len`` (AFTER): with ``--kv-prefix-cache full`` a request that
  will be compressed matches at most ``prompt - window`` tokens in the radix tree, so its
  prefill computes the queries of its whole observation window
  (:func:`bacon_sglang.patches.scheduler.capped_prefix_match`); one prefilled again after a
  retraction matches at most its prompt.
"""

from __future__ import annotations

from bacon_sglang.patches import scheduler
from bacon_sglang.patches.scheduler import capped_prefix_match


def after_reset_for_retract(result, req, *args, **kwargs):
    """AFTER ``Req.reset_for_retract(self)``."""
    req.bacon_position_offset = 0
    if scheduler.RUNTIME is not None:
        scheduler.RUNTIME.windows.pop(req, None)
        scheduler.RUNTIME.cell_requests.pop(req, None)
    return result


def retraction_order(result: list[int], reqs, *args, **kwargs) -> list[int]:
    """AFTER ``ScheduleBatch._get_decode_retraction_order(reqs)`` (staticmethod; most
    preferred to keep first, SGLang retracts from the end): compressed requests move to the
    front, in SGLang's order among themselves. Retracting one frees few slots and costs a
    prefill of its whole prompt."""
    compressed = [getattr(reqs[i], "bacon_position_offset", 0) > 0 for i in result]
    return [i for i, c in zip(result, compressed, strict=True) if c] + [
        i for i, c in zip(result, compressed, strict=True) if not c
    ]


def after_compute_max_prefix_len(result, req, input_len, *args, **kwargs):
    """AFTER ``Req._compute_max_prefix_len(self, input_len)``."""
    return capped_prefix_match(result, req, input_len)


HOOKS = [
    (
        "sglang.srt.managers.schedule_batch.ScheduleBatch._get_decode_retraction_order",
        retraction_order,
        "AFTER",
    ),
    (
        "sglang.srt.managers.schedule_batch.Req.reset_for_retract",
        after_reset_for_retract,
        "AFTER",
    ),
    (
        "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len",
        after_compute_max_prefix_len,
        "AFTER",
    ),
]
