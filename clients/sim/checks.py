"""Invariant checks across both views (the kernel's frame table and the mm's own view).

Pure functions over the simulated state; each returns a list of violations
(strings starting with the invariant's name). Which check runs when:

- after every step that changed the kernel: ``kernel`` (I1-I4, I7 and table
  accounting, recomputed from raw state by ``kernel_server.invariants``), or
  with ``--check-every N`` that every N steps and ``kernel_cheap`` between;
- after every step that changed the mm's view: ``view`` (its own I4 and I7:
  refcounts equal its clients' mappings, states add up to RAM);
- on every refused kernel call: ``fingerprint`` before and after must be
  equal (I6: a failed call changes nothing);
- whenever nothing is in flight: ``agreement`` (I8).

The world adds the checks that need time or history (I11 deadlines, I12
execution counts, replies journaled before they are sent, lies refused).
"""

from __future__ import annotations

import numpy as np

from kernel_server.core import KernelCore
from kernel_server.frames import KERNEL_FREE as KERNEL_FREE_KIND
from kernel_server.frames import KERNEL_SHARED as KERNEL_SHARED_KIND
from kernel_server.frames import USER as USER_KIND
from kernel_server.invariants import check_kernel
from mm_service.view import USED, View

# kernel frame kind -> the code View.compare expects (0 none, 1 kernel, 2 user)
_KIND_CODE = np.array([0, 1, 1, 1, 2], dtype=np.uint8)


def kernel(core: KernelCore) -> list[str]:
    return check_kernel(core)


def kernel_cheap(core: KernelCore) -> list[str]:
    """The O(1)-per-frame subset of ``kernel`` (a few numpy passes), for the steps between full checks:
    the counters add up (I7), the free count is the number of free kernel frames (I2), and no frame
    that is not a user or kernel-shared frame has a mapping (I1, I3)."""
    ft = core.frames
    kind, refs = ft.kind, ft.refs
    out: list[str] = []
    c = ft.counts()
    if c["kernel_free"] + c["kernel_used"] + c["kernel_shared"] + c["user_free"] + c["user_mapped"] != c["ram"]:
        out.append(f"I7: kernel counters {c} do not add up to RAM")
    free = int(np.count_nonzero(kind == KERNEL_FREE_KIND))
    if free != ft.free_count:
        out.append(f"I2: {free} frames are free kernel frames but the free count is {ft.free_count}")
    mapped = int(np.count_nonzero((kind == USER_KIND) & (refs > 0)))
    if mapped != c["user_mapped"]:
        out.append(f"I7: {mapped} user frames are mapped but the counter says {c['user_mapped']}")
    bad = np.flatnonzero((refs > 0) & (kind != USER_KIND) & (kind != KERNEL_SHARED_KIND))
    if bad.size:
        out.append(f"I3: frame(s) {bad[:4].tolist()} of kind {int(kind[bad[0]])} are mapped in user space")
    return out


def fingerprint(core: KernelCore) -> tuple:
    """Cheap summary of every piece of kernel state a call may change (for I6)."""
    ft = core.frames
    objects = 0
    for p in core.procs.values():
        objects += p.small_pages + len(p.large) + len(p.threads) + len(p.endpoints) + len(p.tables)
        objects += p.tables[(0, 0)][1] << 20
    return (ft.head, ft.free_count, ft.kernel_used, ft.user_free, ft.user_mapped, len(core.procs), objects,
            core.event_seq, core.next_id["pid"], core.next_id["tid"], core.next_id["eid"])


def view(v: View) -> list[str]:
    out: list[str] = []
    st = v.state
    c = v.counts()
    if c["kernel"] + c["free"] + c["used"] != c["ram"]:
        out.append(f"I7 (mm view): kernel {c['kernel']} + free {c['free']} + used {c['used']} != RAM {c['ram']}")
    diff = np.zeros(v.n + 1, dtype=np.int64)
    for cl in v.clients.values():
        for m in cl.maps.values():
            for first, count in m.frames:
                diff[first] += 1
                diff[first + count] -= 1
    want = np.cumsum(diff[:-1])
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


__all__ = ["agreement", "fingerprint", "kernel", "kernel_arrays", "kernel_cheap", "view"]
