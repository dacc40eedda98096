"""The one configuration record of bacon-sglang: which policy, which budget, which window.

It is parsed once, from SGLang's command line (``--kv-*`` flags), from ``sglang.Engine``
keyword arguments, or from a dict; it is frozen and travels to SGLang's subprocesses on the
``ServerArgs`` record (see ``patches/server_args.py``). No SGLang import here.

Two counts, one meaning each in every layer of the project (stated here only):

- **budget**: the prompt tokens each KV head keeps per layer, the observation window
  included (a fraction resolves per prompt: :meth:`CompressionConfig.kept_tokens`):
  ``--kv-budget``, a request's ``budget`` override, the response's
  ``meta_info["kv_compression"]["budget"]``, the KV benchmarks' ``--budget(s)`` and tables.
- **candidates** (``K``): ``budget - window``, how many of the prompt tokens before the window
  (the candidates, ``T`` of them) a policy selects per KV head; the window is kept on top.
  What ``bacon_sglang.policies``, ``allocation``, ``scoring``, ``selection``, ``paged`` and
  ``kernels`` take. Uneven allocations (PyramidKV, AdaKV, SparseMM) give each (layer, KV
  head) its own count, ``K`` on average.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POLICY_NAMES: tuple[str, ...] = (
    "none", "snapkv", "bacon", "pyramidkv", "adakv", "sparsemm", "bacon-pyramidkv",
    "bacon-adakv", "bacon-sparsemm",
)  # fmt: skip
# Policies whose (layer, KV head) keep-sets differ in size: served with --kv-layout cells only
# (with slots every layer and head would hold the largest, the memory this layout saves).
RAGGED_POLICIES: tuple[str, ...] = tuple(
    p for p in POLICY_NAMES if p.endswith(("pyramidkv", "adakv", "sparsemm"))
)
# Policies that need SparseMM's offline visual-head scores (--kv-head-scores).
HEAD_SCORE_POLICIES: tuple[str, ...] = ("sparsemm", "bacon-sparsemm")
TEXT_PREFIX_MODES: tuple[str, ...] = ("compress", "share")
PREFIX_CACHE_MODES: tuple[str, ...] = ("full", "shared")
LAYOUTS: tuple[str, ...] = ("slots", "cells")

# Flag name -> (config field, help text). The flags, the Engine keyword arguments and the
# per-request override keys are all derived from this one table.
FLAGS: dict[str, tuple[str, str]] = {
    "--kv-policy": (
        "policy",
        "KV-cache compression policy applied at the end of prefill: none (default: SGLang as "
        "without the plugin), snapkv, bacon; with --kv-layout cells also the uneven "
        "allocations pyramidkv, adakv, sparsemm and bacon-<base> of each.",
    ),
    "--kv-budget": (
        "budget",
        "Prompt tokens kept per KV head per layer, counting the observation window (default "
        "64). A value strictly between 0 and 1 keeps that fraction of the compressible prompt.",
    ),
    "--kv-window": ("window", "Observation window: the last N prompt tokens (default 32)."),
    "--kv-pool-kernel": (
        "pool_kernel",
        "Average-pool kernel along the token axis for scores (odd, default 5).",
    ),
    "--kv-min-prompt": (
        "min_prompt",
        "Prompts (private part) shorter than this are never compressed (default: budget + window).",
    ),
    "--kv-text-prefix": (
        "text_prefix",
        "The prompt text before its first image (e.g. a system prompt): compress (default) "
        "like the rest, or share: keep it whole and insert it into the radix cache, so "
        "requests that start with the same text reuse its KV.",
    ),
    "--kv-prefix-cache": (
        "prefix_cache",
        "What a compressed request leaves in the radix cache: full (default): its whole "
        "prompt with uncompressed KV, as evictable cache, while it decodes from a private "
        "compressed copy (a later request with the same image or chat history hits the "
        "cache); shared: only the prefix it matched (and the text kept by "
        "--kv-text-prefix share); the prompt is compacted in place and never cached.",
    ),
    "--kv-layout": (
        "layout",
        "How a compressed request's kept KV is stored: slots (default): each kept token in "
        "its own slot, every layer and KV head (a request holds its largest keep-set); "
        "cells: head-granular, each (layer, KV head) keeps its own tokens packed into whole "
        "slots (a request holds the sum of its keep-sets; patches/head_granular.md).",
    ),
    "--kv-head-scores": (
        "head_scores",
        "SparseMM's visual-head scores of the model, a visual_heads.json ([layers][KV heads], "
        "as training/visual_heads.py writes it); required by sparsemm and bacon-sparsemm.",
    ),
    "--kv-debug-dir": (
        "debug_dir",
        "Write each compressed request's per-layer, per-head keep-sets to DIR/<rid>.pt "
        "(debugging and tests).",
    ),
}

# Keys a request may override (its ``custom_params["kv_compression"]``).
OVERRIDABLE = ("policy", "budget", "window", "pool_kernel", "min_prompt", "prefix_cache")

# The largest average-pool kernel (flag or override): wider kernels smear a score over more
# than a few image patches, and on a GPU each distinct kernel compiles its own variant.
MAX_POOL_KERNEL = 31
# A request may ask for an observation window up to this (or the server's own, if larger):
# the window's queries are held per layer during the prefill, so it bounds that memory.
MAX_OVERRIDE_WINDOW = 1024


class ConfigError(ValueError):
    """A bad ``--kv-*`` value; the message names the flag and fits on one line."""


@dataclass(frozen=True)
class CompressionConfig:
    """Validated KV-compression settings.

    ``budget`` (see the module docstring) is either an int >= ``window`` or a float in
    (0, 1) (a fraction of the compressible prompt).
    ``min_prompt`` is always resolved (never None) after construction.
    """

    policy: str = "none"
    budget: int | float = 64
    window: int = 32
    pool_kernel: int = 5
    min_prompt: int | None = None
    text_prefix: str = "compress"
    prefix_cache: str = "full"
    layout: str = "slots"
    head_scores: str | None = None
    debug_dir: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ConfigError(
                f"--kv-policy: unknown policy {self.policy!r}; choose one of "
                f"{', '.join(POLICY_NAMES)}"
            )
        if self.text_prefix not in TEXT_PREFIX_MODES:
            raise ConfigError(
                f"--kv-text-prefix: expected one of {', '.join(TEXT_PREFIX_MODES)}, "
                f"got {self.text_prefix!r}"
            )
        if self.prefix_cache not in PREFIX_CACHE_MODES:
            raise ConfigError(
                f"--kv-prefix-cache: expected one of {', '.join(PREFIX_CACHE_MODES)}, "
                f"got {self.prefix_cache!r}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"--kv-layout: expected one of {', '.join(LAYOUTS)}, got {self.layout!r}"
            )
        if self.policy in RAGGED_POLICIES and self.layout != "cells":
            raise ConfigError(
                f"--kv-policy: {self.policy} keeps a different number of tokens per (layer, KV "
                "head); it needs --kv-layout cells"
            )
        if self.policy in HEAD_SCORE_POLICIES and not self.head_scores:
            raise ConfigError(
                f"--kv-head-scores: policy {self.policy} needs the model's visual-head scores "
                "(a visual_heads.json)"
            )
        _require_int("--kv-window", self.window, minimum=1)
        _require_int("--kv-pool-kernel", self.pool_kernel, minimum=1)
        if self.pool_kernel > MAX_POOL_KERNEL:
            raise ConfigError(
                f"--kv-pool-kernel: must be <= {MAX_POOL_KERNEL}, got {self.pool_kernel}"
            )
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"--kv-pool-kernel: must be odd, got {self.pool_kernel}")
        budget = _parse_budget(self.budget)
        if not self.is_fractional(budget) and budget < self.window:
            raise ConfigError(
                f"--kv-budget: {budget} is smaller than the observation window "
                f"--kv-window {self.window}; the budget counts the window"
            )
        object.__setattr__(self, "budget", budget)
        if self.min_prompt is None:
            default = 2 * self.window if self.is_fractional(budget) else budget + self.window
            object.__setattr__(self, "min_prompt", default)
        else:
            _require_int("--kv-min-prompt", self.min_prompt, minimum=1)

    @staticmethod
    def is_fractional(budget: int | float) -> bool:
        return isinstance(budget, float)

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def kept_tokens(self, private_len: int) -> int:
        """Prompt tokens kept per KV head for a private (uncached) prompt of ``private_len``.

        Window included; never more than the prompt itself.
        """
        if self.is_fractional(self.budget):
            kept = max(self.window, math.ceil(self.budget * private_len))
        else:
            kept = int(self.budget)
        return min(kept, private_len)

    def should_compress(self, private_len: int) -> bool:
        """Whether a private prompt of this length is compressed (policy on, long enough,
        and the budget actually evicts something)."""
        return (
            self.enabled
            and private_len >= self.min_prompt
            and private_len > self.window
            and self.kept_tokens(private_len) < private_len
        )

    def with_overrides(
        self, overrides: dict[str, Any], context_len: int | None = None
    ) -> CompressionConfig:
        """A copy with a request's override applied (its ``custom_params["kv_compression"]``).

        Keys: policy, budget, window, pool_kernel, min_prompt, prefix_cache, optionally
        prefixed with ``kv_``; each value has a JSON type and a range
        (:func:`override_ranges`, tied to the server's ``context_len``), checked before the
        combination is validated as the flags are. An override of ``budget`` without
        ``min_prompt`` re-derives the default minimum. Raises :class:`ConfigError` naming the
        key and its range."""
        if not isinstance(overrides, dict):
            raise ConfigError(
                f"{OVERRIDE_KEY}: must be a JSON object, got {type(overrides).__name__}"
            )
        ranges = override_ranges(self, context_len)
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            name = key.removeprefix("kv_") if isinstance(key, str) else key
            if name not in ranges:
                raise ConfigError(
                    f"{OVERRIDE_KEY}: unknown key {key!r}; expected one of "
                    f"{', '.join(sorted(OVERRIDABLE))} (optionally prefixed kv_)"
                )
            check, text = ranges[name]
            if not check(value):
                raise ConfigError(f"{OVERRIDE_KEY}.{name}: must be {text}, got {_shown(value)}")
            changes[name] = value
        if "budget" in changes and "min_prompt" not in changes:
            changes["min_prompt"] = None
        try:
            return dataclasses.replace(self, **changes)
        except ConfigError as exc:  # a combination (budget < window): name the keys
            message = str(exc)
            for flag, (field, _) in FLAGS.items():  # the server's own flags stay flags
                if field in OVERRIDABLE:
                    message = message.replace(flag, f"{OVERRIDE_KEY}.{field}")
            raise ConfigError(message) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        return cls(**{k: v for k, v in data.items() if v is not None})


OVERRIDE_KEY = "kv_compression"


def _is_int(value: Any, low: int, high: int | None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def override_ranges(
    config: CompressionConfig, context_len: int | None = None
) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Per override key: (check of a JSON value, the range in words) for a server running
    ``config`` with a context of ``context_len`` tokens (None: no context bound).

    budget: an integer in [1, context_len] (at least the window, checked with it) or a
    fraction in (0, 1); window: an integer in [1, min(context_len, max(server window,
    MAX_OVERRIDE_WINDOW))]; pool_kernel: an odd integer in [1, MAX_POOL_KERNEL]; min_prompt:
    an integer in [1, context_len]; policy and prefix_cache: one of their names. Strings,
    floats for integer keys, booleans, null and nested values are out of range."""
    top = context_len
    window_top = max(config.window, MAX_OVERRIDE_WINDOW)
    window_top = window_top if top is None else min(top, window_top)
    upto = "" if top is None else f", at most {top} (the context length)"
    return {
        "policy": (lambda v: v in POLICY_NAMES, f"one of {', '.join(POLICY_NAMES)}"),
        "prefix_cache": (
            lambda v: v in PREFIX_CACHE_MODES,
            f"one of {', '.join(PREFIX_CACHE_MODES)}",
        ),
        "budget": (
            lambda v: _is_int(v, 1, top) or (isinstance(v, float) and 0.0 < v < 1.0),
            f"an integer >= 1{upto}, or a fraction strictly between 0 and 1",
        ),
        "window": (lambda v: _is_int(v, 1, window_top), f"an integer in [1, {window_top}]"),
        "pool_kernel": (
            lambda v: _is_int(v, 1, MAX_POOL_KERNEL) and v % 2 == 1,
            f"an odd integer in [1, {MAX_POOL_KERNEL}]",
        ),
        "min_prompt": (lambda v: _is_int(v, 1, top), f"an integer >= 1{upto}"),
    }


def policy_problem(policy: str, tp_size: int) -> str | None:
    """Why ``policy`` cannot be served with ``tp_size`` tensor-parallel ranks, or None.
    AdaKV splits a layer's budget between all its KV heads by their scores, which one rank
    does not see (``patches/head_granular.md`` 4.10); PyramidKV's and SparseMM's budgets are
    known per head on the host, so the ranks agree on the cell slots without talking."""
    if tp_size > 1 and policy.endswith("adakv"):
        return f"{policy} with --tp-size > 1 (its split between KV heads spans the ranks)"
    return None


def _shown(value: Any) -> str:
    """A JSON value as the error shows it (long ones cut)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require_int(flag: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{flag}: must be >= {minimum}, got {value}")


def _parse_budget(value: Any) -> int | float:
    """An int >= 1, or a float strictly between 0 and 1; strings are parsed."""
    if isinstance(value, bool):
        raise ConfigError(f"--kv-budget: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ConfigError(f"--kv-budget: expected a number, got {value!r}") from None
    if isinstance(value, float):
        if 0.0 < value < 1.0:
            return value
        if value.is_integer() and value >= 1:
            return int(value)
        raise ConfigError(
            f"--kv-budget: must be a positive integer or a fraction in (0, 1), got {value}"
        )
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"--kv-budget: must be positive, got {value}")
        return value
    raise ConfigError(f"--kv-budget: expected a number, got {value!r}")
