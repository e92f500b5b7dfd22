"""Helpers shared by the multi-process tests (imported as ``support``; fixtures are in conftest.py).

Run directories live under /tmp with short names so ipc paths stay short; waiting is polling with a
deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from protocol import rundir

LEASE = 1.0  # seconds: the lease of test systems, short so expiry tests are quick
COUNTERS = ("calls", "refused", "replayed")  # kernel stats fields that count calls, not state


def admit(run_dir: str, name: str, quota: int | None = None, kernel_quota: int | None = None) -> tuple[bytes, bytes]:
    """Make key pair ``name`` (if missing) and admit it, as the operator would; its (public, secret) keys.
    Only admitted keys get anything from the servers: a test's extra client must be admitted first."""
    rundir.generate(run_dir, name)
    rundir.admit(run_dir, name, quota=quota, kernel_quota=kernel_quota)
    return rundir.load_keypair(run_dir, name)


def new_run_dir(prefix: str = "mmt-") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def remove_run_dir(run_dir: str) -> None:
    rundir.remove_ipc_dir(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def state(stats: dict[str, Any]) -> dict[str, Any]:
    """Kernel stats without the call counters: what a refused call must leave unchanged."""
    return {k: v for k, v in stats.items() if k not in COUNTERS}


def conserved(st: dict[str, Any]) -> bool:
    """I7 on the kernel's own figures."""
    return st["kernel_free"] + st["kernel_used"] + st["kernel_shared"] + st["user_free"] + st["user_mapped"] == st["ram"]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something true (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def mmsim(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run an ``mmsim`` command to its end; a usage error must never show a traceback. The terminal is
    wide, so rich's boxed usage errors do not wrap the message a test looks for."""
    env = {**os.environ, "COLUMNS": "250"}
    r = subprocess.run([sys.executable, "-m", "mmsim.cli", *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    assert "Traceback" not in r.stderr, r.stderr
    return r
