"""Hook on ``SchedulerOutputStreamer`` (scheduler process): the compression report travels
with the request's output.

The scheduler hook stores ``req.customized_info["kv_compression"] = [stats]``; SGLang's own
customized-info channel takes it to the tokenizer manager (see
``patches/tokenizer_manager.py`` for its arrival in ``meta_info``).

* ``SchedulerOutputStreamer.is_request_level_customized_info_key`` (AFTER):
  ``kv_compression`` is reported once per request, not sliced per output token.
"""

from __future__ import annotations

KEY = "kv_compression"


def after_is_request_level_key(result, streamer, key, *args, **kwargs):
    """AFTER ``SchedulerOutputStreamer.is_request_level_customized_info_key(self, key)``."""
    return True if key == KEY else None


HOOKS = [
    (
        "sglang.srt.managers.scheduler_components.output_streamer."
        "SchedulerOutputStreamer.is_request_level_customized_info_key",
        after_is_request_level_key,
        "AFTER",
    ),
]
