"""Running seeds: one seed, a sweep of seeds with a summary, determinism checks, the view of a failing
seed, and the benchmarks.

``run_seed`` runs one world (optionally writing its trace); ``run_seeds`` runs
many, stops at the first violation (the run that matters), replays that seed
twice to check the two traces are the same (their SHA-256), and adds up what
happened: steps, client operations, calls by kind and result, faults by kind.
``determinism`` runs each seed of a range twice and compares the traces.
``record_view`` replays a seed with ``mmsim.view.Recorder`` and writes the
HTML view of its run. ``bench`` measures client operations per CPU second
under each way of checking the state (``simulator/checks.py`` says what runs
when); ``detection`` counts how many seeds find each planted bug, and how many
it takes, swarm against the fixed mix.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from simulator import FULL_EVERY
from simulator.trace import HashSink
from simulator.world import SimResult, World


def run_seed(seed: int, steps: int = 2000, arch: str | None = None, memory: int = 16 << 20,
             bug: str | None = None, check_every: int = FULL_EVERY, trace_path: str | None = None,
             zombies: bool = False, incremental: bool = True, mode: str = "swarm", wal_check: bool = True,
             trace_hash: bool = False) -> SimResult:
    """Run one seed; with ``trace_path`` every call and fault goes there as JSON lines (``trace_hash``: only
    their SHA-256 is kept, in ``SimResult.trace_hash``). ``check_every`` and ``incremental``: which state
    checks run when (``World``, ``simulator/checks.py``)."""
    kw: dict[str, Any] = dict(check_every=check_every, zombies=zombies, incremental=incremental, mode=mode,
                              wal_check=wal_check)
    if trace_path is not None:
        with open(trace_path, "w", encoding="ascii", newline="\n") as sink:
            return World(seed, steps, arch, memory, bug, trace=sink, **kw).run()
    if trace_hash:
        h = HashSink()
        r = World(seed, steps, arch, memory, bug, trace=h, **kw).run()  # type: ignore[arg-type]
        r.trace_hash = h.hexdigest()
        return r
    return World(seed, steps, arch, memory, bug, **kw).run()


@dataclass
class Summary:
    seeds: int = 0
    steps: int = 0
    ops: int = 0
    quiet_points: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    liveness_steps: int = 0  # the most any seed took
    faults: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)
    archs: Counter = field(default_factory=Counter)
    families: Counter = field(default_factory=Counter)  # seeds each family was on in
    failed: SimResult | None = None
    last_seed: int | None = None

    def add(self, r: SimResult) -> None:
        self.seeds += 1
        self.steps += r.steps
        self.ops += r.ops
        self.quiet_points += r.quiet_points
        self.sim_seconds += r.sim_seconds
        self.wall_seconds += r.wall_seconds
        self.cpu_seconds += r.cpu_seconds
        self.liveness_steps = max(self.liveness_steps, r.liveness_steps or 0)
        self.faults.update(r.faults)
        self.stats.update(r.stats)
        self.archs[r.plan["arch"]] += 1
        self.families.update(r.plan["families"].keys())
        self.last_seed = r.seed
        if r.violation is not None and self.failed is None:
            self.failed = r

    def to_json(self) -> dict[str, Any]:
        f = self.failed
        return {
            "seeds": self.seeds, "steps": self.steps, "client_ops": self.ops, "quiet_points": self.quiet_points,
            "sim_seconds": round(self.sim_seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3),
            "client_ops_per_cpu_s": round(self.ops / self.cpu_seconds) if self.cpu_seconds else None,
            "max_liveness_steps": self.liveness_steps, "faults": dict(sorted(self.faults.items())),
            "archs": dict(self.archs), "families": dict(self.families),
            "calls": [{"to": t, "call": c, "outcome": o, "count": n} for (t, c, o), n in sorted(self.stats.items())],
            "violation": None if f is None or f.violation is None else {
                "seed": f.seed, "invariant": f.violation.invariant, "message": f.violation.message,
                "step": f.violation.step, "t_us": f.violation.t, "tail": f.tail,
                "deterministic": confirmed(f), "trace_sha256": f.replays[:1]},
        }


def confirmed(r: SimResult) -> bool | None:
    """Did the two replays of a failing seed write the same trace (and fail the same way)? None: not replayed."""
    if len(r.replays) < 2:
        return None
    return r.replays[0] == r.replays[1] and r.replays[0] != "differs"


def replay_twice(r: SimResult, steps: int, **kw: Any) -> None:
    """Run a failing seed twice more, hashing the traces: the runs must be the same, and fail the same way."""
    hashes = []
    for _ in range(2):
        again = run_seed(r.seed, steps, bug=r.bug, trace_hash=True, **kw)
        hashes.append(again.trace_hash if again.violation == r.violation else "differs")
    r.replays = hashes  # type: ignore[assignment]


def run_seeds(seeds: Iterable[int], steps: int = 2000, arch: str | None = None, memory: int = 16 << 20,
              bug: str | None = None, check_every: int = FULL_EVERY,
              on_result: Callable[[SimResult], None] | None = None, zombies: bool = False,
              incremental: bool = True, mode: str = "swarm", confirm: bool = True) -> Summary:
    """Run seeds in order until one violates an invariant (it is ``Summary.failed``; with ``confirm`` it is
    replayed twice and the traces compared)."""
    out = Summary()
    kw: dict[str, Any] = dict(arch=arch, memory=memory, check_every=check_every, zombies=zombies,
                              incremental=incremental, mode=mode)
    for seed in seeds:
        r = run_seed(seed, steps, bug=bug, **kw)
        out.add(r)
        if on_result is not None:
            on_result(r)
        if not r.ok:
            if confirm:
                replay_twice(r, steps, **kw)
            break
    return out


def determinism(seeds: Iterable[int], steps: int = 2000,
                on_result: Callable[[int, str, str], None] | None = None, **kw: Any) -> list[tuple[int, str, str]]:
    """Run each seed twice, hashing its trace; the seeds whose two traces differ (seed, hash, hash)."""
    bad = []
    for seed in seeds:
        a = run_seed(seed, steps, trace_hash=True, **kw).trace_hash or ""
        b = run_seed(seed, steps, trace_hash=True, **kw).trace_hash or ""
        if on_result is not None:
            on_result(seed, a, b)
        if a != b:
            bad.append((seed, a, b))
    return bad


def record_view(seed: int, path: str, steps: int = 2000, snapshots: int = 40, trace_path: str | None = None,
                **kw: Any) -> SimResult:
    """Replay ``seed`` with a view recorder (a snapshot every steps/``snapshots`` steps, at the violation and at
    the end) and write the HTML view of its run to ``path`` (and its trace to ``trace_path``)."""
    from mmsim.view import Recorder

    rec = Recorder(title=f"mmsim sim seed {seed}{' --bug ' + kw['bug'] if kw.get('bug') else ''}",
                   source=f"mmsim sim --seed {seed} --steps {steps}")
    every = max(1, steps // max(1, snapshots))
    bug = kw.pop("bug", None)
    arch, memory = kw.pop("arch", None), kw.pop("memory", 16 << 20)
    if trace_path is not None:
        with open(trace_path, "w", encoding="ascii", newline="\n") as sink:
            r = World(seed, steps, arch, memory, bug, trace=sink, recorder=rec, record_every=every, **kw).run()
    else:
        r = World(seed, steps, arch, memory, bug, recorder=rec, record_every=every, **kw).run()
    rec.write(path)
    return r


# ---- benchmarks ---------------------------------------------------------------------------------------

# the ways of checking the state the benchmark measures: (label, check_every, incremental); the second is
# the default of ``mmsim sim`` and ``run_seed``
BENCH_SETTINGS = (
    ("full_every_step", 1, False),
    (f"incremental_every_step_full_every_{FULL_EVERY}_steps", FULL_EVERY, True),
    ("incremental_every_step_full_at_quiet_points", 0, True),
    ("none_between_quiet_points", 0, False),
)


def bench(seconds: float = 3.0, steps: int = 2000) -> dict:
    """Client operations per CPU second in this process, a quarter of the time under each of
    ``BENCH_SETTINGS``:

    - ``full_every_step``: the full recomputation of every state check after every step that changed the
      kernel or the mm's view;
    - ``incremental_every_step_full_every_N_steps`` (the default): the exact incremental check after every
      such step, the full recomputation every N steps and at every quiet point;
    - ``incremental_every_step_full_at_quiet_points``: the same, the full recomputation at quiet points only;
    - ``none_between_quiet_points``: the full recomputation at quiet points only, nothing between (the
      floor: what the simulation itself costs).

    A client operation is one request of a workload answered (its resends, keepalives, lies and the mm's own
    kernel calls are not counted). The per-call checks (I6, I8's settlements, I9-I12, write-ahead) always
    run. Rates are per second of this process's CPU time (one core, whatever else the machine runs)."""
    out: dict = {"steps_per_seed": steps}
    for label, check_every, incremental in BENCH_SETTINGS:
        ops = steps_done = seeds = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        seed = 0
        while True:
            r = run_seed(seed, steps, check_every=check_every, incremental=incremental)
            ops += r.ops
            steps_done += r.steps
            seeds += 1
            seed += 1
            if not r.ok:
                raise RuntimeError(f"seed {r.seed} violated {r.violation.invariant}: {r.violation.message}")
            cpu = time.process_time() - cpu0
            if cpu >= seconds / len(BENCH_SETTINGS):
                break
        wall = time.perf_counter() - wall0
        out[f"ops_per_s_checks_{label}"] = round(ops / cpu)
        out[f"ops_per_wall_s_checks_{label}"] = round(ops / wall)
        out[f"steps_per_s_checks_{label}"] = round(steps_done / cpu)
        out[f"seeds_checks_{label}"] = seeds
    return out


def detection(bugs: Iterable[str], most: int = 20, steps: int = 2000,
              on_result: Callable[[str, str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """For each planted bug, how seeds 0..``most``-1 find it with swarm testing and with the fixed mix of every
    fault family at its low rate: ``first`` (the seeds run until the first finding, None: none), ``found`` (how
    many of them find it) and ``per_find`` (seeds needed per finding: ``most`` / ``found``, None: none found)."""
    out: dict[str, dict[str, Any]] = {}
    for bug in bugs:
        out[bug] = {}
        for mode in ("swarm", "fixed"):
            hits = [s for s in range(most) if not run_seed(s, steps, bug=bug, mode=mode).ok]
            got = {"first": hits[0] + 1 if hits else None, "found": len(hits), "seeds": most,
                   "per_find": round(most / len(hits), 2) if hits else None}
            out[bug][mode] = got
            if on_result is not None:
                on_result(bug, mode, got)
    return out
