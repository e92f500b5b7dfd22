"""The frame picture (classes, cells, large mappings, rendering), the kernel's stats fields it
reads, ``mmsim status`` against a running system, and ``mmsim up --no-live`` end to end."""

from __future__ import annotations

import html
import io
import os

import numpy as np
from rich.console import Console

from mmsim import picture as P
from kernel_server import core as kcore
from kernel_server.service import KernelService
from protocol import PROT_READ, PROT_WRITE
from support import mmsim

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
    svc = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=64)
    pid = svc.call(MM, "proc_create", {"key": A})["pid"]
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


def test_stats_lists_large_mappings_as_merged_bounded_runs(monkeypatch):
    svc, pid = _kernel_with_process()
    step = svc.core.profile.pages_at(0)  # 1024 frames: a 4 MiB page on i686
    assert svc.call(A, "stats")["large_mappings"] == []
    f0 = _user_block(svc, step)
    svc.call(MM, "map", {"pid": pid, "vaddr": 0x4000_0000, "frames": [[f0, 2 * step]], "prot": RW, "large": True})
    f2 = _user_block(svc, step, skip=1)  # not adjacent to f0's pair
    assert f2 > f0 + 2 * step
    svc.call(MM, "map", {"pid": pid, "vaddr": 0x8000_0000, "frames": [[f2, step]], "prot": RW, "large": True})
    pid_b = svc.call(MM, "proc_create", {"key": B})["pid"]  # the same large page in a second process
    svc.call(MM, "map", {"pid": pid_b, "vaddr": 0x4000_0000, "frames": [[f0, step]], "prot": PROT_READ,
                         "large": True})
    st = svc.call(A, "stats")  # anyone may ask
    assert st["large_mappings"] == [[f0, 2 * step], [f2, step]]
    assert svc.call(MM, "map", {"pid": pid, "vaddr": 0x1000, "frames": [[_user_block(svc, 1), 1]], "prot": RW})
    assert svc.call(A, "stats")["large_mappings"] == [[f0, 2 * step], [f2, step]]  # small pages are not listed
    monkeypatch.setattr(kcore, "LARGE_RUNS_SHOWN", 1)
    assert svc.call(A, "stats")["large_mappings"] == [[f0, 2 * step]]
    svc.call(MM, "proc_destroy", {"pid": pid})
    svc.call(MM, "proc_destroy", {"pid": pid_b})
    assert svc.call(A, "stats")["large_mappings"] == []


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
            a.share(shared["vaddr"], 2, b.identity, 0x7000_0000)
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
    finally:
        system.stop()


def test_status_and_up_refuse_bad_input(run_dir):
    r = mmsim("status", "--run-dir", os.path.join(run_dir, "nothing"))
    assert r.returncode == 2 and "not a run directory" in r.stderr
    r = mmsim("up", "--arch", "z80", "--run-dir", os.path.join(run_dir, "x"))
    assert r.returncode == 2 and "unknown architecture" in r.stderr
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
