"""The GPU kit (``benchmarks/gpu_kit.py``) on CPU, without downloading anything: the tracked
tree's size, the wheel trimming on a small synthetic wheel, the manifest check, the offline
install into a fresh venv, the CUDA ``sgl_kernel`` stand-in's ops against SGLang's own
torch-native layers, its wheel, the ``run --dry-run`` plan and the report renderer. One test
reads the built kit and skips when ``.gpu-kit/`` is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bacon_sglang.cpu_shim import cuda_standin, sgl_kernel_ops

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_kit  # noqa: E402


def test_tracked_files_stay_small_enough_to_travel():
    tree = gpu_kit.tracked_bytes()
    if tree is None:
        pytest.skip("not a git checkout")
    assert 0 < tree < gpu_kit.TREE_LIMIT, f"{tree / gpu_kit.MIB:.1f} MiB tracked"


SYNTHETIC = {
    "sglang/__init__.py": b"VERSION = 1\n",
    "sglang/srt/rust_extensions/loader.py": b"# kept\n",
    "sglang/srt/rust_extensions/_server.cpython-312-x86_64-linux-gnu.so": b"\0" * 100,
    "sglang/srt/rust_extensions/_grpc.cpython-312-x86_64-linux-gnu.so": b"\0" * 50,
    "sglang/srt/mem_cache/rust_tree_core/mem_cache.cpython-312-x86_64-linux-gnu.so": b"\1",
    "sglang/multimodal_gen/runtime.py": b"x = 1\n",
    "sglang/test/test_x.py": b"y = 2\n",
}


def pip_install_target(wheel: Path, target: Path) -> Path:
    """``pip install --no-index --no-deps --target target wheel`` (offline); returns target."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target",
         str(target), str(wheel)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return target


def test_trimmed_wheel_drops_the_members_and_their_record_lines_and_installs(tmp_path):
    full = gpu_kit.write_wheel(tmp_path / "sglang-0.0.1-py3-none-any.whl", SYNTHETIC,
                               "sglang", "0.0.1")  # fmt: skip
    trimmed = tmp_path / "out" / full.name
    trimmed.parent.mkdir()
    trim = gpu_kit.trim_wheel(full, trimmed)
    assert trim == {"removed_files": 4, "removed_bytes": 100 + 50 + 6 + 6}
    with zipfile.ZipFile(trimmed) as z:
        names = set(z.namelist())
        record = z.read("sglang-0.0.1.dist-info/RECORD").decode().splitlines()
    kept = {
        n
        for n in SYNTHETIC
        if n.endswith(("__init__.py", "loader.py", "mem_cache.cpython-312-x86_64-linux-gnu.so"))
    }
    assert {n for n in names if not n.startswith("sglang-0.0.1.dist-info")} == kept
    assert {line.split(",")[0] for line in record} == names  # every member listed, no other
    target = pip_install_target(trimmed, tmp_path / "site")
    assert (target / "sglang/srt/rust_extensions/loader.py").exists()
    assert not (target / "sglang/multimodal_gen").exists()
    assert not list((target / "sglang/srt/rust_extensions").glob("_server*"))


def fake_kit(root: Path, wheels: dict[str, tuple[str, str]]) -> Path:
    """A kit under ``root``: one synthetic wheel per ``file stem -> (name, role)``, with its
    manifest."""
    rows = []
    for module, (name, role) in wheels.items():
        path = gpu_kit.write_wheel(
            root / "wheels" / f"{name.replace('-', '_')}-1.0-py3-none-any.whl",
            {f"{module}/__init__.py": b"OK = True\n"}, name, "1.0",
        )  # fmt: skip
        rows.append(gpu_kit.manifest_entry(path, role))
    (root / "manifest.json").write_text(json.dumps({"files": rows}))
    return root


def test_check_reports_missing_changed_and_unlisted_wheels(tmp_path, monkeypatch):
    kit = fake_kit(tmp_path / "kit", {"pkg_a": ("pkg-a", "dependency"),
                                      "pkg_b": ("pkg-b", "dependency")})  # fmt: skip
    assert gpu_kit.check(kit, repo=tmp_path) == []  # not a git checkout: no tree sizes
    wheels = kit / "wheels"
    (wheels / "pkg_a-1.0-py3-none-any.whl").write_bytes(b"changed")
    (wheels / "pkg_b-1.0-py3-none-any.whl").unlink()
    (wheels / "stray-1.0-py3-none-any.whl").write_bytes(b"")
    assert sorted(gpu_kit.check(kit, repo=tmp_path)) == [
        "pkg_a-1.0-py3-none-any.whl: size or sha256 differs from the manifest",
        "pkg_b-1.0-py3-none-any.whl: in the manifest, not in the kit",
        "stray-1.0-py3-none-any.whl: in the kit, not in the manifest",
    ]
    monkeypatch.setattr(gpu_kit, "tracked_bytes", lambda repo: 59 * gpu_kit.MIB)
    problems = gpu_kit.check(kit, repo=tmp_path)
    assert "tracked files 59.0 MiB > 30 MiB" in problems
    assert not any(p.startswith("tracked files + kit") for p in problems)
    monkeypatch.setattr(gpu_kit, "tracked_bytes", lambda repo: 61 * gpu_kit.MIB)
    assert any(p.startswith("tracked files + kit 61.0 MiB > 60 MiB") for p in
               gpu_kit.check(kit, repo=tmp_path))  # fmt: skip


def test_install_skips_what_the_venv_has_and_installs_the_rest_offline(tmp_path):
    wheels = {"pkg_a": ("pkg-a", "dependency"), "pip": ("pip", "dependency"),
              "sgl_kernel": ("sglang-kernel", "sgl_kernel stand-in")}  # fmt: skip
    kit = fake_kit(tmp_path / "kit", wheels)
    venv = tmp_path / "venv"
    pip = gpu_kit.create_venv(venv, sys.executable)
    done = gpu_kit.install(kit, venv, pip, project=None)
    assert done["present"] == ["pip"]  # the venv's own pip is left alone
    assert sorted(done["installed"]) == ["pkg_a-1.0-py3-none-any.whl",
                                         "sglang_kernel-1.0-py3-none-any.whl"]  # fmt: skip
    python = gpu_kit.venv_python(venv)
    assert gpu_kit.installed(python, ["pkg-a", "sglang-kernel", "pip", "nothing-here"]) == {
        "pkg-a", "sglang-kernel", "pip"}  # fmt: skip


def test_built_kit_is_whole_and_complete():
    if not (gpu_kit.KIT / "manifest.json").exists():
        pytest.skip(".gpu-kit/ not built (python benchmarks/gpu_kit.py build)")
    assert gpu_kit.check() == []
    manifest = json.loads((gpu_kit.KIT / "manifest.json").read_text())
    versions = {(r["name"], r["version"]) for r in manifest["files"]}
    assert {*gpu_kit.DEPENDENCIES.items(), *gpu_kit.TEST_TOOLS.items(),
            *gpu_kit.BUILD_TOOLS.items()} <= versions  # fmt: skip
    assert {gpu_kit.SGLANG, gpu_kit.STANDIN} <= versions
    sglang = next(r for r in manifest["files"] if r["name"] == "sglang")
    with zipfile.ZipFile(gpu_kit.KIT / "wheels" / sglang["file"]) as z:
        assert not [n for n in z.namelist() if n.startswith(gpu_kit.TRIM)]
        assert "sglang/srt/layers/layernorm.py" in z.namelist()
    # The stand-in wheel carries the modules of the source folder as they are now.
    standin = next(r for r in manifest["files"] if r["name"] == gpu_kit.STANDIN[0])
    with zipfile.ZipFile(gpu_kit.KIT / "wheels" / standin["file"]) as z:
        for source in gpu_kit.STANDIN_SOURCE.glob("*.py"):
            assert z.read(f"sgl_kernel/{source.name}") == source.read_bytes(), source.name


# ------------------------------------------------------------------- the sgl_kernel stand-in


@pytest.fixture(scope="module")
def sglang_layers():
    """SGLang's norm and activation layers (imported with the CPU shim, from conftest)."""
    from sglang.srt.layers import activation, layernorm

    return layernorm, activation


DTYPES = [torch.float32, torch.bfloat16]


def _close(dtype):
    return {"atol": 0, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_norms_match_sglangs_forward_native(sglang_layers, dtype, gemma):
    layernorm, _ = sglang_layers
    torch.manual_seed(0)
    layer = layernorm.GemmaRMSNorm(64, eps=1e-6) if gemma else layernorm.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64) * 0.5 + (0 if gemma else 1))
    layer = layer.to(dtype)
    x, residual = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    norm = cuda_standin.gemma_rmsnorm if gemma else cuda_standin.rmsnorm
    fused = cuda_standin.gemma_fused_add_rmsnorm if gemma else cuda_standin.fused_add_rmsnorm

    expected = layer.forward_native(x.clone())
    torch.testing.assert_close(norm(x, layer.weight.data, 1e-6), expected, **_close(dtype))
    out = torch.empty_like(x)
    assert norm(x, layer.weight.data, 1e-6, out=out) is out
    torch.testing.assert_close(out, expected, **_close(dtype))

    expected_x, expected_residual = layer.forward_native(x.clone(), residual.clone())
    x_in, residual_in = x.clone(), residual.clone()
    assert fused(x_in, residual_in, layer.weight.data, 1e-6) is None  # in place
    torch.testing.assert_close(x_in, expected_x, **_close(dtype))
    torch.testing.assert_close(residual_in, expected_residual, **_close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"])
def test_act_and_mul_match_sglangs_forward_native(sglang_layers, dtype, name):
    _, activation = sglang_layers
    layer = {"silu_and_mul": activation.SiluAndMul(), "gelu_and_mul": activation.GeluAndMul(
        "none"), "gelu_tanh_and_mul": activation.GeluAndMul("tanh")}[name]  # fmt: skip
    x = torch.randn(3, 7, 32, dtype=dtype)
    op = getattr(cuda_standin, name)
    expected = layer.forward_native(x)
    torch.testing.assert_close(op(x), expected, **_close(dtype))
    out = torch.empty(3, 7, 16, dtype=dtype)
    op(x, out)  # SGLang passes out positionally
    torch.testing.assert_close(out, expected, **_close(dtype))


def test_top_k_renorm_keeps_the_k_largest_per_row():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    got = cuda_standin.top_k_renorm_prob(probs, torch.tensor([2, 4, 1]))
    expected = torch.tensor([[0, 4 / 7, 0, 3 / 7], [0.25] * 4, [1.0, 0, 0, 0]])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cuda_standin.top_k_renorm_prob(probs[:1], 3),
                               torch.tensor([[0, 4 / 9, 2 / 9, 3 / 9]]))  # fmt: skip


def test_top_p_renorm_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.15, 0.05]])
    got = cuda_standin.top_p_renorm_prob(probs, torch.tensor([0.6, 0.5]))
    # row 0: 0.4 + 0.3 = 0.7 >= 0.6 (0.4 alone is not); row 1: 0.7 alone >= 0.5
    expected = torch.tensor([[0, 4 / 7, 0, 3 / 7], [1.0, 0, 0, 0]])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cuda_standin.top_p_renorm_prob(probs, 1.0), probs)


def test_weak_ref_tensor_shares_memory_and_pdl_is_off():
    x = torch.arange(12.0).reshape(3, 4)[:, 1:]
    ref = cuda_standin.weak_ref_tensor(x)
    assert ref.data_ptr() == x.data_ptr() and ref.stride() == x.stride()
    x[0, 0] = -1
    assert ref[0, 0] == -1
    from bacon_sglang.cpu_shim.cuda_standin import utils

    assert utils.is_arch_support_pdl() is False


def test_standin_names_sglang_imports_exist_and_others_are_absent():
    from bacon_sglang.cpu_shim.cuda_standin import kvcacheio, quantization, scalar_type

    for name in cuda_standin.NOT_IMPLEMENTED:
        with pytest.raises(NotImplementedError, match=f"sgl_kernel.{name} is not available"):
            getattr(cuda_standin, name)(torch.zeros(1))
    with pytest.raises(NotImplementedError, match="ggml_dequantize"):
        quantization.ggml_dequantize()
    with pytest.raises(NotImplementedError, match="transfer_kv_per_layer"):
        kvcacheio.transfer_kv_per_layer()
    assert scalar_type.scalar_types.uint4b8.name == "uint4b8"
    # Absent names keep SGLang's `except ImportError` fallbacks (e.g. flash-attn, fast_topk).
    for name in ("flash_attn", "fast_topk", "sgl_per_token_quant_fp8"):
        assert not hasattr(cuda_standin, name)
    # The CPU shim shares the same ops.
    from bacon_sglang.cpu_shim import sgl_kernel_stub

    x, w = torch.randn(2, 8), torch.rand(8)
    torch.testing.assert_close(sgl_kernel_stub._OpNamespace().rmsnorm_cpu(x, w, 1e-6),
                               sgl_kernel_ops.rmsnorm(x, w, 1e-6), atol=0, rtol=0)  # fmt: skip


def test_standin_wheel_installs_as_sgl_kernel(tmp_path):
    wheel = gpu_kit.standin_wheel(tmp_path / "wheels")
    again = gpu_kit.standin_wheel(tmp_path / "again")
    assert gpu_kit.sha256(again) == gpu_kit.sha256(wheel)  # reproducible: same kit, same hashes
    target = pip_install_target(wheel, tmp_path / "site")
    code = (
        "import sys, torch\nsys.path.insert(0, sys.argv[1])\nimport sgl_kernel\n"
        "from sgl_kernel.utils import is_arch_support_pdl\n"
        "from sgl_kernel.kvcacheio import transfer_kv_direct\n"
        "from sgl_kernel.scalar_type import ScalarType, scalar_types\n"
        "x = torch.ones(2, 4)\n"
        "print(sgl_kernel.__file__.startswith(sys.argv[1]), sgl_kernel.__version__, "
        "sgl_kernel.silu_and_mul(x).shape[-1], is_arch_support_pdl())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0.0.0+bacon.standin", "2", "False"]


# ------------------------------------------------------------------- run and report


def test_dry_run_plans_every_step_within_the_budget(tmp_path):
    kit = fake_kit(tmp_path / "kit", {"pkg_a": ("pkg-a", "dependency")})
    args = gpu_kit.parse_args(["run", "--out", str(tmp_path / "out"), "--kit", str(kit),
                               "--dry-run", "--budget", "540"])  # fmt: skip
    report = gpu_kit.run(args)
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["install", "import", "e2e", "serving", "compression-cost"]
    assert all(s["status"] == "dry run" for s in steps.values())
    # Each step's box assumes the ones before used all of theirs: together within the budget.
    assert 0 < sum(s["timeout_s"] for s in steps.values()) <= 540
    assert steps["e2e"]["argv"][-1] == "tests/test_gpu_kit_e2e.py"
    assert (gpu_kit.REPO / steps["e2e"]["argv"][-1]).exists()
    serving = steps["serving"]["argv"]
    assert gpu_kit.SERVER_ARGS in serving[serving.index("--serving-args") + 1]
    written = json.loads((tmp_path / "out" / "gpu_kit.json").read_text())
    assert written["steps"] == report["steps"] and written["kit"]["problems"] == []
    assert "stand-ins" in (tmp_path / "out" / "gpu_kit.md").read_text()


def test_error_site_names_the_last_frame_and_the_error():
    output = (
        "Traceback (most recent call last):\n"
        '  File "/tmp/v/lib/python3.12/site-packages/sglang/srt/a.py", line 10, in f\n'
        '  File "/tmp/v/lib/python3.12/site-packages/sglang/srt/layers/b.py", line 42, in g\n'
        "AttributeError: module 'torch' has no attribute 'x'\n"
    )
    assert gpu_kit.error_site(output) == (
        "sglang/srt/layers/b.py:42: AttributeError: module 'torch' has no attribute 'x'"
    )
    assert gpu_kit.error_site("collected 0 items\nERROR: file not found: x\n") == (
        "ERROR: file not found: x"
    )
    assert gpu_kit.error_site("") is None


def fake_report() -> dict:
    """A small ``gpu_kit.json`` report: one failed step, a serving result."""
    serving = {
        "sweep": [{"policy": p, "concurrency": c, "ttft_p50_ms": t, "kv_peak": kv}
                  for p, t, kv in (("none", 40.0, 9000), ("bacon", 45.5, 900)) for c in (1, 8)],
        "prefill": [{"policy": "none", "prompt_tokens": 1100, "prefill_p50_ms": 30.0},
                    {"policy": "bacon", "prompt_tokens": 1100, "prefill_p50_ms": 33.0}],
        "decode": [{"policy": "none", "batch": 1, "step_ms": 6.0},
                   {"policy": "bacon", "batch": 1, "step_ms": 5.5}],
        "capacity": [{"policy": "none", "max_running": 14, "pool_bound": 14},
                     {"policy": "bacon", "max_running": 90, "pool_bound": 100}],
    }  # fmt: skip
    report = {
        "machine": {"gpu": "NVIDIA H200", "python": "3.12.3", "torch": "2.11.0+cu130"},
        "date": "2026-12-06T10:00:00+00:00", "budget_s": 540,
        "server_args": gpu_kit.SERVER_ARGS, "standin_ops": gpu_kit.STANDIN_NOTE,
        "steps": [
            {"step": "install", "ok": True, "status": 0, "seconds": 50.0},
            {"step": "e2e", "ok": False, "status": 1, "seconds": 99.0,
             "error": "sglang/srt/x.py:3: RuntimeError: no | kernel"},
            {"step": "serving", "ok": True, "status": 0, "seconds": 150.0,
             "serving": serving},
            {"step": "compression-cost", "ok": None, "status": "not in gpu_check.py --help"},
        ],
    }  # fmt: skip
    return report


def test_render_shows_steps_failures_and_the_serving_table():
    report = fake_report()
    text = gpu_kit.render(report)
    assert "NVIDIA H200; Python 3.12.3, torch 2.11.0+cu130" in text
    assert "| e2e | FAILED (1) | 99.0 | sglang/srt/x.py:3: RuntimeError: no \\| kernel |" in text
    assert "| compression-cost | not in gpu_check.py --help | - |  |" in text
    assert "| none | 40.0 | 30.0 (1100) | 6.0 | 9000 | 14 (14) |" in text
    assert "| bacon | 45.5 | 33.0 (1100) | 5.5 | 900 | 90 (100) |" in text
    assert "stand-ins" in text


def test_report_renders_a_committed_gpu_kit_result(tmp_path, monkeypatch):
    import report

    folder = tmp_path / "2026-12-06-gpu"
    folder.mkdir()
    (folder / "gpu_kit.json").write_text(json.dumps(fake_report()))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.run_tables() == {folder / "gpu_kit.md": gpu_kit.render(fake_report()) + "\n"}


def _cuda_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of each ``from sgl_kernel... import name`` in the file that
    runs at import on CUDA: at module level, outside ``try``, and unconditional or in the
    body of an ``if`` whose test names ``cuda``."""
    import ast

    found = []

    def visit(nodes, on_cuda: bool):
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sgl_kernel"):
                if on_cuda:
                    found.extend((node.lineno, node.module, a.name) for a in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                cuda = "cuda" in test and "not " not in test
                visit(node.body, on_cuda and (cuda or not _names_a_device(test)))
                visit(node.orelse, on_cuda and not _names_a_device(test))

    visit(ast.parse(path.read_text()).body, True)
    return found


def _names_a_device(test: str) -> bool:
    return any(d in test for d in ("cuda", "hip", "xpu", "musa", "npu", "cpu", "mps"))


def test_standin_offers_every_name_sglangs_cuda_path_imports(sglang_layers):
    """The SGLang modules a Qwen2-VL server loads (those imported here, on CPU): every
    ``sgl_kernel`` name their CUDA branch imports at module level exists in the stand-in."""
    import importlib

    for module in gpu_kit.SERVER_MODULES[:-1]:
        importlib.import_module(module)
    missing = []
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if not name.startswith("sglang.") or not path.endswith(".py"):
            continue
        for line, source, imported in _cuda_imports(Path(path)):
            sub = source.removeprefix("sgl_kernel").lstrip(".")
            try:
                target = importlib.import_module(
                    "bacon_sglang.cpu_shim.cuda_standin" + (f".{sub}" if sub else "")
                )
            except ImportError:
                target = None
            if not hasattr(target, imported):
                missing.append(f"{name}:{line} {source}.{imported}")
    assert missing == []
    assert len(cuda_standin.__all__) == 13


def test_a_timed_out_step_is_recorded_and_leaves_nothing_running(tmp_path):
    """The step starts a child in a session of its own (as SGLang servers are started) and
    outlives its time box: the step is recorded as timed out and the child is killed."""
    pid_file = tmp_path / "pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\ntime.sleep(600)\n"
    )
    step = gpu_kit.run_step("slow", [sys.executable, "-c", code], 30, dict(os.environ))
    assert step["ok"] is False and step["status"] == "timeout after 30 s"
    assert "started" in step["output_tail"]
    child = int(pid_file.read_text())
    assert step["killed_left_over"] == [child]
    time.sleep(0.5)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text()
