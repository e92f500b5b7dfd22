"""Frame runs: ``[[first, count], ...]``, the wire form of any set of frames.

Runs keep big transfers small (1 GiB of frames is one run). Helpers convert
between runs and numpy frame arrays, in order, duplicates kept.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

Run = list[int]  # [first, count]


def total(runs: Iterable[Sequence[int]]) -> int:
    return sum(int(c) for _, c in runs)


def to_array(runs: Iterable[Sequence[int]]) -> np.ndarray:
    """All frames of the runs, in order, as an int64 array."""
    runs = list(runs)
    if not runs:
        return np.zeros(0, dtype=np.int64)
    if len(runs) == 1:
        f, c = runs[0]
        return np.arange(f, f + c, dtype=np.int64)
    return np.concatenate([np.arange(f, f + c, dtype=np.int64) for f, c in runs])


def from_array(frames: np.ndarray | Sequence[int]) -> list[Run]:
    """Compress a sequence of frames into runs (consecutive ascending frames merge)."""
    a = np.asarray(frames, dtype=np.int64)
    if a.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [a.size]))
    return [[int(a[s]), int(e - s)] for s, e in zip(starts, ends)]


def normalize(runs: Iterable[Sequence[int]]) -> list[Run]:
    """Sorted, merged runs of the distinct frames in ``runs``."""
    a = np.unique(to_array(runs))
    return from_array(a)
