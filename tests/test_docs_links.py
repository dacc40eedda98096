"""Every relative link of the project's Markdown pages leads somewhere: the file exists and,
for ``file#anchor`` or ``#anchor``, a heading of that file has the anchor (GitHub's rule)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_markdown() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if line]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of ``path``'s headings (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        heading = line.lstrip("#").strip()
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    problems = []
    text = re.sub(r"(?s)```.*?```", "", page.read_text())
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{target}: no such heading")
    return problems


def test_relative_links_resolve():
    problems = {
        str(page.relative_to(ROOT)): broken
        for page in tracked_markdown()
        if (broken := broken_links(page))
    }
    assert problems == {}


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# B\n\n## Real part\n")
    page.write_text("[ok](b.md#real-part) [gone](c.md) [bad](b.md#nothing) [self](#a)\n# A\n")
    assert broken_links(page) == ["c.md: no such file", "b.md#nothing: no such heading"]
