"""Exhaustive-checking figure: how far ``mmsim check`` gets on its default tiny machine in a given time.

Runs the breadth-first search of ``kernel_server.conformance.explore`` (8 frames, 2 client processes,
the full alphabet, every invariant after every step) for ``seconds`` and reports distinct states per
second, transitions per second and the depth fully explored. Informational: there is no target (the
depth grows with the log of the time; a faster kernel core or a smaller alphabet goes deeper).
"""

from __future__ import annotations

from typing import Any


def measure(seconds: float = 60.0, frames: int = 8, procs: int = 2) -> dict[str, Any]:
    from kernel_server.conformance.explore import Explorer, tiny_machine

    ex = Explorer(tiny_machine(frames, procs))
    res = ex.run(64, seconds)
    if res.violation is not None:
        raise RuntimeError(f"mmsim check found a violation: {res.violation.problems[0]}")
    return res.to_json()


def figures(seconds: float = 60.0):
    from bench.report import Figure, Report

    r = measure(seconds)
    rep = Report()
    note = (f"tiny machine: {r['frames']} frames, {r['procs']} client processes, {r['actions']} actions; "
            f"states per depth {r['level_sizes']}")
    rep.add(Figure("check.states_per_second", "mmsim check: distinct states explored per second",
                   r["states_per_second"], "states/s", target="info", note=note))
    rep.add(Figure("check.transitions_per_second", "mmsim check: calls tried per second (each followed by the "
                   "invariant checks when it reaches a new state)", r["transitions_per_second"], "calls/s",
                   target="info"))
    rep.add(Figure("check.depth", f"mmsim check: depth fully explored in {seconds:g} s", r["depth"], "calls",
                   target="info", note=f"{r['states']} states; {r['partial_states_at_next_depth']} states of the "
                   "next depth expanded when time ran out"))
    rep.details["check"] = r
    return rep


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0), indent=2))
