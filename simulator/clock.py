"""Simulated time and the event queue: the only clock the simulator has.

Time is an integer number of microseconds (no float drift, no wall clock).
An event is the function to call and its arguments; events are kept in a
heap ordered by (time, sequence number), so two events at the same time run
in the order they were scheduled: the run is a pure function of the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

US = 1_000_000  # microseconds per simulated second


class Clock:
    def __init__(self) -> None:
        self.now = 0  # microseconds
        self.heap: list[tuple[int, int, Callable[..., Any], tuple[Any, ...]]] = []
        self.seq = 0

    @property
    def seconds(self) -> float:
        return self.now / US

    def at(self, when: int, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` at absolute time ``when`` (never in the past)."""
        self.seq += 1
        now = self.now
        heappush(self.heap, (when if when > now else now, self.seq, fn, args))

    def after(self, delay: int, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` ``delay`` microseconds from now."""
        self.seq += 1
        heappush(self.heap, (self.now + delay if delay > 0 else self.now, self.seq, fn, args))

    def pop(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The next event (its function and arguments); time jumps to it."""
        when, _, fn, args = heappop(self.heap)
        self.now = when
        return fn, args

    def __len__(self) -> int:
        return len(self.heap)
