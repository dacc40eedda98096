"""Hooks on ``sglang.srt.managers.schedule_batch.Req``.

* ``Req.reset_for_retract`` (AFTER): a retracted request gives back all its private KV
  (SGLang's ``release_req`` frees ``[cache_protected_len, kv_committed_len)``, which after
  compaction is exactly what the request still holds) and is prefilled again from its tokens
  later, when it is compressed afresh. Its position offset belongs to the released KV, so it
  is dropped here.
* ``Req._compute_max_prefix_len`` (AFTER): with ``--kv-prefix-cache full`` a request that
  will be compressed matches at most ``prompt - window`` tokens in the radix tree, so its
  prefill computes the queries of its whole observation window
  (:func:`bacon_sglang.patches.scheduler.capped_prefix_match`).
"""

from __future__ import annotations

from bacon_sglang.patches.scheduler import capped_prefix_match


def after_reset_for_retract(result, req, *args, **kwargs):
    """AFTER ``Req.reset_for_retract(self)``."""
    req.bacon_position_offset = 0
    return result


def after_compute_max_prefix_len(result, req, input_len, *args, **kwargs):
    """AFTER ``Req._compute_max_prefix_len(self, input_len)``."""
    return capped_prefix_match(result, req, input_len)


HOOKS = [
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
