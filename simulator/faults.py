"""The seeded plan of one run: machine, workloads, timings, and which fault families strike how often.

Everything random about a run is drawn here or from other children of the
same seed (``child(seed, purpose)``), never from a global generator.

Fault *families* (``FAMILIES``), each one kind of trouble:

- ``client_death``: a client process vanishes (at a step, whatever its
  requests are doing, or just as the mm sends the kernel a map or unmap for
  one of its requests); a new client replaces it later.
- ``mm_crash``: the mm loses everything but its journal and restarts after a
  delay. Where it dies is drawn per crash (``CRASH_POINTS``): at a step; as a
  kernel reply to a call that changes something arrives (the kernel did it,
  the mm never hears); with a journal batch written but not committed; right
  after a commit, before what it released is sent (the intent's kernel call,
  the reply); about to send a client its reply.
- ``startup_crash``: the mm dies once, during start-up, as the kernel's reply
  to its first call that changes something arrives (a donation, a process),
  before its journal holds much; it must settle with the kernel from (nearly)
  nothing.
- ``recovery_crash``: the mm dies during its next recovery (after a few of
  the kernel's replies to it); the next recovery settles what it left.
- ``partition``: the mm and the kernel cannot reach each other for a while
  (the kernel is lost to the mm: its calls time out, later ones fail fast,
  its ticks probe until the kernel answers, then it settles with it).
- ``lost_after_exec``: the same, starting just after the kernel carried out a
  call of the mm that changes something, so its reply is lost and the mm
  cannot tell whether it happened (the kind of call is drawn each time: map,
  unmap, donate, reclaim, proc_create, proc_destroy).
- ``lost_after_shared``: the same, just after the kernel carried out a map or
  unmap of frames mapped more than once (an offer accepted, a shared
  allocation freed): where settling what happened is hardest, since several
  pending intents may name the same frames.
- ``recovery_loss``: the same, starting just as a recovery begins (the
  kernel goes away and comes back during it).
- ``reply_loss``: a kernel reply to the mm is lost after the kernel executed
  the call (any call the mm makes; the mm's resend gets the cached reply).
- ``net_loss``, ``net_dup``, ``net_delay``: any message lost, delivered
  twice, or delayed (see ``net``).
- ``reorder``: the mm's kernel requests and their replies take widely
  different times, so the several the mm has in flight arrive out of order.
- ``lie_client``, ``lie_mm``: forged requests (``lies``).
- ``starvation``: a tiny initial kernel pool, low watermarks and small
  kernel quotas, so ENOMEM (the pool's, and a process's own quota) and the
  mm's donate-and-retry path run all the time.

Two ways to mix them (``MODES``):

- ``swarm`` (the default; "swarm testing", as FoundationDB and TigerBeetle's
  VOPR do): each seed switches each family on or off and draws its rate from
  the family's range, and draws its own workload mix (how many clients, which
  workloads). A run with a few families on, hard, reaches deeper into each
  than a run with all of them a little.
- ``fixed``: every family on at its low rate, one client of each workload.
  (``mmsim bench sim`` compares the two at finding planted bugs.)
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

from simulator.net import NetPlan

ARCHES = ("i686", "i686-pae", "x86_64")
WORKLOADS = ("steady", "sparse", "kobjects", "sharer")
MODES = ("swarm", "fixed")
STEP_FAULTS = ("client_death", "mm_crash", "recovery_crash", "partition", "lost_after_exec", "lost_after_shared",
               "recovery_loss", "lie_client", "lie_mm")  # drawn per step
CRASH_POINTS = ("step", "kernel_reply", "journal", "commit", "client_reply")
AFTER_EXEC = ("map", "unmap", "donate", "reclaim", "proc_create", "proc_destroy")


def child(seed: int, purpose: str) -> random.Random:
    """A generator for one purpose, derived from the seed alone (str seeds hash with SHA-512, not ``hash``)."""
    return random.Random(f"mmsim-sim/{seed}/{purpose}")


@dataclass(frozen=True)
class Family:
    name: str
    unit: str  # what the rate is a probability of
    low: float  # the range a swarm seed draws its rate from (log-uniform)
    high: float
    fixed: float  # the rate in the fixed mix
    on: float = 0.5  # the chance a swarm seed switches it on


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("client_death", "per step", 1 / 3000, 1 / 300, 1 / 3000),
    Family("mm_crash", "per step", 1 / 4000, 1 / 400, 1 / 4000),
    Family("recovery_crash", "per step", 1 / 4000, 1 / 400, 1 / 4000),
    Family("startup_crash", "once", 1.0, 1.0, 1.0),
    Family("partition", "per step", 1 / 3000, 1 / 300, 1 / 3000),
    Family("lost_after_exec", "per step", 1 / 3000, 1 / 200, 1 / 3000),
    Family("lost_after_shared", "per step", 1 / 3000, 1 / 150, 1 / 3000),
    Family("recovery_loss", "per step", 1 / 4000, 1 / 400, 1 / 4000),
    Family("reply_loss", "per kernel reply to the mm", 0.002, 0.05, 0.002),
    Family("net_loss", "per message", 0.001, 0.02, 0.001),
    Family("net_dup", "per message", 0.002, 0.03, 0.002),
    Family("net_delay", "per message", 0.005, 0.05, 0.005),
    Family("reorder", "per mm-kernel message", 0.05, 0.6, 0.05),
    Family("lie_client", "per step", 1 / 600, 1 / 40, 1 / 600),
    Family("lie_mm", "per step", 1 / 600, 1 / 40, 1 / 600),
    Family("starvation", "on/off", 1.0, 1.0, 1.0, on=0.4),
)}


@dataclass(frozen=True)
class Timing:
    """Simulated durations in microseconds. The lease is short so that deaths expire within a run."""

    lease: int = 80_000
    kernel_tick: int = 10_000  # the kernel expires leases this often
    mm_tick: int = 10_000  # the mm's housekeeping tick (the kernel's health, events, watermarks)
    keepalive: int = 20_000  # each live client pings the kernel (for each identity) this often
    client_timeout: int = 40_000  # a client resends the same bytes after this long (Lazy Pirate); its
    client_retries: int = 2  # whole window outlasts an mm restart, as the real clients' 3 x 2 s do
    mm_timeout: int = 30_000  # the mm's kernel calls: resent after this long (>= the longest delivery,
    # so when the mm gives up no copy of its request is still on the way: see net.NetPlan)
    mm_retries: int = 2
    probe_timeout: int = 8_000  # a probe of a lost kernel (never resent; read-only, so it may be late)
    think: tuple[int, int] = (200, 3_000)  # a client's pause between requests
    persist: int = 30  # one journal write (a batch) takes this long to commit
    mm_wake: int = 10  # what arrives at the mm within this long is handled in one wake-up
    mm_restart: tuple[int, int] = (32_000, 60_000)  # longer than any delivery: nothing the dead mm sent
    # arrives after its successor started (the transport assumption, see net.py)
    respawn: tuple[int, int] = (5_000, 60_000)  # a dead client is replaced after this long
    partition: tuple[int, int] = (5_000, 200_000)  # how long the mm is cut off from the kernel


# the mm gives up and comes back sooner than the longest delivery: requests of an mm that gave up, or died,
# may still be executed afterwards ("zombies"); nothing in the protocol fences them
ZOMBIE_TIMING = Timing(mm_timeout=8_000, mm_restart=(2_000, 30_000))


@dataclass
class Plan:
    seed: int
    mode: str
    arch: str
    memory: int
    pool: int | None  # the kernel's initial pool in frames (None: the boot map's default)
    mm: dict[str, int]  # watermarks and headroom
    kernel_quota: int | None  # kernel frames per client (None: the mm's default)
    room: int  # clients the mm's default quotas leave room for
    compact_every: int  # journal records between the mm's snapshots
    net: NetPlan
    workloads: list[str]
    families: dict[str, float]  # family -> rate (0: off)
    faults: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # step -> (family, variant)
    timing: Timing = field(default_factory=Timing)
    quiesce_every: int = 400  # steps between quiet points (I8 is checked when nothing is in flight)
    zombies: bool = False  # timings that break the transport assumption (see net.py)

    def on(self, family: str) -> bool:
        return self.families.get(family, 0.0) > 0

    def describe(self) -> dict[str, Any]:
        """The trace header's description of the run (only seed-determined values)."""
        return {
            "seed": self.seed, "mode": self.mode, "arch": self.arch, "memory": self.memory, "pool": self.pool,
            "mm": self.mm, "kernel_quota": self.kernel_quota, "room": self.room, "mm_retries": self.timing.mm_retries, "workloads": self.workloads,
            "families": {k: round(v, 6) for k, v in self.families.items() if v},
            **({"zombies": True} if self.zombies else {}),
        }


def _draw_rate(rng: random.Random, fam: Family) -> float:
    if fam.low == fam.high:
        return fam.low
    return math.exp(rng.uniform(math.log(fam.low), math.log(fam.high)))


def make_plan(seed: int, steps: int, arch: str | None = None, memory: int = 16 << 20, zombies: bool = False,
              mode: str = "swarm") -> Plan:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    rng = child(seed, "plan")
    arch = arch or rng.choice(ARCHES)
    families: dict[str, float] = {}
    for name, fam in FAMILIES.items():  # (fixed order: the plan is the same whatever dicts do)
        if mode == "fixed":
            families[name] = fam.fixed
        else:
            on = rng.random() < fam.on
            rate = _draw_rate(rng, fam)  # drawn either way: switching one family does not move the others
            families[name] = rate if on else 0.0
    starve = families["starvation"] > 0
    kquota = None
    if mode == "fixed":
        pool, mm, kquota = 8, {"low": 8, "target": 32, "high": 128, "headroom": 4}, 32
    elif starve:
        pool = rng.choice((0, 1, 2, 4, 8))
        low = rng.choice((0, 2, 4, 8))
        target = low + rng.randint(0, 24)
        mm = {"low": low, "target": target, "high": target + rng.randint(8, 96), "headroom": rng.randint(0, 8)}
        kquota = rng.choice((None, 12, 16, 24, 32))
    else:
        pool, mm = None, {"low": 16, "target": 64, "high": 256, "headroom": 32}
    if mode == "fixed":
        workloads = list(WORKLOADS)
    else:
        kinds = [w for w in WORKLOADS if rng.random() < 0.6] or [rng.choice(WORKLOADS)]
        n = rng.randint(max(2, len(kinds)), 6)
        rng.shuffle(kinds)
        workloads = [kinds[i % len(kinds)] for i in range(n)]
    compact_every = rng.randint(10, 150)
    mm_retries = 2 if mode == "fixed" else rng.choice((0, 1, 2))  # the mm's resends before the kernel is lost
    reorder = families["reorder"]
    net = NetPlan(loss=families["net_loss"], dup=families["net_dup"], delay=families["net_delay"],
                  reply_loss=families["reply_loss"], jitter=reorder)
    faults: dict[int, list[tuple[str, str]]] = {}
    for kind in STEP_FAULTS:
        rate = families[kind]
        if not rate:
            continue
        step = 0
        while True:
            step += 1 + int(rng.expovariate(rate))
            if step > steps:
                break
            faults.setdefault(step, []).append((kind, _variant(rng, kind)))
    if families["startup_crash"]:  # armed at once: the first reply to a changing call
        faults.setdefault(1, []).append(("mm_crash", "kernel_reply"))
    plan = Plan(seed=seed, mode=mode, arch=arch, memory=memory, pool=pool, mm=mm, kernel_quota=kquota,
                room=len(workloads) + 2,
                compact_every=compact_every, net=net, workloads=workloads, families=families, faults=faults,
                zombies=zombies)
    t = ZOMBIE_TIMING if zombies else Timing()
    if not zombies:  # the transport assumption: the mm gives up, and comes back, later than any delivery
        longest = net.max_delay + 1_000
        t = Timing(mm_timeout=max(t.mm_timeout, longest),
                   mm_restart=(max(t.mm_restart[0], longest), max(t.mm_restart[1], longest + 20_000)))
    t = dataclasses.replace(t, mm_retries=mm_retries)
    plan.timing = t
    return plan


def _variant(rng: random.Random, kind: str) -> str:
    if kind == "mm_crash":
        return rng.choice(CRASH_POINTS)
    if kind == "lost_after_exec":
        return rng.choice(AFTER_EXEC)
    if kind == "lost_after_shared":
        return rng.choice(("map_shared", "unmap_shared"))
    if kind == "client_death":
        return "in_request" if rng.random() < 0.3 else "now"
    return ""
