"""The mm's observer seam: what the memory manager tells a watcher (the simulator's checks, tests,
tracing) about what it does, instead of being patched.

``Driver(..., observer=...)`` (or ``MMService.set_observer``, ``View.set_observer``) takes an object
with these methods (subclass ``MMObserver``: every method is a no-op, so a watcher overrides only
what it needs). The default is the shared ``NO_OBSERVER``; with it the mm skips the reports
altogether (a flag test, nothing more).

- ``applied(record)``: a journal record (``mm_service.records``) was applied to the view. Every
  change of the view (frame states and reference counts, clients, their mappings and charges,
  offers, pending intents) is made by ``View.apply`` and so reported, after the change, in the
  order applied: the records of requests and housekeeping, and those replayed from the journal
  at a restart.
- ``replay_miss(identity, req_id)``: ``MMService.handle`` found no reply for this request in its
  replay cache, so it executes it (a resend answered from the cache reports nothing, nor does a
  malformed or unauthenticated request).

- ``probe(name)``: the mm passed a named probe point (a rare path a test run should reach: recovery
  settling a map or an unmap either way, a donate-and-retry, a quota refusal, an offer accepted,
  a journal compaction, the kernel lost and back). The names are declared in ``simulator.probes``.

A watcher must not change the mm.
"""

from __future__ import annotations

from typing import Any


class MMObserver:
    """Every report, as a no-op. Subclass and override what you watch."""

    def applied(self, record: Any) -> None:
        pass

    def replay_miss(self, identity: str, req_id: int) -> None:
        pass

    def probe(self, name: str) -> None:
        pass


NO_OBSERVER = MMObserver()  # the shared default: the mm does not even call it

__all__ = ["NO_OBSERVER", "MMObserver"]
