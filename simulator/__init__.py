"""Deterministic simulation of the whole system, with seeded faults and replay (FoundationDB / VOPR style).

The unchanged sans-I/O cores (``KernelService``/``KernelCore``,
``MMService``/``MMCore``) and the real workload generators run in one
process on a simulated clock, talking in real wire bytes over a simulated
network; every random choice comes from the seed, so a seed replays exactly.

- ``clock``: simulated time and the event queue.
- ``net``: the message layer (loss, duplication, delay; the transport assumption).
- ``faults``: the seeded plan (machine, workloads, timings, faults per step).
- ``kernel_node``, ``mm_node``, ``client_node``: the simulated processes.
- ``lies``: forged requests from lying clients and a lying mm.
- ``checks``: invariants across both views; ``world``: everything stepping together.
- ``trace``: the JSON-lines trace; ``mutants``: planted bugs (test-only).
- ``runner``: seeds, sweeps, the benchmark; ``cli``: ``mmsim sim``.
"""

from __future__ import annotations

from typing import Any

FULL_EVERY = 500  # steps between full recomputations of the state checks by default (see ``checks``)


def run_seed(seed: int, **kw: Any) -> Any:
    """One seed (see ``runner.run_seed``); imported lazily so ``mmsim --help`` stays quick."""
    from simulator.runner import run_seed as _run_seed

    return _run_seed(seed, **kw)


def bench(seconds: float = 3.0) -> dict:
    """Simulated calls per second under each way of checking the state (see ``runner.bench``)."""
    from simulator.runner import bench as _bench

    return _bench(seconds)
