"""Prometheus counters of bacon-sglang, exported through SGLang's ``/metrics``.

Created in the scheduler process when the server runs with ``--enable-metrics``; SGLang
sets ``PROMETHEUS_MULTIPROC_DIR`` before its processes start, so counters made here are
aggregated into the HTTP server's ``/metrics`` like SGLang's own. No SGLang hook lives here:
``patches/scheduler.py`` creates and increments them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompressionCounters:
    compressed_requests: object
    evicted_tokens: object
    freed_slots: object
    copy_fallbacks: object
    failures: object

    def record(self, evicted: int, freed: int, copy_fallback: bool = False) -> None:
        self.compressed_requests.inc()
        self.evicted_tokens.inc(evicted)
        self.freed_slots.inc(freed)
        if copy_fallback:
            self.copy_fallbacks.inc()


def make_counters() -> CompressionCounters:
    """The counters (import prometheus_client only now: after SGLang set it up)."""
    from prometheus_client import Counter

    return CompressionCounters(
        Counter(
            "sglang:bacon_compressed_requests",
            "Requests whose prompt KV was compressed by bacon-sglang.",
        ),
        Counter(
            "sglang:bacon_evicted_tokens",
            "Prompt tokens evicted from the KV cache (per KV head and layer) by bacon-sglang.",
        ),
        Counter(
            "sglang:bacon_freed_slots",
            "Prompt KV slots compressed requests stopped holding (returned to the allocator, "
            "or left in the radix cache as evictable full-prompt KV).",
        ),
        Counter(
            "sglang:bacon_copy_fallbacks",
            "Compressed requests compacted in place because the pool had no room for a "
            "compressed copy (--kv-prefix-cache full).",
        ),
        Counter(
            "sglang:bacon_compression_failures",
            "Requests whose compression failed and which were served uncompressed (or, "
            "when their KV was half compacted in place, aborted).",
        ),
    )
