"""The CPU-side parts of ``benchmarks/gpu_check.py``: argument parsing, the random-weight
model at Qwen2-VL-7B's attention shapes (one layer and a narrow MLP here), the
bandwidth-bound ratios, the report writer, and the clean refusal without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from bacon_sglang.cpu_shim import cuda_device_present

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402


def test_arguments_default_to_every_step():
    args = gpu_check.parse_args([])
    assert args.steps == list(gpu_check.STEPS)
    assert args.layers == 4 and args.out is None
    args = gpu_check.parse_args(["--steps", "e2e", "serving", "--layers", "2", "--out", "r.json"])
    assert args.steps == ["e2e", "serving"] and args.layers == 2 and args.out == Path("r.json")


def test_serving_args_are_appended_to_the_serving_command(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(gpu_check, "build_7b_shaped_model", lambda layers, path: tmp_path)
    monkeypatch.setattr(
        gpu_check, "run_step", lambda name, argv, timeout: seen.update(argv=argv) or {"ok": False}
    )
    args = gpu_check.parse_args(["--serving-args", "--levels 1 8 --server-args '--a b'"])
    gpu_check.serving(args, tmp_path)
    assert seen["argv"][-5:] == ["--levels", "1", "8", "--server-args", "--a b"]
    assert "gpu_kit.sh" in subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip


@pytest.mark.parametrize("argv", [["--steps", "bogus"], ["--layers", "0"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_7b_shaped_model_has_qwen2vl_7b_attention(tmp_path):
    path = gpu_check.build_7b_shaped_model(1, tmp_path / "m", intermediate_size=64)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["num_attention_heads"] == 28 and config["num_key_value_heads"] == 4
    assert config["hidden_size"] // config["num_attention_heads"] == 128
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 64
    assert config["rope_scaling"]["mrope_section"] == [16, 24, 24]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()
        k = f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()
        layers = {n.split(".")[2] for n in f.keys() if n.startswith("model.layers.")}
    assert q == [28 * 128, 3584] and k == [4 * 128, 3584]
    assert layers == {"0"}
    # Built once: a second call reuses the folder.
    assert gpu_check.build_7b_shaped_model(1, path, intermediate_size=64) == path


def test_bound_ratios_compare_with_one_pass_over_the_bytes():
    rows = [
        {"kernel": "window_scores", "n": 1024, "batch": 1, "bytes": 2e9, "triton_ms": 2.0},
        {"kernel": "compact", "n": 1024, "batch": 1, "bytes": 1e9, "triton_ms": 3.0,
         "copy_ms": 1.5},
        {"kernel": "calibrate", "n": 1024, "batch": 1, "bytes": 1e6, "triton_ms": 1.0},
        {"kernel": "window_scores", "n": 4096, "batch": 1, "bytes": 1e9, "triton_ms": None},
    ]  # fmt: skip
    ratios = gpu_check.bound_ratios(rows, read_gbps=2000.0)
    assert [r["kernel"] for r in ratios] == ["window_scores", "compact"]
    assert ratios[0]["bound_ms"] == pytest.approx(1.0)  # 2 GB at 2000 GB/s
    assert ratios[0]["time_over_bound"] == pytest.approx(2.0)
    assert ratios[1]["time_over_bound"] == pytest.approx(2.0)


def test_report_is_written_as_json(tmp_path):
    report = {"machine": {"gpu": "x"}, "steps": [{"step": "e2e", "ok": True, "path": tmp_path}]}
    path = gpu_check.write_report(report, tmp_path / "a" / "b" / "gpu_check.json")
    back = json.loads(path.read_text())
    assert back["steps"][0]["ok"] is True and back["steps"][0]["path"] == str(tmp_path)


def test_run_step_records_status_and_output(tmp_path):
    ok = gpu_check.run_step("echo", [sys.executable, "-c", "print('hello')"], 60)
    assert ok["ok"] and ok["status"] == 0 and "hello" in ok["output_tail"]
    bad = gpu_check.run_step("fail", [sys.executable, "-c", "raise SystemExit(3)"], 60)
    assert not bad["ok"] and bad["status"] == 3
    slow = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert not slow["ok"] and slow["status"] == "timeout"


def test_without_cuda_main_says_so_in_one_line_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(cuda_device_present(), reason="a CUDA machine runs the real check")
def test_command_refuses_cleanly_without_cuda():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [gpu_check.NO_CUDA]
    assert "Traceback" not in done.stderr
