"""Models built on the spot for offline tests and CPU benchmarks (see :mod:`.tiny`).

``TinyQwen2VLSpec`` and ``ensure_tiny_model`` are loaded on first use, so that importing
:mod:`.vqa` (the demo does) does not import torch.
"""

__all__ = ["TinyQwen2VLSpec", "ensure_tiny_model"]


def __getattr__(name: str):
    if name in __all__:
        from bacon_sglang.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
