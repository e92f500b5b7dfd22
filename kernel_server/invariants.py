"""Invariant checks I1-I4 and I7 on a ``KernelCore``, recomputed from scratch (and the page
tables' own accounting: entry counts, leaf entries, who made each mapping).

Used by the property-based tests, the simulator and debugging sessions. Each
check derives what must hold from the raw state (frame table arrays,
processes, slabs) rather than trusting the incremental counters, and returns
a list of human-readable violations (empty: all good). Pure: reads only.
Cost is O(frames + mappings), so call it on small machines in loops.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from kernel_server.core import CLIENT_MADE, EMPTY, ENTRY_SHIFT, PROT_MASK, ROOT, KernelCore
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, NIL, NONE, USER
from protocol import PROT_READ


def _mapped_frames(core: KernelCore) -> tuple[np.ndarray, list[str]]:
    """Per-frame mapping counts over all processes, and I3 violations seen on the way."""
    counts = np.zeros(core.frames.n, dtype=np.int64)
    bad: list[str] = []
    kind = core.frames.kind
    for proc in core.procs.values():
        _vps, ents = proc.entries()
        if ents.size:
            frames, prots = ents >> ENTRY_SHIFT, ents & PROT_MASK
            np.add.at(counts, frames, 1)
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
        for base, (level, first, _prot) in proc.large.items():
            n = core.profile.pages_at(level)
            counts[first:first + n] += 1
            if np.any(kind[first:first + n] != USER):
                bad.append(f"I3: pid {proc.pid} large mapping at page {base} covers non-user frames")
    return counts, bad


def _kernel_allocated(core: KernelCore) -> list[int]:
    """Every frame the kernel handed out for its own objects (with repeats, if any)."""
    out: list[int] = []
    for proc in core.procs.values():
        out.extend(t[0] for t in proc.tables.values() if t[0] >= 0)
        out.extend(proc.threads.values())
    for slab in core.slabs.values():
        out.extend(slab.used)
    return out


def check_kernel(core: KernelCore) -> list[str]:
    ft = core.frames
    v: list[str] = []
    kind, refs = ft.kind, ft.refs
    # I1: exactly one owner per RAM frame (the kind says it), holes carry nothing
    valid = np.isin(kind, (NONE, KERNEL_FREE, KERNEL_USED, KERNEL_SHARED, USER))
    if not valid.all():
        v.append(f"I1: frames with no valid owner: {np.flatnonzero(~valid)[:4].tolist()}")
    if np.any(refs[kind == NONE]):
        v.append("I1: a frame that is not RAM has mappings")
    ram = int(np.count_nonzero(kind != NONE))
    if ram != ft.ram:
        v.append(f"I1/I7: {ram} RAM frames in the table, the kernel counts {ft.ram}")
    # I2: the free list is exactly the KERNEL_FREE frames, once each, with consistent links
    walk = ft.free_list()
    if len(walk) != len(set(walk)):
        v.append("I2: the free list has a duplicate (or a cycle)")
    if len(walk) != ft.free_count:
        v.append(f"I2: free list length {len(walk)} != free count {ft.free_count}")
    free_set = set(np.flatnonzero(kind == KERNEL_FREE).tolist())
    if set(walk) != free_set:
        v.append(f"I2: free list and KERNEL_FREE frames differ ({len(set(walk) ^ free_set)} frame(s))")
    prev = NIL
    for f in walk[: ft.free_count + 1]:
        if int(ft.prev[f]) != prev:
            v.append(f"I2: frame {f} has prev {int(ft.prev[f])}, expected {prev}")
            break
        prev = f
    allocated = _kernel_allocated(core)
    dup = [f for f, c in Counter(allocated).items() if c > 1]
    if dup:
        v.append(f"I2: kernel frame(s) allocated twice: {dup[:4]}")
    boot_used = {f for r in core.bootmap.of_kind("frame_table") for f in range(r.first, r.end)}
    used_set = set(np.flatnonzero(kind == KERNEL_USED).tolist())
    expect_used = boot_used | set(allocated)
    if used_set != expect_used:
        v.append(f"I2: KERNEL_USED frames differ from what the kernel allocated "
                 f"(missing {sorted(expect_used - used_set)[:4]}, unaccounted {sorted(used_set - expect_used)[:4]})")
    if set(allocated) & free_set:
        v.append("I2: a kernel frame is both allocated and free")
    # I3 and I4: mappings
    counts, bad = _mapped_frames(core)
    v.extend(bad)
    differ = np.flatnonzero(counts != refs.astype(np.int64))
    if differ.size:
        f = int(differ[0])
        v.append(f"I4: frame {f} has refcount {int(refs[f])} but {int(counts[f])} mapping(s) "
                 f"({differ.size} frame(s) differ)")
    # I7: conservation, recomputed
    user = kind == USER
    recount = {
        "kernel_free": int(np.count_nonzero(kind == KERNEL_FREE)),
        "kernel_used": int(np.count_nonzero(kind == KERNEL_USED)),
        "kernel_shared": int(np.count_nonzero(kind == KERNEL_SHARED)),
        "user_free": int(np.count_nonzero(user & (refs == 0))),
        "user_mapped": int(np.count_nonzero(user & (refs > 0))),
    }
    kept = ft.counts()
    for name, value in recount.items():
        if kept[name] != value:
            v.append(f"I7: counter {name} is {kept[name]}, the table says {value}")
    if sum(recount.values()) != ram:
        v.append(f"I7: kernel free + used + shared + user free + mapped = {sum(recount.values())} != RAM {ram}")
    v.extend(_check_tables(core))
    return v


def _check_tables(core: KernelCore) -> list[str]:
    """Each page table's entry count equals its child tables plus the mappings it holds."""
    p = core.profile
    out: list[str] = []
    if any((spare != EMPTY).any() for spare in core._spare_leaves):
        out.append("tables: a spare leaf entry array (for the next page table) is not empty")
    for proc in core.procs.values():
        want: Counter = Counter()
        for (lv, tag) in proc.tables:
            if (lv, tag) == ROOT:
                continue
            parent = ROOT if lv == 1 else (lv - 1, tag >> (p.entry_shifts[lv - 2] - p.entry_shifts[lv - 1]))
            want[parent] += 1
        leaf = p.levels - 1
        leaf_shift = p.entry_shifts[leaf - 1] - 12
        small = 0
        for tag, entries in proc.leaves.items():
            used = int(np.count_nonzero(entries != EMPTY))
            want[(leaf, tag)] += used
            small += used
            if entries.shape != (1 << leaf_shift,) or (entries[entries != EMPTY] < 0).any():
                out.append(f"tables: pid {proc.pid} leaf table {tag} has a malformed entry array")
        if small != proc.small_pages:
            out.append(f"tables: pid {proc.pid} counts {proc.small_pages} small pages, its leaf tables hold {small}")
        leaf_keys = {(leaf, tag) for tag in proc.leaves}
        if leaf_keys != {key for key in proc.tables if key[0] == leaf}:
            out.append(f"tables: pid {proc.pid} leaf tables and their entry arrays differ")
        for base, (lv, _f, _prot) in proc.large.items():
            want[ROOT if lv == 0 else (lv, base >> (p.entry_shifts[lv - 1] - 12))] += 1
        for key, (frame, used) in proc.tables.items():
            if used != want.get(key, 0):
                out.append(f"tables: pid {proc.pid} table {key} counts {used} entries, holds {want.get(key, 0)}")
            if key != ROOT and used == 0:
                out.append(f"tables: pid {proc.pid} keeps empty table {key}")
        missing = set(want) - set(proc.tables)
        if missing:
            out.append(f"tables: pid {proc.pid} has entries under missing table(s) {sorted(missing)[:4]}")
    return out
