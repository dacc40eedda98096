"""Hooks on ``sglang.srt.managers.scheduler.Scheduler`` (the scheduler subprocess).

* ``Scheduler.__init__`` (AFTER): reads the compression config that travelled on
  ``ServerArgs`` (``patches/server_args.py``) and keeps it on the scheduler as
  ``scheduler.bacon_kv_config``; logs it once per scheduler process.
"""

from __future__ import annotations

import logging

from bacon_sglang.patches.server_args import config_of

logger = logging.getLogger(__name__)


def after_scheduler_init(result, scheduler, server_args, *args, **kwargs):
    """AFTER ``Scheduler.__init__(self, server_args, port_args, ...)``."""
    config = config_of(server_args)
    scheduler.bacon_kv_config = config
    logger.info("bacon-sglang: scheduler KV compression config: %s", config.to_dict())
    return result


HOOKS = [
    ("sglang.srt.managers.scheduler.Scheduler.__init__", after_scheduler_init, "AFTER"),
]
