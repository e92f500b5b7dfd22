"""The run directory's layout (``protocol.rundir``): keys and admission, what a stopping server takes
back (its endpoint file and ipc socket, never another server's), locks, the report, and clearing a
stopped run for reuse without touching files the layout does not name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import zmq

from protocol import rundir
from support import wait_for


def test_check_key_accepts_curve_keys_and_refuses_everything_else():
    for _ in range(20):
        pub, _sec = zmq.curve_keypair()
        assert rundir.check_key(pub.decode()) == pub.decode()
    good = zmq.curve_keypair()[0].decode()
    for bad in ("", "abc", good[:-1], good + "x", good[:-1] + " ", good[:-1] + "~", "#" * 40):
        with pytest.raises(ValueError):
            rundir.check_key(bad)


def test_admission_files_grants_and_revocation(run_dir):
    made = rundir.init(run_dir, clients=2)
    assert set(made) == {"kernel", "mm", "operator", "client-0", "client-1"}
    grants = rundir.admitted(run_dir)
    assert {g.name for g in grants.values()} == {"client-0", "client-1"}  # servers and operator: never files
    key = zmq.curve_keypair()[0].decode()
    g = rundir.admit(run_dir, "outside", key=key, quota=10, kernel_quota=3)
    assert (g.quota, g.kernel_quota) == (10, 3) and rundir.admitted(run_dir)[key] == g
    adm = rundir.Admission(run_dir, always=(made["mm"],))
    assert adm.allowed(key) and adm.allowed(made["mm"]) and not adm.allowed(made["kernel"])
    assert adm.grant(key).quota == 10
    assert rundir.revoke(run_dir, "outside") and not rundir.revoke(run_dir, "outside")
    adm.refresh(force=True)
    assert not adm.allowed(key)
    for bad in (dict(name="mm"), dict(name="operator"), dict(name="../x"), dict(name="ok", key="short"),
                dict(name="ok", key=key, quota=0)):
        with pytest.raises(ValueError):
            rundir.admit(run_dir, **bad)
    assert "ok" not in {g.name for g in rundir.admitted(run_dir).values()}  # a refused admission writes nothing


def test_admission_sees_a_key_admitted_within_the_same_mtime_tick(run_dir):
    """Two changes of the admitted directory within one tick of the filesystem's clock leave one stamp: a
    server that looked between them must still see the second key (a refused handshake is never retried)."""
    rundir.init(run_dir, clients=0)
    first, second = (zmq.curve_keypair()[0].decode() for _ in range(2))
    rundir.admit(run_dir, "first", key=first)
    adm = rundir.Admission(run_dir)
    d = rundir.admitted_dir(run_dir)
    stamp = os.stat(d).st_mtime_ns
    rundir.admit(run_dir, "second", key=second)
    os.utime(d, ns=(stamp, stamp))  # what a coarse clock does when both changes fall in one tick
    assert adm.allowed(first) and adm.allowed(second)
    # once the stamp is old, a look costs one stat: the directory is not read again for every stranger
    old = stamp - 2 * rundir.RACY_NS
    os.utime(d, ns=(old, old))
    adm.refresh()
    reloads = adm.reloads
    for _ in range(5):
        assert not adm.allowed(zmq.curve_keypair()[0].decode())
    assert adm.reloads == reloads
    ahead = time.time_ns() + 3600 * 10**9  # a directory stamped by a clock an hour ahead of ours: one re-read
    os.utime(d, ns=(ahead, ahead))
    adm.refresh()
    reloads = adm.reloads
    assert not adm.allowed(zmq.curve_keypair()[0].decode()) and adm.reloads == reloads
    rundir.revoke(run_dir, "first")  # a change: seen by the next look (a server's periodic one, for a revocation)
    assert adm.refresh() and adm.reloads == reloads + 1 and not adm.allowed(first)


def test_withdraw_takes_back_only_what_the_server_published(run_dir):
    ep = rundir.default_bind(run_dir, "kernel")
    path = ep[len("ipc://"):]
    ctx = zmq.Context()
    ctx.linger = 0
    try:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(ep)
        rundir.write_endpoint(run_dir, "kernel", ep)
        assert rundir.read_endpoint(run_dir, "kernel") == ep and os.path.exists(path)
        rundir.withdraw(run_dir, "kernel", ep)  # what a stopping kernel calls, before closing its socket
        sock.close(0)
        assert not os.path.exists(rundir.endpoint_path(run_dir, "kernel"))
        assert not os.path.exists(path)
        assert not os.path.exists(rundir.ipc_dir(run_dir, create=False))  # it was the last socket there
        with pytest.raises(FileNotFoundError, match="is the kernel running"):
            rundir.read_endpoint(run_dir, "kernel")
        rundir.withdraw(run_dir, "kernel", ep)  # twice: nothing left to do, no error
    finally:
        ctx.term()
    # a newer server of that name published another endpoint: the old one's withdrawal leaves it
    rundir.write_endpoint(run_dir, "mm", "tcp://127.0.0.1:6000")
    assert not rundir.withdraw_endpoint(run_dir, "mm", "tcp://127.0.0.1:5999")
    assert rundir.read_endpoint(run_dir, "mm") == "tcp://127.0.0.1:6000"
    # the other server's socket keeps the ipc directory; a non-socket file is never unlinked
    other = rundir.default_bind(run_dir, "mm")[len("ipc://"):]
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(other)
    try:
        rundir.withdraw(run_dir, "kernel", rundir.default_bind(run_dir, "kernel"))
        assert os.path.exists(other)
    finally:
        srv.close()
    plain = os.path.join(run_dir, "not-a-socket")
    open(plain, "w").close()
    assert not rundir.remove_ipc_socket(f"ipc://{plain}") and os.path.exists(plain)
    assert not rundir.remove_ipc_socket("tcp://127.0.0.1:5555")


def test_locks_say_who_runs_and_reset_refuses_a_running_system(run_dir, spawn):
    rundir.init(run_dir, clients=1)
    assert rundir.running(run_dir) == [] and rundir.holder(run_dir, "kernel") is None
    code = (f"import sys, time; from protocol import rundir; fd = rundir.lock({run_dir!r}, 'kernel'); "
            "print('locked', flush=True); time.sleep(60)")
    p = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ})
    assert p.stdout.readline().strip() == b"locked"
    assert rundir.running(run_dir) == ["kernel"] and rundir.holder(run_dir, "kernel") == p.pid
    with pytest.raises(RuntimeError, match=f"kernel pid {p.pid}"):
        rundir.reset(run_dir)
    assert rundir.is_run_dir(run_dir)  # nothing was removed
    p.kill()
    p.wait(10)
    wait_for(lambda: not rundir.held(run_dir, "kernel"), 5, "the lock to be dropped")


def test_reset_clears_the_layout_and_nothing_else(run_dir):
    rundir.init(run_dir, clients=2)
    rundir.write_endpoint(run_dir, "kernel", "ipc:///tmp/x")
    rundir.write_report(run_dir, {"ok": True})
    assert rundir.read_report(run_dir) == {"ok": True}
    os.makedirs(rundir.logs_dir(run_dir))
    for name in ("kernel.lock", "mm.lock", "mm.db", "mm.db-wal", "notes.txt"):
        open(os.path.join(run_dir, name), "w").close()
    rundir.ipc_dir(run_dir)
    left = rundir.reset(run_dir)
    assert left == ["notes.txt"] and sorted(os.listdir(run_dir)) == ["notes.txt"]
    assert not os.path.exists(rundir.ipc_dir(run_dir, create=False))


def test_looking_at_a_run_directory_does_not_import_zmq(run_dir):
    code = ("import sys; from protocol import rundir; "
            f"rundir.held({run_dir!r}, 'kernel'); rundir.admitted({run_dir!r}); rundir.running({run_dir!r}); "
            "print('zmq' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr
