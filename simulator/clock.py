"""Simulated time and the event queue: the only clock the simulator has.

Time is an integer number of microseconds (no float drift, no wall clock).
Events are kept in a heap ordered by (time, sequence number), so two events
at the same time run in the order they were scheduled: the run is a pure
function of the seed.
"""

from __future__ import annotations

import heapq
from typing import Any

US = 1_000_000  # microseconds per simulated second


class Clock:
    def __init__(self) -> None:
        self.now = 0  # microseconds
        self.heap: list[tuple[int, int, tuple[Any, ...]]] = []
        self.seq = 0

    @property
    def seconds(self) -> float:
        return self.now / US

    def at(self, when: int, *event: Any) -> None:
        """Schedule ``event`` at absolute time ``when`` (never in the past)."""
        self.seq += 1
        heapq.heappush(self.heap, (max(when, self.now), self.seq, event))

    def after(self, delay: int, *event: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (self.now + max(0, delay), self.seq, event))

    def pop(self) -> tuple[Any, ...]:
        """The next event; time jumps to it."""
        when, _, event = heapq.heappop(self.heap)
        self.now = when
        return event

    def __len__(self) -> int:
        return len(self.heap)
