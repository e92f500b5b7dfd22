"""``mmsim bench swarm``: seeds per second with 1, 2 and all cores on the local process pool, and on a Dask
``LocalCluster``, as ratios measured in one run.

The same seeds (``seeds`` of ``steps`` steps, in ranges of ``batch``) are run by each executor, timed by the
wall clock from the first submission to the last result (the pool's or the cluster's start-up and a warm-up
range per worker are done before the clock starts). Figures:

- ``swarm.scaling.K``: seeds/s with K local workers against K times the rate of one worker (linear scaling
  is 1.0; target >= 0.9 for all cores);
- ``swarm.cpu_efficiency.K``: seeds per CPU-second with K workers against one (what the pool itself costs,
  whatever cores a shared machine spares; target >= 0.9);
- ``swarm.dask_overhead``: the Dask cluster's time against the local pool's, same number of workers (1.0: no
  overhead; target <= 1.05 at the measured range size), and ``swarm.dask_overhead_per_range``: the
  overhead per range in milliseconds against the work of a default range (200 seeds of 2000 steps; target
  <= 0.05).

On a machine whose cores other work shares, the scaling figures measure that too: the conditions say what
the machine had.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from simulator.swarm import SwarmConfig, local_executor, pinned_hash_seed, ranges, run_range, run_swarm


def _timed(executor: Any, width: int, cfg: SwarmConfig, todo: list[tuple[int, int]]) -> tuple[float, float]:
    """(wall seconds, CPU seconds the workers spent on the ranges)."""
    # warm-up: one tiny range per worker (imports, first allocations), not timed
    warm = [executor.submit(run_range, SwarmConfig(steps=50).to_json(), 10_000_000 + i, 1) for i in range(width)]
    for f in warm:
        f.result()
    t0 = time.perf_counter()
    done = list(run_swarm(cfg, todo, executor, 2 * width, lambda r: None))
    assert sum(r.done for r in done) == sum(n for _, n in todo)
    return time.perf_counter() - t0, sum(r.cpu for r in done)


def measure(seeds: int = 192, steps: int = 600, batch: int = 16, dask: bool = True,
            step: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    cfg = SwarmConfig(steps=steps)
    todo = ranges(0, seeds, batch)
    widths = sorted({1, min(2, cores), cores})
    out: dict[str, Any] = {"seeds": seeds, "steps": steps, "batch": batch, "ranges": len(todo), "cores": cores,
                           "loadavg": os.getloadavg()[0], "pool": {}, "dask": {}}
    with pinned_hash_seed():
        for k in widths:
            step(f"swarm: {seeds} seeds on a local pool of {k} worker(s)")
            ex = local_executor(k)
            try:
                out["pool"][k] = _timed(ex, k, cfg, todo)
            finally:
                ex.shutdown(cancel_futures=True)
    if dask:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            out["dask"] = None
        else:
            k = cores
            step(f"swarm: {seeds} seeds on a Dask LocalCluster of {k} worker process(es)")
            with LocalCluster(n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=40) as cluster, Client(cluster) as client:
                out["dask"][k] = _timed(client.get_executor(pure=False), k, cfg, todo)
    return out


def report(m: dict[str, Any]) -> Any:
    from bench.report import Figure, Report

    rep = Report()
    seeds = m["seeds"]
    pool = {k: w for k, (w, _) in m["pool"].items()}
    got = {k: c / w for k, (w, c) in m["pool"].items()}  # cores' worth of CPU the workers got
    one = seeds / pool[1]
    cond = (f"{seeds} seeds x {m['steps']} steps in {m['ranges']} ranges of {m['batch']}; {m['cores']} core(s), "
            f"load average {m['loadavg']:.2f} at the start (other work on the machine counts)")
    rep.add(Figure("swarm.pool.1", "seeds per second, local pool, 1 worker", round(one, 1), "seeds/s",
                   target="info", conditions=cond))
    for k, t in sorted(pool.items()):
        if k == 1:
            continue
        rate = seeds / t
        rep.add(Figure(f"swarm.scaling.{k}", f"seeds per second, local pool, {k} workers, against {k} x 1 worker",
                       round(rate, 1), "seeds/s", round(k * one, 1), "seeds/s", f"{k} x one worker", rate / (k * one),
                       ">=" if k == m["cores"] else None, 0.9 if k == m["cores"] else None,
                       ">= 0.9 of linear on all cores" if k == m["cores"] else "info",
                       note=f"the {k} workers got {got[k]:.2f} cores' worth of CPU (one worker got {got[1]:.2f}): "
                            f"{rate / got[k]:.1f} seeds per CPU-second against {one / got[1]:.1f}",
                       conditions=cond))
        eff = (rate / got[k]) / (one / got[1])
        rep.add(Figure(f"swarm.cpu_efficiency.{k}", f"seeds per CPU-second, local pool, {k} workers, against 1 worker",
                       round(rate / got[k], 1), "seeds/CPU-s", round(one / got[1], 1), "seeds/CPU-s", "one worker",
                       eff, ">=", 0.9, ">= 0.9 (the pool's own overhead, whatever cores the machine spares)",
                       conditions=cond))
    if m["dask"]:
        for k, (t, _) in m["dask"].items():
            base = pool.get(k)
            if base is None:
                continue
            per_range = (t - base) / m["ranges"] * 1000
            # a default range: 200 seeds of 2000 steps, at one worker's measured rate (steps scale the cost)
            default_ms = 200 * (2000 / m["steps"]) / one * 1000
            rep.add(Figure("swarm.dask_overhead", f"time for the same seeds on a Dask LocalCluster of {k} worker(s), "
                           "against the local pool", round(t, 2), "s", round(base, 2), "s", f"local pool of {k}",
                           t / base, "<=", 1.05, "<= 1.05 (Dask overhead under 5%)",
                           note=f"{per_range:+.1f} ms per range ({1000 * base / m['ranges'] * k:.0f} ms of work per "
                                "range)", conditions=cond))
            rep.add(Figure("swarm.dask_overhead_per_range", "Dask's overhead per range against the work of a default "
                           "range (200 seeds of 2000 steps, at the measured rate of one worker)", round(per_range, 1),
                           "ms", round(default_ms), "ms", "a default range's work", max(per_range, 0.0) / default_ms,
                           "<=", 0.05, "<= 0.05 (Dask overhead per range under 5%)", conditions=cond))
    elif m["dask"] is None:
        rep.add(Figure("swarm.dask_overhead", "Dask not installed (pip install 'mmsim[dask]')", 0, "", target="info"))
    rep.details["swarm"] = {**m, "pool": {str(k): {"wall": w, "cpu": c} for k, (w, c) in m["pool"].items()},
                            "dask": {str(k): {"wall": w, "cpu": c} for k, (w, c) in (m["dask"] or {}).items()}}
    return rep
