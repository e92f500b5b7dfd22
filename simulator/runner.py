"""Running seeds: one seed, a sweep of seeds with a summary, and the throughput benchmark.

``run_seed`` runs one world (optionally writing its trace); ``run_seeds``
runs many, stops at the first violation (the run that matters), and adds up
what happened: steps, calls by kind and result, faults by kind. ``bench``
measures simulated calls per second in this process under each way of
checking the state (``simulator/checks.py`` says what runs when).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from simulator import FULL_EVERY
from simulator.world import SimResult, World


def run_seed(seed: int, steps: int = 2000, arch: str | None = None, memory: int = 16 << 20,
             bug: str | None = None, check_every: int = FULL_EVERY, trace_path: str | None = None,
             zombies: bool = False, incremental: bool = True) -> SimResult:
    """Run one seed; with ``trace_path`` every call and fault goes there as JSON lines. ``check_every``
    and ``incremental``: which state checks run when (``World``, ``simulator/checks.py``)."""
    if trace_path is None:
        return World(seed, steps, arch, memory, bug, check_every, zombies=zombies, incremental=incremental).run()
    with open(trace_path, "w", encoding="ascii", newline="\n") as sink:
        return World(seed, steps, arch, memory, bug, check_every, trace=sink, zombies=zombies,
                     incremental=incremental).run()


@dataclass
class Summary:
    seeds: int = 0
    steps: int = 0
    calls: int = 0
    quiet_points: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    faults: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)
    archs: Counter = field(default_factory=Counter)
    failed: SimResult | None = None

    def add(self, r: SimResult) -> None:
        self.seeds += 1
        self.steps += r.steps
        self.calls += r.calls
        self.quiet_points += r.quiet_points
        self.sim_seconds += r.sim_seconds
        self.wall_seconds += r.wall_seconds
        self.faults.update(r.faults)
        self.stats.update(r.stats)
        self.archs[r.plan["arch"]] += 1
        if r.violation is not None and self.failed is None:
            self.failed = r


def run_seeds(seeds: Iterable[int], steps: int = 2000, arch: str | None = None, memory: int = 16 << 20,
              bug: str | None = None, check_every: int = FULL_EVERY,
              on_result: Callable[[SimResult], None] | None = None, zombies: bool = False,
              incremental: bool = True) -> Summary:
    """Run seeds in order until one violates an invariant (it is ``Summary.failed``)."""
    out = Summary()
    for seed in seeds:
        r = run_seed(seed, steps, arch, memory, bug, check_every, zombies=zombies, incremental=incremental)
        out.add(r)
        if on_result is not None:
            on_result(r)
        if not r.ok:
            break
    return out


# the ways of checking the state the benchmark measures: (label, check_every, incremental); the second is
# the default of ``mmsim sim`` and ``run_seed``
BENCH_SETTINGS = (
    ("full_every_step", 1, False),
    (f"incremental_every_step_full_every_{FULL_EVERY}_steps", FULL_EVERY, True),
    ("incremental_every_step_full_at_quiet_points", 0, True),
    ("none_between_quiet_points", 0, False),
)


def bench(seconds: float = 3.0, steps: int = 2000) -> dict:
    """Simulated calls per second in this process, a quarter of the time under each of ``BENCH_SETTINGS``:

    - ``full_every_step``: the full recomputation of every state check after every step that changed the
      kernel or the mm's view;
    - ``incremental_every_step_full_every_N_steps`` (the default): the exact incremental check after every
      such step, the full recomputation every N steps and at every quiet point;
    - ``incremental_every_step_full_at_quiet_points``: the same, the full recomputation at quiet points only;
    - ``none_between_quiet_points``: the full recomputation at quiet points only, nothing between (the
      floor: what the simulation itself costs).

    The per-call checks (I6, I9-I12, write-ahead) always run. Rates are per second of this process's CPU
    time (one core, whatever else the machine runs); wall-clock rates too."""
    out: dict = {"target_calls_per_s": 20_000, "steps_per_seed": steps}
    for label, check_every, incremental in BENCH_SETTINGS:
        calls = steps_done = seeds = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        seed = 0
        while True:
            r = run_seed(seed, steps, check_every=check_every, incremental=incremental)
            calls += r.calls
            steps_done += r.steps
            seeds += 1
            seed += 1
            if not r.ok:
                raise RuntimeError(f"seed {r.seed} violated {r.violation.invariant}: {r.violation.message}")
            cpu = time.process_time() - cpu0
            if cpu >= seconds / len(BENCH_SETTINGS):
                break
        wall = time.perf_counter() - wall0
        out[f"calls_per_s_checks_{label}"] = round(calls / cpu)
        out[f"calls_per_wall_s_checks_{label}"] = round(calls / wall)
        out[f"steps_per_s_checks_{label}"] = round(steps_done / cpu)
        out[f"seeds_checks_{label}"] = seeds
    default = BENCH_SETTINGS[1][0]
    out["meets_target_with_checks_every_step"] = out[f"calls_per_s_checks_{default}"] >= out["target_calls_per_s"]
    out["meets_target_with_full_checks_every_step"] = (out["calls_per_s_checks_full_every_step"]
                                                       >= out["target_calls_per_s"])
    return out
