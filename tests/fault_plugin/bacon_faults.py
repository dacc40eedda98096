"""Test-only SGLang plugin: makes bacon-sglang's compression raise on purpose.

``tests/test_faults_e2e.py`` puts this folder on the server's ``PYTHONPATH``; its
``*.dist-info`` registers :func:`load` under SGLang's plugin entry point, so every server
process loads it after (or before) bacon-sglang's own plugin. A request whose
``kv_compression`` override asks for one of :data:`MAGIC_BUDGET`'s budgets makes one stage of
the compression path raise ``RuntimeError``: planning (before the forward), scoring or
compaction (inside the forward). Nothing else changes.
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
    from bacon_sglang.patches import attention, scheduler

    plan_compression = scheduler.plan_compression

    def faulty_plan(runtime, req, config, *args, **kwargs):
        if _asks_for(config, "plan"):
            raise InjectedFault("injected planning fault")
        return plan_compression(runtime, req, config, *args, **kwargs)

    def planned(runtime, stage: str) -> bool:
        return any(
            e.compression is not None and _asks_for(e.compression.config, stage)
            for e in runtime.plan or []
        )

    score_layer = attention.score_layer

    def faulty_score(runtime, *args, **kwargs):
        if planned(runtime, "score"):
            raise InjectedFault("injected scoring fault")
        return score_layer(runtime, *args, **kwargs)

    compact_all = attention.compact_all

    def faulty_compact(runtime, *args, **kwargs):
        if planned(runtime, "compact"):
            raise InjectedFault("injected compaction fault")
        return compact_all(runtime, *args, **kwargs)

    if getattr(scheduler.plan_compression, "__name__", "") != "faulty_plan":
        scheduler.plan_compression = faulty_plan
        attention.score_layer = faulty_score
        attention.compact_all = faulty_compact
