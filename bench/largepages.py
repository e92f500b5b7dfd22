"""Anti-fragmentation figure: large pages still allocatable after a seeded churn.

The same seeded workload runs once per placement policy, in one process, on the
unchanged kernel and mm cores (the in-process ``KernelService`` and ``MMCore``):
once with the mm's pageblock placement, once with plain first fit. It models a
busy machine the way Linux's fragmentation tests do (a kernel build next to
long-lived services, memory kept busy), with three kinds of client:

- daemons live through the whole run. Their working set grows slowly, in small
  allocations made all along the run, partly at scattered virtual addresses
  (each new region costs the kernel a page table), and churns once grown;
- services live for hundreds of ticks, hold a moderate working set and an
  endpoint, and map their buffer pool with one large page (small pages when no
  whole block is free, as Linux's THP falls back);
- jobs live for tens of ticks: they ramp up to a working set of 128 KiB..8 MiB in
  4 KiB..1 MiB allocations, churn inside it and exit (the kernel destroys the
  process, the mm learns it from the kernel's events). They arrive in busy and
  quiet spells.

Every process costs the kernel memory (process and PDPT slab objects, page
tables, 1-8 threads; its whole kernel quota is reserved in the kernel's pool),
so the mm donates and reclaims throughout, between its watermarks (16 / 48 /
128 frames). Each client's user quota is its working set (and a large page
for a service); the mm grants no more than exists, so in busy spells a new
client's first request is refused until others exit (``refused``). Clients
stop growing while the user memory they hold is above 90% of user RAM, and
free instead. The workload's decisions
depend only on the seed and its own bookkeeping, so both policies see the same
request sequence (the result reports ``churn_requests`` and ``ticks`` to show it).

At the end the jobs and services exit, the daemons stay (as after a build
finishes), and one more client allocates large pages until it cannot. The
figure is that count, against ``possible``: the free user frames divided by
the large page size. Also reported: the whole free blocks while the churn runs
(mean over its second half), and how many of the services' large pages were
granted under load. ``python -m bench.largepages`` prints seeds 1..5.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from kernel_server.service import KernelService
from mm_service.policy import Config, MMCore, drive
from protocol.calls import MM_CALLS, validate
from protocol.errors import Error

MM = "M" * 40
LAST = "Z" * 40  # the client that allocates large pages at the end
REGION = 0x40_0000  # daemons' scattered regions are this far apart
THREADS = {"daemon": (2, 5), "service": (2, 9), "job": (1, 5)}  # threads a client starts: [lo, hi)


@dataclass
class Client:
    key: str
    kind: str  # "daemon", "service" or "job"
    until: float  # tick of exit (inf for daemons)
    ws: int  # working set the client grows to, in pages
    activity: float  # chance to make a request in a tick
    live: list[tuple[int, int]] = field(default_factory=list)  # (vaddr, pages) of its allocations
    held: int = 0
    started: bool = False  # has its threads (needs its process, made by the first alloc)
    region: int = 0x1000_0000


def _size(rng: random.Random, largest: int) -> int:
    """A power of two from 1 to ``largest`` pages; each size 3/4 as likely as the next smaller one."""
    top = largest.bit_length() - 1
    weights = [0.75 ** k for k in range(top + 1)]
    return 1 << rng.choices(range(top + 1), weights)[0]


def _late_mean(samples: list[tuple[int, int, int]], i: int, steps: int) -> float:
    """Mean of field ``i`` over the ticks of the second half of the run (past the warm-up)."""
    late = [s[i] for s in samples if s[0] >= steps // 2]
    return round(sum(late) / max(1, len(late)), 1)


def churn(placement: str, seed: int = 1, arch: str = "i686-pae", memory: int = 128 << 20,
          steps: int = 6000, pressure: float = 0.9, daemons: int = 4, daemon_share: float = 0.015,
          services: int = 4, job_rate: float = 0.8, period: int = 150) -> dict[str, Any]:
    """Run the workload for ``steps`` client requests with one placement policy; count large pages after.

    ``pressure``: the fraction of user RAM the clients hold at most. ``daemon_share``:
    each daemon's final working set as a fraction of user RAM.
    """
    rng = random.Random(seed)
    kernel = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=64)
    quotas: dict[str, int] = {}  # each client's user quota: its working set and room for one more request
    mm = MMCore(kernel.call(MM, "address_map"), kernel.call(MM, "hello"),
                Config(low=16, target=48, high=128, placement=placement),
                admission=lambda key: SimpleNamespace(quota=quotas.get(key, 1), kernel_quota=None))

    def run(gen: Any) -> Any:
        return drive(gen, lambda c, a: kernel.call(MM, c, a), lambda ops: None)

    counts = {"requests": 0, "refused": 0, "kernel_refused": 0, "exits": 0, "large_asked": 0, "large_got": 0}

    def req(key: str, call: str, **args: Any) -> Any:
        counts["requests"] += 1
        r = run(mm.request(key, call, validate(MM_CALLS, call, args)))
        run(mm.maintain())
        if isinstance(r, Error):
            counts["refused"] += 1
        return r

    run(mm.refresh())
    user_ram = mm.view.counts()["free"]
    cap = int(user_ram * pressure)
    serial = 0
    clients: list[Client] = []
    tick = 0

    def spawn(kind: str) -> None:
        nonlocal serial
        serial += 1
        key = f"{serial:040d}"
        if kind == "daemon":
            c = Client(key, kind, math.inf, int(user_ram * daemon_share), 0.4)
        elif kind == "service":
            c = Client(key, kind, tick + rng.randrange(400, 1600), rng.randrange(64, 1024), 0.15)
        else:  # a job: log-uniform working set, 128 KiB .. 8 MiB
            c = Client(key, kind, tick + rng.randrange(20, 200), int(32 * 64 ** rng.random()), 0.5)
        clients.append(c)
        quotas[key] = c.ws + (mm.view.block if kind == "service" else 0)

    def exit_(c: Client) -> None:
        clients.remove(c)
        st = mm.view.clients.get(c.key)
        if st is not None:
            kernel.call(MM, "proc_destroy", {"pid": st.pid})
            run(mm.poll_events())
        counts["exits"] += 1

    def act(c: Client, held_total: int) -> int:
        """One request by ``c``; returns the change in pages held."""
        grow = c.held < c.ws and rng.random() < 0.75  # (its working set is its quota)
        if grow:
            pages = min(_size(rng, 8 if c.kind == "daemon" else 256), c.ws - c.held)  # within its quota
            if held_total + pages > cap:
                grow = False
        if not grow:
            if not c.live:
                return 0
            vaddr, pages = c.live.pop(rng.randrange(len(c.live)))
            req(c.key, "free", vaddr=vaddr, pages=pages)
            c.held -= pages
            return -pages
        where: dict[str, Any] = {}
        if c.kind == "daemon" and rng.random() < 0.25:  # a new region somewhere in its address space
            c.region += REGION * rng.randrange(1, 4)
            where = {"vaddr": c.region}
        r = None
        if c.kind == "service" and not c.started:  # a service maps its buffer pool with one large page
            pages = mm.view.block
            counts["large_asked"] += 1
            r = req(c.key, "alloc", pages=pages, prot=3, large=True)
            if isinstance(r, dict):
                counts["large_got"] += 1
            else:  # no whole block: small pages instead, as Linux's THP falls back (one request still)
                counts["refused"] -= 1
                counts["requests"] -= 1
                r = None
        if r is None:
            r = req(c.key, "alloc", pages=pages, prot=3, **where)
        if not isinstance(r, dict):
            return 0
        c.live.append((r["vaddr"], pages))
        c.held += pages
        if c.kind == "daemon" and where:
            c.region = r["vaddr"] + pages * 4096
        if not c.started:  # the new process starts its threads (and a service its endpoint)
            c.started = True
            for _ in range(rng.randrange(*THREADS[c.kind])):
                if isinstance(kernel.call(c.key, "thread_create", {}), Error):
                    counts["kernel_refused"] += 1
            if c.kind != "job" and isinstance(kernel.call(c.key, "endpoint_create", {}), Error):
                counts["kernel_refused"] += 1
        return pages

    for _ in range(daemons):
        spawn("daemon")
    held_total = 0
    peak = 0
    under_load: list[tuple[int, int, int]] = []  # per tick: requests so far, whole free blocks, pages held
    while counts["requests"] < steps:
        tick += 1
        if sum(c.kind == "service" for c in clients) < services and rng.random() < 0.05:
            spawn("service")
        if rng.random() < job_rate * (1 + 0.8 * math.sin(2 * math.pi * tick / period)):  # busy and quiet spells
            spawn("job")
        ending = [c for c in clients if c.until <= tick]
        for c in ending:
            held_total -= c.held
            exit_(c)
        if ending:  # the exits gave the kernel frames back: the mm learns its free count
            run(mm.refresh())
        order = list(clients)
        rng.shuffle(order)
        for c in order:
            if rng.random() < c.activity:
                held_total += act(c, held_total)
        peak = max(peak, held_total)
        under_load.append((counts["requests"], int(np.count_nonzero(mm.view.bfree == mm.view.block)), held_total))
    daemon_pages = sum(c.held for c in clients if c.kind == "daemon")
    churn_requests = counts["requests"]
    for c in [c for c in clients if c.kind != "daemon"]:
        exit_(c)
    run(mm.refresh())
    run(mm.maintain())
    view = mm.view
    block = view.block
    free = view.counts()["free"]
    whole = int(np.count_nonzero(view.bfree == block))
    large = 0
    gu, gk = mm.granted()
    quotas[LAST] = max(1, mm.budget - gu - gk - mm.kernel_quota)  # everything the others were not granted
    while isinstance(req(LAST, "alloc", pages=block, prot=3, large=True), dict):
        large += 1
    return {"placement": placement, "seed": seed, "steps": steps, "large_pages": large,
            "possible": free // block, "whole_blocks": whole, "block_frames": block, "free_frames": free,
            "blocks": int(view.bfree.size), "ticks": tick,
            "whole_blocks_under_load": _late_mean(under_load, 1, steps),
            "held_under_load": _late_mean(under_load, 2, steps), "peak_held": peak, "user_ram": user_ram,
            "daemon_pages": daemon_pages, "churn_requests": churn_requests, "donations": mm.counters.donations,
            "reclaims": mm.counters.reclaims, **counts}


def compare(seed: int = 1, steps: int = 6000) -> dict[str, Any]:
    """The same churn under both placement policies: large pages allocatable after it."""
    a = churn("pageblock", seed, steps=steps)
    b = churn("first-fit", seed, steps=steps)
    return {"pageblock": a, "first_fit": b,
            "ratio": (a["large_pages"] / b["large_pages"]) if b["large_pages"] else float("inf")}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m bench.largepages",
                                 description="Large pages still allocatable after a seeded churn: the mm's "
                                             "pageblock placement against plain first fit, in the same run.")
    ap.add_argument("--seeds", type=int, default=5, help="run seeds 1..N (default 5)")
    ap.add_argument("--steps", type=int, default=6000, help="client requests per run (default 6000)")
    ap.add_argument("--json", action="store_true", help="print every run's figures as JSON")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        ap.error("--seeds and --steps must be at least 1")
    runs = []
    for seed in range(1, args.seeds + 1):
        print(f"seed {seed}/{args.seeds} ...", file=sys.stderr, flush=True)
        runs.append(compare(seed, args.steps))
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    r0 = runs[0]["pageblock"]
    print(f"{r0['blocks']} blocks of {r0['block_frames']} frames ({r0['block_frames'] * 4} KiB); "
          f"{args.steps} requests per run")
    print(f"{'seed':>4} {'possible':>8} {'pageblock':>9} {'first-fit':>9} {'under load: pageblock':>22} "
          f"{'first-fit':>9} {'held':>6}")
    for r in runs:
        a, b = r["pageblock"], r["first_fit"]
        print(f"{a['seed']:>4} {a['possible']:>8} {a['large_pages']:>9} {b['large_pages']:>9} "
              f"{a['whole_blocks_under_load']:>22} {b['whole_blocks_under_load']:>9} "
              f"{a['held_under_load'] / a['user_ram']:>6.0%}")
    for name, key in (("pageblock", "pageblock"), ("first-fit", "first_fit")):
        got = [r[key]["large_pages"] for r in runs]
        asked = sum(r[key]["large_asked"] for r in runs)
        given = sum(r[key]["large_got"] for r in runs)
        print(f"{name}: mean {sum(got) / len(got):.1f} large pages after the churn (range {min(got)}..{max(got)}); "
              f"services got {given} of the {asked} large pages they asked for under load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
