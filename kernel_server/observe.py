"""The observer seam: what the kernel tells a watcher (the simulator's incremental checks, tests,
tracing) about what it does, instead of being patched.

``KernelCore(..., observer=...)`` and ``KernelService(..., observer=...)`` (or ``set_observer``)
take an object with these methods (subclass ``KernelObserver``: every method is a no-op, so a watcher
overrides only what it needs). The default is the shared ``NO_OBSERVER``; with it the kernel
skips the reports altogether (a flag test on the paths that write, nothing more).

Calls (KernelCore.call; the service's refusals and replay cache):

- ``call_begun(caller, name, args)``: a call is about to run (``args``: the validated model).
- ``call_ended(caller, name, result)``: it ran; ``result`` is the reply dict or the ``Error``.
- ``refused(identity, name, error)``: the service refused a request (``name`` is "?" when the
  envelope was unreadable; ``identity`` may be None). Every refusal, whatever refused it.
- ``replay_miss(identity, req_id)``: the replay cache had no reply for this request: it is
  executed (a retry answered from the cache reports nothing).

State (every write, reported by the code that makes it):

- ``frames_written(frames)``: the frame table's arrays (kind, refs, next, prev) or its counters
  changed for ``frames``: an ``int``, a ``range`` or an int array (may repeat). Reported by
  ``FrameTable``'s mutators (``push_free``, ``pop_free``, ``unlink_free``, ``set_kind``,
  ``add_refs``, ``add_ref``), with the list neighbours whose links they relink.
- ``process_changed(pid)``: something of process ``pid`` changed (its tables, leaf entries, large
  mappings, threads, endpoints, slab, charge), or it was created or destroyed (look it up in
  ``core.procs``).

Coverage:

- ``probe(name)``: the kernel passed a named probe point (a rare path a test run should reach:
  ENOMEM past a quota or for the pool, a donation to an empty pool, a reclaim by frames or by count,
  a reclaim refused for the reserved frames). The names are declared in ``simulator.probes``.

Reports come after the write, before the call returns; a watcher must not change the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class KernelObserver:
    """Every report, as a no-op. Subclass and override what you watch."""

    def call_begun(self, caller: str, name: str, args: Any) -> None:
        pass

    def call_ended(self, caller: str, name: str, result: Any) -> None:
        pass

    def refused(self, identity: str | None, name: str, error: Any) -> None:
        pass

    def replay_miss(self, identity: str, req_id: int) -> None:
        pass

    def frames_written(self, frames: int | range | np.ndarray) -> None:
        pass

    def process_changed(self, pid: int) -> None:
        pass

    def probe(self, name: str) -> None:
        pass


NO_OBSERVER = KernelObserver()  # the shared default: the kernel does not even call it


def as_frames(frames: int | range | np.ndarray) -> np.ndarray:
    """A report's frames as an int64 array (for watchers)."""
    if isinstance(frames, (int, np.integer)):
        return np.array([int(frames)], dtype=np.int64)
    if isinstance(frames, range):
        return np.arange(frames.start, frames.stop, dtype=np.int64)
    return np.asarray(frames, dtype=np.int64).ravel()


__all__ = ["NO_OBSERVER", "KernelObserver", "as_frames"]
