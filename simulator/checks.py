"""Invariant checks across both views (the kernel's frame table and the mm's own view), and what runs when.

Two ways to check the state of each view; both return violations (strings
starting with the invariant's name).

**Full recomputation.** ``kernel`` is ``kernel_server.invariants.check_kernel``
(I1-I4, I7, I9 of the mappings and the page-table accounting, all derived from
the raw frame arrays, processes and slabs); ``view`` checks the mm's view (its
refcounts equal its clients' mappings (I4), a frame is used exactly when mapped
(I1), the states add up to RAM (I7)).

**The exact incremental check** (``KernelTracker``, ``ViewTracker``). Each tracker
keeps its own copy of the state as of the last check, plus per-frame counts
derived from it (the mappings of each frame, large ones, writable ones, ones a
client made, the kernel objects holding it; for the mm's view, the mappings of
each frame), and after a step checks exactly what the step changed, by the same
rules as the full recomputation, plus O(1) global counters:

- frames: every frame the kernel's frame table wrote (its mutating methods,
  the only way the kernel writes the arrays, note the frames each call
  writes, with the list neighbours whose links it relinks), the frames whose
  mappings or kernel allocations changed, and the frames that linked to a
  relinked frame before: valid kind (I1); refcount = mappings (I4); no
  mapping of a kernel or non-RAM frame, kernel-shared frames read-only and
  not under a large page (I3); client-made mappings only of kernel-shared
  frames and read-only (I9); an allocated kernel frame is KERNEL_USED and
  allocated once, a KERNEL_USED frame is allocated or holds the frame table,
  a frame that is not free keeps no free-list links (I2);
- the free list (I2), without walking it: each changed free frame's links go
  to free frames that link back, only the head has no predecessor, and every
  link goes from a smaller to a larger order label (the tracker labels free
  frames by their place on the list: no cycle can form); when frames arrive
  where no label fits, or many at once, the whole list is verified
  (``free_list_sound``, vectorised) and relabelled;
- processes: the ones the step's mutating kernel calls named (the ``pid``
  argument and the caller's own process; read-only calls name none) and every
  process created or destroyed: their leaf entries in the pages the call
  named and of every leaf table that came or went (compared with the copies),
  large mappings, page-table and thread frames, and the page-table accounting
  (``proc_table_problems``: the whole process's when tables, leaves or large
  mappings came or went or a table's count changed other than with its
  changed entries; else the changed leaf tables'); slabs whose objects came
  or went; spare leaf arrays put aside (they must be empty);
- the counters (I7): the kind counts and the user free/mapped counts the
  tracker keeps equal the kernel's and add up to RAM; the free list's head;
- the mm's view: the frames the step's journal ops named and those of every
  mapping added or dropped (found by comparing the mappings of each client an
  op named, and of clients that came or went, with the copy): refcount =
  mappings, used exactly when mapped, valid state; the state counts add up to
  RAM. A snapshot op or a restarted mm (a new view) makes the next check a
  full one.

What the incremental check does not see, and the next full recomputation
does: a write to the frame arrays other than through the frame table's
methods, a change to a process (or to pages of it) that no call of the step
named, a spare leaf array written while put aside, a mapping object of the
mm's view changed in place rather than replaced, a view frame changed that no
op named. (The kernel and the mm do none of these; only a bug could.) When the
incremental check finds something, the full recomputation runs at once and its
report is what is flagged, so a violation reads the same either way; the
trackers take fresh copies after every full recomputation that finds nothing.

Which runs when (``World.check_state``, for each view, after a step that changed it):

- ``check_every == 1``: the full recomputation after every such step;
- ``check_every == N > 1`` (the default, ``FULL_EVERY``): the full recomputation
  every N steps (if the view changed since the last one), at every quiet point and
  at the end; the incremental check after every other step that changed the view;
- ``check_every == 0``: the full recomputation at quiet points and at the end only;
  the incremental check after every step that changed the view;
- ``incremental=False`` (``--no-incremental``): no state check between full ones.

Whatever the settings: ``fingerprint`` before and after every refused kernel
call (I6: a failed call changes nothing); ``state`` (every piece of kernel
state ``KernelCore.digest`` covers) before and after every forged request
(``lies``); ``agreement`` (I8) at quiet points. The world adds the checks that
need time or history (I11 deadlines, I12 execution counts, replies journaled
before they are sent, lies refused).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator import FULL_EVERY
from kernel_server.arch import PAGE_SHIFT
from kernel_server.core import (
    CLIENT_MADE,
    EMPTY,
    ENTRY_SHIFT,
    PROT_MASK,
    KernelCore,
    Process,
)
from kernel_server.frames import (
    KERNEL_FREE,
    KERNEL_SHARED,
    KERNEL_USED,
    NIL,
    NONE,
    USER,
)
from kernel_server.invariants import check_kernel, free_list_sound, proc_table_problems
from mm_service.view import USED, View
from protocol import PROT_READ
from protocol import runs as R

# kernel frame kind -> the code View.compare expects (0 none, 1 kernel, 2 user)
_KIND_CODE = np.array([0, 1, 1, 1, 2], dtype=np.uint8)


# ---- full recomputation --------------------------------------------------------------------------

def kernel(core: KernelCore) -> list[str]:
    return check_kernel(core)


def view(v: View) -> list[str]:
    out: list[str] = []
    st = v.state
    c = v.counts()
    if c["kernel"] + c["free"] + c["used"] != c["ram"]:
        out.append(f"I7 (mm view): kernel {c['kernel']} + free {c['free']} + used {c['used']} != RAM {c['ram']}")
    want = expected_refs(v)
    bad = np.flatnonzero(want != v.refs)
    if bad.size:
        f = int(bad[0])
        out.append(f"I4 (mm view): frame {f} has refcount {int(v.refs[f])} in the mm's view but its clients "
                   f"map it {int(want[f])} time(s) ({bad.size} frame(s) differ)")
    wrong = np.flatnonzero(((v.refs > 0) & (st != USED)) | ((v.refs == 0) & (st == USED)))
    if wrong.size:
        f = int(wrong[0])
        out.append(f"I1 (mm view): frame {f} is {['none', 'kernel', 'free', 'used'][int(st[f])]} with refcount "
                   f"{int(v.refs[f])} ({wrong.size} frame(s))")
    return out


def expected_refs(v: View) -> np.ndarray:
    """Per frame, how many times the view's clients map it (from their mappings' runs)."""
    diff = np.zeros(v.n + 1, dtype=np.int64)
    firsts: list[int] = []
    ends: list[int] = []
    for cl in v.clients.values():
        for m in cl.maps.values():
            for first, count in m.frames:
                firsts.append(first)
                ends.append(first + count)
    if firsts:
        np.add.at(diff, firsts, 1)
        np.add.at(diff, ends, -1)
    return np.cumsum(diff[:-1])


# ---- cheap exact comparisons of the whole kernel state ------------------------------------------

def fingerprint(core: KernelCore) -> tuple:
    """Cheap summary of every piece of kernel state a call may change (for I6)."""
    ft = core.frames
    objects = 0
    for p in core.procs.values():
        objects += p.small_pages + len(p.large) + len(p.threads) + len(p.endpoints) + len(p.tables)
        objects += p.tables[(0, 0)][1] << 20
    return (ft.head, ft.free_count, ft.kernel_used, ft.user_free, ft.user_mapped, len(core.procs), objects,
            core.event_seq, core.next_id["pid"], core.next_id["tid"], core.next_id["eid"])


_bytes = np.ndarray.tobytes


def state(core: KernelCore) -> tuple:
    """Every piece of kernel state that ``KernelCore.digest`` covers, as a value: two states compare equal
    exactly when they are the same (in dict order too: stricter than the digest). Several times cheaper
    than the digest (no hashing, no sorting, no repr)."""
    ft = core.frames
    procs = tuple((pid, p.key, p.obj, p.root_frame, p.pdpt, tuple(p.tables), tuple(map(tuple, p.tables.values())),
                   p.small_pages, tuple(p.large.items()), tuple(p.threads.items()), tuple(p.endpoints.items()),
                   tuple(p.leaves), tuple(map(_bytes, p.leaves.values())))
                  for pid, p in core.procs.items())
    slabs = tuple((k, tuple(s.used.items()), tuple((f, tuple(v)) for f, v in s.free_slots.items()))
                  for k, s in core.slabs.items())
    return (ft.kind.tobytes(), ft.refs.tobytes(), ft.next.tobytes(), ft.prev.tobytes(), ft.head, ft.free_count,
            ft.kernel_used, ft.kernel_shared, ft.user_free, ft.user_mapped, ft.ram, procs, slabs,
            tuple(core.next_id.items()), core.event_seq)


# ---- I8 ---------------------------------------------------------------------------------------

def kernel_arrays(core: KernelCore) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's frame table as View.compare wants it: kind codes and refcounts."""
    return _KIND_CODE[core.frames.kind], core.frames.refs


def agreement(v: View, core: KernelCore) -> list[str]:
    """I8: every frame has the same owner (and a mapped frame the same refcount) in both views."""
    kinds, refs = kernel_arrays(core)
    report = v.compare(kinds, refs)
    if not report["divergences"]:
        return []
    classes = ", ".join(f"{k} {n} (e.g. runs {report['classes'][k][:2]})"
                        for k, n in report["class_counts"].items() if n)
    return [f"I8: the mm's view and the kernel disagree on {report['divergences']} frame(s): {classes}"]


# ---- the exact incremental check of the kernel ------------------------------------------------------

READ_ONLY = frozenset(("hello", "address_map", "frame_info", "stats", "ping", "events"))  # kernel calls
SMALL = 64  # up to this many frames changed in a step are checked one by one in Python, more with numpy


class _Proc:
    """The tracker's copy of one process as of the last check: its leaf entries (and how many are in use,
    per leaf and in all), large mappings, page tables (frame, entry count) and thread frames."""

    __slots__ = ("in_use", "large", "leaves", "small", "tables", "threads", "used")

    def __init__(self) -> None:
        self.leaves: dict[int, np.ndarray] = {}
        self.in_use: dict[int, int] = {}
        self.small = 0
        self.large: dict[int, tuple[int, int, int]] = {}
        self.tables: dict[tuple[int, int], int] = {}  # table -> its frame (-1: a slab PDPT root)
        self.used: list[int] = []  # the tables' entry counts, in the order of ``tables``
        self.threads: dict[int, int] = {}

    def kernel_frames(self) -> list[int]:
        return [f for f in self.tables.values() if f >= 0] + list(self.threads.values())


class _Spares(list):
    """The kernel's list of spare leaf arrays, noting each one put aside (``append``) for the tracker."""

    def __init__(self, items: list[np.ndarray], noted: list[np.ndarray]) -> None:
        super().__init__(items)
        self.noted = noted

    def append(self, a: np.ndarray) -> None:
        self.noted.append(a)
        super().append(a)


class KernelTracker:
    """The exact incremental check of a ``KernelCore`` (what it covers: the module docstring).

    The frame table's mutating methods (``push_free``, ``pop_free``, ``unlink_free``, ``set_kind``,
    ``add_refs``, ``add_ref``: the only way the kernel changes its frame arrays) are wrapped on this
    core's table to note the frames each call writes, with the list neighbours whose links it relinks.
    The kernel node names the processes (and pages) of each call with ``touch_call``. ``reset()``
    takes copies of the whole state (after a full check found it sound); ``check()`` checks what
    changed since the last check, brings the copies up to date and returns the problems found.

    The free list is checked locally: each changed free frame links to free frames that link back,
    only the head has no predecessor, frames that are not free have no links, and every link goes
    from a smaller to a larger *order label* (labels the tracker gives the free frames: a frame pushed
    at the head gets one below the old head's), so no cycle can form anywhere. If a step inserts
    frames where no label fits, or many frames at once, the whole list is verified (vectorised,
    ``free_list_sound``) and relabelled."""

    def __init__(self, core: KernelCore) -> None:
        self.core = core
        ft = core.frames
        self.written: list[Any] = []  # frames (ints or arrays) the frame table's methods wrote since the last check
        self.new_spares: list[np.ndarray] = []  # leaf arrays put aside for reuse since the last check
        self.slabs_changed = False
        self.touched: dict[int, list[tuple[int, int]]] = {}  # pid -> page ranges its leaf entries may have changed in
        self.boot_used = np.zeros(ft.n, dtype=bool)  # the frames the kernel allocated at boot (the frame table)
        for r in core.bootmap.of_kind("frame_table"):
            self.boot_used[r.first:r.end] = True
        self._wrap(ft)
        self.reset()

    def _wrap(self, ft: Any) -> None:
        note = self.written.append
        push, pop, unlink = ft.push_free, ft.pop_free, ft.unlink_free
        set_kind, add_refs, add_ref = ft.set_kind, ft.add_refs, ft.add_ref

        def push_free(frames: np.ndarray, run: bool = False) -> None:
            note(frames)
            note(ft.head)  # its prev link changes
            push(frames, run)

        def pop_free(count: int) -> np.ndarray:
            out = pop(count)
            note(out)
            note(ft.head)  # the new head: its prev link changed
            return out

        def unlink_free(frames: np.ndarray, run: bool = False) -> None:
            note(frames)
            note(ft.prev[frames])  # the neighbours get relinked
            note(ft.next[frames])
            unlink(frames, run)

        def set_kind_(frames: np.ndarray, old: int, new: int, run: bool = False) -> None:
            note(frames)
            set_kind(frames, old, new, run)

        def add_refs_(frames: np.ndarray, delta: int, run: bool = False) -> None:
            note(frames)
            add_refs(frames, delta, run)

        def add_ref_(f: int, delta: int) -> None:
            note(f)
            add_ref(f, delta)

        ft.push_free, ft.pop_free, ft.unlink_free = push_free, pop_free, unlink_free
        ft.set_kind, ft.add_refs, ft.add_ref = set_kind_, add_refs_, add_ref_
        # the slabs: note that one changed; the spare leaf arrays: note each one put aside
        for slab in self.core.slabs.values():
            self._wrap_slab(slab)
        self.core._spare_leaves = _Spares(self.core._spare_leaves, self.new_spares)

    def _wrap_slab(self, slab: Any) -> None:
        alloc, free = slab.alloc, slab.free

        def alloc_(new_frame: int | None) -> tuple[int, int]:
            self.slabs_changed = True
            return alloc(new_frame)

        def free_(frame: int, slot: int) -> int | None:
            self.slabs_changed = True
            return free(frame, slot)

        slab.alloc, slab.free = alloc_, free_

    def touch_call(self, caller: str, name: str, args: Any) -> None:
        """A kernel call is about to run: the processes (and pages) it may change are its ``pid`` argument
        and the caller's own process; for map and unmap, on the pages it names. Calls that only read
        (``READ_ONLY``) change none."""
        if name in READ_ONLY:
            return
        core = self.core
        pid, own = vars(args).get("pid"), core.by_key.get(caller)  # (not getattr: slow on a model without it)
        if name == "map" or name == "unmap":
            first = args.vaddr >> PAGE_SHIFT
            pages = args.pages if name == "unmap" else R.total(args.frames)
            self.touch(pid, first, pages)
            self.touch(own, first, pages)
        else:
            self.touch(pid)
            self.touch(own)

    def touch(self, pid: int | None, first_page: int = 0, pages: int = 0) -> None:
        """A call acts on process ``pid``, on ``pages`` pages from ``first_page`` (its leaf entries there)."""
        if pid is None:
            return
        ranges = self.touched.setdefault(pid, [])
        if pages > 0:
            ranges.append((first_page, first_page + pages))

    # ---- copies ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Copies of the whole state as it is now (the full check found it sound)."""
        core = self.core
        ft = core.frames
        n = ft.n
        self.written.clear()
        self.touched = {}
        self.kind = ft.kind.copy()
        self.refs = ft.refs.copy()
        self.next = ft.next.copy()
        self.prev = ft.prev.copy()
        # per frame: mappings (a large one counts on each frame it covers), large mappings, 4 KiB mappings
        # with more than read access, client-made ones, client-made ones with more than read access;
        # kernel objects holding the frame
        self.maps = np.zeros(n, dtype=np.int64)
        self.large = np.zeros(n, dtype=np.int64)
        self.writable = np.zeros(n, dtype=np.int64)
        self.client = np.zeros(n, dtype=np.int64)
        self.client_bad = np.zeros(n, dtype=np.int64)
        self.alloc = np.zeros(n, dtype=np.int64)
        self.bad_entries = False
        self.procs: dict[int, _Proc] = {}
        arrays = []
        for pid, proc in core.procs.items():
            shadow = self.procs[pid] = _Proc()
            for tag, e in proc.leaves.items():
                shadow.leaves[tag] = e.copy()
                arrays.append(e)
            shadow.used = [t[1] for t in proc.tables.values()]
            shadow.large = dict(proc.large)
            for level, first, _prot in shadow.large.values():
                self._large(first, core.profile.pages_at(level), +1, None, None)
            shadow.tables = {k: t[0] for k, t in proc.tables.items()}
            shadow.threads = dict(proc.threads)
            for f in shadow.kernel_frames():
                self._alloc(f, +1, None)
        if arrays:
            flat = np.concatenate(arrays)
            sizes = [e.size for e in arrays]
            used = flat != EMPTY
            if all(sizes):
                counts = np.add.reduceat(used, np.cumsum(sizes) - sizes, dtype=np.int64).tolist()
            else:
                counts = [int(np.count_nonzero(e != EMPTY)) for e in arrays]
            i = 0
            for shadow in self.procs.values():
                for tag in shadow.leaves:
                    shadow.in_use[tag] = counts[i]
                    i += 1
                shadow.small = sum(shadow.in_use.values())
            ents = flat[used].astype(np.int64)
            frames = ents >> ENTRY_SHIFT
            if ents.size and (int(ents.min()) < 0 or int(frames.max()) >= n):
                self._entries(ents, +1, None, None)  # (notes the malformed entries)
            else:
                more = (ents & PROT_MASK) != PROT_READ
                made = (ents & CLIENT_MADE) != 0
                self.maps += np.bincount(frames, minlength=n)
                self.writable += np.bincount(frames[more], minlength=n)
                self.client += np.bincount(frames[made], minlength=n)
                self.client_bad += np.bincount(frames[made & more], minlength=n)
        self.slabs = {name: set(s.used) for name, s in core.slabs.items()}
        for frames in self.slabs.values():
            for f in frames:
                self._alloc(f, +1, None)
        self.new_spares.clear()
        self.slabs_changed = False
        self.per_kind = np.bincount(self.kind, minlength=USER + 1).tolist()
        self.mapped = int(np.count_nonzero(self.refs[self.kind == USER]))
        self.label = np.zeros(n, dtype=np.int64)
        self._relabel()

    def _relabel(self) -> None:
        """Order labels for the whole free list (it is sound): minus the number of links to its end."""
        ft = self.core.frames
        frames = np.flatnonzero(ft.kind == KERNEL_FREE)
        m = frames.size
        if not m:
            return
        nxt = ft.next[frames]
        succ = np.append(np.searchsorted(frames, nxt), m)
        succ[:m][nxt == NIL] = m
        dist = np.ones(m + 1, dtype=np.int64)
        dist[m] = 0
        dist[:m][nxt == NIL] = 0
        for _ in range(m.bit_length()):
            dist = dist + dist[succ]
            succ = succ[succ]
        self.label[frames] = -dist[:m]

    # ---- keeping the per-frame counts (small: a set the frames go to; big: a list of arrays) -------

    def _entry(self, ent: int, sign: int, small: set[int]) -> None:
        """Count (sign +1) or uncount (-1) one 4 KiB leaf entry (not EMPTY)."""
        f = ent >> ENTRY_SHIFT
        if ent < 0 or f >= self.maps.size:
            self.bad_entries = True
            return
        self.maps[f] += sign
        more = (ent & PROT_MASK) != PROT_READ
        if more:
            self.writable[f] += sign
        if ent & CLIENT_MADE:
            self.client[f] += sign
            if more:
                self.client_bad[f] += sign
        small.add(f)

    def _entries(self, ents: np.ndarray, sign: int, small: set[int] | None, big: list[np.ndarray] | None) -> None:
        """``_entry`` for an int64 array of entries (none EMPTY)."""
        if ents.size == 0:
            return
        if small is not None and ents.size <= 4:
            for ent in ents.tolist():
                self._entry(ent, sign, small)
            return
        frames = ents >> ENTRY_SHIFT
        if int(ents.min()) < 0 or int(frames.max()) >= self.maps.size:
            self.bad_entries = True
            keep = (ents >= 0) & (frames < self.maps.size)
            ents, frames = ents[keep], frames[keep]
        more = (ents & PROT_MASK) != PROT_READ
        made = (ents & CLIENT_MADE) != 0
        np.add.at(self.maps, frames, sign)
        np.add.at(self.writable, frames[more], sign)
        np.add.at(self.client, frames[made], sign)
        np.add.at(self.client_bad, frames[made & more], sign)
        if big is not None:
            big.append(frames)

    def _large(self, first: int, pages: int, sign: int, small: set[int] | None, big: list[np.ndarray] | None) -> None:
        if first < 0 or first + pages > self.maps.size:
            self.bad_entries = True
            return
        self.maps[first:first + pages] += sign
        self.large[first:first + pages] += sign
        if big is not None:
            big.append(np.arange(first, first + pages, dtype=np.int64))

    def _alloc(self, f: int, sign: int, small: set[int] | None) -> None:
        if 0 <= f < self.alloc.size:
            self.alloc[f] += sign
            if small is not None:
                small.add(f)
        else:
            self.bad_entries = True

    # ---- the check ------------------------------------------------------------------------------

    def check(self) -> list[str]:
        core = self.core
        ft = core.frames
        bad: list[str] = []
        small: set[int] = set()
        big: list[np.ndarray] = []
        for x in self.written:
            if type(x) is int:
                small.add(x)
            elif not isinstance(x, np.ndarray) or x.ndim == 0:
                small.add(int(x))
            elif x.size <= SMALL:
                small.update(x.tolist())
            else:
                big.append(x)
        self.written.clear()
        # processes: the ones the step's calls named, and any created or destroyed
        procs = core.procs
        touched = self.touched
        if procs.keys() != self.procs.keys():
            for pid in procs.keys() ^ self.procs.keys():
                touched.setdefault(pid, [])
        if touched:
            for pid, ranges in touched.items():
                self._proc(pid, procs.get(pid), ranges, small, big, bad)
            self.touched = {}
        # kernel frames held by slabs
        if self.slabs_changed:
            self.slabs_changed = False
            for name, slab in core.slabs.items():
                old = self.slabs[name]
                if slab.used.keys() != old:
                    new = set(slab.used)
                    for f in old - new:
                        self._alloc(f, -1, small)
                    for f in new - old:
                        self._alloc(f, +1, small)
                    self.slabs[name] = new
        # leaf arrays put aside for reuse must be empty
        if self.new_spares:
            if any((a != EMPTY).any() for a in self.new_spares):
                bad.append("tables: a spare leaf entry array (for the next page table) is not empty")
            self.new_spares.clear()
        if self.bad_entries:
            bad.append("I3: a mapping or a kernel object names a frame beyond the frame table (or an entry is "
                       "malformed)")
        small.discard(NIL)
        if big:
            if small:
                big.append(np.fromiter(small, dtype=np.int64, count=len(small)))
            frames = np.unique(np.concatenate(big))
            frames = frames[(frames >= 0) & (frames < ft.n)]
            self._frames_np(frames, bad)
        elif small:
            self._frames_py(small, bad)
        # O(1): the counters, and the head of the free list
        pk = self.per_kind
        if (ft.free_count != pk[KERNEL_FREE] or ft.kernel_used != pk[KERNEL_USED]
                or ft.kernel_shared != pk[KERNEL_SHARED] or ft.user_mapped != self.mapped
                or ft.user_free != pk[USER] - self.mapped or ft.ram != ft.n - pk[NONE]):
            bad.append(f"I7: the kernel's counters {ft.counts()} differ from the frame kinds "
                       f"({dict(zip(('none', 'kernel_free', 'kernel_used', 'kernel_shared', 'user'), pk))}, "
                       f"{self.mapped} user frames mapped)")
        h = ft.head
        if pk[KERNEL_FREE] == 0:
            if h != NIL:
                bad.append(f"I2: no kernel frame is free but the free list starts at {h}")
        elif not (0 <= h < ft.n and ft.kind.item(h) == KERNEL_FREE and ft.prev.item(h) == NIL):
            bad.append(f"I2: the free list's head {h} is not a free kernel frame without a predecessor")
        return bad

    def _frames_py(self, frames: set[int], bad: list[str]) -> None:
        """The per-frame rules and the counters, frame by frame (a few frames), then ``_links``."""
        ft = self.core.frames
        n = ft.n
        kind, refs, nxt, prv = ft.kind, ft.refs, ft.next, ft.prev
        sk, sr, sn, sp = self.kind, self.refs, self.next, self.prev
        pk = self.per_kind
        beyond = [f for f in frames if not 0 <= f < n]
        if beyond:
            bad.append(f"I2: a free-list link names a frame beyond the frame table: {sorted(beyond)[:4]}")
            frames = frames - set(beyond)
        listy: set[int] = set()  # frames whose place on the free list may have changed, and their old neighbours
        fresh: list[int] = []  # frames that became free kernel frames: they need order labels
        maps, client, client_bad, alloc = self.maps, self.client, self.client_bad, self.alloc
        for f in frames:
            k, r = kind.item(f), refs.item(f)
            was, had = sk.item(f), sr.item(f)
            if k != was:
                if k > USER:
                    bad.append(f"I1: frame {f} has no valid owner (kind {k})")
                    continue
                pk[was] -= 1
                pk[k] += 1
                sk[f] = k
                if k == KERNEL_FREE:
                    fresh.append(f)
                    listy.add(f)
                elif was == KERNEL_FREE:
                    listy.add(f)
            if r != had:
                sr[f] = r
                if (k == USER and r > 0) != (was == USER and had > 0):
                    self.mapped += 1 if k == USER and r > 0 else -1
            elif k != was and r > 0 and (k == USER or was == USER):
                self.mapped += 1 if k == USER else -1
            x, p, a, b = nxt.item(f), prv.item(f), sn.item(f), sp.item(f)
            if x != a or p != b:
                listy.add(f)
                listy.add(a)
                listy.add(b)
                sn[f] = x
                sp[f] = p
            m = maps.item(f)
            if r != m:
                bad.append(f"I4: frame {f} has refcount {r} but {m} mapping(s)")
            if k == USER:
                if client.item(f):
                    bad.append(f"I9: user frame {f} has a mapping a client made itself")
            elif k == KERNEL_SHARED:
                if self.writable.item(f) or self.large.item(f):
                    bad.append(f"I3: kernel-shared frame {f} is mapped writable or under a large page")
            elif m:
                bad.append(f"I3: frame {f} of kind {k} is mapped in user space")
            if client_bad.item(f):
                bad.append(f"I9: frame {f} has a client-made mapping with more than read access")
            c = alloc.item(f)
            if c > 1 or (k == KERNEL_USED) != (c > 0 or self.boot_used.item(f)):
                bad.append(f"I2: frame {f} is {'KERNEL_USED' if k == KERNEL_USED else f'of kind {k}'} and "
                           f"held by {c} kernel object(s)")
        if listy:
            listy.discard(NIL)
            self._links(listy, fresh, bad)

    def _links(self, frames: set[int], fresh: list[int], bad: list[str]) -> None:
        """The free-list rules on ``frames`` (those whose place on the list may have changed, and the
        frames that linked to them before); ``fresh``: the ones that became free (labelled first)."""
        ft = self.core.frames
        n = ft.n
        kind, nxt, prv = ft.kind, ft.next, ft.prev
        ordered = (not fresh or self._label(fresh)) if len(fresh) <= SMALL else False
        head = ft.head
        lab = self.label
        for f in frames:
            if not 0 <= f < n:
                bad.append(f"I2: a free-list link names {f}, which is not a frame")
                continue
            k, x, p = kind.item(f), nxt.item(f), prv.item(f)
            if k == KERNEL_FREE:
                if x != NIL and not (0 <= x < n and kind.item(x) == KERNEL_FREE and prv.item(x) == f
                                     and (not ordered or lab.item(f) < lab.item(x))):
                    bad.append(f"I2: free frame {f} links to {x}, which does not link back (or lies before it)")
                if p == NIL:
                    if head != f:
                        bad.append(f"I2: free frame {f} has no predecessor but is not the head ({head})")
                elif not (0 <= p < n and kind.item(p) == KERNEL_FREE and nxt.item(p) == f
                          and (not ordered or lab.item(p) < lab.item(f))):
                    bad.append(f"I2: free frame {f} has predecessor {p}, which does not link to it (or lies after it)")
            elif x != NIL or p != NIL or head == f:
                bad.append(f"I2: frame {f} of kind {k} is linked on the free list")
        if not ordered:
            self._whole_list(bad)

    def _label(self, fresh: list[int]) -> bool:
        """Order labels for frames that became free, from their place on the list (pushed at the head:
        below the old head's). False if some do not fit between their neighbours' labels, or lie on a
        cycle of their own: then the whole list is verified instead."""
        ft = self.core.frames
        n = ft.n
        kind, nxt, prv = ft.kind, ft.next, ft.prev
        lab = self.label
        new = set(fresh)
        done = 0
        for s in fresh:
            p = prv.item(s)
            if p in new:
                continue  # not the first of a chain of new frames
            chain = [s]
            f = nxt.item(s)
            while f in new:
                if len(chain) > len(new):
                    return False  # a cycle among them
                chain.append(f)
                f = nxt.item(f)
            lo = lab.item(p) if 0 <= p < n and kind.item(p) == KERNEL_FREE else None
            hi = lab.item(f) if 0 <= f < n and kind.item(f) == KERNEL_FREE else None
            k = len(chain)
            if hi is not None and (lo is None or hi - lo > k):
                base = hi - k
            elif lo is not None and hi is None:
                base = lo + 1
            elif lo is None and hi is None:
                base = 0
            else:
                return False
            for i, g in enumerate(chain):
                lab[g] = base + i
            done += k
        return done == len(new)

    def _whole_list(self, bad: list[str]) -> None:
        ft = self.core.frames
        if free_list_sound(ft, ft.kind == KERNEL_FREE, self.per_kind[KERNEL_FREE]):
            self._relabel()
        else:
            bad.append("I2: the free list is not exactly the free kernel frames, linked once each both ways")

    def _frames_np(self, f: np.ndarray, bad: list[str]) -> None:
        """``_frames_py`` with numpy, for many frames (sorted, distinct, in range)."""
        ft = self.core.frames
        k, r = ft.kind[f], ft.refs[f]
        was, had = self.kind[f], self.refs[f]
        if int(k.max()) > USER:
            bad.append(f"I1: frame(s) {f[k > USER][:4].tolist()} have no valid owner")
            return
        self.per_kind = (np.array(self.per_kind) + np.bincount(k, minlength=USER + 1)
                         - np.bincount(was, minlength=USER + 1)).tolist()
        self.mapped += int(np.count_nonzero((k == USER) & (r > 0))) - int(np.count_nonzero((was == USER) & (had > 0)))
        self.kind[f] = k
        self.refs[f] = r
        m = self.maps[f]
        if not np.array_equal(r, m):
            bad.append(f"I4: refcounts differ from the mappings of frame(s) {f[r != m][:4].tolist()}")
        forbidden = np.where(k == USER, self.client[f],
                             np.where(k == KERNEL_SHARED, self.writable[f] + self.large[f], m)) + self.client_bad[f]
        if forbidden.any():
            bad.append(f"I3: frame(s) {f[forbidden > 0][:4].tolist()} are mapped in a way their kind forbids")
        a = self.alloc[f]
        used = k == KERNEL_USED
        expect = (a > 0) | self.boot_used[f]
        if (a > 1).any() or not np.array_equal(used, expect):
            bad.append(f"I2: frame(s) {f[(a > 1) | (used != expect)][:4].tolist()} are KERNEL_USED but not "
                       "allocated, or allocated but not KERNEL_USED, or allocated twice")
        x, p = ft.next[f], ft.prev[f]
        a, b = self.next[f], self.prev[f]
        moved = (x != a) | (p != b)
        listy = moved | (k == KERNEL_FREE) & (was != KERNEL_FREE) | (k != KERNEL_FREE) & (was == KERNEL_FREE)
        if listy.any():
            self.next[f] = x
            self.prev[f] = p
            frames = set(f[listy].tolist()) | set(a[moved].tolist()) | set(b[moved].tolist())
            frames.discard(NIL)
            self._links(frames, f[(k == KERNEL_FREE) & (was != KERNEL_FREE)].tolist(), bad)

    def _proc(self, pid: int, proc: Process | None, ranges: list[tuple[int, int]], small: set[int],
              big: list[np.ndarray], bad: list[str]) -> None:
        """Bring the copy of process ``pid`` up to date (``proc`` None: it is gone): the per-frame counts
        follow its changed leaf entries (of the leaves it gained or lost, and in the pages ``ranges`` of
        the others), large mappings and kernel frames; the frames involved go to ``small``/``big``; then
        its page-table accounting is checked: whole if tables, leaves or large mappings came or went or a
        table's entry count changed other than with its leaf entries, else the changed leaf tables'."""
        old = self.procs.get(pid)
        if old is None:
            if proc is None:
                return
            old = self.procs[pid] = _Proc()
        structure = False
        changed: set[int] = set()  # leaf tags whose entries changed
        leaves = proc.leaves if proc is not None else {}
        if leaves.keys() != old.leaves.keys():
            structure = True
            for tag in old.leaves.keys() - leaves.keys():
                e = old.leaves.pop(tag)
                old.small -= old.in_use.pop(tag)
                self._entries(e[e != EMPTY].astype(np.int64), -1, small, big)
            for tag in leaves.keys() - old.leaves.keys():
                e = leaves[tag]
                if e.shape != (self.core.leaf_entries,) or (e < EMPTY).any():
                    self.bad_entries = True
                old.leaves[tag] = e.copy()
                ents = e[e != EMPTY].astype(np.int64)
                old.in_use[tag] = ents.size
                old.small += ents.size
                self._entries(ents, +1, small, big)
        bits = self.core.leaf_bits
        size = self.core.leaf_entries
        for lo, hi in ranges:
            t0, t1 = lo >> bits, (hi - 1) >> bits
            for tag in (range(t0, t1 + 1) if t1 - t0 < len(leaves) else sorted(t for t in leaves if t0 <= t <= t1)):
                e = leaves.get(tag)
                if e is None:
                    continue
                o = old.leaves[tag]
                i = max(lo - (tag << bits), 0)
                j = min(hi - (tag << bits), size)
                if j - i == 1:
                    a, b = e.item(i), o.item(i)
                    if a == b:
                        continue
                    o[i] = a
                    delta = 0
                    if b != EMPTY:
                        self._entry(b, -1, small)
                        delta -= 1
                    if a != EMPTY:
                        self._entry(a, +1, small)
                        delta += 1
                else:
                    seg, was = e[i:j], o[i:j]
                    d = np.flatnonzero(seg != was)
                    if not d.size:
                        continue
                    gone = was[d].astype(np.int64)
                    came = seg[d].astype(np.int64)
                    gone, came = gone[gone != EMPTY], came[came != EMPTY]
                    self._entries(gone, -1, small, big)
                    self._entries(came, +1, small, big)
                    was[d] = seg[d]
                    delta = came.size - gone.size
                old.in_use[tag] += delta
                old.small += delta
                changed.add(tag)
        large = proc.large if proc is not None else {}
        if large != old.large:
            structure = True
            pages_at = self.core.profile.pages_at
            for base, m in old.large.items():
                if large.get(base) != m:
                    self._large(m[1], pages_at(m[0]), -1, small, big)
            for base, m in large.items():
                if old.large.get(base) != m:
                    self._large(m[1], pages_at(m[0]), +1, small, big)
            old.large = dict(large)
        tables = proc.tables if proc is not None else {}
        threads = proc.threads if proc is not None else {}
        if list(tables) != list(old.tables):  # tables came or went (or went and came back)
            structure = True
            now = {key: t[0] for key, t in tables.items()}
            for key, f in old.tables.items():
                if now.get(key) != f and f >= 0:
                    self._alloc(f, -1, small)
            for key, f in now.items():
                if old.tables.get(key) != f and f >= 0:
                    self._alloc(f, +1, small)
            old.tables = now
        if threads != old.threads:
            for tid, f in old.threads.items():
                if threads.get(tid) != f:
                    self._alloc(f, -1, small)
            for tid, f in threads.items():
                if old.threads.get(tid) != f:
                    self._alloc(f, +1, small)
            old.threads = dict(threads)
        if proc is None:
            del self.procs[pid]
            return
        used = [t[1] for t in tables.values()]  # (in the order of ``old.tables``)
        if not structure and proc.small_pages == old.small:
            leaf = self.core.leaf
            if used != old.used:
                for key, u, was in zip(old.tables, used, old.used):
                    if u != was and (key[0] != leaf or key[1] not in changed):
                        structure = True
                        break
            for tag in changed:
                n = old.in_use[tag]
                if tables[(leaf, tag)][1] != n or n == 0:
                    structure = True
        else:
            structure = True
        if structure:
            bad.extend(proc_table_problems(self.core, proc, [old.in_use[t] for t in leaves], malformed=False))
        old.used = used


# ---- the exact incremental check of the mm's view --------------------------------------------------

class ViewTracker:
    """The exact incremental check of the mm's ``View`` (what it covers: the module docstring).

    ``reset(view)`` takes copies (after a full check found the view sound); ``touch(key, frames)`` names
    a client a journal op acted on and the frames the op names; ``check()`` checks what changed since the
    last check and returns the problems found. The frames checked are those the ops named and those of
    every mapping added or dropped (found by comparing each named client's mappings with the copy)."""

    def __init__(self) -> None:
        self.view: View | None = None
        self.touched: set[str] = set()
        self.frames: list[list[list[int]]] = []  # runs the ops named

    def touch(self, key: Any, runs: Any = None) -> None:
        if isinstance(key, str):
            self.touched.add(key)
        if isinstance(runs, list):
            self.frames.append(runs)

    def reset(self, v: View) -> None:
        self.view = v
        self.state = v.state.copy()
        self.want = expected_refs(v)
        self.maps = {key: dict(c.maps) for key, c in v.clients.items()}
        self.per_state = np.bincount(self.state, minlength=USED + 1).tolist()
        self.touched = set()
        self.frames = []

    def check(self) -> list[str]:
        v = self.view
        assert v is not None
        bad: list[str] = []
        want = self.want
        runs: list[list[list[int]]] = self.frames
        self.frames = []
        keys = self.touched
        if v.clients.keys() != self.maps.keys():
            keys = keys | (v.clients.keys() ^ self.maps.keys())
        for key in keys:
            c = v.clients.get(key)
            old = self.maps.get(key, {})
            new = c.maps if c is not None else {}
            if old.keys() == new.keys() and all(old[a] is m for a, m in new.items()):
                continue
            for a, m in old.items():
                if new.get(a) is not m:
                    for first, count in m.frames:
                        want[first:first + count] -= 1
                    runs.append(m.frames)
            for a, m in new.items():
                if old.get(a) is not m:
                    for first, count in m.frames:
                        want[first:first + count] += 1
                    runs.append(m.frames)
            if c is None:
                del self.maps[key]
            else:
                self.maps[key] = dict(new)
        self.touched = set()
        if runs:
            st, rf = v.state, v.refs
            total = sum(count for r in runs for _first, count in r)
            if total <= SMALL:
                self._frames_py({f for r in runs for first, count in r for f in range(first, first + count)}, bad)
            else:
                parts = [np.arange(first, first + count, dtype=np.int64) for r in runs for first, count in r]
                f = np.unique(np.concatenate(parts))
                f = f[(f >= 0) & (f < v.n)]
                s, was = st[f], self.state[f]
                if int(s.max()) > USED:
                    bad.append(f"I1 (mm view): frame(s) {f[s > USED][:4].tolist()} have no valid state")
                else:
                    self.per_state = (np.array(self.per_state) + np.bincount(s, minlength=USED + 1)
                                      - np.bincount(was, minlength=USED + 1)).tolist()
                self.state[f] = s
                r = rf[f]
                if not np.array_equal(r, want[f]):
                    bad.append(f"I4 (mm view): refcounts differ from the clients' mappings of frame(s) "
                               f"{f[r != want[f]][:4].tolist()}")
                if not np.array_equal(r > 0, s == USED):
                    bad.append(f"I1 (mm view): frame(s) {f[(r > 0) != (s == USED)][:4].tolist()} are used "
                               "without a mapping or mapped without being used")
        ps = self.per_state
        if ps[1] + ps[2] + ps[3] != v.ram:
            bad.append(f"I7 (mm view): kernel {ps[1]} + free {ps[2]} + used {ps[3]} != RAM {v.ram}")
        return bad

    def _frames_py(self, frames: set[int], bad: list[str]) -> None:
        v = self.view
        assert v is not None
        st, rf, want, old, ps = v.state, v.refs, self.want, self.state, self.per_state
        n = v.n
        for f in frames:
            if not 0 <= f < n:
                bad.append(f"I1 (mm view): a mapping or an op names frame {f}, beyond the view's {n}")
                continue
            s, was = st.item(f), old.item(f)
            if s != was:
                if s > USED:
                    bad.append(f"I1 (mm view): frame {f} has no valid state ({s})")
                    continue
                ps[was] -= 1
                ps[s] += 1
                old[f] = s
            r = rf.item(f)
            if r != want.item(f):
                bad.append(f"I4 (mm view): frame {f} has refcount {r} but its clients map it {want.item(f)} time(s)")
            if (r > 0) != (s == USED):
                bad.append(f"I1 (mm view): frame {f} is in state {s} with refcount {r}")


__all__ = ["FULL_EVERY", "KernelTracker", "ViewTracker", "agreement", "expected_refs", "fingerprint", "kernel",
           "kernel_arrays", "state", "view"]
