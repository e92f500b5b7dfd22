"""Invariant checks I1-I4, I7 and the kernel's half of I13 (charges) on a ``KernelCore``, recomputed from scratch (and the page
tables' own accounting: entry counts, leaf entries, who made each mapping).

Used by the property-based tests, the simulator and debugging sessions. Each
check derives what must hold from the raw state (frame table arrays,
processes, slabs) rather than trusting the incremental counters, and returns
a list of human-readable violations (empty: all good). Pure: reads only.

Cost is O(frames + mappings) in a fixed number of numpy passes, plus Python
work per process and page table (not per frame or per mapping):

- the free list is checked without walking it (``free_list_sound``): every
  free kernel frame's links must stay among free kernel frames and agree both
  ways (``prev`` of ``next`` is the frame itself), there must be one head (the
  kernel's) and one tail, and pointer jumping over the free frames' ``next``
  links (log2 of the free count passes) proves that every free frame reaches
  the tail, so no cycle hides off the list. Frames that are not free must keep
  no links (counted: a sound list of m frames holds 2 (m - 1) links).
- mapping counts come from all processes' leaf entry arrays at once (one
  concatenation, one ``bincount``), large mappings as a difference array.
- kernel frames handed out (page tables, threads, slab frames) are marked in
  one array and compared with the KERNEL_USED frames.

When a fast check fails, the report is built by the slower, plainer
derivation (the walk of the free list, per-process mapping scans), so each
violation names the frames and processes involved.
"""

from __future__ import annotations

import numpy as np

from kernel_server.core import (
    CLIENT_MADE,
    EMPTY,
    ENTRY_SHIFT,
    PROT_MASK,
    ROOT,
    KernelCore,
)
from kernel_server.frames import (
    KERNEL_FREE,
    KERNEL_SHARED,
    KERNEL_USED,
    NIL,
    NONE,
    USER,
    FrameTable,
)
from protocol import PROT_READ


def check_kernel(core: KernelCore) -> list[str]:
    ft = core.frames
    v: list[str] = []
    kind, refs = ft.kind, ft.refs
    n = ft.n
    # I1: exactly one owner per RAM frame (the kind says it), holes carry nothing
    if n and int(kind.max()) > USER:
        v.append(f"I1: frames with no valid owner: {np.flatnonzero(kind > USER)[:4].tolist()}")
    hole = kind == NONE
    if refs[hole].any():
        v.append("I1: a frame that is not RAM has mappings")
    ram = n - int(np.count_nonzero(hole))
    if ram != ft.ram:
        v.append(f"I1/I7: {ram} RAM frames in the table, the kernel counts {ft.ram}")
    # I2: the free list is exactly the KERNEL_FREE frames, once each, with consistent links
    free_mask = kind == KERNEL_FREE
    free = int(np.count_nonzero(free_mask))
    sound = free_list_sound(ft, free_mask, free)
    if free != ft.free_count or not sound:
        v.extend(_free_list_report(ft, free_mask))
    # frames that are not free keep no links: on a sound list the free frames hold 2 (free - 1) of them
    links = int(np.count_nonzero(ft.next != NIL)) + int(np.count_nonzero(ft.prev != NIL))
    if not sound or links != 2 * max(free - 1, 0):
        stale = np.flatnonzero(((ft.next != NIL) | (ft.prev != NIL)) & ~free_mask)
        if stale.size:
            v.append(f"I2: frame(s) {stale[:4].tolist()} are not free kernel frames but keep free-list links")
    v.extend(_check_allocated(core, kind, free_mask))
    v.extend(charge_problems(core))
    # I3 and I4: mappings
    counts, bad = _mapped_frames(core)
    v.extend(bad)
    differ = np.flatnonzero(counts != refs)
    if differ.size:
        f = int(differ[0])
        v.append(f"I4: frame {f} has refcount {int(refs[f])} but {int(counts[f])} mapping(s) "
                 f"({differ.size} frame(s) differ)")
    # I7: conservation, recomputed
    mapped = int(np.count_nonzero(refs[kind == USER]))
    user = int(np.count_nonzero(kind == USER))
    recount = {
        "kernel_free": free,
        "kernel_used": int(np.count_nonzero(kind == KERNEL_USED)),
        "kernel_shared": int(np.count_nonzero(kind == KERNEL_SHARED)),
        "user_free": user - mapped,
        "user_mapped": mapped,
    }
    kept = ft.counts()
    for name, value in recount.items():
        if kept[name] != value:
            v.append(f"I7: counter {name} is {kept[name]}, the table says {value}")
    if sum(recount.values()) != ram:
        v.append(f"I7: kernel free + used + shared + user free + mapped = {sum(recount.values())} != RAM {ram}")
    v.extend(_check_tables(core))
    return v


# ---- I2: the free list ------------------------------------------------------------------------

def free_list_sound(ft: FrameTable, free_mask: np.ndarray, free: int) -> bool:
    """Does the walk from ``ft.head`` visit exactly the ``free`` frames of ``free_mask``, once each,
    with every ``prev`` link naming the frame before it (NIL for the head)? Decided without walking.

    Every free frame's ``next`` must be a free frame or NIL, exactly one (the tail) NIL; the ``prev``
    of each successor must name the frame it follows (so no two frames share a successor), and the
    head must be the only free frame whose ``prev`` is NIL. Then the links form one path from the
    head plus, possibly, cycles that nothing on the path links into; pointer jumping (``j = j[j]``,
    log2 of the count times) proves that every free frame reaches the end of the list."""
    head = ft.head
    if free == 0:
        return head == NIL
    if not 0 <= head < ft.n or not free_mask[head] or ft.prev[head] != NIL:
        return False
    frames = np.flatnonzero(free_mask)
    nxt = ft.next[frames]
    succ = np.searchsorted(frames, nxt)  # each frame's successor as an index into ``frames``
    np.minimum(succ, free - 1, out=succ)
    linked = frames[succ] == nxt  # links to a free frame (NIL and anything else do not)
    if int(np.count_nonzero(linked)) != free - 1:
        return False
    tail = int(linked.argmin())
    if nxt[tail] != NIL:
        return False
    prv = ft.prev[frames]
    back = prv[succ] == frames
    back[tail] = True
    if not back.all() or int(np.count_nonzero(prv == NIL)) != 1:
        return False
    jump = np.append(succ, free)  # index ``free``: past the end of the list
    jump[tail] = free
    for _ in range(free.bit_length()):  # after k passes, jump[i] is 2^k links on from i (or the end)
        jump = jump[jump]
    return bool((jump == free).all())


def _free_list_report(ft: FrameTable, free_mask: np.ndarray) -> list[str]:
    """What is wrong with the free list, found by walking it from the head (only when a check failed)."""
    out: list[str] = []
    walk: list[int] = []
    f, seen = ft.head, 0
    while f != NIL and seen <= ft.n:
        if not 0 <= f < ft.n:
            out.append(f"I2: the free list links to {f}, which is not a frame (the table has {ft.n})")
            break
        walk.append(f)
        f = int(ft.next[f])
        seen += 1
    walked = set(walk)
    if len(walk) != len(walked):
        out.append("I2: the free list has a duplicate (or a cycle)")
    if len(walk) != ft.free_count:
        out.append(f"I2: free list length {len(walk)} != free count {ft.free_count}")
    free_set = set(np.flatnonzero(free_mask).tolist())
    if walked != free_set:
        out.append(f"I2: free list and KERNEL_FREE frames differ ({len(walked ^ free_set)} frame(s))")
    prev = NIL
    for f in walk[: ft.free_count + 1]:
        if int(ft.prev[f]) != prev:
            out.append(f"I2: frame {f} has prev {int(ft.prev[f])}, expected {prev}")
            break
        prev = f
    if not out:
        out.append("I2: the free list's links are inconsistent")
    return out


# ---- I2: frames the kernel allocated for itself ------------------------------------------------

def kernel_allocated(core: KernelCore) -> list[int]:
    """Every frame the kernel handed out for its own objects (with repeats, if any)."""
    out: list[int] = []
    for proc in core.procs.values():
        out.extend(proc.kernel_frames())
    return out


def charge_problems(core: KernelCore) -> list[str]:
    """I13 in the kernel: each process's charge is the kernel frames its objects hold, within its quota;
    the reservation is the sum of the unused quotas, and the pool holds it."""
    out: list[str] = []
    reserved = 0
    for proc in core.procs.values():
        held = len(proc.kernel_frames())
        if proc.kernel_used != held:
            out.append(f"I13: pid {proc.pid} is charged {proc.kernel_used} kernel frame(s), its objects hold {held}")
        if proc.kernel_used > proc.kernel_limit:
            out.append(f"I13: pid {proc.pid} holds {proc.kernel_used} kernel frame(s), beyond its quota of "
                       f"{proc.kernel_limit}")
        reserved += proc.kernel_limit - proc.kernel_used
    if reserved != core.reserved:
        out.append(f"I13: the kernel counts {core.reserved} reserved frame(s), the unused quotas add up to {reserved}")
    if core.frames.free_count < core.reserved:
        out.append(f"I13: {core.frames.free_count} free kernel frame(s) cannot back the {core.reserved} reserved "
                   "for processes' quotas")
    return out


def _check_allocated(core: KernelCore, kind: np.ndarray, free_mask: np.ndarray) -> list[str]:
    """Each allocated kernel frame is allocated once, is KERNEL_USED, and every KERNEL_USED frame is
    allocated (or holds the frame table since boot)."""
    out: list[str] = []
    n = kind.size
    allocated = np.array(kernel_allocated(core), dtype=np.int64)
    beyond = allocated[(allocated < 0) | (allocated >= n)]
    if beyond.size:
        out.append(f"I2: kernel objects hold frame(s) {beyond[:4].tolist()} beyond the frame table")
        allocated = allocated[(allocated >= 0) & (allocated < n)]
    uniq, times = np.unique(allocated, return_counts=True)
    if uniq.size != allocated.size:
        out.append(f"I2: kernel frame(s) allocated twice: {uniq[times > 1][:4].tolist()}")
    expect = np.zeros(n, dtype=bool)
    for r in core.bootmap.of_kind("frame_table"):
        expect[r.first:r.end] = True
    expect[uniq] = True
    used = kind == KERNEL_USED
    if not np.array_equal(used, expect):
        missing = np.flatnonzero(expect & ~used)[:4].tolist()
        unaccounted = np.flatnonzero(used & ~expect)[:4].tolist()
        out.append(f"I2: KERNEL_USED frames differ from what the kernel allocated "
                   f"(missing {missing}, unaccounted {unaccounted})")
    if free_mask[uniq].any():
        out.append("I2: a kernel frame is both allocated and free")
    return out


# ---- I3, I4, I9: mappings ----------------------------------------------------------------------

def _mapped_frames(core: KernelCore) -> tuple[np.ndarray, list[str]]:
    """Per-frame mapping counts over all processes, and the I3/I9 violations seen on the way."""
    n = core.frames.n
    kind = core.frames.kind
    procs = list(core.procs.values())
    arrays = [e for p in procs for e in p.leaves.values()]
    bad: list[str] = []
    if arrays:
        flat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        where = np.flatnonzero(flat != EMPTY)
        ents = flat[where].astype(np.int64)
        frames = ents >> ENTRY_SHIFT
        outside = (ents < 0) | (frames >= n)
        if outside.any():  # named per process below; counted nowhere
            frames = frames[~outside]
            ents = ents[~outside]
        counts = np.bincount(frames, minlength=n)
        k = kind[frames]
        prots = ents & PROT_MASK
        kernel = (k == KERNEL_FREE) | (k == KERNEL_USED)
        shared_rw = (k == KERNEL_SHARED) & (prots != PROT_READ)
        by_client = (ents & CLIENT_MADE) != 0
        wrong = by_client & ((k != KERNEL_SHARED) | (prots != PROT_READ))
        if outside.any() or kernel.any() or shared_rw.any() or wrong.any():
            for proc in procs:
                bad.extend(_small_mapping_problems(proc, kind))
    else:
        counts = np.zeros(n, dtype=np.int64)
    large = [(proc.pid, base, first, core.profile.pages_at(level))
             for proc in procs for base, (level, first, _prot) in proc.large.items()]
    if large:
        diff = np.zeros(n + 1, dtype=np.int64)
        for pid, base, first, pages in large:
            end = first + pages
            if first < 0 or end > n:
                bad.append(f"I3: pid {pid} large mapping at page {base} covers frames beyond the frame table")
                continue
            diff[first] += 1
            diff[end] -= 1
            if np.any(kind[first:end] != USER):
                bad.append(f"I3: pid {pid} large mapping at page {base} covers non-user frames")
        counts += np.cumsum(diff[:-1])
    return counts, bad


def _small_mapping_problems(proc, kind: np.ndarray) -> list[str]:
    """The I3/I9 violations of one process's 4 KiB mappings, frames listed in virtual address order."""
    bad: list[str] = []
    _vps, ents = proc.entries()
    if not ents.size:
        return bad
    frames, prots = ents >> ENTRY_SHIFT, ents & PROT_MASK
    outside = (ents < 0) | (frames >= kind.size)
    if outside.any():
        bad.append(f"I3: pid {proc.pid} maps frame(s) {frames[outside][:4].tolist()} beyond the frame table")
        frames, prots, ents = frames[~outside], prots[~outside], ents[~outside]
    k = kind[frames]
    own = (k == KERNEL_FREE) | (k == KERNEL_USED)
    if own.any():
        bad.append(f"I3: pid {proc.pid} maps kernel frame(s) {frames[own][:4].tolist()}")
    shared_rw = (k == KERNEL_SHARED) & (prots != PROT_READ)
    if shared_rw.any():
        bad.append(f"I3: pid {proc.pid} maps kernel-shared frame(s) {frames[shared_rw][:4].tolist()} "
                   "with more than read access")
    by_client = (ents & CLIENT_MADE) != 0
    wrong = by_client & ((k != KERNEL_SHARED) | (prots != PROT_READ))
    if wrong.any():
        bad.append(f"I9: pid {proc.pid} made mapping(s) of frame(s) {frames[wrong][:4].tolist()} itself "
                   "that only the memory manager may make")
    return bad


# ---- page-table accounting ---------------------------------------------------------------------

def _check_tables(core: KernelCore) -> list[str]:
    """Each page table's entry count equals its child tables plus the mappings it holds."""
    out: list[str] = []
    if any((spare != EMPTY).any() for spare in core._spare_leaves):
        out.append("tables: a spare leaf entry array (for the next page table) is not empty")
    procs = list(core.procs.values())
    # entries in use per leaf array, for all processes at once
    arrays = [e for proc in procs for e in proc.leaves.values()]
    if arrays:
        sizes = np.fromiter((e.size for e in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        if (sizes == 0).any():  # (reduceat gives a zero-sized slice the next element)
            in_use = [int(np.count_nonzero(e != EMPTY)) for e in arrays]
        else:
            in_use = np.add.reduceat(flat != EMPTY, np.cumsum(sizes) - sizes, dtype=np.int64).tolist()
        malformed = bool((sizes != core.leaf_entries).any() or (flat < EMPTY).any())
    else:
        in_use, malformed = [], False
    i = 0
    for proc in procs:
        k = len(proc.leaves)
        out.extend(proc_table_problems(core, proc, in_use[i:i + k], malformed))
        i += k
    return out


def proc_table_problems(core: KernelCore, proc, in_use: list[int] | None = None, malformed: bool = True) -> list[str]:
    """The page-table accounting of one process: each table's entry count is its child tables plus the
    mappings it holds, no table but the root is kept empty, every leaf table has its entry array (and
    no array is without its table), ``small_pages`` is the number of leaf entries in use.
    ``in_use``: the entries in use of each leaf array, in ``proc.leaves`` order (counted if None);
    ``malformed``: whether any leaf array may be malformed (checked one by one if so)."""
    p = core.profile
    leaf = core.leaf
    size = core.leaf_entries
    out: list[str] = []
    tables = proc.tables
    want: dict = {}
    leaf_tables = 0
    for key in tables:
        lv = key[0]
        if lv == 0:
            continue
        if lv == leaf:
            leaf_tables += 1
        parent = ROOT if lv == 1 else (lv - 1, key[1] >> (p.entry_shifts[lv - 2] - p.entry_shifts[lv - 1]))
        want[parent] = want.get(parent, 0) + 1
    small = 0
    paired = leaf_tables == len(proc.leaves)
    for j, (tag, entries) in enumerate(proc.leaves.items()):
        used = int(np.count_nonzero(entries != EMPTY)) if in_use is None else in_use[j]
        key = (leaf, tag)
        want[key] = want.get(key, 0) + used
        small += used
        if key not in tables:
            paired = False
        if malformed and (entries.shape != (size,) or (entries[entries != EMPTY] < 0).any()):
            out.append(f"tables: pid {proc.pid} leaf table {tag} has a malformed entry array")
    if small != proc.small_pages:
        out.append(f"tables: pid {proc.pid} counts {proc.small_pages} small pages, its leaf tables hold {small}")
    if not paired:
        out.append(f"tables: pid {proc.pid} leaf tables and their entry arrays differ")
    for base, (lv, _f, _prot) in proc.large.items():
        key = ROOT if lv == 0 else (lv, base >> (p.entry_shifts[lv - 1] - 12))
        want[key] = want.get(key, 0) + 1
    for key, (_frame, used) in tables.items():
        held = want.pop(key, 0)
        if used != held:
            out.append(f"tables: pid {proc.pid} table {key} counts {used} entries, holds {held}")
        if used == 0 and key != ROOT:
            out.append(f"tables: pid {proc.pid} keeps empty table {key}")
    if want:
        out.append(f"tables: pid {proc.pid} has entries under missing table(s) {sorted(want)[:4]}")
    return out


__all__ = ["charge_problems", "check_kernel", "free_list_sound", "kernel_allocated", "proc_table_problems"]
