"""The CPU development and test shim that stands in for the CUDA-only sgl_kernel."""

import subprocess
import sys

import pytest
import torch

from bacon_sglang import cpu_shim
from bacon_sglang.cpu_shim import sgl_kernel_stub as stub


def test_op_namespace_resolves_only_known_names():
    ns = stub._OpNamespace()
    assert hasattr(ns, "rmsnorm_cpu")
    assert hasattr(ns, "flash_attn_varlen_func")
    assert hasattr(ns, "extend_attention_cpu")
    # Absent names keep SGLang on its native path (AMX check, register_fake_if_exists).
    assert not hasattr(ns, "convert_weight_packed")
    assert not hasattr(ns, "gptq_gemm")
    assert not hasattr(ns, "fp8_scaled_mm")
    with pytest.raises(NotImplementedError, match="extend_attention_cpu"):
        ns.extend_attention_cpu(torch.zeros(1))


def test_implemented_ops_match_torch():
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        stub._OpNamespace().silu_and_mul_cpu(x),
        torch.nn.functional.silu(x[:, :4]) * x[:, 4:],
    )
    weight = torch.rand(8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(stub._OpNamespace().rmsnorm_cpu(x, weight, 1e-6), expected)


def test_assign_req_to_token_pool_cpu():
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    stub.assign_req_to_token_pool_cpu(
        torch.tensor([1, 3]),
        req_to_token,
        torch.tensor([2, 0]),
        torch.tensor([5, 2]),
        torch.tensor([11, 12, 13, 21, 22]),
        2,
    )
    assert req_to_token[1].tolist() == [0, 0, 11, 12, 13, 0, 0, 0, 0, 0]
    assert req_to_token[3].tolist() == [21, 22] + [0] * 8
    assert req_to_token[[0, 2]].abs().sum() == 0


def _run(code: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_sitecustomize_routes_sgl_kernel_without_cuda():
    code = (
        "import sgl_kernel, torch; "
        "print(sgl_kernel.__name__, hasattr(torch.ops.sgl_kernel, 'rmsnorm_cpu'), "
        "hasattr(torch.ops.sgl_kernel, 'convert_weight_packed'))"
    )
    env = cpu_shim.cpu_engine_env()
    assert _run(code, env) == "bacon_sglang.cpu_shim.sgl_kernel_stub True False"


def test_never_installed_when_cuda_present(monkeypatch):
    monkeypatch.setattr(cpu_shim, "cuda_device_present", lambda: True)
    before = list(sys.meta_path)
    assert cpu_shim.install() is False
    assert sys.meta_path == before


def test_cpu_engine_env_prepends_shim_path():
    env = cpu_shim.cpu_engine_env({"PYTHONPATH": "/x"})
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(":")[:2] == [str(cpu_shim.SHIM_DIR), "/x"]
    assert env["TORCHDYNAMO_DISABLE"] == "1"  # no g++ compile on the first request
    assert cpu_shim.cpu_engine_env({"TORCHDYNAMO_DISABLE": "0"})["TORCHDYNAMO_DISABLE"] == "0"
