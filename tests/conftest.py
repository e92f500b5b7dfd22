"""Shared test settings: one hypothesis profile for the whole suite.

Machines here are shared and noisy, so no per-example deadline; a moderate
number of examples keeps the suite inside its time budget. Select another
profile with ``--hypothesis-profile`` (e.g. ``thorough`` for a long run).
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mmsim",
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mmsim")


# ---- fixtures for multi-process tests ----------------------------------------------------------

import subprocess  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from mmsim.system import System, _die_with_parent  # noqa: E402
from support import LEASE, new_run_dir, remove_run_dir  # noqa: E402


@pytest.fixture
def make_system():
    """Make Systems (kernel and mm as real processes); all are stopped and their directories removed."""
    made: list[System] = []

    def make(**kw: Any) -> System:
        kw.setdefault("lease", LEASE)
        kw.setdefault("clients", 2)
        s = System(new_run_dir(), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(timeout=3.0)
        remove_run_dir(s.run_dir)


@pytest.fixture
def spawn():
    """Start helper processes (python -c clients, raw commands); each is killed at the end.
    Output is discarded unless the caller asks for a pipe (stdout=subprocess.PIPE)."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], **kw: Any) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def run_dir():
    """A fresh, short run directory under /tmp, removed (with its ipc sockets) afterwards."""
    d = new_run_dir()
    yield d
    remove_run_dir(d)
