"""Memory-manager benchmarks: alloc+free end to end (16 clients in flight and one at a time), where the mm's
CPU goes, and a donation storm.

A whole system runs (``mmsim.system.System``: kernel and mm processes) next
to the floor echo (``bench.floor``) on the same transport, answering the
benchmark's ``alloc`` and ``free`` with the results the mm gave for them
(replies of the mm's sizes). The floor and the mm are timed in turn, round
after round, by the same client loops (``bench.roundtrip``; ``run_many``
for many clients); a figure's ratio is the median of its per-round ratios
(each round's mm against the floor timed next to it), with their range as
its spread; values are the medians of each side's rounds. Calls are
counted one by one (an ``alloc`` and a ``free`` are two): each takes two
hops (client to mm, mm to kernel) and two journal commits, where an echo
takes one hop.

- ``mm.alloc_free_clients``: one-page ``alloc``/``free`` calls per second
  from ``clients`` (16) clients at once, each with its own key, connection
  and one request in flight (so 16 in flight at the mm, which overlaps them:
  several requests in flight to the kernel, one journal transaction for all
  requests handled in one wake-up, replies sent after it commits), over the
  floor's pipelined rate (16 echoes in flight on one connection; target >=
  0.40). The note gives the floor with 16 clients of one connection each too
  (16 connections cost the servers' I/O threads more than one).
- ``mm.alloc_free``: the same calls from one client, one at a time, over
  the floor's one-at-a-time rate (target >= 0.40).
- ``mm.cpu_per_call`` / ``mm.cpu_per_call_one``: the mm process's CPU per
  call (every thread, ``/proc/<pid>/task/*/schedstat``: the noise-proof
  figure), 16 clients in flight / one at a time, against the floor's CPU
  per echo (information); the kernel's CPU per call is in the note.
- Where the mm's CPU goes (``details.mm.stages``; printed by ``mmsim bench
  mm``): after the timed rounds, one pass of each load with the mm counting
  its main thread's CPU by stage (``mm_service.stages``, started and read
  with SIGUSR1), and every thread of the mm apart (main, ZeroMQ I/O, the
  rest); ``profile_driver`` times the driver and the journal in-process,
  without sockets (``--profile``).
- ``mm.storm``: one client allocates ``storm`` bytes in 4 KiB pages, one
  request at a time, from a fresh process: every new page table the kernel
  needs comes out of its pool, which the mm keeps supplied by donations (and
  ENOMEM retries when the pool runs dry). Reported: the time, the donations
  made, and the cost per page as a ratio to the floor's round trip
  (informational: the design sets no target).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgpack
import zmq

from bench.floor import Floor, remove_ipc_dir
from bench.report import Figure, Report
from bench.roundtrip import BenchError, Requests, Sample, Stream, alternate, cpu_ratio, cpu_seconds, dealer, \
    rate_ratio
from mmsim.system import System
from kernel_server.bootmap import MiB, parse_size
from protocol import rundir

Step = Callable[[str], None]
PAGE = 4096
VADDR = 0x1000_0000
CYCLE = [("alloc", {"pages": 1, "prot": 3, "vaddr": VADDR}), ("free", {"vaddr": VADDR, "pages": 1})]
STAGES_FILE = "mm.stages.json"  # (mm_service.stages.FILE)


@dataclass
class MMBenchOptions:
    seconds: float = 0.5  # per measurement (one side, one round)
    rounds: int = 5
    transport: str = "ipc"
    arch: str = "i686"
    storm: str = "64MiB"  # bytes one client allocates in 4 KiB pages
    chunks: int = 20  # progress reports during the storm
    clients: int = 16  # clients in flight at once for mm.alloc_free_clients

    def check(self) -> None:
        if self.seconds <= 0 or self.rounds < 1:
            raise ValueError("seconds must be positive and rounds at least 1")
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.transport!r}")
        if self.storm_pages() < 1:
            raise ValueError(f"storm size {self.storm!r} is less than one page")
        if self.clients < 1:
            raise ValueError("clients must be at least 1")

    def storm_pages(self) -> int:
        return parse_size(self.storm) // PAGE

    def memory(self) -> str:
        """RAM for the run: room for the storm twice over, at least 256 MiB."""
        need = max(256 * MiB, 2 * self.storm_pages() * PAGE + 64 * MiB)
        return f"{-(-need // MiB)}MiB"

    def steps(self) -> int:
        return 3 + self.rounds * len(SIDES) + 2 + self.chunks

    def conditions(self, flight: str) -> str:
        return (f"{self.transport}, CURVE, {self.arch} {self.memory()}, {flight}, one-page alloc then free; "
                f"{self.rounds} rounds x {self.seconds:g} s")


# The sides timed each round, in this order.
SIDES = ("floor", "mm", "floor pipelined", "mm clients", "floor clients")
STORM_POOL = 8  # frames in the kernel's initial pool for the mm benchmark


def run(opts: MMBenchOptions, run_dir: str, step: Step = lambda s: None) -> Report:
    """The mm figures; the system and the floor are started under ``run_dir`` and stopped after."""
    opts.check()
    rep = Report()
    pages = opts.storm_pages()
    ctx = zmq.Context()
    ctx.linger = 0
    try:
        step("starting the kernel and the mm")
        # A small kernel pool and low watermarks: the storm's page tables (one per 4 MiB on i686) keep
        # the kernel short, so the mm donates again and again while the client allocates.
        # Every client needs only a page (the storm's client gets its own quota): the mm grants no more
        # than exists, so the default quotas would leave room for 16 clients only.
        system = System(os.path.join(run_dir, "system"), arch=opts.arch, memory=opts.memory(), lease=3600.0,
                        transport=opts.transport, clients=2 + opts.clients, kernel_pool=STORM_POOL,
                        mm_args=["--quota", "64", "--low", "4", "--target", "8", "--high", "64"])
        rundir.admit(system.run_dir, "client-1", quota=pages + 64)
        rundir.admit(system.run_dir, "observer")  # (the readiness pings)
        streams: list[Stream] = []
        try:
            system.start()
            rd = system.run_dir
            mm_key, mm_end = rundir.public_key(rd, "mm"), rundir.read_endpoint(rd, "mm")
            mm_pid, kernel_pid = system.parts["mm"].pid, system.parts["kernel"].pid
            e2e = Stream(dealer(ctx, mm_end, mm_key, rd, "client-0"), [mm_pid])
            storm = Stream(dealer(ctx, mm_end, mm_key, rd, "client-1"))
            many = [Stream(dealer(ctx, mm_end, mm_key, rd, f"client-{2 + i}")) for i in range(opts.clients)]
            streams = [e2e, storm, *many]
            replies = {call: e2e.call(call, args) for call, args in CYCLE}  # (also makes client-0's process)
            step("starting the floor echo")
            with Floor(os.path.join(run_dir, "floor"), opts.transport, replies=replies) as floor:
                fl = [Stream(dealer(ctx, floor.endpoint, floor.server_key, floor.run_dir, "mm"), [floor.proc.pid])]
                fl += [Stream(dealer(ctx, floor.endpoint, floor.server_key, floor.run_dir, "mm"))
                       for _ in range(opts.clients)]
                streams += fl
                floor_rt = _alloc_free(opts, rep, e2e, many, fl[0], fl[1:], mm_pid, kernel_pid, step)
            _storm(opts, rep, storm, system, floor_rt, step)
            step("where the mm's CPU goes: one pass of each load, counted by stage")  # (the mm counts from now on)
            rep.details["mm"]["stages"] = mm_stages(system, e2e, many, opts.seconds)
        finally:
            for s in streams:
                s.close()
            system.stop()
            remove_ipc_dir(system.run_dir)
    finally:
        ctx.term()
    rep.meta.setdefault("transport", opts.transport)
    rep.meta.setdefault("rounds", opts.rounds)
    rep.meta.setdefault("seconds", opts.seconds)
    rep.meta.setdefault("notes", []).append(
        "mm: ratios are the median of the per-round ratios (the mm against the floor timed next to it), with their "
        "range below; values are the medians of the rounds. CPU: every thread of the server process (schedstat).")
    return rep


def run_many(streams: list[Stream], cycle: list[tuple[str, dict]], seconds: float,
             server_pids: Sequence[int] = ()) -> Sample:
    """Every stream (a client of its own) keeps one request in flight for ``seconds``; whole cycles only."""
    poller = zmq.Poller()
    makes = {}
    for s in streams:
        makes[s.sock] = [Requests(cycle, s.next_id), 0, 0]  # make, sent, done
        s.next_id += 1 << 40
        poller.register(s.sock, zmq.POLLIN)
    cpu0 = cpu_seconds(server_pids) if server_pids else None
    clock = time.perf_counter
    t0 = clock()
    end = t0 + seconds
    for sock, st in makes.items():
        sock.send(st[0](0))
        st[1] = 1
    outstanding, done = len(makes), 0
    n = len(cycle)
    while outstanding:
        ready = poller.poll(10_000)
        if not ready:
            raise BenchError(f"no reply within 10s ({done} answered)")
        now = clock()
        for sock, _ in ready:
            st = makes[sock]
            reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
            if reply.get("ok") is not True or reply.get("id") != st[0].base + st[2]:
                raise BenchError(f"request #{st[2]} of a client got {reply!r}")
            st[2] += 1
            done += 1
            if st[1] % n or now < end:
                sock.send(st[0](st[1]))
                st[1] += 1
            else:
                outstanding -= 1
    sample = Sample(done, clock() - t0, len(streams))
    cpu1 = cpu_seconds(server_pids) if cpu0 is not None else None
    if cpu0 is not None and cpu1 is not None:
        sample.server_cpu = cpu1 - cpu0
    for s in streams:
        s.next_id = makes[s.sock][0].base + makes[s.sock][2]
    return sample


def _alloc_free(opts: MMBenchOptions, rep: Report, mm: Stream, many: list[Stream], floor: Stream,
                floors: list[Stream], mm_pid: int, kernel_pid: int, step: Step) -> float:
    cycle = CYCLE
    step("warming up")
    warm = min(0.2, opts.seconds)
    floor.run(cycle, warm, 1)
    floor.run(cycle, warm, len(many))
    run_many(floors, cycle, warm)
    mm.run(cycle, warm, 1)
    run_many(many, cycle, warm)  # (the first alloc of each of these clients also creates its process)
    kernel: dict[str, list[float]] = {"mm": [], "mm clients": []}  # the kernel's CPU per call, each round

    def with_kernel(name: str, fn: Callable[[], Sample]) -> Callable[[], Sample]:
        def timed() -> Sample:
            k0 = cpu_seconds([kernel_pid])
            sample = fn()
            k1 = cpu_seconds([kernel_pid])
            if k0 is not None and k1 is not None and sample.calls:
                kernel[name].append((k1 - k0) / sample.calls)
            return sample
        return timed

    k = len(many)
    sides: dict[str, Callable[[], Sample]] = {
        "floor": lambda: floor.run(cycle, opts.seconds, 1),
        "mm": with_kernel("mm", lambda: mm.run(cycle, opts.seconds, 1)),
        "floor pipelined": lambda: floor.run(cycle, opts.seconds, k),
        "mm clients": with_kernel("mm clients", lambda: run_many(many, cycle, opts.seconds, [mm_pid])),
        "floor clients": lambda: run_many(floors, cycle, opts.seconds, floor.server_pids),
    }
    assert tuple(sides) == SIDES
    res = alternate(opts.rounds, sides, lambda s: step(f"timing {s}"))
    f1, m1, fk, mk, fc = (res[name] for name in SIDES)
    one, flight = opts.conditions("one at a time"), opts.conditions(f"{k} clients in flight")

    r, rc, rone = rate_ratio(mk, fk), rate_ratio(mk, fc), rate_ratio(mk, m1)
    rep.add(Figure("mm.alloc_free_clients", f"mm alloc/free calls, {k} clients in flight", mk.rate.median,
                   "calls/s", fk.rate.median, "echoes/s", f"floor, {k} in flight", r.median, ">=", 0.40,
                   ">= 0.40 x pipelined floor", spread=(r.lo, r.hi), conditions=flight,
                   note=f"floor with {k} clients (a connection each): {fc.rate.median:,.0f} echoes/s, ratio "
                        f"{rc.median:.2f} ({rc.lo:.2f}..{rc.hi:.2f}); {rone.median:.2f}x the mm one at a time"))
    r = rate_ratio(m1, f1)
    rep.add(Figure("mm.alloc_free", "mm alloc/free calls, one at a time", m1.rate.median, "calls/s",
                   f1.rate.median, "echoes/s", "floor", r.median, ">=", 0.40, ">= 0.40 x floor",
                   spread=(r.lo, r.hi), conditions=one, note="calls (an alloc and a free are two), two hops each"))
    for key, name, mr, fr, cond in (
            ("mm.cpu_per_call", f"mm server CPU per alloc/free call, {k} clients in flight", mk, fk, flight),
            ("mm.cpu_per_call_one", "mm server CPU per alloc/free call, one at a time", m1, f1, one)):
        c = cpu_ratio(mr, fr)
        if not c.n:
            continue
        kern = kernel["mm clients" if mr is mk else "mm"]
        kernel_note = f"kernel {statistics.median(kern) * 1e6:.0f} us per call; " if kern else ""
        rep.add(Figure(key, name, mr.cpu.median * 1e6, "us", fr.cpu.median * 1e6, "us", "floor CPU per echo",
                       c.median, target="info (floor CPU / mm CPU)", spread=(c.lo, c.hi), conditions=cond,
                       note=f"{kernel_note}every thread of the mm process (schedstat): noise-proof"))
    floor_rt = f1.latency().median
    rep.details["mm"] = {
        "arch": opts.arch, "memory": opts.memory(), "clients_in_flight": k,
        "floor_round_trip_us": round(floor_rt * 1e6, 2),
        "mm_round_trip_us": {c: round(m1.latency(c).median * 1e6, 2) for c in ("alloc", "free")},
        "floor_replies": "the mm's own results for alloc and free",
        "kernel_cpu_us_per_call": {name: round(statistics.median(v) * 1e6, 2) for name, v in kernel.items() if v},
        "rounds": {name: rr.to_json() for name, rr in res.items()},
    }
    return floor_rt


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each kind of thread of process ``pid``: its main thread, ZeroMQ's I/O
    thread(s), the rest (the ZAP authenticator, ZeroMQ's reaper), from schedstat."""
    out = {"main": 0.0, "zmq_io": 0.0, "other": 0.0}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        kind = "main" if tid == str(pid) else "zmq_io" if comm.startswith("ZMQbg/IO") else "other"
        out[kind] += ns / 1e9
    return out


def read_stages(system: System, after: int, timeout: float = 10.0) -> dict[str, Any]:
    """Signal the mm (SIGUSR1) and read the stage counts it writes (the writing after number ``after``)."""
    path = os.path.join(system.run_dir, STAGES_FILE)
    os.kill(system.parts["mm"].pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("seq", 0) > after:
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise BenchError(f"the mm wrote no stage counts to {path} within {timeout:g}s (SIGUSR1)")


def mm_stages(system: System, one: Stream, many: list[Stream], seconds: float) -> dict[str, Any]:
    """One pass of each load (``many`` clients in flight, then ``one`` client one request at a time) with the
    mm counting its main thread's CPU by stage: per call, in microseconds, with each kind of thread apart."""
    pid = system.parts["mm"].pid
    path = os.path.join(system.run_dir, STAGES_FILE)
    try:
        with open(path) as f:
            seq = json.load(f).get("seq", 0)
    except (OSError, ValueError):
        seq = 0
    os.kill(pid, signal.SIGUSR1)  # count from now (the first signal writes nothing)
    time.sleep(0.05)
    out: dict[str, Any] = {}
    loads: tuple[tuple[str, Callable[[], Sample]], ...] = (
        (f"{len(many)} clients", lambda: run_many(many, CYCLE, seconds)),
        ("one client", lambda: one.run(CYCLE, seconds, 1)))
    for label, load in loads:
        t0 = thread_cpu(pid)
        sample = load()
        t1 = thread_cpu(pid)
        data = read_stages(system, seq)
        seq = data["seq"]
        n = sample.calls
        c = data["counts"]
        us = {k: round(v / 1e3 / n, 1) for k, v in data["ns"].items()}
        out[label] = {
            "calls": n, "calls_per_s": round(sample.rate, 1),
            "main_thread_us": us, "main_thread_total_us": round(sum(data["ns"].values()) / 1e3 / n, 1),
            "threads_us": {k: round((t1[k] - t0[k]) * 1e6 / n, 1) for k in t0},
            "gc_us": round(sum(data["gc_ns"]) / 1e3 / n, 2), "gc_runs": data["gc_runs"],
            "wakeups_per_call": round(c["wakeups"] / n, 3),
            "calls_per_wakeup": round(c["requests"] / max(1, c["wakeups"]), 2),
            "calls_per_journal_batch": round(c["requests"] / max(1, c["batches"]), 2),
        }
    return out


def profile_driver(clients: int = 16, calls: int = 8000, memory: str = "256MiB", cprofile: bool = False,
                   top: int = 20) -> dict[str, Any]:
    """The mm without sockets: its ``Driver`` in-process, an in-process ``KernelService`` answering its kernel
    calls and a real ``Journal`` (in a temporary directory), ``clients`` clients each with one alloc/free
    in flight; each wake-up feeds the driver every kernel reply and every client's next request at once, as
    the server does. Per call: the driver's time (``handle`` and what its actions need besides the
    journal), the journal's, and the in-process kernel's (not the mm's), all CPU time."""
    from kernel_server.service import KernelService
    from mm_service import driver as D
    from mm_service.journal import Journal
    from mm_service.policy import Config
    from protocol import wire

    mm_key, op_key = "M" * 40, "O" * 40
    kernel = KernelService.boot(arch="i686", memory=parse_size(memory), mm_key=mm_key, kernel_pool_frames=STORM_POOL,
                                lease_seconds=3600.0, operator_key=op_key)
    drv = D.Driver(Config(low=4, target=8, high=64, quota=64), mm_key, op_key, first_kid=1)
    clock = time.thread_time_ns
    with tempfile.TemporaryDirectory(prefix="mmprof-", dir="/tmp") as d:
        journal = Journal(os.path.join(d, "mm.db"))
        to_kernel: list[bytes] = []
        answered: list[Any] = []
        spent = {"journal": 0}

        def perform(actions: list[Any]) -> None:
            for a in actions:
                kind = type(a)
                if kind is D.SendKernel:
                    to_kernel.append(a.data)
                elif kind is D.SendReply:
                    answered.append(a.peer)
                elif kind is D.WriteJournal:
                    t0 = clock()
                    journal.append(a.records)
                    spent["journal"] += clock() - t0
                    perform(drv.handle(D.JournalCommitted(a.batch)))
                elif kind is D.Fatal:
                    raise BenchError(a.text)

        def kernel_replies() -> list[Any]:
            out = [D.KernelReply(kernel.handle(mm_key, data, 0.0)) for data in to_kernel]
            to_kernel.clear()
            return out

        perform(drv.boot(kernel.call(mm_key, "hello"), kernel.call(mm_key, "address_map"), journal.replay()))
        while drv.house or drv.house_task is not None or to_kernel:  # (recovery and the first upkeep)
            perform(drv.handle(*kernel_replies()))
        keys = [f"{i:040d}" for i in range(clients)]
        per_client = calls // clients + 16  # (with the untimed first cycles and the last wake-up)
        requests = [[wire.request(i, *CYCLE[i % 2]) for i in range(per_client)] for _ in range(clients)]
        sent = [0] * clients

        def next_request(c: int) -> Any:
            n = sent[c]
            sent[c] += 1
            return D.ClientRequest(c, keys[c], requests[c][n])

        events = [next_request(c) for c in range(clients)]
        # a first cycle for each client (its process is made), not timed
        while min(sent) < 3:
            replies = kernel_replies()
            answered.clear()
            perform(drv.handle(*replies, *events))
            events = [next_request(c) for c in answered]
        prof = cProfile.Profile() if cprofile else None
        done = wakeups = 0
        spent = {"journal": 0, "driver": 0, "kernel": 0}
        while done < calls:
            t0 = clock()
            replies = kernel_replies()
            t1 = clock()
            answered.clear()
            j0 = spent["journal"]
            if prof is not None:
                prof.enable()
            perform(drv.handle(*replies, *events))
            if prof is not None:
                prof.disable()
            spent["kernel"] += t1 - t0
            spent["driver"] += clock() - t1 - (spent["journal"] - j0)
            wakeups += 1
            done += len(answered)
            events = [next_request(c) for c in answered]
        journal.close()
    out: dict[str, Any] = {
        "clients": clients, "calls": done, "calls_per_wakeup": round(done / wakeups, 2),
        "us_per_call": {k: round(v / 1e3 / done, 2) for k, v in spent.items()},
        "records_per_batch": round(drv.stats["records"] / max(1, drv.stats["batches"]), 2),
    }
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        out["cprofile"] = buf.getvalue()
    return out


def _storm(opts: MMBenchOptions, rep: Report, mm: Stream, system: System, floor_rt: float, step: Step) -> None:
    pages = opts.storm_pages()
    before = mm.call("stats")["counters"]
    kbefore = system.kernel_stats()
    cycle = [("alloc", {"pages": 1, "prot": 3})]
    chunk = -(-pages // opts.chunks)
    done, spent = 0, 0.0
    lat: list[float] = []
    while done < pages:
        n = min(chunk, pages - done)
        step(f"donation storm: {done} of {pages} pages allocated")
        s = mm.run(cycle, 1e9, 1, max_calls=n)
        done += s.calls
        spent += s.seconds
        lat.extend(s.latencies.get("alloc", []))
    after = mm.call("stats")
    kafter = system.kernel_stats()
    c = {k: after["counters"][k] - before[k] for k in before}
    if after["you"] is None or after["you"]["charged"] < pages:
        raise BenchError(f"the storm client holds {after['you']} pages, not {pages}")
    per_page = spent / done
    lat.sort()
    rep.add(Figure("mm.storm", f"donation storm: {opts.storm} in 4 KiB pages, per page", per_page * 1e6, "us",
                   floor_rt * 1e6, "us", "floor round trip", per_page / floor_rt, target="info (no target)",
                   note=f"{spent:.1f} s for {done} pages; {c['donations']} donations "
                        f"({c['donated_frames']} frames), {c['enomem_retries']} ENOMEM retries"))
    rep.details["storm"] = {
        "bytes": parse_size(opts.storm), "pages": done, "seconds": round(spent, 3),
        "pages_per_second": round(done / spent, 1), "per_page_us": round(per_page * 1e6, 2),
        "latency_us": {"median": round(lat[len(lat) // 2] * 1e6, 1), "p99": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
                       "max": round(lat[-1] * 1e6, 1)},
        "mm_counters": c, "watermarks": after["watermarks"],
        "kernel_free_before": kbefore["kernel_free"], "kernel_free_after": kafter["kernel_free"],
        "kernel_used_growth": kafter["kernel_used"] - kbefore["kernel_used"],
    }


if __name__ == "__main__":  # python -m bench.mm [--clients N] [--seconds S] [--rounds R] [--storm SIZE]
    import argparse

    ap = argparse.ArgumentParser(description="The mm benchmarks (as `mmsim bench mm`), with the clients in flight.")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--storm", default="64MiB")
    a = ap.parse_args()
    o = MMBenchOptions(seconds=a.seconds, rounds=a.rounds, storm=a.storm, clients=a.clients)
    with tempfile.TemporaryDirectory(prefix="mmb-", dir="/tmp") as d:
        report = run(o, d, lambda s: print(f"  {s}", flush=True))
    for fig in report.figures:
        spread = f" ({fig.spread[0]:.2f}..{fig.spread[1]:.2f})" if fig.spread else ""
        print(f"{fig.key:<24} {fig.value:12.1f} {fig.unit:<9} ratio {fig.ratio:.3f}{spread}  {fig.verdict}  {fig.note}")
    print(json.dumps(report.details["mm"]["stages"], indent=1))
