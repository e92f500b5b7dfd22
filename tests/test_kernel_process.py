"""The kernel as a real process: boot output, CURVE identity and admission, hostile input, retries, leases
(also across a stopped kernel), peers that never read, CLI errors, and a kernel restart under a running mm.
No mocks: every test talks to `mmsim kernel` over ipc.

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

QUOTA = 16  # the kernel quota a test process gets


# ---- helpers -------------------------------------------------------------------------------------

def admitted_system(make: Any, **kw: Any) -> System:
    """A System whose "observer" key pair (no process, no privilege: what status tools and readiness
    checks use) is admitted, as the launcher admits the keys it hands out."""
    s = make(**kw)
    rundir.admit(s.run_dir, "observer")
    return s


def kstats(s: System, **args: Any) -> dict[str, Any]:
    """The kernel's stats as the operator reads them (counts, and the per-process listing)."""
    with s.connection("kernel", identity="operator") as conn:
        return conn.call("stats", args)


def refused_at_the_handshake(endpoint: str, server_key: bytes, pub: bytes, sec: bytes) -> None:
    """A call with this key pair gets nothing back: it times out with EIO (the server never saw it)."""
    with Connection(endpoint, server_key, pub, sec, timeout=0.5, retries=1) as conn:
        with pytest.raises(CallError) as ei:
            conn.call("hello")
    assert ei.value.name == "EIO"


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
    rundir.admit(s.run_dir, "observer")
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

        server_key = rundir.public_key(run, "kernel")
        # a stranger (a key nobody admitted) is refused at the CURVE handshake: no reply, nothing seen
        refused_at_the_handshake(bind, server_key, *rundir.fresh_keypair())
        pub, sec = rundir.load_keypair(run, "operator")  # always admitted
        with Connection(bind, server_key, pub, sec, timeout=2) as conn:
            st = conn.call("stats")
            assert (st["calls"], st["refused"]) == (1, 0)  # the stranger's call never reached the kernel
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
    pub, sec = rundir.load_keypair(s.run_dir, "client-0")  # admitted, no privilege
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
        ("proc_create", {"key": victim, "kernel_quota": QUOTA}),
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
    # this kernel's key, but a key nobody admitted: refused at the handshake, the kernel never sees it
    seen = s.kernel_stats()
    refused_at_the_handshake(endpoint, kernel_key, *rundir.fresh_keypair())
    after = s.kernel_stats()
    assert (after["calls"], after["refused"]) == (seen["calls"] + 1, seen["refused"])  # (+1: this stats)
    assert state(after) == state(before)


def test_a_key_admitted_while_the_kernel_runs_is_accepted_and_a_revoked_one_refused(kernel_only):
    s = kernel_only
    endpoint = rundir.read_endpoint(s.run_dir, "kernel")
    kernel_key = rundir.public_key(s.run_dir, "kernel")
    rundir.generate(s.run_dir, "late")
    pub, sec = rundir.load_keypair(s.run_dir, "late")
    refused_at_the_handshake(endpoint, kernel_key, pub, sec)
    rundir.admit(s.run_dir, "late")
    with Connection(endpoint, kernel_key, pub, sec, timeout=1.0, retries=3) as conn:
        assert conn.call("hello")["identity"] == pub.decode()
    rundir.revoke(s.run_dir, "late")
    wait_for(lambda: _refused_now(endpoint, kernel_key, pub, sec), 5, "the revoked key to be refused")


def _refused_now(endpoint: str, kernel_key: bytes, pub: bytes, sec: bytes) -> bool:
    with Connection(endpoint, kernel_key, pub, sec, timeout=0.5, retries=0) as conn:
        try:
            conn.call("hello")
            return False
        except CallError as exc:
            return exc.name == "EIO"


# ---- at most once ------------------------------------------------------------------------------------------

def test_a_resent_request_executes_once(kernel_only):
    s = kernel_only
    key = rundir.public_key(s.run_dir, "client-1").decode()
    with kernel_conn(s, "mm") as mm:
        pid = mm.call("proc_create", {"key": key, "kernel_quota": QUOTA})["pid"]
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
            after = kstats(s)
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
    s = admitted_system(make_system)
    s.start()
    base = s.kernel_stats()
    c = spawn([sys.executable, "-c", CLIENT_SRC, s.run_dir, "client-0", "24"], stdout=subprocess.PIPE)
    line = read_line(c, 20)
    assert line.startswith("ready"), line
    st = kstats(s)
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
        assert r.returncode == 2 and "'sparc' is not one of" in r.stderr and "i686-pae" in r.stderr
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
    s = admitted_system(make_system)
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
        st = kstats(s)
        assert st["processes"] == 1 and st["user_mapped"] == 8 and conserved(st)
        mm_view = c.mm_stats()["view"]
        assert mm_view["used"] == 8
    report = s.audit()
    assert report["divergences"] == 0 and report["recovery"]["remaining"]["divergences"] == 0, report


def test_a_paused_kernel_is_the_same_boot_when_it_answers_again(make_system):
    s = admitted_system(make_system, lease=30.0)  # the pause must not look like the client's death
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
        st = kstats(s)
        assert st["processes"] == 1 and st["per_process"][0]["pages"] == 3 and conserved(st)
        c.free(got["vaddr"], 3)
    report = s.audit()
    assert report["divergences"] == 0 and report["pending"] == 0, report
    assert report["recovery"]["remaining"]["divergences"] == 0  # the reconciliation after the pause


# ---- leases measure the client, not the kernel ---------------------------------------------------------------

class Pinger:
    """A client that pings the kernel every ``every`` seconds from a thread (Lazy Pirate retries, many of
    them: it keeps trying through a stopped kernel). ``errors`` lists what went wrong."""

    def __init__(self, s: System, name: str, every: float = 0.2) -> None:
        import threading

        self.conn = s.connection("kernel", identity=name, timeout=0.5, retries=40)
        self.every = every
        self.errors: list[str] = []
        self.pings = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.conn.call("ping")
                self.pings += 1
            except CallError as exc:
                self.errors.append(str(exc))
            self.stop.wait(self.every)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.conn.close()


def test_a_stopped_kernel_destroys_no_process_of_a_client_that_kept_pinging(make_system):
    s = admitted_system(make_system, lease=1.0)
    kernel = s.start_kernel()
    keys = {name: rundir.public_key(s.run_dir, name).decode() for name in ("client-0", "client-1")}
    with kernel_conn(s, "mm") as mm:
        pids = {name: mm.call("proc_create", {"key": key, "kernel_quota": QUOTA})["pid"] for name, key in keys.items()}
    pingers = {name: Pinger(s, name) for name in keys}
    try:
        wait_for(lambda: all(p.pings >= 3 for p in pingers.values()), 10, "the clients to ping")
        s.send_signal("kernel", signal.SIGSTOP)
        time.sleep(3 * 1.0)  # three leases
        s.send_signal("kernel", signal.SIGCONT)
        wait_for(lambda: all(p.pings >= 3 + 5 for p in pingers.values()), 20, "the pings to go on")
        time.sleep(2 * 1.0)  # two more leases of pinging
        st = kstats(s)
        assert sorted(p["pid"] for p in st["per_process"]) == sorted(pids.values()), st["per_process"]
        with kernel_conn(s, "operator") as op:
            assert op.call("events")["events"] == []  # no lease ran out
        assert "credited to every lease" in open(kernel.log_path).read()
        # leases still work: a client that stops pinging loses its process
        pingers["client-1"].close()
        wait_for(lambda: [p["pid"] for p in kstats(s)["per_process"]] == [pids["client-0"]], 10,
                 "the silent client's lease to run out")
        with kernel_conn(s, "operator") as op:
            ev = op.call("events")["events"]
        assert [(e["pid"], e["reason"]) for e in ev] == [(pids["client-1"], "lease")]
    finally:
        for p in pingers.values():
            p.close()
    assert not pingers["client-0"].errors, pingers["client-0"].errors[:3]


# ---- bounded reply queues ---------------------------------------------------------------------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_peer_that_never_reads_costs_bounded_memory_and_an_honest_client_is_answered(make_system, zctx):
    import threading

    s = admitted_system(make_system, lease=30.0)
    kernel = s.start_kernel()
    endpoint = rundir.read_endpoint(s.run_dir, "kernel")
    key = rundir.public_key(s.run_dir, "client-0").decode()
    with kernel_conn(s, "mm") as mm:
        mm.call("proc_create", {"key": key, "kernel_quota": QUOTA})
    before = _rss(kernel.pid)
    pub, sec = rundir.load_keypair(s.run_dir, "client-1")  # admitted: it gets past the handshake
    greedy = raw_dealer(zctx, endpoint, rundir.public_key(s.run_dir, "kernel"), pub, sec)
    greedy.sndhwm = 0  # queue without limit on its side: it sends far more than the kernel queues for it
    sent = [0]
    stop = threading.Event()

    def flood() -> None:  # requests as fast as it can, never reading a reply
        big = {"frames": [[1, 1]] * 200}  # a larger request and reply than a ping: an error naming the field
        i = 0
        while not stop.is_set() and i < 60_000:
            greedy.send(wire.request(i, "stats" if i % 2 else "map", {} if i % 2 else big), zmq.NOBLOCK)
            i += 1
        sent[0] = i

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        with Client.from_run_dir(s.run_dir, "client-0", kernel_endpoint=endpoint, mm_endpoint=endpoint,
                                 timeout=2.0, retries=2) as honest:
            for _ in range(100):  # every call answered, none lost to the flood
                tid = honest.kernel.call("thread_create")["tid"]
                honest.kernel.call("thread_destroy", {"tid": tid})
                assert honest.kernel.call("ping")["pid"] is not None
        t.join(60)
        handled = lambda st: st["calls"] + st["refused"]  # noqa: E731 (refused requests are not "calls")
        st = wait_for(lambda: handled(x := kstats(s)) >= sent[0] and x, 60, "the kernel to handle the flood")
        # what the greedy peer's queues could not hold was dropped, not kept
        assert st["replies_dropped"] > sent[0] // 2, st
        grown = _rss(kernel.pid) - before
        assert grown < 64 << 20, f"the kernel grew by {grown >> 20} MiB"
    finally:
        stop.set()
        t.join(10)
        greedy.close(0)
