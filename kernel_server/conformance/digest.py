"""The portable state digest: what a kernel's state must be after a step, in 64 hex digits that any
implementation can compute from what it answers over the wire.

A ``Snapshot`` holds the normative state (nothing an implementation may choose for itself):

- the frame counts: ram, kernel_free, kernel_used, kernel_shared, user_free, user_mapped,
  kernel_reserved;
- per frame, its owner and state as one code (``STATE``: 0 not RAM, 1 kernel (free or in use:
  which free frame the kernel allocates for its objects is its own choice, so the two are not told
  apart frame by frame; their counts are), 2 kernel-shared, 3 user) and its reference count;
- per process, ascending by pid: pid, the role that owns it, kernel_used, kernel_limit,
  user_quota, page tables, threads, endpoints, and every mapping ascending by virtual address: one
  record per 4 KiB page and one per large page (vaddr, first frame, page size, prot, who made it).

``layout(snapshot)`` is the byte string hashed (SHA-256); every integer little-endian:

    b"mmsim-state-1\\n"
    u32 frames, u32 processes
    7 x u64 counts, in the order above
    frames x (u8 state code, u32 refcount)                      frame 0 first
    per process: u64 pid, u8 len + role (ASCII), 7 x u64 (kernel_used, kernel_limit, user_quota,
                 tables, threads, endpoints, mapping records), then per record:
                 u64 vaddr, u64 first frame, u64 page size in bytes, u8 prot, u8 made_by (0 mm, 1 client)

``from_core`` reads a ``KernelCore`` directly; ``from_reads`` builds the same snapshot from the
replies of ``stats``, ``frame_info`` and ``mappings`` (as the operator reads them), so a replayer
computes it for a kernel it only talks to.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from protocol import PAGE_SHIFT

MAGIC = b"mmsim-state-1\n"
COUNTS = ("ram", "kernel_free", "kernel_used", "kernel_shared", "user_free", "user_mapped", "kernel_reserved")
STATE = {"none": 0, "kernel_free": 1, "kernel_used": 1, "kernel_shared": 2, "user": 3}
PROC_FIELDS = ("kernel_used", "kernel_limit", "user_quota", "tables", "threads", "endpoints")
MADE_BY = {"mm": 0, "client": 1}
_FRAME = np.dtype([("state", "u1"), ("refs", "<u4")])
READ_SEGMENTS = 1 << 14  # segments asked per frame_info / mappings read

Mapping = tuple[int, int, int, int, int]  # vaddr, first frame, page size, prot, made_by code


@dataclass
class Snapshot:
    frames: int
    counts: dict[str, int]
    state: np.ndarray  # uint8 per frame (STATE codes)
    refs: np.ndarray  # uint32 per frame
    procs: list[dict[str, Any]] = field(default_factory=list)  # pid, role, PROC_FIELDS, mappings

    def digest(self) -> str:
        return hashlib.sha256(layout(self)).hexdigest()


def layout(s: Snapshot) -> bytes:
    """The byte string the digest hashes (see the module docstring)."""
    per_frame = np.empty(s.frames, dtype=_FRAME)
    per_frame["state"] = s.state
    per_frame["refs"] = s.refs
    out = [MAGIC, struct.pack("<II", s.frames, len(s.procs)),
           struct.pack("<7Q", *(s.counts[c] for c in COUNTS)), per_frame.tobytes()]
    for p in sorted(s.procs, key=lambda p: p["pid"]):
        role = p["role"].encode("ascii")
        maps = sorted(p["mappings"])
        out.append(struct.pack("<QB", p["pid"], len(role)) + role)
        out.append(struct.pack("<7Q", *(p[f] for f in PROC_FIELDS), len(maps)))
        out.extend(struct.pack("<QQQBB", *m) for m in maps)
    return b"".join(out)


def records(segments: list[list[Any]]) -> list[Mapping]:
    """Mapping records (one per 4 KiB page, one per large page) from ``mappings`` segments
    ``[vaddr, pages, first frame, prot, made_by, page_size]``."""
    out: list[Mapping] = []
    for vaddr, pages, first, prot, made_by, page_size in segments:
        step = page_size >> PAGE_SHIFT
        code = MADE_BY[made_by]
        for i in range(0, pages, step):
            out.append((vaddr + (i << PAGE_SHIFT), first + i, page_size, prot, code))
    return out


def from_core(core: Any, role_of: Callable[[str], str]) -> Snapshot:
    """The snapshot of a ``KernelCore`` (read directly; the same as ``from_reads`` would build)."""
    from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, USER

    ft = core.frames
    code = np.zeros(max(KERNEL_FREE, KERNEL_USED, KERNEL_SHARED, USER) + 1, dtype=np.uint8)
    code[KERNEL_FREE] = code[KERNEL_USED] = 1
    code[KERNEL_SHARED] = 2
    code[USER] = 3
    counts = {**ft.counts(), "kernel_reserved": core.reserved}
    top = core.profile.user_top >> PAGE_SHIFT
    procs = []
    for pid in sorted(core.procs):
        proc = core.procs[pid]
        u = proc.usage()
        segments, _rest = proc.segments(0, top, 1 << 62)
        procs.append({"pid": pid, "role": role_of(proc.key), **{f: u[f] for f in PROC_FIELDS},
                      "mappings": records(segments)})
    return Snapshot(ft.n, counts, code[ft.kind], ft.refs.astype(np.uint32), procs)


def from_reads(read: Callable[[str, dict[str, Any]], dict[str, Any]], role_of: Callable[[str], str],
               user_top: int) -> Snapshot:
    """The snapshot of a kernel from its replies: ``read(call, args)`` makes a call as a reader (the
    operator) and returns its result. Pages through every listing."""
    stats = read("stats", {"from_pid": 0, "limit": 1000})
    listing = list(stats["per_process"])
    while stats.get("next_pid") is not None:
        stats = read("stats", {"from_pid": stats["next_pid"], "limit": 1000})
        listing.extend(stats["per_process"])
    n = stats["frames"]
    state = np.zeros(n, dtype=np.uint8)
    refs = np.zeros(n, dtype=np.uint32)
    ask: list[list[int]] = [[0, n]]
    while ask:
        got = read("frame_info", {"frames": ask, "max_segments": READ_SEGMENTS})
        for first, count, kind, r in got["segments"]:
            state[first:first + count] = STATE[kind]
            refs[first:first + count] = r
        ask = got["rest"]
    pages = user_top >> PAGE_SHIFT
    procs = []
    for u in listing:
        segments: list[list[Any]] = []
        vaddr: int | None = 0
        while vaddr is not None:
            got = read("mappings", {"pid": u["pid"], "vaddr": vaddr, "pages": pages - (vaddr >> PAGE_SHIFT),
                                    "max_segments": READ_SEGMENTS})
            segments.extend(got["segments"])
            vaddr = got["rest"]
        procs.append({"pid": u["pid"], "role": role_of(u["key"]), **{f: u[f] for f in PROC_FIELDS},
                      "mappings": records(segments)})
    counts = {c: stats[c] for c in COUNTS}
    return Snapshot(n, counts, state, refs, procs)


__all__ = ["COUNTS", "MAGIC", "PROC_FIELDS", "STATE", "Snapshot", "from_core", "from_reads", "layout", "records"]
