"""Swarm runs: many seeds in ranges on a ``concurrent.futures`` executor, failures fingerprinted, probes added up.

A *range* (``run_range``) is the unit of work: hundreds of consecutive seeds
of one configuration (``SwarmConfig``: steps, mode, arch, memory, planted
bug, ...) run in one worker process, returning a small summary: seeds run
and failed, client operations and steps, CPU seconds, the probes hit
(``simulator.probes``; per probe the hits and the number of seeds that hit
it) and each failing seed with its fingerprint. Passing seeds are only
counted. Any ``concurrent.futures.Executor`` runs ranges: a local
``ProcessPoolExecutor`` (``local_executor``: spawn context, one worker per
core, workers recycled, ``PYTHONHASHSEED`` pinned) or a Dask cluster's
(``dask_executor``: ``distributed.Client(address).get_executor()``, the
``mmsim[dask]`` extra). ``Swarm.run`` keeps a bounded number of ranges in
flight, folds each finished one into the seed database (``seeddb``) in the
coordinating process, and can be stopped between ranges (Ctrl-C): what
finished is kept, and running the same command again skips it.

**Fingerprint** of a failing seed (what de-duplicates failures across seeds,
``fingerprint``): the invariant's name, the *site* (the call in progress
when the violation was flagged, when one is: ``kernel.<call>`` for a request
the kernel was handling, ``client.<call>`` for an answer a client was
checking; ``liveness`` once every fault has stopped; ``-`` otherwise: the mm's
wake-ups, commits and ticks, the periodic checks, quiet points), and the
message normalised (``normalise``: client names become ``cN``, hexadecimal
and decimal numbers ``#``, bracketed lists ``[..]``), so the same defect
reached through different frames, addresses, clients and counts gets one
fingerprint. Its id is the first 12 hex digits of the SHA-256 of
``invariant|site|message``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from simulator import FULL_EVERY
from simulator.net import Msg

RANGE = 200  # seeds per range by default (a task per seed would cost more to ship than to run)
TASKS_PER_CHILD = 20  # ranges a local worker process runs before it is replaced (memory, leaks)


# ---- configuration -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SwarmConfig:
    """Everything besides the seed that decides a run (so a seed of a configuration replays exactly)."""

    steps: int = 2000
    mode: str = "swarm"
    arch: str | None = None  # None: each seed picks
    memory: int = 16 << 20
    bug: str | None = None
    zombies: bool = False
    check_every: int = FULL_EVERY

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SwarmConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def sim_options(self) -> str:
        """The ``mmsim sim`` options that run a seed of this configuration."""
        out = f"--steps {self.steps}"
        if self.arch:
            out += f" --arch {self.arch}"
        if self.memory != 16 << 20:
            out += f" --memory {self.memory // (1 << 20)}MiB"
        if self.mode != "swarm":
            out += f" --mode {self.mode}"
        if self.bug:
            out += f" --bug {self.bug}"
        if self.zombies:
            out += " --zombies"
        if self.check_every != FULL_EVERY:
            out += f" --check-every {self.check_every}"
        return out

    def replay_command(self, seed: int) -> str:
        return f"mmsim sim --seed {seed} {self.sim_options()}"

    def world_kw(self) -> dict[str, Any]:
        return dict(arch=self.arch, memory=self.memory, bug=self.bug, zombies=self.zombies,
                    check_every=self.check_every, mode=self.mode)


# ---- fingerprints --------------------------------------------------------------------------------------

_NAME = re.compile(r"\b(c)\d+(-peer)?\b")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_NUM = re.compile(r"(?<![A-Za-z_])-?\d+(\.\d+)?")
_LIST = re.compile(r"\[[^\[\]]*\]|\{[^{}]*\}|\([^()]*\d[^()]*\)")


def normalise(message: str) -> str:
    """The message with what varies between seeds of one defect replaced: client names, numbers, lists."""
    s = _NAME.sub(lambda m: "cN" + (m.group(2) or ""), message)
    s = _HEX.sub("#", s)
    s = _NUM.sub("#", s)
    for _ in range(4):  # nested brackets, innermost first
        t = _LIST.sub(lambda m: m.group(0)[0] + ".." + m.group(0)[-1], s)
        if t == s:
            break
        s = t
    return " ".join(s.split())


@dataclass(frozen=True)
class Fingerprint:
    invariant: str
    site: str
    message: str  # normalised

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.invariant}|{self.site}|{self.message}".encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "invariant": self.invariant, "site": self.site, "message": self.message}


def fingerprint(violation: Any, site: str) -> Fingerprint:
    return Fingerprint(violation.invariant, site, normalise(violation.message))


def site_of(event: tuple[Any, tuple[Any, ...]] | None) -> str:
    """The call in progress during the step that dispatched ``event`` (the clock's ``(function, arguments)``;
    a delivery's argument is the message: see the module docstring)."""
    if event is None or not event[1] or not isinstance(event[1][0], Msg):
        return "-"
    msg = event[1][0]
    dst = msg.dst[0]
    if dst == "kernel" and not msg.reply:
        return f"kernel.{msg.call}"
    if dst == "c" and msg.reply:
        return f"client.{msg.call}"
    return "-"


def drive(world: Any, cap: int | None = None) -> str | None:
    """Run ``world`` as ``World.run`` does (the steps, then the liveness phase), noting the call in progress
    at each step; the site of its violation (None: none). ``cap``: stop after that many steps without a
    violation (a candidate run while shrinking that cannot fail as the original did any more)."""
    heap = world.clock.heap
    site = None
    limit = world.steps if cap is None else min(world.steps, cap)
    while world.step < limit and not world.violations:
        nxt = (heap[0][2], heap[0][3]) if heap else None
        world.one_step()
        if world.violations:
            site = site_of(nxt)
    if not world.violations and world.step >= world.steps:
        world.liveness()
        if world.violations:
            site = "liveness"
    return site if world.violations else None


# ---- one range (in a worker) ---------------------------------------------------------------------------

@dataclass
class RangeResult:
    config: dict[str, Any]
    start: int
    count: int
    done: int = 0  # seeds run (fewer than count only if the range was stopped)
    failed: int = 0
    steps: int = 0
    ops: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    probes: dict[str, list[int]] = field(default_factory=dict)  # name -> [hits, seeds that hit it]
    failures: list[dict[str, Any]] = field(default_factory=list)  # seed, fingerprint, message, step
    worker: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RangeResult:
        return cls(**d)


def run_one(seed: int, config: SwarmConfig) -> tuple[Any, str | None]:
    """One seed of ``config``: the world after its run, and the site of its violation (None: none)."""
    from simulator.world import World

    w = World(seed, config.steps, **config.world_kw())
    return w, drive(w)


def run_range(config: dict[str, Any], start: int, count: int) -> dict[str, Any]:
    """Seeds ``start`` .. ``start + count - 1`` of ``config`` (a ``SwarmConfig`` as JSON): the range's summary
    (``RangeResult`` as JSON). A picklable top-level function: what a worker runs."""
    from simulator.probes import seed_probes

    cfg = SwarmConfig.from_json(config)
    out = RangeResult(config=cfg.to_json(), start=start, count=count, worker=f"{os.uname().nodename}:{os.getpid()}")
    hits: Counter = Counter()
    seeds_hit: Counter = Counter()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for seed in range(start, start + count):
        w, site = run_one(seed, cfg)
        out.done += 1
        out.steps += w.step
        out.ops += w.client_ops
        got = seed_probes(w)
        hits.update(got)
        seeds_hit.update(got.keys())
        if site is not None:
            v = w.violations[0]
            fp = fingerprint(v, site)
            out.failed += 1
            out.failures.append({"seed": seed, "fingerprint": fp.to_json(), "invariant": v.invariant,
                                 "message": v.message, "step": v.step})
    out.cpu = time.process_time() - cpu0
    out.wall = time.perf_counter() - wall0
    out.probes = {k: [hits[k], seeds_hit[k]] for k in sorted(hits)}
    return out.to_json()


def ranges(start: int, count: int, size: int, skip: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """Split seeds ``start`` .. ``start + count - 1`` into ranges of ``size`` (the last may be shorter), leaving
    out those already run (``skip``: (start, count) of ranges done)."""
    done: set[tuple[int, int]] = set(skip)
    out = []
    s, end = start, start + count
    while s < end:
        n = min(size, end - s)
        if (s, n) not in done:
            out.append((s, n))
        s += n
    return out


# ---- executors ------------------------------------------------------------------------------------------

def local_executor(workers: int | None = None, tasks_per_child: int = TASKS_PER_CHILD) -> Any:
    """A process pool on this machine: ``workers`` processes (default: one per core), started with the
    spawn method and ``PYTHONHASHSEED=0`` (the environment they are spawned with; workers are replaced
    after ``tasks_per_child`` ranges, so the variable stays set while the pool lives: ``pinned_hash_seed``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = workers or os.cpu_count() or 1
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               max_tasks_per_child=tasks_per_child, initializer=_worker_init)


def _worker_init() -> None:
    """A local worker leaves Ctrl-C to the coordinator (which stops it), instead of dying mid-range with a
    traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class pinned_hash_seed:
    """``PYTHONHASHSEED=0`` in this process's environment while the block runs (processes spawned meanwhile
    inherit it); the previous value is put back afterwards."""

    def __enter__(self) -> None:
        self.old = os.environ.get("PYTHONHASHSEED")
        os.environ["PYTHONHASHSEED"] = "0"

    def __exit__(self, *exc: Any) -> None:
        if self.old is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = self.old


def dask_client(address: str) -> Any:
    """A ``distributed.Client`` of the Dask scheduler at ``address`` (the ``mmsim[dask]`` extra)."""
    try:
        from distributed import Client
    except ImportError:
        raise RuntimeError("--scheduler needs Dask's distributed scheduler: pip install 'mmsim[dask]'") from None
    return Client(address, timeout="10s")


def dask_executor(client: Any) -> Any:
    """The ``concurrent.futures`` executor of a Dask client (ranges run on its workers)."""
    return client.get_executor(pure=False)


def dask_workers(client: Any) -> int:
    """Threads across the cluster's workers (how many ranges may run at once)."""
    try:
        return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
    except Exception:  # noqa: BLE001 - a scheduler that does not say: one at a time is still right
        return 1


# ---- the coordinator -----------------------------------------------------------------------------------

@dataclass
class Progress:
    total: int  # seeds asked for
    skipped: int = 0  # seeds a database already had
    done: int = 0
    failed: int = 0
    ops: int = 0
    ranges_done: int = 0
    fingerprints: set[str] = field(default_factory=set)


def run_swarm(config: SwarmConfig, todo: list[tuple[int, int]], executor: Any, in_flight: int,
              on_range: Callable[[RangeResult], None]) -> Iterator[RangeResult]:
    """Run the ranges ``todo`` on ``executor`` with at most ``in_flight`` submitted at once, in order of
    submission; yields each finished range (after ``on_range``). Stopping the generator (or Ctrl-C in it)
    cancels what has not started."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending = list(todo)
    running: dict[Any, tuple[int, int]] = {}
    cfg = config.to_json()
    try:
        while pending or running:
            while pending and len(running) < in_flight:
                s, n = pending.pop(0)
                running[executor.submit(run_range, cfg, s, n)] = (s, n)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                running.pop(fut)
                r = RangeResult.from_json(fut.result())
                on_range(r)
                yield r
    finally:
        for fut in running:
            fut.cancel()
