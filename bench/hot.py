"""The in-process hot paths: what the mm's driver and the kernel's service cost per call, without sockets.

No process is started: the real ``mm_service.driver.Driver`` serves one-page ``alloc``/``free`` calls
with its kernel calls answered by an in-process ``KernelService`` and its journal batches committed at
once (``JournalCommitted`` fed straight back: nothing is written, the journal's own cost is
``mmsim bench mm``'s), and the kernel's ``KernelService.handle`` serves the mm's one-page
``map``/``unmap`` requests, with no observer and with one set (a watcher that does nothing: what the
reports themselves cost the kernel; the simulator always sets one).

- ``driver``: microseconds of ``Driver.handle`` per client call (an ``alloc`` and a ``free`` are two
  calls), from the ``ClientRequest`` to its ``SendReply``, every wake-up and journal commit the call
  needs included, the kernel's time not; ``clients`` clients each with one call in flight, every
  wake-up feeding the driver every kernel reply and every client's next request (one client: a call
  takes four wake-ups and two commits). With ``observed`` an ``MMObserver`` that does nothing is set.
- ``kernel``: microseconds of ``KernelService.handle`` per map or unmap of the mm (one page, distinct
  pages and addresses under one page table, fresh request ids: every call executes).

Each figure is the best of a few passes (the least disturbed: the machine is shared). For figures no
neighbour disturbs, count instructions: ``python -m bench.hot PART OPS`` runs one part for OPS calls
after its warm-up, so the difference of two runs under ``valgrind --tool=cachegrind --cache-sim=no``
(OPS and 0) over OPS is the part's instructions per call.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

MM_KEY, OP_KEY = "M" * 40, "O" * 40
VADDR = 0x4000_0000  # where each client's page goes (each client its own address space)
CYCLE = [("alloc", {"pages": 1, "prot": 3, "vaddr": VADDR}), ("free", {"vaddr": VADDR, "pages": 1})]
KERNEL_PAGES = 32  # distinct pages a kernel pass maps and unmaps (one page table, kept by an anchor page)
PARTS = ("driver1", "driver16", "driver16_observed", "kernel", "kernel_observed")
clock = time.thread_time_ns


class DriverLoad:
    """A ``Driver`` serving ``clients`` clients' alloc/free cycles, its kernel in-process."""

    def __init__(self, clients: int = 16, observed: bool = False, memory: int = 256 << 20) -> None:
        from kernel_server.service import KernelService
        from mm_service import driver as D
        from mm_service.observe import MMObserver
        from mm_service.policy import Config
        from protocol import wire

        self.D = D
        self.kernel = KernelService.boot(arch="i686", memory=memory, mm_key=MM_KEY, lease_seconds=3600.0,
                                         operator_key=OP_KEY)
        self.drv = D.Driver(Config(), MM_KEY, OP_KEY, first_kid=1, observer=MMObserver() if observed else None)
        self.to_kernel: list[bytes] = []
        self.answered: list[Any] = []
        self.kernel_ns = 0
        self.keys = [f"{i:040d}" for i in range(clients)]
        self.sent = [0] * clients
        self._request = wire.request
        self.perform(self.drv.boot(self.kernel.call(MM_KEY, "hello"), self.kernel.call(MM_KEY, "address_map"), []))
        while self.drv.house or self.drv.house_task is not None or self.to_kernel:  # recovery, the first upkeep
            self.perform(self.drv.handle(*self.kernel_replies()))
        self.events = [self.next_request(c) for c in range(clients)]
        self.run(3 * clients)  # every client's process made, a few cycles each: not counted

    def perform(self, actions: list[Any]) -> None:
        D = self.D
        for a in actions:
            kind = type(a)
            if kind is D.SendKernel:
                self.to_kernel.append(a.data)
            elif kind is D.SendReply:
                self.answered.append(a.peer)
            elif kind is D.WriteJournal:
                self.perform(self.drv.handle(D.JournalCommitted(a.batch)))
            elif kind is D.Fatal:
                raise RuntimeError(a.text)

    def kernel_replies(self) -> list[Any]:
        t0 = clock()
        handle = self.kernel.handle
        out = [self.D.KernelReply(handle(MM_KEY, data, 0.0)) for data in self.to_kernel]
        self.to_kernel.clear()
        self.kernel_ns += clock() - t0
        return out

    def next_request(self, c: int) -> Any:
        n = self.sent[c]
        self.sent[c] = n + 1
        return self.D.ClientRequest(c, self.keys[c], self._request(n + 1, *CYCLE[n % 2]))

    def run(self, calls: int) -> tuple[int, int]:
        """Serve ``calls`` calls (at least); (calls answered, ns of CPU in the driver)."""
        done = spent = 0
        drv, perform = self.drv, self.perform
        while done < calls:
            replies = self.kernel_replies()
            self.answered.clear()
            t0 = clock()
            perform(drv.handle(*replies, *self.events))
            spent += clock() - t0
            done += len(self.answered)
            self.events = [self.next_request(c) for c in self.answered]
        return done, spent


class KernelLoad:
    """``KernelService.handle`` serving the mm's one-page map/unmap requests."""

    def __init__(self, observed: bool = False, memory: int = 256 << 20) -> None:
        from kernel_server.observe import KernelObserver
        from kernel_server.service import KernelService
        from protocol import wire

        self.svc = svc = KernelService.boot(arch="i686", memory=memory, mm_key=MM_KEY, lease_seconds=3600.0,
                                            observer=KernelObserver() if observed else None)
        pid = svc.call(MM_KEY, "proc_create", {"key": "C" * 40, "kernel_quota": 8})["pid"]
        amap = svc.call(MM_KEY, "address_map")
        first = next(e["first"] for e in amap["entries"] if e["kind"] == "user")
        svc.call(MM_KEY, "map", {"pid": pid, "vaddr": VADDR - 0x1000, "frames": [[first + KERNEL_PAGES, 1]],
                                 "prot": 3})  # the anchor: the page table stays
        self.cycle = [("map", {"pid": pid, "vaddr": VADDR + i * 0x1000, "frames": [[first + i, 1]], "prot": 3,
                               "large": False}) for i in range(KERNEL_PAGES)]  # (as the mm sends them)
        self.cycle += [("unmap", {"pid": pid, "vaddr": VADDR + i * 0x1000, "pages": 1}) for i in range(KERNEL_PAGES)]
        self._request = wire.request
        self.next_id = 1
        self.run(len(self.cycle) * 4)

    def run(self, calls: int) -> tuple[int, int]:
        calls = -(-calls // len(self.cycle)) * len(self.cycle)  # whole cycles: the pages end unmapped
        reqs = [self._request(self.next_id + i, *self.cycle[i % len(self.cycle)]) for i in range(calls)]
        self.next_id += calls
        handle = self.svc.handle
        t0 = clock()
        for data in reqs:
            handle(MM_KEY, data, 0.0)
        return calls, clock() - t0


def make(part: str) -> Any:
    if part == "driver1":
        return DriverLoad(1)
    if part == "driver16":
        return DriverLoad(16)
    if part == "driver16_observed":
        return DriverLoad(16, observed=True)
    if part == "kernel":
        return KernelLoad()
    if part == "kernel_observed":
        return KernelLoad(observed=True)
    raise ValueError(f"unknown part {part!r}: one of {', '.join(PARTS)}")


def measure(calls: int = 4000, passes: int = 5, parts: tuple[str, ...] = PARTS,
            step: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Microseconds per call of each part: the best and the median of ``passes`` passes of ``calls`` calls."""
    out: dict[str, Any] = {"calls": calls, "passes": passes}
    for part in parts:
        step(f"in-process: {part}")
        load = make(part)
        per: list[float] = []
        for _ in range(passes):
            n, ns = load.run(calls)
            per.append(ns / 1e3 / n)
        per.sort()
        out[part] = {"best": round(per[0], 2), "median": round(per[len(per) // 2], 2)}
        if isinstance(load, DriverLoad):
            out[part]["kernel_us_per_call"] = round(load.kernel_ns / 1e3 / max(1, sum(load.sent)), 2)
    return out


def report(r: dict[str, Any]) -> Any:
    """The figures: each part's microseconds per call against the kernel's own, no observer (information)."""
    from bench.report import Figure, Report

    rep = Report()
    base = r["kernel"]["best"]
    words = {
        "driver1": "mm Driver.handle per alloc or free, one client (four wake-ups, two commits per call)",
        "driver16": "mm Driver.handle per alloc or free, 16 clients in flight",
        "driver16_observed": "the same with an observer set (one that does nothing)",
        "kernel": "KernelService.handle per one-page map or unmap by the mm, no observer",
        "kernel_observed": "the same with an observer set (one that does nothing; the simulator always sets one)",
    }
    cond = f"in-process, CPU time, best of {r['passes']} passes of {r['calls']} calls"
    for part in PARTS:
        if part not in r:
            continue
        v = r[part]["best"]
        rep.add(Figure(f"hot.{part}", words[part], v, "us/call", base, "us/call", "kernel map/unmap, no observer",
                       v / base, None, None, "info", note=f"median {r[part]['median']} us"
                       + (f"; its kernel calls {r[part]['kernel_us_per_call']} us per client call"
                          if "kernel_us_per_call" in r[part] else ""), conditions=cond))
    rep.details["hot"] = r
    return rep


USAGE = f"usage: python -m bench.hot PART [OPS]  (PART: one of {', '.join(PARTS)}; OPS: calls after the warm-up, " \
    "default 4000, 0 for the warm-up alone)"


def main(argv: list[str]) -> int:
    """``python -m bench.hot PART OPS``: run one part for OPS calls after its warm-up (for instruction counts)."""
    if not argv or argv[0] in ("-h", "--help") or len(argv) > 2:
        print(USAGE, file=sys.stderr if not argv or len(argv) > 2 else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    part = argv[0]
    if part not in PARTS:
        print(f"error: unknown part {part!r}; {USAGE}", file=sys.stderr)
        return 2
    try:
        ops = int(argv[1]) if len(argv) > 1 else 4000
        if ops < 0:
            raise ValueError
    except ValueError:
        print(f"error: OPS must be a whole number >= 0, not {argv[1]!r}; {USAGE}", file=sys.stderr)
        return 2
    load = make(part)
    if ops:
        n, ns = load.run(ops)
        print(f"{part}: {n} calls, {ns / 1e3 / n:.2f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
