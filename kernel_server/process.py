"""A process as the kernel keeps it: its address space (``pagetable.AddressSpace``), the kernel
objects it holds (object frame, threads, endpoints in its own slab frames) and its kernel quota.

Rules: no I/O. Every kernel frame a process holds is charged to it (I13): ``kernel_used`` counts
them, ``kernel_frames()`` derives them from its objects (the invariant checker compares the two),
and ``kernel_limit`` is the quota the mm set at ``proc_create``.
"""

from __future__ import annotations

from typing import Any

from kernel_server.pagetable import AddressSpace, Geometry
from kernel_server.slab import SlabCache


class Process(AddressSpace):
    __slots__ = ("pid", "key", "obj_frame", "root_frame", "kernel_limit", "kernel_used", "user_quota", "threads",
                 "endpoints", "slab")

    def __init__(self, geo: Geometry, pid: int, key: str, kernel_limit: int, user_quota: int) -> None:
        super().__init__(geo, -1)
        self.pid = pid
        self.key = key
        self.obj_frame = -1  # the process object (and, with PAE, its PDPT): a frame of its own
        self.root_frame = -1  # page directory / PML4 frame, or -1 when the root is the PDPT in the object frame
        self.kernel_limit = kernel_limit  # kernel frames this process may hold (its quota, set by the mm)
        self.kernel_used = 0  # kernel frames it holds (charged to it)
        self.user_quota = user_quota  # user pages the mm granted it (the mm enforces it; shown in stats)
        self.threads: dict[int, int] = {}  # tid -> frame
        self.endpoints: dict[int, tuple[int, int]] = {}  # eid -> slab object (frame, slot)
        self.slab = SlabCache("endpoint")  # its own endpoint slab frames

    def kernel_frames(self) -> list[int]:
        """Every kernel frame charged to this process (derived from its objects, not its counter)."""
        out = [self.obj_frame]
        out.extend(self.table_frames())
        out.extend(self.threads.values())
        out.extend(self.slab.used)
        return out

    def usage(self) -> dict[str, Any]:
        """Its line of the kernel's per-process listing (and of ``stats.you``)."""
        return {
            "pid": self.pid,
            "key": self.key,
            "pages": self.small_pages,
            "large_pages": len(self.large),
            "tables": len(self.tables) - 1 + (1 if self.root_frame >= 0 else 0),
            "threads": len(self.threads),
            "endpoints": len(self.endpoints),
            "kernel_used": self.kernel_used,
            "kernel_limit": self.kernel_limit,
            "user_quota": self.user_quota,
        }

    def state(self) -> tuple[Any, ...]:
        """Everything the process holds, as plain values (for digests and comparisons)."""
        return (self.pid, self.key, self.obj_frame, self.root_frame, self.kernel_limit, self.kernel_used,
                self.user_quota, sorted(self.threads.items()), sorted(self.endpoints.items()),
                sorted(self.slab.used.items()), sorted((f, sorted(v)) for f, v in self.slab.free_slots.items()),
                super().state())
