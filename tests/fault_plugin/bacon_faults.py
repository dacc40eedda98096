"""Test-only SGLang plugin: makes bacon-sglang's compression raise on purpose.

``tests/test_faults_e2e.py`` puts this folder on the server's ``PYTHONPATH``; its
``*.dist-info`` registers :func:`load` under SGLang's plugin entry point, so every server
process loads it after (or before) bacon-sglang's own plugin. A request whose
``kv_compression`` override asks for one of :data:`MAGIC_BUDGET`'s budgets makes one stage of
the compression path raise ``RuntimeError``: planning (before the forward), scoring (the
served policy's keep-sets) or compaction (both in the pass after the forward's last
layer). Nothing else changes.
"""

from __future__ import annotations

MAGIC_BUDGET = {"plan": 77, "score": 79, "compact": 81}


class InjectedFault(RuntimeError):
    """The fault this plugin raises."""


def _asks_for(req_or_config, stage: str) -> bool:
    budget = getattr(req_or_config, "budget", None)
    return budget == MAGIC_BUDGET[stage]


def load() -> None:
    """Wrap the compression path's stages (called by SGLang in every process)."""
    from bacon_sglang import kernels
    from bacon_sglang.kernels import served
    from bacon_sglang.patches import scheduler

    if getattr(scheduler.plan_compression, "__name__", "") == "faulty_plan":
        return  # loaded already in this process
    plan_compression = scheduler.plan_compression

    def faulty_plan(runtime, req, config, *args, **kwargs):
        if _asks_for(config, "plan"):
            raise InjectedFault("injected planning fault")
        return plan_compression(runtime, req, config, *args, **kwargs)

    def planned(stage: str) -> bool:
        return any(
            e.compression is not None and _asks_for(e.compression.config, stage)
            for e in scheduler.RUNTIME.plan or []
        )

    keep_sets = served.keep_sets

    def faulty_keep_sets(*args, **kwargs):
        if planned("score"):
            raise InjectedFault("injected scoring fault")
        return keep_sets(*args, **kwargs)

    compact = kernels.compact

    def faulty_compact(*args, **kwargs):
        if planned("compact"):
            raise InjectedFault("injected compaction fault")
        return compact(*args, **kwargs)

    scheduler.plan_compression = faulty_plan
    served.keep_sets = faulty_keep_sets
    kernels.compact = faulty_compact
