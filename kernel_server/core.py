"""The kernel's logic: frame ownership, address spaces, kernel objects, system calls.

Rules for this file (as h11 states its own): no sockets, no clocks, no
randomness, no I/O. ``KernelCore.call(caller, name, args)`` takes the caller's
identity (a CURVE public key, never a routing id) and a validated args model
and returns a result dict or an ``Error``. Every call is written as
*check, then commit* (seL4's decode/invoke): ``_check_<call>`` validates
everything, computes every kernel frame it will take and may return an Error
without having changed anything; ``_commit_<call>`` applies the plan and cannot
fail. Donate and reclaim take no kernel memory at all.

Kernel memory is charged (I13). Every kernel frame a process causes (its
object frame: the process object, and with PAE its PDPT; its page tables;
its threads; its own endpoint slab frames) is charged to that process, up to
the ``kernel_quota`` the mm set at ``proc_create``; past it a call fails with
ENOMEM carrying ``limit`` and ``used``. The pool always holds the unused part
of every quota (``reserved``): ``proc_create`` takes a quota only from
unreserved free frames and ``reclaim`` never takes reserved ones, so a process
within its quota never finds the pool empty. Slab frames are per process, so
every kernel frame in use is charged to exactly one process (or, for the
frame table, to the kernel since boot).

Mappings are kept as a page table tree keeps them: every table of a process
is ``tables[(level, tag)] = [frame, used]``, and each leaf table (the last
level: 4 KiB mappings) also has its entries in ``leaves[tag]``, a flat int32
array of ``table_entries`` slots, ``EMPTY`` or ``frame << ENTRY_SHIFT |
CLIENT_MADE? | prot``. A mapping belongs to whoever made it: the mm's are
freed through the mm, a client may unmap only the ones it made itself (the
``CLIENT_MADE`` bit: read-only maps of kernel-shared frames). Large mappings
are few and live in a dict. Calls on a run of frames work on slices.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE, Profile
from kernel_server.bootmap import BootMap
from kernel_server.frames import (
    KERNEL_FREE,
    KERNEL_SHARED,
    KERNEL_USED,
    KIND_NAMES,
    NONE,
    USER,
    FrameTable,
)
from kernel_server.slab import SlabCache
from protocol import PROT_EXEC, PROT_READ, PROT_WRITE, PROTOCOL_VERSION
from protocol import runs as R
from protocol.errors import Errno, Error

EVENT_LOG = 10_000  # events kept for the mm to read
ROOT = (0, 0)  # the key of a process's root table in Process.tables
LARGE_RUNS_SHOWN = 256  # stats lists at most this many runs of frames under large mappings
EMPTY = -1  # a leaf table entry that maps nothing
ENTRY_SHIFT = 4  # a leaf entry is frame << ENTRY_SHIFT | CLIENT_MADE? | prot (prot: 3 bits)
CLIENT_MADE = 8  # leaf entry bit: the client made this mapping itself (not the mm)
PROT_MASK = 7
SPARE_LEAVES = 64  # emptied leaf entry arrays kept for reuse (making one costs as much as filling it)


def _err(code: Errno, message: str, **details: Any) -> Error:
    return Error(code, message, details)


def _runs_of(frames: np.ndarray, limit: int = 64) -> list[list[int]]:
    """Runs naming (at most ``limit`` runs of) the offending frames, for error details."""
    return R.from_array(np.unique(frames))[:limit]


def _runs_overlap(runs: list[list[int]]) -> bool:
    """Do any two runs share a frame? (Sorted by first frame, each must end before the next begins.)"""
    if len(runs) < 2:
        return False
    if len(runs) <= 32:
        end = -1
        for first, count in sorted(runs):
            if first < end:
                return True
            end = first + count
        return False
    r = np.asarray(runs, dtype=np.int64)
    r = r[np.argsort(r[:, 0], kind="stable")]
    return bool(np.any(r[1:, 0] < r[:-1, 0] + r[:-1, 1]))


def _merged(runs: list[list[int]]) -> list[list[int]]:
    """``R.from_array(R.to_array(runs))`` without expanding the runs: adjacent runs merge."""
    out: list[list[int]] = []
    for first, count in runs:
        if out and out[-1][0] + out[-1][1] == first:
            out[-1][1] += count
        else:
            out.append([first, count])
    return out


@dataclass
class Process:
    pid: int
    key: str
    obj_frame: int  # the process object (and, with PAE, its PDPT): one frame of the process's own
    root_frame: int  # page directory / PML4 frame, or -1 when the root is the PDPT in the object frame
    leaf_bits: int  # log2 of the entries of a leaf table: vpage = tag << leaf_bits | index
    kernel_limit: int = 0  # kernel frames this process may hold (its quota, set by the mm)
    kernel_used: int = 0  # kernel frames it holds (charged to it)
    user_quota: int = 0  # user pages the mm granted it (the mm enforces it; shown in stats)
    tables: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (level, tag) -> [frame, used]
    leaves: dict[int, np.ndarray] = field(default_factory=dict)  # leaf table tag -> its entries (int32)
    small_pages: int = 0  # 4 KiB mappings: non-empty leaf entries
    large: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # base vpage -> (level, frame, prot)
    threads: dict[int, int] = field(default_factory=dict)  # tid -> frame
    endpoints: dict[int, tuple[int, int]] = field(default_factory=dict)  # eid -> slab object
    slab: SlabCache = field(default_factory=lambda: SlabCache("endpoint"))  # its own endpoint slab frames

    def kernel_frames(self) -> list[int]:
        """Every kernel frame charged to this process (derived from its objects, not its counter)."""
        out = [self.obj_frame]
        out.extend(t[0] for t in self.tables.values() if t[0] >= 0)
        out.extend(self.threads.values())
        out.extend(self.slab.used)
        return out

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(vpages, leaf entries) of every 4 KiB mapping, in virtual address order (int64 arrays)."""
        vps: list[np.ndarray] = []
        ents: list[np.ndarray] = []
        for tag in sorted(self.leaves):
            e = self.leaves[tag]
            idx = np.flatnonzero(e != EMPTY)
            vps.append((tag << self.leaf_bits) + idx)
            ents.append(e[idx].astype(np.int64))
        if not vps:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(vps), np.concatenate(ents)

    @property
    def pages(self) -> dict[int, int]:
        """vpage -> frame << 3 | prot of every 4 KiB mapping (built on demand: for tests and debugging)."""
        vps, ents = self.entries()
        return dict(zip(vps.tolist(), (((ents >> ENTRY_SHIFT) << 3) | (ents & PROT_MASK)).tolist()))

    def usage(self) -> dict[str, int]:
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


class KernelCore:
    """The kernel: one frame table, processes, slabs, and the system calls."""

    def __init__(self, profile: Profile, bootmap: BootMap, mm_key: str, operator_key: str | None = None) -> None:
        self.profile = profile
        self.bootmap = bootmap
        self.mm_key = mm_key
        self.operator_key = operator_key  # may read what the mm reads (frame_info, mappings, listings)
        self.frames = FrameTable(bootmap, profile.kernel_limit)
        self.reserved = 0  # free frames promised to processes: the sum of (kernel_limit - kernel_used)
        self.base_cost = 1 if profile.root_is_slab else 2  # a process's object frame (+ its root table)
        self.procs: dict[int, Process] = {}
        self.by_key: dict[str, int] = {}
        self.next_id = {"pid": 1, "tid": 1, "eid": 1}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_LOG)
        self.event_seq = 0
        self.user_top_page = profile.user_top >> PAGE_SHIFT
        self.leaf = profile.levels - 1  # the level of the tables that map 4 KiB pages
        self.leaf_bits = profile.entry_shifts[self.leaf - 1] - PAGE_SHIFT  # vpage >> leaf_bits: leaf table tag
        self.leaf_entries = 1 << self.leaf_bits
        self._spare_leaves: list[np.ndarray] = []  # all EMPTY: from leaf tables unmap freed
        self._calls: dict[str, Callable[[str, Any], dict | Error]] = {
            "hello": self.hello,
            "address_map": self.address_map,
            "proc_create": self.proc_create,
            "proc_destroy": self.proc_destroy_call,
            "donate": self.donate,
            "reclaim": self.reclaim,
            "map": self.map,
            "unmap": self.unmap,
            "thread_create": self.thread_create,
            "thread_destroy": self.thread_destroy,
            "endpoint_create": self.endpoint_create,
            "endpoint_destroy": self.endpoint_destroy,
            "frame_info": self.frame_info,
            "mappings": self.mappings,
            "stats": self.stats,
            "ping": self.ping,
            "events": self.read_events,
        }

    # ---- dispatch ---------------------------------------------------------

    def call(self, caller: str, name: str, args: Any) -> dict | Error:
        fn = self._calls.get(name)
        if fn is None:
            return _err(Errno.ENOSYS, f"unknown call {name!r}")
        return fn(caller, args)

    def is_mm(self, caller: str) -> bool:
        return caller == self.mm_key

    def _need_mm(self, caller: str, what: str) -> Error | None:
        if caller != self.mm_key:
            return _err(Errno.EPERM, f"only the memory manager may {what}")
        return None

    def is_reader(self, caller: str) -> bool:
        """The mm or the operator: may read the frame table, mappings and per-process listings."""
        return caller == self.mm_key or (self.operator_key is not None and caller == self.operator_key)

    def _need_reader(self, caller: str, what: str) -> Error | None:
        if not self.is_reader(caller):
            return _err(Errno.EPERM, f"only the memory manager and the operator may {what}")
        return None

    def _own_process(self, caller: str) -> Process | Error:
        pid = self.by_key.get(caller)
        if pid is None:
            return _err(Errno.ESRCH, "the caller has no process (the memory manager creates it)")
        return self.procs[pid]

    def _target(self, caller: str, pid: int | None) -> Process | Error:
        """The process a map/unmap acts on: any (mm, pid required) or the caller's own."""
        if caller == self.mm_key:
            if pid is None:
                return _err(Errno.EINVAL, "args.pid: the memory manager must name the process", field="pid")
            proc = self.procs.get(pid)
            if proc is None:
                return _err(Errno.ESRCH, f"no process {pid}", pid=pid)
            return proc
        own = self._own_process(caller)
        if isinstance(own, Error):
            return own
        if pid is not None and pid != own.pid:
            return _err(Errno.EPERM, f"a client acts on its own address space only (pid {own.pid}, not {pid})")
        return own

    def _frames_arg(self, runs: list[list[int]]) -> np.ndarray | Error:
        """The frames of ``runs`` as an array; runs reaching beyond the frame table are
        refused before anything is expanded (a hostile run costs nothing)."""
        n = self.frames.n
        if len(runs) == 1 and runs[0][0] + runs[0][1] <= n:
            first, count = runs[0]
            return np.arange(first, first + count, dtype=np.int64)
        beyond = sorted([max(f, n), f + c] for f, c in runs if f + c > n)
        if beyond:
            merged: list[list[int]] = []
            for lo, hi in beyond:
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            return _err(Errno.EINVAL, f"frame {merged[0][0]} is beyond physical memory ({n} frames)",
                        frames=[[lo, hi - lo] for lo, hi in merged[:64]])
        return R.to_array(runs)

    # ---- kernel memory (commit-side helpers; the check phase counted) -------

    def _kalloc(self, proc: Process, n: int) -> list[int]:
        """Take ``n`` frames from the pool, charged to ``proc`` (within its quota: the check said so)."""
        got = self.frames.pop_free(n)
        self.frames.set_kind(got, KERNEL_FREE, KERNEL_USED)
        proc.kernel_used += n
        self.reserved -= n
        return got.tolist()

    def _kfree(self, proc: Process, frames: list[int]) -> None:
        """Give ``proc``'s kernel frames back to the pool (their charge goes back to its reservation)."""
        if frames:
            a = np.asarray(frames, dtype=np.int64)
            self.frames.set_kind(a, KERNEL_USED, KERNEL_FREE)
            self.frames.push_free(a)
            proc.kernel_used -= len(frames)
            self.reserved += len(frames)

    def unreserved(self) -> int:
        """Free kernel frames promised to no process: what proc_create and reclaim may take."""
        return self.frames.free_count - self.reserved

    def _over_quota(self, proc: Process, needed: int, what: str) -> Error | None:
        """ENOMEM if ``needed`` more kernel frames would take ``proc`` past its quota (I13). Within its
        quota the pool always has them: the check after this one cannot fail while I13 holds."""
        if proc.kernel_used + needed > proc.kernel_limit:
            return _err(Errno.ENOMEM, f"{what} needs {needed} kernel frame(s); process {proc.pid} has used "
                        f"{proc.kernel_used} of its kernel quota of {proc.kernel_limit}",
                        needed=needed, limit=proc.kernel_limit, used=proc.kernel_used, pid=proc.pid)
        available = self.frames.free_count
        if needed > available:  # unreachable while the reservation holds; kept so a broken one is refused
            return _err(Errno.ENOMEM, f"{what} needs {needed} kernel frame(s), {available} free",
                        needed=needed, available=available)
        return None

    def _pool(self) -> dict[str, int]:
        """The pool figures every call that changes it reports (the mm's watermarks use ``unreserved``)."""
        return {"kernel_free": self.frames.free_count, "kernel_reserved": self.reserved}

    def _new_id(self, kind: str) -> int:
        n = self.next_id[kind]
        self.next_id[kind] = n + 1
        return n

    # ---- informational calls ---------------------------------------------

    def hello(self, caller: str, args: Any) -> dict:
        p = self.profile
        return {
            "v": PROTOCOL_VERSION,
            "arch": p.name,
            "page_size": PAGE_SIZE,
            "large_page_sizes": p.large_page_sizes,
            "user_top": p.user_top,
            "frames": self.frames.n,
            "kernel_limit": p.kernel_limit,
            "identity": caller,
            "is_mm": caller == self.mm_key,
            "is_operator": self.operator_key is not None and caller == self.operator_key,
            "pid": self.by_key.get(caller),
            "process_cost": self.base_cost,
        }

    def address_map(self, caller: str, args: Any) -> dict:
        return {
            "arch": self.profile.name,
            "frames": self.frames.n,
            "kernel_limit": self.profile.kernel_limit,
            "entries": self.bootmap.to_wire(),
            "unaddressable": self.bootmap.unaddressable,  # bytes of RAM beyond what the profile addresses
        }

    def ping(self, caller: str, args: Any) -> dict:
        return {"pid": self.by_key.get(caller)}

    def stats(self, caller: str, args: Any) -> dict | Error:
        """Counts for anyone (and the caller's own usage); the per-process listing, a page of it from
        ``from_pid`` on, for the mm and the operator only (a listing grows with the processes)."""
        asked = args is not None and args.from_pid is not None
        if asked and (e := self._need_reader(caller, "list processes")) is not None:
            return e
        listing = self.is_reader(caller)
        pid = self.by_key.get(caller)
        out: dict[str, Any] = {
            **self.frames.counts(),
            "kernel_reserved": self.reserved,
            "frames": self.frames.n,
            "processes": len(self.procs),
            "slab_frames": sum(len(p.slab.used) for p in self.procs.values()),
            "event_seq": self.event_seq,
            "you": self.procs[pid].usage() if pid is not None else None,
        }
        if listing:
            start = args.from_pid if asked else 0
            pids = sorted(p for p in self.procs if p >= start)
            page = pids[: args.limit]
            out["per_process"] = [self.procs[p].usage() for p in page]
            out["next_pid"] = pids[args.limit] if len(pids) > args.limit else None
            out["large_mappings"] = self._large_runs()
        return out

    def _large_runs(self) -> list[list[int]]:
        """Frames under large mappings, as sorted merged runs (at most LARGE_RUNS_SHOWN): for pictures."""
        pages_at = self.profile.pages_at
        spans = sorted((f, f + pages_at(lv)) for p in self.procs.values() for lv, f, _ in p.large.values())
        runs: list[list[int]] = []
        for lo, hi in spans:
            if runs and lo <= runs[-1][0] + runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], hi - runs[-1][0])
            else:
                runs.append([lo, hi - lo])
        return runs[:LARGE_RUNS_SHOWN]

    def read_events(self, caller: str, args: Any) -> dict | Error:
        if (e := self._need_reader(caller, "read kernel events")) is not None:
            return e
        oldest = self.events[0]["seq"] if self.events else self.event_seq + 1
        out = [ev for ev in self.events if ev["seq"] > args.since][: args.limit]
        return {
            "events": out,
            "next": out[-1]["seq"] if out else max(args.since, 0),
            "lost": bool(self.events) and args.since + 1 < oldest,
            "latest": self.event_seq,
            **self._pool(),  # the mm's figure of the pool stays fresh after deaths
        }

    def frame_info(self, caller: str, args: Any) -> dict | Error:
        if (e := self._need_reader(caller, "read the frame table")) is not None:
            return e
        ft = self.frames
        segments: list[list[Any]] = []
        rest: list[list[int]] = []
        for i, (first, count) in enumerate(args.frames):
            if first + count > ft.n:
                return _err(Errno.EINVAL, f"run [{first}, {count}] goes beyond physical memory ({ft.n} frames)",
                            field="frames")
        for i, (first, count) in enumerate(args.frames):
            kinds = ft.kind[first:first + count]
            refs = ft.refs[first:first + count]
            change = np.flatnonzero((np.diff(kinds) != 0) | (np.diff(refs) != 0)) + 1
            starts = np.concatenate(([0], change))
            ends = np.concatenate((change, [count]))
            room = args.max_segments - len(segments)
            for s, e in zip(starts[:room].tolist(), ends[:room].tolist()):
                segments.append([first + s, e - s, KIND_NAMES[int(kinds[s])], int(refs[s])])
            if len(starts) > room:
                cut = int(starts[room])
                rest = [[first + cut, count - cut]] + [list(r) for r in args.frames[i + 1:]]
                break
        return {"segments": segments, "rest": rest}

    def mappings(self, caller: str, args: Any) -> dict | Error:
        """What process ``pid`` maps over [vaddr, vaddr + pages pages), in virtual address order, as
        segments ``[vaddr, pages, first frame, prot, made_by, page_size]``: consecutive pages mapping
        consecutive frames with the same protection, made by the same party ("mm" or "client"), with
        the same page size. At most ``max_segments``; ``rest`` is the virtual address to ask from next
        (None: the range is covered). Read-only: how the mm settles an intent whose reply was lost."""
        if (e := self._need_reader(caller, "list a process's mappings")) is not None:
            return e
        proc = self.procs.get(args.pid)
        if proc is None:
            return _err(Errno.ESRCH, f"no process {args.pid}", pid=args.pid)
        if args.vaddr % PAGE_SIZE:
            return _err(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} is not page-aligned", field="vaddr")
        vp0 = args.vaddr >> PAGE_SHIFT
        vp1 = vp0 + args.pages
        if vp1 > self.user_top_page:
            return _err(Errno.EINVAL, f"args.vaddr: the range goes beyond user space ({self.profile.user_top:#x})",
                        field="vaddr")
        pieces: list[list[int]] = []  # [vpage, pages, frame, prot, by_client, page_size]
        bits, size = self.leaf_bits, self.leaf_entries
        t0, t1 = vp0 >> bits, (vp1 - 1) >> bits
        tags = range(t0, t1 + 1) if t1 - t0 < len(proc.leaves) else sorted(t for t in proc.leaves if t0 <= t <= t1)
        for tag in tags:
            e = proc.leaves.get(tag)
            if e is None:
                continue
            base = tag << bits
            lo, hi = max(vp0, base) - base, min(vp1, base + size) - base
            idx = np.flatnonzero(e[lo:hi] != EMPTY)
            if not idx.size:
                continue
            ents = e[lo:hi][idx].astype(np.int64)
            cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(ents) != (1 << ENTRY_SHIFT))) + 1
            for a, b in zip(np.concatenate(([0], cut)).tolist(), np.concatenate((cut, [idx.size])).tolist()):
                ent = int(ents[a])
                pieces.append([base + lo + int(idx[a]), b - a, ent >> ENTRY_SHIFT, ent & PROT_MASK,
                               1 if ent & CLIENT_MADE else 0, PAGE_SIZE])
        for b, (lv, f, prot) in proc.large.items():
            n = self.profile.pages_at(lv)
            if b < vp1 and b + n > vp0:
                pieces.append([b, n, f, prot, 0, n << PAGE_SHIFT])
        pieces.sort()
        segments: list[list[Any]] = []
        for vp, n, f, prot, by, ps in pieces:  # join what continues across leaf tables
            last = segments[-1] if segments else None
            if (last is not None and ps == PAGE_SIZE and last[5] == PAGE_SIZE and last[0] + last[1] == vp
                    and last[2] + last[1] == f and last[3] == prot and last[4] == by):
                last[1] += n
            else:
                segments.append([vp, n, f, prot, by, ps])
        rest = None
        if len(segments) > args.max_segments:
            rest = segments[args.max_segments][0] << PAGE_SHIFT
            segments = segments[: args.max_segments]
        return {"pid": proc.pid,
                "segments": [[vp << PAGE_SHIFT, n, f, prot, "client" if by else "mm", ps]
                             for vp, n, f, prot, by, ps in segments],
                "rest": rest}

    # ---- processes --------------------------------------------------------

    def _check_proc_create(self, caller: str, args: Any) -> Error | None:
        if (e := self._need_mm(caller, "create processes")) is not None:
            return e
        if args.key == self.mm_key or args.key == self.operator_key:
            return _err(Errno.EINVAL, "args.key: a server's key (the mm's, the operator's) cannot own a process",
                        field="key")
        if args.key in self.by_key:
            pid = self.by_key[args.key]
            p = self.procs[pid]
            return _err(Errno.EBUSY, f"key already has process {pid}", pid=pid, kernel_limit=p.kernel_limit,
                        kernel_used=p.kernel_used, user_quota=p.user_quota)
        if args.kernel_quota < self.base_cost:
            return _err(Errno.EINVAL, f"args.kernel_quota: a process needs at least {self.base_cost} kernel "
                        f"frame(s) on {self.profile.name} (its object frame and root table)", field="kernel_quota")
        available = self.unreserved()
        if args.kernel_quota > available:  # the quota is reserved in the pool whole, now (no overcommit)
            return _err(Errno.ENOMEM, f"proc_create needs {args.kernel_quota} unreserved kernel frame(s) for the "
                        f"quota, {available} free and unreserved", needed=args.kernel_quota, available=available)
        return None

    def proc_create(self, caller: str, args: Any) -> dict | Error:
        if (e := self._check_proc_create(caller, args)) is not None:
            return e
        # commit
        pid = self._new_id("pid")
        self.reserved += args.kernel_quota
        proc = Process(pid=pid, key=args.key, obj_frame=-1, root_frame=-1, leaf_bits=self.leaf_bits,
                       kernel_limit=args.kernel_quota, user_quota=args.user_quota)
        fresh = self._kalloc(proc, self.base_cost)
        proc.obj_frame = fresh[0]
        if not self.profile.root_is_slab:
            proc.root_frame = fresh[1]
        proc.tables[ROOT] = [proc.root_frame, 0]
        self.procs[pid] = proc
        self.by_key[args.key] = pid
        return {"pid": pid, "kernel_frames": self.base_cost, "kernel_limit": proc.kernel_limit, **self._pool()}

    def proc_destroy_call(self, caller: str, args: Any) -> dict | Error:
        if (e := self._need_mm(caller, "destroy processes")) is not None:
            return e
        if args.pid not in self.procs:
            return _err(Errno.ESRCH, f"no process {args.pid}", pid=args.pid)
        return self.proc_destroy(args.pid, "proc_destroy")

    def proc_destroy(self, pid: int, reason: str) -> dict:
        """Release everything a process holds (commit only: cannot fail). Also used for leases.

        The event and the reply list the user frames released (the mm's business), not the
        kernel-shared frames mapped read-only (counted as ``shared_unmapped``)."""
        proc = self.procs.pop(pid)
        del self.by_key[proc.key]
        released = self._mapped_frames(proc)
        self.frames.add_refs(released, -1)
        user = released[self.frames.kind[released] == USER]
        shared_unmapped = int(released.size - user.size)
        kfree = proc.kernel_frames()
        self._kfree(proc, kfree)
        self.reserved -= proc.kernel_limit  # (nothing is charged to it now: its whole quota was reserved)
        frames = R.from_array(np.unique(user)) if user.size else []
        self.event_seq += 1
        self.events.append({"seq": self.event_seq, "kind": "proc_destroyed", "pid": pid, "key": proc.key,
                            "reason": reason, "frames": frames, "shared_unmapped": shared_unmapped})
        return {"pid": pid, "unmapped_pages": int(released.size), "kernel_frames_freed": len(kfree),
                "frames": frames, "shared_unmapped": shared_unmapped, **self._pool()}

    def _mapped_frames(self, proc: Process) -> np.ndarray:
        """The frame of every mapping of ``proc``, once per 4 KiB page (a large mapping: each frame)."""
        parts = [e[e != EMPTY].astype(np.int64) >> ENTRY_SHIFT for e in proc.leaves.values()]
        pages_at = self.profile.pages_at
        parts.extend(np.arange(f, f + pages_at(lv), dtype=np.int64) for lv, f, _prot in proc.large.values())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ---- donate / reclaim (no kernel allocation, ever) ----------------------

    def _check_donate(self, caller: str, args: Any) -> np.ndarray | Error:
        if (e := self._need_mm(caller, "donate frames")) is not None:
            return e
        a = self._frames_arg(args.frames)
        if isinstance(a, Error):
            return a
        if _runs_overlap(args.frames):
            return _err(Errno.EINVAL, "args.frames: a frame appears twice", field="frames")
        ix = self._index(args.frames, a)
        kinds = self.frames.kind[ix]
        refs = self.frames.refs[ix]
        top = int(a[-1]) if isinstance(ix, slice) else int(a.max())
        if bool((kinds == USER).all()) and not refs.any() and top < self.frames.kernel_limit:
            return a  # the usual case, in three passes; otherwise find the first rule broken, and where
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        bad = a[kinds != USER]
        if bad.size:
            return _err(Errno.EEXIST, f"frame {int(bad[0])} is already kernel-owned", frames=_runs_of(bad))
        bad = a[refs > 0]
        if bad.size:
            return _err(Errno.EBUSY, f"frame {int(bad[0])} is mapped in user space", frames=_runs_of(bad))
        bad = a[a >= self.frames.kernel_limit]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} cannot be kernel-owned on {self.profile.name} "
                        f"(kernel frames must lie below frame {self.frames.kernel_limit})", frames=_runs_of(bad))
        return a

    def donate(self, caller: str, args: Any) -> dict | Error:
        a = self._check_donate(caller, args)
        if isinstance(a, Error):
            return a
        run = len(args.frames) == 1
        self.frames.set_kind(a, USER, KERNEL_FREE, run)
        self.frames.push_free(a, run)  # the first donated frame is handed out first
        return {"donated": int(a.size), **self._pool()}

    @staticmethod
    def _index(runs: list[list[int]], a: np.ndarray) -> slice | np.ndarray:
        """How to index the frame table for the frames ``a`` of ``runs``: a slice when it is one run."""
        if len(runs) == 1:
            first, count = runs[0]
            return slice(first, first + count)
        return a

    def _check_reclaim(self, caller: str, args: Any) -> np.ndarray | int | Error:
        if (e := self._need_mm(caller, "reclaim frames")) is not None:
            return e
        if args.count is not None:
            return min(args.count, self.unreserved())
        a = self._frames_arg(args.frames)
        if isinstance(a, Error):
            return a
        if _runs_overlap(args.frames):
            return _err(Errno.EINVAL, "args.frames: a frame appears twice", field="frames")
        kinds = self.frames.kind[self._index(args.frames, a)]
        if bool((kinds == KERNEL_FREE).all()) and a.size <= self.unreserved():
            return a
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        bad = a[kinds == USER]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not kernel-owned", frames=_runs_of(bad))
        bad = a[kinds != KERNEL_FREE]
        if bad.size:
            return _err(Errno.EBUSY, f"kernel frame {int(bad[0])} is in use", frames=_runs_of(bad))
        if a.size > self.unreserved():
            return _err(Errno.EBUSY, f"reclaiming {a.size} frame(s) would leave fewer free kernel frames than the "
                        f"{self.reserved} reserved for processes' kernel quotas", reserved=self.reserved,
                        kernel_free=self.frames.free_count)
        return a

    def reclaim(self, caller: str, args: Any) -> dict | Error:
        plan = self._check_reclaim(caller, args)
        if isinstance(plan, Error):
            return plan
        if isinstance(plan, int):
            a = self.frames.pop_free(plan)
            self.frames.set_kind(a, KERNEL_FREE, USER)
            frames = R.from_array(a)
        else:
            a = plan
            run = len(args.frames) == 1
            self.frames.unlink_free(a, run)
            self.frames.set_kind(a, KERNEL_FREE, USER, run)
            frames = _merged(args.frames)
        return {"frames": frames, "reclaimed": int(a.size), **self._pool()}

    # ---- map / unmap ----------------------------------------------------------

    def _large_at(self, proc: Process, vp: int) -> tuple[int, int, int, int] | None:
        """The large mapping covering page ``vp``: (base, level, frame, prot), or None."""
        for lv in self.profile.large_levels:
            n = self.profile.pages_at(lv)
            base = vp - vp % n
            m = proc.large.get(base)
            if m is not None and vp < base + self.profile.pages_at(m[0]):
                return base, m[0], m[1], m[2]
        return None

    def _parent(self, key: tuple[int, int]) -> tuple[int, int]:
        """The key of the table holding the entry that points to table ``key``."""
        lv, tag = key
        if lv == 1:
            return ROOT
        s = self.profile.entry_shifts
        return lv - 1, tag >> (s[lv - 2] - s[lv - 1])

    def _missing_tables(self, proc: Process, lo: int, hi: int, down_to: int) -> list[tuple[int, int]]:
        """Table keys (level, tag) for levels 1..down_to that pages lo..hi-1 need and lack, parents first."""
        out = []
        for lv in range(1, down_to + 1):
            shift = self.profile.entry_shifts[lv - 1] - PAGE_SHIFT
            for tag in range(lo >> shift, ((hi - 1) >> shift) + 1):
                if (lv, tag) not in proc.tables:
                    out.append((lv, tag))
        return out

    def _leaf_spans(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(tag, first index, end index) in each leaf table that pages lo..hi-1 fall in, in order."""
        bits, size = self.leaf_bits, self.leaf_entries
        out = []
        for tag in range(lo >> bits, ((hi - 1) >> bits) + 1):
            base = tag << bits
            out.append((tag, max(lo, base) - base, min(hi, base + size) - base))
        return out

    def _first_small(self, proc: Process, lo: int, hi: int) -> int | None:
        """The first page in lo..hi-1 with a 4 KiB mapping, or None."""
        leaves = proc.leaves
        if not leaves:
            return None
        bits = self.leaf_bits
        if hi - lo == 1:
            e = leaves.get(lo >> bits)
            return lo if e is not None and e[lo & (self.leaf_entries - 1)] != EMPTY else None
        t0, t1 = lo >> bits, (hi - 1) >> bits
        for tag in (range(t0, t1 + 1) if t1 - t0 < len(leaves) else sorted(t for t in leaves if t0 <= t <= t1)):
            e = leaves.get(tag)
            if e is None:
                continue
            base = tag << bits
            i = max(lo, base) - base
            mapped = e[i:min(hi, base + self.leaf_entries) - base] != EMPTY
            k = int(mapped.argmax())  # the first True, or 0 when there is none
            if mapped[k]:
                return base + i + k
        return None

    def _check_map(self, caller: str, args: Any) -> tuple | Error:
        proc = self._target(caller, args.pid)
        if isinstance(proc, Error):
            return proc
        prot = args.prot
        if prot & PROT_WRITE and prot & PROT_EXEC:
            return _err(Errno.ENOTSUP, "writable and executable at once (W+X) is not supported")
        p = self.profile
        level = self.leaf
        step = 1
        large = args.large or (args.page_size is not None and args.page_size != PAGE_SIZE)
        if large:
            if not p.large_levels:
                return _err(Errno.ENOTSUP, f"{p.name} has no large pages")
            level = max(p.large_levels)  # the smallest large page of the profile
            if args.page_size is not None:
                lv = p.large_level_for(args.page_size)
                if lv is None:
                    return _err(Errno.EINVAL, f"args.page_size: {p.name} has no {args.page_size}-byte pages "
                                f"(large pages: {p.large_page_sizes})", field="page_size")
                level = lv
            step = p.pages_at(level)
        if args.vaddr % (step << PAGE_SHIFT):
            return _err(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} is not aligned to {step << PAGE_SHIFT:#x}",
                        field="vaddr")
        a = self._frames_arg(args.frames)
        if isinstance(a, Error):
            return a
        npages = int(a.size)
        vp0 = args.vaddr >> PAGE_SHIFT
        vp1 = vp0 + npages
        if vp1 > self.user_top_page:
            return _err(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} + {npages} pages goes beyond user space "
                        f"({p.user_top:#x})", field="vaddr")
        if large:
            if npages % step:
                return _err(Errno.EINVAL, f"args.frames: {npages} frames is not a whole number of "
                            f"{step}-frame large pages", field="frames")
            groups = a.reshape(-1, step)
            if np.any(groups[:, 0] % step) or np.any(groups - groups[:, :1] != np.arange(step)):
                return _err(Errno.EINVAL, f"args.frames: a large page needs {step} contiguous frames "
                            f"aligned to {step}", field="frames")
        is_mm = caller == self.mm_key
        kinds = self.frames.kind[self._index(args.frames, a)]
        if not (is_mm and (kinds[0] == USER if npages == 1 else bool((kinds == USER).all()))):
            e = self._check_map_frames(a, kinds, large, is_mm, prot)  # (the mm mapping user frames: all fine)
            if e is not None:
                return e
        # the virtual range must be empty
        if large:
            for b in range(vp0, vp1, step):
                if self._large_at(proc, b) is not None or (level + 1, b // step) in proc.tables:
                    return _err(Errno.EBUSY, f"virtual address {b << PAGE_SHIFT:#x} is already mapped",
                                vaddr=b << PAGE_SHIFT)
        else:
            busy = self._first_small(proc, vp0, vp1)
            if busy is not None:
                return _err(Errno.EBUSY, f"virtual address {busy << PAGE_SHIFT:#x} is already mapped",
                            vaddr=busy << PAGE_SHIFT)
            if proc.large:
                for lv in p.large_levels:
                    n = p.pages_at(lv)
                    for b in range(vp0 - vp0 % n, vp1, n):
                        hit = self._large_at(proc, max(b, vp0))
                        if hit is not None:
                            return _err(Errno.EBUSY, f"virtual address {hit[0] << PAGE_SHIFT:#x} is already "
                                        "mapped by a large page", vaddr=hit[0] << PAGE_SHIFT)
        missing = self._missing_tables(proc, vp0, vp1, level)
        if (e := self._over_quota(proc, len(missing), "map")) is not None:
            return e
        return proc, a, vp0, level, step, missing, is_mm

    def _check_map_frames(self, a: np.ndarray, kinds: np.ndarray, large: bool, is_mm: bool,
                          prot: int) -> Error | None:
        """The frame rules of map, in order; the first one broken names every frame that breaks it."""
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        if large:
            bad = a[kinds != USER]
            if bad.size:
                return _err(Errno.EPERM, f"frame {int(bad[0])}: a large page needs every frame user-owned",
                            frames=_runs_of(bad))
        if not is_mm:
            bad = a[kinds != KERNEL_SHARED]
            if bad.size:
                return _err(Errno.EPERM, f"frame {int(bad[0])}: a client may map only kernel-shared frames "
                            "(ask the memory manager for memory)", frames=_runs_of(bad))
        bad = a[(kinds == KERNEL_FREE) | (kinds == KERNEL_USED)]
        if bad.size:
            return _err(Errno.EPERM, f"frame {int(bad[0])} is kernel-owned", frames=_runs_of(bad))
        if prot != PROT_READ:
            bad = a[kinds == KERNEL_SHARED]
            if bad.size:
                return _err(Errno.EPERM, f"frame {int(bad[0])} is kernel-shared: read-only mappings only",
                            frames=_runs_of(bad))
        return None

    def map(self, caller: str, args: Any) -> dict | Error:
        plan = self._check_map(caller, args)
        if isinstance(plan, Error):
            return plan
        proc, a, vp0, level, step, missing, is_mm = plan
        # commit: tables first (parents before children: missing is ordered by level)
        if missing:
            self._add_tables(proc, missing)
        if step > 1:
            shift = self.profile.entry_shifts[level - 1] - PAGE_SHIFT if level > 0 else None
            for i, b in enumerate(range(vp0, vp0 + int(a.size), step)):
                proc.large[b] = (level, int(a[i * step]), args.prot)
                proc.tables[ROOT if shift is None else (level, b >> shift)][1] += 1
        else:
            self._write_small(proc, vp0, a, args.prot if is_mm else args.prot | CLIENT_MADE, len(args.frames) == 1)
        self.frames.add_refs(a, +1, run=len(args.frames) == 1)
        return {"pid": proc.pid, "pages": int(a.size), "tables_allocated": len(missing), **self._pool()}

    def _add_tables(self, proc: Process, keys: list[tuple[int, int]]) -> None:
        """Allocate the tables ``keys`` (parents first) and hang each in its parent (commit)."""
        for key, frame in zip(keys, self._kalloc(proc, len(keys))):
            proc.tables[key] = [frame, 0]
            if key[0] == self.leaf:
                spare = self._spare_leaves
                proc.leaves[key[1]] = spare.pop() if spare else np.full(self.leaf_entries, EMPTY, dtype=np.int32)
            proc.tables[self._parent(key)][1] += 1

    def _write_small(self, proc: Process, vp0: int, frames: np.ndarray, bits: int, run: bool = False) -> None:
        """Map ``frames`` (``run``: one ascending run) at pages vp0.. as 4 KiB pages with entry bits
        ``bits`` (commit: the tables exist)."""
        if frames.size == 1:
            tag = vp0 >> self.leaf_bits
            proc.leaves[tag][vp0 & (self.leaf_entries - 1)] = (int(frames[0]) << ENTRY_SHIFT) | bits
            proc.tables[(self.leaf, tag)][1] += 1
        else:
            if run:  # the entries of a run, in one pass
                f = int(frames[0])
                entries = np.arange((f << ENTRY_SHIFT) | bits, ((f + frames.size) << ENTRY_SHIFT) | bits,
                                    1 << ENTRY_SHIFT, dtype=np.int32)
            else:
                entries = (frames << ENTRY_SHIFT) | bits
            i = 0
            for tag, lo, hi in self._leaf_spans(vp0, vp0 + int(frames.size)):
                proc.leaves[tag][lo:hi] = entries[i:i + hi - lo]
                proc.tables[(self.leaf, tag)][1] += hi - lo
                i += hi - lo
        proc.small_pages += int(frames.size)

    def _check_unmap(self, caller: str, args: Any) -> tuple | Error:
        proc = self._target(caller, args.pid)
        if isinstance(proc, Error):
            return proc
        if args.vaddr % PAGE_SIZE:
            return _err(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} is not page-aligned", field="vaddr")
        vp0 = args.vaddr >> PAGE_SHIFT
        vp1 = vp0 + args.pages
        if vp1 > self.user_top_page:
            return _err(Errno.EINVAL, f"args.vaddr: the range goes beyond user space ({self.profile.user_top:#x})",
                        field="vaddr")
        spans: list[tuple[int, int, int]] = []  # (tag, first, end): mapped stretches of leaf tables
        large: list[int] = []
        leaves = proc.leaves
        bits, mask = self.leaf_bits, self.leaf_entries - 1
        vp = vp0
        while vp < vp1:
            e = leaves.get(vp >> bits)
            if e is not None:
                i = vp & mask
                j = min(mask + 1, i + vp1 - vp)
                if j - i == 1:
                    k = 1 if e[i] != EMPTY else 0
                else:
                    seg = e[i:j]
                    k = int(seg.argmin())  # EMPTY (-1) is the least entry: the first hole, if any
                    if seg[k] != EMPTY:
                        k = j - i
                if k:
                    spans.append((vp >> bits, i, i + k))
                    vp += k
                    continue
            hit = self._large_at(proc, vp) if proc.large else None
            if hit is None:
                return _err(Errno.EINVAL, f"nothing is mapped at {vp << PAGE_SHIFT:#x}", vaddr=vp << PAGE_SHIFT)
            base, lv = hit[0], hit[1]
            end = base + self.profile.pages_at(lv)
            if base < vp0 or end > vp1:
                return _err(Errno.EINVAL, f"the range cuts the large page at {base << PAGE_SHIFT:#x}; "
                            "a large page is unmapped whole", vaddr=base << PAGE_SHIFT)
            large.append(base)
            vp = end
        if caller != self.mm_key:
            theirs = self._first_made_by_mm(proc, spans, large)
            if theirs is not None:
                return _err(Errno.EPERM, f"virtual address {theirs << PAGE_SHIFT:#x} is mapped by the memory "
                            "manager: free it through the mm", vaddr=theirs << PAGE_SHIFT)
        return proc, spans, large

    def _first_made_by_mm(self, proc: Process, spans: list[tuple[int, int, int]], large: list[int]) -> int | None:
        """The first page of the stretches ``spans`` and large pages ``large`` that the mm mapped, or None.
        (A client makes only 4 KiB read-only maps of kernel-shared frames; every large page is the mm's.)"""
        for tag, i, j in spans:
            theirs = (proc.leaves[tag][i:j] & CLIENT_MADE) == 0
            k = int(theirs.argmax())
            if theirs[k]:
                first = (tag << self.leaf_bits) + i + k
                return min([first] + large[:1])
        return large[0] if large else None

    def unmap(self, caller: str, args: Any) -> dict | Error:
        plan = self._check_unmap(caller, args)
        if isinstance(plan, Error):
            return plan
        proc, spans, large = plan
        if not large and len(spans) == 1 and spans[0][2] - spans[0][1] == 1:  # one page: no arrays
            tag, i, _ = spans[0]
            e = proc.leaves[tag]
            f = int(e[i]) >> ENTRY_SHIFT
            e[i] = EMPTY
            proc.small_pages -= 1
            freed = self._drop_entries(proc, {(self.leaf, tag): 1})
            self.frames.add_ref(f, -1)
            return {"pid": proc.pid, "pages": 1, "frames": [[f, 1]], "tables_freed": freed, **self._pool()}
        p = self.profile
        parts: list[np.ndarray] = []
        drops: dict[tuple[int, int], int] = {}  # table -> entries cleared in it
        small = 0
        for tag, i, j in spans:
            e = proc.leaves[tag]
            parts.append(e[i:j] >> ENTRY_SHIFT)  # (int32 throughout: frame numbers are below 2^25)
            e[i:j] = EMPTY
            key = (self.leaf, tag)
            drops[key] = drops.get(key, 0) + j - i
            small += j - i
        proc.small_pages -= small
        for base in large:
            lv, f, _ = proc.large.pop(base)
            parts.append(np.arange(f, f + p.pages_at(lv), dtype=np.int32))
            key = ROOT if lv == 0 else (lv, base >> (p.entry_shifts[lv - 1] - PAGE_SHIFT))
            drops[key] = drops.get(key, 0) + 1
        freed = self._drop_entries(proc, drops)
        a = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # the reply's runs (as R.from_array makes them), and one diff tells add_refs whether it is one run
        cut = np.diff(a) != 1
        run = not cut.any()
        self.frames.add_refs(a, -1, run=run)
        if not run:
            breaks = np.flatnonzero(cut) + 1
            starts, ends = np.concatenate(([0], breaks)), np.concatenate((breaks, [a.size]))
            frames = [[f, e - s] for f, s, e in zip(a[starts].tolist(), starts.tolist(), ends.tolist())]
        else:
            frames = [[int(a[0]), int(a.size)]]
        return {"pid": proc.pid, "pages": int(a.size), "frames": frames, "tables_freed": freed, **self._pool()}

    def _drop_entries(self, proc: Process, entries: dict[tuple[int, int], int]) -> int:
        """Decrement table entry counts; free tables that become empty, bottom-up."""
        p = self.profile
        to_free: list[int] = []
        for lv in range(p.levels - 1, 0, -1):
            for key in [k for k in entries if k[0] == lv]:
                t = proc.tables[key]
                t[1] -= entries.pop(key)
                if t[1] == 0:
                    del proc.tables[key]
                    if lv == self.leaf:
                        emptied = proc.leaves.pop(key[1])
                        if len(self._spare_leaves) < SPARE_LEAVES:
                            self._spare_leaves.append(emptied)
                    to_free.append(t[0])
                    parent = self._parent(key)
                    entries[parent] = entries.get(parent, 0) + 1
        if ROOT in entries:
            proc.tables[ROOT][1] -= entries.pop(ROOT)
        if to_free:
            self._kfree(proc, to_free)
        return len(to_free)

    # ---- threads and endpoints (the client's own kernel objects) ------------

    def thread_create(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        if (e := self._over_quota(proc, 1, "thread_create")) is not None:
            return e
        frame = self._kalloc(proc, 1)[0]
        tid = self._new_id("tid")
        proc.threads[tid] = frame
        return {"tid": tid, "kernel_frames": 1}

    def thread_destroy(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        if args.tid not in proc.threads:
            return _err(Errno.ESRCH, f"no thread {args.tid} in process {proc.pid}", tid=args.tid)
        self._kfree(proc, [proc.threads.pop(args.tid)])
        return {"tid": args.tid}

    def endpoint_create(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        needed = proc.slab.needs_frame()
        if (e := self._over_quota(proc, needed, "endpoint_create")) is not None:
            return e
        fresh = self._kalloc(proc, needed)
        obj = proc.slab.alloc(fresh[0] if fresh else None)
        eid = self._new_id("eid")
        proc.endpoints[eid] = obj
        return {"eid": eid, "kernel_frames": needed}

    def endpoint_destroy(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        if args.eid not in proc.endpoints:
            return _err(Errno.ESRCH, f"no endpoint {args.eid} in process {proc.pid}", eid=args.eid)
        empty = proc.slab.free(*proc.endpoints.pop(args.eid))
        self._kfree(proc, [] if empty is None else [empty])
        return {"eid": args.eid}

    # ---- state for checks and tests ------------------------------------------

    def digest(self) -> str:
        """A hash of every piece of kernel state (frame table and objects)."""
        import hashlib

        h = hashlib.sha256(self.frames.digest().encode())
        for pid in sorted(self.procs):
            pr = self.procs[pid]
            h.update(repr((pid, pr.key, pr.obj_frame, pr.root_frame, pr.kernel_limit, pr.kernel_used,
                           pr.user_quota, sorted(pr.tables.items()), pr.small_pages, sorted(pr.large.items()),
                           sorted(pr.threads.items()), sorted(pr.endpoints.items()), sorted(pr.leaves),
                           sorted(pr.slab.used.items()),
                           sorted((f, sorted(v)) for f, v in pr.slab.free_slots.items()))).encode())
            for tag in sorted(pr.leaves):
                h.update(pr.leaves[tag].tobytes())
        h.update(repr((self.next_id, self.event_seq, self.reserved)).encode())
        return h.hexdigest()
