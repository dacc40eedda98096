"""Parallel setups with compression: TP and DP pass argument parsing; DP attention,
pipeline parallelism, multi-node and PD disaggregation stop it with one line saying why;
the CPU shim's model-parallel bridge and the server helper's rank binding."""

import pytest

from bacon_sglang.server import cpu_threads_bind, scheduler_ranks


def parse(*flags):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(
        ["--model-path", "/nonexistent/model", "--kv-policy", "bacon", *flags]
    )


@pytest.mark.parametrize("flags", [("--tp-size", "2"), ("--dp-size", "2"), ("--dp", "4")])
def test_tensor_and_data_parallelism_are_accepted(sglang_hooks, flags):
    from bacon_sglang.patches.server_args import config_of

    assert config_of(parse(*flags)).policy == "bacon"


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (("--dp-size", "2", "--enable-dp-attention"), "DP attention: the attention-DP ranks"),
        (("--attn-dp-size", "2"), "DP attention: the attention-DP ranks"),
        (("--pp-size", "2"), "pipeline stages hold different layers"),
        (("--nnodes", "2"), "multi-node serving is untested"),
        (("--disaggregation-mode", "prefill"), "a compressed transfer is not built yet"),
        (("--disaggregation-mode", "decode"), "a compressed transfer is not built yet"),
    ],
)
def test_refused_setups_stop_parsing_with_one_line(sglang_hooks, capsys, flags, reason):
    with pytest.raises(SystemExit) as info:
        parse(*flags)
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: --kv-policy bacon cannot be used with ")
    assert reason in line


def test_refusals_do_not_apply_without_compression(sglang_hooks):
    from sglang.srt.server_args import prepare_server_args

    prepare_server_args(["--model-path", "/nonexistent/model", "--pp-size", "2"])


def test_cpu_shim_turns_cuda_communicators_off():
    from bacon_sglang import cpu_shim

    calls = []
    wrapped = cpu_shim.without_cuda_communicators(lambda *a, **kw: calls.append((a, kw)))
    wrapped([[0, 1]], 0, "gloo", use_pynccl=True, use_custom_allreduce=None, group_name="tp")
    ((args, kwargs),) = calls
    assert args == ([[0, 1]], 0, "gloo")
    assert kwargs == {**cpu_shim.CUDA_COMMUNICATORS_OFF, "group_name": "tp"}


def test_sglang_parallel_state_is_bridged_on_the_cpu_engine():
    """In this process (no CUDA device: tests/conftest.py installed the shim) SGLang's
    model-parallel groups are built without PyNccl."""
    from bacon_sglang.cpu_shim import cuda_device_present

    if cuda_device_present():
        pytest.skip("the bridge is off on a machine with a CUDA device")
    from sglang.srt.distributed import parallel_state

    assert getattr(parallel_state.init_model_parallel_group, "bacon_cpu_shim", False)


def test_rank_binding_of_the_server_helper():
    assert scheduler_ranks(["--tp-size", "2"]) == 2
    assert scheduler_ranks(["--dp", "2", "--tp-size=2"]) == 4
    assert scheduler_ranks(["--kv-policy", "bacon"]) == 1
    assert cpu_threads_bind(2, cores=2) == "0|1"
    assert cpu_threads_bind(2, cores=4) == "0-1|2-3"
    assert cpu_threads_bind(3, cores=2) == "0|1|0"
