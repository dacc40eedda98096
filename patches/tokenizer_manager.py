"""Hooks on ``sglang.srt.managers.tokenizer_manager.TokenizerManager`` (main process).

* ``TokenizerManager.generate_request`` (BEFORE): validates a request's per-request
  override, ``sampling_params.custom_params["kv_compression"]`` (a JSON object with any of
  ``policy``, ``budget``, ``window``, ``pool_kernel``, ``min_prompt``, ``prefix_cache``),
  before it reaches the scheduler. A malformed one raises ``ValueError``, which SGLang's HTTP
  server answers with a 400 and ``sglang.Engine`` raises to the caller.
* ``TokenizerManager.update_request_meta_info`` (AFTER): SGLang's customized-info channel
  accumulates values in a list; ``meta_info["kv_compression"]`` becomes the report itself.
"""

from __future__ import annotations

from bacon_sglang.config import ConfigError, policy_problem
from bacon_sglang.patches.output_streamer import KEY
from bacon_sglang.patches.server_args import config_of


def validate_override(
    server_config, sampling_params, context_len: int | None = None, tp_size: int = 1
) -> None:
    """Raise ValueError when ``sampling_params`` carries a bad ``kv_compression`` override
    (a key, a type or a value out of its range for a context of ``context_len`` tokens; see
    :func:`bacon_sglang.config.override_ranges`; a policy the server's layout or its
    ``tp_size`` ranks cannot serve)."""
    if not isinstance(sampling_params, dict):
        return
    custom = sampling_params.get("custom_params")
    if not isinstance(custom, dict) or KEY not in custom:
        return
    override = custom[KEY]
    try:
        config = server_config.with_overrides(override, context_len)
    except ConfigError as exc:
        raise ValueError(f"invalid custom_params.{exc}") from None
    problem = policy_problem(config.policy, tp_size)
    if problem:
        raise ValueError(f"invalid custom_params.{KEY}.policy: {problem}")
    if config.enabled and not server_config.enabled:
        raise ValueError(
            f"custom_params.{KEY} asks for policy {config.policy!r}, but the server was "
            "started with --kv-policy none; start it with --kv-policy snapkv or bacon"
        )


def before_generate_request(manager, obj, *args, **kwargs):
    """BEFORE ``TokenizerManager.generate_request(self, obj, request=None)``."""
    params = getattr(obj, "sampling_params", None)
    server_config = config_of(manager.server_args)
    context_len = getattr(manager, "context_len", None)
    tp_size = getattr(manager.server_args, "tp_size", 1) or 1
    for p in params if isinstance(params, list) else [params]:
        validate_override(server_config, p, context_len, tp_size)
    return None


def after_update_request_meta_info(result, manager, meta_info, *args, **kwargs):
    """AFTER ``TokenizerManager.update_request_meta_info(self, meta_info, state, ...)``."""
    reports = meta_info.get(KEY)
    if isinstance(reports, list):
        if reports:
            meta_info[KEY] = reports[-1]
        else:
            meta_info.pop(KEY)
    return result


HOOKS = [
    (
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request",
        before_generate_request,
        "BEFORE",
    ),
    (
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
        after_update_request_meta_info,
        "AFTER",
    ),
]
