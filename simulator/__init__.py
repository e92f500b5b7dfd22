"""Deterministic simulation of the whole system, with seeded faults and replay (FoundationDB / VOPR style).

The unchanged sans-I/O kernel (``KernelService``/``KernelCore``), the mm's
own driver (``mm_service.driver.Driver``, as the ZeroMQ server runs it) and
the real workload generators run in one process on a simulated clock,
talking in real wire bytes over a simulated network; every random choice
comes from the seed, so a seed replays exactly. The simulator watches the
kernel and the mm only through their observer seams
(``kernel_server.observe``, ``mm_service.observe``) and what the driver
exposes; it patches nothing.

- ``clock``: simulated time and the event queue.
- ``net``: the message layer (loss, duplication, delay, reordering, partitions; the transport assumption).
- ``faults``: the seeded plan (machine, workloads, timings, fault families on or off, per step).
- ``kernel_node``, ``mm_node``, ``client_node``: the simulated processes.
- ``lies``: forged requests from lying clients and a lying mm.
- ``checks``: invariants across both views; ``world``: everything stepping together, the liveness phase.
- ``trace``: the JSON-lines trace; ``mutants``: planted bugs (test-only).
- ``runner``: seeds, sweeps, determinism, the HTML view of a run, the benchmarks; ``cli``: ``mmsim sim``.
"""

from __future__ import annotations

from typing import Any

FULL_EVERY = 500  # steps between full recomputations of the state checks by default (see ``checks``)


def run_seed(seed: int, **kw: Any) -> Any:
    """One seed (see ``runner.run_seed``); imported lazily so ``mmsim --help`` stays quick."""
    from simulator.runner import run_seed as _run_seed

    return _run_seed(seed, **kw)


def bench(seconds: float = 3.0) -> dict:
    """Client operations per CPU second under each way of checking the state (see ``runner.bench``)."""
    from simulator.runner import bench as _bench

    return _bench(seconds)
