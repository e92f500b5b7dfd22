"""The memory manager as a real process between a real kernel and real clients: alloc/free, offers and
accepts over the wire, quotas and the budget, many clients in flight at once, donations when the kernel runs short, kill -9 of the mm mid-request and its recovery from
the journal, client death, the `mmsim audit` command, a lying holder of the mm's key, and large pages.

Run directories come from ``tempfile.mkdtemp(prefix="mmt-", dir="/tmp")`` so ipc paths stay short;
every process a test starts is stopped by a fixture finalizer, also when the test fails. Waiting is
done by polling with a deadline, never by fixed sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from clients.client import Client
from mmsim.system import System
from protocol import PROT_READ, PROT_WRITE, rundir
from protocol.connection import Connection
from protocol.errors import CallError
from protocol.runs import to_array
from support import LEASE, conserved, mmsim, state, wait_for



# ---- helpers -------------------------------------------------------------------------------------

def system(make_system, **kw: Any) -> System:
    """A System whose "observer" key (its readiness pings) is admitted: only admitted keys get past the
    servers' handshake now."""
    s = make_system(**kw)
    rundir.admit(s.run_dir, "observer")
    return s


def log_of(s: System, name: str) -> str:
    with open(s.parts[name].log_path, errors="replace") as f:
        return f.read()


def mm_stats(s: System) -> dict[str, Any]:
    with s.connection("mm", identity="operator") as conn:
        return conn.call("stats")


def kstats(s: System) -> dict[str, Any]:
    """The kernel's stats with its per-process listing (the operator's)."""
    with s.connection("kernel", identity="operator") as conn:
        return conn.call("stats", {"from_pid": 0})


def unreserved(st: dict[str, Any]) -> int:
    return st["kernel_free"] - st["kernel_reserved"]


def lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [ln for ln in f.read().split("\n")[:-1]]  # whole lines only
    except FileNotFoundError:
        return []


# ---- the basics over the wire ----------------------------------------------------------------------

def test_alloc_free_offer_accept_and_stats_over_the_wire(make_system):
    s = system(make_system)
    s.start()
    base = kstats(s)
    with Client.from_run_dir(s.run_dir, "client-0") as a, Client.from_run_dir(s.run_dir, "client-1") as b:
        a.start_keepalive()
        b.start_keepalive()
        got = a.alloc(8, PROT_READ | PROT_WRITE)
        frames = to_array(got["frames"])
        assert frames.size == 8 and got["pages"] == 8 and got["vaddr"] % 4096 == 0
        st = kstats(s)
        assert st["user_mapped"] == base["user_mapped"] + 8 and st["processes"] == 1 and conserved(st)
        with pytest.raises(CallError) as ei:  # the peer has no process yet: nothing is made for it
            a.share(got["vaddr"], 8, b.identity)
        assert ei.value.name == "ESRCH" and kstats(s)["processes"] == 1

        mine = b.alloc(1)
        offer = a.share(got["vaddr"], 8, b.identity, prot=PROT_READ)
        assert offer["peer"] == b.identity and offer["pages"] == 8 and offer["prot"] == PROT_READ
        with pytest.raises(CallError) as ei:  # more access than the allocation has: refused
            a.share(got["vaddr"], 8, b.identity, prot=PROT_READ | PROT_WRITE | 4)
        assert ei.value.name in ("EPERM", "ENOTSUP")
        assert b.mm_stats()["you"]["offers"]["to_you"][0]["offer"] == offer["offer"]
        acc = b.accept(offer["offer"], vaddr=0x1000_0000)
        assert acc["vaddr"] == 0x1000_0000 and to_array(acc["frames"]).tolist() == frames.tolist()
        with s.connection("kernel", identity="operator") as k:
            seg = k.call("frame_info", {"frames": got["frames"]})["segments"]
        assert all(kind == "user" and refs == 2 for _, _, kind, refs in seg)  # the refcount path
        st = kstats(s)
        pages = {p["key"]: p["pages"] for p in st["per_process"]}
        assert pages == {a.identity: 8, b.identity: 9} and st["user_mapped"] == base["user_mapped"] + 9

        you = a.mm_stats()["you"]
        assert you["charged"] == 8 and you["mappings"] == 1 and mm_stats(s)["clients"] == 2
        assert b.mm_stats()["you"]["charged"] == 9  # each mapper is charged for what it maps
        assert {p["key"]: p["kernel_limit"] for p in st["per_process"]} == {a.identity: you["kernel_quota"],
                                                                           b.identity: you["kernel_quota"]}

        freed = a.free(got["vaddr"], 8)
        assert to_array(freed["frames"]).tolist() == frames.tolist()
        with pytest.raises(CallError) as ei:
            a.free(got["vaddr"], 8)
        assert ei.value.name == "EINVAL"
        st = kstats(s)
        assert st["user_mapped"] == base["user_mapped"] + 9  # still mapped by the peer
        b.free(0x1000_0000, 8)
        b.free(mine["vaddr"], 1)
        st = kstats(s)
        assert st["user_mapped"] == base["user_mapped"] and conserved(st)
        view = mm_stats(s)["view"]
        assert view["used"] == 0 and view["free"] + view["kernel"] == view["ram"]
    report = s.audit()
    assert report["divergences"] == 0 and report["i13_problems"] == 0, report


def test_quotas_over_the_wire_a_full_budget_and_a_per_key_override(make_system):
    s = system(make_system, clients=3, mm_args=["--room", "2"])
    rundir.admit(s.run_dir, "client-1", quota=5)  # the operator grants client-1 only 5 pages
    s.start()
    with Client.from_run_dir(s.run_dir, "client-1") as b:
        b.start_keepalive()
        b.alloc(5)
        with pytest.raises(CallError) as ei:
            b.alloc(1)
        assert ei.value.name == "ENOMEM" and ei.value.details["limit"] == 5
        a = Client.from_run_dir(s.run_dir, "client-0", timeout=1.0)
        a.alloc(1)  # half the budget, as --room 2 says
        with Client.from_run_dir(s.run_dir, "client-2") as c:
            before = kstats(s)["processes"]
            with pytest.raises(CallError) as ei:  # no room for its quotas: ENOMEM, and nothing is made
                c.alloc(1)
            assert ei.value.name == "ENOMEM" and "cannot grant" in str(ei.value)
            assert kstats(s)["processes"] == before
            a.close()  # client-0 exits (no keepalive): when its lease runs out its quotas go back
            wait_for(lambda: mm_stats(s)["clients"] == 1, LEASE + 5, "the mm to see client-0 gone")
            c.start_keepalive()
            assert c.alloc(10)["pages"] == 10
    report = s.audit()
    assert report["divergences"] == 0 and report["i13_problems"] == 0, report


MANY_SRC = """
import json, sys
from protocol import rundir
from protocol.connection import Connection
run, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for i in range(n):
    pub, sec = rundir.load_keypair(run, f"client-{i}")
    conns.append(Connection(rundir.read_endpoint(run, "mm"), rundir.public_key(run, "mm"), pub, sec, timeout=10))
ok = bad = 0
for r in range(rounds):
    ids = [c.submit("alloc", {"pages": 1 + i % 3, "prot": 3}) for i, c in enumerate(conns)]  # all in flight
    held = []
    for c, rid in zip(conns, ids):
        got_id, res = c.collect()
        ok += got_id == rid and isinstance(res, dict)
        held.append(res)
    ids = [c.submit("free", {"vaddr": h["vaddr"], "pages": h["pages"]}) for c, h in zip(conns, held)]
    for c, rid in zip(conns, ids):
        got_id, res = c.collect()
        ok += got_id == rid and isinstance(res, dict)
print(json.dumps({"ok": ok}))
"""


def test_requests_of_many_clients_in_flight_at_once(make_system):
    s = system(make_system, clients=12)
    s.start()
    r = subprocess.run([sys.executable, "-c", MANY_SRC, s.run_dir, "12", "20"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] == 12 * 20 * 2
    assert mm_stats(s)["counters"]["refused"] == 0
    report = s.audit()
    assert report["divergences"] == 0 and report["i13_problems"] == 0, report


def test_sparse_allocs_make_the_mm_donate_page_table_memory(make_system):
    # a kernel pool of 2 frames and no proactive donation: the process's kernel quota (reserved whole, for
    # all its page tables) must come from the mm answering the kernel's ENOMEM, invisibly to the client
    s = system(make_system, kernel_pool=2, mm_args=["--low", "0", "--target", "0", "--high", "100000"])
    s.start()
    start = kstats(s)
    assert start["kernel_free"] == 2
    n = 40
    with Client.from_run_dir(s.run_dir, "client-0") as c:
        c.start_keepalive()
        for i in range(n):  # 4 MiB apart: each needs its own page table on i686
            got = c.alloc(1, vaddr=(i + 1) * 0x40_0000)
            assert got["vaddr"] == (i + 1) * 0x40_0000
        st = kstats(s)
        proc = st["per_process"][0]
        assert proc["pages"] == n and proc["tables"] == n + 1  # the page directory and one table per alloc
        assert conserved(st)
        ms = mm_stats(s)
        assert ms["counters"]["enomem_retries"] >= 1 and ms["counters"]["donations"] >= 1  # the kernel quota
        assert ms["counters"]["donated_frames"] >= n
        assert ms["counters"]["refused"] == 0
    report = s.audit()
    assert report["divergences"] == 0, report


# ---- kill -9 of the mm ------------------------------------------------------------------------------

LOOP_SRC = """
import json, os, sys, time
from clients.client import Client
from protocol.errors import CallError
run, name, out, stop = sys.argv[1:5]
c = Client.from_run_dir(run, name, timeout=0.4, retries=1)
c.start_keepalive(0.2)
held, i = [], 0
with open(out, "a", buffering=1) as f:
    while not os.path.exists(stop):
        i += 1
        t = time.monotonic()
        try:
            if len(held) >= 6:
                v, n = held.pop(0)
                c.free(v, n)
                rec = {"call": "free", "ok": True}
            else:
                n = 1 + i % 5
                got = c.alloc(n)
                held.append((got["vaddr"], n))
                rec = {"call": "alloc", "ok": True}
        except CallError as e:
            rec = {"ok": False, "code": e.name}
        rec["t"] = time.monotonic() - t
        f.write(json.dumps(rec) + "\\n")
c.close()
"""


def test_kill_9_of_the_mm_mid_request_then_recovery_from_the_journal(make_system, spawn):
    s = system(make_system, lease=1.5, mm_args=["--compact-every", "25"])  # restarts from snapshots too
    s.start()
    out = os.path.join(s.run_dir, "loop.jsonl")
    stop = os.path.join(s.run_dir, "loop.stop")
    loop = spawn([sys.executable, "-c", LOOP_SRC, s.run_dir, "client-0", out, stop])

    def oks() -> int:
        return sum(1 for ln in lines(out) if json.loads(ln)["ok"])

    wait_for(lambda: oks() >= 30, 20, "the looping client to get going")
    with Client.from_run_dir(s.run_dir, "client-1", timeout=0.3, retries=1) as probe:
        for cycle in range(3):
            if cycle < 2:  # the first two kills come with a request waiting on the kernel: its intent journaled,
                s.send_signal("kernel", signal.SIGSTOP)  # its map sent, no answer yet
                try:
                    wait_for(lambda: mm_stats(s)["pending"] >= 1, 10, "a request waiting on the stopped kernel")
                    s.kill("mm", signal.SIGKILL)
                finally:
                    s.send_signal("kernel", signal.SIGCONT)  # (it carries the map out for a dead mm)
            else:
                s.kill("mm", signal.SIGKILL)  # wherever the loop's request is
            t0 = time.monotonic()
            with pytest.raises(CallError) as ei:  # while the mm is down: a quick EIO, not a hang
                probe.alloc(1)
            assert ei.value.name == "EIO" and time.monotonic() - t0 < 3
            seen = oks()
            s.start_mm()
            log = log_of(s, "mm")
            assert log.count("rebuilt the view from") == cycle + 1, log
            assert " 0 left after repair" in log.split("rebuilt the view")[-1], log
            wait_for(lambda seen=seen: oks() >= seen + 10, 20, "the looping client to be served again")
        settled = [int(n) for n in re.findall(r"settled (\d+) pending intent", log)]
        assert len(settled) == 3 and settled[0] >= 1 and settled[1] >= 1, log
        replayed = [int(n) for n in re.findall(r"rebuilt the view from (\d+) journal records", log)]
        assert max(replayed) <= 2 * 25, log  # a snapshot and the ops since: never the whole history
        report = s.audit()
        assert report["divergences"] == 0 and report["pending"] == 0, report
        assert report["recovery"]["remaining"]["divergences"] == 0

    open(stop, "w").close()
    assert loop.wait(20) == 0
    recs = [json.loads(ln) for ln in lines(out)]
    failed = [r for r in recs if not r["ok"]]
    assert all(r["code"] == "EIO" for r in failed), failed[:5]
    assert max(r["t"] for r in recs) < 0.4 * 2 + 2.0  # every call ended within its attempts: nothing hung
    st = kstats(s)
    assert conserved(st)
    report = s.audit()  # the loop's process is still alive (lease): views agree on its mappings too
    assert report["divergences"] == 0, report
    report = s.wait_quiet(timeout=10)
    assert report["divergences"] == 0, report
    st = kstats(s)
    assert st["processes"] == 0 and st["user_mapped"] == 0 and conserved(st)
    wait_for(lambda: mm_stats(s)["view"]["used"] == 0, 5, "the mm to forget the loop client")


# ---- client death -------------------------------------------------------------------------------------

HOLDER_SRC = """
import sys, time
from clients.client import Client
c = Client.from_run_dir(sys.argv[1], sys.argv[2])
c.start_keepalive()
c.alloc(int(sys.argv[3]))
c.alloc(int(sys.argv[3]))
open(sys.argv[4], "w").close()
time.sleep(120)
"""


def test_kill_9_of_a_client_returns_its_frames_to_the_mm(make_system, spawn):
    s = system(make_system)
    s.start()
    base = mm_stats(s)
    ready = os.path.join(s.run_dir, "holder.ready")
    holder = spawn([sys.executable, "-c", HOLDER_SRC, s.run_dir, "client-0", "20", ready])
    wait_for(lambda: os.path.exists(ready), 20, "the client to allocate")
    during = mm_stats(s)
    assert during["view"]["used"] == 40 and during["view"]["free"] <= base["view"]["free"] - 40
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    killed = time.monotonic()
    after = wait_for(lambda: (x := mm_stats(s))["view"]["used"] == 0 and x, LEASE + 0.2 + 5,
                     "the frames to return to the mm's free view")
    assert time.monotonic() - killed < LEASE + 0.2 + 5
    assert after["counters"]["deaths"] == 1 and after["clients"] == 0
    assert after["view"]["free"] + after["view"]["kernel"] == base["view"]["free"] + base["view"]["kernel"]
    report = s.audit()
    assert report["divergences"] == 0, report


SPARSE_HOLDER_SRC = """
import sys, time
from clients.client import Client
c = Client.from_run_dir(sys.argv[1], sys.argv[2])
c.start_keepalive()
for i in range(int(sys.argv[3])):  # 4 MiB apart: a page table each, from the kernel's pool
    c.alloc(1, vaddr=(i + 1) * 0x40_0000)
open(sys.argv[4], "w").close()
time.sleep(120)
"""

FLOOD_SRC = """
import os, sys
from protocol import rundir
from protocol.connection import Connection
run, name, out, stop = sys.argv[1:5]
pub, sec = rundir.load_keypair(run, name)
conn = Connection(rundir.read_endpoint(run, "mm"), rundir.public_key(run, "mm"), pub, sec)
for _ in range(800):  # so many in flight that the mm's queue never runs dry
    conn.submit("stats")
n = 0
while n % 256 or not os.path.exists(stop):
    rid, result = conn.collect(timeout=5.0)
    if rid is None or not isinstance(result, dict):
        sys.exit(f"flood: {result}")
    n += 1
    conn.submit("stats")
    if n % 256 == 0:
        with open(out + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(out + ".tmp", out)
conn.close()
"""


def test_a_flood_of_requests_does_not_starve_event_polls_or_watermarks(make_system, spawn):
    # the mm's tick (read the kernel's events, keep the pool between the watermarks) must come on time
    # while a client keeps the mm's request queue full: a dead client's frames come back, and the page
    # tables its death returns to the kernel's pool are reclaimed down to the target
    low, target, high, tables = 4, 8, 24, 30
    s = system(make_system, clients=3, mm_args=["--low", str(low), "--target", str(target), "--high", str(high)])
    s.start()
    ready = os.path.join(s.run_dir, "holder.ready")
    holder = spawn([sys.executable, "-c", SPARSE_HOLDER_SRC, s.run_dir, "client-0", str(tables), ready])
    wait_for(lambda: os.path.exists(ready), 30, "the client to allocate")
    before = mm_stats(s)
    assert before["view"]["used"] == tables and low <= unreserved(kstats(s)) <= high

    out, stop = os.path.join(s.run_dir, "flood.count"), os.path.join(s.run_dir, "flood.stop")

    def answered() -> int:
        try:
            with open(out) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return 0

    flooder = spawn([sys.executable, "-c", FLOOD_SRC, s.run_dir, "client-2", out, stop], stderr=subprocess.PIPE)
    wait_for(lambda: answered() >= 2000, 30, "the flood to get going")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    killed, at_kill = time.monotonic(), answered()
    bound = LEASE + 0.2 + 10  # lease expiry, the mm's next tick, and room for a slow machine
    after = wait_for(lambda: (x := mm_stats(s))["view"]["used"] == 0 and x, bound,
                     "the dead client's frames to return to the mm's view under the flood")
    assert after["counters"]["deaths"] == 1
    wait_for(lambda: unreserved(kstats(s)) <= high, bound,
             "the mm to reclaim the pool the death grew, under the flood")
    assert mm_stats(s)["counters"]["reclaims"] > before["counters"]["reclaims"]
    assert time.monotonic() - killed < bound
    assert flooder.poll() is None and answered() - at_kill >= 1000  # it flooded all along
    open(stop, "w").close()
    _, err = flooder.communicate(timeout=20)
    assert flooder.returncode == 0, err
    report = s.audit()
    assert report["divergences"] == 0, report


# ---- the audit command ----------------------------------------------------------------------------------

def test_the_audit_command_and_one_mm_per_run_directory(make_system):
    s = system(make_system)
    s.start()
    # a second mm on the same run directory (same journal) is refused before it touches anything
    r = mmsim("mm", "--run-dir", s.run_dir, "--bind", f"ipc://{s.run_dir}/mm2.sock")
    assert r.returncode != 0 and f"another mm (pid {s.parts['mm'].pid})" in r.stderr, r.stderr
    with Client.from_run_dir(s.run_dir, "client-0") as c:
        c.start_keepalive()
        c.alloc(5)
        r = mmsim("audit", "--run-dir", s.run_dir)
        assert r.returncode == 0, r.stderr
        assert "divergences: 0" in r.stdout and "user mapped" in r.stdout
        r = mmsim("audit", "--run-dir", s.run_dir, "--json")
        assert r.returncode == 0
        report = json.loads(r.stdout)
        assert report["divergences"] == 0 and report["mm_view"]["used"] == 5 and report["kernel_view"]["user_mapped"] == 5

    # no mm has ever run in this run directory: a clear message and exit 2
    bare = system(make_system)
    bare.start_kernel()
    r = mmsim("audit", "--run-dir", bare.run_dir)
    assert r.returncode == 2 and "audit failed" in r.stderr and "mm.lock" in r.stderr
    assert "is the mm running" in r.stderr
    # an mm that died by kill -9 (its endpoint file is left behind, its lock is not): exit 2 at once, from the lock
    s.kill("mm", signal.SIGKILL)
    t0 = time.monotonic()
    r = mmsim("audit", "--run-dir", s.run_dir, "--timeout", "30")
    assert r.returncode == 2 and "mm.lock" in r.stderr and "is the mm running?" in r.stderr
    assert time.monotonic() - t0 < 20


# ---- a lying mm ---------------------------------------------------------------------------------------------

def test_a_lying_holder_of_the_mm_key_is_refused_and_changes_nothing(make_system):
    s = system(make_system)
    s.start()
    with Client.from_run_dir(s.run_dir, "client-0") as c:
        c.start_keepalive()
        got = c.alloc(4)
        in_use = to_array(got["frames"])
        pid = c.hello()["pid"]
        mm_pub, mm_sec = rundir.load_keypair(s.run_dir, "mm")
        endpoint = rundir.read_endpoint(s.run_dir, "kernel")
        with Connection(endpoint, rundir.public_key(s.run_dir, "kernel"), mm_pub, mm_sec, timeout=2) as liar:
            amap = liar.call("address_map")
            region = {e["kind"]: e for e in amap["entries"]}
            pool = region["kernel_pool"]
            table = region["frame_table"]
            image = region["kernel_image"]
            seg = liar.call("frame_info", {"frames": [[pool["first"], pool["count"]]]})["segments"]
            kfree = next(first for first, _, kind, _ in seg if kind == "kernel_free")
            user = [e for e in amap["entries"] if e["kind"] == "user"][-1]
            free_user = user["first"] + user["count"] - 8  # the top of RAM: never handed out this early
            seg = liar.call("frame_info", {"frames": [[free_user, 8]]})["segments"]
            assert seg == [[free_user, 8, "user", 0]]
            before = kstats(s)
            lies = [
                ("donate", {"frames": [[int(in_use[0]), 1], [free_user, 2]]}, "EBUSY"),
                ("donate", {"frames": [[kfree, 1]]}, "EEXIST"),
                ("donate", {"frames": [[free_user, 2], [free_user + 1, 2]]}, "EINVAL"),  # a frame twice
                ("reclaim", {"frames": [[table["first"], 2]]}, "EBUSY"),
                ("reclaim", {"frames": [[image["first"], 1]]}, "EBUSY"),
                ("reclaim", {"frames": [[int(in_use[0]), 1]]}, "EINVAL"),
                ("reclaim", {"frames": [[free_user, 4]]}, "EINVAL"),
                ("map", {"pid": pid, "vaddr": 0x3000_0000, "frames": [[kfree, 1]], "prot": PROT_READ | PROT_WRITE},
                 "EPERM"),
                ("map", {"pid": pid, "vaddr": 0x3000_0000, "frames": [[image["first"], 1]],
                         "prot": PROT_READ | PROT_WRITE}, "EPERM"),
                ("map", {"pid": 9999, "vaddr": 0x3000_0000, "frames": [[free_user, 1]], "prot": PROT_READ}, "ESRCH"),
                ("map", {"pid": pid, "vaddr": 0x3000_0000, "frames": [[free_user, 1]], "prot": 6}, "ENOTSUP"),
                ("proc_destroy", {"pid": 9999}, "ESRCH"),
                ("proc_create", {"key": mm_pub.decode()}, "EINVAL"),
            ]
            for call, args, code in lies:
                with pytest.raises(CallError) as ei:
                    liar.call(call, args)
                assert ei.value.name == code, (call, args, ei.value)
            with pytest.raises(CallError) as ei:
                liar.call("donate", {"frames": [[int(in_use[0]), 1], [free_user, 2]]})
            named = to_array(ei.value.details["frames"]).tolist()
            assert named == [int(in_use[0])]  # EBUSY names exactly the frame in use
            after = kstats(s)
            assert state(after) == state(before)
            seg = liar.call("frame_info", {"frames": got["frames"]})["segments"]
            assert all(kind == "user" and refs == 1 for _, _, kind, refs in seg)
        report = s.audit()
        assert report["divergences"] == 0, report
        c.free(got["vaddr"], 4)  # the real mm still works with the frames the liar tried to take


# ---- large pages -------------------------------------------------------------------------------------------

def test_a_large_page_through_the_mm_on_i686_pae(make_system):
    s = system(make_system, arch="i686-pae")
    s.start()
    with Client.from_run_dir(s.run_dir, "client-0") as c:
        c.start_keepalive()
        assert c.hello()["large_page_sizes"] == [2 << 20]
        small = c.alloc(1)
        got = c.alloc(512, large=True)
        frames = to_array(got["frames"])
        assert got["frames"] == [[int(frames[0]), 512]] and frames[0] % 512 == 0
        assert got["vaddr"] % (2 << 20) == 0
        st = kstats(s)
        proc = st["per_process"][0]
        assert proc["large_pages"] == 1 and proc["pages"] == 1
        # the page directory for each 1 GiB, and one leaf table: the small page's, none for the large page
        small_pd = small["vaddr"] >> 30
        large_pd = got["vaddr"] >> 30
        assert proc["tables"] == len({small_pd, large_pd}) + 1
        assert st["user_mapped"] == 513 and conserved(st)
        with s.connection("kernel", identity="mm") as k:
            with pytest.raises(CallError) as ei:  # donation stays per frame: any frame of it is busy
                k.call("donate", {"frames": [[int(frames[100]), 1]]})
            assert ei.value.name == "EBUSY"
        c.free(got["vaddr"], 512)
        st = kstats(s)
        proc = st["per_process"][0]
        assert proc["large_pages"] == 0 and proc["pages"] == 1 and st["user_mapped"] == 1
        c.free(small["vaddr"], 1)
    report = s.audit()
    assert report["divergences"] == 0 and report["mm_view"]["used"] == 0, report


# ---- journal compaction under kill -9 ------------------------------------------------------------------

COMPACTOR_SRC = """
import os, sys
from mm_service import records as J
from mm_service.journal import Journal
j = Journal(sys.argv[1])
blob = os.urandom(1 << 20)  # a snapshot of about 1 MiB: a compaction takes a while
i = 0
while True:
    i += 1
    j.append([J.Snapshot({"i": i, "blob": blob})])  # the snapshot replaces every record before it
    for k in range(20):
        j.append([J.EventsRead(i * 100 + k)])
    print(i, flush=True)
"""


def test_kill_9_during_journal_compaction_leaves_a_whole_journal(spawn, tmp_path):
    """A process that compacts its journal over and over is killed at arbitrary moments (mostly in the
    middle of writing a snapshot): the journal left behind always holds one whole snapshot and exactly
    the records written after it, never a mix of old and new, never nothing."""
    import random

    from mm_service import records as J
    from mm_service.journal import Journal

    path = str(tmp_path / "mm.db")
    rng = random.Random(5)
    kills = 0
    for trial in range(6):
        child = spawn([sys.executable, "-c", COMPACTOR_SRC, path], stdout=subprocess.PIPE)
        want = rng.randint(1, 3)
        assert child.stdout is not None
        for _ in range(want):  # progress lines: the child is at the start of its next compaction
            assert child.stdout.readline().strip(), "the compacting child died"
        busy = time.monotonic() + rng.uniform(0, 0.004)  # kill somewhere in the next few milliseconds
        while time.monotonic() < busy:
            pass
        child.kill()
        child.wait(10)
        kills += 1
        j = Journal(path)
        ops = list(j.replay())
        rows = j.db.execute("SELECT COUNT(*) FROM ops").fetchone()[0]
        j.close()
        assert ops and isinstance(ops[0], J.Snapshot) and len(ops[0].body["blob"]) == 1 << 20, ops[:3]
        i = ops[0].body["i"]
        assert ops[1:] == [J.EventsRead(i * 100 + k) for k in range(len(ops) - 1)]
        assert rows == len(ops) <= 21  # the records before the snapshot are gone
    assert kills == 6
