"""The kernel's invariants as predicates on a ``KernelCore``: I1-I4, I7, I9 of the mappings, the page
tables' own accounting and the kernel's half of I13 (charges). One source per rule: the full
checker (``check_kernel``) and any incremental checker (the simulator's) call the same functions,
so a violation reads the same either way. Pure: reads only. Each returns a list of violations,
human-readable strings starting with the invariant's name (empty: all good).

The API, for checking all of it or a subset:

- ``check_kernel(core)``: everything, recomputed from the raw state (frame arrays, processes,
  slabs), trusting no incremental counter.
- ``frame_problems(core, frames, mapped, held)``: the per-frame rules for the distinct frames
  ``frames`` (an int64 array; None: every frame, with full-length ``mapped``/``held``):
  a valid owner, no mappings of a hole (I1); allocated at most once, allocated exactly when
  KERNEL_USED (or holding the frame table since boot), never allocated and free, no free-list
  links unless free (I2); refcount = mappings (I4). The caller supplies, aligned with
  ``frames``, ``mapped`` (the mappings of each frame across all address spaces, a large mapping
  counting for each frame it covers) and ``held`` (the kernel objects holding each frame: page
  tables, threads, slab and object frames): ``mapping_counts`` and ``held_counts`` compute them
  for all frames; a tracker keeps its own.
- ``process_problems(core, proc)``: one process: its mappings (no kernel or non-RAM frame, no
  kernel-shared frame but read-only (I3), client-made mappings only of kernel-shared frames,
  read-only (I9)), its large mappings (whole user frames), its page-table accounting
  (``proc_table_problems``) and its charge (I13: charged = what its objects hold <= its quota).
- ``pool_problems(core)``: I13 across processes: the reservation is the sum of the unused quotas
  and the free pool holds it. O(processes).
- ``free_list_problems(core)``: I2 of the list as a whole, without walking it (``free_list_sound``).
- ``counter_problems(core, recount)``: I7: the kernel's counters against counts recomputed by the
  caller, and conservation. ``spare_problems(core)``, ``large_index_problems(core)``: the spare
  leaf arrays are empty; the index of large pages matches the processes'.

Fast decisions, for an incremental checker (the simulator's): each says whether a rule holds,
with no report, for the few frames or the one process a step changed; on False (or None:
undecided) the checker asks the predicates above for the report, so the words stay theirs.

- ``frames_sound(core, frames, mapped, held)``: ``frame_problems`` of a few frames, frame by
  frame in plain Python (no array is built).
- ``frame_mappings_sound(kind, mapped, writable, client, large)`` (one frame) and
  ``frames_mappings_sound`` (arrays): the mapping rules of ``process_problems`` (I3, I9, large
  pages over user frames only) in their per-frame form, from counts of the frame's mappings: all
  of them, the 4 KiB ones with more than read access, the 4 KiB ones a client made, the large
  ones. A checker that keeps these counts decides I3/I9 for every process mapping a frame when
  the frame or its mappings change.
- ``tables_sound(core, proc, leaf_used)``: ``proc_table_problems`` of one process given the entries
  in use of each leaf table (kept by the caller, so no leaf is scanned).
- ``free_list_sound_near(ft, frames, old_next, old_prev, old_head, free)``: ``free_list_sound``
  after a change that wrote only ``frames`` to a list that was sound: their links, their old and
  new neighbours', and a short walk from each towards an end of the list (None when the walk is
  too long to settle it).

Cost of ``check_kernel``: O(frames + mappings) in a fixed number of numpy passes, plus Python
work per process and page table (not per frame or per mapping). When a fast check fails, the
report is built by a slower, plainer derivation (the walk of the free list), so each violation
names the frames and processes involved.
"""

from __future__ import annotations

import numpy as np

from kernel_server.core import KernelCore
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, NIL, NONE, USER, FrameTable
from kernel_server.pagetable import CLIENT_MADE, EMPTY, ENTRY_SHIFT, PROT_MASK, ROOT
from kernel_server.process import Process
from protocol import PROT_READ

__all__ = ["charge_problems", "check_kernel", "counter_problems", "frame_mappings_sound", "frame_problems",
           "frames_mappings_sound", "frames_sound", "free_list_problems", "free_list_sound", "free_list_sound_near",
           "held_counts", "kernel_allocated", "large_index_problems", "mapping_counts", "pool_problems",
           "proc_charge_problems", "proc_table_problems", "process_problems", "processes_sound", "recount",
           "spare_problems", "tables_sound"]


def check_kernel(core: KernelCore, counts: dict[str, np.ndarray] | None = None) -> list[str]:
    """Every rule (see the module docstring). ``counts``, if given, gets the per-frame counts the check
    computed on the way (``mapped``: ``mapping_counts``, ``held``: ``held_counts``), for a caller that keeps
    its own copies (an incremental checker starting afresh)."""
    ft = core.frames
    mapped = mapping_counts(core)
    held, beyond = held_counts(core)
    if counts is not None:
        counts["mapped"], counts["held"] = mapped, held
    procs = list(core.procs.values())
    if (not beyond and _frames_all_sound(core, mapped, held) and processes_sound(core, procs)
            and not pool_problems(core) and not spare_problems(core) and not large_index_problems(core)):
        return []  # (decided in fewer passes; the derivation below names what is wrong)
    v: list[str] = []
    kind = ft.kind
    ram = ft.n - int(np.count_nonzero(kind == NONE))
    if ram != ft.ram:
        v.append(f"I1/I7: {ram} RAM frames in the table, the kernel counts {ft.ram}")
    v.extend(free_list_problems(core))
    v.extend(beyond)
    v.extend(frame_problems(core, None, mapped, held))
    if not processes_sound(core, procs):
        for proc in procs:
            v.extend(process_problems(core, proc))
    v.extend(pool_problems(core))
    v.extend(counter_problems(core, recount(ft)))
    v.extend(spare_problems(core))
    v.extend(large_index_problems(core))
    return v


def _frames_all_sound(core: KernelCore, mapped: np.ndarray, held: np.ndarray) -> bool:
    """Whether the RAM count, the free list, ``frame_problems`` of every frame and ``counter_problems`` of a
    recount all find nothing: the same rules in fewer numpy passes (one count per kind; the links of frames
    that are not free counted, given a sound list, instead of masked)."""
    ft = core.frames
    kind, refs = ft.kind, ft.refs
    per_kind = np.bincount(kind, minlength=USER + 1)
    if per_kind.size > USER + 1 or ft.n - int(per_kind[NONE]) != ft.ram:
        return False
    free, used, shared, user = (int(x) for x in per_kind[KERNEL_FREE:])
    user_mapped = int(np.count_nonzero(refs[kind == USER]))
    if ((free, used, shared, user - user_mapped, user_mapped)
            != (ft.free_count, ft.kernel_used, ft.kernel_shared, ft.user_free, ft.user_mapped)):
        return False
    if not np.array_equal(mapped, refs) or (per_kind[NONE] and refs[kind == NONE].any()):
        return False
    if held.size and int(held.max()) > 1:
        return False
    expect = held > 0
    for r in core.bootmap.of_kind("frame_table"):
        expect[max(r.first, 0):max(r.end, 0)] = True
    if not np.array_equal(kind == KERNEL_USED, expect):
        return False
    if not free_list_sound(ft, kind == KERNEL_FREE, free):
        return False
    # on a sound list the free frames hold free - 1 next links and free - 1 prev links: any more is a
    # frame that is not free keeping links
    links = max(free - 1, 0)
    return int(np.count_nonzero(ft.next != NIL)) == links and int(np.count_nonzero(ft.prev != NIL)) == links


# ---- per frame --------------------------------------------------------------------------------------

def frame_problems(core: KernelCore, frames: np.ndarray | None, mapped: np.ndarray, held: np.ndarray) -> list[str]:
    """I1, I2 (allocation, stale links) and I4 for ``frames`` (see the module docstring)."""
    ft = core.frames
    out: list[str] = []
    if frames is None:
        at = slice(None)
        names = None
    else:
        at = frames
        names = frames
    kind, refs = ft.kind[at], ft.refs[at]

    def name(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask) if names is None else names[mask]

    if kind.size and int(kind.max()) > USER:
        out.append(f"I1: frames with no valid owner: {name(kind > USER)[:4].tolist()}")
    hole = kind == NONE
    if refs[hole].any():
        out.append("I1: a frame that is not RAM has mappings")
    # I2: frames the kernel allocated for its objects
    if held.size and int(held.max()) > 1:
        out.append(f"I2: kernel frame(s) allocated twice: {name(held > 1)[:4].tolist()}")
    used = kind == KERNEL_USED
    expect = held > 0
    boot = core.bootmap.of_kind("frame_table")
    if boot:
        f = np.arange(ft.n) if names is None else names
        for r in boot:
            expect = expect | ((f >= r.first) & (f < r.end))
    if not np.array_equal(used, expect):
        missing = name(expect & ~used)[:4].tolist()
        unaccounted = name(used & ~expect)[:4].tolist()
        out.append(f"I2: KERNEL_USED frames differ from what the kernel allocated "
                   f"(missing {missing}, unaccounted {unaccounted})")
    free = kind == KERNEL_FREE
    if (free & (held > 0)).any():
        out.append("I2: a kernel frame is both allocated and free")
    links = (ft.next[at] != NIL) | (ft.prev[at] != NIL)
    stale = links & ~free
    if stale.any():
        out.append(f"I2: frame(s) {name(stale)[:4].tolist()} are not free kernel frames but keep free-list links")
    # I4: refcounts
    differ = np.flatnonzero(mapped != refs)
    if differ.size:
        i = int(differ[0])
        f = i if names is None else int(names[i])
        out.append(f"I4: frame {f} has refcount {int(refs[i])} but {int(mapped[i])} mapping(s) "
                   f"({differ.size} frame(s) differ)")
    return out


def mapping_counts(core: KernelCore) -> np.ndarray:
    """The mappings of every frame across all processes (int64, one per frame), counted from the leaf
    entries (one ``bincount``) and the large mappings (a difference array). Mappings of frames beyond
    the frame table count nowhere (``process_problems`` names them)."""
    n = core.frames.n
    arrays = [e for p in core.procs.values() for e in p.leaves.values()]
    if arrays:
        flat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        ents = flat[flat != EMPTY].astype(np.int64)
        frames = ents >> ENTRY_SHIFT
        frames = frames[(ents >= 0) & (frames < n)]
        counts = np.bincount(frames, minlength=n)[:n]
    else:
        counts = np.zeros(n, dtype=np.int64)
    pages_at = core.geo.pages_at
    large = [(first, first + pages_at[lv]) for p in core.procs.values() for lv, first, _ in p.large.values()]
    if large:
        diff = np.zeros(n + 1, dtype=np.int64)
        for first, end in large:
            if 0 <= first and end <= n:
                diff[first] += 1
                diff[end] -= 1
        counts = counts + np.cumsum(diff[:-1])
    return counts


def kernel_allocated(core: KernelCore) -> list[int]:
    """Every frame the kernel handed out for its own objects (with repeats, if any)."""
    out: list[int] = []
    for proc in core.procs.values():
        out.extend(proc.kernel_frames())
    return out


def held_counts(core: KernelCore) -> tuple[np.ndarray, list[str]]:
    """How many kernel objects hold each frame (int64, one per frame); and the objects holding frames
    beyond the frame table."""
    n = core.frames.n
    allocated = np.array(kernel_allocated(core), dtype=np.int64)
    out: list[str] = []
    beyond = (allocated < 0) | (allocated >= n)
    if beyond.any():
        out.append(f"I2: kernel objects hold frame(s) {allocated[beyond][:4].tolist()} beyond the frame table")
        allocated = allocated[~beyond]
    return np.bincount(allocated, minlength=n)[:n], out


# ---- per process ----------------------------------------------------------------------------------

def process_problems(core: KernelCore, proc: Process) -> list[str]:
    """Everything about one process (see the module docstring)."""
    if processes_sound(core, [proc]):
        return []  # (decided in a few numpy passes; the report below names what is wrong)
    out = _small_mapping_problems(proc, core.frames.kind)
    out.extend(_large_mapping_problems(core, proc))
    out.extend(proc_table_problems(core, proc))
    out.extend(proc_charge_problems(proc))
    return out


def _small_mapping_problems(proc: Process, kind: np.ndarray) -> list[str]:
    """I3/I9 of one process's 4 KiB mappings, frames listed in virtual address order."""
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


def _large_mapping_problems(core: KernelCore, proc: Process) -> list[str]:
    bad: list[str] = []
    n = core.frames.n
    kind = core.frames.kind
    pages_at = core.geo.pages_at
    for base, (level, first, _prot) in proc.large.items():
        end = first + pages_at[level]
        if first < 0 or end > n:
            bad.append(f"I3: pid {proc.pid} large mapping at page {base} covers frames beyond the frame table")
        elif np.any(kind[first:end] != USER):
            bad.append(f"I3: pid {proc.pid} large mapping at page {base} covers non-user frames")
    return bad


def proc_table_problems(core: KernelCore, proc: Process) -> list[str]:
    """The page-table accounting of one process: each table's entry count is its child tables plus the
    mappings it holds, no table but the root is kept empty, every leaf table has its entry array (and
    no array is without its table), ``small_pages`` is the number of leaf entries in use."""
    geo = core.geo
    leaf = geo.leaf
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
        parent = geo.parent(key)
        want[parent] = want.get(parent, 0) + 1
    small = 0
    paired = leaf_tables == len(proc.leaves)
    for tag, entries in proc.leaves.items():
        used = int(np.count_nonzero(entries != EMPTY))
        key = (leaf, tag)
        want[key] = want.get(key, 0) + used
        small += used
        if key not in tables:
            paired = False
        if entries.shape != (geo.leaf_entries,) or (entries[entries != EMPTY] < 0).any():
            out.append(f"tables: pid {proc.pid} leaf table {tag} has a malformed entry array")
    if small != proc.small_pages:
        out.append(f"tables: pid {proc.pid} counts {proc.small_pages} small pages, its leaf tables hold {small}")
    if not paired:
        out.append(f"tables: pid {proc.pid} leaf tables and their entry arrays differ")
    for base, (lv, _f, _prot) in proc.large.items():
        key = geo.table_of(lv, base)
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


def proc_charge_problems(proc: Process) -> list[str]:
    """I13 of one process: charged exactly what its objects hold, within its quota."""
    out: list[str] = []
    held = len(proc.kernel_frames())
    if proc.kernel_used != held:
        out.append(f"I13: pid {proc.pid} is charged {proc.kernel_used} kernel frame(s), its objects hold {held}")
    if proc.kernel_used > proc.kernel_limit:
        out.append(f"I13: pid {proc.pid} holds {proc.kernel_used} kernel frame(s), beyond its quota of "
                   f"{proc.kernel_limit}")
    return out


# ---- the whole kernel -------------------------------------------------------------------------------

def pool_problems(core: KernelCore) -> list[str]:
    """I13 across processes: the reservation is the sum of the unused quotas, and the pool holds it."""
    out: list[str] = []
    reserved = sum(p.kernel_limit - p.kernel_used for p in core.procs.values())
    if reserved != core.reserved:
        out.append(f"I13: the kernel counts {core.reserved} reserved frame(s), the unused quotas add up to {reserved}")
    if core.frames.free_count < core.reserved:
        out.append(f"I13: {core.frames.free_count} free kernel frame(s) cannot back the {core.reserved} reserved "
                   "for processes' kernel quotas")
    return out


def charge_problems(core: KernelCore) -> list[str]:
    """I13 in the kernel: each process's charge is the kernel frames its objects hold, within its quota;
    the reservation is the sum of the unused quotas, and the pool holds it."""
    out: list[str] = []
    for proc in core.procs.values():
        out.extend(proc_charge_problems(proc))
    return out + pool_problems(core)


def recount(ft: FrameTable) -> dict[str, int]:
    """The frame table's counters recomputed from its arrays."""
    kind, refs = ft.kind, ft.refs
    user = kind == USER
    mapped = int(np.count_nonzero(refs[user]))
    return {
        "kernel_free": int(np.count_nonzero(kind == KERNEL_FREE)),
        "kernel_used": int(np.count_nonzero(kind == KERNEL_USED)),
        "kernel_shared": int(np.count_nonzero(kind == KERNEL_SHARED)),
        "user_free": int(np.count_nonzero(user)) - mapped,
        "user_mapped": mapped,
    }


def counter_problems(core: KernelCore, counts: dict[str, int]) -> list[str]:
    """I7: the kernel's counters equal ``counts`` (recomputed by the caller), and they add up to RAM."""
    ft = core.frames
    get = counts.get
    if (len(counts) == 5 and get("kernel_free") == ft.free_count and get("kernel_used") == ft.kernel_used
            and get("kernel_shared") == ft.kernel_shared and get("user_free") == ft.user_free
            and get("user_mapped") == ft.user_mapped
            and ft.free_count + ft.kernel_used + ft.kernel_shared + ft.user_free + ft.user_mapped == ft.ram):
        return []  # (the usual case, decided without building the report)
    out: list[str] = []
    kept = ft.counts()
    for name, value in counts.items():
        if kept[name] != value:
            out.append(f"I7: counter {name} is {kept[name]}, the table says {value}")
    if sum(counts.values()) != kept["ram"]:
        out.append(f"I7: kernel free + used + shared + user free + mapped = {sum(counts.values())} != RAM "
                   f"{kept['ram']}")
    return out


def free_list_problems(core: KernelCore) -> list[str]:
    """I2: the free list is exactly the KERNEL_FREE frames, once each, with consistent links, and its
    length is the free count."""
    ft = core.frames
    free_mask = ft.kind == KERNEL_FREE
    free = int(np.count_nonzero(free_mask))
    if free == ft.free_count and free_list_sound(ft, free_mask, free):
        return []
    return _free_list_report(ft, free_mask)


def spare_problems(core: KernelCore) -> list[str]:
    spares = core.spare_leaves
    if not spares:
        return []
    empty = _empty_leaf(core.geo.leaf_entries)
    if all(s.dtype == np.int32 and s.tobytes() == empty for s in spares):
        return []  # (the usual case: a byte comparison per spare)
    if any((spare != EMPTY).any() for spare in spares):
        return ["tables: a spare leaf entry array (for the next page table) is not empty"]
    return []


def large_index_problems(core: KernelCore) -> list[str]:
    """The kernel's index of large pages (for stats) counts exactly the processes' large mappings."""
    if not core.large_index and not core.large_keys and not any(p.large for p in core.procs.values()):
        return []
    want: dict[tuple[int, int], int] = {}
    pages_at = core.geo.pages_at
    for proc in core.procs.values():
        for lv, first, _prot in proc.large.values():
            key = (first, pages_at[lv])
            want[key] = want.get(key, 0) + 1
    if want != core.large_index or sorted(want) != core.large_keys:
        return ["stats: the index of large pages differs from the processes' large mappings"]
    return []


# ---- fast decisions for incremental checkers (see the module docstring) ------------------------------

_EMPTY_LEAVES: dict[int, bytes] = {}


def _empty_leaf(entries: int) -> bytes:
    """The bytes of an all-EMPTY int32 leaf entry array of ``entries`` slots."""
    b = _EMPTY_LEAVES.get(entries)
    if b is None:
        b = _EMPTY_LEAVES[entries] = np.full(entries, EMPTY, dtype=np.int32).tobytes()
    return b


def _bad_mapping_table() -> np.ndarray:
    """[kind, entry bits (CLIENT_MADE | prot)] -> does such a 4 KiB mapping break I3 or I9
    (``_small_mapping_problems``'s rules, frames within the table)."""
    bad = np.zeros((256, 16), dtype=bool)
    for k in range(256):
        for bits in range(16):
            prot, client = bits & PROT_MASK, bits & CLIENT_MADE
            bad[k, bits] = (k in (KERNEL_FREE, KERNEL_USED) or (k == KERNEL_SHARED and prot != PROT_READ)
                            or (client != 0 and (k != KERNEL_SHARED or prot != PROT_READ)))
    return bad


_BAD_MAPPING = _bad_mapping_table()


def processes_sound(core: KernelCore, procs: list[Process]) -> bool:
    """Whether ``process_problems`` finds nothing for any of ``procs``: their 4 KiB mappings decided
    together in a few numpy passes (one concatenation of their leaf tables), the rest per process in
    Python (``tables_sound``, large mappings, charges)."""
    leaves = [e for p in procs for e in p.leaves.values()]
    ft = core.frames
    kind = ft.kind
    entries = core.geo.leaf_entries
    counts: list[int] = []
    if leaves:
        shape = (entries,)
        for e in leaves:
            if e.shape != shape or e.dtype != np.int32:
                return False
        allv = leaves[0] if len(leaves) == 1 else np.concatenate(leaves)
        in_use = allv != EMPTY
        counts = np.count_nonzero(in_use.reshape(len(leaves), entries), axis=1).tolist()
        ents = allv[in_use]
        if ents.size:
            if int(ents.min()) < 0:
                return False  # a malformed entry
            frames = ents >> ENTRY_SHIFT
            if int(frames.max()) >= kind.size:
                return False
            if _BAD_MAPPING[kind[frames], ents & (CLIENT_MADE | PROT_MASK)].any():
                return False
    n = ft.n
    pages_at = core.geo.pages_at
    i = 0
    for p in procs:
        used: dict[int, int] = {}
        for tag in p.leaves:
            used[tag] = counts[i]
            i += 1
        if not tables_sound(core, p, used):
            return False
        if p.kernel_used > p.kernel_limit or p.kernel_used != len(p.kernel_frames()):
            return False
        for lv, first, _prot in p.large.values():
            end = first + pages_at[lv]
            if first < 0 or end > n or not bool((kind[first:end] == USER).all()):
                return False
    return True


def frames_sound(core: KernelCore, frames: list[int], mapped: list[int], held: list[int]) -> bool:
    """Whether ``frame_problems(core, frames, mapped, held)`` finds nothing (the same rules), decided frame
    by frame in plain Python: for a few frames (``frames``: distinct frames of the table, ``mapped`` and
    ``held`` aligned with them, as lists of ints)."""
    ft = core.frames
    kind, refs, nxt, prv = ft.kind, ft.refs, ft.next, ft.prev
    boot = [(r.first, r.end) for r in core.bootmap.of_kind("frame_table")]
    for f, m, h in zip(frames, mapped, held):
        k = kind.item(f)
        r = refs.item(f)
        if k > USER or m != r or h > 1 or (k == NONE and r):
            return False
        expect = h > 0
        if not expect:
            for a, b in boot:
                if a <= f < b:
                    expect = True
                    break
        if (k == KERNEL_USED) != expect:
            return False  # (this also rules out an allocated frame that is free)
        if k != KERNEL_FREE and (nxt.item(f) != NIL or prv.item(f) != NIL):
            return False
    return True


def frame_mappings_sound(kind: int, mapped: int, writable: int, client: int, large: int) -> bool:
    """The mapping rules of ``process_problems`` for every mapping of one frame of kind ``kind``, from
    counts of its mappings: all of them (``mapped``), the 4 KiB ones with more than read access
    (``writable``), the 4 KiB ones a client made itself (``client``), the large ones (``large``). No
    kernel frame is mapped, a kernel-shared one only read-only (I3); a client maps only kernel-shared
    frames (I9, read-only by the rule before); a large page covers user frames only."""
    if not mapped:
        return True
    if kind == KERNEL_FREE or kind == KERNEL_USED or (large and kind != USER):
        return False
    if kind == KERNEL_SHARED:
        return not writable
    return not client


def frames_mappings_sound(kind: np.ndarray, mapped: np.ndarray, writable: np.ndarray, client: np.ndarray,
                          large: np.ndarray) -> bool:
    """``frame_mappings_sound`` of many frames at once (aligned arrays)."""
    own = (kind == KERNEL_FREE) | (kind == KERNEL_USED)
    shared = kind == KERNEL_SHARED
    bad = ((mapped > 0) & own) | ((large > 0) & (kind != USER)) | (shared & (writable > 0)) | (~shared & (client > 0))
    return not bad.any()


def tables_sound(core: KernelCore, proc: Process, leaf_used: dict[int, int]) -> bool:
    """Whether ``proc_table_problems(core, proc)`` finds nothing, given the entries in use of each of its
    leaf tables (``leaf_used``: tag -> count, kept by the caller) and that no leaf holds a malformed entry
    (the caller checked every entry that changed). Python work per table, no leaf scanned."""
    geo = core.geo
    leaf = geo.leaf
    shape = (geo.leaf_entries,)
    tables = proc.tables
    parent = geo.parent
    want: dict = {}
    leaf_tables = 0
    for key in tables:
        lv = key[0]
        if lv == 0:
            continue
        if lv == leaf:
            leaf_tables += 1
        pk = parent(key)
        want[pk] = want.get(pk, 0) + 1
    leaves = proc.leaves
    if leaf_tables != len(leaves):
        return False
    small = 0
    for tag, entries in leaves.items():
        key = (leaf, tag)
        used = leaf_used.get(tag)
        if used is None or key not in tables or entries.shape != shape:
            return False
        want[key] = want.get(key, 0) + used
        small += used
    if small != proc.small_pages:
        return False
    table_of = geo.table_of
    for base, (lv, _f, _prot) in proc.large.items():
        key = table_of(lv, base)
        want[key] = want.get(key, 0) + 1
    for key, (_frame, used) in tables.items():
        if used != want.pop(key, 0) or (used == 0 and key != ROOT):
            return False
    return not want


def free_list_sound_near(ft: FrameTable, frames: list[int], old_next: np.ndarray, old_prev: np.ndarray,
                         old_head: int, free: int, budget: int = 64) -> bool | None:
    """``free_list_sound`` after a change that wrote only ``frames`` (their kind, their links, or both;
    the head may have moved) to a list that was sound, with links ``old_next``/``old_prev`` (as they were,
    at least for ``frames``) and head ``old_head``; ``free``: the KERNEL_FREE frames, counted.

    Every free frame among ``frames``, their old neighbours and the old and new heads must link both ways
    with free neighbours, and only the head may have no predecessor: every other free frame is as it was,
    so the list is one path from the head, plus perhaps cycles, each through a frame that was written.
    A walk of at most ``budget`` links from each free frame written, back towards the head (then on towards
    the end), rules those out. None: a walk did not settle it (decide with ``free_list_problems``)."""
    n = ft.n
    kind, nxt, prv = ft.kind, ft.next, ft.prev
    head = ft.head
    if free != ft.free_count:
        return False
    if head == NIL:
        return free == 0
    if not 0 <= head < n or kind.item(head) != KERNEL_FREE or prv.item(head) != NIL:
        return False
    near = set(frames)
    near.add(head)
    if 0 <= old_head < n:
        near.add(old_head)
    for f in frames:
        for g in (old_next.item(f), old_prev.item(f)):
            if 0 <= g < n:
                near.add(g)
    for f in near:
        if kind.item(f) != KERNEL_FREE:
            continue  # (a frame that is not free is not on the list: a free neighbour's link to it is wrong)
        g = nxt.item(f)
        if g != NIL and (not 0 <= g < n or kind.item(g) != KERNEL_FREE or prv.item(g) != f):
            return False
        p = prv.item(f)
        if p == NIL:
            if f != head:
                return False
        elif not 0 <= p < n or kind.item(p) != KERNEL_FREE or nxt.item(p) != f:
            return False
    on_path: set[int] = set()
    for f in frames:
        if f in on_path or kind.item(f) != KERNEL_FREE:
            continue
        settled = False
        for links in (prv, nxt):  # back to the head first: pushes and pops happen there
            seen = [f]
            g = links.item(f)
            for _ in range(budget):
                if g == NIL or g in on_path:
                    settled = True
                    break
                if g == f:
                    return False  # a cycle
                seen.append(g)
                g = links.item(g)
            if settled:
                on_path.update(seen)
                break
        if not settled:
            return None
    return True


# ---- I2: the free list ------------------------------------------------------------------------------

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
