"""The README is a landing page: its two commands, in its first 40 lines, are exactly the ones
CI (``.ci/run``) and the demo test run; its generated blocks, ``benchmarks/README.md``'s and
``benchmarks/results/README.md`` are what ``benchmarks/report.py`` writes from the committed
JSON; every script's ``--help`` says what it
measures and how long it takes on CPU."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_SCREEN = 40  # lines: the two fresh-machine commands sit in them


def readme_commands() -> list[tuple[int, str]]:
    """``(line number, command)`` of every fresh-machine command (``python3 -m venv ...``) in
    the README's ``bash`` blocks."""
    found, in_bash = [], False
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line == "```bash" and not in_bash
        elif in_bash and line.startswith("python3 -m venv"):
            found.append((number, line))
    return found


def demo_test_command() -> str:
    """The command the demo test runs, as a shell line from the repository root (its
    ``sys.executable`` is the venv's python)."""
    tree = ast.parse((ROOT / "tests" / "test_server_e2e.py").read_text())
    test = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and node.name == "test_readme_demo_answers_with_the_compression_report"
    )
    run = next(
        node
        for node in ast.walk(test)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "subprocess.run"
    )
    words = [
        ".venv/bin/python" if ast.unparse(arg) == "sys.executable" else ast.literal_eval(arg)
        for arg in run.args[0].elts
    ]
    return " ".join(words)


def test_readme_commands_are_the_ones_ci_and_the_demo_test_run():
    commands = readme_commands()
    assert [n for n, _ in commands] and all(n <= FIRST_SCREEN for n, _ in commands), commands
    demo, tests = (c for _, c in commands)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci
    install, _, _ = ci.rpartition(" && ")
    assert demo == f"{install} && {demo_test_command()}"
    assert demo_test_command() == ".venv/bin/python -m bacon_sglang.demo"


def test_readme_is_a_landing_page():
    """Under 15 KB, the newcomer's sections in order, and one click to every guide that holds
    the reference material (``tests/test_docs_links.py`` checks that the links resolve)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 15_000
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Two commands on a fresh machine",
        "## On your GPU server",
        "## Results",
        "## Flags",
        "## Reliability",
        "## Where things are",
    ]
    for guide in (
        "patches/README.md",
        "kernels/README.md",
        "benchmarks/README.md",
        "benchmarks/results/README.md",
        "bacon_sglang/models/tiny_vqa/README.md",
        "bacon_sglang/models/tiny_doc/README.md",
    ):
        assert f"]({guide}" in text, guide


def test_generated_results_are_up_to_date():
    """README blocks and benchmarks/results/README.md equal what the JSON gives."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "bacon_sglang.demo"],
        *[
            [str(ROOT / "benchmarks" / f"{name}.py")]
            for name in (
                "accuracy",
                "serving",
                "evidence_retention",
                "kernel_bench",
                "demo_time",
                "prefix_reuse",
                "soak",
            )
        ],
        [str(ROOT / "benchmarks" / "report.py")],
    ],
    ids=lambda c: Path(c[-1]).stem,
)
def test_help_says_what_and_how_long_on_cpu(command):
    out = subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    description = out.stdout.split("\n\n")[1]
    assert "CPU" in description and any(
        unit in description for unit in (" s", "second", "minute")
    ), description
