"""Every place bacon-sglang hooks SGLang, one module per SGLang subsystem.

Each module lists its hooks in ``HOOKS`` as ``(dotted target, hook, hook type)``;
:func:`register_all` registers them with SGLang's ``HookRegistry``. This is the only
package that imports SGLang internals.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from bacon_sglang.patches import (
    attention,
    cells,
    cuda_graph,
    entrypoints,
    forward_batch,
    output_streamer,
    schedule_batch,
    scheduler,
    server_args,
    tokenizer_manager,
)

MODULES = (
    server_args,
    entrypoints,
    tokenizer_manager,
    scheduler,
    attention,
    cells,
    forward_batch,
    schedule_batch,
    output_streamer,
    cuda_graph,
)


def all_hooks() -> list[tuple[str, object, str]]:
    return [hook for module in MODULES for hook in module.HOOKS]


def register_all() -> None:
    """Register every hook of every module (idempotent per target and hook)."""
    for target, hook, hook_type in all_hooks():
        if any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
            continue
        HookRegistry.register(target, hook, HookType[hook_type])


def unapplied_targets() -> list[str]:
    """Targets registered by this package that SGLang failed to patch (should be empty)."""
    return [t for t, _, _ in all_hooks() if t not in HookRegistry._patched]
