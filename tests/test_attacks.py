"""Lying clients (``mmsim client attack``) against a real kernel and mm, and the checker against a liar.

``attack --all`` must pass against the real system with exactly the refusals
the design names (checked here against an independent table), leave nothing
behind (audit: 0 divergences once the leases ran out), and FAIL against
servers that accept every lie, so the attacks are not checks that cannot fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pytest
from typer.testing import CliRunner

from clients.attacks import ATTACKS, run_attacks, verdict_error, verdict_no_reply
from mmsim.cli import app
from mmsim.system import System
from protocol.errors import Errno
from test_clients import LyingServers, plausible  # the fake servers live with the runner's tests

# What the design says each lie gets (DESIGN sections 2, 3, 5 and 7), kept apart from clients.attacks.
REFUSAL = {
    "anonymous": "no reply", "mm-anonymous": "no reply", "wrong-server-key": "no reply",
    "mm-wrong-server-key": "no reply",
    "donate-unprivileged": "EPERM", "reclaim-unprivileged": "EPERM", "proc-create-unprivileged": "EPERM",
    "proc-destroy-unprivileged": "EPERM", "frame-info-unprivileged": "EPERM", "events-unprivileged": "EPERM",
    "mm-audit-unprivileged": "EPERM", "foreign-pid-map": "EPERM", "foreign-pid-unmap": "EPERM",
    "foreign-frame-map": "EPERM", "foreign-vaddr-unmap": "EINVAL", "unmap-mm-memory": "EPERM", "foreign-objects": "ESRCH",
    "mm-free-foreign": "EINVAL", "mm-share-foreign": "EINVAL", "map-kernel-frame": "EPERM",
    "map-boot-image-writable": "EPERM", "map-wx": "ENOTSUP", "map-unaligned": "EINVAL(field=vaddr)",
    "map-out-of-range": "EINVAL", "bad-runs": "EINVAL(field=frames", "too-many-runs": "EINVAL(field=frames)",
"mm-share-more-rights": "EPERM", "mm-share-to-mm": "EINVAL", "mm-alloc-wx": "ENOTSUP",
    "mm-alloc-out-of-range": "EINVAL(field=", "garbage-bytes": "EPROTO", "mm-garbage-bytes": "EPROTO",
    "bad-envelope": "EPROTO", "mm-bad-envelope": "EPROTO", "wrong-types": "EINVAL(field=",
    "mm-wrong-types": "EINVAL(field=", "unknown-call": "ENOSYS", "mm-unknown-call": "ENOSYS",
    "unknown-fields": "EINVAL(field=", "mm-unknown-fields": "EINVAL(field=", "multi-frame": "EPROTO",
    "mm-multi-frame": "EPROTO", "million-runs": "E2BIG", "mm-million-runs": "E2BIG",
}
# Attacks whose parts are not all refusals: a label -> what that part must have got.
SPECIAL = {
    "forged-routing-id": {"donate": "EPERM", "reclaim": "EPERM", "mm audit": "EPERM"},
    "throwaway-key": {"donate": "EPERM", "thread_create": "ESRCH", "map shared": "ESRCH"},
    "oversized-message": {"2 MiB": "E2BIG"},
    "mm-oversized-message": {"2 MiB": "E2BIG"},
    "replay-different": {"thread_create with the ping's id": "EINVAL(field=id)"},
    "mm-replay-different": {"alloc with the ping's id": "EINVAL(field=id)"},
    "replay-identical": {"executed once": "threads 0 -> 1"},
    "mm-replay-alloc": {"same answer": "ok, ok"},
    "mm-quota": {"quota + 1 pages": "ENOMEM", "details": "quota="},
    "flood": {"answers": "0 wrong"},
    "mm-flood": {"answers": "0 wrong"},
}


def test_every_attack_has_an_independent_expectation() -> None:
    assert set(ATTACKS) == set(REFUSAL) | set(SPECIAL)


@pytest.fixture(scope="module")
def system():
    run_dir = tempfile.mkdtemp(prefix="mma-", dir="/tmp")
    s = System(run_dir, lease=1.0, clients=0)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_attack_all_is_refused_by_the_real_system(system: System) -> None:
    p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "attack", "--run-dir", system.run_dir, "--all",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["failed"] == 0 and report["passed"] == len(ATTACKS)
    table = p.stderr.splitlines()
    assert sum(line.endswith("PASS") or "PASS  [" in line for line in table) == len(ATTACKS)
    for o in report["attacks"]:
        assert o["passed"], o
        if o["kind"] in REFUSAL:
            want = REFUSAL[o["kind"]]
            assert o["parts"] and all(part["got"].startswith(want) for part in o["parts"]), o
        else:
            got = {part["label"]: part["got"] for part in o["parts"]}
            for label, want in SPECIAL[o["kind"]].items():
                assert got[label].startswith(want), o
    assert system.kernel_stats()  # still there
    audit = system.wait_quiet(timeout=15)
    assert audit["divergences"] == 0, audit  # the lies left nothing behind, in either view


def test_one_kind_from_the_command_line(system: System) -> None:
    p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "attack", "--run-dir", system.run_dir,
                        "--kind", "donate-unprivileged", "--kind", "mm-garbage-bytes"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.endswith("PASS")]
    assert [ln.split()[0] for ln in lines] == ["donate-unprivileged", "mm-garbage-bytes"]
    assert "EPERM" in lines[0] and "EPROTO" in lines[1]


def test_bad_options_exit_2(system: System) -> None:
    runner = CliRunner()
    for args in (["--all"], ["--run-dir", system.run_dir], ["--run-dir", system.run_dir, "--kind", "no-such-lie"],
                 ["--run-dir", system.run_dir, "--all", "--kind", "flood"], ["--run-dir", "/nonexistent", "--all"]):
        r = runner.invoke(app, ["client", "attack", *args])
        assert r.exit_code == 2, (args, r.output)
    r = runner.invoke(app, ["client", "attack", "--list"])
    assert r.exit_code == 0 and all(kind in r.output for kind in ATTACKS)


# ---- the checker can fail ---------------------------------------------------------------------------------

def refusal(code: Errno, **details) -> dict:
    return {"v": 1, "id": 1, "ok": False, "error": {"code": code.name, "errno": int(code), "message": "no", **details}}


def test_verdicts_fail_a_lie_that_was_accepted() -> None:
    accepted = {"v": 1, "id": 1, "ok": True, "result": {"frames": [[0, 1]], "kernel_free": 5}}
    assert verdict_error(accepted, [Errno.EPERM]) == (False, "ok")
    assert verdict_error(None, [Errno.EPERM]) == (False, "no reply")
    assert verdict_error(refusal(Errno.EINVAL), [Errno.EPERM])[0] is False  # refused, but for the wrong reason
    assert verdict_error({**refusal(Errno.EPERM), "error": {"code": "EPERM", "errno": 3}}, [Errno.EPERM])[0] is False
    assert verdict_error(refusal(Errno.EINVAL, field="pages"), [Errno.EINVAL], field="tid")[0] is False
    assert verdict_error({"malformed": True}, [Errno.EPROTO])[0] is False
    assert verdict_no_reply(accepted) == (False, "ok")
    # and the right refusals pass
    assert verdict_error(refusal(Errno.EPERM), [Errno.EPERM]) == (True, "EPERM")
    assert verdict_error(refusal(Errno.EINVAL, field="frames.0.0"), [Errno.EINVAL], field="frames")[0] is True
    assert verdict_no_reply(None) == (True, "no reply")


@pytest.fixture
def liar():
    d = tempfile.mkdtemp(prefix="mml-", dir="/tmp")
    servers = LyingServers(d, plausible)
    try:
        yield d
    finally:
        servers.close()
        shutil.rmtree(d, ignore_errors=True)


def test_every_attack_fails_against_servers_that_accept_every_lie(liar: str) -> None:
    # the liar speaks CURVE with the right keys, so the transport-level refusals (anonymous, a wrong server
    # key) still hold; every other attack must see through it
    kinds = [k for k in ATTACKS if REFUSAL.get(k) != "no reply"]
    outcomes = run_attacks(liar, kinds, timeout=1.0)
    passed = [o.kind for o in outcomes if o.passed]
    assert passed == [], passed
    p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "attack", "--run-dir", liar, "--kind",
                        "donate-unprivileged", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "ok (expected EPERM)" in json.loads(p.stdout.strip().splitlines()[-1])["attacks"][0]["got"]
