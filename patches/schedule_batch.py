"""Hook on ``sglang.srt.managers.schedule_batch.Req.reset_for_retract``.

A retracted request gives back all its private KV (SGLang's ``release_req`` frees
``[cache_protected_len, kv_committed_len)``, which after compaction is exactly what the
request still holds) and is prefilled again from its tokens later, when it is compressed
afresh. Its position offset belongs to the released KV, so it is dropped here (AFTER).
"""

from __future__ import annotations


def after_reset_for_retract(result, req, *args, **kwargs):
    """AFTER ``Req.reset_for_retract(self)``."""
    req.bacon_position_offset = 0
    return result


HOOKS = [
    (
        "sglang.srt.managers.schedule_batch.Req.reset_for_retract",
        after_reset_for_retract,
        "AFTER",
    ),
]
