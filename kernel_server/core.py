"""The kernel's system calls over its state: one frame table, processes, kernel memory.

Rules for this file: no sockets, no clocks, no randomness, no I/O. ``KernelCore.call(caller,
name, args)`` takes the caller's identity (a CURVE public key, never a routing id) and a
validated args model and returns a result dict or an ``Error``.

Dispatch follows the one table of calls (``kernel_server.calls.CALLS``): the caller's rule
(``Who``) is checked first, with the same refusals for every call of a kind; then the call's own
rules, in the documented order of ``CALLS[name].rules``. Every call that changes state is
*check, then commit* (seL4's decode/invoke): ``_check_<call>`` validates everything, computes
every kernel frame it will take and returns a frozen plan (a NamedTuple: immutable, and cheap
to build on the hot path) or an Error, having changed nothing; ``_commit_<call>`` applies the
plan and cannot fail. Read-only calls are one ``_read_<call>``. Donate and reclaim take no
kernel memory at all.

Kernel memory is charged (I13). Every kernel frame a process causes (its object frame: the
process object, and with PAE its PDPT; its root table; its page tables; its threads; its own
endpoint slab frames) is charged to that process, up to the ``kernel_quota`` the mm set at
``proc_create``; past it a call fails with ENOMEM carrying ``needed``, ``limit``, ``used`` and
``pid``. The pool always holds the unused part of every quota (``reserved``): ``proc_create``
takes a quota only from unreserved free frames (else ENOMEM ``needed``/``available``: the pool's
only ENOMEM) and ``reclaim`` never takes reserved ones, so a process within its quota never
finds the pool empty.

Bounded work: what a request names (runs, ranges) is checked by arithmetic before anything is
expanded, a client maps or unmaps at most ``MAX_CLIENT_PAGES`` pages in ``MAX_CLIENT_RUNS`` runs
per call, listings stop at a size (``frame_info`` scans at most ``FRAME_INFO_SCAN`` frames per
call, ``mappings`` stops at ``max_segments``, ``events`` at ``EVENTS_BYTES``), and frame lists
in replies and events are capped (``REPLY_RUNS``, ``EVENT_RUNS``).

The page-table tree lives in ``pagetable`` (a ``Process`` is an ``AddressSpace`` plus its kernel
objects); the frame table in ``frames``. A watcher (``observe.KernelObserver``) hears of every call
and every write, if one is set.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import deque
from typing import Any, Callable, NamedTuple

import numpy as np

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE, Profile
from kernel_server.bootmap import BootMap
from kernel_server.calls import CALLS, Who
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, KIND_NAMES, NONE, USER, FrameTable
from kernel_server.observe import NO_OBSERVER, KernelObserver
from kernel_server.pagetable import CLIENT_MADE, EMPTY, ENTRY_SHIFT, PROT_MASK, ROOT, Geometry, Key, Span
from kernel_server.process import Process
from protocol import PROT_EXEC, PROT_READ, PROT_WRITE, PROTOCOL_VERSION
from protocol import runs as R
from protocol.errors import Errno, Error

EVENT_LOG = 10_000  # events kept for the mm to read
EVENT_RUNS = 256  # frame runs an event (and a proc_destroy reply) lists; "truncated" says when there were more
EVENTS_BYTES = 256 << 10  # an events reply stops adding events at about this many bytes
REPLY_RUNS = 4096  # frame runs an unmap or reclaim reply lists at most (reclaim count takes no more runs)
FRAME_INFO_SCAN = 1 << 16  # frames one frame_info call looks at, at most (``rest`` goes on from there)
MAX_CLIENT_PAGES = 256  # pages a client maps or unmaps in one call (it maps only kernel-shared frames: 1 MiB)
MAX_CLIENT_RUNS = 16  # runs a client names in one map
LARGE_RUNS_SHOWN = 256  # stats lists at most this many runs of frames under large mappings
ERROR_RUNS = 64  # runs of offending frames an error names at most
SCALAR_FRAMES = 16  # kernel frames taken or given back one at a time, with scalars, when there are at most this many
_PAGE_MASK = PAGE_SIZE - 1
_tuple_new = tuple.__new__  # a NamedTuple plan from a tuple of its fields, without its Python-level __new__
# the caller's rules as plain names (an enum member looked up on its class costs ~0.1 us in Python 3.11)
_W_ANYONE, _W_MM, _W_READER, _W_MM_OR_OWN = Who.ANYONE, Who.MM, Who.READER, Who.MM_OR_OWN
_NO_LARGE: list[int] = []  # an unmap plan's large pages when there are none (never written)
_KIND_NAME = np.array([KIND_NAMES[k] for k in range(max(KIND_NAMES) + 1)], dtype=object)  # kind code -> name

__all__ = ["CLIENT_MADE", "EMPTY", "ENTRY_SHIFT", "PROT_MASK", "ROOT", "KernelCore", "Process"]


def _err(code: Errno, message: str, **details: Any) -> Error:
    return Error(code, message, details)


def _runs_of(frames: np.ndarray) -> list[list[int]]:
    """Runs naming (at most ERROR_RUNS runs of) the offending frames, for error details."""
    return R.from_array(np.unique(frames))[:ERROR_RUNS]


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


def _expand(runs: list[list[int]]) -> np.ndarray:
    """The frames of ``runs`` in order (``R.to_array``, in a few numpy passes however many runs)."""
    if len(runs) == 1:
        f, c = runs[0]
        return np.arange(f, f + c, dtype=np.int64)
    r = np.asarray(runs, dtype=np.int64)
    counts = r[:, 1]
    ends = np.cumsum(counts)
    return np.repeat(r[:, 0] - (ends - counts), counts) + np.arange(int(ends[-1]), dtype=np.int64)


def _runs_capped(a: np.ndarray, cap: int) -> tuple[list[list[int]], bool]:
    """The runs of frames ``a`` in order (as ``R.from_array``), at most ``cap`` of them; and whether
    there were more."""
    if a.size == 0:
        return [], False
    cut = np.diff(a) != 1
    if not cut.any():
        return [[int(a[0]), int(a.size)]], False
    breaks = np.flatnonzero(cut) + 1
    starts, ends = np.concatenate(([0], breaks)), np.concatenate((breaks, [a.size]))
    more = starts.size > cap
    starts, ends = starts[:cap], ends[:cap]
    return [[f, e - s] for f, s, e in zip(a[starts].tolist(), starts.tolist(), ends.tolist())], more


# ---- plans: what a check decided, for its commit ------------------------------------------------------

class ProcCreatePlan(NamedTuple):
    key: str
    kernel_quota: int
    user_quota: int


class ProcDestroyPlan(NamedTuple):
    proc: Process
    reason: str


class DonatePlan(NamedTuple):
    frames: np.ndarray | None  # None: the one run first..first+count-1
    first: int
    count: int


class ReclaimPlan(NamedTuple):
    frames: np.ndarray | None  # the frames named (None: take up to ``count`` from the list's head)
    count: int
    runs: list[list[int]]  # the runs named, merged (for the reply), or []


class MapPlan(NamedTuple):
    proc: Process
    frames: np.ndarray | None  # None: the one run first..first+pages-1
    first: int
    vpage: int
    pages: int
    level: int  # the level whose entries map it (the leaf level for 4 KiB pages)
    large: list[int] | None  # first frames of the large pages, or None for 4 KiB pages
    missing: list[Key]  # the tables to make, parents first
    bits: int  # leaf entry bits: prot, and CLIENT_MADE for a client's own map
    prot: int
    all_user: bool = False  # every frame is USER (the check saw it): the commit need not look at their kinds


class UnmapPlan(NamedTuple):
    proc: Process
    spans: list[Span]  # mapped stretches of leaf tables, in virtual address order
    large: list[int]  # bases of large mappings


class ThreadCreatePlan(NamedTuple):
    proc: Process


class ThreadDestroyPlan(NamedTuple):
    proc: Process
    tid: int


class EndpointCreatePlan(NamedTuple):
    proc: Process
    new_frame: int  # 1 if the slab needs a frame, else 0


class EndpointDestroyPlan(NamedTuple):
    proc: Process
    eid: int


# ---- the kernel -------------------------------------------------------------------------------------

Entry = tuple[Who, str, Callable[..., Any], Callable[..., Any] | None]  # (who, verb, check or read, commit)


class KernelCore:
    """The kernel: one frame table, processes, and the system calls."""

    def __init__(self, profile: Profile, bootmap: BootMap, mm_key: str, operator_key: str | None = None,
                 observer: KernelObserver | None = None) -> None:
        self.profile = profile
        self.bootmap = bootmap
        self.mm_key = mm_key
        self.operator_key = operator_key  # may read what the mm reads (frame_info, mappings, listings)
        self.frames = FrameTable(bootmap, profile.kernel_limit)
        self.geo = Geometry(profile)
        self.reserved = 0  # free frames promised to processes: the sum of (kernel_limit - kernel_used)
        self.base_cost = 1 if profile.root_is_slab else 2  # a process's object frame (+ its root table)
        self.procs: dict[int, Process] = {}  # by pid, in creation order (pids only grow)
        self.by_key: dict[str, int] = {}
        self.next_id = {"pid": 1, "tid": 1, "eid": 1}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_LOG)
        self.event_seq = 0
        self.user_top_page = profile.user_top >> PAGE_SHIFT
        self._large_page_sizes = tuple(profile.large_page_sizes)  # (a property that builds a list)
        self.spare_leaves: list[np.ndarray] = []  # all EMPTY: from leaf tables unmap freed
        # the large pages mapped anywhere, for stats: (first frame, pages) -> mappings, and the keys in order
        self.large_index: dict[tuple[int, int], int] = {}
        self.large_keys: list[tuple[int, int]] = []
        self.observer: KernelObserver = NO_OBSERVER
        self._watched = False
        self.set_observer(observer)
        self._dispatch: dict[str, Entry] = {}
        for name, spec in CALLS.items():
            if spec.mutates:
                entry = (spec.who, spec.verb, getattr(self, f"_check_{name}"), getattr(self, f"_commit_{name}"))
            else:
                entry = (spec.who, spec.verb, getattr(self, f"_read_{name}"), None)
            self._dispatch[name] = entry

    # ---- the geometry, as callers and checkers know it -------------------------------------------------

    @property
    def leaf(self) -> int:
        return self.geo.leaf

    @property
    def leaf_bits(self) -> int:
        return self.geo.leaf_bits

    @property
    def leaf_entries(self) -> int:
        return self.geo.leaf_entries

    def set_observer(self, observer: KernelObserver | None) -> None:
        """Tell ``observer`` of every call and write from now on (None: the shared no-op one)."""
        self.observer = observer if observer is not None else NO_OBSERVER
        self._watched = self.observer is not NO_OBSERVER
        self.frames.watch = self.observer if self._watched else None

    # ---- dispatch ---------------------------------------------------------------------------------

    def call(self, caller: str, name: str, args: Any) -> dict | Error:
        """Run call ``name`` for ``caller`` with validated ``args``: the caller's rule, then the call's."""
        entry = self._dispatch.get(name)
        if entry is None:
            return _err(Errno.ENOSYS, f"unknown call {name!r}")
        if self._watched:
            self.observer.call_begun(caller, name, args)
            out = self._run(entry, caller, args)
            self.observer.call_ended(caller, name, out)
            return out
        return self._run(entry, caller, args)

    def _run(self, entry: Entry, caller: str, args: Any) -> dict | Error:
        who, verb, check, commit = entry
        if who is _W_MM_OR_OWN:
            if caller == self.mm_key and args.pid is not None:  # the usual case of ``_target``
                proc: Process | Error | None = self.procs.get(args.pid)
                if proc is None:
                    proc = self._target(caller, args)
            else:
                proc = self._target(caller, args)
        else:
            proc = self._caller(who, verb, caller)
        if type(proc) is Error:
            return proc
        plan = check(caller, proc, args)
        if commit is None or type(plan) is Error:
            return plan
        return commit(plan)

    def refuse_caller(self, caller: str, name: str, raw: dict[str, Any] | None = None) -> Error | None:
        """The caller's rule of ``name`` decided from its identity alone, and for map and unmap by anyone
        but the mm the size of the call from the raw (unvalidated) arguments ``raw`` (None: it may go on;
        map and unmap decide on their target later). The service asks this before validating arguments."""
        entry = self._dispatch.get(name)
        if entry is None:
            return None
        if entry[0] is _W_MM_OR_OWN:
            if caller == self.mm_key or raw is None:
                return None
            return self._client_size(raw.get("frames"), raw.get("pages"))
        got = self._caller(entry[0], entry[1], caller)
        return got if isinstance(got, Error) else None

    @staticmethod
    def _client_size(frames: Any, pages: Any) -> Error | None:
        """E2BIG if a client's map (``frames``: runs) or unmap (``pages``) is larger than one client call
        may be. Arithmetic on counts only, safe on unvalidated values (what is not a count is left to the
        argument checks)."""
        if type(frames) is list:
            if len(frames) > MAX_CLIENT_RUNS:
                return _err(Errno.E2BIG, f"a client maps or unmaps at most {MAX_CLIENT_PAGES} pages in at most "
                            f"{MAX_CLIENT_RUNS} runs per call ({len(frames)} runs asked)")
            pages = sum(r[1] for r in frames if type(r) is list and len(r) == 2 and type(r[1]) is int)
        if type(pages) is int and pages > MAX_CLIENT_PAGES:
            return _err(Errno.E2BIG, f"a client maps or unmaps at most {MAX_CLIENT_PAGES} pages per call "
                        f"({pages} asked)")
        return None

    def _caller(self, who: Who, verb: str, caller: str) -> Process | Error | None:
        """The caller's rule: an Error, or the caller's process (PROCESS calls), or None."""
        if who is _W_ANYONE:
            return None
        if who is _W_MM:
            if caller != self.mm_key:
                return _err(Errno.EPERM, f"only the memory manager may {verb}")
            return None
        if who is _W_READER:
            if not self.is_reader(caller):
                return _err(Errno.EPERM, f"only the memory manager and the operator may {verb}")
            return None
        pid = self.by_key.get(caller)  # Who.PROCESS
        if pid is None:
            return _err(Errno.ESRCH, "the caller has no process (the memory manager creates it)")
        return self.procs[pid]

    def is_reader(self, caller: str) -> bool:
        """The mm or the operator: may read the frame table, mappings and per-process listings."""
        return caller == self.mm_key or (self.operator_key is not None and caller == self.operator_key)

    def _target(self, caller: str, args: Any) -> Process | Error:
        """The process a map/unmap acts on: any (mm, pid required) or the caller's own (a client's call
        is small: ``_client_size`` first)."""
        pid = args.pid
        if caller == self.mm_key:
            if pid is None:
                return _err(Errno.EINVAL, "args.pid: the memory manager must name the process", field="pid")
            proc = self.procs.get(pid)
            if proc is None:
                return _err(Errno.ESRCH, f"no process {pid}", pid=pid)
            return proc
        e = self._client_size(getattr(args, "frames", None), getattr(args, "pages", None))
        if e is not None:
            return e
        own = self.by_key.get(caller)
        if own is None:
            return _err(Errno.ESRCH, "the caller has no process (the memory manager creates it)")
        if pid is not None and pid != own:
            return _err(Errno.EPERM, f"a client acts on its own address space only (pid {own}, not {pid})")
        return self.procs[own]

    def _beyond(self, runs: list[list[int]]) -> Error | None:
        """EINVAL naming the runs' frames beyond the frame table (arithmetic: nothing is expanded)."""
        n = self.frames.n
        if len(runs) == 1:
            if runs[0][0] + runs[0][1] <= n:
                return None
        elif max(f + c for f, c in runs) <= n:
            return None
        merged: list[list[int]] = []
        for lo, hi in sorted([max(f, n), f + c] for f, c in runs if f + c > n):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return _err(Errno.EINVAL, f"frame {merged[0][0]} is beyond physical memory ({n} frames)",
                    frames=[[lo, hi - lo] for lo, hi in merged[:ERROR_RUNS]])

    # ---- kernel memory (commit-side helpers; the check phase counted) -------------------------------

    def _kalloc(self, proc: Process, n: int) -> list[int]:
        """Take ``n`` frames from the pool, charged to ``proc`` (within its quota: the check said so)."""
        ft = self.frames
        if n <= SCALAR_FRAMES:  # (page tables, a thread: scalars cost less than numpy's fancy indexing)
            got = [ft.take_one() for _ in range(n)]
        else:
            a = ft.pop_free(n)
            ft.set_kind(a, KERNEL_FREE, KERNEL_USED)
            got = a.tolist()
        proc.kernel_used += n
        self.reserved -= n
        return got

    def _kfree(self, proc: Process, frames: list[int]) -> None:
        """Give ``proc``'s kernel frames back to the pool (their charge goes back to its reservation)."""
        if not frames:
            return
        ft = self.frames
        if len(frames) <= SCALAR_FRAMES:
            for f in reversed(frames):  # (the list ends as push_free leaves it: frames[0] at the head)
                ft.give_one(f)
        else:
            a = np.asarray(frames, dtype=np.int64)
            ft.set_kind(a, KERNEL_USED, KERNEL_FREE)
            ft.push_free(a)
        proc.kernel_used -= len(frames)
        self.reserved += len(frames)

    def unreserved(self) -> int:
        """Free kernel frames promised to no process: what proc_create and reclaim may take."""
        return self.frames.free_count - self.reserved

    def _over_quota(self, proc: Process, needed: int, what: str) -> Error | None:
        """ENOMEM if ``needed`` more kernel frames would take ``proc`` past its quota (I13). Within its
        quota the pool always has them (its reservation)."""
        if proc.kernel_used + needed > proc.kernel_limit:
            if self._watched:
                self.observer.probe("kernel.enomem.quota")
            return _err(Errno.ENOMEM, f"{what} needs {needed} kernel frame(s); process {proc.pid} has used "
                        f"{proc.kernel_used} of its kernel quota of {proc.kernel_limit}",
                        needed=needed, limit=proc.kernel_limit, used=proc.kernel_used, pid=proc.pid)
        return None

    def _pool(self) -> dict[str, int]:
        """The pool figures every call that changes it reports (the mm's watermarks use ``unreserved``)."""
        return {"kernel_free": self.frames.free_count, "kernel_reserved": self.reserved}

    def _new_id(self, kind: str) -> int:
        n = self.next_id[kind]
        self.next_id[kind] = n + 1
        return n

    def _changed(self, proc: Process) -> None:
        if self._watched:
            self.observer.process_changed(proc.pid)

    # ---- informational calls ---------------------------------------------------------------------

    def _read_hello(self, caller: str, _proc: None, args: Any) -> dict:
        p = self.profile
        return {
            "v": PROTOCOL_VERSION,
            "arch": p.name,
            "page_size": PAGE_SIZE,
            "large_page_sizes": list(self._large_page_sizes),
            "user_top": p.user_top,
            "frames": self.frames.n,
            "kernel_limit": p.kernel_limit,
            "identity": caller,
            "is_mm": caller == self.mm_key,
            "is_operator": self.operator_key is not None and caller == self.operator_key,
            "pid": self.by_key.get(caller),
            "process_cost": self.base_cost,
        }

    def _read_address_map(self, caller: str, _proc: None, args: Any) -> dict:
        return {
            "arch": self.profile.name,
            "frames": self.frames.n,
            "kernel_limit": self.profile.kernel_limit,
            "entries": self.bootmap.to_wire(),
            "unaddressable": self.bootmap.unaddressable,  # bytes of RAM beyond what the profile addresses
        }

    def _read_ping(self, caller: str, _proc: None, args: Any) -> dict:
        return {"pid": self.by_key.get(caller)}

    def _read_stats(self, caller: str, _proc: None, args: Any) -> dict | Error:
        """Counts for anyone, and the caller's own usage (``you``); for the mm and the operator also a
        page of the per-process listing (from ``from_pid``, 0 by default; ``next_pid`` goes on) and the
        frames under large mappings. A client asking for the listing is refused."""
        reader = self.is_reader(caller)
        if args.from_pid is not None and not reader:
            return _err(Errno.EPERM, "only the memory manager and the operator may list processes")
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
        if reader:
            pids = list(self.procs)  # ascending: pids only grow and the dict keeps creation order
            i = bisect.bisect_left(pids, args.from_pid or 0)
            page = pids[i:i + args.limit]
            out["per_process"] = [self.procs[p].usage() for p in page]
            out["next_pid"] = pids[i + args.limit] if len(pids) > i + args.limit else None
            out["large_mappings"] = self._large_runs()
        return out

    def _large_runs(self) -> list[list[int]]:
        """Frames under large mappings, as sorted merged runs (the first LARGE_RUNS_SHOWN): for pictures.
        Walks the sorted index only as far as those runs reach."""
        runs: list[list[int]] = []
        for f, pages in self.large_keys:
            end = f + pages
            if runs and f <= runs[-1][0] + runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], end - runs[-1][0])
            elif len(runs) == LARGE_RUNS_SHOWN:
                break
            else:
                runs.append([f, pages])
        return runs

    def _large_add(self, first: int, pages: int) -> None:
        key = (first, pages)
        n = self.large_index.get(key)
        if n is None:
            self.large_index[key] = 1
            bisect.insort(self.large_keys, key)
        else:
            self.large_index[key] = n + 1

    def _large_drop(self, first: int, pages: int) -> None:
        key = (first, pages)
        n = self.large_index[key] - 1
        if n:
            self.large_index[key] = n
        else:
            del self.large_index[key]
            del self.large_keys[bisect.bisect_left(self.large_keys, key)]

    def _read_events(self, caller: str, _proc: None, args: Any) -> dict:
        """Events after ``since``, at most ``limit`` of them and about EVENTS_BYTES (at least one)."""
        oldest = self.events[0]["seq"] if self.events else self.event_seq + 1
        out: list[dict[str, Any]] = []
        size = 0
        start = max(0, args.since + 1 - oldest)  # the deque holds consecutive seqs from ``oldest``
        for ev in itertools.islice(self.events, start, None):
            size += 96 + 12 * len(ev["frames"])
            if len(out) == args.limit or (out and size > EVENTS_BYTES):
                break
            out.append(ev)
        return {
            "events": out,
            "next": out[-1]["seq"] if out else max(args.since, 0),
            "lost": bool(self.events) and args.since + 1 < oldest,
            "latest": self.event_seq,
            **self._pool(),  # the mm's figure of the pool stays fresh after deaths
        }

    def _read_frame_info(self, caller: str, _proc: None, args: Any) -> dict | Error:
        """Segments ``[first, count, kind, refs]`` of the frames named, in order, at most ``max_segments``
        of them and over at most FRAME_INFO_SCAN frames; ``rest`` names what is left to ask."""
        ft = self.frames
        for first, count in args.frames:
            if first + count > ft.n:
                return _err(Errno.EINVAL, f"run [{first}, {count}] goes beyond physical memory ({ft.n} frames)",
                            field="frames")
        segments: list[list[Any]] = []
        rest: list[list[int]] = []
        budget = FRAME_INFO_SCAN
        for i, (first, count) in enumerate(args.frames):
            room = args.max_segments - len(segments)
            if budget == 0 or room == 0:
                rest = [list(r) for r in args.frames[i:]]
                break
            look = min(count, budget)
            kinds = ft.kind[first:first + look]
            refs = ft.refs[first:first + look]
            change = np.flatnonzero((np.diff(kinds) != 0) | (np.diff(refs) != 0)) + 1
            starts = np.concatenate(([0], change))
            ends = np.concatenate((change, [look]))
            s, e = starts[:room], ends[:room]
            segments.extend(map(list, zip((first + s).tolist(), (e - s).tolist(), _KIND_NAME[kinds[s]].tolist(),
                                          refs[s].tolist())))
            budget -= look
            cut = int(starts[room]) if len(starts) > room else look
            if cut < count:
                rest = [[first + cut, count - cut]] + [list(r) for r in args.frames[i + 1:]]
                break
        return {"segments": segments, "rest": rest}

    def _read_mappings(self, caller: str, _proc: None, args: Any) -> dict | Error:
        """What process ``pid`` maps over [vaddr, vaddr + pages pages), in virtual address order, as
        segments ``[vaddr, pages, first frame, prot, made_by, page_size]``: consecutive pages mapping
        consecutive frames with the same protection, made by the same party ("mm" or "client"), with
        the same page size. At most ``max_segments``; ``rest`` is the virtual address to ask from next
        (None: the range is covered). Read-only: how the mm settles an intent whose reply was lost."""
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
        segments, rest = proc.segments(vp0, vp1, args.max_segments)
        return {"pid": proc.pid, "segments": segments, "rest": rest}

    # ---- processes ---------------------------------------------------------------------------------

    def _check_proc_create(self, caller: str, _proc: None, args: Any) -> ProcCreatePlan | Error:
        if args.key == self.mm_key or args.key == self.operator_key:
            return _err(Errno.EINVAL, "args.key: a server's key (the mm's, the operator's) cannot own a process",
                        field="key")
        pid = self.by_key.get(args.key)
        if pid is not None:
            p = self.procs[pid]
            return _err(Errno.EBUSY, f"key already has process {pid}", pid=pid, kernel_limit=p.kernel_limit,
                        kernel_used=p.kernel_used, user_quota=p.user_quota)
        if args.kernel_quota < self.base_cost:
            return _err(Errno.EINVAL, f"args.kernel_quota: a process needs at least {self.base_cost} kernel "
                        f"frame(s) on {self.profile.name} (its object frame and root table)", field="kernel_quota")
        available = self.unreserved()
        if args.kernel_quota > available:  # the quota is reserved in the pool whole, now (no overcommit)
            if self._watched:
                self.observer.probe("kernel.enomem.pool")
            return _err(Errno.ENOMEM, f"proc_create needs {args.kernel_quota} unreserved kernel frame(s) for the "
                        f"quota, {available} free and unreserved", needed=args.kernel_quota, available=available)
        return ProcCreatePlan(args.key, args.kernel_quota, args.user_quota)

    def _commit_proc_create(self, plan: ProcCreatePlan) -> dict:
        pid = self._new_id("pid")
        self.reserved += plan.kernel_quota
        proc = Process(self.geo, pid, plan.key, plan.kernel_quota, plan.user_quota)
        fresh = self._kalloc(proc, self.base_cost)
        proc.obj_frame = fresh[0]
        if not self.profile.root_is_slab:
            proc.root_frame = fresh[1]
        proc.tables[ROOT][0] = proc.root_frame
        self.procs[pid] = proc
        self.by_key[plan.key] = pid
        self._changed(proc)
        return {"pid": pid, "kernel_frames": self.base_cost, "kernel_limit": proc.kernel_limit, **self._pool()}

    def _check_proc_destroy(self, caller: str, _proc: None, args: Any) -> ProcDestroyPlan | Error:
        proc = self.procs.get(args.pid)
        if proc is None:
            return _err(Errno.ESRCH, f"no process {args.pid}", pid=args.pid)
        return ProcDestroyPlan(proc, "proc_destroy")

    def _commit_proc_destroy(self, plan: ProcDestroyPlan) -> dict:
        """Release everything a process holds (cannot fail). Also what a lease's end does.

        The event and the reply list the user frames released (the mm's business; at most EVENT_RUNS
        runs, ``truncated`` when there were more), not the kernel-shared frames mapped read-only
        (counted as ``shared_unmapped``)."""
        proc = plan.proc
        pid = proc.pid
        del self.procs[pid]
        del self.by_key[proc.key]
        released = proc.mapped_frames()
        self.frames.add_refs(released, -1)
        for lv, f, _prot in proc.large.values():
            self._large_drop(f, self.geo.pages_at[lv])
        user = released[self.frames.kind[released] == USER]
        shared_unmapped = int(released.size - user.size)
        kfree = proc.kernel_frames()
        self._kfree(proc, kfree)
        self.reserved -= proc.kernel_limit  # (nothing is charged to it now: its whole quota was reserved)
        frames, truncated = _runs_capped(np.unique(user), EVENT_RUNS)
        self.event_seq += 1
        self.events.append({"seq": self.event_seq, "kind": "proc_destroyed", "pid": pid, "key": proc.key,
                            "reason": plan.reason, "frames": frames, "truncated": truncated,
                            "shared_unmapped": shared_unmapped})
        self._changed(proc)
        return {"pid": pid, "unmapped_pages": int(released.size), "kernel_frames_freed": len(kfree),
                "frames": frames, "truncated": truncated, "shared_unmapped": shared_unmapped, **self._pool()}

    def proc_destroy(self, pid: int, reason: str) -> dict:
        """Destroy process ``pid`` (it exists) for ``reason``: the lease's end, or the mm's call."""
        plan = ProcDestroyPlan(self.procs[pid], reason)
        if self._watched:
            self.observer.call_begun("kernel", "proc_destroy", CALLS["proc_destroy"].model(pid=pid))
            out = self._commit_proc_destroy(plan)
            self.observer.call_ended("kernel", "proc_destroy", out)
            return out
        return self._commit_proc_destroy(plan)

    # ---- donate / reclaim (no kernel allocation, ever) ----------------------------------------------

    def _check_donate(self, caller: str, _proc: None, args: Any) -> DonatePlan | Error:
        runs = args.frames
        if (e := self._beyond(runs)) is not None:
            return e
        if _runs_overlap(runs):
            return _err(Errno.EINVAL, "args.frames: a frame appears twice", field="frames")
        ft = self.frames
        if len(runs) == 1:
            first, count = runs[0]
            a = None
            kinds, refs = ft.kind[first:first + count], ft.refs[first:first + count]
            top = first + count - 1
        else:
            a = _expand(runs)  # distinct frames of the frame table: at most all of them
            first, count = int(a[0]), int(a.size)
            kinds, refs = ft.kind[a], ft.refs[a]
            top = int(a.max())
        if bool((kinds == USER).all()) and not refs.any() and top < ft.kernel_limit:
            return DonatePlan(a, first, count)  # the usual case; otherwise find the first rule broken, and where
        if a is None:
            a = np.arange(first, first + count, dtype=np.int64)
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        bad = a[kinds != USER]
        if bad.size:
            return _err(Errno.EEXIST, f"frame {int(bad[0])} is already kernel-owned", frames=_runs_of(bad))
        bad = a[refs > 0]
        if bad.size:
            return _err(Errno.EBUSY, f"frame {int(bad[0])} is mapped in user space", frames=_runs_of(bad))
        bad = a[a >= ft.kernel_limit]
        return _err(Errno.EINVAL, f"frame {int(bad[0])} cannot be kernel-owned on {self.profile.name} "
                    f"(kernel frames must lie below frame {ft.kernel_limit})", frames=_runs_of(bad))

    def _commit_donate(self, plan: DonatePlan) -> dict:
        ft = self.frames
        if self._watched and ft.free_count == 0:
            self.observer.probe("kernel.donate.empty_pool")
        if plan.frames is None:
            a = np.arange(plan.first, plan.first + plan.count, dtype=np.int64)
            ft.set_kind(a, USER, KERNEL_FREE, True)
            ft.push_free(a, True)  # the first donated frame is handed out first
        else:
            ft.set_kind(plan.frames, USER, KERNEL_FREE)
            ft.push_free(plan.frames)
        return {"donated": plan.count, **self._pool()}

    def _check_reclaim(self, caller: str, _proc: None, args: Any) -> ReclaimPlan | Error:
        if args.count is not None:
            return ReclaimPlan(None, min(args.count, self.unreserved()), [])
        runs = args.frames
        if (e := self._beyond(runs)) is not None:
            return e
        if _runs_overlap(runs):
            return _err(Errno.EINVAL, "args.frames: a frame appears twice", field="frames")
        a = _expand(runs)  # distinct frames of the frame table: at most all of them
        kinds = self.frames.kind[slice(runs[0][0], runs[0][0] + runs[0][1]) if len(runs) == 1 else a]
        if bool((kinds == KERNEL_FREE).all()) and a.size <= self.unreserved():
            return ReclaimPlan(a, int(a.size), _merged([list(r) for r in runs]))
        bad = a[kinds == NONE]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not RAM", frames=_runs_of(bad))
        bad = a[kinds == USER]
        if bad.size:
            return _err(Errno.EINVAL, f"frame {int(bad[0])} is not kernel-owned", frames=_runs_of(bad))
        bad = a[kinds != KERNEL_FREE]
        if bad.size:
            return _err(Errno.EBUSY, f"kernel frame {int(bad[0])} is in use", frames=_runs_of(bad))
        if self._watched:
            self.observer.probe("kernel.reclaim.reserved")
        return _err(Errno.EBUSY, f"reclaiming {a.size} frame(s) would leave fewer free kernel frames than the "
                    f"{self.reserved} reserved for processes' kernel quotas", reserved=self.reserved,
                    kernel_free=self.frames.free_count)

    def _commit_reclaim(self, plan: ReclaimPlan) -> dict:
        ft = self.frames
        if self._watched:
            self.observer.probe("kernel.reclaim.count" if plan.frames is None else "kernel.reclaim.frames")
        if plan.frames is None:  # up to ``count`` from the head, in at most REPLY_RUNS runs
            a = ft.pop_free(plan.count, max_runs=REPLY_RUNS)
            ft.set_kind(a, KERNEL_FREE, USER)
            frames = R.from_array(a)
        else:
            a = plan.frames
            run = len(plan.runs) == 1
            ft.unlink_free(a, run)
            ft.set_kind(a, KERNEL_FREE, USER, run)
            frames = plan.runs if len(plan.runs) <= REPLY_RUNS else plan.runs[:REPLY_RUNS]
        out = {"frames": frames, "reclaimed": int(a.size), **self._pool()}
        if plan.frames is not None and len(plan.runs) > REPLY_RUNS:
            out["truncated"] = True
        return out

    # ---- map / unmap ------------------------------------------------------------------------------

    def _check_map(self, caller: str, proc: Process, args: Any) -> MapPlan | Error:
        runs = args.frames
        by_mm = caller == self.mm_key
        if by_mm and len(runs) == 1:
            first, npages = runs[0]
            if npages == 1:  # the common map: one 4 KiB page by the mm (``_map_page``)
                plan = self._map_page(proc, args, first)
                if plan is not None:
                    return plan
        if len(runs) == 1:
            first, npages = runs[0]
        else:
            first, npages = runs[0][0], sum(c for _f, c in runs)
        prot = args.prot
        if prot & PROT_WRITE and prot & PROT_EXEC:
            return _err(Errno.ENOTSUP, "writable and executable at once (W+X) is not supported")
        p = self.profile
        geo = self.geo
        level = geo.leaf
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
            step = geo.pages_at[level]
        if args.vaddr & ((step << PAGE_SHIFT) - 1):
            return _err(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} is not aligned to {step << PAGE_SHIFT:#x}",
                        field="vaddr")
        vp0 = args.vaddr >> PAGE_SHIFT
        vp1 = vp0 + npages
        if vp1 > self.user_top_page:
            return _err(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} + {npages} pages goes beyond user space "
                        f"({p.user_top:#x})", field="vaddr")
        if (e := self._beyond(runs)) is not None:
            return e
        firsts: list[int] | None = None
        if large:  # whole, aligned, contiguous large pages: the merged runs tell, by arithmetic
            firsts = []
            for f, c in _merged([list(r) for r in runs]):
                if f % step or c % step:
                    return _err(Errno.EINVAL, f"args.frames: a large page needs {step} contiguous frames "
                                f"aligned to {step}", field="frames")
                firsts.extend(range(f, f + c, step))
        # the page tables the range lacks, against the quota (arithmetic), before any frame is looked at
        if npages <= geo.leaf_entries:
            missing = proc.missing(vp0, vp1, level)
        else:
            needed = proc.count_missing(vp0, vp1, level)
            if (e := self._over_quota(proc, needed, "map")) is not None:
                return e
            missing = proc.missing(vp0, vp1, level)
        if missing and (e := self._over_quota(proc, len(missing), "map")) is not None:
            return e
        # the frames (expanded only now: at most what the range and the quota allow)
        kind = self.frames.kind
        all_user = False
        if large:
            all_user = True  # (a large page needs every frame user-owned: checked right below)
            a = None
            if not all(bool((kind[f:f + step] == USER).all()) for f in firsts):
                every = _expand([[f, step] for f in firsts])
                return self._map_frame_rules(every, kind[every], True, by_mm, prot)
            if not by_mm:
                return _err(Errno.EPERM, f"frame {firsts[0]}: a client may map only kernel-shared frames "
                            "(ask the memory manager for memory)", frames=[[firsts[0], step]])
        elif len(runs) == 1:
            a = None
            if npages == 1:
                k = kind[first]
                if not (by_mm and k == USER) and (
                        e := self._map_frame_rules(np.array([first]), kind[first:first + 1], False, by_mm, prot)):
                    return e
            else:
                kinds = kind[first:first + npages]
                all_user = bool((kinds == USER).all())
                if not (by_mm and all_user) and (e := self._map_frame_rules(
                        np.arange(first, first + npages, dtype=np.int64), kinds, False, by_mm, prot)):
                    return e
        else:
            a = _expand(runs)
            kinds = kind[a]
            all_user = bool((kinds == USER).all())
            if not (by_mm and all_user) and (e := self._map_frame_rules(a, kinds, False, by_mm, prot)):
                return e
        # the virtual range must be empty
        if large:
            tables = proc.tables
            for b in range(vp0, vp1, step):
                if proc.large_at(b) is not None or (level + 1, b // step) in tables:
                    return _err(Errno.EBUSY, f"virtual address {b << PAGE_SHIFT:#x} is already mapped",
                                vaddr=b << PAGE_SHIFT)
        else:
            busy = proc.first_small(vp0, vp1)
            if busy is not None:
                return _err(Errno.EBUSY, f"virtual address {busy << PAGE_SHIFT:#x} is already mapped",
                            vaddr=busy << PAGE_SHIFT)
            if proc.large:
                hit = proc.first_large_in(vp0, vp1)
                if hit is not None:
                    return _err(Errno.EBUSY, f"virtual address {hit << PAGE_SHIFT:#x} is already mapped by a "
                                "large page", vaddr=hit << PAGE_SHIFT)
        return MapPlan(proc, a, first, vp0, npages, level, firsts, missing, prot if by_mm else prot | CLIENT_MADE,
                       prot, all_user)

    def _map_page(self, proc: Process, args: Any, first: int) -> MapPlan | None:
        """The common map, decided with scalars: one 4 KiB page of user frame ``first`` by the mm, where
        nothing is mapped and no large page is, with the page tables it lacks within the quota. Returns
        the very plan the general check would; None if anything is unusual (the general check decides,
        and gives any refusal). Every rule of map holds when it returns a plan: no W+X, aligned, within
        user space and physical memory, the quota, a user frame, the page free."""
        prot = args.prot
        vaddr = args.vaddr
        if (args.large or args.page_size is not None or (prot & PROT_WRITE and prot & PROT_EXEC)
                or vaddr & _PAGE_MASK or proc.large):
            return None
        vp = vaddr >> PAGE_SHIFT
        if vp >= self.user_top_page or first >= self.frames.n or self.frames.kind.item(first) != USER:
            return None
        geo = self.geo
        e = proc.leaves.get(vp >> geo.leaf_bits)
        if e is not None:  # its table, and so every table above it, exists
            if e.item(vp & geo.leaf_mask) != EMPTY:
                return None
            missing: list[Key] = []
        else:
            missing = proc.missing(vp, vp + 1, geo.leaf)
            if proc.kernel_used + len(missing) > proc.kernel_limit:
                return None
        return _tuple_new(MapPlan, (proc, None, first, vp, 1, geo.leaf, None, missing, prot, prot, True))

    def _map_frame_rules(self, a: np.ndarray, kinds: np.ndarray, large: bool, by_mm: bool,
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
        if not by_mm:
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

    def _commit_map(self, plan: MapPlan) -> dict:
        proc = plan.proc
        missing = plan.missing
        if missing:  # tables first (parents before children: missing is ordered by level)
            proc.add_tables(missing, self._kalloc(proc, len(missing)), self.spare_leaves)
        pages = plan.pages
        ft = self.frames
        if pages == 1 and plan.large is None:  # one 4 KiB page: scalars only
            proc.write_one(plan.vpage, plan.first, plan.bits)
            ft.add_ref(plan.first, +1)
            if self._watched:
                self.observer.process_changed(proc.pid)
            return {"pid": proc.pid, "pages": 1, "tables_allocated": len(missing), "kernel_free": ft.free_count,
                    "kernel_reserved": self.reserved}
        if plan.large is not None:
            proc.add_large(plan.vpage, plan.level, plan.large, plan.prot)
            step = self.geo.pages_at[plan.level]
            for f in plan.large:
                self._large_add(f, step)
        elif pages == 1:
            proc.write_one(plan.vpage, plan.first, plan.bits)
        else:
            proc.write_small(plan.vpage, plan.frames, plan.first, pages, plan.bits)
        if plan.large is not None:  # each stretch of consecutive large pages is one run
            step = self.geo.pages_at[plan.level]
            for f, c in _merged([[f, step] for f in plan.large]):
                ft.add_refs(np.arange(f, f + c, dtype=np.int64), +1, run=True, user=True)
        elif plan.frames is not None:
            ft.add_refs(plan.frames, +1, user=plan.all_user)
        elif pages == 1:
            ft.add_ref(plan.first, +1)
        else:  # (a map's check makes sure the frames of a map by the mm, the only larger one, are all USER)
            ft.add_refs(np.arange(plan.first, plan.first + pages, dtype=np.int64), +1, run=True, user=plan.all_user)
        if self._watched:
            self.observer.process_changed(proc.pid)
        return {"pid": proc.pid, "pages": pages, "tables_allocated": len(missing), **self._pool()}

    def _check_unmap(self, caller: str, proc: Process, args: Any) -> UnmapPlan | Error:
        vaddr = args.vaddr
        if vaddr & _PAGE_MASK:
            return _err(Errno.EINVAL, f"args.vaddr: {vaddr:#x} is not page-aligned", field="vaddr")
        vp0 = vaddr >> PAGE_SHIFT
        pages = args.pages
        if vp0 + pages > self.user_top_page:
            return _err(Errno.EINVAL, f"args.vaddr: the range goes beyond user space ({self.profile.user_top:#x})",
                        field="vaddr")
        if pages == 1 and not proc.large:  # one page: the entry, or a hole
            plan = self._unmap_page(caller, proc, vp0)
            if plan is not None:
                return plan
        vp1 = vp0 + pages
        got = proc.scan(vp0, vp1)
        if isinstance(got[0], str):
            what, vp = got
            if what == "hole":
                return _err(Errno.EINVAL, f"nothing is mapped at {vp << PAGE_SHIFT:#x}", vaddr=vp << PAGE_SHIFT)
            return _err(Errno.EINVAL, f"the range cuts the large page at {vp << PAGE_SHIFT:#x}; "
                        "a large page is unmapped whole", vaddr=vp << PAGE_SHIFT)
        spans, large = got
        if caller != self.mm_key:
            theirs = proc.first_made_by_mm(spans, large)
            if theirs is not None:
                return _err(Errno.EPERM, f"virtual address {theirs << PAGE_SHIFT:#x} is mapped by the memory "
                            "manager: free it through the mm", vaddr=theirs << PAGE_SHIFT)
        return UnmapPlan(proc, spans, large)

    def _unmap_page(self, caller: str, proc: Process, vp: int) -> UnmapPlan | Error | None:
        """Unmap's rules for the one page ``vp`` of a process without large pages, with scalars: the plan,
        or the refusal the general check (``scan``) would give (a hole; a client's unmap of the mm's
        mapping), or None (the general check decides)."""
        geo = self.geo
        tag = vp >> geo.leaf_bits
        e = proc.leaves.get(tag)
        i = vp & geo.leaf_mask
        entry = EMPTY if e is None else e.item(i)
        if entry == EMPTY:
            return _err(Errno.EINVAL, f"nothing is mapped at {vp << PAGE_SHIFT:#x}", vaddr=vp << PAGE_SHIFT)
        if caller != self.mm_key and not entry & CLIENT_MADE:
            return _err(Errno.EPERM, f"virtual address {vp << PAGE_SHIFT:#x} is mapped by the memory "
                        "manager: free it through the mm", vaddr=vp << PAGE_SHIFT)
        return _tuple_new(UnmapPlan, (proc, [(tag, i, i + 1)], _NO_LARGE))

    def _commit_unmap(self, plan: UnmapPlan) -> dict:
        proc = plan.proc
        spans = plan.spans
        if not plan.large and len(spans) == 1 and spans[0][2] - spans[0][1] == 1:  # one page: no arrays
            tag, i, _ = spans[0]
            f = proc.clear_one(tag, i)
            freed = proc.drop_one(tag, self.spare_leaves)
            if freed:
                self._kfree(proc, freed)
            ft = self.frames
            ft.add_ref(f, -1)
            if self._watched:
                self.observer.process_changed(proc.pid)
            return {"pid": proc.pid, "pages": 1, "frames": [[f, 1]], "tables_freed": len(freed),
                    "kernel_free": ft.free_count, "kernel_reserved": self.reserved}
        pages_at = self.geo.pages_at
        for base in plan.large:
            lv, f, _prot = proc.large[base]
            self._large_drop(f, pages_at[lv])
        parts, drops = proc.clear(spans, plan.large)
        freed = proc.drop_entries(drops, self.spare_leaves)
        if freed:
            self._kfree(proc, freed)
        a = parts[0] if len(parts) == 1 else np.concatenate(parts)
        frames, truncated = _runs_capped(a, REPLY_RUNS)
        self.frames.add_refs(a, -1, run=len(frames) == 1 and not truncated)
        self._changed(proc)
        out = {"pid": proc.pid, "pages": int(a.size), "frames": frames, "tables_freed": len(freed), **self._pool()}
        if truncated:
            out["truncated"] = True
        return out

    # ---- threads and endpoints (the client's own kernel objects) -------------------------------------

    def _check_thread_create(self, caller: str, proc: Process, args: Any) -> ThreadCreatePlan | Error:
        if (e := self._over_quota(proc, 1, "thread_create")) is not None:
            return e
        return ThreadCreatePlan(proc)

    def _commit_thread_create(self, plan: ThreadCreatePlan) -> dict:
        proc = plan.proc
        frame = self._kalloc(proc, 1)[0]
        tid = self._new_id("tid")
        proc.threads[tid] = frame
        self._changed(proc)
        return {"tid": tid, "kernel_frames": 1}

    def _check_thread_destroy(self, caller: str, proc: Process, args: Any) -> ThreadDestroyPlan | Error:
        if args.tid not in proc.threads:
            return _err(Errno.ESRCH, f"no thread {args.tid} in process {proc.pid}", tid=args.tid)
        return ThreadDestroyPlan(proc, args.tid)

    def _commit_thread_destroy(self, plan: ThreadDestroyPlan) -> dict:
        proc = plan.proc
        self._kfree(proc, [proc.threads.pop(plan.tid)])
        self._changed(proc)
        return {"tid": plan.tid}

    def _check_endpoint_create(self, caller: str, proc: Process, args: Any) -> EndpointCreatePlan | Error:
        needed = proc.slab.needs_frame()
        if (e := self._over_quota(proc, needed, "endpoint_create")) is not None:
            return e
        return EndpointCreatePlan(proc, needed)

    def _commit_endpoint_create(self, plan: EndpointCreatePlan) -> dict:
        proc = plan.proc
        fresh = self._kalloc(proc, plan.new_frame) if plan.new_frame else []
        obj = proc.slab.alloc(fresh[0] if fresh else None)
        eid = self._new_id("eid")
        proc.endpoints[eid] = obj
        self._changed(proc)
        return {"eid": eid, "kernel_frames": plan.new_frame}

    def _check_endpoint_destroy(self, caller: str, proc: Process, args: Any) -> EndpointDestroyPlan | Error:
        if args.eid not in proc.endpoints:
            return _err(Errno.ESRCH, f"no endpoint {args.eid} in process {proc.pid}", eid=args.eid)
        return EndpointDestroyPlan(proc, args.eid)

    def _commit_endpoint_destroy(self, plan: EndpointDestroyPlan) -> dict:
        proc = plan.proc
        empty = proc.slab.free(*proc.endpoints.pop(plan.eid))
        if empty is not None:
            self._kfree(proc, [empty])
        self._changed(proc)
        return {"eid": plan.eid}

    # ---- state for checks and tests ----------------------------------------------------------------

    def digest(self) -> str:
        """A hash of every piece of kernel state (frame table, processes, pool, ids, events, spares)."""
        h = hashlib.sha256(self.frames.digest().encode())
        for pid in sorted(self.procs):
            st = self.procs[pid].state()
            h.update(repr(st[:-1]).encode())
            tables, small, large, leaves = st[-1]
            h.update(repr((tables, small, large, [t for t, _ in leaves])).encode())
            for _tag, raw in leaves:
                h.update(raw)
        h.update(repr((self.next_id, self.event_seq, self.reserved, len(self.spare_leaves),
                       sorted(self.large_index.items()))).encode())
        return h.hexdigest()
