"""The layout rules the code promises: sans-I/O modules import no I/O.

A sans-I/O module (the kernel's core and everything it stands on, the service, the invariant
checks; the wire contract's pure parts) takes its inputs as arguments and returns replies: no
sockets, clocks, randomness, databases or operating system. This test reads each module's
imports (with ``ast``, so an import inside a function counts too) and fails on any of those.
Add a module to ``SANS_IO`` when it makes that promise.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SANS_IO = [
    # the kernel
    "kernel_server/core.py",
    "kernel_server/pagetable.py",
    "kernel_server/process.py",
    "kernel_server/frames.py",
    "kernel_server/slab.py",
    "kernel_server/arch.py",
    "kernel_server/bootmap.py",
    "kernel_server/calls.py",
    "kernel_server/service.py",
    "kernel_server/invariants.py",
    "kernel_server/observe.py",
    "kernel_server/fastargs.py",
    # the memory manager's cores
    "mm_service/policy.py",
    "mm_service/view.py",
    "mm_service/placement.py",
    "mm_service/records.py",
    "mm_service/service.py",
    "mm_service/driver.py",
    "mm_service/health.py",
    "mm_service/observe.py",
    # the wire contract
    "protocol/wire.py",
    "protocol/calls.py",
    "protocol/runs.py",
    "protocol/replay.py",
    "protocol/errors.py",
]
FORBIDDEN = {"zmq", "time", "sqlite3", "os", "socket", "random", "secrets", "subprocess", "threading",
             "asyncio", "selectors", "signal", "datetime", "uuid"}


def imported_modules(path: pathlib.Path) -> dict[str, int]:
    """Top-level names of every module ``path`` imports, with the line of the first such import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            out.setdefault(name.split(".")[0], node.lineno)
    return out


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_modules_import_no_io(module):
    path = ROOT / module
    assert path.exists(), f"{module} is listed as sans-I/O but does not exist"
    bad = {name: line for name, line in imported_modules(path).items() if name in FORBIDDEN}
    assert not bad, f"{module} imports I/O: " + ", ".join(f"{n} (line {line})" for n, line in sorted(bad.items()))


def test_the_checker_sees_imports_anywhere_in_a_module(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import numpy as np\nfrom os import path\n\n"
                   "def f():\n    import time.x\n    from zmq import Socket\n")
    assert imported_modules(src) == {"numpy": 1, "os": 2, "time": 5, "zmq": 6}


def test_kernel_server_is_a_package_with_a_docstring():
    init = ROOT / "kernel_server" / "__init__.py"
    assert init.exists() and ast.get_docstring(ast.parse(init.read_text()))
