"""Slab caches for the kernel's small objects: a process's endpoints (64 bytes each).

Rules: no sockets, clocks or randomness. A cache never takes frames by itself:
``needs_frame()`` tells the check phase whether an allocation will need a new
frame, and the commit phase hands that frame in. A slab frame whose objects
are all freed goes back to the caller (and so to the kernel free list). Every
process has its own cache, so each slab frame is charged to one process.
"""

from __future__ import annotations

from kernel_server.arch import PAGE_SIZE

OBJECT_SIZE = {"endpoint": 64}


class SlabCache:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.per_frame = PAGE_SIZE // OBJECT_SIZE[kind]
        self.free_slots: dict[int, list[int]] = {}  # slab frame -> free slot numbers (partial slabs)
        self.used: dict[int, int] = {}  # slab frame -> objects in use

    def needs_frame(self) -> int:
        """Frames one more object would take: 0 or 1."""
        return 0 if self.free_slots else 1

    def alloc(self, new_frame: int | None) -> tuple[int, int]:
        """One object: in a partial slab, else in ``new_frame`` (given by the caller)."""
        if self.free_slots:
            frame = next(iter(self.free_slots))
        else:
            assert new_frame is not None, "check phase promised a frame"
            frame = new_frame
            self.free_slots[frame] = list(range(self.per_frame - 1, -1, -1))
            self.used[frame] = 0
        slots = self.free_slots[frame]
        slot = slots.pop()
        if not slots:
            del self.free_slots[frame]
        self.used[frame] += 1
        return frame, slot

    def free(self, frame: int, slot: int) -> int | None:
        """Release one object; returns the slab frame if it became empty."""
        self.used[frame] -= 1
        self.free_slots.setdefault(frame, []).append(slot)
        if self.used[frame] == 0:
            del self.used[frame]
            del self.free_slots[frame]
            return frame
        return None
