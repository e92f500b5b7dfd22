"""The project's own specification stays true: docs/design.md's kernel call blocks are what the call
table generates, every kernel and mm call is documented, and nothing the project ships points outside
the repository (a clone has no directory of shared notes beside it)."""

from __future__ import annotations

import os
import re
import subprocess

from kernel_server import calldoc
from kernel_server.calls import CALLS
from protocol.calls import MM_CALLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "design.md")


def _design() -> str:
    with open(DESIGN) as f:
        return f.read()


def test_kernel_call_blocks_are_generated_from_the_call_table():
    text = _design()
    assert calldoc.render(text) == text, "run: python -m kernel_server.calldoc docs/design.md"


def test_every_kernel_call_has_a_block_and_every_mm_call_a_section():
    text = _design()
    assert sorted(calldoc.documented(text)) == sorted(CALLS)
    for name in MM_CALLS:
        assert re.search(rf"^#### `{name}[` ,{{]", text, re.M) or re.search(rf"^#### .*`{name}`", text, re.M), name


def test_every_invariant_is_defined():
    text = _design()
    for i in range(1, 14):
        assert re.search(rf"^- \*\*I{i}\*\* ", text, re.M), f"I{i}"


OUTSIDE = os.path.join("..", "shared")  # (spelt so that this file does not name it itself)


def test_nothing_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        if (name.startswith(".ci/") or name == "tests/test_docs.py"
                or not name.endswith((".py", ".md", ".yml", ".yaml", ".toml", ".html", ".js", ".css", ".json"))):
            continue
        with open(os.path.join(ROOT, name), errors="replace") as f:
            text = f.read()
        if OUTSIDE in text or re.search(r"\bDESIGN(\.md)?\b", text):
            offenders.append(name)
    assert not offenders, f"these point to a design file a clone does not have: {offenders}"
