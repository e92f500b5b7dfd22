"""Kernel benchmarks: map+unmap against the floor, page-table churn, ping and hello, batches of 4096
frames, scale with RAM size.

The kernel runs alone (``mmsim.system.System.start_kernel``): the benchmark
acts as the memory manager with the mm's key pair, creates one process for a
client key and maps/unmaps user frames into it, so nothing else hands those
frames out. Every figure is compared with the floor echo (``bench.floor``):
the same socket loop (``protocol.serving.Loop``), transport, keys and
message sizes (it answers each call with the result the kernel gave for it),
started in the same run. The floor and the kernel are timed in turn, round
after round, by the same client loop (``bench.roundtrip``); a figure is the
median of its per-round ratios (each round's kernel against the floor timed
next to it), with their range as its spread.

Requests are distinct: a cycle maps ``PAGES`` different frames at
``PAGES`` different addresses and unmaps each, so no two requests in a
cycle are the same bytes. Two variants:

- anchored: the pages share one page table, which a page mapped for the
  whole run keeps (no call allocates or frees a table);
- churn: each page lies in a page table of its own and nothing else is
  mapped there, so every map allocates a page table and its unmap frees it.

Figures (targets of the design's performance section):

- ``kernel.map_unmap`` / ``kernel.map_unmap_pipelined``: map and unmap calls
  per second, one at a time / ``window`` in flight, over the floor's echoes
  per second (target >= 0.80); ``kernel.churn`` / ``kernel.churn_pipelined``:
  the same with churn (>= 0.80).
- ``kernel.cpu_per_call``: the server's CPU time per echo over its CPU time
  per map/unmap call (all threads of each server process, from
  /proc/<pid>/task/*/schedstat), ``window`` in flight (>= 0.80): the
  noise-proof figure. ``kernel.cpu_per_call_one``: one at a time (info).
  ``kernel.churn_cost``: anchored CPU per call over churn CPU per call
  (>= 0.90: churn costs at most about 10% more).
- ``kernel.ping`` / ``kernel.hello``: server CPU per call against the floor's
  per echo of a reply of the same size, ``window`` in flight (>= 0.90); the
  rate ratio is in the note.
- ``kernel.batch.<call>``: the median time of ``donate``/``reclaim``
  (explicit frames) and ``map``/``unmap`` of one 4096-frame run over the
  floor's median round trip for the same request in the same round (target
  <= 1.5).
- ``kernel.worst_request``: the server CPU (in-process ``handle``) of the costliest request a client or a
  stranger can build, any call, refused or not, over that of an ordinary one-page map/unmap (target <= 10);
  ``kernel.worst_request_privileged``: the same for the mm and the operator (information: their largest
  requests are listings they ask for, bounded by the listing limits). See ``worst_catalog``.
- ``kernel.scale``: pipelined map+unmap rate of a 16 Mi-frame kernel (64 GiB
  of RAM on i686-pae: the boot map ends at the 64 GiB PAE addresses, exactly
  2^24 frames) over that of the smallest boot (4 MiB: 1 Ki frames), per-round
  median; target >= 0.90. ``kernel.frame_table_bytes``: frame-table bytes per
  frame (<= 16), with the process's resident-memory growth per frame as a
  cross-check; ``kernel.boot_16mi``: start of the kernel process until it
  answers (<= 10 s).

``profile_handle`` times ``KernelService.handle`` in-process, stage by stage,
and can run it under cProfile: where a call's time goes, without sockets.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from bench.floor import Floor, remove_ipc_dir
from bench.report import Figure, Report
from bench.roundtrip import BenchError, Rounds, Sample, Spread, Stream, alternate, cpu_ratio, dealer, per_round, \
    rate_ratio
from mmsim.system import System
from kernel_server.bootmap import parse_size
from protocol import rundir

Step = Callable[[str], None]
Cycle = list[tuple[str, dict[str, Any]]]
PAGE = 4096
VADDR = 0x1000_0000  # where the anchored cycle's pages come and go (aligned to every page-table span)
PAGES = 32  # distinct pages in a cycle
ANCHOR = VADDR + PAGES * PAGE  # stays mapped: the anchored cycle's page table is never allocated or freed
CHURN_VADDR = 0x4000_0000  # the churn cycle: page i at CHURN_VADDR + i * (a page table's span)
BATCH_VADDR = 0x2000_0000
PROCESS_QUOTA = 16  # kernel frames of the benchmark's process: its objects and a few page tables


@dataclass
class KernelBenchOptions:
    seconds: float = 0.5  # per measurement (one side, one round)
    rounds: int = 5  # each figure is the median of its per-round ratios
    window: int = 16  # calls in flight when pipelined
    transport: str = "ipc"
    arch: str = "i686"
    memory: str = "256MiB"
    batch: int = 4096  # frames in a batch run
    scale: bool = True
    scale_arch: str = "i686-pae"
    scale_small: str = "4MiB"
    scale_big: str = "64GiB"  # 2^24 frames on i686-pae: the boot map ends at 64 GiB, what PAE addresses

    def check(self) -> None:
        if self.seconds <= 0 or self.rounds < 1 or self.window < 1 or self.batch < 1:
            raise ValueError("seconds must be positive; rounds, window and batch at least 1")
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.transport!r}")
        for m in (self.memory, self.scale_small, self.scale_big):
            parse_size(m)

    def steps(self) -> int:
        """Progress steps ``run`` reports (for a progress bar)."""
        main = 2 + self.rounds * len(SIDES) + 1  # (+1: the worst requests, in-process)
        return main + (3 + self.rounds * 2 if self.scale else 0)

    def conditions(self, window: int, what: str = "") -> str:
        w = "one at a time" if window == 1 else f"{window} in flight"
        return (f"{self.transport}, CURVE, {self.arch} {self.memory}, {w}{', ' + what if what else ''}; "
                f"{self.rounds} rounds x {self.seconds:g} s")


class KernelAsMM:
    """A running kernel (alone) and a socket to it with the mm's identity; one client process in it."""

    def __init__(self, run_dir: str, arch: str, memory: str, transport: str, ctx: zmq.Context) -> None:
        self.system = System(run_dir, arch=arch, memory=memory, lease=3600.0, transport=transport, clients=1)
        rundir.admit(self.system.run_dir, "observer")  # the readiness check's identity (no process, no privilege)
        self.arch = arch
        t0 = time.perf_counter()
        try:
            self.part = self.system.start_kernel(timeout=120.0)
            self.boot_seconds = time.perf_counter() - t0
            self.stream = Stream(dealer(ctx, rundir.read_endpoint(self.system.run_dir, "kernel"),
                                        rundir.public_key(self.system.run_dir, "kernel"), self.system.run_dir, "mm"),
                                 [self.part.pid])
            self.hello = self.stream.call("hello")
            if not self.hello.get("is_mm"):
                raise BenchError("the kernel does not take the benchmark's key as the mm's")
            self.amap = self.stream.call("address_map")
            client_key = rundir.public_key(self.system.run_dir, "client-0").decode()
            self.pid = self.stream.call("proc_create", {"key": client_key, "kernel_quota": PROCESS_QUOTA})["pid"]
        except BaseException:
            self.system.stop()
            remove_ipc_dir(self.system.run_dir)
            raise

    def user_run(self, count: int, avoid: list[tuple[int, int]] = ()) -> int:
        """The first frame of ``count`` user frames in one region, kernel-eligible, clear of ``avoid``."""
        limit = self.amap.get("kernel_limit") or self.amap["frames"]
        for e in self.amap["entries"]:
            if e["kind"] != "user":
                continue
            first, end = e["first"], min(e["first"] + e["count"], limit)
            for lo, n in sorted(avoid):
                if lo < first + count and first < lo + n:
                    first = max(first, lo + n)
            if end - first >= count:
                return first
        raise BenchError(f"no run of {count} free user frames below frame {limit} in the boot map "
                         "(more --memory?)")

    def table_span(self) -> int:
        """Bytes of virtual space one page table (a leaf table) maps on this kernel's profile."""
        from kernel_server.arch import get_profile
        from kernel_server.pagetable import Geometry

        return Geometry(get_profile(self.arch)).leaf_entries * PAGE

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.part.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self.system.stop()
            remove_ipc_dir(self.system.run_dir)


def map_unmap_cycle(pid: int, frame: int, vaddr: int = VADDR, pages: int = 1, stride: int = PAGE) -> Cycle:
    """Map frame ``frame + i`` at ``vaddr + i * stride`` and unmap it, for each of ``pages`` pages."""
    out: Cycle = []
    for i in range(pages):
        v = vaddr + i * stride
        out.append(("map", {"pid": pid, "vaddr": v, "frames": [[frame + i, 1]], "prot": 3}))
        out.append(("unmap", {"pid": pid, "vaddr": v, "pages": 1}))
    return out


@dataclass
class Plan:
    """The request cycles of one kernel benchmark, set up on a running kernel, and the results the kernel
    gave for each call (what the floor answers)."""

    anchored: Cycle
    churn: Cycle
    donate: Cycle
    bmap: Cycle
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def make(cls, k: KernelAsMM, batch: int) -> "Plan":
        first = k.user_run(PAGES + 1)
        big = k.user_run(batch, avoid=[(first, PAGES + 1)])
        k.stream.call("map", {"pid": k.pid, "vaddr": ANCHOR, "frames": [[first + PAGES, 1]], "prot": 3})
        plan = cls(map_unmap_cycle(k.pid, first, VADDR, PAGES),
                   map_unmap_cycle(k.pid, first, CHURN_VADDR, PAGES, k.table_span()),
                   [("donate", {"frames": [[big, batch]]}), ("reclaim", {"frames": [[big, batch]]})],
                   [("map", {"pid": k.pid, "vaddr": BATCH_VADDR, "frames": [[big, batch]], "prot": 3}),
                    ("unmap", {"pid": k.pid, "vaddr": BATCH_VADDR, "pages": batch})])
        # one of each call the floor answers, with the kernel's results; and the cycles do what they say
        got = [k.stream.call(c, a) for c, a in plan.anchored[:2]]
        if got[0]["tables_allocated"] or got[1]["tables_freed"]:
            raise BenchError("the anchored cycle allocated or freed a page table")
        plan.replies.update(map=got[0], unmap=got[1])
        churn = [k.stream.call(c, a) for c, a in plan.churn[:2]]
        if not (churn[0]["tables_allocated"] and churn[1]["tables_freed"]):
            raise BenchError("the churn cycle did not allocate and free a page table")
        for c, a in plan.donate:
            plan.replies[c] = k.stream.call(c, a)
        for c in ("ping", "hello"):
            plan.replies[c] = k.stream.call(c)
        return plan


# The sides timed each round, in this order: (name, floor or kernel, cycle, calls in flight: "1" or "w",
# seconds factor).
SIDES: tuple[tuple[str, str, str, str, float], ...] = (
    ("floor", "floor", "anchored", "1", 1.0),
    ("kernel", "kernel", "anchored", "1", 1.0),
    ("kernel churn", "kernel", "churn", "1", 1.0),
    ("floor pipelined", "floor", "anchored", "w", 1.0),
    ("kernel pipelined", "kernel", "anchored", "w", 1.0),
    ("kernel churn pipelined", "kernel", "churn", "w", 1.0),
    ("floor ping", "floor", "ping", "w", 0.5),
    ("kernel ping", "kernel", "ping", "w", 0.5),
    ("floor hello", "floor", "hello", "w", 0.5),
    ("kernel hello", "kernel", "hello", "w", 0.5),
    ("floor donate+reclaim", "floor", "donate", "1", 0.5),
    ("kernel donate+reclaim", "kernel", "donate", "1", 0.5),
    ("floor batch map+unmap", "floor", "bmap", "1", 0.5),
    ("kernel batch map+unmap", "kernel", "bmap", "1", 0.5),
)


def run(opts: KernelBenchOptions, run_dir: str, step: Step = lambda s: None) -> Report:
    """All kernel figures; the kernel(s) and the floor are started under ``run_dir`` and stopped after."""
    opts.check()
    rep = Report()
    ctx = zmq.Context()
    ctx.linger = 0
    try:
        step("starting the kernel and the floor echo")
        k = KernelAsMM(os.path.join(run_dir, "kernel"), opts.arch, opts.memory, opts.transport, ctx)
        try:
            plan = Plan.make(k, opts.batch)
            with Floor(os.path.join(run_dir, "floor"), opts.transport, replies=plan.replies) as floor:
                floor_stream = Stream(dealer(ctx, floor.endpoint, floor.server_key, floor.run_dir, "mm"),
                                      [floor.proc.pid])
                try:
                    _main(opts, rep, k, plan, floor_stream, step)
                finally:
                    floor_stream.close()
        finally:
            k.close()
        step("timing the worst requests against map/unmap (in-process)")
        worst_figures(rep)
        if opts.scale:
            _scale(opts, rep, run_dir, ctx, step)
    finally:
        ctx.term()
    rep.meta.setdefault("transport", opts.transport)
    rep.meta.setdefault("rounds", opts.rounds)
    rep.meta.setdefault("seconds", opts.seconds)
    rep.meta.setdefault("notes", []).append(
        "Ratios: the median of the per-round ratios (the kernel against the floor timed next to it, every round), "
        "with their range below. Values: the medians of the kernel's rounds. CPU: all threads of the server "
        "process (schedstat).")
    return rep


def _main(opts: KernelBenchOptions, rep: Report, k: KernelAsMM, plan: Plan, floor: Stream, step: Step) -> None:
    n, w = opts.batch, opts.window
    cycles = {"anchored": plan.anchored, "churn": plan.churn, "donate": plan.donate, "bmap": plan.bmap,
              "ping": [("ping", {})], "hello": [("hello", {})]}
    streams = {"floor": floor, "kernel": k.stream}
    step("warming up")
    warm = min(0.2, opts.seconds)
    for s in (floor, k.stream):
        for c in ("anchored", "churn", "ping"):
            s.run(cycles[c], warm / 2, 1)
            s.run(cycles[c], warm / 2, w)
    k.stream.run(plan.donate, warm / 2, 1)
    k.stream.run(plan.bmap, warm / 2, 1)

    def side(who: str, cycle: str, flight: str, factor: float) -> Callable[[], Sample]:
        return lambda: streams[who].run(cycles[cycle], opts.seconds * factor, 1 if flight == "1" else w)

    res = alternate(opts.rounds, {name: side(*rest) for name, *rest in SIDES}, lambda s: step(f"timing {s}"))
    pages = f"{PAGES} distinct pages"
    anchored_c = opts.conditions(1, f"{pages}, page table kept")
    churn_c = opts.conditions(1, f"{pages}, a page table allocated and freed per map/unmap")

    def rate_fig(key: str, name: str, kr: Rounds, fr: Rounds, target: float, cond: str, note: str = "") -> None:
        r = rate_ratio(kr, fr)
        rep.add(Figure(key, name, kr.rate.median, "calls/s", fr.rate.median, "echoes/s", "floor", r.median, ">=",
                       target, f">= {target:.2f} x floor", note=note, spread=(r.lo, r.hi), conditions=cond))

    def cpu_fig(key: str, name: str, kr: Rounds, fr: Rounds, target: float | None, cond: str,
                note: str = "") -> None:
        r = cpu_ratio(kr, fr)
        if not r.n:
            return
        rep.add(Figure(key, name, kr.cpu.median * 1e6, "us", fr.cpu.median * 1e6, "us", "floor CPU per echo",
                       r.median, ">=" if target else None, target,
                       f">= {target:.2f} (floor CPU / kernel CPU)" if target else "info",
                       note=note, spread=(r.lo, r.hi), conditions=cond))

    f1, fw = res["floor"], res["floor pipelined"]
    rate_fig("kernel.map_unmap", "kernel map/unmap calls, one at a time", res["kernel"], f1, 0.80, anchored_c)
    rate_fig("kernel.map_unmap_pipelined", f"kernel map/unmap calls, {w} in flight", res["kernel pipelined"], fw,
             0.80, opts.conditions(w, f"{pages}, page table kept"))
    cpu_fig("kernel.cpu_per_call", f"kernel CPU per map/unmap call, {w} in flight", res["kernel pipelined"], fw,
            0.80, opts.conditions(w, f"{pages}, page table kept"), "server process CPU time: noise-proof")
    cpu_fig("kernel.cpu_per_call_one", "kernel CPU per map/unmap call, one at a time", res["kernel"], f1, None,
            anchored_c, "includes the wake-up for every request")
    rate_fig("kernel.churn", "kernel map/unmap with page-table churn, one at a time", res["kernel churn"], f1, 0.80,
             churn_c)
    rate_fig("kernel.churn_pipelined", f"kernel map/unmap with page-table churn, {w} in flight",
             res["kernel churn pipelined"], fw, 0.80,
             opts.conditions(w, f"{pages}, a page table allocated and freed per map/unmap"))
    churn = per_round(res["kernel churn pipelined"], res["kernel pipelined"],
                      lambda c, a: a.cpu_per_call / c.cpu_per_call if a.cpu_per_call and c.cpu_per_call else None)
    if churn.n:
        kc = res["kernel churn pipelined"].cpu.median
        rep.add(Figure("kernel.churn_cost", f"kernel CPU per map/unmap call with churn, {w} in flight", kc * 1e6,
                       "us", res["kernel pipelined"].cpu.median * 1e6, "us", "page table kept", churn.median, ">=",
                       0.90, ">= 0.90 (kept CPU / churn CPU)", spread=(churn.lo, churn.hi),
                       conditions=opts.conditions(w, pages)))
    for call in ("ping", "hello"):
        rr = rate_ratio(res[f"kernel {call}"], res[f"floor {call}"])
        cpu_fig(f"kernel.{call}", f"kernel CPU per {call}, {w} in flight", res[f"kernel {call}"],
                res[f"floor {call}"], 0.90, opts.conditions(w, f"floor replies of {call}'s size").replace(
                    f"{opts.seconds:g} s", f"{opts.seconds / 2:g} s"),
                f"rate ratio {rr.median:.2f} ({rr.lo:.2f}..{rr.hi:.2f})")
    batches = {"donate": "donate+reclaim", "reclaim": "donate+reclaim", "map": "batch map+unmap",
               "unmap": "batch map+unmap"}
    for call, side_name in batches.items():
        kr, fr = res[f"kernel {side_name}"], res[f"floor {side_name}"]
        r = per_round(kr, fr, lambda a, b, call=call: a.latency(call) / b.latency(call))
        rep.add(Figure(f"kernel.batch.{call}", f"{call} of a {n}-frame run", kr.latency(call).median * 1e6, "us",
                       fr.latency(call).median * 1e6, "us", "floor round trip, same request", r.median, "<=", 1.5,
                       "<= 1.5 x floor round trip", spread=(r.lo, r.hi),
                       conditions=opts.conditions(1, "median latency").replace(
                           f"{opts.seconds:g} s", f"{opts.seconds / 2:g} s")))
    rep.details["kernel"] = {
        "arch": opts.arch, "memory": opts.memory, "window": w, "batch_frames": n, "pages": PAGES,
        "kernel_round_trip_us": {c: _us(res["kernel"].latency(c)) for c in ("map", "unmap")},
        "floor_round_trip_us": _us(f1.latency()),
        "boot_seconds": round(k.boot_seconds, 3),
        "floor_replies": plan.replies,
        "rounds": {name: r.to_json() for name, r in res.items()},
    }


def _us(s: Spread) -> dict[str, Any]:
    return {"median": round(s.median * 1e6, 2), "min": round(s.lo * 1e6, 2), "max": round(s.hi * 1e6, 2)}


def _scale(opts: KernelBenchOptions, rep: Report, run_dir: str, ctx: zmq.Context, step: Step) -> None:
    from kernel_server.service import KernelService

    step(f"booting a {opts.scale_small} kernel ({opts.scale_arch})")
    small = KernelAsMM(os.path.join(run_dir, "small"), opts.scale_arch, opts.scale_small, opts.transport, ctx)
    try:
        step(f"booting a {opts.scale_big} kernel ({opts.scale_arch})")
        big = KernelAsMM(os.path.join(run_dir, "big"), opts.scale_arch, opts.scale_big, opts.transport, ctx)
        try:
            cycles = {}
            for name, k in (("small", small), ("big", big)):
                f = k.user_run(PAGES + 1)
                k.stream.call("map", {"pid": k.pid, "vaddr": ANCHOR, "frames": [[f + PAGES, 1]], "prot": 3})
                cycles[name] = map_unmap_cycle(k.pid, f, VADDR, PAGES)
                k.stream.run(cycles[name], min(0.2, opts.seconds), opts.window)
            w = opts.window
            n_small, n_big = small.hello["frames"], big.hello["frames"]
            res = alternate(opts.rounds, {
                f"{n_small} frames": lambda: small.stream.run(cycles["small"], opts.seconds, w),
                f"{n_big} frames": lambda: big.stream.run(cycles["big"], opts.seconds, w),
            }, lambda s: step(f"timing map+unmap at {s}"))
            rs, rb = res[f"{n_small} frames"], res[f"{n_big} frames"]
            rss_small, rss_big = small.rss_bytes(), big.rss_bytes()
            boot_big = big.boot_seconds
        finally:
            big.close()
    finally:
        small.close()
    r = rate_ratio(rb, rs)
    cr = cpu_ratio(rb, rs)
    rep.add(Figure("kernel.scale", f"map/unmap at {_frames(n_big)} frames ({opts.scale_big}), {w} in flight",
                   rb.rate.median, "calls/s", rs.rate.median, "calls/s", f"at {_frames(n_small)} frames",
                   r.median, ">=", 0.90, ">= 0.90 x small", spread=(r.lo, r.hi),
                   conditions=(f"{opts.transport}, CURVE, {opts.scale_arch}, {w} in flight, {PAGES} distinct pages; "
                               f"{opts.rounds} rounds x {opts.seconds:g} s"),
                   note=(f"server CPU per call {rb.cpu.median * 1e6:.1f} us vs {rs.cpu.median * 1e6:.1f} us "
                         f"(ratio {cr.median:.2f}, {cr.lo:.2f}..{cr.hi:.2f})" if cr.n else "")))
    step(f"frame table of {_frames(n_big)} frames (in-process boot)")
    t0 = time.perf_counter()
    svc = KernelService.boot(arch=opts.scale_arch, memory=parse_size(opts.scale_big), mm_key="M" * 40)
    boot_in_process = time.perf_counter() - t0
    ft = svc.core.frames
    per_frame = ft.nbytes() / ft.n
    del svc, ft
    rss_per_frame = (rss_big - rss_small) / (n_big - n_small) if rss_big and rss_small else None
    rep.add(Figure("kernel.frame_table_bytes", "kernel frame table per frame", per_frame, "B", ratio=per_frame,
                   op="<=", threshold=16.0, target="<= 16 B",
                   note=(f"process RSS grew {rss_per_frame:.1f} B/frame" if rss_per_frame is not None else "")))
    rep.add(Figure("kernel.boot_16mi", f"kernel boot, {_frames(n_big)} frames", boot_big, "s", ratio=boot_big,
                   op="<=", threshold=10.0, target="<= 10 s",
                   note=f"process start to first reply; the frame table alone: {boot_in_process:.2f} s"))
    rep.details["scale"] = {
        "arch": opts.scale_arch, "small": {"memory": opts.scale_small, "frames": n_small, "rss_bytes": rss_small},
        "big": {"memory": opts.scale_big, "frames": n_big, "rss_bytes": rss_big, "boot_seconds": round(boot_big, 3)},
        "frame_table_bytes_per_frame": per_frame, "rss_bytes_per_frame": rss_per_frame,
        "boot_in_process_seconds": round(boot_in_process, 3), "window": w,
        "rounds": {name: r.to_json() for name, r in res.items()},
    }


def _frames(n: int) -> str:
    for unit, size in (("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return str(n)


# ---- in-process: where a call's time goes --------------------------------------------------

def profile_handle(calls: int = 4000, arch: str = "i686", memory: str = "256MiB",
                   cprofile: bool = False, top: int = 20, passes: int = 3,
                   cycle_name: str = "anchored") -> dict[str, Any]:
    """Time ``KernelService.handle`` on one of the benchmark's cycles (``cycle_name``: "anchored" or "churn"
    map/unmap of ``PAGES`` distinct pages, "ping", "hello"), stage by stage, in-process (each the best of
    ``passes`` passes over ``calls`` calls; "rest" is what the stages leave of the whole), beside the
    floor's handler (decode and encode) over the same requests."""
    from bench.floor import REPLIES, echo
    from kernel_server.calls import ADAPTERS
    from kernel_server.service import KernelService
    from protocol import wire
    from protocol.calls import validate
    from protocol.replay import ReplayCache

    mm = "M" * 40
    svc = KernelService.boot(arch=arch, memory=parse_size(memory), mm_key=mm)
    pid = svc.call(mm, "proc_create", {"key": "C" * 40, "kernel_quota": PROCESS_QUOTA})["pid"]
    amap = svc.call(mm, "address_map")
    first = next(e["first"] for e in amap["entries"] if e["kind"] == "user")
    svc.call(mm, "map", {"pid": pid, "vaddr": ANCHOR, "frames": [[first + PAGES, 1]], "prot": 3})
    from kernel_server.arch import get_profile
    from kernel_server.pagetable import Geometry

    cycle: Cycle = {"anchored": lambda: map_unmap_cycle(pid, first, VADDR, PAGES),
                    "churn": lambda: map_unmap_cycle(pid, first, CHURN_VADDR, PAGES,
                                                     Geometry(get_profile(arch)).leaf_entries * PAGE),
                    "ping": lambda: [("ping", {})], "hello": lambda: [("hello", {})]}[cycle_name]()
    calls -= calls % len(cycle)  # whole cycles: each pass leaves the pages unmapped
    calls = max(calls, len(cycle))
    next_id = 1
    clock = time.perf_counter

    def fresh() -> list[bytes]:  # new ids: the replay cache must not answer them
        nonlocal next_id
        out = [wire.request(next_id + i, *cycle[i % len(cycle)]) for i in range(calls)]
        next_id += calls
        return out

    def loop(reqs: list[bytes]) -> float:
        t0 = clock()
        for data in reqs:
            svc.handle(mm, data, 0.0)
        return clock() - t0

    def best(fn: Callable[[], float]) -> float:  # the least disturbed of a few passes
        return min(fn() for _ in range(passes))

    loop(fresh())  # warm
    total = best(lambda: loop(fresh()))
    # the stages, each timed over the same requests, the way the service runs them
    reqs = fresh()
    parsed = [wire.parse_request(d) for d in reqs]
    fast = svc._fast

    def args_of(call: str, args: dict[str, Any]) -> Any:
        f = fast.get(call)
        m = f(args) if f is not None else None
        return m if m is not None else validate(ADAPTERS, call, args)

    models = [args_of(call, args) for _, call, args in parsed]
    results: list[Any] = []
    replay = ReplayCache()
    floor_handle = echo(REPLIES)

    def timed(fn: Callable[[], object]) -> float:
        t0 = clock()
        fn()
        return clock() - t0

    def core_pass() -> float:
        results.clear()
        t0 = clock()
        for (_, call, _), m in zip(parsed, models):
            results.append(svc.core.call(mm, call, m))
        return clock() - t0

    def replay_pass() -> float:
        replay.replies.clear()
        t0 = clock()
        for d, p in zip(reqs, parsed):
            digest = replay.key(d)
            replay.lookup(mm, p[0], digest)
            replay.remember(mm, p[0], digest, d)
        return clock() - t0

    stages: dict[str, float] = {
        "envelope (decode and check)": best(lambda: timed(lambda: [wire.parse_request(d) for d in reqs])),
        "replay cache (digest, lookup, remember)": best(replay_pass),
        "arguments (fast checks, else pydantic)": best(lambda: timed(lambda: [args_of(c, a) for _, c, a in parsed])),
        "core (check and commit)": best(core_pass),
    }
    replies = svc._replies
    stages["reply encoding"] = best(lambda: timed(lambda: [replies.ok(p[0], r) for p, r in zip(parsed, results)]))
    floor = best(lambda: timed(lambda: [floor_handle(mm, d) for d in reqs]))
    out: dict[str, Any] = {
        "calls": calls,
        "handle_us_per_call": round(total / calls * 1e6, 2),
        "floor_handler_us_per_call": round(floor / calls * 1e6, 2),  # the floor's decode and encode
        "stages_us_per_call": {k: round(v / calls * 1e6, 2) for k, v in stages.items()},
    }
    out["stages_us_per_call"]["rest (dispatch, leases, counters)"] = round(
        max(0.0, total - sum(stages.values())) / calls * 1e6, 2)
    if cprofile:
        reqs = fresh()
        prof = cProfile.Profile()
        prof.enable()
        loop(reqs)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        out["cprofile"] = buf.getvalue()
    return out



# ---- in-process: the worst requests against an ordinary one ---------------------------------------------
#
# ``worst_catalog`` builds a kernel in a hostile state (a client whose memory alternates with free frames,
# so the frame table is as fragmented as it gets; its kernel quota full) and the costliest requests we know
# how to build for every call and every kind of caller, refused or not: a stranger (admitted, no process),
# a client on its own process, the mm and the operator. ``worst_request`` times each through
# ``KernelService.handle`` (decode, validation, the call, the reply: the server's CPU per request) against
# the ordinary one-page map/unmap.

WORST_MM = "M" * 40
WORST_OP = "O" * 40
WORST_CLIENT = "C" * 40
WORST_STRANGER = "S" * 40
CLIENT_QUOTA = 16


@dataclass
class WorstRequest:
    name: str
    who: str  # "client" (a client or a stranger) or "privileged" (the mm or the operator)
    identity: str
    make: Callable[[int], bytes]  # request id -> request bytes
    expect: str | None  # the errno name it must be refused with; None: it must succeed
    undo: Callable[[int], bytes] | None = None  # a request restoring the state (timed with it, as a pair)


Ordinary = Callable[[int], tuple[bytes, bytes]]


def worst_catalog(memory: str = "256MiB", arch: str = "i686") -> tuple[Any, list[WorstRequest], Ordinary]:
    """(service, the worst requests, the ordinary map/unmap pair by request id)."""
    from kernel_server.core import MAX_CLIENT_PAGES, MAX_CLIENT_RUNS
    from kernel_server.service import KernelService
    from protocol import wire
    from protocol.calls import MAX_FRAME

    svc = KernelService.boot(arch=arch, memory=parse_size(memory), mm_key=WORST_MM, operator_key=WORST_OP,
                             lease_seconds=3600.0)
    core = svc.core
    ft = core.frames
    n = ft.n

    def ok(who: str, call: str, args: dict[str, Any]) -> dict[str, Any]:
        out = svc.call(who, call, args)
        if not isinstance(out, dict):
            raise BenchError(f"setting up the worst requests: {call} {args}: {out}")
        return out

    amap = ok(WORST_MM, "address_map", {})
    region = {e["kind"]: e for e in amap["entries"]}
    user = next(e for e in amap["entries"] if e["kind"] == "user" and e["count"] > 40_000)
    image, firmware = region["kernel_image"]["first"], region["firmware"]["first"]
    pid = ok(WORST_MM, "proc_create", {"key": WORST_CLIENT, "kernel_quota": CLIENT_QUOTA})["pid"]
    # the client's memory: 8192 pages of every other frame (the frame table's most fragmented picture)
    u0 = user["first"]
    for i in range(8):
        ok(WORST_MM, "map", {"pid": pid, "vaddr": 0x1000_0000 + i * (1024 << 12), "prot": 3,
                             "frames": [[u0 + 2 * (i * 1024 + j), 1] for j in range(1024)]})
    own = 0x3000_0000  # the client's own maps of a boot-image frame, each in a page table of its own
    last = 0x3040_0000 + ((MAX_CLIENT_PAGES - 1) << 12)  # a page of its second table
    ok(WORST_CLIENT, "map", {"vaddr": own, "frames": [[image, 1]], "prot": 1})
    ok(WORST_CLIENT, "map", {"vaddr": last, "frames": [[image, 1]], "prot": 1})
    proc = core.procs[pid]
    for _ in range(proc.kernel_limit - proc.kernel_used):  # its quota, full
        ok(WORST_CLIENT, "thread_create", {})
    big_runs = [[MAX_FRAME - (1 << 20), 1 << 10]] * wire.MAX_RUNS  # the largest numbers, the most runs
    per_run = MAX_CLIENT_PAGES // MAX_CLIENT_RUNS
    spread = [[image + (i % 8) * per_run, per_run] for i in range(MAX_CLIENT_RUNS)]  # a client's largest map
    forty = [[firmware - 40 * 1024 + 1 + 40 * i, 40] for i in range(1024)]  # the last run reaches the firmware
    top = core.profile.user_top
    R_ = wire.request

    def req(call: str, args: dict[str, Any]) -> Callable[[int], bytes]:
        return lambda i: R_(i, call, args)

    C, S, M, O = WORST_CLIENT, WORST_STRANGER, WORST_MM, WORST_OP
    cat = [
        # anyone: bytes before any call
        WorstRequest("32 KiB of one-byte integers (past a client's message size)", "client", S,
                     lambda i: wire.encode({"v": 1, "id": i, "call": "ping", "args": {"x": [[0] * 1024] * 30}}),
                     "E2BIG"),
        WorstRequest("4 KiB of one-byte integers (4 arrays of 1000)", "client", S,
                     lambda i: wire.encode({"v": 1, "id": i, "call": "ping", "args": {"x": [[0] * 1000] * 4}}),
                     "EINVAL"),
        WorstRequest("14 fields of 256-byte strings", "client", S,
                     lambda i: wire.encode({"v": 1, "id": i, "call": "ping",
                                            "args": {f"k{j}": "x" * 256 for j in range(14)}}), "EINVAL"),
        WorstRequest("31 fields of 256-byte strings by the operator", "privileged", O,
                     lambda i: wire.encode({"v": 1, "id": i, "call": "ping",
                                            "args": {f"k{j}": "x" * 256 for j in range(31)}}), "EINVAL"),
        WorstRequest("32 KiB of one-byte integers by the operator", "privileged", O,
                     lambda i: wire.encode({"v": 1, "id": i, "call": "ping", "args": {"x": [[0] * 1024] * 30}}),
                     "EINVAL"),
        WorstRequest("4 KiB of undecodable bytes", "client", S, lambda i: b"\xc1" * wire.MAX_CLIENT_REQUEST_BYTES,
                     "EPROTO"),
        WorstRequest("32 KiB of undecodable bytes by the operator", "privileged", O,
                     lambda i: b"\xc1" * wire.MAX_REQUEST_BYTES, "EPROTO"),
        WorstRequest("a message past the size limit", "client", S,
                     lambda i: b"\x00" * (wire.MAX_REQUEST_BYTES + 1), "E2BIG"),
        # a stranger or a client: privileged calls
        WorstRequest("donate of 1024 runs by a stranger", "client", S, req("donate", {"frames": big_runs}), "E2BIG"),
        WorstRequest("donate of 200 runs by a stranger", "client", S, req("donate", {"frames": big_runs[:200]}),
                     "EPERM"),
        WorstRequest("frame_info of everything by a client", "client", C,
                     req("frame_info", {"frames": [[0, n]], "max_segments": 1 << 14}), "EPERM"),
        WorstRequest("the process listing by a client", "client", C, req("stats", {"from_pid": 0, "limit": 1000}),
                     "EPERM"),
        WorstRequest("proc_create by a client", "client", C, req("proc_create", {"key": S, "kernel_quota": 1 << 30}),
                     "EPERM"),
        # a client on its own process
        WorstRequest("map of 1024 runs by a client (past a client's message size)", "client", C,
                     req("map", {"vaddr": own, "frames": [[image, 1]] * wire.MAX_RUNS, "prot": 1}), "E2BIG"),
        WorstRequest("map of 200 runs by a client (under its message size)", "client", C,
                     req("map", {"vaddr": own, "frames": [[image, 1]] * 200, "prot": 1}), "E2BIG"),
        WorstRequest(f"map of {MAX_CLIENT_PAGES} boot-image pages in {MAX_CLIENT_RUNS} runs, busy at the last page",
                     "client", C, req("map", {"vaddr": last - ((MAX_CLIENT_PAGES - 1) << 12), "frames": spread,
                                             "prot": 1}), "EBUSY"),
        WorstRequest(f"unmap of {MAX_CLIENT_PAGES} pages of the mm's mappings by a client", "client", C,
                     req("unmap", {"vaddr": 0x1000_0000, "pages": MAX_CLIENT_PAGES}), "EPERM"),
        WorstRequest(f"map of {MAX_CLIENT_PAGES - 1} boot-image pages in {MAX_CLIENT_RUNS} runs, and its unmap",
                     "client", C, req("map", {"vaddr": last - ((MAX_CLIENT_PAGES - 1) << 12),
                                             "frames": spread[:-1] + [[image, per_run - 1]], "prot": 1}),
                     None, undo=req("unmap", {"vaddr": last - ((MAX_CLIENT_PAGES - 1) << 12),
                                              "pages": MAX_CLIENT_PAGES - 1})),
        WorstRequest("thread_create past its quota", "client", C, req("thread_create", {}), "ENOMEM"),
        WorstRequest("stats", "client", C, req("stats", {}), None),
        WorstRequest("address_map", "client", S, req("address_map", {}), None),
        WorstRequest("hello", "client", S, req("hello", {}), None),
        # the mm and the operator
        WorstRequest("frame_info of the whole table (16384 segments)", "privileged", O,
                     req("frame_info", {"frames": [[0, n]], "max_segments": 1 << 14}), None),
        WorstRequest("mappings of the client's whole space (8193 segments)", "privileged", O,
                     req("mappings", {"pid": pid, "vaddr": 0, "pages": top >> 12, "max_segments": 1 << 14}), None),
        WorstRequest("stats with the process listing", "privileged", M, req("stats", {"limit": 1000}), None),
        WorstRequest("events", "privileged", M, req("events", {"limit": 1000}), None),
        WorstRequest("donate of 1024 runs, the last beyond memory", "privileged", M,
                     req("donate", {"frames": [[2 * i, 1] for i in range(1023)] + [[n, 1]]}), "EINVAL"),
        WorstRequest("donate of 40960 frames in 1024 runs, the last kernel-owned", "privileged", M,
                     req("donate", {"frames": forty}), "EEXIST"),
        WorstRequest("reclaim of 1024 frames in 1024 runs, the last user-owned", "privileged", M,
                     req("reclaim", {"frames": [[image + i, 1] for i in range(1024)]}), "EINVAL"),
        WorstRequest(f"map of {n - u0 - 16384} pages past the process's quota", "privileged", M,
                     req("map", {"pid": pid, "vaddr": 0x4000_0000, "frames": [[u0 + 16384, n - u0 - 16384]],
                                 "prot": 3}), "ENOMEM"),
        WorstRequest("unmap of all user space, nothing mapped at its start", "privileged", M,
                     req("unmap", {"pid": pid, "vaddr": 0, "pages": top >> 12}), "EINVAL"),
        WorstRequest("map of 1024 runs by the mm, beyond user space", "privileged", M,
                     req("map", {"pid": pid, "vaddr": top - (1 << 12), "frames": big_runs[:2], "prot": 3}), "EINVAL"),
    ]
    anchor = u0 + 20_000  # a free user frame; its page goes in the client's first own table, which stays

    def ordinary(i: int) -> tuple[bytes, bytes]:
        return (R_(i, "map", {"pid": pid, "vaddr": own + 0x1000, "frames": [[anchor, 1]], "prot": 3}),
                R_(i + 1, "unmap", {"pid": pid, "vaddr": own + 0x1000, "pages": 1}))

    return svc, cat, ordinary


def worst_request(memory: str = "256MiB", arch: str = "i686", reps: int = 20, passes: int = 5) -> dict[str, Any]:
    """Server CPU per request (in-process ``handle``) of each worst request, of the ordinary one-page
    map/unmap, and the ratios (the best of ``passes`` passes of ``reps`` requests each)."""
    svc, cat, ordinary = worst_catalog(memory, arch)
    clock = time.process_time
    next_id = [1]

    def ids(k: int) -> range:
        first = next_id[0]
        next_id[0] += k
        return range(first, first + k)

    def timed(pairs: list[tuple[str, bytes]]) -> float:
        t0 = clock()
        for who, data in pairs:
            svc.handle(who, data, 0.0)
        return clock() - t0

    def best(make: Callable[[], list[tuple[str, bytes]]], per: int) -> float:
        return min(timed(make()) for _ in range(passes)) / per

    base_reps = reps * 50
    base = best(lambda: [(WORST_MM, d) for i in ids(base_reps) for d in ordinary(2 * i)], 2 * base_reps)
    out: dict[str, Any] = {"ordinary_us": base * 1e6, "requests": []}
    for w in cat:
        if w.undo is not None:
            t = best(lambda w=w: [(w.identity, d) for i in ids(reps) for d in (w.make(2 * i), w.undo(2 * i + 1))],
                     2 * reps)
        else:
            t = best(lambda w=w: [(w.identity, w.make(i)) for i in ids(reps)], reps)
        out["requests"].append({"name": w.name, "who": w.who, "us": t * 1e6, "ratio": t / base})
    for who in ("client", "privileged"):
        mine = [r for r in out["requests"] if r["who"] == who]
        worst = max(mine, key=lambda r: r["us"])
        out[who] = {"worst": worst["name"], "us": worst["us"], "ratio": worst["ratio"]}
    return out


def worst_figures(rep: Report, memory: str = "256MiB") -> None:
    """The ``kernel.worst_request`` figures: a client's or a stranger's worst request against the ordinary
    map/unmap (target <= 10), and the mm's or the operator's (information: the pages they read are work they
    asked for, bounded by the listing limits)."""
    w = worst_request(memory)
    base = w["ordinary_us"]
    c, p = w["client"], w["privileged"]
    rep.add(Figure("kernel.worst_request", "worst request of a client or a stranger (server CPU, in-process)",
                   c["us"], "us", base, "us", "one-page map/unmap", c["ratio"], "<=", 10.0, "<= 10 x map/unmap",
                   note=c["worst"]))
    rep.add(Figure("kernel.worst_request_privileged", "worst request of the mm or the operator (server CPU)",
                   p["us"], "us", base, "us", "one-page map/unmap", p["ratio"],
                   target="info: pages of listings they asked for", note=p["worst"]))
    rep.details["worst_request"] = w
