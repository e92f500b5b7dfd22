"""Where the mm process's main thread spends its CPU, stage by stage (a diagnostic, off by default).

``kill -USR1 <mm pid>`` starts the count; every later SIGUSR1 writes what
was counted since the previous one to ``RUN/mm.stages.json`` and starts
again. The file holds its sequence number (``seq``: 1, 2, ...), per stage
the main thread's CPU nanoseconds (``time.thread_time_ns``: CPU time, never
time spent waiting for a CPU), and the counts of wake-ups, client requests,
replies and journal batches in that span; the benchmark (``bench.mm``)
divides them by the calls it made. The shell (``mm_service.server``)
charges the CPU used since its previous mark to a stage at each boundary
(``mark``, about 0.6 us each: ``thread_time_ns`` is a system call); with
counting off no mark is made.

Stages:

- ``wait``: waiting for input (``zmq_poll``: its system calls, and the
  switches out and back in when it sleeps);
- ``receive``: taking what arrived off both sockets;
- ``driver``: ``Driver.handle`` (the mm's own logic: policy, view, replay
  cache, envelope) and ``Driver.boot``;
- ``journal``: writing a batch to SQLite (``Journal.append``);
- ``send``: kernel requests and client replies handed to ZeroMQ;
- ``other``: the rest of the shell (timeouts, the tick, admission refresh).

Besides, ``gc_ns`` and ``gc_runs``: the garbage collector's runs (counted
within the stages above, mostly ``driver``), by generation.
"""

from __future__ import annotations

import gc
import json
import os
import time

STAGES = ("wait", "receive", "driver", "journal", "send", "other")
FILE = "mm.stages.json"


class Stages:
    """CPU nanoseconds of the calling thread, charged to stages between marks."""

    __slots__ = ("ns", "last", "counts", "started", "gc_ns", "gc_runs", "_gc_start")

    def __init__(self) -> None:
        self.ns = dict.fromkeys(STAGES, 0)
        self.counts = {"wakeups": 0, "requests": 0, "replies": 0, "kernel_requests": 0, "kernel_replies": 0,
                       "batches": 0}
        self.started = time.monotonic()
        self.gc_ns = [0, 0, 0]
        self.gc_runs = [0, 0, 0]
        self._gc_start = 0
        self.last = time.thread_time_ns()

    def watch_gc(self) -> None:
        """Count the collector's runs and CPU time too (until ``stop``)."""
        gc.callbacks.append(self._gc)

    def stop(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.thread_time_ns()
        else:
            g = info["generation"]
            self.gc_ns[g] += time.thread_time_ns() - self._gc_start
            self.gc_runs[g] += 1

    def mark(self, stage: str) -> None:
        """Charge the CPU used since the previous mark to ``stage``."""
        now = time.thread_time_ns()
        self.ns[stage] += now - self.last
        self.last = now

    def write(self, run_dir: str, seq: int) -> None:
        """Write the counts to ``RUN/mm.stages.json`` as its ``seq``-th writing (atomically: a reader never
        sees half a file; ``seq`` tells it a new one from the last it read)."""
        out = {"seq": seq, "ns": self.ns, "counts": self.counts, "seconds": time.monotonic() - self.started,
               "gc_ns": self.gc_ns, "gc_runs": self.gc_runs}
        path = os.path.join(run_dir, FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
