"""The kernel as a real process: boot output, CURVE identity, hostile input, retries, leases, CLI errors,
and a kernel restart under a running mm. No mocks: every test talks to `mmsim kernel` over ipc.

Run directories come from ``tempfile.mkdtemp(prefix="mmt-", dir="/tmp")`` so ipc paths stay short;
every process a test starts is stopped by a fixture finalizer, also when the test fails. Waiting is
done by polling for a reply, a line or a file with a deadline, never by fixed sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import zmq

from clients.client import Client
from mmsim.system import System
from protocol import rundir, wire
from protocol.connection import Connection
from protocol.errors import CallError
from protocol.runs import to_array
from support import LEASE, conserved, mmsim, new_run_dir, remove_run_dir, state, wait_for



# ---- helpers -------------------------------------------------------------------------------------











def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout within ``timeout`` seconds (polling the pipe, no blocking read)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line from pid {proc.pid} within {timeout:g}s (got {buf!r})")
            ch = os.read(proc.stdout.fileno(), 1)
            if not ch:
                raise AssertionError(f"pid {proc.pid} closed its output (status {proc.poll()}); got {buf!r}")
            buf += ch
    finally:
        sel.close()
    return buf.decode().rstrip("\n")


def raw_dealer(ctx: zmq.Context, endpoint: str, server_key: bytes | None, pub: bytes | None = None,
               sec: bytes | None = None, routing_id: bytes | None = None) -> zmq.Socket:
    """A DEALER socket made by hand: CURVE with the given key pair, or anonymous if ``server_key`` is None."""
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    if server_key is not None:
        s.curve_serverkey = server_key
        s.curve_publickey = pub
        s.curve_secretkey = sec
    s.connect(endpoint)
    return s


def rpc(sock: zmq.Socket, data: bytes | list[bytes], timeout: float = 2.0) -> dict[str, Any] | None:
    """Send raw bytes (or a multi-part message) and return the decoded reply, or None if none came."""
    if isinstance(data, list):
        sock.send_multipart(data)
    else:
        sock.send(data)
    if not sock.poll(timeout * 1000, zmq.POLLIN):
        return None
    return wire.parse_reply(sock.recv())






@pytest.fixture(scope="module")
def kernel_only():
    """One kernel process (no mm) shared by the tests that leave its state as they found it."""
    s = System(new_run_dir(), lease=30.0, clients=2)  # no test here waits for a lease
    try:
        s.start_kernel()
        yield s
    finally:
        s.stop(timeout=3.0)
        remove_run_dir(s.run_dir)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    ctx.linger = 0
    yield ctx
    ctx.destroy(linger=0)


def kernel_conn(s: System, name: str, **kw: Any) -> Connection:
    return s.connection("kernel", identity=name, **kw)




# ---- boot ------------------------------------------------------------------------------------------

def test_kernel_prints_endpoint_and_boot_summary_and_boots_a_pc_map(spawn):
    run = new_run_dir()
    try:
        bind = f"ipc://{run}/k.sock"
        k = spawn([sys.executable, "-m", "mmsim.cli", "kernel", "--run-dir", run, "--lease", "1",
                   "--bind", bind], stdout=subprocess.PIPE)
        first = read_line(k, 30)
        assert first == f"kernel listening on {bind}"
        summary = read_line(k, 10)
        m = re.match(r"kernel booted i686: (\d+) frames \((\d+) RAM\): kernel free (\d+), kernel used (\d+), "
                     r"kernel shared (\d+), user free (\d+), user mapped (\d+);", summary)
        assert m, summary
        frames, ram, kfree, kused, kshared, ufree, umapped = map(int, m.groups())
        assert frames == 65536 and ram == 65536 - 256  # 256 MiB, the low 1 MiB is not RAM for us
        assert kfree + kused + kshared + ufree + umapped == ram and umapped == 0
        assert rundir.read_endpoint(run, "kernel") == bind

        pub, sec = rundir.fresh_keypair()
        with Connection(bind, rundir.public_key(run, "kernel"), pub, sec, timeout=2) as conn:
            st = conn.call("stats")
            assert (st["kernel_free"], st["kernel_used"], st["kernel_shared"], st["user_free"]) == \
                (kfree, kused, kshared, ufree)
            amap = conn.call("address_map")
        entries = amap["entries"]
        assert entries[0]["kind"] == "reserved" and entries[0]["start"] == 0 and entries[0]["size"] == 1 << 20
        image = [e for e in entries if e["kind"] == "kernel_image"]
        assert len(image) == 1 and image[0]["start"] == 16 << 20 and image[0]["shared"]
        assert {"frame_table", "kernel_pool", "ramdisk", "firmware", "user"} <= {e["kind"] for e in entries}
        assert sum(e["count"] for e in entries if e["owner"] != "none") == ram
        k.send_signal(signal.SIGTERM)
        assert k.wait(10) == 0
    finally:
        remove_run_dir(run)


# ---- identity ----------------------------------------------------------------------------------------

def test_hello_reports_the_callers_curve_identity(kernel_only):
    s = kernel_only
    client_pub = rundir.public_key(s.run_dir, "client-0").decode()
    with kernel_conn(s, "client-0") as conn:
        h = conn.call("hello")
    assert h["identity"] == client_pub and h["is_mm"] is False and h["pid"] is None
    assert h["arch"] == "i686" and h["lease_seconds"] == 30.0 and h["boot_id"]
    mm_pub = rundir.public_key(s.run_dir, "mm").decode()
    with kernel_conn(s, "mm") as conn:
        h = conn.call("hello")
    assert h["identity"] == mm_pub and h["is_mm"] is True


def test_a_forged_routing_id_gains_nothing(kernel_only, zctx):
    s = kernel_only
    endpoint = rundir.read_endpoint(s.run_dir, "kernel")
    kernel_key = rundir.public_key(s.run_dir, "kernel")
    mm_pub = rundir.public_key(s.run_dir, "mm")
    pub, sec = rundir.fresh_keypair()
    before = s.kernel_stats()
    with kernel_conn(s, "mm") as conn:
        amap = conn.call("address_map")
    user = [e for e in amap["entries"] if e["kind"] == "user"][-1]
    free_user = [[user["first"], 4]]
    for rid in (mm_pub, zmq.utils.z85.decode(mm_pub).lstrip(b"\0"), b"kernel"):  # ids may not start with 0
        sock = raw_dealer(zctx, endpoint, kernel_key, pub, sec, routing_id=rid)
        try:
            r = rpc(sock, wire.request(1, "donate", {"frames": free_user}))
            assert r is not None and r["ok"] is False and r["error"]["code"] == "EPERM", r
            r = rpc(sock, wire.request(2, "hello"))
            assert r["ok"] and r["result"]["identity"] == pub.decode() and r["result"]["is_mm"] is False
        finally:
            sock.close(0)
    assert state(s.kernel_stats()) == state(before)


def test_only_the_mm_key_may_donate_reclaim_create_or_read_frames(kernel_only):
    s = kernel_only
    with kernel_conn(s, "mm") as conn:
        amap = conn.call("address_map")
    user = [e for e in amap["entries"] if e["kind"] == "user"][-1]
    pool = [e for e in amap["entries"] if e["kind"] == "kernel_pool"][0]
    victim = rundir.public_key(s.run_dir, "client-1").decode()
    attempts = [
        ("donate", {"frames": [[user["first"], 8]]}),
        ("reclaim", {"count": 4}),
        ("reclaim", {"frames": [[pool["first"], 2]]}),
        ("proc_create", {"key": victim}),
        ("proc_destroy", {"pid": 1}),
        ("frame_info", {"frames": [[0, 16]]}),
        ("events", {"since": 0}),
    ]
    before = s.kernel_stats()
    for who in ("client-0", "observer"):
        with kernel_conn(s, who) as conn:
            for call, args in attempts:
                with pytest.raises(CallError) as ei:
                    conn.call(call, args)
                assert ei.value.name == "EPERM", (who, call, ei.value)
                assert "memory manager" in ei.value.error.message
    after = s.kernel_stats()
    assert state(after) == state(before)
    assert after["refused"] == before["refused"] + 2 * len(attempts)


# ---- hostile bytes -------------------------------------------------------------------------------------

def test_garbage_multipart_oversized_and_anonymous_input(kernel_only, zctx):
    s = kernel_only
    endpoint = rundir.read_endpoint(s.run_dir, "kernel")
    kernel_key = rundir.public_key(s.run_dir, "kernel")
    pub, sec = rundir.load_keypair(s.run_dir, "client-0")
    before = s.kernel_stats()
    sock = raw_dealer(zctx, endpoint, kernel_key, pub, sec)
    try:
        for junk in (b"\xc1\xff\x00garbage", b"", b"\x93\x01\x02\x03", wire.encode({"v": 1, "id": "7", "call": "ping"})):
            r = rpc(sock, junk)
            assert r is not None and r["ok"] is False and r["error"]["code"] == "EPROTO", (junk, r)
            assert r["error"]["errno"] == 14 and r["error"]["message"]
        assert rpc(sock, wire.request(10, "ping"))["ok"] is True  # still answering, on the same socket

        r = rpc(sock, [wire.request(11, "ping"), b"second part"])
        assert r is not None and r["ok"] is False and r["error"]["code"] == "EPROTO"
        assert "frame" in r["error"]["message"]

        big = wire.encode({"v": 1, "id": 12, "call": "ping", "args": {"pad": "x" * (wire.MAX_REQUEST_BYTES + 10)}})
        r = rpc(sock, big, timeout=5)
        assert r is not None and r["ok"] is False and r["error"]["code"] == "E2BIG"
        assert rpc(sock, wire.request(13, "ping"))["ok"] is True
    finally:
        sock.close(0)

    # beyond what the transport accepts: the kernel drops that connection, and answers everyone else
    huge_sock = raw_dealer(zctx, endpoint, kernel_key, pub, sec)
    try:
        assert rpc(huge_sock, b"\x00" * (wire.MAX_TRANSPORT_BYTES + 1), timeout=1.0) is None
    finally:
        huge_sock.close(0)
    with kernel_conn(s, "client-0") as conn:
        assert "pid" in conn.call("ping")

    # no CURVE at all: the handshake fails, nothing is delivered and nothing comes back
    anon = raw_dealer(zctx, endpoint, None)
    try:
        assert rpc(anon, wire.request(20, "hello"), timeout=1.0) is None
        with kernel_conn(s, "client-1") as conn:
            assert conn.call("hello")["identity"] == rundir.public_key(s.run_dir, "client-1").decode()
    finally:
        anon.close(0)
    # CURVE, but not this kernel's key: also nothing
    wrong = raw_dealer(zctx, endpoint, rundir.fresh_keypair()[0], pub, sec)
    try:
        assert rpc(wrong, wire.request(21, "hello"), timeout=1.0) is None
    finally:
        wrong.close(0)
    assert state(s.kernel_stats()) == state(before)


# ---- at most once ------------------------------------------------------------------------------------------

def test_a_resent_request_executes_once(kernel_only):
    s = kernel_only
    key = rundir.public_key(s.run_dir, "client-1").decode()
    with kernel_conn(s, "mm") as mm:
        pid = mm.call("proc_create", {"key": key})["pid"]
        try:
            before = s.kernel_stats()
            with kernel_conn(s, "client-1") as conn:
                rid = conn.new_id()
                data = wire.request(rid, "thread_create")
                first = conn.exchange(data, rid)
                conn.reset()  # as Lazy Pirate does: a new socket, the same bytes
                second = conn.exchange(data, rid)
                third = conn.exchange(data, rid)
                assert first["ok"] and first == second == third
                tid = first["result"]["tid"]
                other = conn.call("thread_create")["tid"]  # a new id is a new request
                assert other != tid
            after = s.kernel_stats()
            proc = next(p for p in after["per_process"] if p["pid"] == pid)
            assert proc["threads"] == 2
            assert after["kernel_used"] == before["kernel_used"] + 2  # one frame per thread, not three
            assert after["replayed"] >= before["replayed"] + 2
        finally:
            mm.call("proc_destroy", {"pid": pid})
    assert s.kernel_stats()["processes"] == 0


# ---- client death ------------------------------------------------------------------------------------------

CLIENT_SRC = """
import sys, time
from clients.client import Client
c = Client.from_run_dir(sys.argv[1], sys.argv[2], timeout=2.0)
c.start_keepalive()
got = c.alloc(int(sys.argv[3]))
tid = c.thread_create()
print("ready", got["frames"], flush=True)
time.sleep(120)
"""


def test_killing_a_client_releases_its_process_within_the_lease(make_system, spawn):
    s = make_system()
    s.start()
    base = s.kernel_stats()
    c = spawn([sys.executable, "-c", CLIENT_SRC, s.run_dir, "client-0", "24"], stdout=subprocess.PIPE)
    line = read_line(c, 20)
    assert line.startswith("ready"), line
    st = s.kernel_stats()
    assert st["processes"] == 1 and st["user_mapped"] == 24 and st["per_process"][0]["threads"] == 1
    os.kill(c.pid, signal.SIGKILL)
    c.wait(10)
    killed = time.monotonic()
    st = wait_for(lambda: (x := s.kernel_stats())["processes"] == 0 and x, LEASE + 5, "the lease to expire")
    assert time.monotonic() - killed < LEASE + 5
    assert st["user_mapped"] == 0 and conserved(st)
    assert st["kernel_used"] == base["kernel_used"]  # the thread, page tables and process objects came back
    with s.connection("mm") as mm:  # the mm's view returns the frames once it read the death event
        wait_for(lambda: mm.call("stats")["view"]["used"] == 0, 5, "the mm to forget the dead client")
    report = s.audit()
    assert report["divergences"] == 0, report


# ---- command line ---------------------------------------------------------------------------------------------

def test_cli_usage_errors_exit_2_with_a_clear_message():
    run = new_run_dir()
    try:
        r = mmsim("kernel", "--run-dir", run, "--arch", "sparc")
        assert r.returncode == 2 and "unknown architecture 'sparc'" in r.stderr and "i686-pae" in r.stderr
        r = mmsim("kernel", "--run-dir", run, "--memory", "lots")
        assert r.returncode == 2 and "--memory" in r.stderr and "bad size 'lots'" in r.stderr
        r = mmsim("kernel", "--run-dir", run, "--memory", "1MiB")
        assert r.returncode == 2 and "below the minimum" in r.stderr
        r = mmsim("kernel", "--run-dir", run, "--lease", "0")
        assert r.returncode == 2 and "--lease" in r.stderr
        assert not os.path.exists(os.path.join(run, "kernel.endpoint"))
    finally:
        remove_run_dir(run)


def test_a_taken_bind_fails_cleanly(kernel_only):
    s = kernel_only
    run = new_run_dir()
    try:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            r = mmsim("kernel", "--run-dir", run, "--bind", f"tcp://127.0.0.1:{port}")
        finally:
            holder.close()
        assert r.returncode != 0 and "cannot bind" in r.stderr and "in use" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        # the ipc path of a running kernel: refused, not stolen (zmq would silently unlink and rebind it)
        endpoint = rundir.read_endpoint(s.run_dir, "kernel")
        r = mmsim("kernel", "--run-dir", run, "--bind", endpoint)
        assert r.returncode != 0 and "cannot bind" in r.stderr and "in use" in r.stderr, r.stderr
        with kernel_conn(s, "observer") as conn:
            assert conn.call("ping") == {"pid": None}
        assert rundir.read_endpoint(s.run_dir, "kernel") == endpoint
    finally:
        remove_run_dir(run)


# ---- kernel restart ---------------------------------------------------------------------------------------------

def test_kernel_restart_under_a_running_mm(make_system):
    s = make_system()
    s.start()
    mm_log = s.parts["mm"].log_path
    with Client.from_run_dir(s.run_dir, "client-0", timeout=0.5, retries=1) as c:
        c.start_keepalive()
        c.alloc(16)
        old_boot = c.hello()["boot_id"]
        s.kill("kernel", signal.SIGKILL)

        # the kernel is gone: every call ends with EIO after the retries, none hangs
        t0 = time.monotonic()
        with pytest.raises(CallError) as ei:
            c.ping()
        assert ei.value.name == "EIO" and time.monotonic() - t0 < 3
        wait_for(lambda: "kernel unreachable" in open(mm_log).read(), 10, "the mm to notice the kernel is gone")
        t0 = time.monotonic()
        with pytest.raises(CallError) as ei:
            c.alloc(4)
        assert ei.value.name == "EIO" and "unreachable" in ei.value.error.message  # the mm's answer
        assert time.monotonic() - t0 < 3
        assert c.mm_stats()["clients"] == 1  # calls that need no kernel are still answered

        s.start_kernel()
        wait_for(lambda: "serving the new boot" in open(mm_log).read(), 10, "the mm to resync with the new boot")
        log = open(mm_log).read()
        assert "the kernel restarted" in log and "set aside" in log
        assert [f for f in os.listdir(s.run_dir) if f.startswith("mm.db.stale-")]
        assert s.parts["mm"].alive()

        # the old boot's process and memory are gone; the client starts afresh through the same mm
        h = c.hello()
        assert h["boot_id"] != old_boot and h["pid"] is None
        got = c.alloc(8)
        assert to_array(got["frames"]).size == 8
        st = s.kernel_stats()
        assert st["processes"] == 1 and st["user_mapped"] == 8 and conserved(st)
        mm_view = c.mm_stats()["view"]
        assert mm_view["used"] == 8
    report = s.audit()
    assert report["divergences"] == 0 and report["recovery"]["remaining"]["divergences"] == 0, report


def test_a_paused_kernel_is_the_same_boot_when_it_answers_again(make_system):
    s = make_system(lease=30.0)  # the pause must not look like the client's death
    s.start()
    mm_log = s.parts["mm"].log_path
    with Client.from_run_dir(s.run_dir, "client-0", timeout=0.5, retries=1) as c:
        first = c.alloc(4)
        s.send_signal("kernel", signal.SIGSTOP)
        try:
            wait_for(lambda: "kernel unreachable" in open(mm_log).read(), 10, "the mm to miss the kernel")
            t0 = time.monotonic()
            with pytest.raises(CallError) as ei:
                c.alloc(2)
            assert ei.value.name == "EIO" and time.monotonic() - t0 < 3
        finally:
            s.send_signal("kernel", signal.SIGCONT)
        wait_for(lambda: "the kernel is back (same boot" in open(mm_log).read(), 10, "the mm to reconcile")
        assert "restarted" not in open(mm_log).read()
        c.free(first["vaddr"], 4)  # what it had before the pause is still there and still its own
        got = c.alloc(3)
        st = s.kernel_stats()
        assert st["processes"] == 1 and st["per_process"][0]["pages"] == 3 and conserved(st)
        c.free(got["vaddr"], 3)
    report = s.audit()
    assert report["divergences"] == 0 and report["pending"] == 0, report
    assert report["recovery"]["remaining"]["divergences"] == 0  # the reconciliation after the pause
