"""The kernel's frame table: flat numpy arrays over every frame, and the free list.

Rules for this file: no sockets, clocks or randomness; no per-frame Python
objects; every method either checks (pure, may return an error) or commits
(mutates, cannot fail). 13 bytes per frame:

- ``kind``  uint8: NONE (hole or reserved), KERNEL_FREE, KERNEL_USED,
  KERNEL_SHARED (kernel-owned, in use, user-mappable read-only), USER.
- ``refs``  uint32: number of user mappings of the frame (I4).
- ``next``/``prev`` int32: the kernel free list, linked through the frames
  themselves as Jinue links its free pages (doubly, so an explicit reclaim can
  unlink any free frame in O(1)). NIL = -1.

A user frame is *free* when ``refs == 0`` and *mapped* otherwise. Counters are
kept incrementally so ``stats`` costs nothing per frame.

The mutators are the only writers of the arrays. When a watcher is set (``watch``: an
``observe.KernelObserver``, None by default) each of them reports the frames it wrote
(``frames_written``), the list neighbours it relinked included.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from kernel_server.bootmap import BootMap

NONE, KERNEL_FREE, KERNEL_USED, KERNEL_SHARED, USER = 0, 1, 2, 3, 4
KIND_NAMES = {NONE: "none", KERNEL_FREE: "kernel_free", KERNEL_USED: "kernel_used",
              KERNEL_SHARED: "kernel_shared", USER: "user"}
NIL = -1
BOOT_KIND = {
    "reserved": NONE,
    "kernel_image": KERNEL_SHARED,
    "frame_table": KERNEL_USED,
    "kernel_pool": KERNEL_FREE,
    "ramdisk": KERNEL_SHARED,
    "firmware": KERNEL_SHARED,
    "user": USER,
}


class FrameTable:
    def __init__(self, bootmap: BootMap, kernel_limit: int | None) -> None:
        n = bootmap.span
        self.n = n
        self.kernel_limit = n if kernel_limit is None else min(n, kernel_limit)
        self.kind = np.zeros(n, dtype=np.uint8)
        self.refs = np.zeros(n, dtype=np.uint32)
        self.next = np.full(n, NIL, dtype=np.int32)
        self.prev = np.full(n, NIL, dtype=np.int32)
        self.head = NIL
        self.free_count = 0
        self.watch: Any = None  # an observe.KernelObserver told about every write, or None
        # the same arrays as memoryviews, for the one-frame operations (an element read or written through a
        # memoryview is a plain int, about twice as fast as numpy's scalar indexing)
        self._views()
        for r in bootmap.regions:
            k = BOOT_KIND[r.kind]
            if k != KERNEL_FREE:
                self.kind[r.first:r.end] = k
        self.ram = int(np.count_nonzero(self.kind)) + sum(r.count for r in bootmap.of_kind("kernel_pool"))
        self.kernel_used = int(np.count_nonzero(self.kind == KERNEL_USED))
        self.kernel_shared = int(np.count_nonzero(self.kind == KERNEL_SHARED))
        self.user_free = int(np.count_nonzero(self.kind == USER))
        self.user_mapped = 0
        for r in bootmap.of_kind("kernel_pool"):
            self.push_free(np.arange(r.first, r.end, dtype=np.int64))

    def _views(self) -> None:
        self._kind1, self._refs1 = memoryview(self.kind), memoryview(self.refs)
        self._next1, self._prev1 = memoryview(self.next), memoryview(self.prev)

    def __getstate__(self) -> dict[str, Any]:
        """For pickling and copying (the exhaustive checker stores states): the arrays, not their views."""
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, memoryview)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._views()  # views of the arrays this copy has, never of the original's

    # ---- queries (pure) -------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "ram": self.ram,
            "kernel_free": self.free_count,
            "kernel_used": self.kernel_used,
            "kernel_shared": self.kernel_shared,
            "user_free": self.user_free,
            "user_mapped": self.user_mapped,
        }

    def free_list(self) -> list[int]:
        """The free list walked from its head (for checks and tests)."""
        out, f, seen = [], self.head, 0
        while f != NIL and seen <= self.n:
            out.append(f)
            f = int(self.next[f])
            seen += 1
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.kind, self.refs, self.next, self.prev):
            h.update(a.tobytes())
        h.update(f"{self.head},{self.free_count},{self.counts()}".encode())
        return h.hexdigest()

    def nbytes(self) -> int:
        return self.kind.nbytes + self.refs.nbytes + self.next.nbytes + self.prev.nbytes

    # ---- commits (cannot fail; callers checked everything) -------------
    #
    # ``run=True`` tells a commit that ``frames`` is one ascending run (frames[0], frames[0] + 1, ...):
    # it then works on slices of the table, not on gathered copies (the check phase knows, for free,
    # when a call named a single run).

    @staticmethod
    def _index(frames: np.ndarray, run: bool) -> slice | np.ndarray:
        return slice(int(frames[0]), int(frames[0]) + frames.size) if run else frames

    def push_free(self, frames: np.ndarray, run: bool = False) -> None:
        """Link ``frames`` (distinct, not on the list) at the head, in order, as KERNEL_FREE."""
        m = frames.size
        if m == 0:
            return
        ix = self._index(frames, run)
        self.kind[ix] = KERNEL_FREE
        if m > 1:
            if run:
                f = int(frames[0])
                self.next[f:f + m - 1] = frames[1:]
                self.prev[f + 1:f + m] = frames[:-1]
            else:
                self.next[frames[:-1]] = frames[1:]
                self.prev[frames[1:]] = frames[:-1]
        last, first = int(frames[-1]), int(frames[0])
        old = self.head
        self.next[last] = old
        if old != NIL:
            self.prev[old] = last
        self.prev[first] = NIL
        self.head = first
        self.free_count += m
        if self.watch is not None:
            self.watch.frames_written(range(first, first + m) if run else frames)
            if old != NIL:
                self.watch.frames_written(old)

    def push_one(self, f: int) -> None:
        """``push_free`` of the one frame ``f``, with scalars."""
        self._kind1[f] = KERNEL_FREE
        old = self.head
        prev = self._prev1
        self._next1[f] = old
        if old != NIL:
            prev[old] = f
        prev[f] = NIL
        self.head = f
        self.free_count += 1
        if self.watch is not None:
            self.watch.frames_written(f)
            if old != NIL:
                self.watch.frames_written(old)

    def pop_one(self) -> int:
        """``pop_free(1)`` with scalars: the frame at the head (the list is not empty)."""
        f = self.head
        nxt = self._next1
        g = nxt[f]
        nxt[f] = NIL  # (the head's prev is NIL already)
        self.head = g
        if g != NIL:
            self._prev1[g] = NIL
        self.free_count -= 1
        if self.watch is not None:
            self.watch.frames_written(f)
            if g != NIL:
                self.watch.frames_written(g)
        return f

    def take_one(self) -> int:
        """``pop_one`` and ``set_kind`` to KERNEL_USED: a kernel frame put to use (the list is not empty)."""
        f = self.pop_one()
        self._kind1[f] = KERNEL_USED
        self.kernel_used += 1
        if self.watch is not None:
            self.watch.frames_written(f)
        return f

    def give_one(self, f: int) -> None:
        """``set_kind`` KERNEL_USED -> KERNEL_FREE and ``push_one``: a kernel frame back on the list."""
        self.kernel_used -= 1
        self.push_one(f)

    def pop_free(self, count: int, max_runs: int | None = None) -> np.ndarray:
        """Take ``count`` frames from the head (count <= free_count), or fewer: no more than make
        ``max_runs`` runs of ascending frames (None: no limit). They stay KERNEL_FREE until the
        caller sets their kind.

        Walks the list frame by frame, except along stretches where it links ascending
        neighbours (f -> f + 1 -> ..., what a donated run leaves): those are taken a
        stretch at a time with one vectorised comparison."""
        out = np.empty(count, dtype=np.int64)
        f = self.head
        nxt = self.next
        i = 0
        runs, last = 0, -2
        limited = max_runs is not None
        probe = 16  # frames a stretch is probed for; doubles while stretches go on (no quadratic cost)
        while i < count:
            if limited and f != last + 1:
                if runs == max_runs:
                    break
                runs += 1
            g = int(nxt[f])
            if g == f + 1 and count - i > 32:
                want = min(count - i, probe)  # frames f .. f + want - 1, if the list runs straight on
                seg = nxt[f:f + want - 1]
                off = np.flatnonzero(seg != np.arange(f + 1, f + 1 + seg.size, dtype=np.int64))
                k = int(off[0]) + 1 if off.size else seg.size + 1  # frames taken in this stretch
                out[i:i + k] = np.arange(f, f + k, dtype=np.int64)
                i += k
                last = f + k - 1
                f = int(nxt[last])
                probe = probe * 2 if k == want else 16
                continue
            out[i] = f
            i += 1
            last = f
            f = g
        if i < count:
            out = out[:i]
            count = i
        if count:
            self.next[out] = NIL
            self.prev[out] = NIL
            self.head = f
            if f != NIL:
                self.prev[f] = NIL
            self.free_count -= count
            if self.watch is not None:
                self.watch.frames_written(out)
                if f != NIL:
                    self.watch.frames_written(f)
        return out

    def unlink_free(self, frames: np.ndarray, run: bool = False) -> None:
        """Remove the given distinct KERNEL_FREE frames from the list, wherever they are.

        When they lie on the list one after the other (in the given order or the
        reverse: the usual case right after a donation) the chain is spliced out
        directly. Otherwise each removed frame's nearest surviving successor is
        found by pointer jumping (O(log n) numpy passes), then each chain of
        removed frames is cut out with one splice.
        """
        m = frames.size
        if m == 0:
            return
        if self._unlink_chain(frames, run):
            return
        s = np.sort(frames.astype(np.int64))
        nxt = self.next[s].astype(np.int64)
        prv = self.prev[s].astype(np.int64)

        def removed_index(v: np.ndarray) -> np.ndarray:
            """Index into ``s`` of each value, or -1 if it is NIL or survives."""
            pos = np.searchsorted(s, v)
            pos = np.minimum(pos, m - 1)
            hit = (v != NIL) & (s[pos] == v)
            return np.where(hit, pos, -1)

        succ = nxt.copy()
        idx = removed_index(succ)
        while True:
            jumping = idx >= 0
            if not jumping.any():
                break
            succ = np.where(jumping, succ[np.maximum(idx, 0)], succ)
            idx = np.where(jumping, idx[np.maximum(idx, 0)], idx)
        starts = removed_index(prv) < 0  # predecessor survives or is NIL: a chain begins here
        relinked = list(zip(prv[starts].tolist(), succ[starts].tolist()))
        for p, q in relinked:
            self._link(p, q)
        self.next[s] = NIL
        self.prev[s] = NIL
        self.free_count -= m
        if self.watch is not None:
            self.watch.frames_written(s)
            self.watch.frames_written(np.array([f for pq in relinked for f in pq if f != NIL], dtype=np.int64))

    def _unlink_chain(self, frames: np.ndarray, run: bool) -> bool:
        """Splice ``frames`` out if they follow each other on the list (either way round)."""
        m = frames.size
        nxt = self.next
        if m == 1:
            head = tail = int(frames[0])
        elif run:
            f = int(frames[0])
            if int(nxt[f]) == f + 1:
                head, tail = f, f + m - 1
                if not np.array_equal(nxt[f:f + m - 1], frames[1:]):
                    return False
            else:
                head, tail = f + m - 1, f
                if not np.array_equal(nxt[f + 1:f + m], frames[:-1]):
                    return False
        elif np.array_equal(nxt[frames[:-1]], frames[1:]):
            head, tail = int(frames[0]), int(frames[-1])
        elif np.array_equal(nxt[frames[1:]], frames[:-1]):
            head, tail = int(frames[-1]), int(frames[0])
        else:
            return False
        # (the list has no cycle, so a chain of m links names m distinct frames)
        p, q = int(self.prev[head]), int(nxt[tail])
        self._link(p, q)
        ix = self._index(frames, run)
        nxt[ix] = NIL
        self.prev[ix] = NIL
        self.free_count -= m
        if self.watch is not None:
            self.watch.frames_written(range(ix.start, ix.stop) if isinstance(ix, slice) else frames)
            for f in (p, q):
                if f != NIL:
                    self.watch.frames_written(f)
        return True

    def _link(self, p: int, q: int) -> None:
        """Make ``q`` follow ``p`` on the list (either may be NIL: the head, the end)."""
        if p == NIL:
            self.head = q
        else:
            self.next[p] = q
        if q != NIL:
            self.prev[q] = p

    def set_kind(self, frames: np.ndarray, old: int, new: int, run: bool = False) -> None:
        """Move frames of kind ``old`` to ``new`` and keep the counters right."""
        self.kind[self._index(frames, run) if frames.size else frames] = new
        m = int(frames.size)
        if old == USER:
            self.user_free -= m
        elif old == KERNEL_USED:
            self.kernel_used -= m
        if new == USER:
            self.user_free += m
        elif new == KERNEL_USED:
            self.kernel_used += m
        if self.watch is not None and m:
            self.watch.frames_written(range(int(frames[0]), int(frames[0]) + m) if run else frames)

    def set_kind_one(self, f: int, old: int, new: int) -> None:
        """``set_kind`` of the one frame ``f``, with scalars."""
        self._kind1[f] = new
        if old == USER:
            self.user_free -= 1
        elif old == KERNEL_USED:
            self.kernel_used -= 1
        if new == USER:
            self.user_free += 1
        elif new == KERNEL_USED:
            self.kernel_used += 1
        if self.watch is not None:
            self.watch.frames_written(f)

    def add_refs(self, frames: np.ndarray, delta: int, run: bool = False, user: bool = False) -> None:
        """Add ``delta`` (+1/-1) to each frame's refcount (frames may repeat); keeps
        the user free/mapped counters right for USER frames (``user``: the caller knows every
        frame is USER, so their kinds are not looked at).

        One frame: scalar arithmetic. One run (``run``, or frames that turn out to
        be one ascending run): arithmetic on a slice. No USER frame among them (a
        client's maps of kernel-shared frames): ``ufunc.at``, repeats and all.
        Otherwise repeats are counted with ``np.unique``."""
        m = frames.size
        if m == 0:
            return
        if m == 1:
            self.add_ref(int(frames[0]), delta)
            return
        first = int(frames[0])
        if run or (int(frames[-1]) - first == m - 1 and bool((np.diff(frames) == 1).all())):
            self._add_refs_run(first, m, delta, user)
            return
        if not user and not (self.kind[frames] == USER).any():  # no USER frame: no counter moves
            # (with a uint32 operand: a Python int makes ufunc.at take its slow path, ten times slower)
            (np.add if delta > 0 else np.subtract).at(self.refs, frames, np.uint32(abs(delta)))
            if self.watch is not None:
                self.watch.frames_written(frames)
            return
        uniq, times = np.unique(frames, return_counts=True)
        before = self.refs[uniq]
        after = before.astype(np.int64) + delta * times
        self.refs[uniq] = after
        user = self.kind[uniq] == USER
        became_mapped = int(np.count_nonzero(user & (before == 0) & (after > 0)))
        became_free = int(np.count_nonzero(user & (before > 0) & (after == 0)))
        self.user_mapped += became_mapped - became_free
        self.user_free += became_free - became_mapped
        if self.watch is not None:
            self.watch.frames_written(uniq)

    def add_ref(self, f: int, delta: int) -> None:
        """``add_refs`` for the one frame ``f``."""
        refs = self._refs1
        before = refs[f]
        after = before + delta
        refs[f] = after
        if (before == 0) != (after == 0) and self._kind1[f] == USER:
            moved = 1 if after else -1  # free -> mapped, or mapped -> free
            self.user_mapped += moved
            self.user_free -= moved
        if self.watch is not None:
            self.watch.frames_written(f)

    def _add_refs_run(self, first: int, m: int, delta: int, all_user: bool = False) -> None:
        refs = self.refs[first:first + m]  # a view: updated in place
        at = refs == (0 if delta > 0 else -delta)  # frames at 0 become mapped; frames at -delta become free
        if not all_user:
            at &= self.kind[first:first + m] == USER
        moved = int(np.count_nonzero(at))
        if delta > 0:
            refs += delta
        else:
            moved = -moved
            refs -= -delta
        self.user_mapped += moved
        self.user_free -= moved
        if self.watch is not None:
            self.watch.frames_written(range(first, first + m))
