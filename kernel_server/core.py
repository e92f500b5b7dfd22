"""The kernel's logic: frame ownership, address spaces, kernel objects, system calls.

Rules for this file (as h11 states its own): no sockets, no clocks, no
randomness, no I/O. ``KernelCore.call(caller, name, args)`` takes the caller's
identity (a CURVE public key, never a routing id) and a validated args model
and returns a result dict or an ``Error``. Every call is written as
*check, then commit* (seL4's decode/invoke): ``_check_<call>`` validates
everything, computes every kernel frame it will take and may return an Error
without having changed anything; ``_commit_<call>`` applies the plan and cannot
fail. Donate and reclaim take no kernel memory at all.
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


def _err(code: Errno, message: str, **details: Any) -> Error:
    return Error(code, message, details)


def _runs_of(frames: np.ndarray, limit: int = 64) -> list[list[int]]:
    """Runs naming (at most ``limit`` runs of) the offending frames, for error details."""
    return R.from_array(np.unique(frames))[:limit]


@dataclass
class Process:
    pid: int
    key: str
    obj: tuple[int, int]  # process slab object (frame, slot)
    root_frame: int  # page directory / PML4 frame, or -1 when the root is a slab PDPT
    pdpt: tuple[int, int] | None  # PAE: the PDPT slab object
    tables: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (level, tag) -> [frame, used]
    pages: dict[int, int] = field(default_factory=dict)  # vpage -> frame << 3 | prot (4 KiB mappings)
    large: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # base vpage -> (level, frame, prot)
    threads: dict[int, int] = field(default_factory=dict)  # tid -> frame
    endpoints: dict[int, tuple[int, int]] = field(default_factory=dict)  # eid -> slab object

    def usage(self) -> dict[str, int]:
        return {
            "pid": self.pid,
            "key": self.key,
            "pages": len(self.pages),
            "large_pages": len(self.large),
            "tables": len(self.tables) - 1 + (1 if self.root_frame >= 0 else 0),
            "threads": len(self.threads),
            "endpoints": len(self.endpoints),
        }


class KernelCore:
    """The kernel: one frame table, processes, slabs, and the system calls."""

    def __init__(self, profile: Profile, bootmap: BootMap, mm_key: str) -> None:
        self.profile = profile
        self.bootmap = bootmap
        self.mm_key = mm_key
        self.frames = FrameTable(bootmap, profile.kernel_limit)
        self.slabs = {kind: SlabCache(kind) for kind in ("process", "endpoint", "pdpt")}
        self.procs: dict[int, Process] = {}
        self.by_key: dict[str, int] = {}
        self.next_id = {"pid": 1, "tid": 1, "eid": 1}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_LOG)
        self.event_seq = 0
        self.user_top_page = profile.user_top >> PAGE_SHIFT
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

    def _kalloc(self, n: int) -> list[int]:
        got = self.frames.pop_free(n)
        self.frames.set_kind(got, KERNEL_FREE, KERNEL_USED)
        return got.tolist()

    def _kfree(self, frames: list[int]) -> None:
        if frames:
            a = np.asarray(frames, dtype=np.int64)
            self.frames.set_kind(a, KERNEL_USED, KERNEL_FREE)
            self.frames.push_free(a)

    def _enomem(self, needed: int, what: str) -> Error | None:
        available = self.frames.free_count
        if needed > available:
            return _err(Errno.ENOMEM, f"{what} needs {needed} kernel frame(s), {available} free",
                        needed=needed, available=available)
        return None

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
            "pid": self.by_key.get(caller),
        }

    def address_map(self, caller: str, args: Any) -> dict:
        return {
            "arch": self.profile.name,
            "frames": self.frames.n,
            "kernel_limit": self.profile.kernel_limit,
            "entries": self.bootmap.to_wire(),
        }

    def ping(self, caller: str, args: Any) -> dict:
        return {"pid": self.by_key.get(caller)}

    def stats(self, caller: str, args: Any) -> dict:
        return {
            **self.frames.counts(),
            "frames": self.frames.n,
            "processes": len(self.procs),
            "slab_frames": {k: len(s.used) for k, s in self.slabs.items()},
            "per_process": [p.usage() for p in self.procs.values()],
            "event_seq": self.event_seq,
            "large_mappings": self._large_runs(),
        }

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
        if (e := self._need_mm(caller, "read kernel events")) is not None:
            return e
        oldest = self.events[0]["seq"] if self.events else self.event_seq + 1
        out = [ev for ev in self.events if ev["seq"] > args.since][: args.limit]
        return {
            "events": out,
            "next": out[-1]["seq"] if out else max(args.since, 0),
            "lost": bool(self.events) and args.since + 1 < oldest,
            "latest": self.event_seq,
        }

    def frame_info(self, caller: str, args: Any) -> dict | Error:
        if (e := self._need_mm(caller, "read the frame table")) is not None:
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

    # ---- processes --------------------------------------------------------

    def _check_proc_create(self, caller: str, args: Any) -> int | Error:
        if (e := self._need_mm(caller, "create processes")) is not None:
            return e
        if args.key == self.mm_key:
            return _err(Errno.EINVAL, "args.key: the memory manager's key cannot own a process", field="key")
        if args.key in self.by_key:
            pid = self.by_key[args.key]
            return _err(Errno.EBUSY, f"key already has process {pid}", pid=pid)
        needed = self.slabs["process"].needs_frame()
        needed += self.slabs["pdpt"].needs_frame() if self.profile.root_is_slab else 1
        if (e := self._enomem(needed, "proc_create")) is not None:
            return e
        return needed

    def proc_create(self, caller: str, args: Any) -> dict | Error:
        needed = self._check_proc_create(caller, args)
        if isinstance(needed, Error):
            return needed
        # commit
        fresh = self._kalloc(needed)
        take = fresh.pop if fresh else (lambda: None)
        obj = self.slabs["process"].alloc(take() if self.slabs["process"].needs_frame() else None)
        if self.profile.root_is_slab:
            pdpt = self.slabs["pdpt"].alloc(take() if self.slabs["pdpt"].needs_frame() else None)
            root = -1
        else:
            pdpt, root = None, take()
        pid = self._new_id("pid")
        proc = Process(pid=pid, key=args.key, obj=obj, root_frame=root, pdpt=pdpt)
        proc.tables[ROOT] = [root, 0]
        self.procs[pid] = proc
        self.by_key[args.key] = pid
        return {"pid": pid, "kernel_frames": needed}

    def proc_destroy_call(self, caller: str, args: Any) -> dict | Error:
        if (e := self._need_mm(caller, "destroy processes")) is not None:
            return e
        if args.pid not in self.procs:
            return _err(Errno.ESRCH, f"no process {args.pid}", pid=args.pid)
        return self.proc_destroy(args.pid, "proc_destroy")

    def proc_destroy(self, pid: int, reason: str) -> dict:
        """Release everything a process holds (commit only: cannot fail). Also used for leases."""
        proc = self.procs.pop(pid)
        del self.by_key[proc.key]
        user = [f >> 3 for f in proc.pages.values()]
        for level, frame, _prot in proc.large.values():
            n = self.profile.pages_at(level)
            user.extend(range(frame, frame + n))
        released = np.asarray(user, dtype=np.int64)
        self.frames.add_refs(released, -1)
        kfree = [t[0] for k, t in proc.tables.items() if t[0] >= 0]
        kfree.extend(proc.threads.values())
        for eid, (frame, slot) in proc.endpoints.items():
            if (empty := self.slabs["endpoint"].free(frame, slot)) is not None:
                kfree.append(empty)
        if (empty := self.slabs["process"].free(*proc.obj)) is not None:
            kfree.append(empty)
        if proc.pdpt is not None and (empty := self.slabs["pdpt"].free(*proc.pdpt)) is not None:
            kfree.append(empty)
        self._kfree(kfree)
        frames = R.normalize(R.from_array(released)) if released.size else []
        self.event_seq += 1
        self.events.append({"seq": self.event_seq, "kind": "proc_destroyed", "pid": pid, "key": proc.key,
                            "reason": reason, "frames": frames})
        return {"pid": pid, "unmapped_pages": int(released.size), "kernel_frames_freed": len(kfree),
                "frames": frames}

    # ---- donate / reclaim (no kernel allocation, ever) ----------------------

    def _check_donate(self, caller: str, args: Any) -> np.ndarray | Error:
        if (e := self._need_mm(caller, "donate frames")) is not None:
            return e
        a = self._frames_arg(args.frames)
        if isinstance(a, Error):
            return a
        if np.unique(a).size != a.size:
            return _err(Errno.EINVAL, "args.frames: a frame appears twice", field="frames")
        kinds = self.frames.kind[a]
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        bad = a[kinds != USER]
        if bad.size:
            return _err(Errno.EEXIST, f"frame {int(bad[0])} is already kernel-owned", frames=_runs_of(bad))
        bad = a[self.frames.refs[a] > 0]
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
        self.frames.set_kind(a, USER, KERNEL_FREE)
        self.frames.push_free(a)  # the first donated frame is handed out first
        return {"donated": int(a.size), "kernel_free": self.frames.free_count}

    def _check_reclaim(self, caller: str, args: Any) -> np.ndarray | int | Error:
        if (e := self._need_mm(caller, "reclaim frames")) is not None:
            return e
        if args.count is not None:
            return min(args.count, self.frames.free_count)
        a = self._frames_arg(args.frames)
        if isinstance(a, Error):
            return a
        if np.unique(a).size != a.size:
            return _err(Errno.EINVAL, "args.frames: a frame appears twice", field="frames")
        kinds = self.frames.kind[a]
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        bad = a[kinds == USER]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not kernel-owned", frames=_runs_of(bad))
        bad = a[kinds != KERNEL_FREE]
        if bad.size:
            return _err(Errno.EBUSY, f"kernel frame {int(bad[0])} is in use", frames=_runs_of(bad))
        return a

    def reclaim(self, caller: str, args: Any) -> dict | Error:
        plan = self._check_reclaim(caller, args)
        if isinstance(plan, Error):
            return plan
        if isinstance(plan, int):
            a = self.frames.pop_free(plan)
        else:
            a = plan
            self.frames.unlink_free(a)
        self.frames.set_kind(a, KERNEL_FREE, USER)
        return {"frames": R.from_array(a), "reclaimed": int(a.size), "kernel_free": self.frames.free_count}

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

    def _missing_tables(self, proc: Process, vps: np.ndarray, down_to: int) -> list[tuple[int, int]]:
        """Table keys (level, tag) for levels 1..down_to that pages ``vps`` need and lack."""
        out = []
        for lv in range(1, down_to + 1):
            shift = self.profile.entry_shifts[lv - 1] - PAGE_SHIFT
            for tag in np.unique(vps >> shift).tolist():
                if (lv, tag) not in proc.tables:
                    out.append((lv, tag))
        return out

    def _check_map(self, caller: str, args: Any) -> tuple | Error:
        proc = self._target(caller, args.pid)
        if isinstance(proc, Error):
            return proc
        prot = args.prot
        if prot & PROT_WRITE and prot & PROT_EXEC:
            return _err(Errno.ENOTSUP, "writable and executable at once (W+X) is not supported")
        p = self.profile
        level = p.levels - 1
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
        if vp0 + npages > self.user_top_page:
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
        kinds = self.frames.kind[a]
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        if large:
            bad = a[kinds != USER]
            if bad.size:
                return _err(Errno.EPERM, f"frame {int(bad[0])}: a large page needs every frame user-owned",
                            frames=_runs_of(bad))
        if caller != self.mm_key:
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
        # the virtual range must be empty
        if large:
            bases = vp0 + np.arange(0, npages, step)
            for b in bases.tolist():
                if self._large_at(proc, b) is not None or (level + 1, b // step) in proc.tables:
                    return _err(Errno.EBUSY, f"virtual address {b << PAGE_SHIFT:#x} is already mapped",
                                vaddr=b << PAGE_SHIFT)
            vps = bases
            down_to = level
        else:
            rng = range(vp0, vp0 + npages)
            if not proc.pages.keys().isdisjoint(rng):
                busy = next(v for v in rng if v in proc.pages)
                return _err(Errno.EBUSY, f"virtual address {busy << PAGE_SHIFT:#x} is already mapped",
                            vaddr=busy << PAGE_SHIFT)
            vps = np.arange(vp0, vp0 + npages, dtype=np.int64)
            if proc.large:
                for lv in p.large_levels:
                    n = p.pages_at(lv)
                    for b in np.unique(vps - vps % n).tolist():
                        hit = self._large_at(proc, max(b, vp0))
                        if hit is not None:
                            return _err(Errno.EBUSY, f"virtual address {hit[0] << PAGE_SHIFT:#x} is already "
                                        "mapped by a large page", vaddr=hit[0] << PAGE_SHIFT)
            down_to = level
        missing = self._missing_tables(proc, vps, down_to)
        if (e := self._enomem(len(missing), "map")) is not None:
            return e
        return proc, a, vps, level, step, missing

    def map(self, caller: str, args: Any) -> dict | Error:
        plan = self._check_map(caller, args)
        if isinstance(plan, Error):
            return plan
        proc, a, vps, level, step, missing = plan
        p = self.profile
        # commit: tables first (parents before children: missing is ordered by level)
        for key, frame in zip(missing, self._kalloc(len(missing))):
            lv, tag = key
            proc.tables[key] = [frame, 0]
            parent = ROOT if lv == 1 else (lv - 1, tag >> (p.entry_shifts[lv - 2] - p.entry_shifts[lv - 1]))
            proc.tables[parent][1] += 1
        shift = p.entry_shifts[level - 1] - PAGE_SHIFT if level > 0 else None
        if step > 1:
            for b, f in zip(vps.tolist(), a[::step].tolist()):
                proc.large[b] = (level, f, args.prot)
        else:
            proc.pages.update(zip(vps.tolist(), ((a << 3) | args.prot).tolist()))
        if shift is None:
            proc.tables[ROOT][1] += int(vps.size)
        else:
            tags, counts = np.unique(vps >> shift, return_counts=True)
            for tag, c in zip(tags.tolist(), counts.tolist()):
                proc.tables[(level, tag)][1] += c
        self.frames.add_refs(a, +1)
        return {"pid": proc.pid, "pages": int(a.size), "tables_allocated": len(missing),
                "kernel_free": self.frames.free_count}

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
        small: list[int] = []
        large: list[int] = []
        pages = proc.pages
        vp = vp0
        while vp < vp1:
            if vp in pages:
                small.append(vp)
                vp += 1
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
        return proc, small, large

    def unmap(self, caller: str, args: Any) -> dict | Error:
        plan = self._check_unmap(caller, args)
        if isinstance(plan, Error):
            return plan
        proc, small, large = plan
        p = self.profile
        frames: list[int] = []
        entries: dict[tuple[int, int], int] = {}
        leaf = p.levels - 1
        leaf_shift = p.entry_shifts[leaf - 1] - PAGE_SHIFT
        for vp in small:
            frames.append(proc.pages.pop(vp) >> 3)
            key = (leaf, vp >> leaf_shift)
            entries[key] = entries.get(key, 0) + 1
        for base in large:
            lv, f, _ = proc.large.pop(base)
            frames.extend(range(f, f + p.pages_at(lv)))
            key = ROOT if lv == 0 else (lv, base >> (p.entry_shifts[lv - 1] - PAGE_SHIFT))
            entries[key] = entries.get(key, 0) + 1
        freed = self._drop_entries(proc, entries)
        a = np.asarray(frames, dtype=np.int64)
        self.frames.add_refs(a, -1)
        return {"pid": proc.pid, "pages": int(a.size), "frames": R.from_array(a), "tables_freed": freed,
                "kernel_free": self.frames.free_count}

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
                    to_free.append(t[0])
                    parent = ROOT if lv == 1 else (lv - 1, key[1] >> (p.entry_shifts[lv - 2] - p.entry_shifts[lv - 1]))
                    entries[parent] = entries.get(parent, 0) + 1
        if ROOT in entries:
            proc.tables[ROOT][1] -= entries.pop(ROOT)
        self._kfree(to_free)
        return len(to_free)

    # ---- threads and endpoints (the client's own kernel objects) ------------

    def thread_create(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        if (e := self._enomem(1, "thread_create")) is not None:
            return e
        frame = self._kalloc(1)[0]
        tid = self._new_id("tid")
        proc.threads[tid] = frame
        return {"tid": tid, "kernel_frames": 1}

    def thread_destroy(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        if args.tid not in proc.threads:
            return _err(Errno.ESRCH, f"no thread {args.tid} in process {proc.pid}", tid=args.tid)
        self._kfree([proc.threads.pop(args.tid)])
        return {"tid": args.tid}

    def endpoint_create(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        needed = self.slabs["endpoint"].needs_frame()
        if (e := self._enomem(needed, "endpoint_create")) is not None:
            return e
        fresh = self._kalloc(needed)
        obj = self.slabs["endpoint"].alloc(fresh[0] if fresh else None)
        eid = self._new_id("eid")
        proc.endpoints[eid] = obj
        return {"eid": eid, "kernel_frames": needed}

    def endpoint_destroy(self, caller: str, args: Any) -> dict | Error:
        proc = self._own_process(caller)
        if isinstance(proc, Error):
            return proc
        if args.eid not in proc.endpoints:
            return _err(Errno.ESRCH, f"no endpoint {args.eid} in process {proc.pid}", eid=args.eid)
        empty = self.slabs["endpoint"].free(*proc.endpoints.pop(args.eid))
        self._kfree([] if empty is None else [empty])
        return {"eid": args.eid}

    # ---- state for checks and tests ------------------------------------------

    def digest(self) -> str:
        """A hash of every piece of kernel state (frame table and objects)."""
        import hashlib

        h = hashlib.sha256(self.frames.digest().encode())
        for pid in sorted(self.procs):
            pr = self.procs[pid]
            h.update(repr((pid, pr.key, pr.obj, pr.root_frame, pr.pdpt, sorted(pr.tables.items()),
                           sorted(pr.pages.items()), sorted(pr.large.items()), sorted(pr.threads.items()),
                           sorted(pr.endpoints.items()))).encode())
        for k, s in sorted(self.slabs.items()):
            h.update(repr((k, sorted(s.used.items()), sorted((f, sorted(v)) for f, v in s.free_slots.items()))).encode())
        h.update(repr((self.next_id, self.event_seq)).encode())
        return h.hexdigest()
