"""The installed package ships the runtime and the two trained models, not their training.

Builds the wheel as ``pip wheel`` does (setuptools, no network, no build isolation) from a
clean copy of the sources, so that no stale ``build/`` folder of the checkout can add files,
and lists its files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "bacon_sglang", "kernels", "patches")
TRAINING = ("train.py", "evaluate.py", "ink_similarity.py", "train.sh")


def wheel_files(tmp_path: Path) -> list[str]:
    """The paths inside the wheel built from a copy of :data:`SOURCES` in ``tmp_path``."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    pytest.importorskip("wheel", reason="building the wheel offline needs wheel")
    src = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = out.glob("bacon_sglang-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_holds_the_models_and_no_training(tmp_path):
    files = wheel_files(tmp_path)
    names = [Path(f).name for f in files]
    assert not [n for n in names if n in TRAINING]
    assert not [n for n in names if n.startswith(("training", "attempt_")) and n.endswith(".json")]
    assert not [f for f in files if f.startswith("training/")]
    for model in ("tiny_vqa", "tiny_doc"):
        for name in ("model.safetensors", "config.json", "tokenizer.json", "visual_heads.json"):
            assert f"bacon_sglang/models/{model}/{name}" in files
    for module in ("vqa.py", "tiny.py", "batches.py", "visual_heads.py"):
        assert f"bacon_sglang/models/{module}" in files
    for package in ("kernels", "patches"):
        assert f"bacon_sglang/{package}/__init__.py" in files
    for kernel in (ROOT / "kernels").glob("*.py"):  # cell_decode.py included
        assert f"bacon_sglang/kernels/{kernel.name}" in files
