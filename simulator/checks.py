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
which processes changed. It keeps, as of the last check, the mappings and
the kernel objects holding each frame (``mapped``, ``held``: what
``frame_problems`` needs), each process's mapped and kernel frames, each
frame's kind and whether it is a mapped user frame (for the counters). After
a step it brings these up to date for the processes that changed and runs:
``frame_problems`` on every frame written or whose mappings or holders
changed; ``process_problems`` (mappings I3/I9, tables, I13 charge) on every
process that changed; ``pool_problems`` (I13 across processes),
``large_index_problems`` and ``spare_problems`` when a process changed;
``counter_problems`` (I7) with counts kept from the frames checked;
``free_list_problems`` (I2) when a free frame was written or the list's
head moved. A process changed by a thread or endpoint call (which makes or
drops kernel objects and maps nothing) gets only its kernel frames followed
and ``charge_problems`` (I13); any other change gets the whole treatment.

``ViewTracker`` hears of every record the mm applies (``mm_service.observe``)
and checks, after a step, the frames the records named and those of every
mapping added or dropped (found by comparing the mappings of each client a
record named, and of clients that came or went, with its copies): refcount =
mappings, used exactly when mapped, valid state, the states adding up to RAM;
and each client a record named is charged what it maps, within its quota. A
snapshot record or a restarted mm (a new view) makes the next check a full
one.

What the incremental check does not see, and the next full recomputation
does: a write that the kernel does not report to its observer, a mapping or
page table changed by a thread or endpoint call (only a bug could make
either), a change to the mm's view that no record made. When the
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
write, and ``fingerprint`` is unchanged); ``state`` (the kernel's digest)
before and after every forged request (``lies``); at quiet points
``agreement`` and ``exact_agreement`` (I8: every frame's owner, and every
page every process maps), and the mm's own audit. The world adds the checks
that need time or history (I11 deadlines, I12 execution counts, the mm's
settlement of each intent against what the kernel did, replies journaled
before they are sent, lies refused).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from simulator import FULL_EVERY
from kernel_server import invariants as KI
from kernel_server.core import KernelCore
from kernel_server.frames import KERNEL_FREE, USER
from kernel_server.observe import as_frames
from kernel_server.pagetable import CLIENT_MADE, ENTRY_SHIFT, PROT_MASK
from mm_service import records as J
from mm_service.view import USED, View
from protocol import runs as R

# kernel frame kind -> the code View.compare expects (0 none, 1 kernel, 2 user)
_KIND_CODE = np.array([0, 1, 1, 1, 2], dtype=np.uint8)
_NONE = np.zeros(0, dtype=np.int64)
SMALL = 64  # up to this many view frames changed in a step are checked one by one in Python, more with numpy


# ---- full recomputation --------------------------------------------------------------------------

def kernel(core: KernelCore) -> list[str]:
    return KI.check_kernel(core)


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


def state(core: KernelCore) -> str:
    """Every piece of kernel state, as one value (``KernelCore.digest``): equal exactly when nothing changed."""
    return core.digest()


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
        a, b = _view_pages(v, key), _kernel_pages(core, pid)
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

class KernelTracker:
    """The exact incremental check of a ``KernelCore`` (what it covers: the module docstring).

    ``written(frames)`` and ``changed(pid)`` are fed from the kernel's observer; ``reset()`` takes copies
    of the whole state (after a full check found it sound); ``check()`` checks what changed since the
    last check, brings the copies up to date and returns the problems found."""

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

    def reset(self) -> None:
        core = self.core
        ft = core.frames
        self.noted: list[Any] = []
        self.pids: set[int] = set()
        self.objects: set[int] = set()
        self.mapped = KI.mapping_counts(core).astype(np.int64)
        self.held = KI.held_counts(core)[0].astype(np.int64)
        self.pmapped = {pid: np.sort(p.mapped_frames()) for pid, p in core.procs.items()}
        self.pheld = {pid: sorted(p.kernel_frames()) for pid, p in core.procs.items()}
        self.kind = ft.kind.copy()
        self.live = (ft.kind == USER) & (ft.refs > 0)
        self.per_kind = np.bincount(ft.kind, minlength=USER + 1).astype(np.int64)
        self.n_live = int(np.count_nonzero(self.live))
        self.head = ft.head

    @staticmethod
    def _diff(counts: np.ndarray, old: Any, new: Any) -> list[int] | np.ndarray:
        """Move ``counts`` from the multiset ``old`` of frames to ``new``; the frames whose count changed."""
        n = counts.size
        if len(old) + len(new) <= 512:
            delta = Counter(new.tolist() if isinstance(new, np.ndarray) else new)
            delta.subtract(old.tolist() if isinstance(old, np.ndarray) else old)
            changed = [f for f, d in delta.items() if d]
            for f in changed:
                if 0 <= f < n:
                    counts[f] += delta[f]
            return changed
        both = np.concatenate((np.asarray(new, dtype=np.int64), np.asarray(old, dtype=np.int64)))
        u, inv = np.unique(both, return_inverse=True)
        w = np.ones(both.size, dtype=np.int64)
        w[len(new):] = -1
        d = np.bincount(inv, weights=w, minlength=u.size).astype(np.int64)
        changed = u[d != 0]
        d = d[d != 0]
        keep = (changed >= 0) & (changed < n)
        counts[changed[keep]] += d[keep]
        return changed

    def check(self) -> list[str]:
        core = self.core
        ft = core.frames
        n = ft.n
        bad: list[str] = []
        parts: list[Any] = [as_frames(f) for f in self.noted]
        self.noted = []
        pids, self.pids = self.pids, set()
        objects, self.objects = self.objects, set()
        procs = core.procs
        for pid in pids | objects:
            proc = procs.get(pid)
            if pid in pids:
                m_new = np.sort(proc.mapped_frames()) if proc is not None else _NONE
                m_old = self.pmapped.get(pid, _NONE)
                if not np.array_equal(m_new, m_old):
                    parts.append(np.asarray(self._diff(self.mapped, m_old, m_new), dtype=np.int64))
                if proc is None:
                    self.pmapped.pop(pid, None)
                else:
                    self.pmapped[pid] = m_new
            h_new = sorted(proc.kernel_frames()) if proc is not None else []
            h_old = self.pheld.get(pid, [])
            if h_new != h_old:
                parts.append(np.asarray(self._diff(self.held, h_old, h_new), dtype=np.int64))
            if proc is None:
                self.pheld.pop(pid, None)
            else:
                self.pheld[pid] = h_new
        listy = ft.head != self.head
        if parts:
            f = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if f.size > 1:
                f = np.unique(f)
            inside = (f >= 0) & (f < n)
            if not inside.all():
                bad.append(f"I1: frame(s) {f[~inside][:4].tolist()} named beyond the frame table")
                f = f[inside]
            bad.extend(KI.frame_problems(core, f, self.mapped[f], self.held[f]))
            k_new, k_old = ft.kind[f], self.kind[f]
            differ = k_new != k_old
            if differ.any():
                if int(k_new.max()) <= USER:
                    self.per_kind += (np.bincount(k_new[differ], minlength=USER + 1)[:USER + 1]
                                      - np.bincount(k_old[differ], minlength=USER + 1)[:USER + 1])
                listy = listy or bool((k_old[differ] == KERNEL_FREE).any())
                self.kind[f] = k_new
            listy = listy or bool((k_new == KERNEL_FREE).any())  # (links of free frames changed)
            live = (k_new == USER) & (ft.refs[f] > 0)
            self.n_live += int(np.count_nonzero(live)) - int(np.count_nonzero(self.live[f]))
            self.live[f] = live
        pk = self.per_kind
        counts = {"kernel_free": int(pk[KERNEL_FREE]), "kernel_used": int(pk[2]), "kernel_shared": int(pk[3]),
                  "user_free": int(pk[USER]) - self.n_live, "user_mapped": self.n_live}
        bad.extend(KI.counter_problems(core, counts))
        if listy:
            bad.extend(KI.free_list_problems(core))
            self.head = ft.head
        if pids:
            for pid in pids:
                proc = procs.get(pid)
                if proc is not None:
                    bad.extend(KI.process_problems(core, proc))
            bad.extend(KI.pool_problems(core))
            bad.extend(KI.large_index_problems(core))
            bad.extend(KI.spare_problems(core))
        elif objects:
            bad.extend(KI.charge_problems(core))
        return bad


# ---- the exact incremental check of the mm's view --------------------------------------------------

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
            old = self.maps.get(key, {})
            new = c.maps if c is not None else {}
            if old.keys() != new.keys() or not all(old[a] is m for a, m in new.items()):
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
