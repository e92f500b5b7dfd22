"""The seeded plan of one run: machine, workloads, timings and which faults strike when.

Everything random about a run is drawn here or from other children of the
same seed (``child(seed, purpose)``), never from a global generator. Each
seed also draws *which* kinds of fault it uses ("swarm testing", as
FoundationDB and TigerBeetle's VOPR do): a run with only a few kinds of fault
reaches deeper into each than a run with all of them at low rates.

Fault kinds: ``client_death`` (a client process vanishes at that step, in
whatever state its requests are, or just as the kernel answers the mm's call
for one of its requests), ``mm_crash`` (the mm loses everything but its
journal and restarts after a delay: at that step, or at the next kernel reply
it receives, before it notes it anywhere, or as it is about to send its next
reply to a client; some seeds crash it during start-up too), ``partition`` (the mm and the kernel cannot
reach each other for a while, so the mm's Lazy Pirate gives up),
``lie_client`` and ``lie_mm`` (forged requests, see ``lies``), message
``loss``/``dup``/``delay`` (per message, see ``net``), and ``starvation``
(a tiny initial kernel pool and low watermarks, so ENOMEM and the mm's
donate-and-retry path run all the time).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from simulator.net import NetPlan

ARCHES = ("i686", "i686-pae", "x86_64")
WORKLOADS = ("steady", "sparse", "kobjects", "sharer")
STEP_FAULTS = ("client_death", "mm_crash", "lie_client", "lie_mm", "partition")


def child(seed: int, purpose: str) -> random.Random:
    """A generator for one purpose, derived from the seed alone (str seeds hash with SHA-512, not ``hash``)."""
    return random.Random(f"mmsim-sim/{seed}/{purpose}")


@dataclass(frozen=True)
class Timing:
    """Simulated durations in microseconds. The lease is short so that deaths expire within a run."""

    lease: int = 80_000
    kernel_tick: int = 10_000  # the kernel expires leases this often
    mm_tick: int = 10_000  # the mm reads kernel events and checks its watermarks this often
    keepalive: int = 20_000  # each live client pings the kernel (for each identity) this often
    client_timeout: int = 40_000  # a client resends the same bytes after this long (Lazy Pirate); its
    client_retries: int = 2  # whole window outlasts an mm restart, as the real clients' 3 x 2 s do
    mm_timeout: int = 25_000  # the mm's kernel calls: resend after this long (>= the longest delivery,
    # so when the mm gives up no copy of its request is still on the way: see net.NetPlan)
    mm_retries: int = 2
    think: tuple[int, int] = (200, 3_000)  # a client's pause between requests
    persist: int = 30  # one journal write
    mm_effect: int = 10  # the mm's own work per effect
    mm_restart: tuple[int, int] = (25_000, 60_000)  # longer than any delivery: nothing the dead mm sent
    # arrives after its successor started (the transport assumption, see net.py)
    respawn: tuple[int, int] = (5_000, 60_000)  # a dead client is replaced after this long
    partition: tuple[int, int] = (5_000, 90_000)  # how long the mm is cut off from the kernel


@dataclass
class Plan:
    seed: int
    arch: str
    memory: int
    pool: int | None  # the kernel's initial pool in frames (None: the boot map's default)
    mm: dict[str, int]  # watermarks and headroom
    net: NetPlan
    workloads: list[str]
    rates: dict[str, float]  # per-step probability of each step fault
    faults: dict[int, list[str]] = field(default_factory=dict)  # step -> fault kinds
    timing: Timing = field(default_factory=Timing)
    quiesce_every: int = 400  # steps between quiet points (I8 is checked when nothing is in flight)
    zombies: bool = False  # timings that break the transport assumption (see net.py)

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "arch": self.arch, "memory": self.memory, "pool": self.pool, "mm": self.mm,
            "net": {"loss": self.net.loss, "dup": self.net.dup, "delay": self.net.delay},
            "workloads": self.workloads, "rates": self.rates, **({"zombies": True} if self.zombies else {}),
        }


# the mm gives up and comes back sooner than the longest delivery: requests of an mm that gave up, or died,
# may still be executed afterwards ("zombies"); nothing in the protocol fences them
ZOMBIE_TIMING = Timing(mm_timeout=8_000, mm_restart=(2_000, 30_000))


def make_plan(seed: int, steps: int, arch: str | None = None, memory: int = 16 << 20,
              zombies: bool = False) -> Plan:
    rng = child(seed, "plan")
    arch = arch or rng.choice(ARCHES)
    starve = rng.random() < 0.4
    pool = rng.choice((0, 1, 2, 4, 8)) if starve else None
    if starve:
        low = rng.choice((0, 2, 4, 8))
        target = low + rng.randint(0, 24)
        mm = {"low": low, "target": target, "high": target + rng.randint(8, 96), "headroom": rng.randint(0, 8)}
    else:
        mm = {"low": 16, "target": 64, "high": 256, "headroom": 32}
    n = rng.randint(3, 6)
    kinds = list(WORKLOADS)
    rng.shuffle(kinds)
    workloads = [kinds[i % len(kinds)] if i < len(kinds) else rng.choice(WORKLOADS) for i in range(n)]

    def pick(options: tuple[float, ...]) -> float:
        return 0.0 if rng.random() < 0.3 else rng.choice(options)

    net = NetPlan(loss=pick((0.002, 0.01)), dup=pick((0.005, 0.02)), delay=pick((0.01, 0.04)))
    rates = {
        "client_death": pick((1 / 1500, 1 / 500)),
        "mm_crash": pick((1 / 2000, 1 / 600)),
        "lie_client": pick((1 / 300, 1 / 60)),
        "lie_mm": pick((1 / 300, 1 / 60)),
        "partition": pick((1 / 1000, 1 / 400)),
    }
    faults: dict[int, list[str]] = {}
    for kind in STEP_FAULTS:  # fixed order: the plan is the same whatever dicts do
        rate = rates[kind]
        if not rate:
            continue
        step = 0
        while True:
            step += 1 + int(rng.expovariate(rate))
            if step > steps:
                break
            faults.setdefault(step, []).append(kind)
    if rates["mm_crash"] and rng.random() < 0.5:  # crash during start-up, before the journal has much:
        faults.setdefault(rng.randint(2, 30), []).append("mm_crash_startup")  # after its first kernel change
    plan = Plan(seed=seed, arch=arch, memory=memory, pool=pool, mm=mm, net=net, workloads=workloads,
                rates=rates, faults=faults, zombies=zombies)
    if zombies:
        plan.timing = ZOMBIE_TIMING
    if starve:
        plan.rates["starvation"] = 1.0
    return plan
