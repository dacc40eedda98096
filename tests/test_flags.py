"""The --kv-* flags: parsed by SGLang's own parser, defaulted, validated before any model
loads, and carried on ServerArgs to the subprocesses; the same names as Engine keywords."""

import argparse
import pickle
import re
import subprocess
import sys
import time

import pytest

from bacon_sglang.config import POLICY_NAMES, CompressionConfig, ConfigError
from bacon_sglang.cpu_shim import cpu_engine_env

FLAGS = (
    "--kv-policy", "--kv-budget", "--kv-window", "--kv-pool-kernel", "--kv-min-prompt",
    "--kv-text-prefix", "--kv-prefix-cache", "--kv-layout",
)  # fmt: skip


def parse(*flags):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", "/nonexistent/model", *flags])


def test_help_lists_the_flags(sglang_hooks):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    for flag in FLAGS:
        assert flag in text
    assert "{" + ",".join(POLICY_NAMES) + "}" in text
    assert "{compress,share}" in text
    assert "{full,shared}" in text
    assert "{slots,cells}" in text


def test_defaults_mean_no_compression(sglang_hooks):
    from bacon_sglang.patches.server_args import config_of

    assert config_of(parse()) == CompressionConfig()


def test_values_parse_and_survive_pickling(sglang_hooks):
    from bacon_sglang.patches.server_args import config_of

    args = parse(
        "--kv-policy", "bacon", "--kv-budget", "128", "--kv-window", "16",
        "--kv-pool-kernel", "7", "--kv-min-prompt", "300", "--kv-prefix-cache", "shared",
    )  # fmt: skip
    expected = CompressionConfig("bacon", 128, 16, 7, 300, prefix_cache="shared")
    assert config_of(args) == expected
    # Subprocesses receive a pickled copy of ServerArgs (spawn start method).
    assert config_of(pickle.loads(pickle.dumps(args))) == expected
    assert config_of(parse("--kv-policy", "snapkv", "--kv-budget", "0.3")).budget == 0.3
    assert config_of(parse("--kv-policy", "bacon", "--kv-layout", "cells")).layout == "cells"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--kv-policy", "bogus"), "error: --kv-policy: unknown policy 'bogus'"),
        (("--kv-budget", "0"), "error: --kv-budget: must be positive"),
        (("--kv-budget", "16"), "error: --kv-budget: 16 is smaller than the observation window"),
        (("--kv-window", "-2"), "error: --kv-window: must be >= 1"),
        (("--kv-pool-kernel", "4"), "error: --kv-pool-kernel: must be odd"),
        (("--kv-min-prompt", "x"), "error: --kv-min-prompt: expected an integer"),
        (("--kv-text-prefix", "keep"), "error: --kv-text-prefix: expected one of compress, share"),
        (("--kv-prefix-cache", "all"), "error: --kv-prefix-cache: expected one of full, shared"),
        (("--kv-layout", "heads"), "error: --kv-layout: expected one of slots, cells"),
        (
            ("--kv-policy", "bacon-pyramidkv"),
            "error: --kv-policy: bacon-pyramidkv keeps a "
            "different number of tokens per (layer, KV head); it needs --kv-layout cells",
        ),
        (
            ("--kv-policy", "sparsemm", "--kv-layout", "cells"),
            "error: --kv-head-scores: policy sparsemm needs the model's visual-head scores",
        ),
    ],
)
def test_bad_values_stop_parsing_with_one_line(sglang_hooks, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        parse(*flags)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)


def test_engine_keywords_are_taken_out_and_validated(sglang_hooks):
    from bacon_sglang.patches import entrypoints

    kwargs = {"model_path": "m", "kv_policy": "snapkv", "kv_budget": 96, "kv_layout": "cells"}
    assert entrypoints.pop_kv_kwargs(kwargs) == CompressionConfig("snapkv", 96, layout="cells")
    assert kwargs == {"model_path": "m"}
    assert entrypoints.pop_kv_kwargs({"model_path": "m"}) is None
    with pytest.raises(ConfigError, match="--kv-policy"):
        entrypoints.before_engine_init(object(), model_path="m", kv_policy="nope")


def test_launch_with_bogus_policy_exits_quickly():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", "/nonexistent/model",
         "--kv-policy", "bogus"],
        env=cpu_engine_env(), capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --kv-policy: unknown policy 'bogus'; choose one of none, ")
    assert time.monotonic() - start < 90
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("policy", "tp_size", "message"),
    [
        ("adakv", 2, "adakv with --tp-size > 1 (its split between KV heads spans the ranks)"),
        ("bacon-adakv", 2, "bacon-adakv with --tp-size > 1 (its split between KV heads"),
        ("bacon-sparsemm", 2, None),
        ("pyramidkv", 2, None),
        ("bacon-adakv", 1, None),
        ("bacon", 2, None),
    ],
)
def test_uneven_policies_per_request_are_refused_where_not_served(policy, tp_size, message):
    """A per-request override naming an uneven allocation: a 400 on a slots server (the
    config's refusal) or, for AdaKV, with tensor parallelism (its split spans the ranks);
    accepted on a cells server otherwise (PyramidKV and SparseMM under TP too)."""
    from bacon_sglang.patches.tokenizer_manager import validate_override

    params = {"custom_params": {"kv_compression": {"policy": policy}}}
    cells = CompressionConfig("bacon", 64, layout="cells", head_scores="heads.json")
    if message is None:
        validate_override(cells, params, 4096, tp_size)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            validate_override(cells, params, 4096, tp_size)
    with pytest.raises(ValueError, match="needs --kv-layout cells"):
        validate_override(CompressionConfig("bacon", 64), {"custom_params": {
            "kv_compression": {"policy": "pyramidkv"}}}, 4096)  # fmt: skip


def test_head_scores_are_read_once_and_must_fit_the_model(tmp_path):
    """``--kv-head-scores``: read at scheduler start; a missing file or one of another
    depth stops the launch with the path in the message."""
    from bacon_sglang.patches.scheduler import head_scores

    path = tmp_path / "visual_heads.json"
    path.write_text('{"scores": [[0.5, 0.1], [0.1, 0.3]]}')
    config = CompressionConfig("bacon-sparsemm", 64, layout="cells", head_scores=str(path))
    assert head_scores(config, 2) == ((0.5, 0.1), (0.1, 0.3))
    assert head_scores(CompressionConfig("bacon", 64), 2) == ()
    with pytest.raises(RuntimeError, match="2 layers of scores for a model of 4"):
        head_scores(config, 4)
    assert head_scores(config, 2, 2) == ((0.5, 0.1), (0.1, 0.3))
    with pytest.raises(RuntimeError, match=r"rows of \[2\] heads for a model of 4 KV heads"):
        head_scores(config, 2, 4)
    missing = CompressionConfig("sparsemm", 64, layout="cells", head_scores=str(tmp_path / "x"))
    with pytest.raises(RuntimeError, match="unreadable"):
        head_scores(missing, 2)
