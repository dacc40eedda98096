"""Hooks on ``sglang.srt.entrypoints.engine.Engine``: ``--kv-*`` as ``Engine(...)`` keywords.

``sglang.Engine(model_path=..., kv_policy="bacon", kv_budget=64)`` takes the same names as
the flags (``kv_policy``, ``kv_budget``, ``kv_window``, ``kv_pool_kernel``,
``kv_min_prompt``, ``kv_text_prefix``, ``kv_prefix_cache``, ``kv_layout``,
``kv_head_scores``).
``Engine.__init__`` builds ``ServerArgs(**kwargs)``, which rejects unknown keywords, so they
are taken out first:

* ``Engine.__init__`` (BEFORE): pops the ``kv_*`` keywords, validates them, and remembers
  the config for this construction.
* ``Engine._launch_subprocesses`` (BEFORE): attaches the remembered config to the
  ``ServerArgs`` record before the subprocesses are spawned (see ``patches/server_args.py``
  for how it travels).

The very first ``Engine(...)`` of a process is special: SGLang loads plugins *inside*
``Engine.__init__``, so that call is already running the unhooked ``__init__``. For that one
call :func:`take_kwargs_of_running_engine_init` (run by the plugin's entry point) does the
same job on the keyword dict of the ``Engine.__init__`` frame that is loading the plugins.
"""

from __future__ import annotations

import sys

from bacon_sglang.config import FLAGS, CompressionConfig, ConfigError
from bacon_sglang.patches.server_args import ATTR, attach

ENGINE_KWARGS = tuple(f"kv_{field}" for field, _ in FLAGS.values())

# The config (or the error) of the Engine being constructed, until it is attached.
_pending: CompressionConfig | ConfigError | None = None


def pop_kv_kwargs(kwargs: dict) -> CompressionConfig | ConfigError | None:
    """Remove the ``kv_*`` keywords from ``kwargs``; return their validated config, the
    validation error, or None when none was given."""
    given = {name: kwargs.pop(name) for name in ENGINE_KWARGS if name in kwargs}
    if not given:
        return None
    try:
        return CompressionConfig(
            **{k.removeprefix("kv_"): v for k, v in given.items() if v is not None}
        )
    except ConfigError as exc:
        return exc


def before_engine_init(*args, **kwargs):
    """BEFORE ``Engine.__init__(self, **kwargs)``: raises ConfigError on a bad ``kv_*``."""
    global _pending
    _pending = pop_kv_kwargs(kwargs)
    if isinstance(_pending, ConfigError):
        error, _pending = _pending, None
        raise error
    return args, kwargs


def before_launch_subprocesses(*args, **kwargs):
    """BEFORE ``Engine._launch_subprocesses(cls, server_args, ...)`` (classmethod).

    Raises the ConfigError of a first ``Engine(...)`` whose ``kv_*`` keywords were bad."""
    global _pending
    pending, _pending = _pending, None
    if isinstance(pending, ConfigError):
        raise pending
    server_args = kwargs.get("server_args", args[1] if len(args) > 1 else None)
    if pending is not None and server_args is not None and ATTR not in vars(server_args):
        attach(server_args, pending)
    return None


def take_kwargs_of_running_engine_init() -> None:
    """If plugins are being loaded from inside ``Engine.__init__``, pop the ``kv_*`` keywords
    from that call's keyword dict (see the module docstring)."""
    global _pending
    engine_mod = sys.modules.get("sglang.srt.entrypoints.engine")
    if engine_mod is None:
        return
    init_code = getattr(engine_mod.Engine.__init__, "__wrapped__", engine_mod.Engine.__init__)
    init_code = getattr(init_code, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is init_code:
            kwargs = frame.f_locals.get("kwargs")
            if isinstance(kwargs, dict):
                _pending = pop_kv_kwargs(kwargs)
            return
        frame = frame.f_back


HOOKS = [
    ("sglang.srt.entrypoints.engine.Engine.__init__", before_engine_init, "BEFORE"),
    (
        "sglang.srt.entrypoints.engine.Engine._launch_subprocesses",
        before_launch_subprocesses,
        "BEFORE",
    ),
]
