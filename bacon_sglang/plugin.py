"""SGLang general plugin entry point (group ``sglang.srt.plugins``, name ``bacon``).

SGLang calls :func:`load` in every process it starts (launcher, scheduler, detokenizer)
before parsing arguments, then applies the registered hooks. :func:`load` only registers
hooks through ``HookRegistry``; everything they do lives in ``bacon_sglang.patches``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load() -> None:
    """Register bacon-sglang's hooks (the entry point SGLang calls)."""
    from bacon_sglang.patches import entrypoints, register_all

    register_all()
    entrypoints.take_kwargs_of_running_engine_init()
    logger.debug("bacon-sglang plugin loaded")
