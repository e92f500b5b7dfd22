"""The frame picture (classes, cells, large mappings, rendering), the kernel's stats fields it
reads, the run directory ``up`` prepares, admission while the servers run (``mmsim keys``),
``mmsim status`` against a running system, and ``mmsim up --no-live`` end to end (its report,
Ctrl-C)."""

from __future__ import annotations

import html
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from kernel_server import core as kcore
from kernel_server.service import KernelService
from mmsim import picture as P
from mmsim.launcher import fresh_run_dir
from protocol import PROT_READ, PROT_WRITE, rundir
from protocol.connection import Connection
from protocol.errors import CallError
from support import mmsim, wait_for

MM = "M" * 40
A = "A" * 40
B = "B" * 40
RW = PROT_READ | PROT_WRITE


# ---- classes and cells (pure) --------------------------------------------------------------

def test_frame_classes_from_segments_and_large_runs():
    segments = [
        [0, 2, "none", 0],
        [2, 2, "kernel_free", 0],
        [4, 1, "kernel_used", 0],
        [5, 1, "kernel_shared", 3],  # mapped read-only by users: still kernel-shared
        [6, 2, "user", 0],
        [8, 2, "user", 1],
        [10, 2, "user", 2],
        [12, 4, "user", 1],
        [16, 4, "user", 0],
    ]
    c = P.frame_classes(22, segments, large_runs=[[12, 4], [16, 4]])
    assert c.tolist() == [
        P.RESERVED, P.RESERVED, P.KERNEL_FREE, P.KERNEL_FREE, P.KERNEL_USED, P.KERNEL_SHARED,
        P.USER_FREE, P.USER_FREE, P.USER_MAPPED, P.USER_MAPPED, P.USER_SHARED, P.USER_SHARED,
        P.USER_LARGE, P.USER_LARGE, P.USER_LARGE, P.USER_LARGE,
        # a large run over frames no longer mapped does not paint them as mapped
        P.USER_FREE, P.USER_FREE, P.USER_FREE, P.USER_FREE,
        P.RESERVED, P.RESERVED,  # named by no segment
    ]
    counts = P.class_counts(c)
    assert counts == {"reserved": 4, "kernel_free": 2, "kernel_used": 1, "kernel_shared": 1, "user_free": 6,
                      "user_mapped": 2, "user_shared": 2, "user_large": 4}
    assert sum(counts.values()) == 22


def test_grid_cells_take_the_majority_and_say_how_pure_they_are():
    classes = np.array([P.USER_FREE] * 8 + [P.KERNEL_USED] * 3 + [P.USER_MAPPED] * 5
                       + [P.RESERVED, P.KERNEL_FREE, P.USER_FREE, P.USER_MAPPED] + [P.USER_LARGE] * 2, dtype=np.uint8)
    g = P.grid(classes, cells=3)  # 22 frames -> 8 frames per cell, the last holds 6
    assert g.per == 8
    assert g.codes.tolist() == [P.USER_FREE, P.USER_MAPPED, P.USER_LARGE]
    assert [g.glyph(i) for i in range(3)] == [P.PURE, P.MAJOR, P.MIXED]
    assert g.share.tolist() == [1.0, 5 / 8, 2 / 6]  # padding of the last cell is not counted
    one = P.grid(classes, cells=1000)  # fits: one frame per cell
    assert one.per == 1 and one.codes.tolist() == classes.tolist()
    assert P.grid(np.zeros(0, dtype=np.uint8), 10).codes.size == 0


def test_grid_of_a_large_machine_has_the_requested_cell_count():
    classes = np.full(1 << 22, P.USER_FREE, dtype=np.uint8)  # 16 GiB of frames
    classes[: 1 << 12] = P.KERNEL_USED
    g = P.grid(classes, cells=64 * 16)
    assert g.codes.size == 1024 and g.per == 4096
    assert g.codes[0] == P.KERNEL_USED and (g.codes[1:] == P.USER_FREE).all()


def _snap(at: float, calls: int, mm_requests: int | None, classes: np.ndarray) -> P.Snapshot:
    kstats = {"frames": classes.size, "calls": calls, "refused": 0, "processes": 1, "kernel_free": 2,
              "per_process": [{"pid": 1, "key": A, "pages": 3, "large_pages": 0, "tables": 2, "threads": 1,
                               "endpoints": 4}]}
    mstats = None if mm_requests is None else {
        "counters": {"requests": mm_requests, "refused": 1, "donations": 2, "donated_frames": 64, "reclaims": 0,
                     "reclaimed_frames": 0, "deaths": 0},
        "clients": 1, "watermarks": {"low": 1, "target": 2, "high": 3},
        "watermark_events": ["kernel pool 1 < low 2: donated 64"]}
    return P.Snapshot(at, kstats, classes, mstats, "" if mstats else "no reply", {A: "client-0"},
                      {"client-0": "steady"})


def test_rates_and_rendering():
    classes = P.frame_classes(64, [[0, 8, "kernel_used", 0], [8, 56, "user", 1]], [])
    a, b = _snap(10.0, 100, 50, classes), _snap(12.0, 300, 90, classes)
    r = P.rates(b, a)
    assert r["kernel_calls"] == 100.0 and r["mm_requests"] == 20.0
    assert P.rates(a, b)["kernel_calls"] is None  # time went backwards: no rate
    restarted = _snap(13.0, 5, 2, classes)
    assert P.rates(restarted, b)["kernel_calls"] is None and P.rates(restarted, b)["mm_requests"] is None
    out = io.StringIO()
    Console(file=out, width=120).print(P.render(b, a, columns=16, rows=4))
    text = out.getvalue()
    for c in P.CLASSES:
        assert c.label in text
    assert "100/s" in text and "client-0 (steady)" in text and "donated 64" in text
    line = P.summary_line(b, a, 2.0)
    assert "mapped 56" in line and "kernel 100/s" in line
    away = _snap(14.0, 400, None, classes)
    out = io.StringIO()
    Console(file=out, width=120).print(P.render(away, b))
    assert "not answering" in out.getvalue()
    assert "mm away" in P.summary_line(away, b)


# ---- the kernel's stats fields the picture reads -------------------------------------------------

def _kernel_with_process(arch: str = "i686", memory: int = 64 << 20) -> tuple[KernelService, int]:
    svc = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=256)
    pid = svc.call(MM, "proc_create", {"key": A, "kernel_quota": 16})["pid"]
    return svc, pid


def _user_block(svc: KernelService, step: int, skip: int = 0) -> int:
    """The first frame of the (skip+1)-th aligned block of ``step`` free user frames."""
    from kernel_server.frames import USER

    kind, refs = svc.core.frames.kind, svc.core.frames.refs
    found = 0
    for first in range(0, svc.core.frames.n - step + 1, step):
        if (kind[first:first + step] == USER).all() and (refs[first:first + step] == 0).all():
            if found == skip:
                return first
            found += 1
    raise AssertionError("no free aligned block")


def listing(svc: KernelService) -> dict:
    """The stats the picture reads: the mm's (and the operator's) view, with the per-process listing."""
    return svc.call(MM, "stats", {"from_pid": 0})


def test_stats_lists_large_mappings_as_merged_bounded_runs(monkeypatch):
    svc, pid = _kernel_with_process()
    step = svc.core.profile.pages_at(0)  # 1024 frames: a 4 MiB page on i686
    assert listing(svc)["large_mappings"] == []
    f0 = _user_block(svc, step)
    svc.call(MM, "map", {"pid": pid, "vaddr": 0x4000_0000, "frames": [[f0, 2 * step]], "prot": RW, "large": True})
    f2 = _user_block(svc, step, skip=1)  # not adjacent to f0's pair
    assert f2 > f0 + 2 * step
    svc.call(MM, "map", {"pid": pid, "vaddr": 0x8000_0000, "frames": [[f2, step]], "prot": RW, "large": True})
    pid_b = svc.call(MM, "proc_create", {"key": B, "kernel_quota": 16})["pid"]  # the same large page in a second process
    svc.call(MM, "map", {"pid": pid_b, "vaddr": 0x4000_0000, "frames": [[f0, step]], "prot": PROT_READ,
                         "large": True})
    st = listing(svc)
    assert st["large_mappings"] == [[f0, 2 * step], [f2, step]]
    assert svc.call(MM, "map", {"pid": pid, "vaddr": 0x1000, "frames": [[_user_block(svc, 1), 1]], "prot": RW})
    assert listing(svc)["large_mappings"] == [[f0, 2 * step], [f2, step]]  # small pages are not listed
    monkeypatch.setattr(kcore, "LARGE_RUNS_SHOWN", 1)
    assert listing(svc)["large_mappings"] == [[f0, 2 * step]]
    svc.call(MM, "proc_destroy", {"pid": pid})
    svc.call(MM, "proc_destroy", {"pid": pid_b})
    assert listing(svc)["large_mappings"] == []


def test_stats_counts_calls_and_refusals():
    svc, _ = _kernel_with_process()
    before = svc.handle(A, b"\x00garbage", now=0.0)  # refused: undecodable
    assert before
    st1 = svc.call(A, "stats")
    svc.call(A, "ping")
    st2 = svc.call(A, "stats")
    assert st2["calls"] == st1["calls"] + 2  # the ping and this stats
    assert st2["refused"] == st1["refused"] == 1
    assert "replayed" in st2


# ---- the run directory up prepares -----------------------------------------------------------------

def test_up_reuses_a_stopped_run_and_refuses_a_running_one_or_foreign_files(run_dir, spawn):
    new = os.path.join(run_dir, "a", "b")
    assert fresh_run_dir(new) == (new, []) and os.path.isdir(new)  # made, parents too
    assert fresh_run_dir(new) == (new, [])  # empty: used as it is
    rundir.init(new, clients=1)
    rundir.write_report(new, {"ok": True})
    os.makedirs(rundir.logs_dir(new))
    d, replaced = fresh_run_dir(new)  # a previous, stopped run: replaced
    assert d == new and replaced == ["keys", "logs", "report.json"] and os.listdir(new) == []
    rundir.init(new, clients=1)
    code = (f"import time; from protocol import rundir; fd = rundir.lock({new!r}, 'mm'); print('locked', "
            "flush=True); time.sleep(60)")
    p = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    with pytest.raises(typer.BadParameter, match=f"a system is running in .*the mm \\(pid {p.pid}\\)"):
        fresh_run_dir(new)
    assert rundir.is_run_dir(new)  # nothing was removed
    p.kill()
    p.wait(10)
    with open(os.path.join(new, "mine.txt"), "w") as f:
        f.write("a user's file")
    with pytest.raises(typer.BadParameter, match="not an empty directory nor a previous run .*mine.txt"):
        fresh_run_dir(new)
    assert os.path.exists(os.path.join(new, "mine.txt")) and rundir.is_run_dir(new)


# ---- admission while the servers run ---------------------------------------------------------------------

def _hello(run_dir: str, server: str, pair: tuple[bytes, bytes], timeout: float = 1.0) -> dict | None:
    """A NEW connection's hello (None if refused: a refused CURVE handshake gets no answer at all)."""
    with Connection(rundir.read_endpoint(run_dir, server), rundir.public_key(run_dir, server), *pair,
                    timeout=timeout, retries=0) as conn:
        try:
            return conn.call("hello")
        except CallError as exc:
            assert exc.name == "EIO", exc
            return None


@pytest.mark.parametrize("server", ["kernel", "mm"])
def test_keys_admitted_or_revoked_while_the_servers_run_count_from_the_next_connection(make_system, server):
    from mmsim.cli import app

    s = make_system(clients=0)
    s.start_kernel()
    if server == "mm":
        s.start_mm()
    pids = {name: p.pid for name, p in s.parts.items()}
    assert _hello(s.run_dir, server, rundir.fresh_keypair()) is None  # a stranger: refused at the handshake
    rundir.generate(s.run_dir, "late")
    late = rundir.load_keypair(s.run_dir, "late")
    assert _hello(s.run_dir, server, late, timeout=0.5) is None  # a key pair alone is not an admission
    r = CliRunner().invoke(app, ["keys", "admit", s.run_dir, "late", "--quota", "64"])
    assert r.exit_code == 0, r.stderr
    got = wait_for(lambda: _hello(s.run_dir, server, late), 10, f"the {server} to serve the admitted key")
    assert got["identity"] == late[0].decode()
    assert {name: p.pid for name, p in s.parts.items()} == pids and all(p.alive() for p in s.parts.values())
    r = CliRunner().invoke(app, ["keys", "revoke", s.run_dir, "late"])
    assert r.exit_code == 0, r.stderr
    wait_for(lambda: _hello(s.run_dir, server, late, timeout=0.5) is None, 10,
             f"the {server} to refuse the revoked key's new connections")
    assert _hello(s.run_dir, server, rundir.load_keypair(s.run_dir, "operator"))  # the operator: always


def test_stop_leaves_no_endpoint_or_socket_behind(make_system):
    s = make_system(clients=0)
    s.start_kernel()
    ipc = rundir.ipc_dir(s.run_dir, create=False)
    assert os.path.isdir(ipc) and rundir.running(s.run_dir) == ["kernel"]
    s.kill("kernel", signal.SIGKILL)  # a server that could not clean up after itself
    assert os.path.exists(rundir.endpoint_path(s.run_dir, "kernel"))
    s.stop()
    assert rundir.running(s.run_dir) == []
    assert not os.path.exists(rundir.endpoint_path(s.run_dir, "kernel"))
    assert not os.path.exists(ipc)


@pytest.mark.parametrize("servers", [("kernel",), ("mm", "kernel")], ids=["kernel", "mm then kernel"])
def test_a_server_stopped_by_sigterm_takes_back_its_endpoint_and_socket(make_system, servers):
    s = make_system(clients=0)
    s.start_kernel()
    if "mm" in servers:
        s.start_mm()
    sockets = {name: rundir.read_endpoint(s.run_dir, name)[len("ipc://"):] for name in servers}
    assert all(os.path.exists(p) for p in sockets.values())
    for name in servers:
        assert s.kill(name, signal.SIGTERM) == 0  # System.kill does not clean up: the server must
        assert not os.path.exists(rundir.endpoint_path(s.run_dir, name)), f"the {name} left its endpoint file"
        assert not os.path.exists(sockets[name]), f"the {name} left its ipc socket"
        if name == "mm":  # the kernel's socket is still there: the directory stays
            assert os.path.isdir(rundir.ipc_dir(s.run_dir, create=False))
    assert not os.path.exists(rundir.ipc_dir(s.run_dir, create=False))  # the last one out removed the directory


# ---- processes ----------------------------------------------------------------------------------



def test_status_draws_a_running_system_and_saves_svg(run_dir):
    from clients.client import Client
    from mmsim.system import System

    system = System(run_dir, lease=5.0, clients=2)
    try:
        system.start()
        with Client.from_run_dir(run_dir, "client-0") as a, Client.from_run_dir(run_dir, "client-1") as b:
            a.start_keepalive()  # idle while `status` starts: the processes must outlive that
            b.start_keepalive()
            a.alloc(3)
            a.alloc(1024, large=True)
            shared = a.alloc(2)
            b.alloc(1)
            offer = a.mm.call("share", {"vaddr": shared["vaddr"], "pages": 2, "peer": b.identity, "prot": PROT_READ})
            b.mm.call("accept", {"offer": offer["offer"], "vaddr": 0x7000_0000})  # the peer maps it, by consent
            a.thread_create()
            with P.Observer(run_dir) as obs:
                counts = obs.snapshot().counts()
            assert counts["user_large"] == 1024
            assert counts["user_shared"] == 2
            assert counts["user_mapped"] == 3 + 1
            svg = os.path.join(run_dir, "pic.svg")
            r = mmsim("status", "--run-dir", run_dir, "--svg", svg, "--interval", "0.2")
            assert r.returncode == 0, r.stderr
            assert "user large page" in r.stdout and "client-0" in r.stdout
            with open(svg) as f:
                image = f.read()
            assert image.startswith("<svg")
            text = html.unescape(image).replace("\xa0", " ")  # rich writes spaces as &#160; in SVG text
            for c in P.CLASSES:
                assert c.label in text, c.label
            r = mmsim("status", "--run-dir", run_dir, "--json", "--interval", "0")
            assert r.returncode == 0, r.stderr
            data = json.loads(r.stdout)
            assert data["classes"]["user_large"] == 1024 and data["frames"] == sum(data["classes"].values())
            assert {p["name"] for p in data["processes"]} >= {"client-0", "client-1"}
            assert data["mm"] is not None and data["rates"]["kernel_calls"] is None  # one sample: no rates
    finally:
        system.stop()


def test_status_and_up_refuse_bad_input(run_dir):
    r = mmsim("status", "--run-dir", os.path.join(run_dir, "nothing"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = mmsim("status", "--run-dir", run_dir)
    assert r.returncode == 2 and "not a run directory" in r.stderr
    rundir.init(os.path.join(run_dir, "stopped"), clients=0)
    t0 = time.monotonic()
    r = mmsim("status", "--run-dir", os.path.join(run_dir, "stopped"))
    assert r.returncode == 2 and "no system is running" in r.stderr and time.monotonic() - t0 < 10
    r = mmsim("up", "--arch", "z80", "--run-dir", os.path.join(run_dir, "x"))
    assert r.returncode == 2 and "'z80' is not one of 'i686', 'i686-pae', 'x86_64'" in r.stderr
    r = mmsim("up", "--workloads", "steady,nope", "--run-dir", os.path.join(run_dir, "x"))
    assert r.returncode == 2 and "nope" in r.stderr
    with open(os.path.join(run_dir, "file"), "w") as f:
        f.write("x")
    r = mmsim("up", "--run-dir", run_dir)
    assert r.returncode == 2 and "not an empty directory" in r.stderr


def test_up_runs_the_system_and_the_audit_is_clean(run_dir):
    r = mmsim("up", "--duration", "5", "--no-live", "--run-dir", run_dir, timeout=80)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-2000:]
    assert "audit (I8)" in out and "0 divergent frame(s)" in out
    assert "FAILED" not in out and "audit clean, no leaks, nothing crashed" in out
    assert out.count("] kernel free") >= 3  # a line a second
    for name, wl in (("client-0", "steady"), ("client-1", "sparse"), ("client-2", "kobjects"),
                     ("client-3", "sharer")):
        assert name in out and wl in out
    report = rundir.read_report(run_dir)  # what it printed, as data
    assert report["command"] == "up" and report["ok"] is True and report["exit"] == 0
    assert report["interrupted"] is None and report["crashed"] == []
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert [(c["name"], c["workload"]) for c in report["clients"]] == [
        ("client-0", "steady"), ("client-1", "sparse"), ("client-2", "kobjects"), ("client-3", "sharer")]
    assert report["servers"] == {"kernel": {"exit": 0}, "mm": {"exit": 0}}
    assert report["audit"]["divergences"] == 0 and report["options"]["memory_bytes"] == 256 << 20
    assert rundir.running(run_dir) == [] and not os.path.exists(rundir.ipc_dir(run_dir, create=False))


def test_ctrl_c_interrupts_up_which_stops_everything_and_exits_130(run_dir, spawn):
    p = spawn([sys.executable, "-m", "mmsim.cli", "up", "--duration", "120", "--json", "--lease", "1",
               "--clients", "1", "--run-dir", run_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              env={**os.environ, "COLUMNS": "250"})
    while True:  # progress goes to stderr with --json
        line = p.stderr.readline().decode()
        assert line, "mmsim up ended before the system was up"
        if "kernel and mm up" in line:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()[-3000:]
    assert b"Traceback" not in err
    report = json.loads(out)
    assert report == rundir.read_report(run_dir)
    assert report["exit"] == 130 and report["ok"] is False and report["interrupted"]
    assert report["servers"] == {"kernel": {"exit": 0}, "mm": {"exit": 0}}  # stopped, not killed
    assert rundir.running(run_dir) == [] and not os.path.exists(rundir.ipc_dir(run_dir, create=False))
