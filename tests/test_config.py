"""CompressionConfig: defaults, derived values and one-line errors naming the flag."""

import pytest

from bacon_sglang.config import (
    MAX_OVERRIDE_WINDOW,
    MAX_POOL_KERNEL,
    CompressionConfig,
    ConfigError,
)


def test_defaults():
    config = CompressionConfig()
    assert (config.policy, config.budget, config.window, config.pool_kernel) == ("none", 64, 32, 5)
    assert config.min_prompt == 96  # budget + window
    assert config.layout == "slots"
    assert not config.enabled


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"policy": "bogus"}, "--kv-policy"),
        ({"budget": 0}, "--kv-budget"),
        ({"budget": -5}, "--kv-budget"),
        ({"budget": 16}, "--kv-budget"),  # smaller than the window
        ({"budget": "abc"}, "--kv-budget"),
        ({"budget": 1.5}, "--kv-budget"),
        ({"window": 0}, "--kv-window"),
        ({"pool_kernel": 4}, "--kv-pool-kernel"),
        ({"pool_kernel": -1}, "--kv-pool-kernel"),
        ({"min_prompt": 0}, "--kv-min-prompt"),
        ({"prefix_cache": "all"}, "--kv-prefix-cache"),
        ({"layout": "heads"}, "--kv-layout"),
    ],
)
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as info:
        CompressionConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(flag + ":")
    assert "\n" not in message


def test_budget_forms():
    assert CompressionConfig(budget="128").budget == 128
    assert CompressionConfig(budget="128.0").budget == 128
    assert CompressionConfig(budget="0.25").budget == 0.25
    fractional = CompressionConfig(policy="bacon", budget=0.25)
    assert fractional.min_prompt == 64
    assert fractional.kept_tokens(1000) == 250
    assert fractional.kept_tokens(100) == 32  # never below the window


def test_should_compress():
    config = CompressionConfig(policy="bacon", budget=64)
    assert not config.should_compress(95)  # below min_prompt = 96
    assert config.should_compress(96)
    assert config.kept_tokens(1000) == 64
    assert not CompressionConfig(policy="bacon", budget=64, min_prompt=10).should_compress(64)
    assert not CompressionConfig(budget=64).should_compress(10_000)  # policy none


def test_overrides():
    base = CompressionConfig(policy="bacon", budget=64)
    assert base.with_overrides({"kv_budget": 128}) == CompressionConfig(policy="bacon", budget=128)
    assert base.with_overrides({"policy": "none"}).policy == "none"
    assert base.prefix_cache == "full"
    assert base.with_overrides({"prefix_cache": "shared"}).prefix_cache == "shared"
    with pytest.raises(ConfigError, match="unknown key"):
        base.with_overrides({"kv_bugdet": 1})
    with pytest.raises(ConfigError, match="unknown key 'layout'"):  # the server's, not a request's
        base.with_overrides({"layout": "cells"})
    with pytest.raises(ConfigError, match="kv_compression.budget"):
        base.with_overrides({"kv_budget": 0})
    with pytest.raises(ConfigError, match="JSON object"):
        base.with_overrides([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"pool_kernel": 4611686018427387905}, "pool_kernel"),
        ({"pool_kernel": MAX_POOL_KERNEL + 2}, "pool_kernel"),
        ({"pool_kernel": 5.0}, "pool_kernel"),
        ({"window": 32.0}, "window"),
        ({"window": 4097}, "window"),  # above the context length
        ({"window": MAX_OVERRIDE_WINDOW + 1}, "window"),
        ({"budget": 4097}, "budget"),
        ({"budget": "64"}, "budget"),
        ({"budget": None}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": [64]}, "budget"),
        ({"min_prompt": 4097}, "min_prompt"),
        ({"policy": ["bacon"]}, "policy"),
        ({"prefix_cache": {"a": 1}}, "prefix_cache"),
        ({"window": 128, "budget": 64}, "budget"),  # the budget counts the window
    ],
)
def test_override_values_have_ranges(override, key):
    """Every override value is checked for its JSON type and range (tied to the server's
    context length) and the error names the key and the range."""
    base = CompressionConfig(policy="bacon", budget=64)
    with pytest.raises(ConfigError) as info:
        base.with_overrides(override, context_len=4096)
    assert str(info.value).startswith(f"kv_compression.{key}:")
    assert "\n" not in str(info.value)


def test_override_bounds_follow_the_server():
    base = CompressionConfig(policy="bacon", budget=4096, window=2048)
    assert base.with_overrides({"window": 2048}, context_len=8192).window == 2048
    ok = base.with_overrides({"budget": 4096, "window": 16, "pool_kernel": MAX_POOL_KERNEL}, 4096)
    assert (ok.budget, ok.window, ok.pool_kernel) == (4096, 16, MAX_POOL_KERNEL)
    assert base.with_overrides({"budget": 0.25}, 4096).budget == 0.25
    with pytest.raises(ConfigError, match="--kv-pool-kernel: must be <="):
        CompressionConfig(pool_kernel=MAX_POOL_KERNEL + 2)


def test_round_trip():
    config = CompressionConfig(policy="snapkv", budget=0.5, window=8, pool_kernel=3)
    assert CompressionConfig.from_dict(config.to_dict()) == config
