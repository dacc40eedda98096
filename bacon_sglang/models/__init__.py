"""Models built on the spot for offline tests and CPU benchmarks (see :mod:`.tiny`)."""

from bacon_sglang.models.tiny import TinyQwen2VLSpec, ensure_tiny_model

__all__ = ["TinyQwen2VLSpec", "ensure_tiny_model"]
