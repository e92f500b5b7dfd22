"""Invariant checks across both views (the kernel's frame table and the mm's own view), and what runs when.

Every rule about the kernel has one source: the predicates of
``kernel_server.invariants`` (I1-I4, I7, I9, the page-table accounting, I13's
charges). The full check is ``check_kernel``; the incremental check calls the
same predicates on what a step changed, so a violation reads the same either
way. Each check returns violations: strings starting with the invariant's name.

**Full recomputation.** ``kernel`` (``check_kernel``: everything from the raw
state); ``view`` checks the mm's view: its reference counts equal its
clients' mappings (I4), a frame is used exactly when mapped (I1), the states
add up to RAM (I7), and each client is charged exactly the pages it maps,
within its quota (I13).

**The exact incremental check.** ``KernelTracker`` hears from the kernel's
observer seam (``kernel_server.observe``) which frames were written and
which processes changed. It keeps, as of the last check, each frame's
mappings (all of them, the 4 KiB ones with more than read access, those a
client made, the large ones), the kernel objects holding it, its kind,
whether it is a mapped user frame and its free-list links; and of each
process the bytes of its leaf tables with the entries each holds, its large
mappings and the kernel frames its objects hold. After a step it compares
each changed process's leaf tables with its copies (a byte comparison per
table, the entries that differ found only in a table that differs), so the
frames whose mappings or holders changed are known without listing any
process's mappings, and checks:

- every frame written or whose mappings or holders changed: the rules of
  ``frame_problems`` (I1, I2, I4), and the mapping rules (I3, I9, large pages
  over user frames only) in their per-frame form from its counts, which
  judges every process mapping that frame;
- every process that changed: its changed entries (none malformed or beyond
  the table), its tables' accounting from the kept counts (``tables_sound``),
  its charge (I13); then ``pool_problems`` (I13 across processes),
  ``large_index_problems`` and ``spare_problems``;
- ``counter_problems`` (I7) with counts kept from the frames checked;
- the free list (I2) when a free frame was written or the head moved: near
  the frames written (``free_list_sound_near``: their links, their old and new
  neighbours', a short walk to an end of the list), as a whole when that does
  not settle it or the step wrote many frames.

A process changed by a thread or endpoint call (which makes or drops kernel
objects and maps nothing) gets only its kernel frames followed and its charge
checked. A step that touched at most ``SMALL`` frames is checked frame by
frame in Python (the ``invariants`` fast decisions), a larger one with numpy.
Each fast decision that fails is reported in the words of the predicates.

``ViewTracker`` hears of every record the mm applies (``mm_service.observe``)
and checks, after a step, the frames the records named and those of every
mapping added or dropped (found by comparing the mappings of each client a
record named, and of clients that came or went, with its copies): refcount =
mappings, used exactly when mapped, valid state, the states adding up to RAM;
and each client a record named is charged what it maps, within its quota. A
snapshot record or a restarted mm (a new view) makes the next check a full
one.

What the incremental check does not see, and the next full recomputation
does: a write that the kernel does not report to its observer (a frame's
kind, refcount or links, or a process it does not name), a mapping or page
table changed by a thread or endpoint call (only a bug could make either), a
change to the mm's view that no record made. When the
incremental check finds something, the full recomputation runs at once and
its report is what is flagged; the trackers take fresh copies after every
full recomputation that finds nothing.

Which runs when (``World.check_state``, for each view, after a step that changed it):

- ``check_every == 1``: the full recomputation after every such step;
- ``check_every == N > 1`` (the default, ``FULL_EVERY``): the full recomputation
  every N steps (if the view changed since the last one), at every quiet point and
  at the end; the incremental check after every other step that changed the view;
- ``check_every == 0``: the full recomputation at quiet points and at the end only;
  the incremental check after every step that changed the view;
- ``incremental=False`` (``--no-incremental``): no state check between full ones.

Whatever the settings: I6 for every refused kernel call (it reported no
write, and ``fingerprint`` is unchanged); ``state`` (everything the kernel's
digest covers) before and after every forged request (``lies``); at quiet points
``agreement`` and ``exact_agreement`` (I8: every frame's owner, and every
page every process maps), and the mm's own audit. The world adds the checks
that need time or history (I11 deadlines, I12 execution counts, the mm's
settlement of each intent against what the kernel did, replies journaled
before they are sent, lies refused).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator import FULL_EVERY
from kernel_server import invariants as KI
from kernel_server.core import KernelCore
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, USER
from kernel_server.observe import as_frames
from kernel_server.pagetable import CLIENT_MADE, EMPTY, ENTRY_SHIFT, PROT_MASK
from mm_service import records as J
from mm_service.view import USED, View
from protocol import PROT_READ
from protocol import runs as R

# kernel frame kind -> the code View.compare expects (0 none, 1 kernel, 2 user)
_KIND_CODE = np.array([0, 1, 1, 1, 2], dtype=np.uint8)
_NONE = np.zeros(0, dtype=np.int64)
SMALL = 64  # up to this many frames changed in a step are checked one by one in Python, more with numpy


# ---- full recomputation --------------------------------------------------------------------------

def kernel(core: KernelCore, counts: dict[str, np.ndarray] | None = None) -> list[str]:
    """``check_kernel`` (``counts``: gets the per-frame counts it computed, for ``KernelTracker.reset``)."""
    return KI.check_kernel(core, counts)


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
    for key in v.clients:
        out.extend(charge_problems(v, key))
    return out


def charge_problems(v: View, key: str) -> list[str]:
    """I13 in the mm's view: a client is charged exactly the pages it maps, within its quota."""
    c = v.clients.get(key)
    if c is None:
        return []
    mapped = sum(m.pages for m in c.maps.values())
    out = []
    if c.charged != mapped:
        out.append(f"I13 (mm view): client {key[:8]} is charged {c.charged} page(s), its mappings hold {mapped}")
    if c.charged > c.quota:
        out.append(f"I13 (mm view): client {key[:8]} is charged {c.charged} page(s), beyond its quota of {c.quota}")
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
        objects += (p.small_pages + 3 * len(p.large) + 7 * len(p.threads) + 11 * len(p.endpoints)
                    + 13 * len(p.tables) + (p.kernel_used << 20) + (p.tables[(0, 0)][1] << 32))
    return (ft.head, ft.free_count, ft.kernel_used, ft.user_free, ft.user_mapped, core.reserved, len(core.procs),
            objects, core.event_seq, core.next_id["pid"], core.next_id["tid"], core.next_id["eid"],
            len(core.spare_leaves))


def state(core: KernelCore) -> tuple:
    """Every piece of kernel state ``KernelCore.digest`` covers, as one value: equal exactly when nothing
    changed. The digest's own parts, compared as they are instead of hashed: the frame table's arrays as
    bytes (a copy each) and its counters; per process the ``repr`` of its ``state()`` (what the digest
    hashes) and the bytes of its leaf tables; the pool, ids, events and large-page index."""
    ft = core.frames
    procs = []
    for pid in sorted(core.procs):
        st = core.procs[pid].state()
        tables, small, large, leaves = st[-1]
        procs.append((repr(st[:-1]), repr((tables, small, large, [t for t, _ in leaves])),
                      tuple(raw for _, raw in leaves)))
    return (ft.kind.tobytes(), ft.refs.tobytes(), ft.next.tobytes(), ft.prev.tobytes(), ft.head, ft.free_count,
            tuple(ft.counts().values()), procs, repr((core.next_id, core.event_seq, core.reserved,
                                                      len(core.spare_leaves), sorted(core.large_index.items()))))


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


def _view_pages_in_order(v: View, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_view_pages``, its mappings taken in virtual address order (``ClientState.starts``) and expanded in
    a fixed number of numpy passes whatever their number: sorted by page whenever the mappings do not
    overlap, so no sort is needed."""
    c = v.clients[key]
    maps = c.maps
    vps: list[int] = []
    firsts: list[int] = []
    counts: list[int] = []
    prots: list[int] = []
    for a in c.starts:
        m = maps[a]
        vp = m.vaddr >> 12
        for first, count in m.frames:
            vps.append(vp)
            firsts.append(first)
            counts.append(count)
            prots.append(m.prot)
            vp += count
    if not counts:
        return _NONE, _NONE, _NONE
    n = np.asarray(counts, dtype=np.int64)
    total = int(n.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return (np.repeat(np.asarray(vps, dtype=np.int64), n) + within,
            np.repeat(np.asarray(firsts, dtype=np.int64), n) + within, np.repeat(np.asarray(prots, dtype=np.int64), n))


def _view_pages(v: View, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(virtual pages, frames, prot) of every page the view says the mm mapped for ``key``, by page."""
    vps, frames, prots = [], [], []
    for m in v.clients[key].maps.values():
        f = R.to_array(m.frames)
        vps.append(np.arange(m.vaddr >> 12, (m.vaddr >> 12) + f.size, dtype=np.int64))
        frames.append(f)
        prots.append(np.full(f.size, m.prot, dtype=np.int64))
    if not vps:
        return _NONE, _NONE, _NONE
    vp, f, p = np.concatenate(vps), np.concatenate(frames), np.concatenate(prots)
    order = np.argsort(vp, kind="stable")
    return vp[order], f[order], p[order]


def _kernel_pages(core: KernelCore, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(virtual pages, frames, prot) of every page the mm mapped in process ``pid`` (large ones page by page)."""
    proc = core.procs[pid]
    vps, ents = proc.entries()
    mine = (ents & CLIENT_MADE) == 0
    vp, ent = vps[mine], ents[mine]
    parts = [(vp, ent >> ENTRY_SHIFT, ent & PROT_MASK)]
    pages_at = core.geo.pages_at
    for base, (lv, first, prot) in proc.large.items():
        k = pages_at[lv]
        parts.append((np.arange(base, base + k, dtype=np.int64), np.arange(first, first + k, dtype=np.int64),
                      np.full(k, prot, dtype=np.int64)))
    v, f, p = (np.concatenate([x[i] for x in parts]) for i in range(3))
    order = np.argsort(v, kind="stable")
    return v[order], f[order], p[order]


def exact_agreement(v: View, core: KernelCore, name: Any = str) -> list[str]:
    """I8, exactly: the mm knows every client process the kernel has (same pid), and for each one the
    pages the mm mapped in it are those the view says, page by page (frame and protection)."""
    out: list[str] = []
    procs = {p.key: p.pid for p in core.procs.values()}
    for key, c in v.clients.items():
        pid = procs.get(key)
        if pid != c.pid:
            out.append(f"I8: the mm has {name(key)} as pid {c.pid}, the kernel "
                       f"{'has no process for it' if pid is None else f'has pid {pid}'}")
            continue
        b = _kernel_pages(core, pid)
        if all(np.array_equal(x, y) for x, y in zip(_view_pages_in_order(v, key), b)):
            continue  # (the kernel maps each page once: equal to it, the view's pages are in order and distinct)
        a = _view_pages(v, key)
        if not all(np.array_equal(x, y) for x, y in zip(a, b)):
            va, vb = set(zip(*(x.tolist() for x in a))), set(zip(*(x.tolist() for x in b)))
            only_view, only_kernel = sorted(va - vb)[:3], sorted(vb - va)[:3]
            out.append(f"I8: the pages the mm mapped in {name(key)} (pid {pid}) differ: the view has "
                       f"{len(va - vb)} (vpage, frame, prot) the kernel has not (e.g. {only_view}), the kernel "
                       f"{len(vb - va)} the view has not (e.g. {only_kernel})")
    for key, pid in procs.items():
        if key not in v.clients:
            out.append(f"I8: the kernel has process {pid} of {name(key)}, which the mm does not know")
    return out


# ---- the exact incremental check of the kernel ------------------------------------------------------

class _Copy:
    """What the tracker keeps of one process as of the last check: the bytes of each leaf entry array and
    the entries each holds in use, its large mappings, the kernel frames its objects hold (sorted)."""

    __slots__ = ("leaves", "used", "large", "held")

    def __init__(self, proc: Any = None, used: list[int] | None = None) -> None:
        self.leaves: dict[int, bytes] = {}
        self.used: dict[int, int] = {}
        self.large: dict[int, tuple[int, int, int]] = {}
        self.held: list[int] = []
        if proc is not None:  # (``used``: the entries in use of each of its leaf tables, in order)
            for (tag, e), u in zip(proc.leaves.items(), used or []):
                self.leaves[tag] = e.tobytes()
                self.used[tag] = u
            self.large = dict(proc.large)
            self.held = sorted(proc.kernel_frames())


_NO_COPY = _Copy()


def _in_use(raw: bytes | None) -> np.ndarray:
    """The entries in use of a leaf entry array kept as bytes."""
    if raw is None:
        return _NONE
    a = np.frombuffer(raw, dtype=np.int32)
    return a[a != EMPTY]


class KernelTracker:
    """The exact incremental check of a ``KernelCore`` (what it covers: the module docstring).

    ``written(frames)`` and ``changed(pid)`` are fed from the kernel's observer; ``reset()`` takes copies
    of the whole state (after a full check found it sound); ``check()`` checks what changed since the
    last check, brings the copies up to date and returns the problems found.

    Kept as of the last check: per frame, its mappings (all of them, the 4 KiB ones with more than read
    access, those a client made, the large ones: what ``frame_problems`` and the per-frame mapping rules
    need), the kernel objects holding it, its kind, whether it is a mapped user frame, its free-list links;
    per process, a ``_Copy``. A step that touched at most ``SMALL`` frames is checked frame by frame in
    Python (``invariants.frames_sound``, ``free_list_sound_near``, ...), a larger one with numpy."""

    def __init__(self, core: KernelCore) -> None:
        self.core = core
        self.reset()

    def written(self, frames: Any) -> None:
        self.noted.append(frames)

    def changed(self, pid: int, objects_only: bool = False) -> None:
        """Process ``pid`` changed; ``objects_only``: by a call that makes or drops kernel objects (threads,
        endpoints) and maps nothing, so only what holds its kernel frames and its charge are looked at."""
        if objects_only:
            if pid not in self.pids:
                self.objects.add(pid)
        else:
            self.pids.add(pid)
            self.objects.discard(pid)

    def reset(self, counts: dict[str, np.ndarray] | None = None) -> None:
        """Fresh copies of the whole state (``counts``: the mapping and holding counts of every frame, as the
        full check that just ran computed them, to be taken instead of computed again)."""
        core = self.core
        ft = core.frames
        n = ft.n
        self.noted: list[Any] = []
        self.pids: set[int] = set()
        self.objects: set[int] = set()
        if counts is not None and "mapped" in counts:
            self.mapped = counts["mapped"].astype(np.int64)  # (a copy: the tracker changes its own)
            self.held = counts["held"].astype(np.int64)
        else:
            self.mapped = KI.mapping_counts(core).astype(np.int64)
            self.held = KI.held_counts(core)[0].astype(np.int64)
        self.writable = np.zeros(n, dtype=np.int64)
        self.client = np.zeros(n, dtype=np.int64)
        self.large = np.zeros(n, dtype=np.int64)
        procs = list(core.procs.items())
        leaves = [e for _pid, p in procs for e in p.leaves.values()]
        used: list[int] = []
        if leaves:  # every leaf table at once
            allv = np.concatenate(leaves).astype(np.int64)
            in_use = allv != EMPTY
            if all(e.size == leaves[0].size for e in leaves):
                used = np.count_nonzero(in_use.reshape(len(leaves), -1), axis=1).tolist()
            else:  # (a malformed leaf: the full check that ran before said so)
                used = [int(np.count_nonzero(e != EMPTY)) for e in leaves]
            ents = allv[in_use]
            ents = ents[(ents >= 0) & ((ents >> ENTRY_SHIFT) < n)]
            frames = ents >> ENTRY_SHIFT
            self.writable += np.bincount(frames[(ents & PROT_MASK) != PROT_READ], minlength=n)[:n]
            self.client += np.bincount(frames[(ents & CLIENT_MADE) != 0], minlength=n)[:n]
        pages_at = core.geo.pages_at
        self.copies = {}
        i = 0
        for pid, p in procs:
            k = len(p.leaves)
            self.copies[pid] = _Copy(p, used[i:i + k])
            i += k
            for lv, first, _prot in p.large.values():
                end = first + pages_at[lv]
                if 0 <= first and end <= n:
                    self.large[first:end] += 1
        self.kind = ft.kind.copy()
        self.next = ft.next.copy()
        self.prev = ft.prev.copy()
        self.live = (ft.kind == USER) & (ft.refs > 0)
        self.per_kind = np.bincount(ft.kind, minlength=USER + 1).tolist()
        self.n_live = int(np.count_nonzero(self.live))
        self.head = ft.head

    # ---- what changed ------------------------------------------------------------------------------

    def _entries(self, ents: list[int], sign: int, touched: set[int]) -> bool:
        """Count the mappings leaf entries ``ents`` make (+1) or made (-1), noting their frames; False when
        an added entry is malformed or names a frame beyond the table (the process's report names it)."""
        n = self.core.frames.n
        mapped, writable, client = self.mapped, self.writable, self.client
        fine = True
        for x in ents:
            if x == EMPTY:
                continue
            f = x >> ENTRY_SHIFT
            if x < 0 or f >= n:  # counted nowhere (as ``mapping_counts`` does)
                fine = fine and sign < 0
                continue
            mapped[f] += sign
            if x & PROT_MASK != PROT_READ:
                writable[f] += sign
            if x & CLIENT_MADE:
                client[f] += sign
            touched.add(f)
        return fine

    def _entries_np(self, ents: np.ndarray, sign: int, arrays: list[np.ndarray]) -> bool:
        """``_entries`` for many entries at once."""
        n = self.core.frames.n
        ents = ents[ents != EMPTY].astype(np.int64)
        ok = (ents >= 0) & ((ents >> ENTRY_SHIFT) < n)
        fine = sign < 0 or bool(ok.all())
        ents = ents[ok]
        frames = ents >> ENTRY_SHIFT
        np.add.at(self.mapped, frames, sign)
        np.add.at(self.writable, frames[(ents & PROT_MASK) != PROT_READ], sign)
        np.add.at(self.client, frames[(ents & CLIENT_MADE) != 0], sign)
        arrays.append(frames)
        return fine

    def _process(self, pid: int, proc: Any, touched: set[int], arrays: list[np.ndarray]) -> bool:
        """Bring the copy of process ``pid`` (``proc``: None once it is gone) and the per-frame counts up to
        date with its leaf tables and large mappings; its frames whose mappings changed go to ``touched`` /
        ``arrays``. False when something of it is wrong (malformed or outside entries, its tables' accounting,
        a large mapping beyond the table): the caller reports it."""
        old = self.copies.get(pid, _NO_COPY)
        new = _Copy()
        fine = True
        leaves = proc.leaves if proc is not None else {}
        for tag, e in leaves.items():
            eb = e.tobytes()
            ob = old.leaves.get(tag)
            new.leaves[tag] = eb
            if ob == eb:
                new.used[tag] = old.used[tag]
                continue
            if ob is None or len(ob) != len(eb) or e.dtype != np.int32:
                idx = None
                added = e[e != EMPTY]
                removed = _in_use(ob)
            else:
                prior = np.frombuffer(ob, dtype=np.int32)
                idx = np.flatnonzero(e != prior)
                added, removed = e[idx], prior[idx]
            if added.size + removed.size <= SMALL:
                a, r = added.tolist(), removed.tolist()
                self._entries(r, -1, touched)
                fine = self._entries(a, +1, touched) and fine
                now, before = sum(1 for x in a if x != EMPTY), sum(1 for x in r if x != EMPTY)
            else:
                self._entries_np(removed, -1, arrays)
                fine = self._entries_np(added, +1, arrays) and fine
                now, before = int(np.count_nonzero(added != EMPTY)), int(np.count_nonzero(removed != EMPTY))
            new.used[tag] = now if idx is None else old.used[tag] + now - before
        for tag, ob in old.leaves.items():
            if tag not in leaves:  # the leaf table went: its mappings with it
                prior = _in_use(ob)
                if prior.size <= SMALL:
                    self._entries(prior.tolist(), -1, touched)
                else:
                    self._entries_np(prior, -1, arrays)
        large = dict(proc.large) if proc is not None else {}
        if large != old.large:
            n = self.core.frames.n
            pages_at = self.core.geo.pages_at
            for table, sign in ((old.large, -1), (large, +1)):
                other = large if sign < 0 else old.large
                for base, m in table.items():
                    if other.get(base) == m:
                        continue
                    first, end = m[1], m[1] + pages_at[m[0]]
                    if first < 0 or end > n:
                        fine = fine and sign < 0
                        continue
                    self.mapped[first:end] += sign
                    self.large[first:end] += sign
                    arrays.append(np.arange(first, end, dtype=np.int64))
        new.large = large
        if proc is not None:
            new.held = sorted(proc.kernel_frames())
            self._held(old.held, new.held, touched, arrays)
            fine = fine and KI.tables_sound(self.core, proc, new.used)
            fine = fine and proc.kernel_used == len(new.held) and proc.kernel_used <= proc.kernel_limit
            self.copies[pid] = new
        else:
            self._held(old.held, [], touched, arrays)
            self.copies.pop(pid, None)
        return fine

    def _held(self, old: list[int], new: list[int], touched: set[int], arrays: list[np.ndarray]) -> None:
        """Move the holding counts from the kernel frames ``old`` to ``new`` (sorted lists)."""
        if old == new:
            return
        n = self.held.size
        if len(old) + len(new) <= SMALL:
            delta: dict[int, int] = {}
            for f in new:
                delta[f] = delta.get(f, 0) + 1
            for f in old:
                delta[f] = delta.get(f, 0) - 1
            held = self.held
            for f, d in delta.items():
                if d:
                    if 0 <= f < n:
                        held[f] += d
                    touched.add(f)
            return
        a, b = np.asarray(new, dtype=np.int64), np.asarray(old, dtype=np.int64)
        np.add.at(self.held, a[(a >= 0) & (a < n)], 1)
        np.subtract.at(self.held, b[(b >= 0) & (b < n)], 1)
        arrays.append(np.concatenate((a, b)))

    # ---- the check ---------------------------------------------------------------------------------

    def check(self) -> list[str]:
        core = self.core
        ft = core.frames
        bad: list[str] = []
        noted, self.noted = self.noted, []
        pids, self.pids = self.pids, set()
        objects, self.objects = self.objects, set()
        touched: set[int] = set()
        arrays: list[np.ndarray] = []
        for x in noted:
            t = type(x)
            if t is int:
                touched.add(x)
            elif t is range:
                if len(x) <= SMALL:
                    touched.update(x)
                else:
                    arrays.append(np.arange(x.start, x.stop, dtype=np.int64))
            else:
                a = as_frames(x)
                if a.size <= SMALL:
                    touched.update(a.tolist())
                else:
                    arrays.append(a)
        procs = core.procs
        suspects = []  # processes whose fast decision failed: reported by ``process_problems``
        for pid in pids:
            proc = procs.get(pid)
            if not self._process(pid, proc, touched, arrays) and proc is not None:
                suspects.append(proc)
        for pid in objects:  # kernel objects only: what holds its frames, and its charge
            proc = procs.get(pid)
            old = self.copies.get(pid)
            if proc is None or old is None:  # (made or gone: followed whole)
                if not self._process(pid, proc, touched, arrays) and proc is not None:
                    suspects.append(proc)
                continue
            held = sorted(proc.kernel_frames())
            self._held(old.held, held, touched, arrays)
            old.held = held
            if proc.kernel_used != len(held) or proc.kernel_used > proc.kernel_limit:
                bad.extend(KI.proc_charge_problems(proc))
        if arrays or len(touched) > SMALL:
            listy = self._frames_np(touched, arrays, bad)
        else:
            listy = self._frames_py(touched, bad)
        pk = self.per_kind
        counts = {"kernel_free": pk[KERNEL_FREE], "kernel_used": pk[KERNEL_USED], "kernel_shared": pk[KERNEL_SHARED],
                  "user_free": pk[USER] - self.n_live, "user_mapped": self.n_live}
        bad.extend(KI.counter_problems(core, counts))
        if listy or ft.head != self.head:
            bad.extend(listy_problems(self, core, touched, arrays))
        self.head = ft.head
        for proc in suspects:
            bad.extend(KI.process_problems(core, proc) or [
                f"tables: pid {proc.pid} (its mappings, tables or charge, found by the incremental check)"])
        if pids:
            bad.extend(KI.pool_problems(core))
            bad.extend(KI.large_index_problems(core))
            bad.extend(KI.spare_problems(core))
        elif objects:
            bad.extend(KI.pool_problems(core))
        return bad

    def _frames_py(self, touched: set[int], bad: list[str]) -> bool:
        """The per-frame rules for a few frames, one by one; the counts brought up to date. Whether a
        free frame was involved (the free list is then checked)."""
        core = self.core
        ft = core.frames
        n = ft.n
        fl = sorted(touched)
        if fl and (fl[0] < 0 or fl[-1] >= n):
            bad.append(f"I1: frame(s) {[f for f in fl if not 0 <= f < n][:4]} named beyond the frame table")
            fl = [f for f in fl if 0 <= f < n]
            touched.intersection_update(fl)
        mapped, held, writable, client, large = self.mapped, self.held, self.writable, self.client, self.large
        m = [mapped.item(f) for f in fl]
        h = [held.item(f) for f in fl]
        kind, refs = ft.kind, ft.refs
        if not KI.frames_sound(core, fl, m, h):
            a = np.asarray(fl, dtype=np.int64)
            bad.extend(KI.frame_problems(core, a, mapped[a], held[a]))
        sound = KI.frame_mappings_sound
        for f, mf in zip(fl, m):
            if mf and not sound(kind.item(f), mf, writable.item(f), client.item(f), large.item(f)):
                bad.extend(_mapping_report(core, [f]))
                break
        listy = False
        pk, old_kind, live = self.per_kind, self.kind, self.live
        for f in fl:
            k, ko = kind.item(f), old_kind.item(f)
            if k != ko:
                if k <= USER and ko <= USER:
                    pk[ko] -= 1
                    pk[k] += 1
                old_kind[f] = k
                if ko == KERNEL_FREE:
                    listy = True
            if k == KERNEL_FREE:
                listy = True
            lv = k == USER and refs.item(f) > 0
            if lv != live.item(f):
                self.n_live += 1 if lv else -1
                live[f] = lv
        return listy

    def _frames_np(self, touched: set[int], arrays: list[np.ndarray], bad: list[str]) -> bool:
        """``_frames_py`` for many frames, with numpy."""
        core = self.core
        ft = core.frames
        n = ft.n
        parts = arrays + ([np.fromiter(touched, dtype=np.int64, count=len(touched))] if touched else [])
        f = parts[0] if len(parts) == 1 else np.concatenate(parts)
        f = np.unique(f)
        inside = (f >= 0) & (f < n)
        if not inside.all():
            bad.append(f"I1: frame(s) {f[~inside][:4].tolist()} named beyond the frame table")
            f = f[inside]
        arrays[:] = [f]
        touched.clear()
        bad.extend(KI.frame_problems(core, f, self.mapped[f], self.held[f]))
        k_new, k_old = ft.kind[f], self.kind[f]
        if not KI.frames_mappings_sound(k_new, self.mapped[f], self.writable[f], self.client[f], self.large[f]):
            bad.extend(_mapping_report(core, f.tolist()))
        differ = k_new != k_old
        listy = False
        if differ.any():
            if int(k_new[differ].max()) <= USER and int(k_old[differ].max()) <= USER:
                d = (np.bincount(k_new[differ], minlength=USER + 1)[:USER + 1]
                     - np.bincount(k_old[differ], minlength=USER + 1)[:USER + 1])
                self.per_kind = [a + int(b) for a, b in zip(self.per_kind, d.tolist())]
            listy = bool((k_old[differ] == KERNEL_FREE).any())
            self.kind[f] = k_new
        listy = listy or bool((k_new == KERNEL_FREE).any())
        live = (k_new == USER) & (ft.refs[f] > 0)
        self.n_live += int(np.count_nonzero(live)) - int(np.count_nonzero(self.live[f]))
        self.live[f] = live
        return listy


def listy_problems(kt: KernelTracker, core: KernelCore, touched: set[int], arrays: list[np.ndarray]) -> list[str]:
    """I2 of the free list after a step that wrote free frames (or moved the head): decided near the frames
    written when they are few (``invariants.free_list_sound_near``), else (or undecided) as a whole; the
    tracker's copies of the links brought up to date."""
    ft = core.frames
    out: list[str] = []
    if touched and not arrays:
        fl = list(touched)
        near = KI.free_list_sound_near(ft, fl, kt.next, kt.prev, kt.head, kt.per_kind[KERNEL_FREE])
        if near is not True:
            out = KI.free_list_problems(core) or ([] if near is None else ["I2: the free list's links are "
                                                                            "inconsistent (found by the incremental check)"])
        nxt, prv, cn, cp = ft.next, ft.prev, kt.next, kt.prev
        for f in fl:
            cn[f] = nxt.item(f)
            cp[f] = prv.item(f)
        return out
    out = KI.free_list_problems(core)
    for f in arrays:
        kt.next[f] = ft.next[f]
        kt.prev[f] = ft.prev[f]
    return out


def _mapping_report(core: KernelCore, frames: list[int]) -> list[str]:
    """The words for a frame whose mappings break I3/I9: ``process_problems`` of every process mapping it."""
    want = set(frames)
    out: list[str] = []
    pages_at = core.geo.pages_at
    for proc in core.procs.values():
        mine = set((proc.mapped_frames()).tolist())
        mine.update(f for lv, first, _p in proc.large.values() for f in range(first, first + pages_at[lv]))
        if mine & want:
            out.extend(p for p in KI.process_problems(core, proc) if p.startswith(("I3", "I9")))
    return out or [f"I3: frame(s) {frames[:4]} are mapped against their kind (found by the incremental check)"]


# ---- the exact incremental check of the mm's view --------------------------------------------------

_NO_MAPS: dict = {}


def _count(want: np.ndarray, runs: list[list[int]], delta: int) -> None:
    """Add ``delta`` to ``want`` over the frames of ``runs`` (one frame: no slice made)."""
    for first, count in runs:
        if count == 1:
            want[first] += delta
        else:
            want[first:first + count] += delta

class ViewTracker:
    """The exact incremental check of the mm's ``View`` (what it covers: the module docstring).

    ``reset(view)`` takes copies (after a full check found the view sound); ``note(record)`` hears of
    each record applied; ``check()`` checks what changed since the last check and returns the problems
    found."""

    def __init__(self) -> None:
        self.view: View | None = None
        self.touched: set[str] = set()
        self.frames: list[list[list[int]]] = []  # runs the records named
        self.intents: dict[int, str] = {}  # pending intent -> whose

    def note(self, rec: Any) -> None:
        kind = type(rec)
        if kind is J.Intent:
            self.touched.add(rec.key)
            self.frames.append(rec.frames)
            self.intents[rec.n] = rec.key
        elif kind is J.Done or kind is J.Undo:
            key = self.intents.pop(rec.n, None)
            if key is not None:
                self.touched.add(key)
        elif kind is J.NewClient or kind is J.ClientGone or kind is J.RepairMapping:
            self.touched.add(rec.key)
        elif kind is J.Donate or kind is J.Reclaim or kind is J.Repair:
            self.frames.append(rec.frames)
        elif kind is J.Snapshot:
            self.view = None  # everything replaced: the next check is a full one

    def reset(self, v: View) -> None:
        self.view = v
        self.state = v.state.copy()
        self.want = expected_refs(v)
        self.maps = {key: dict(c.maps) for key, c in v.clients.items()}
        self.per_state = np.bincount(self.state, minlength=USED + 1).tolist()
        self.touched = set()
        self.frames = []
        self.intents = {n: p.key for n, p in v.pending.items()}

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
            old = self.maps.get(key, _NO_MAPS)
            new = c.maps if c is not None else _NO_MAPS
            changed = len(old) != len(new)
            for a, m in new.items():
                if old.get(a) is not m:
                    changed = True
                    _count(want, m.frames, +1)
                    runs.append(m.frames)
            if changed:
                for a, m in old.items():
                    if new.get(a) is not m:
                        _count(want, m.frames, -1)
                        runs.append(m.frames)
                if c is None:
                    del self.maps[key]
                else:
                    self.maps[key] = dict(new)
            if c is not None:
                bad.extend(charge_problems(v, key))
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
                bad.append(f"I1 (mm view): a mapping or a record names frame {f}, beyond the view's {n}")
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


__all__ = ["FULL_EVERY", "KernelTracker", "ViewTracker", "agreement", "charge_problems", "exact_agreement",
           "expected_refs", "fingerprint", "kernel", "kernel_arrays", "state", "view"]
