"""Hooks on ``sglang.srt.server_args``: the ``--kv-*`` flags and how their values travel.

* ``ServerArgs.add_cli_args`` (AFTER): adds the ``--kv-*`` flags of
  :data:`bacon_sglang.config.FLAGS` (``--kv-policy``, ``--kv-budget``, ..., ``--kv-layout``)
  to SGLang's parser, so they show in ``python -m sglang.launch_server --help`` and work in
  ``--config`` YAML files.
* ``ServerArgs.from_cli_args`` (AFTER): validates them into one
  :class:`~bacon_sglang.config.CompressionConfig` and attaches it to the ``ServerArgs``
  record. A bad value, or a parallel setup compression refuses
  (:func:`scale_out_problems`), stops the launch here, before any model loads, with one line.

How the values reach the scheduler and model-runner subprocesses (the one bridge): the
config rides on the ``ServerArgs`` record as the bookkeeping attribute ``_bacon_kv_config``.
``ServerArgs`` is a msgspec Struct with ``dict=True`` whose ``__reduce__`` pickles
``__dict__`` along with the fields, so the attribute survives the spawn into every
scheduler (and so model-runner) process, where :func:`config_of` reads it back.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from bacon_sglang.config import (
    FLAGS,
    LAYOUTS,
    POLICY_NAMES,
    PREFIX_CACHE_MODES,
    TEXT_PREFIX_MODES,
    CompressionConfig,
    ConfigError,
)

ATTR = "_bacon_kv_config"


def config_of(server_args) -> CompressionConfig:
    """The compression config attached to a ``ServerArgs`` record (defaults: policy none)."""
    return getattr(server_args, ATTR, None) or CompressionConfig()


def attach(server_args, config: CompressionConfig) -> None:
    """Attach ``config`` to ``server_args`` (a bookkeeping attribute, allowed at any time)."""
    msgspec.Struct.__setattr__(server_args, ATTR, config)


def add_kv_flags(result, parser: argparse.ArgumentParser):
    """AFTER ``ServerArgs.add_cli_args(parser)``: register the ``--kv-*`` flags.

    Defaults are None so that an unset flag takes the config's (possibly derived) default;
    validation happens once, in :func:`attach_from_namespace`, to give one-line errors
    rather than argparse's usage dump."""
    group = parser.add_argument_group("bacon-sglang KV-cache compression")
    for flag, (field, help_text) in FLAGS.items():
        kwargs = {"dest": f"kv_{field}", "default": None, "help": help_text}
        if field == "policy":
            kwargs["metavar"] = "{" + ",".join(POLICY_NAMES) + "}"
        elif field == "text_prefix":
            kwargs["metavar"] = "{" + ",".join(TEXT_PREFIX_MODES) + "}"
        elif field == "prefix_cache":
            kwargs["metavar"] = "{" + ",".join(PREFIX_CACHE_MODES) + "}"
        elif field == "layout":
            kwargs["metavar"] = "{" + ",".join(LAYOUTS) + "}"
        elif field == "debug_dir":
            kwargs["metavar"] = "DIR"
        elif field == "head_scores":
            kwargs["metavar"] = "PATH"
        else:
            kwargs["metavar"] = "N"
        group.add_argument(flag, type=str, **kwargs)
    return result


# parsed by the config
STRING_FIELDS = (
    "policy", "budget", "text_prefix", "prefix_cache", "layout", "head_scores", "debug_dir"
)  # fmt: skip


def config_from_namespace(args: argparse.Namespace) -> CompressionConfig:
    """Build the config from parsed ``--kv-*`` values (strings or None); raises ConfigError."""
    values = {}
    for flag, (field, _) in FLAGS.items():
        raw = getattr(args, f"kv_{field}", None)
        if raw is None:
            continue
        values[field] = raw if field in STRING_FIELDS else _parse_int(flag, raw)
    return CompressionConfig(**values)


def attach_from_namespace(result, cls, args: argparse.Namespace):
    """AFTER ``ServerArgs.from_cli_args(args)``: validate and attach the config.

    On a bad value: print ``error: --kv-flag: why`` on one line and exit with status 2."""
    try:
        config = config_from_namespace(args)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    problems = scale_out_problems(result) if config.enabled else []
    if problems:
        sys.stderr.write(f"error: --kv-policy {config.policy} cannot be used with {problems[0]}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    attach(result, config)
    return result


# Parallel setups compression refuses, each with why (checked on every scheduler rank).
# --tp-size and --dp-size (independent replicas, one scheduler each) are supported.
SCALE_OUT_REFUSALS = (
    ("attn_dp_size", 1, "--attention-data-parallel-size > 1 (DP attention: the attention-DP "
     "ranks share one forward, padded and gathered for the MLP, which compression's per-rank "
     "plan does not follow yet)"),
    ("pp_size", 1, "--pp-size > 1 (pipeline stages hold different layers; compaction needs "
     "every layer's keep-set in one process)"),
    ("nnodes", 1, "--nnodes > 1 (multi-node serving is untested with compression; use one "
     "server per node behind sglang-router)"),
)  # fmt: skip


def scale_out_problems(server_args) -> list[str]:
    """The refused parallel setups of ``server_args`` (empty when none), with the reason."""
    problems = [
        reason
        for name, default, reason in SCALE_OUT_REFUSALS
        if (getattr(server_args, name, default) or default) > default
    ]
    if getattr(server_args, "enable_dp_attention", False) and not any(
        "attention-data-parallel" in p for p in problems
    ):
        problems.append(SCALE_OUT_REFUSALS[0][2])
    if (getattr(server_args, "disaggregation_mode", "null") or "null") != "null":
        problems.append(
            "prefill/decode disaggregation (the KV transfer moves the full prompt's slots; "
            "a compressed transfer is not built yet, see patches/README.md, Scaling out)"
        )
    return problems


def _parse_int(flag: str, raw: str) -> int:
    if isinstance(raw, int):
        return raw
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{flag}: expected an integer, got {raw!r}") from None


HOOKS = [
    ("sglang.srt.server_args.ServerArgs.add_cli_args", add_kv_flags, "AFTER"),
    ("sglang.srt.server_args.ServerArgs.from_cli_args", attach_from_namespace, "AFTER"),
]
