"""The invariant checkers find what they must: each test plants one kind of corruption in a healthy kernel
(built through real calls on every profile) and expects ``check_kernel`` to name it, and the per-frame and
per-process predicates (what an incremental checker calls on what a step touched) to find it with the same
words when given the frames or the process involved.

A checker that is fast but blind is worse than a slow one, so every check it makes (free-list links,
allocated kernel frames, mappings, refcounts, counters, page-table accounting) has a planted corruption
here, including the ones a vectorised checker could miss: a cycle of free frames that the walk from the
head never reaches, a free list whose links are consistent but short, a kernel frame allocated twice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_server import invariants as inv
from kernel_server.frames import (
    KERNEL_FREE,
    KERNEL_SHARED,
    KERNEL_USED,
    NIL,
    NONE,
    USER,
)
from kernel_server.invariants import check_kernel, free_list_sound
from kernel_server.observe import as_frames
from kernel_server.pagetable import CLIENT_MADE, EMPTY, ENTRY_SHIFT, ROOT
from kernel_server.service import KernelService
from protocol.errors import Error

MM = "M" * 40
A = "A" * 40
B = "B" * 40
READ, RW = 1, 3
MiB = 1 << 20
V = 0x1000_0000
VL = 0x4000_0000
ARCHES = ("i686", "i686-pae", "x86_64")


class Healthy:
    """A kernel with two processes, small and large mappings (one shared by both), a client's read-only
    map of a kernel-shared frame, threads, endpoints, and a free list of several frames."""

    def __init__(self, arch: str) -> None:
        self.svc = KernelService.boot(arch=arch, memory=32 * MiB, mm_key=MM, kernel_pool_frames=24)
        self.core = self.svc.core
        self.ft = self.core.frames
        self.a = self.ok(MM, "proc_create", key=A, kernel_quota=8)["pid"]
        self.b = self.ok(MM, "proc_create", key=B, kernel_quota=8)["pid"]
        user = np.flatnonzero((self.ft.kind == USER) & (self.ft.refs == 0))
        self.small = user[:6].tolist()
        self.ok(MM, "map", pid=self.a, vaddr=V, frames=[[f, 1] for f in self.small], prot=RW)
        self.ok(MM, "map", pid=self.b, vaddr=V, frames=[[self.small[0], 2]] if self.small[1] == self.small[0] + 1
                else [[self.small[0], 1]], prot=READ)
        self.shared = int(np.flatnonzero(self.ft.kind == KERNEL_SHARED)[0])
        self.ok(A, "map", vaddr=V + 0x40_0000, frames=[[self.shared, 1]], prot=READ)
        step = self.core.profile.pages_at(max(self.core.profile.large_levels))
        free = (self.ft.kind == USER) & (self.ft.refs == 0)
        n = (self.ft.n // step) * step
        blocks = np.flatnonzero(free[:n].reshape(-1, step).all(axis=1))
        self.large = int(blocks[-1]) * step
        self.ok(MM, "map", pid=self.b, vaddr=VL, frames=[[self.large, step]], prot=RW, large=True)
        self.tid = self.ok(A, "thread_create")["tid"]
        self.ok(B, "thread_create")
        self.ok(A, "endpoint_create")
        donate = np.flatnonzero((self.ft.kind == USER) & (self.ft.refs == 0))[:8].tolist()
        self.ok(MM, "donate", frames=[[f, 1] for f in donate])
        assert self.ft.free_count >= 6
        assert check_kernel(self.core) == []

    def ok(self, who: str, call: str, **args) -> dict:
        out = self.svc.call(who, call, args)
        assert not isinstance(out, Error), f"{call} {args}: {out}"
        return out

    def found(self, *needles: str) -> list[str]:
        """The checker's violations; each needle must appear in one of them."""
        v = check_kernel(self.core)
        assert v, "the corruption went unnoticed"
        for needle in needles:
            assert any(needle in x for x in v), (needle, v)
        return v

    def free_list(self) -> list[int]:
        return self.ft.free_list()

    def leaf_entry(self, pid: int) -> tuple[np.ndarray, int]:
        """A leaf entry array of ``pid`` and the index of its first mapping."""
        proc = self.core.procs[pid]
        for e in proc.leaves.values():
            idx = np.flatnonzero(e != EMPTY)
            if idx.size:
                return e, int(idx[0])
        raise AssertionError("no small mapping")


@pytest.fixture(params=ARCHES)
def k(request) -> Healthy:
    return Healthy(request.param)


# ---- I1 and I7 ------------------------------------------------------------------------------

def test_a_frame_with_no_valid_owner(k):
    k.ft.kind[k.small[3]] = 9
    k.found("I1: frames with no valid owner: [" + str(k.small[3]))


def test_a_hole_with_mappings(k):
    hole = int(np.flatnonzero(k.ft.kind == NONE)[0])
    k.ft.refs[hole] = 1
    k.found("I1: a frame that is not RAM has mappings")


def test_ram_count(k):
    ram = k.ft.ram
    k.ft.ram += 1
    k.found(f"I1/I7: {ram} RAM frames in the table, the kernel counts {ram + 1}")


def test_a_counter_off_by_one(k):
    k.ft.user_mapped -= 1
    k.found("I7: counter user_mapped is")


# ---- I2: the free list ---------------------------------------------------------------------

def test_a_cycle_off_the_list_is_found(k):
    """h -> ... -> x -> NIL, and y <-> z linked to each other only: every link is locally consistent
    (prev matches next, one head, one tail) but the walk from the head never reaches y and z."""
    walk = k.free_list()
    x, y, z = walk[-3], walk[-2], walk[-1]
    k.ft.next[x] = NIL
    k.ft.next[y], k.ft.prev[y] = z, z
    k.ft.next[z], k.ft.prev[z] = y, y
    k.found("I2: free list length", "I2: free list and KERNEL_FREE frames differ (2 frame(s))")


def test_a_cycle_through_the_head_is_found(k):
    walk = k.free_list()
    k.ft.next[walk[-1]] = walk[0]
    k.ft.prev[walk[0]] = walk[-1]
    k.found("I2: the free list has a duplicate (or a cycle)")


def test_a_cycle_back_into_the_middle_is_found(k):
    walk = k.free_list()
    k.ft.next[walk[-1]] = walk[2]
    k.found("I2: the free list has a duplicate (or a cycle)")


def test_a_broken_prev_link(k):
    walk = k.free_list()
    k.ft.prev[walk[3]] = walk[1]
    k.found(f"I2: frame {walk[3]} has prev {walk[1]}, expected {walk[2]}")


def test_a_head_with_a_prev_link(k):
    walk = k.free_list()
    k.ft.prev[walk[0]] = walk[2]
    k.found(f"I2: frame {walk[0]} has prev {walk[2]}, expected {NIL}")


def test_a_free_count_that_lies(k):
    k.ft.free_count += 1
    k.found("I2: free list length", "I7: counter kernel_free")


def test_a_free_kernel_frame_missing_from_the_list(k):
    f = int(np.flatnonzero((k.ft.kind == USER) & (k.ft.refs == 0))[-1])
    k.ft.kind[f] = KERNEL_FREE
    k.ft.user_free -= 1
    k.ft.free_count += 1
    k.found("I2: free list and KERNEL_FREE frames differ (1 frame(s))")


def test_a_listed_frame_that_is_not_free(k):
    k.ft.kind[k.ft.head] = USER
    k.found("I2: free list and KERNEL_FREE frames differ")


def test_the_list_skips_a_frame(k):
    walk = k.free_list()
    k.ft.next[walk[1]] = walk[3]
    k.ft.prev[walk[3]] = walk[1]
    k.found("I2: free list length", "I2: free list and KERNEL_FREE frames differ (1 frame(s))")


def test_a_link_beyond_the_table(k):
    walk = k.free_list()
    k.ft.next[walk[2]] = k.ft.n + 7
    assert any(v.startswith("I2") for v in k.found("I2"))


def test_an_empty_list_with_a_head(k):
    k.ok(MM, "proc_destroy", pid=k.a)  # (their quotas' reserved frames stay in the pool while they live)
    k.ok(MM, "proc_destroy", pid=k.b)
    k.ok(MM, "reclaim", count=10_000)
    assert k.ft.free_count == 0 and check_kernel(k.core) == []
    k.ft.head = int(np.flatnonzero(k.ft.kind == USER)[0])
    k.found("I2")


# ---- I2: allocated kernel frames ---------------------------------------------------------------

def test_a_kernel_frame_allocated_twice(k):
    proc = k.core.procs[k.a]
    other = next(t[0] for t in proc.tables.values() if t[0] >= 0)
    k.ft.kind[proc.threads[k.tid]] = KERNEL_FREE  # (what a double allocation leaves behind, roughly)
    proc.threads[k.tid] = other
    k.found(f"I2: kernel frame(s) allocated twice: [{other}]")


def test_a_kernel_used_frame_nobody_allocated(k):
    f = int(np.flatnonzero((k.ft.kind == USER) & (k.ft.refs == 0))[-1])
    k.ft.kind[f] = KERNEL_USED
    k.ft.user_free -= 1
    k.ft.kernel_used += 1
    k.found(f"unaccounted [{f}]")


def test_an_allocated_frame_that_is_not_kernel_used(k):
    f = k.core.procs[k.a].threads[k.tid]
    k.ft.kind[f] = USER
    k.ft.kernel_used -= 1
    k.ft.user_free += 1
    k.found(f"I2: KERNEL_USED frames differ from what the kernel allocated (missing [{f}]")


def test_an_allocated_frame_on_the_free_list(k):
    f = k.free_list()[1]
    k.core.procs[k.a].threads[k.tid + 100] = f
    k.found("I2: a kernel frame is both allocated and free")


def test_a_slab_frame_that_is_free(k):
    slab = k.core.procs[k.a].slab
    f = next(iter(slab.used))
    k.ft.set_kind(np.array([f]), KERNEL_USED, KERNEL_FREE)
    k.ft.push_free(np.array([f]))
    k.found("I2: a kernel frame is both allocated and free", f"missing [{f}]")


# ---- I3, I4, I9: mappings ------------------------------------------------------------------------

def test_a_kernel_frame_mapped_in_user_space(k):
    e, i = k.leaf_entry(k.a)
    old = int(e[i]) >> ENTRY_SHIFT
    kf = k.free_list()[0]
    e[i] = (kf << ENTRY_SHIFT) | RW
    k.ft.refs[old] -= 1
    k.ft.refs[kf] += 1
    k.found(f"I3: pid {k.a} maps kernel frame(s) [{kf}]")


def test_a_kernel_shared_frame_mapped_writable(k):
    proc = k.core.procs[k.a]
    for e in proc.leaves.values():
        hit = np.flatnonzero((e != EMPTY) & ((e >> ENTRY_SHIFT) == k.shared))
        if hit.size:
            e[hit[0]] = (k.shared << ENTRY_SHIFT) | CLIENT_MADE | RW
    k.found(f"I3: pid {k.a} maps kernel-shared frame(s) [{k.shared}] with more than read access",
            f"I9: pid {k.a} made mapping(s) of frame(s) [{k.shared}] itself")


def test_a_client_made_mapping_of_a_user_frame(k):
    e, i = k.leaf_entry(k.a)
    e[i] |= CLIENT_MADE
    k.found(f"I9: pid {k.a} made mapping(s) of frame(s) [{int(e[i]) >> ENTRY_SHIFT}] itself")


def test_a_large_mapping_over_kernel_frames(k):
    proc = k.core.procs[k.b]
    base, (_lv, first, _prot) = next(iter(proc.large.items()))
    k.ft.kind[first + 1] = KERNEL_SHARED
    k.found(f"I3: pid {k.b} large mapping at page {base} covers non-user frames")


def test_a_refcount_too_high(k):
    f = k.small[2]
    k.ft.refs[f] += 1
    k.found(f"I4: frame {f} has refcount 2 but 1 mapping(s) (1 frame(s) differ)")


def test_a_refcount_too_low_under_a_large_page(k):
    f = k.large + 3
    k.ft.refs[f] -= 1
    k.found(f"I4: frame {f} has refcount 0 but 1 mapping(s)")


def test_a_refcount_on_a_frame_nobody_maps(k):
    f = int(np.flatnonzero((k.ft.kind == USER) & (k.ft.refs == 0))[-1])
    k.ft.refs[f] = 3
    k.found(f"I4: frame {f} has refcount 3 but 0 mapping(s)")


# ---- page-table accounting -----------------------------------------------------------------

def test_a_table_entry_count_that_lies(k):
    proc = k.core.procs[k.a]
    key = next(key for key in proc.tables if key[0] == k.core.leaf)
    proc.tables[key][1] += 1
    k.found(f"tables: pid {k.a} table {key} counts")


def test_an_empty_table_kept(k):
    proc = k.core.procs[k.a]
    key = (k.core.leaf, 12345)
    frame = k.free_list()[0]
    k.ft.unlink_free(np.array([frame]))
    k.ft.set_kind(np.array([frame]), KERNEL_FREE, KERNEL_USED)
    proc.tables[key] = [frame, 0]
    proc.leaves[12345] = np.full(k.core.leaf_entries, EMPTY, dtype=np.int32)
    k.found(f"tables: pid {k.a} keeps empty table {key}")


def test_a_leaf_without_its_table(k):
    proc = k.core.procs[k.a]
    proc.leaves[999] = np.full(k.core.leaf_entries, EMPTY, dtype=np.int32)
    k.found(f"tables: pid {k.a} leaf tables and their entry arrays differ")


def test_entries_under_a_missing_table(k):
    proc = k.core.procs[k.a]
    e = np.full(k.core.leaf_entries, EMPTY, dtype=np.int32)
    e[5] = (k.small[4] << ENTRY_SHIFT) | RW
    proc.leaves[777] = e
    k.ft.refs[k.small[4]] += 1
    proc.small_pages += 1
    k.found(f"tables: pid {k.a} has entries under missing table(s) [({k.core.leaf}, 777)")


def test_a_malformed_leaf(k):
    e, i = k.leaf_entry(k.a)
    e[i + 1] = -7
    k.found(f"tables: pid {k.a} leaf table", "malformed entry array")


def test_a_leaf_of_the_wrong_size(k):
    proc = k.core.procs[k.a]
    tag = next(iter(proc.leaves))
    proc.leaves[tag] = np.concatenate([proc.leaves[tag], np.full(3, EMPTY, dtype=np.int32)])
    k.found(f"tables: pid {k.a} leaf table {tag} has a malformed entry array")


def test_small_pages_that_lie(k):
    k.core.procs[k.b].small_pages += 2
    k.found(f"tables: pid {k.b} counts")


def test_a_dirty_spare_leaf(k):
    spare = np.full(k.core.leaf_entries, EMPTY, dtype=np.int32)
    spare[3] = 5 << ENTRY_SHIFT
    k.core.spare_leaves.append(spare)
    k.found("tables: a spare leaf entry array (for the next page table) is not empty")


def test_a_large_mapping_not_counted_in_its_table(k):
    proc = k.core.procs[k.b]
    base, (lv, _f, _p) = next(iter(proc.large.items()))
    p = k.core.profile
    key = ROOT if lv == 0 else (lv, base >> (p.entry_shifts[lv - 1] - 12))
    proc.tables[key][1] -= 1
    k.found(f"tables: pid {k.b} table {key} counts")


def test_healthy_after_teardown(k):
    k.ok(MM, "proc_destroy", pid=k.a)
    k.ok(MM, "proc_destroy", pid=k.b)
    assert check_kernel(k.core) == []


# ---- free_list_sound: the vectorised decision equals the walk ------------------------------------

class Links:
    """Just what ``free_list_sound`` reads of a frame table."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kind = np.full(n, USER, dtype=np.uint8)
        self.next = np.full(n, NIL, dtype=np.int32)
        self.prev = np.full(n, NIL, dtype=np.int32)
        self.head = NIL
        self.free_count = 0


def walk_says_sound(ft: Links) -> bool:
    """The definition: the walk from the head visits exactly the free frames, once each, ending at NIL,
    each frame's prev naming the one before it."""
    free = set(np.flatnonzero(ft.kind == KERNEL_FREE).tolist())
    walk, f = [], ft.head
    while f != NIL:
        if not 0 <= f < ft.n or f in walk:
            return False
        walk.append(f)
        f = int(ft.next[f])
    if set(walk) != free or len(walk) != len(free):
        return False
    return all(int(ft.prev[g]) == (walk[i - 1] if i else NIL) for i, g in enumerate(walk))


@given(order=st.permutations(range(10)), m=st.integers(0, 10),
       edits=st.lists(st.tuples(st.sampled_from(["next", "prev", "head", "kind"]), st.integers(0, 9),
                                st.integers(-2, 11)), max_size=3))
@settings(max_examples=400)
def test_free_list_sound_is_the_walk(order, m, edits):
    ft = Links(10)
    listed = list(order[:m])
    for i, f in enumerate(listed):
        ft.kind[f] = KERNEL_FREE
        ft.next[f] = listed[i + 1] if i + 1 < m else NIL
        ft.prev[f] = listed[i - 1] if i else NIL
    ft.head = listed[0] if listed else NIL
    for what, f, value in edits:
        if what == "head":
            ft.head = value
        elif what == "kind":
            ft.kind[f] = KERNEL_FREE if value % 2 else USER
        else:
            getattr(ft, what)[f] = value
    free = int(np.count_nonzero(ft.kind == KERNEL_FREE))
    assert free_list_sound(ft, ft.kind == KERNEL_FREE, free) == walk_says_sound(ft)


# ---- free_list_sound_near: the decision near the frames written equals the walk ------------------------

@given(order=st.permutations(range(10)), m=st.integers(0, 10),
       edits=st.lists(st.tuples(st.sampled_from(["next", "prev", "head", "kind", "count"]), st.integers(0, 9),
                                st.integers(-2, 11)), max_size=3),
       budget=st.sampled_from([1, 3, 64]))
@settings(max_examples=600)
def test_free_list_sound_near_is_the_walk(order, m, edits, budget):
    """Given a sound list and the frames a change wrote (the head may move without a write), a decision
    (True or False) is the walk's; None only when a walk of ``budget`` links did not settle it."""
    ft = Links(10)
    listed = list(order[:m])
    for i, f in enumerate(listed):
        ft.kind[f] = KERNEL_FREE
        ft.next[f] = listed[i + 1] if i + 1 < m else NIL
        ft.prev[f] = listed[i - 1] if i else NIL
    ft.head = listed[0] if listed else NIL
    ft.free_count = m
    old_next, old_prev, old_head = ft.next.copy(), ft.prev.copy(), ft.head
    written: set[int] = set()
    for what, f, value in edits:
        if what == "head":
            ft.head = value
        elif what == "count":
            ft.free_count = value
        elif what == "kind":
            ft.kind[f] = KERNEL_FREE if value % 2 else USER
            written.add(f)
        else:
            getattr(ft, what)[f] = value
            written.add(f)
    free = int(np.count_nonzero(ft.kind == KERNEL_FREE))
    got = inv.free_list_sound_near(ft, sorted(written), old_next, old_prev, old_head, free, budget)
    if got is not None:
        assert got == (walk_says_sound(ft) and ft.free_count == free)


def test_free_list_sound_near_settles_what_the_kernel_does(k):
    """Pushes and pops at the head, and unlinking frames anywhere, as the frame table does them (it reports
    the frames it writes, their relinked neighbours included): each is decided sound, without walking far."""
    ft = k.ft
    written: list = []

    class Watch:
        def frames_written(self, frames):
            written.extend(as_frames(frames).tolist())

    ft.watch = Watch()
    rng = np.random.default_rng(7)
    for step in range(60):
        old_next, old_prev, old_head = ft.next.copy(), ft.prev.copy(), ft.head
        written.clear()
        user = np.flatnonzero((ft.kind == USER) & (ft.refs == 0))
        what = step % 3
        if what == 0 and user.size:  # a donation (set_kind, then pushed at the head)
            a = np.sort(rng.choice(user[user < ft.kernel_limit], size=min(3, user.size), replace=False))
            ft.set_kind(a, USER, KERNEL_FREE)
            ft.push_free(a)
        elif what == 1 and ft.free_count > 2:  # frames taken from the head
            a = ft.pop_free(2)
            ft.set_kind(a, KERNEL_FREE, USER)
        elif ft.free_count > 3:  # frames reclaimed from the middle of the list
            f = ft.free_list()[ft.free_count // 2]
            ft.unlink_free(np.array([f], dtype=np.int64))
            ft.set_kind(np.array([f], dtype=np.int64), KERNEL_FREE, USER)
        free = int(np.count_nonzero(ft.kind == KERNEL_FREE))
        got = inv.free_list_sound_near(ft, sorted(set(written)), old_next, old_prev, old_head, free, budget=64)
        assert got is True, (step, what)
    walk = ft.free_list()
    old_next, old_prev = ft.next.copy(), ft.prev.copy()
    x, y, z = walk[-3], walk[-2], walk[-1]  # y <-> z cut off in a cycle, every link consistent
    ft.next[x] = NIL
    ft.next[y], ft.prev[y] = z, z
    ft.next[z], ft.prev[z] = y, y
    for budget in (1, 64):
        assert inv.free_list_sound_near(ft, [x, y, z], old_next, old_prev, ft.head, free, budget) is not True
    assert inv.free_list_sound_near(ft, [x, y, z], old_next, old_prev, ft.head, free, 64) is False


# ---- the fast decisions of the per-frame and per-process rules agree with the reports -----------------

def test_frames_sound_agrees_with_frame_problems(k):
    core = k.core
    mapped, held = inv.mapping_counts(core), inv.held_counts(core)[0]
    every = list(range(k.ft.n))

    def agree() -> bool:
        fast = inv.frames_sound(core, every, mapped.tolist(), held.tolist())
        a = np.arange(k.ft.n)
        assert fast == (inv.frame_problems(core, a, mapped, held) == [])
        return fast

    assert agree()
    for corrupt in (lambda: k.ft.refs.__setitem__(k.small[2], 9), lambda: k.ft.kind.__setitem__(k.small[2], 9),
                    lambda: k.ft.next.__setitem__(k.small[3], 5), lambda: held.__setitem__(k.small[4], 2),
                    lambda: k.ft.kind.__setitem__(k.small[4], KERNEL_USED)):
        corrupt()
        assert not agree()


def test_the_per_frame_mapping_rules_agree_with_the_per_process_ones(k):
    """A frame whose mappings break I3 or I9 (a kernel frame mapped, a kernel-shared one writable, a client's
    map of a user frame, a large page over a kernel-shared frame) is found from its counts alone."""
    core = k.core

    def frame_says(f: int) -> bool:
        w = c = lg = m = 0
        for proc in core.procs.values():
            vps, ents = proc.entries()
            mine = ents[(ents >> ENTRY_SHIFT) == f]
            m += mine.size
            w += int(np.count_nonzero((mine & 7) != READ))
            c += int(np.count_nonzero(mine & CLIENT_MADE))
            for lv, first, _p in proc.large.values():
                if first <= f < first + core.geo.pages_at[lv]:
                    m += 1
                    lg += 1
        return inv.frame_mappings_sound(int(k.ft.kind[f]), m, w, c, lg)

    every = [f for f in range(k.ft.n) if inv.mapping_counts(core)[f]]
    assert all(frame_says(f) for f in every)
    k.ft.kind[k.small[3]] = KERNEL_FREE
    assert not frame_says(k.small[3])
    k.ft.kind[k.small[3]] = USER
    e, i = k.leaf_entry(k.a)
    e[i] |= CLIENT_MADE
    assert not frame_says(int(e[i]) >> ENTRY_SHIFT)
    e[i] &= ~CLIENT_MADE
    first = next(iter(core.procs[k.b].large.values()))[1]
    k.ft.kind[first + 1] = KERNEL_SHARED
    assert not frame_says(first + 1)
    k.ft.kind[first + 1] = USER
    k.ft.kind[k.small[0]] = KERNEL_SHARED  # mapped writable by pid a
    assert not frame_says(k.small[0])
    one = [np.array([x], dtype=np.int64) for x in range(3)]
    assert not inv.frames_mappings_sound(np.array([KERNEL_USED], dtype=np.uint8), one[1], one[0], one[0], one[0])
    assert inv.frames_mappings_sound(np.array([USER], dtype=np.uint8), one[2], one[1], one[0], one[1])
    assert not inv.frames_mappings_sound(np.array([USER], dtype=np.uint8), one[1], one[0], one[1], one[0])


# ---- the subset predicates find the same corruptions, with the same words -------------------------------

def subset(k: Healthy, frames=(), pids=()) -> list[str]:
    """What an incremental checker reports when a step touched ``frames`` and processes ``pids``: the
    per-frame rules on those frames (with their mapping and holding counts), the per-process rules on
    those processes, and the whole-kernel rules that cost O(1) or O(processes)."""
    core = k.core
    out: list[str] = []
    if len(frames):
        f = np.unique(np.asarray(frames, dtype=np.int64))
        out += inv.frame_problems(core, f, inv.mapping_counts(core)[f], inv.held_counts(core)[0][f])
    for pid in pids:
        out += inv.process_problems(core, core.procs[pid])
    out += inv.pool_problems(core) + inv.counter_problems(core, inv.recount(core.frames))
    out += inv.free_list_problems(core) + inv.spare_problems(core)
    return out


def same_words(k: Healthy, frames=(), pids=()) -> list[str]:
    """The subset check finds something, and everything it finds the full checker says too."""
    got = subset(k, frames, pids)
    full = check_kernel(k.core)
    assert got, f"the subset check missed it; the full one says {full}"
    assert set(got) <= set(full), (got, full)
    return got


def test_a_healthy_kernel_has_no_subset_problems(k):
    every = np.arange(k.ft.n)
    assert subset(k, every, list(k.core.procs)) == [] == check_kernel(k.core)


def test_subset_finds_a_refcount_bumped(k):
    k.ft.refs[k.small[2]] += 1
    assert any(p.startswith(f"I4: frame {k.small[2]}") for p in same_words(k, [k.small[2]]))
    assert subset(k, [k.small[3]]) == []  # a frame the step did not touch is not looked at


def test_subset_finds_a_leaf_entry_rewritten_to_a_kernel_frame(k):
    e, i = k.leaf_entry(k.a)
    old = int(e[i]) >> ENTRY_SHIFT
    kf = int(np.flatnonzero(k.ft.kind == KERNEL_USED)[-1])
    e[i] = (kf << ENTRY_SHIFT) | RW  # maps a kernel frame; the user frame's refcount is now too high
    got = same_words(k, [old, kf], [k.a])
    assert any(p.startswith("I3") for p in got) and any(p.startswith("I4") for p in got)


def test_subset_finds_a_client_made_user_mapping(k):
    e, i = k.leaf_entry(k.a)
    e[i] |= CLIENT_MADE
    assert any(p.startswith("I9") for p in same_words(k, pids=[k.a]))


def test_subset_finds_a_mapped_frame_donated(k):
    f = np.array([k.small[3]], dtype=np.int64)
    k.ft.set_kind(f, USER, KERNEL_FREE)  # what a donate that skips the refcount check would do
    k.ft.push_free(f)
    got = same_words(k, f, [k.a])
    assert any(p.startswith("I3") for p in got)


def test_subset_finds_a_frame_allocated_twice(k):
    proc = k.core.procs[k.a]
    table = next(f for f, _used in proc.tables.values() if f >= 0)
    proc.threads[999] = table
    got = same_words(k, [table], [k.a])
    assert any("allocated twice" in p for p in got) and any(p.startswith("I13") for p in got)


def test_subset_finds_a_kernel_used_frame_nobody_holds(k):
    u = int(np.flatnonzero((k.ft.kind == USER) & (k.ft.refs == 0))[-1])
    k.ft.set_kind(np.array([u], dtype=np.int64), USER, KERNEL_USED)
    assert any(f"unaccounted [{u}]" in p for p in same_words(k, [u]))


def test_subset_finds_links_kept_by_a_taken_frame(k):
    got = k.ft.pop_free(1)
    k.ft.set_kind(got, KERNEL_FREE, KERNEL_USED)
    k.core.procs[k.a].threads[999] = int(got[0])
    k.core.procs[k.a].kernel_used += 1
    k.core.reserved -= 1
    k.ft.next[int(got[0])] = k.ft.head
    assert any("keep free-list links" in p for p in same_words(k, got, [k.a]))


def test_subset_finds_a_table_count_that_lies(k):
    proc = k.core.procs[k.a]
    proc.tables[next(key for key in proc.tables if key[0] == k.core.leaf)][1] += 1
    assert any(p.startswith("tables") for p in same_words(k, pids=[k.a]))


def test_subset_finds_a_large_mapping_over_kernel_frames(k):
    proc = k.core.procs[k.b]
    base, (_lv, first, _prot) = next(iter(proc.large.items()))
    k.ft.kind[first + 1] = KERNEL_SHARED
    got = same_words(k, [first + 1], [k.b])
    assert any("covers non-user frames" in p for p in got)


def test_subset_finds_a_charge_that_lies_and_a_reservation_that_lies(k):
    k.core.procs[k.a].kernel_used -= 1
    assert any(p.startswith(f"I13: pid {k.a} is charged") for p in same_words(k, pids=[k.a]))
    k.core.procs[k.a].kernel_used += 1
    k.core.reserved += 1
    assert any(p.startswith("I13: the kernel counts") for p in same_words(k))


def test_subset_finds_counters_that_lie(k):
    k.ft.user_mapped += 1
    k.ft.user_free -= 1
    assert any(p.startswith("I7") for p in same_words(k))


# ---- the digest: the exact "nothing changed" of a refused call (I6) ---------------------------------

MUTATIONS = {
    "kind": lambda k: k.ft.kind.__setitem__(k.small[1], KERNEL_SHARED),
    "refs": lambda k: k.ft.refs.__setitem__(k.small[1], 7),
    "next": lambda k: k.ft.next.__setitem__(k.free_list()[1], NIL),
    "prev": lambda k: k.ft.prev.__setitem__(k.free_list()[1], NIL),
    "head": lambda k: setattr(k.ft, "head", k.free_list()[1]),
    "counter": lambda k: setattr(k.ft, "user_free", k.ft.user_free + 1),
    "table count": lambda k: k.core.procs[k.a].tables.__getitem__(ROOT).__setitem__(1, 99),
    "leaf entry": lambda k: k.leaf_entry(k.a)[0].__setitem__(k.leaf_entry(k.a)[1], EMPTY),
    "small pages": lambda k: setattr(k.core.procs[k.a], "small_pages", 0),
    "large": lambda k: k.core.procs[k.b].large.clear(),
    "thread": lambda k: k.core.procs[k.a].threads.clear(),
    "endpoint": lambda k: k.core.procs[k.a].endpoints.clear(),
    "slab": lambda k: k.core.procs[k.a].slab.free_slots.clear(),
    "charge": lambda k: setattr(k.core.procs[k.a], "kernel_used", 0),
    "quota": lambda k: setattr(k.core.procs[k.a], "kernel_limit", 99),
    "reserved": lambda k: setattr(k.core, "reserved", 0),
    "next id": lambda k: k.core.next_id.__setitem__("tid", 77),
    "event seq": lambda k: setattr(k.core, "event_seq", 5),
    "spares": lambda k: k.core.spare_leaves.append(np.full(k.core.leaf_entries, EMPTY, dtype=np.int32)),
    "large index": lambda k: k.core.large_index.clear(),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_the_digest_sees_every_change(k, what):
    digest = k.core.digest()
    assert k.core.digest() == digest
    MUTATIONS[what](k)
    assert k.core.digest() != digest
