"""Every kernel call of docs/design.md section 5 and every refusal the design names,
through ``KernelService.call`` (in-process, no sockets) and ``handle`` (bytes).

Every refused call is made through ``K.refused``, which asserts that the
kernel state digest is byte-for-byte unchanged (I6); every call, accepted or
refused, is followed by the invariant checker (I1-I4, I7)."""

from __future__ import annotations

import numpy as np
import pytest

from kernel_server.arch import PAGE_SIZE, get_profile
from kernel_server.bootmap import pc_map
from kernel_server.core import MAX_CLIENT_PAGES, MAX_CLIENT_RUNS
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, NONE, USER
from kernel_server.invariants import check_kernel
from kernel_server.service import KernelService
from protocol import runs as R
from protocol import wire
from protocol.calls import MAX_FRAMES_PER_CALL
from protocol.errors import Errno, Error

MM = "M" * 40
OP = "O" * 40  # the operator: reads what the mm reads, changes nothing
A = "A" * 40
B = "B" * 40
C = "C" * 40
READ, WRITE, EXEC = 1, 2, 4
RW = READ | WRITE
MiB, GiB = 1 << 20, 1 << 30
V = 0x1000_0000  # a user virtual address (256 MiB) for small pages
VL = 0x4000_0000  # 1 GiB: aligned for every large page size
QUOTA = 16  # kernel frames a test process may hold unless a test says otherwise


class K:
    """One booted kernel service and the helpers every test uses."""

    def __init__(self, arch: str = "i686", memory: int = 16 * MiB, pool: int | None = 64, lease: float = 5.0,
                 check: bool = True) -> None:
        self.svc = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=pool,
                                      lease_seconds=lease, operator_key=OP)
        self.core = self.svc.core
        self.ft = self.core.frames
        self.check = check
        self.invariants()

    def invariants(self) -> None:
        if self.check:
            assert check_kernel(self.core) == []

    def ok(self, who: str, call: str, now: float = 0.0, **args) -> dict:
        out = self.svc.call(who, call, args, now=now)
        assert not isinstance(out, Error), f"{call} {args}: {out}"
        self.invariants()
        return out

    def refused(self, who: str, call: str, code: Errno, now: float = 0.0, **args) -> Error:
        """The call fails with ``code`` and changes nothing at all (I6)."""
        before = self.core.digest()
        counts = self.ft.counts()
        out = self.svc.call(who, call, args, now=now)
        assert isinstance(out, Error), f"{call} {args} succeeded: {out}"
        assert out.code == code, f"{call} {args}: expected {code.name}, got {out}"
        assert out.message
        assert self.core.digest() == before, f"refused {call} changed the kernel state"
        assert self.ft.counts() == counts
        self.invariants()
        return out

    def proc(self, key: str, quota: int = QUOTA, now: float = 0.0) -> int:
        return self.ok(MM, "proc_create", key=key, kernel_quota=quota, now=now)["pid"]

    def usage(self, pid: int) -> dict:
        """The kernel's per-process listing entry of ``pid`` (as the mm reads it)."""
        return next(p for p in self.ok(MM, "stats", from_pid=0, limit=1000)["per_process"] if p["pid"] == pid)

    def quota_refused(self, who: str, call: str, target: int, needed: int, **args) -> Error:
        """ENOMEM for process ``target`` past its quota: needed, limit and used are its own figures."""
        pid = target
        proc = self.core.procs[pid]
        limit, used = proc.kernel_limit, proc.kernel_used
        e = self.refused(who, call, Errno.ENOMEM, **args)
        assert (e.details["needed"], e.details["limit"], e.details["used"], e.details["pid"]) == \
            (needed, limit, used, pid), e
        assert used + needed > limit and "available" not in e.details
        return e

    def user(self, n: int, skip: int = 0) -> list[int]:
        """``n`` free user frames (lowest first, after skipping ``skip``)."""
        f = np.flatnonzero((self.ft.kind == USER) & (self.ft.refs == 0))
        assert f.size >= skip + n
        return f[skip:skip + n].tolist()

    def block(self, step: int, skip: int = 0) -> int:
        """First frame of the (skip+1)-th aligned block of ``step`` free user frames."""
        free = (self.ft.kind == USER) & (self.ft.refs == 0)
        n = (self.ft.n // step) * step
        whole = np.flatnonzero(free[:n].reshape(-1, step).all(axis=1))
        assert whole.size > skip, f"no free aligned {step}-frame block"
        return int(whole[skip]) * step

    def of_kind(self, kind: int) -> list[int]:
        return np.flatnonzero(self.ft.kind == kind).tolist()

    def counts(self) -> dict[str, int]:
        return self.ft.counts()

    def refs(self, frames) -> list[int]:
        return self.ft.refs[np.asarray(frames, dtype=np.int64)].tolist()


def runs(frames) -> list[list[int]]:
    return R.from_array(frames)


# ---- the helpers themselves can fail -------------------------------------------

def test_digest_and_invariant_checker_see_every_change():
    k = K()
    pid = k.proc(A)
    d = k.core.digest()
    k.ok(A, "thread_create")
    assert k.core.digest() != d
    d = k.core.digest()
    f = k.user(1)[0]
    k.ok(MM, "map", pid=pid, vaddr=V, frames=[[f, 1]], prot=READ)
    assert k.core.digest() != d
    # corrupt the state by hand: both the digest and the checker notice
    d = k.core.digest()
    k.ft.refs[f] += 1
    assert k.core.digest() != d
    assert any(v.startswith("I4") for v in check_kernel(k.core))
    k.ft.refs[f] -= 1
    assert check_kernel(k.core) == []
    head = k.ft.head
    k.ft.kind[head] = USER
    assert any(v.startswith("I2") for v in check_kernel(k.core))


# ---- donate ---------------------------------------------------------------------

def test_donate_moves_free_user_frames_to_the_kernel_free_list():
    k = K(pool=0)
    before = k.counts()
    f = k.user(8, skip=3)
    r = k.ok(MM, "donate", frames=runs(f))
    assert r == {"donated": 8, "kernel_free": 8, "kernel_reserved": 0}
    after = k.counts()
    assert after["kernel_free"] == 8 and after["user_free"] == before["user_free"] - 8
    assert after["kernel_used"] == before["kernel_used"]  # I5: no kernel allocation
    assert k.ft.free_list() == f  # the first donated frame is handed out first
    info = k.ok(MM, "frame_info", frames=runs(f))
    assert info == {"segments": [[f[0], 8, "kernel_free", 0]], "rest": []}


def test_donate_only_the_mm():
    k = K()
    k.proc(A)
    f = runs(k.user(4))
    assert "memory manager" in k.refused(A, "donate", Errno.EPERM, frames=f).message
    k.refused(B, "donate", Errno.EPERM, frames=f)  # no process at all


def test_donate_of_mapped_frames_is_ebusy_naming_them():
    k = K()
    pid = k.proc(A)
    f = k.user(10)
    k.ok(MM, "map", pid=pid, vaddr=V, frames=runs(f[2:4]), prot=RW)
    k.ok(MM, "map", pid=pid, vaddr=V + 0x10000, frames=runs(f[7:8]), prot=READ)
    e = k.refused(MM, "donate", Errno.EBUSY, frames=runs(f))
    assert e.details["frames"] == [[f[2], 2], [f[7], 1]]
    assert str(f[2]) in e.message
    # all-or-nothing: the free ones among them were not donated either
    assert k.refs(f[:2]) == [0, 0] and all(k.ft.kind[x] == USER for x in f)


def test_donate_of_kernel_frames_is_eexist():
    k = K()
    k.proc(A)
    k.ok(A, "thread_create")
    pool = k.of_kind(KERNEL_FREE)[:2]
    used = [k.of_kind(KERNEL_USED)[0], k.of_kind(KERNEL_USED)[-1]]  # frame table; slab, directory or thread
    shared = k.of_kind(KERNEL_SHARED)[:2]  # kernel image
    for frames in (pool, used, shared):
        e = k.refused(MM, "donate", Errno.EEXIST, frames=runs(frames))
        assert e.details["frames"] == runs(frames)
    f = k.user(3)
    k.ok(MM, "donate", frames=runs(f))
    e = k.refused(MM, "donate", Errno.EEXIST, frames=runs(k.user(2) + f[1:2]))
    assert e.details["frames"] == [[f[1], 1]]


def test_donate_of_non_ram_is_einval():
    k = K()
    e = k.refused(MM, "donate", Errno.EINVAL, frames=[[0, 1]])  # low 1 MiB: reserved
    assert "not RAM" in e.message and e.details["frames"] == [[0, 1]]
    n = k.ft.n
    e = k.refused(MM, "donate", Errno.EINVAL, frames=[[n - 1, 3]])
    assert e.details["frames"] == [[n, 2]] and "beyond physical memory" in e.message
    # a hostile run is refused without expanding it
    e = k.refused(MM, "donate", Errno.EINVAL, frames=[[0, MAX_FRAMES_PER_CALL]])
    assert e.details["frames"] == [[n, MAX_FRAMES_PER_CALL - n]]


def test_donate_duplicates_are_einval():
    k = K()
    f = k.user(4)
    e = k.refused(MM, "donate", Errno.EINVAL, frames=[[f[0], 3], [f[2], 1]])
    assert e.details["field"] == "frames"


def test_donate_all_or_nothing_on_an_explicit_list():
    k = K()
    f = k.user(6)
    for bad in ([[0, 1]], [[k.of_kind(KERNEL_FREE)[0], 1]], [[k.ft.n, 1]]):
        k.refused(MM, "donate", _donate_code(k, bad), frames=runs(f) + bad)
    assert all(k.ft.kind[x] == USER for x in f)


def _donate_code(k: K, bad: list[list[int]]) -> Errno:
    first = bad[0][0]
    if first >= k.ft.n or k.ft.kind[first] == NONE:
        return Errno.EINVAL
    return Errno.EEXIST


def test_donate_on_pae_refuses_frames_above_4_gib():
    k = K("i686-pae", memory=4 * GiB, check=False)
    high = 1 << 20  # frame of physical address 4 GiB: RAM remapped above the PCI hole
    assert k.ft.kind[high] == USER
    low = k.user(2)
    e = k.refused(MM, "donate", Errno.EINVAL, frames=[[low[0], 2], [high, 4]])
    assert e.details["frames"] == [[high, 4]] and "i686-pae" in e.message
    r = k.ok(MM, "donate", frames=[[low[0], 2]])
    assert r["donated"] == 2
    # x86_64 has no such limit
    k64 = K("x86_64", memory=4 * GiB, check=False)
    assert k64.ok(MM, "donate", frames=[[high, 4]])["donated"] == 4


def test_donate_and_reclaim_succeed_with_zero_free_kernel_frames():
    k = K(pool=0)
    assert k.counts()["kernel_free"] == 0
    used = k.counts()["kernel_used"]
    assert k.ok(MM, "reclaim", count=5) == {"frames": [], "reclaimed": 0, "kernel_free": 0, "kernel_reserved": 0}
    f = k.user(4)
    assert k.ok(MM, "donate", frames=runs(f))["kernel_free"] == 4
    r = k.ok(MM, "reclaim", frames=runs(f))
    assert r["reclaimed"] == 4 and r["kernel_free"] == 0
    assert k.ok(MM, "donate", frames=runs(f))["donated"] == 4
    assert sorted(R.to_array(k.ok(MM, "reclaim", count=10)["frames"]).tolist()) == f
    assert k.counts()["kernel_used"] == used  # I5
    # with zero free frames, a process (its whole quota) is ENOMEM: the pool's figures
    e = k.refused(MM, "proc_create", Errno.ENOMEM, key=A, kernel_quota=2)
    assert (e.details["needed"], e.details["available"]) == (2, 0) and "limit" not in e.details


def test_the_free_list_keeps_its_order_through_runs_chains_and_scattered_frames():
    k = K(pool=0, memory=64 * MiB)
    a, b = k.user(100), k.user(40, skip=200)
    k.ok(MM, "donate", frames=runs(a))
    k.ok(MM, "donate", frames=runs(b))
    model = b + a  # each donation goes to the head, in its own order
    assert k.ft.free_list() == model
    got = R.to_array(k.ok(MM, "reclaim", count=60)["frames"]).tolist()  # a long stretch, then another
    assert got == model[:60]
    model = model[60:]
    # a chain named backwards, a chain that is one run, then frames scattered over the list
    for pick in ([[f, 1] for f in reversed(a[30:40])], [[a[50], 20]], [[a[25], 1], [a[45], 2], [a[99], 1]]):
        r = k.ok(MM, "reclaim", frames=pick)
        gone = R.to_array(pick).tolist()
        assert r["reclaimed"] == len(gone) and r["frames"] == runs(gone)
        model = [f for f in model if f not in gone]
        assert k.ft.free_list() == model
    assert k.counts()["kernel_free"] == len(model)


# ---- reclaim ----------------------------------------------------------------------

def test_reclaim_count_takes_up_to_that_many():
    k = K(pool=5)
    used = k.counts()["kernel_used"]
    r = k.ok(MM, "reclaim", count=3)
    got = R.to_array(r["frames"])
    assert r["reclaimed"] == 3 == got.size and r["kernel_free"] == 2
    assert all(k.ft.kind[x] == USER and k.ft.refs[x] == 0 for x in got)
    r = k.ok(MM, "reclaim", count=10)
    assert r["reclaimed"] == 2 and r["kernel_free"] == 0
    assert k.counts()["kernel_used"] == used


def test_reclaim_explicit_frames_from_anywhere_on_the_free_list():
    k = K(pool=16)
    pool = k.ft.free_list()
    pick = [pool[0], pool[5], pool[6], pool[15]]
    r = k.ok(MM, "reclaim", frames=runs(sorted(pick)))
    assert r["reclaimed"] == 4 and r["kernel_free"] == 12
    assert k.ft.free_list() == [f for f in pool if f not in pick]


def test_reclaim_of_in_use_kernel_frames_is_ebusy_all_or_nothing():
    k = K(pool=16)
    k.proc(A)
    before = set(k.of_kind(KERNEL_USED))
    k.ok(A, "thread_create")
    thread = (set(k.of_kind(KERNEL_USED)) - before).pop()
    free = k.ft.free_list()[:3]
    e = k.refused(MM, "reclaim", Errno.EBUSY, frames=runs(sorted(free + [thread])))
    assert e.details["frames"] == [[thread, 1]]
    image = k.of_kind(KERNEL_SHARED)[0]
    assert k.refused(MM, "reclaim", Errno.EBUSY, frames=[[image, 1]]).details["frames"] == [[image, 1]]


def test_reclaim_of_user_or_non_ram_frames_is_einval():
    k = K()
    free = k.ft.free_list()[:2]
    u = k.user(1)[0]
    e = k.refused(MM, "reclaim", Errno.EINVAL, frames=runs(sorted(free + [u])))
    assert e.details["frames"] == [[u, 1]] and "not kernel-owned" in e.message
    k.refused(MM, "reclaim", Errno.EINVAL, frames=[[0, 1]])
    k.refused(MM, "reclaim", Errno.EINVAL, frames=[[k.ft.n - 1, 2]])
    k.refused(MM, "reclaim", Errno.EINVAL, frames=[[free[0], 1], [free[0], 1]])
    k.proc(A)
    k.refused(A, "reclaim", Errno.EPERM, count=1)
    k.refused(A, "reclaim", Errno.EPERM, frames=[[free[0], 1]])


# ---- map ------------------------------------------------------------------------------

def test_map_user_frames_counts_references_exactly():
    k = K()
    a, b = k.proc(A), k.proc(B)
    f = k.user(4)
    r = k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f), prot=RW)
    assert r["pid"] == a and r["pages"] == 4 and r["tables_allocated"] == 1
    assert k.refs(f) == [1, 1, 1, 1]
    k.ok(MM, "map", pid=b, vaddr=V, frames=runs(f[:2]), prot=READ)  # shared: the refcount path
    k.ok(MM, "map", pid=b, vaddr=V + 0x100000, frames=[[f[0], 1], [f[0], 1]], prot=READ)  # twice in one call
    assert k.refs(f) == [4, 2, 1, 1]
    info = k.ok(MM, "frame_info", frames=runs(f))
    assert info["segments"] == [[f[0], 1, "user", 4], [f[1], 1, "user", 2], [f[2], 2, "user", 1]]
    c = k.counts()
    assert c["user_mapped"] == 4
    r = k.ok(MM, "unmap", pid=b, vaddr=V + 0x100000, pages=2)
    assert r["frames"] == [[f[0], 1], [f[0], 1]] and k.refs(f) == [2, 2, 1, 1]


def test_map_needs_a_process():
    k = K()
    f = runs(k.user(1))
    assert k.refused(MM, "map", Errno.EINVAL, vaddr=V, frames=f, prot=READ).details["field"] == "pid"
    assert k.refused(MM, "map", Errno.ESRCH, pid=99, vaddr=V, frames=f, prot=READ).details["pid"] == 99
    k.refused(A, "map", Errno.ESRCH, vaddr=V, frames=f, prot=READ)


def test_client_maps_only_kernel_shared_frames_read_only_into_itself():
    k = K()
    a, b = k.proc(A), k.proc(B)
    image = k.of_kind(KERNEL_SHARED)[:2]
    r = k.ok(A, "map", vaddr=V, frames=runs(image), prot=READ)
    assert r["pid"] == a and k.refs(image) == [1, 1]
    k.ok(A, "map", pid=a, vaddr=V + 0x2000, frames=runs(image), prot=READ)
    assert k.refs(image) == [2, 2] and k.counts()["user_mapped"] == 0
    for prot in (RW, READ | EXEC, EXEC, WRITE):
        e = k.refused(A, "map", Errno.EPERM, vaddr=V + 0x10000, frames=runs(image), prot=prot)
        assert "read-only" in e.message
    e = k.refused(A, "map", Errno.EPERM, vaddr=V + 0x10000, frames=runs(k.user(1)), prot=READ)
    assert "kernel-shared" in e.message
    e = k.refused(A, "map", Errno.EPERM, pid=b, vaddr=V + 0x10000, frames=runs(image), prot=READ)
    assert "own address space" in e.message
    k.refused(A, "map", Errno.EPERM, vaddr=V + 0x10000, frames=runs(k.of_kind(KERNEL_FREE)[:1]), prot=READ)
    # the client unmaps its own mapping
    assert k.ok(A, "unmap", vaddr=V, pages=2)["frames"] == runs(image)
    assert k.refs(image) == [1, 1]


def test_mm_maps_kernel_shared_read_only_and_never_kernel_frames():
    k = K()
    a = k.proc(A)
    k.ok(A, "thread_create")
    image = k.of_kind(KERNEL_SHARED)[:1]
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(image), prot=READ)
    k.refused(MM, "map", Errno.EPERM, pid=a, vaddr=V + 0x1000, frames=runs(image), prot=RW)
    for frame in (k.of_kind(KERNEL_FREE)[0], k.of_kind(KERNEL_USED)[0], k.of_kind(KERNEL_USED)[-1]):
        e = k.refused(MM, "map", Errno.EPERM, pid=a, vaddr=V + 0x1000, frames=runs(k.user(2) + [frame]), prot=READ)
        assert e.details["frames"] == [[frame, 1]] and "kernel-owned" in e.message
    k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=V + 0x1000, frames=[[0, 1]], prot=READ)
    k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=V + 0x1000, frames=[[k.ft.n, 1]], prot=READ)


@pytest.mark.parametrize("prot", [WRITE | EXEC, READ | WRITE | EXEC])
def test_writable_and_executable_is_enotsup(prot):
    k = K()
    a = k.proc(A)
    k.refused(MM, "map", Errno.ENOTSUP, pid=a, vaddr=V, frames=runs(k.user(1)), prot=prot)
    k.refused(A, "map", Errno.ENOTSUP, vaddr=V, frames=runs(k.of_kind(KERNEL_SHARED)[:1]), prot=prot)
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(k.user(1)), prot=READ | EXEC)


@pytest.mark.parametrize("arch", ["i686", "i686-pae", "x86_64"])
def test_map_unaligned_or_beyond_user_space_is_einval(arch):
    k = K(arch)
    a = k.proc(A)
    f = runs(k.user(2))
    top = k.core.profile.user_top
    assert k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=V + 1, frames=f, prot=READ).details["field"] == "vaddr"
    assert k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=top - PAGE_SIZE, frames=f, prot=READ).details["field"] == "vaddr"
    k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=top, frames=f, prot=READ)
    k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=(1 << 64) - PAGE_SIZE, frames=f, prot=READ)
    r = k.ok(MM, "map", pid=a, vaddr=top - 2 * PAGE_SIZE, frames=f, prot=READ)  # the last two pages are fine
    assert r["pages"] == 2


def test_map_over_an_existing_mapping_is_ebusy_not_a_replace():
    k = K()
    a = k.proc(A)
    f = k.user(8)
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f[:4]), prot=RW)
    e = k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=V + 3 * PAGE_SIZE, frames=runs(f[4:6]), prot=RW)
    assert e.details["vaddr"] == V + 3 * PAGE_SIZE
    k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=V, frames=runs(f[:4]), prot=RW)  # the same mapping again
    # another process may map the same range of its own
    b = k.proc(B)
    k.ok(MM, "map", pid=b, vaddr=V, frames=runs(f[4:8]), prot=RW)
    assert k.core.procs[a].pages[V >> 12] >> 3 == f[0]


def test_page_tables_are_allocated_lazily_and_counted_i686():
    k = K(pool=64)
    free0 = k.counts()["kernel_free"]
    r = k.ok(MM, "proc_create", key=A, kernel_quota=QUOTA)
    a = r["pid"]
    assert r["kernel_frames"] == 2  # the process's object frame + page directory
    assert k.ok(MM, "proc_create", key=B, kernel_quota=QUOTA)["kernel_frames"] == 2  # its own, not shared
    assert k.counts()["kernel_free"] == free0 - 4
    assert k.ok(MM, "stats")["kernel_reserved"] == 2 * (QUOTA - 2)
    f = k.user(8)
    assert k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f[:1]), prot=READ)["tables_allocated"] == 1
    assert k.ok(MM, "map", pid=a, vaddr=V + PAGE_SIZE, frames=runs(f[1:2]), prot=READ)["tables_allocated"] == 0
    assert k.ok(MM, "map", pid=a, vaddr=V + 4 * MiB, frames=runs(f[2:3]), prot=READ)["tables_allocated"] == 1
    # straddling a 4 MiB boundary where neither table exists: two tables
    r = k.ok(MM, "map", pid=a, vaddr=V + 12 * MiB - PAGE_SIZE, frames=runs(f[3:5]), prot=READ)
    assert r["tables_allocated"] == 2 and r["kernel_free"] == free0 - 4 - 4
    assert r["kernel_reserved"] == 2 * (QUOTA - 2) - 4  # the tables came out of A's reservation
    usage = k.usage(a)
    assert usage["tables"] == 1 + 4 and usage["pages"] == 5
    assert (usage["kernel_used"], usage["kernel_limit"]) == (2 + 4, QUOTA)
    assert k.ok(A, "stats")["you"] == usage  # a client sees its own usage
    # unmap frees empty tables back to the free list
    r = k.ok(MM, "unmap", pid=a, vaddr=V, pages=1)
    assert r["tables_freed"] == 0
    r = k.ok(MM, "unmap", pid=a, vaddr=V + PAGE_SIZE, pages=1)
    assert r["tables_freed"] == 1 and r["kernel_free"] == free0 - 4 - 3
    k.refused(A, "unmap", Errno.EPERM, vaddr=V + 12 * MiB - PAGE_SIZE, pages=2)  # the mm's mapping, not A's
    r = k.ok(MM, "unmap", pid=a, vaddr=V + 12 * MiB - PAGE_SIZE, pages=2)
    assert r["tables_freed"] == 2


@pytest.mark.parametrize("arch, tables, proc_cost", [("i686-pae", 2, 1), ("x86_64", 3, 2)])
def test_page_tables_per_profile(arch, tables, proc_cost):
    k = K(arch)
    free0 = k.counts()["kernel_free"]
    r = k.ok(MM, "proc_create", key=A, kernel_quota=QUOTA)
    assert r["kernel_frames"] == proc_cost
    a = r["pid"]
    f = k.user(4)
    assert k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f[:1]), prot=READ)["tables_allocated"] == tables
    assert k.ok(MM, "map", pid=a, vaddr=V + PAGE_SIZE, frames=runs(f[1:2]), prot=READ)["tables_allocated"] == 0
    assert k.ok(MM, "map", pid=a, vaddr=V + 2 * MiB, frames=runs(f[2:3]), prot=READ)["tables_allocated"] == 1
    r = k.ok(MM, "unmap", pid=a, vaddr=V, pages=2)
    assert r["tables_freed"] == 1
    r = k.ok(MM, "unmap", pid=a, vaddr=V + 2 * MiB, pages=1)
    assert r["tables_freed"] == tables and r["kernel_free"] == free0 - proc_cost


def test_enomem_past_the_quota_reports_needed_limit_used_and_maps_nothing():
    k = K(pool=8)
    a = k.proc(A, quota=2)  # its object frame and page directory: nothing left for tables
    f = k.user(4)
    k.quota_refused(MM, "map", a, 1, pid=a, vaddr=V, frames=runs(f[:1]), prot=READ)
    # the pool has frames: they are not A's (the pool's figures are not in the error)
    assert k.counts()["kernel_free"] == 6 and k.core.unreserved() == 6
    b = k.proc(B, quota=3)
    k.ok(MM, "map", pid=b, vaddr=V, frames=runs(f[:1]), prot=READ)  # its third frame: a page table
    # needs two tables, none left of the quota: no partial mapping (I6)
    k.quota_refused(MM, "map", b, 2, pid=b, vaddr=V + 8 * MiB - PAGE_SIZE, frames=runs(f[1:3]), prot=READ)
    assert list(k.core.procs[b].pages) == [V >> 12] and k.refs(f) == [1, 0, 0, 0]
    # what fits in the tables it has still maps
    assert k.ok(MM, "map", pid=b, vaddr=V + PAGE_SIZE, frames=runs(f[1:3]), prot=READ)["tables_allocated"] == 0


def test_enomem_x86_64_counts_every_level():
    k = K("x86_64", pool=8)
    a = k.proc(A, quota=4)
    k.quota_refused(MM, "map", a, 3, pid=a, vaddr=V, frames=runs(k.user(1)), prot=READ)


def test_pool_enomem_only_at_proc_create_and_only_the_unreserved_frames_count():
    k = K(pool=4)
    k.proc(A, quota=3)  # takes 2 frames, keeps 1 reserved: 2 free, 1 unreserved
    assert (k.counts()["kernel_free"], k.core.reserved, k.core.unreserved()) == (2, 1, 1)
    e = k.refused(MM, "proc_create", Errno.ENOMEM, key=B, kernel_quota=2)
    assert (e.details["needed"], e.details["available"]) == (2, 1) and "unreserved" in e.message
    # reclaim takes only unreserved frames: by count, and an explicit list beyond them is EBUSY
    free = k.ft.free_list()
    e = k.refused(MM, "reclaim", Errno.EBUSY, frames=runs(sorted(free)))
    assert e.details["reserved"] == 1 and "reserved" in e.message
    r = k.ok(MM, "reclaim", count=10)
    assert r["reclaimed"] == 1 and (r["kernel_free"], r["kernel_reserved"]) == (1, 1)
    assert k.ok(MM, "reclaim", count=10)["reclaimed"] == 0
    # what is reserved is A's: its thread needs no donation
    assert k.ok(A, "thread_create")["kernel_frames"] == 1 and k.core.reserved == 0
    k.quota_refused(A, "thread_create", 1, 1)
    k.ok(MM, "donate", frames=runs(k.user(2)))
    assert k.ok(MM, "proc_create", key=B, kernel_quota=2)["kernel_frames"] == 2


# ---- large pages --------------------------------------------------------------------

@pytest.mark.parametrize("arch, memory, step, tables, other", [
    ("i686", 32 * MiB, 1024, 0, 2 * MiB),
    ("i686-pae", 16 * MiB, 512, 1, 4 * MiB),
    ("x86_64", 32 * MiB, 512, 2, 4 * MiB),
])
def test_large_pages_per_profile(arch, memory, step, tables, other):
    k = K(arch, memory=memory)
    a = k.proc(A)
    size = step * PAGE_SIZE
    assert k.ok(A, "hello")["large_page_sizes"][0] == size
    first = k.block(step)
    used = k.counts()["kernel_used"]
    r = k.ok(MM, "map", pid=a, vaddr=VL, frames=[[first, step]], prot=RW, large=True)
    assert r["pages"] == step and r["tables_allocated"] == tables
    assert k.counts()["kernel_used"] == used + tables
    assert set(k.refs(range(first, first + step))) == {1}
    assert k.core.procs[a].large == {VL >> 12: (max(k.core.profile.large_levels), first, RW)}
    # the same by page_size; another size of no such page is EINVAL
    second = k.block(step)
    k.ok(MM, "map", pid=a, vaddr=VL + size, frames=[[second, step]], prot=READ, page_size=size)
    e = k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=VL + 2 * size, frames=runs(k.user(8)), prot=READ, page_size=other)
    assert e.details["field"] == "page_size"
    # shape errors
    b = k.block(step)
    e = k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=VL + 2 * size + PAGE_SIZE, frames=[[b, step]], prot=READ, large=True)
    assert e.details["field"] == "vaddr"
    e = k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=VL + 2 * size, frames=[[b + 1, step]], prot=READ, large=True)
    assert e.details["field"] == "frames"
    e = k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=VL + 2 * size, frames=[[b, step // 2]], prot=READ, large=True)
    assert e.details["field"] == "frames"
    e = k.refused(MM, "map", Errno.EINVAL, pid=a, vaddr=VL + 2 * size,
                  frames=[[b, step // 2], [b + step // 2 + 1, step // 2]], prot=READ, large=True)
    assert e.details["field"] == "frames"
    # a client maps no large pages: one is more than a client's call may map
    assert "at most" in k.refused(A, "map", Errno.E2BIG, vaddr=VL + 2 * size, frames=[[b, step]], prot=READ,
                                  large=True).message
    # a kernel-owned frame inside the block
    k.ok(MM, "donate", frames=[[b + 7, 1]])
    e = k.refused(MM, "map", Errno.EPERM, pid=a, vaddr=VL + 2 * size, frames=[[b, step]], prot=READ, large=True)
    assert e.details["frames"] == [[b + 7, 1]]
    # donating a frame of a mapped large page is EBUSY, naming it
    assert k.refused(MM, "donate", Errno.EBUSY, frames=[[first + 3, 2]]).details["frames"] == [[first + 3, 2]]
    # unmap of part of a large page is EINVAL
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=VL + PAGE_SIZE, pages=1)
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=VL, pages=step - 1)
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=VL + size, pages=step + 1)  # the 2nd whole, then a hole
    r = k.ok(MM, "unmap", pid=a, vaddr=VL, pages=2 * step)
    assert r["pages"] == 2 * step and r["frames"] == runs(np.r_[first:first + step, second:second + step])
    assert r["tables_freed"] == tables
    assert set(k.refs(range(first, first + step))) == {0} and k.counts()["kernel_used"] == used


@pytest.mark.parametrize("arch, memory, step", [("i686", 32 * MiB, 1024), ("i686-pae", 16 * MiB, 512),
                                                 ("x86_64", 32 * MiB, 512)])
def test_large_and_small_mappings_never_overlap(arch, memory, step):
    k = K(arch, memory=memory)
    a = k.proc(A)
    size = step * PAGE_SIZE
    first = k.block(step)
    k.ok(MM, "map", pid=a, vaddr=VL, frames=[[first, step]], prot=READ, large=True)
    f = k.user(2)
    e = k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=VL + size - PAGE_SIZE, frames=runs(f), prot=READ)
    assert e.details["vaddr"] == VL
    k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=VL, frames=[[k.block(step), step]], prot=READ, large=True)
    # small pages next to it, then a large page over them is EBUSY
    k.ok(MM, "map", pid=a, vaddr=VL + size + 5 * PAGE_SIZE, frames=runs(f), prot=READ)
    e = k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=VL + size, frames=[[k.block(step), step]], prot=READ, large=True)
    assert e.details["vaddr"] == VL + size
    # one unmap may cover a large page and small pages, but no hole
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=VL, pages=step + 7)
    r = k.ok(MM, "unmap", pid=a, vaddr=VL + size + 5 * PAGE_SIZE, pages=2)
    assert r["frames"] == runs(f)
    k.ok(MM, "map", pid=a, vaddr=VL + size, frames=runs(f), prot=READ)
    r = k.ok(MM, "unmap", pid=a, vaddr=VL, pages=step + 2)
    assert r["pages"] == step + 2
    assert not k.core.procs[a].pages and not k.core.procs[a].large


def test_x86_64_one_gib_pages():
    k = K("x86_64", memory=3 * GiB)
    a = k.proc(A)
    step = 1 << 18
    first = k.block(step)
    used = k.counts()["kernel_used"]
    r = k.ok(MM, "map", pid=a, vaddr=GiB, frames=[[first, step]], prot=RW, page_size=GiB)
    assert r["pages"] == step and r["tables_allocated"] == 1  # only the PDPT
    assert k.counts()["user_mapped"] == step and k.counts()["kernel_used"] == used + 1
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=GiB, pages=512)  # 2 MiB of a 1 GiB page
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=GiB + 2 * MiB, pages=512)
    two = k.block(512)
    k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=GiB + 2 * MiB, frames=[[two, 512]], prot=READ, large=True)
    k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=GiB + 8 * PAGE_SIZE, frames=[[two, 1]], prot=READ)
    # a 2 MiB page in the next gigabyte blocks a 1 GiB page there
    k.ok(MM, "map", pid=a, vaddr=2 * GiB + 2 * MiB, frames=[[two, 512]], prot=READ, large=True)
    k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=2 * GiB, frames=[[first, step]], prot=READ, page_size=GiB)
    r = k.ok(MM, "unmap", pid=a, vaddr=GiB, pages=step)
    assert r["frames"] == [[first, step]] and k.counts()["user_mapped"] == 512


# ---- unmap ---------------------------------------------------------------------------

def test_unmap_rules():
    k = K()
    a, b = k.proc(A), k.proc(B)
    f = k.user(4)
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f), prot=RW)
    k.refused(B, "unmap", Errno.EPERM, pid=a, vaddr=V, pages=1)
    k.refused(C, "unmap", Errno.ESRCH, vaddr=V, pages=1)
    k.refused(B, "unmap", Errno.EINVAL, vaddr=V, pages=1)  # nothing mapped in B
    k.refused(MM, "unmap", Errno.EINVAL, vaddr=V, pages=1)  # mm must name the pid
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=V + 1, pages=1)
    k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=k.core.profile.user_top - PAGE_SIZE, pages=2)
    e = k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=V, pages=5)  # all-or-nothing: a hole at the end
    assert e.details["vaddr"] == V + 4 * PAGE_SIZE
    r = k.ok(MM, "unmap", pid=a, vaddr=V + PAGE_SIZE, pages=2)
    assert r["frames"] == runs(f[1:3]) and k.refs(f) == [1, 0, 0, 1]
    r = k.ok(MM, "unmap", pid=a, vaddr=V, pages=1)
    assert r["tables_freed"] == 0
    r = k.ok(MM, "unmap", pid=a, vaddr=V + 3 * PAGE_SIZE, pages=1)
    assert r["tables_freed"] == 1 and k.counts()["user_mapped"] == 0
    assert k.core.procs[b].pages == {}


def test_a_client_unmaps_only_the_mappings_it_made_itself():
    k = K()
    a = k.proc(A)
    f = k.user(2)
    image = k.of_kind(KERNEL_SHARED)[:3]
    page = lambda i: V + i * PAGE_SIZE  # noqa: E731
    k.ok(MM, "map", pid=a, vaddr=page(0), frames=runs(f), prot=RW)  # pages 0, 1: the mm's
    k.ok(A, "map", vaddr=page(2), frames=runs(image[:2]), prot=READ)  # pages 2, 3: A's own
    k.ok(MM, "map", pid=a, vaddr=page(4), frames=runs(image[2:]), prot=READ)  # page 4: the mm's, a shared frame
    # a range touching a mapping the mm made is EPERM, names it, and changes nothing (K.refused)
    for first, pages, named in ((0, 1, 0), (1, 3, 1), (2, 3, 4)):
        e = k.refused(A, "unmap", Errno.EPERM, vaddr=page(first), pages=pages)
        assert e.details["vaddr"] == page(named) and "memory manager" in e.message
    k.refused(A, "unmap", Errno.EINVAL, vaddr=page(2), pages=4)  # a hole (page 5) is still EINVAL
    r = k.ok(A, "unmap", vaddr=page(2), pages=2)
    assert r["frames"] == runs(image[:2]) and k.refs(image) == [0, 0, 1]
    # the mm may unmap anything in any process, what the client made included
    k.ok(A, "map", vaddr=page(2), frames=runs(image[:1]), prot=READ)
    r = k.ok(MM, "unmap", pid=a, vaddr=page(0), pages=3)
    assert r["pages"] == 3 and k.counts()["user_mapped"] == 0 and k.refs(image) == [0, 0, 1]
    # every large page is the mm's (and more than a client's call may unmap)
    big = k.block(1024)
    k.ok(MM, "map", pid=a, vaddr=VL, frames=[[big, 1024]], prot=READ, large=True)
    k.refused(A, "unmap", Errno.E2BIG, vaddr=VL, pages=1024)


def test_unmap_of_many_pages_across_page_tables_and_runs():
    k = K("i686-pae", memory=64 * MiB)
    a = k.proc(A)
    f = k.user(1500)
    parts = [f[:700], f[900:1500]]  # two runs of frames back to back: 1300 pages over four page tables
    vaddr = V + 2 * MiB - 100 * PAGE_SIZE
    r = k.ok(MM, "map", pid=a, vaddr=vaddr, frames=runs(parts[0]) + runs(parts[1]), prot=RW)
    assert r["tables_allocated"] == 1 + 4 and k.counts()["user_mapped"] == 1300  # directory + tables
    e = k.refused(MM, "map", Errno.EBUSY, pid=a, vaddr=vaddr + 1299 * PAGE_SIZE, frames=runs(f[700:702]), prot=RW)
    assert e.details["vaddr"] == vaddr + 1299 * PAGE_SIZE
    r = k.ok(MM, "unmap", pid=a, vaddr=vaddr + 600 * PAGE_SIZE, pages=200)
    assert r["frames"] == runs(parts[0][600:] + parts[1][:100]) and r["tables_freed"] == 0
    e = k.refused(MM, "unmap", Errno.EINVAL, pid=a, vaddr=vaddr, pages=1300)
    assert e.details["vaddr"] == vaddr + 600 * PAGE_SIZE
    r = k.ok(MM, "unmap", pid=a, vaddr=vaddr, pages=600)
    r2 = k.ok(MM, "unmap", pid=a, vaddr=vaddr + 800 * PAGE_SIZE, pages=500)
    assert r["tables_freed"] + r2["tables_freed"] == 5 and k.counts()["user_mapped"] == 0
    assert k.core.procs[a].tables == {(0, 0): [-1, 0]} and not k.core.procs[a].leaves


# ---- processes ------------------------------------------------------------------------

def test_proc_create_rules():
    k = K(pool=1)
    k.refused(A, "proc_create", Errno.EPERM, key=B, kernel_quota=2)
    k.refused(OP, "proc_create", Errno.EPERM, key=B, kernel_quota=2)  # the operator changes nothing
    e = k.refused(MM, "proc_create", Errno.ENOMEM, key=A, kernel_quota=2)
    assert (e.details["needed"], e.details["available"]) == (2, 1)
    e = k.refused(MM, "proc_create", Errno.EINVAL, key=A, kernel_quota=1)  # below the cost of a process
    assert e.details["field"] == "kernel_quota" and "at least 2" in e.message
    k.refused(MM, "proc_create", Errno.EINVAL, key=A)  # the quota is not optional
    k.ok(MM, "donate", frames=runs(k.user(8)))
    for server in (MM, OP):
        assert k.refused(MM, "proc_create", Errno.EINVAL, key=server, kernel_quota=2).details["field"] == "key"
    a = k.ok(MM, "proc_create", key=A, kernel_quota=3, user_quota=100)["pid"]
    e = k.refused(MM, "proc_create", Errno.EBUSY, key=A, kernel_quota=2)
    assert (e.details["pid"], e.details["kernel_limit"], e.details["user_quota"]) == (a, 3, 100)
    assert k.ok(MM, "hello")["pid"] is None and k.ok(A, "hello")["pid"] == a
    assert k.usage(a)["user_quota"] == 100


@pytest.mark.parametrize("arch, cost", [("i686", 2), ("i686-pae", 1), ("x86_64", 2)])
def test_a_process_costs_its_object_frame_and_root_table(arch, cost):
    k = K(arch)
    assert k.ok(C, "hello")["process_cost"] == cost
    for key in (A, B):  # every process its own frames: nothing is shared between processes
        assert k.ok(MM, "proc_create", key=key, kernel_quota=cost)["kernel_frames"] == cost
    st = k.ok(A, "stats")
    assert st["slab_frames"] == 0 and st["you"]["kernel_used"] == st["you"]["kernel_limit"] == cost
    k.quota_refused(A, "endpoint_create", 1, 1)  # its own endpoint slab frame: past its quota


def test_proc_destroy_releases_everything():
    k = K(pool=64)
    free0, used0 = k.counts()["kernel_free"], k.counts()["kernel_used"]
    a, b = k.proc(A), k.proc(B)
    f = k.user(6)
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f), prot=RW)
    k.ok(MM, "map", pid=b, vaddr=V, frames=runs(f[:2]), prot=READ)
    big = k.block(1024)
    k.ok(MM, "map", pid=a, vaddr=VL, frames=[[big, 1024]], prot=READ, large=True)
    k.ok(A, "map", vaddr=V + 4 * MiB, frames=runs(k.of_kind(KERNEL_SHARED)[:1]), prot=READ)
    k.ok(A, "thread_create")
    k.ok(A, "thread_create")
    for _ in range(3):
        k.ok(A, "endpoint_create")
    k.refused(A, "proc_destroy", Errno.EPERM, pid=a)
    k.refused(MM, "proc_destroy", Errno.ESRCH, pid=99)
    r = k.ok(MM, "proc_destroy", pid=a)
    assert r["pid"] == a and r["unmapped_pages"] == 6 + 1024 + 1
    assert k.refs(f) == [1, 1, 0, 0, 0, 0] and set(k.refs(range(big, big + 1024))) == {0}
    assert a not in k.core.procs and A not in k.core.by_key
    # what is left is B's: its object frame, its page directory, its page table
    assert k.counts()["kernel_used"] == used0 + 3
    assert k.core.reserved == QUOTA - 3  # A's reservation went with it
    ev = k.ok(MM, "events")["events"][-1]
    assert (ev["kind"], ev["pid"], ev["key"], ev["reason"]) == ("proc_destroyed", a, A, "proc_destroy")
    # the event lists the user frames released (the mm's business), not the boot image frame A mapped
    assert ev["frames"] == r["frames"] == sorted(runs(f) + [[big, 1024]])
    assert ev["shared_unmapped"] == r["shared_unmapped"] == 1
    k.ok(MM, "proc_destroy", pid=b)
    c = k.counts()
    assert c["kernel_free"] == free0 and c["kernel_used"] == used0 and c["user_mapped"] == 0
    st = k.ok(MM, "stats")
    assert st["slab_frames"] == 0 and st["kernel_reserved"] == 0 and st["processes"] == 0
    k.proc(A)  # the key is free again


# ---- threads and endpoints -----------------------------------------------------------

def test_threads_cost_one_frame_each():
    k = K(pool=8)
    a = k.proc(A, quota=3)
    k.proc(B, quota=2)
    assert k.counts()["kernel_free"] == 4 and k.core.unreserved() == 3
    used = k.counts()["kernel_used"]
    t = k.ok(A, "thread_create")
    assert t["kernel_frames"] == 1 and k.counts()["kernel_used"] == used + 1
    k.quota_refused(A, "thread_create", a, 1)
    k.refused(B, "thread_destroy", Errno.ESRCH, tid=t["tid"])  # not B's thread
    k.refused(C, "thread_create", Errno.ESRCH)
    k.refused(MM, "thread_create", Errno.ESRCH)
    assert k.ok(A, "thread_destroy", tid=t["tid"]) == {"tid": t["tid"]}
    assert k.counts()["kernel_used"] == used and k.counts()["kernel_free"] == 4
    k.refused(A, "thread_destroy", Errno.ESRCH, tid=t["tid"])
    assert k.core.procs[a].threads == {} and k.usage(a)["kernel_used"] == 2


def test_endpoints_are_slab_objects_in_slab_frames_of_their_own_process():
    k = K(pool=9)
    a = k.proc(A, quota=4)  # two slab frames' worth
    b = k.proc(B, quota=3)
    free = k.counts()["kernel_free"]
    assert free == 5
    per_frame = PAGE_SIZE // 64
    eids = [k.ok(A, "endpoint_create")["eid"]]
    assert k.counts()["kernel_free"] == free - 1
    eids += [k.ok(A, "endpoint_create")["eid"] for _ in range(per_frame - 1)]
    assert k.counts()["kernel_free"] == free - 1
    r = k.ok(A, "endpoint_create")
    assert r["kernel_frames"] == 1 and k.counts()["kernel_free"] == free - 2
    eids.append(r["eid"])
    # the second slab frame fills up: no frame needed
    more = [k.ok(A, "endpoint_create") for _ in range(per_frame - 1)]
    assert {m["kernel_frames"] for m in more} == {0}
    eids += [m["eid"] for m in more]
    k.quota_refused(A, "endpoint_create", a, 1)
    # B's endpoints live in B's own slab frame, not in A's free slots
    k.ok(A, "endpoint_destroy", eid=eids.pop(0))
    eb = k.ok(B, "endpoint_create")
    assert eb["kernel_frames"] == 1 and k.usage(b)["kernel_used"] == 3
    r = k.ok(A, "endpoint_create")
    assert r["kernel_frames"] == 0  # the freed slot is reused
    eids.append(r["eid"])
    k.refused(B, "endpoint_destroy", Errno.ESRCH, eid=eids[0])
    assert k.ok(MM, "stats")["slab_frames"] == 3
    for eid in eids:
        k.ok(A, "endpoint_destroy", eid=eid)
    assert k.counts()["kernel_free"] == free - 1 and k.ok(A, "stats")["slab_frames"] == 1
    assert k.usage(a)["kernel_used"] == 2


# ---- informational calls ----------------------------------------------------------------

def test_frame_info_segments_and_continuation():
    k = K()
    a = k.proc(A)
    f = k.user(3, skip=10)
    k.ok(MM, "map", pid=a, vaddr=V, frames=[[f[1], 1]], prot=READ)
    k.refused(A, "frame_info", Errno.EPERM, frames=[[0, 10]])
    k.refused(MM, "frame_info", Errno.EINVAL, frames=[[k.ft.n - 1, 2]])
    whole = k.ok(MM, "frame_info", frames=[[0, k.ft.n]])
    assert whole["rest"] == []
    segs = whole["segments"]
    assert segs[0] == [0, 256, "none", 0]  # low 1 MiB
    assert sum(s[1] for s in segs) == k.ft.n
    assert [f[1], 1, "user", 1] in segs
    # a small max_segments pages through the same answer
    got, ask = [], [[0, k.ft.n]]
    while ask:
        part = k.ok(MM, "frame_info", frames=ask, max_segments=2)
        assert len(part["segments"]) <= 2
        got += part["segments"]
        ask = part["rest"]
    assert got == segs


def test_stats_hello_ping_address_map():
    k = K("i686", memory=64 * MiB, lease=3.0)
    a = k.proc(A)
    s = k.ok(C, "stats")
    assert s["kernel_free"] + s["kernel_used"] + s["kernel_shared"] + s["user_free"] + s["user_mapped"] == s["ram"]
    assert s["processes"] == 1 and s["you"] is None and s["kernel_reserved"] == QUOTA - 2
    assert "per_process" not in s and "large_mappings" not in s  # other processes are not a client's business
    k.refused(C, "stats", Errno.EPERM, from_pid=0)
    for reader in (MM, OP):
        s = k.ok(reader, "stats", from_pid=0)
        assert [(p["pid"], p["key"]) for p in s["per_process"]] == [(a, A)] and s["next_pid"] is None
    h = k.ok(A, "hello")
    assert (h["v"], h["arch"], h["page_size"], h["identity"], h["is_mm"], h["pid"]) == (1, "i686", 4096, A, False, a)
    assert h["lease_seconds"] == 3.0 and "boot_id" in h and h["user_top"] == 0xC000_0000
    assert h["is_operator"] is False and h["process_cost"] == 2
    assert k.ok(MM, "hello")["is_mm"] is True and k.ok(MM, "hello")["is_operator"] is False
    assert k.ok(OP, "hello")["is_operator"] is True and k.ok(OP, "hello")["is_mm"] is False
    assert k.ok(A, "ping") == {"pid": a} and k.ok(C, "ping") == {"pid": None}
    m = k.ok(C, "address_map")
    entries = m["entries"]
    assert entries[0]["kind"] == "reserved" and entries[0]["start"] == 0 and entries[0]["size"] == MiB
    image = next(e for e in entries if e["kind"] == "kernel_image")
    assert image["start"] == 16 * MiB and image["owner"] == "kernel" and image["shared"] is True
    kinds = {e["kind"] for e in entries}
    assert {"reserved", "user", "kernel_image", "frame_table", "kernel_pool", "ramdisk", "firmware"} <= kinds
    ends = [(e["first"], e["first"] + e["count"]) for e in entries]
    assert all(x[1] <= y[0] for x, y in zip(ends, ends[1:]))
    assert sum(e["count"] for e in entries if e["kind"] != "reserved") == s["ram"]
    for e in entries:
        assert e["start"] == e["first"] * PAGE_SIZE and e["size"] == e["count"] * PAGE_SIZE


def test_the_process_listing_is_for_readers_and_paginated():
    k = K(pool=64)
    pids = [k.proc(key, quota=3) for key in (A, B, C, "D" * 40, "E" * 40)]
    assert k.ok(MM, "stats")["per_process"][0]["pid"] == pids[0]  # the mm and the operator get the first page
    got, start = [], 0
    while start is not None:
        page = k.ok(OP, "stats", from_pid=start, limit=2)
        assert len(page["per_process"]) <= 2
        got += [p["pid"] for p in page["per_process"]]
        start = page["next_pid"]
    assert got == pids
    page = k.ok(MM, "stats", from_pid=pids[3], limit=1000)
    assert [p["pid"] for p in page["per_process"]] == pids[3:] and page["next_pid"] is None
    p = page["per_process"][0]
    assert (p["kernel_used"], p["kernel_limit"], p["user_quota"], p["key"]) == (2, 3, 0, "D" * 40)
    k.refused(A, "stats", Errno.EPERM, from_pid=0)
    assert k.ok(A, "stats")["you"]["pid"] == pids[0]


def test_mappings_lists_what_a_process_maps_made_by_whom_and_pages_through():
    k = K(memory=32 * MiB)
    a = k.proc(A)
    f = k.user(8)
    image = k.of_kind(KERNEL_SHARED)[:2]
    big = k.block(1024)
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f[:4]), prot=RW)
    k.ok(MM, "map", pid=a, vaddr=V + 4 * PAGE_SIZE, frames=runs(f[6:8]), prot=RW)  # continues the range, not the frames
    k.ok(A, "map", vaddr=V + 4 * MiB - PAGE_SIZE, frames=runs(image), prot=READ)  # across two page tables
    k.ok(MM, "map", pid=a, vaddr=VL, frames=[[big, 1024]], prot=READ, large=True)
    whole = k.ok(MM, "mappings", pid=a, vaddr=0, pages=k.core.profile.user_top >> 12)
    assert whole == {"pid": a, "rest": None, "segments": [
        [V, 4, f[0], RW, "mm", PAGE_SIZE],
        [V + 4 * PAGE_SIZE, 2, f[6], RW, "mm", PAGE_SIZE],
        [V + 4 * MiB - PAGE_SIZE, 2, image[0], READ, "client", PAGE_SIZE],
        [VL, 1024, big, READ, "mm", 4 * MiB]]}
    assert k.ok(OP, "mappings", pid=a, vaddr=0, pages=k.core.profile.user_top >> 12) == whole
    # a window cuts segments; max_segments pages through
    part = k.ok(MM, "mappings", pid=a, vaddr=V + 2 * PAGE_SIZE, pages=3)
    assert part["segments"] == [[V + 2 * PAGE_SIZE, 2, f[2], RW, "mm", PAGE_SIZE], [V + 4 * PAGE_SIZE, 1, f[6], RW,
                                                                                     "mm", PAGE_SIZE]]
    got, at = [], 0
    while at is not None:
        page = k.ok(MM, "mappings", pid=a, vaddr=at, pages=(k.core.profile.user_top - at) >> 12, max_segments=1)
        got += page["segments"]
        at = page["rest"]
    assert got == whole["segments"]
    assert k.ok(MM, "mappings", pid=a, vaddr=0, pages=16)["segments"] == []
    # refusals
    k.refused(A, "mappings", Errno.EPERM, pid=a, vaddr=V, pages=1)
    k.refused(MM, "mappings", Errno.ESRCH, pid=99, vaddr=V, pages=1)
    assert k.refused(MM, "mappings", Errno.EINVAL, pid=a, vaddr=V + 1, pages=1).details["field"] == "vaddr"
    k.refused(MM, "mappings", Errno.EINVAL, pid=a, vaddr=V, pages=k.core.profile.user_top >> 12)


@pytest.mark.parametrize("arch, sizes", [("i686", [4 * MiB]), ("i686-pae", [2 * MiB]), ("x86_64", [2 * MiB, GiB])])
def test_hello_tells_the_profile(arch, sizes):
    k = K(arch)
    h = k.ok(MM, "hello")
    assert h["arch"] == arch and h["large_page_sizes"] == sizes
    assert h["kernel_limit"] == (1 << 20 if arch == "i686-pae" else None)


def test_events_are_for_the_mm_and_the_operator_only():
    k = K()
    pids = [k.proc(key) for key in (A, B, C)]
    for p in pids:
        k.ok(MM, "proc_destroy", pid=p)
    k.refused(A, "events", Errno.EPERM)
    assert k.ok(OP, "events") == k.ok(MM, "events")
    ev = k.ok(MM, "events")
    assert [e["pid"] for e in ev["events"]] == pids and ev["latest"] == 3 and ev["lost"] is False
    part = k.ok(MM, "events", since=1, limit=1)
    assert [e["pid"] for e in part["events"]] == [pids[1]] and part["next"] == 2
    assert k.ok(MM, "events", since=3)["events"] == []


def test_unknown_call_and_wrong_identity():
    k = K()
    a = k.proc(A)
    k.proc(B)
    k.refused(A, "frobnicate", Errno.ENOSYS)
    k.refused(MM, "frobnicate", Errno.ENOSYS)
    f = runs(k.user(1))
    k.refused(B, "map", Errno.EPERM, pid=a, vaddr=V, frames=f, prot=READ)
    k.refused(B, "proc_destroy", Errno.EPERM, pid=a)
    k.refused(B, "reclaim", Errno.EPERM, count=1)
    k.refused(B, "frame_info", Errno.EPERM, frames=f)
    k.refused(B, "proc_create", Errno.EPERM, key=C, kernel_quota=2)
    k.refused(B, "mappings", Errno.EPERM, pid=a, vaddr=V, pages=1)
    # the operator reads, and changes nothing
    for call, args in (("donate", {"frames": f}), ("reclaim", {"count": 1}), ("proc_destroy", {"pid": a}),
                       ("map", {"pid": a, "vaddr": V, "frames": f, "prot": READ}),
                       ("unmap", {"pid": a, "vaddr": V, "pages": 1})):
        k.refused(OP, call, Errno.EPERM if call not in ("map", "unmap") else Errno.ESRCH, **args)


# ---- leases (I11) ------------------------------------------------------------------

def test_silent_clients_lose_their_process_any_call_renews():
    k = K(lease=1.0)
    a = k.proc(A, now=0.0)
    b = k.proc(B, now=0.0)
    free0 = k.counts()["kernel_free"]
    k.ok(A, "thread_create", now=0.5)
    f = k.user(2)
    k.ok(MM, "map", pid=a, vaddr=V, frames=runs(f), prot=RW, now=0.5)  # the mm's call renews nothing of A's
    k.refused(A, "thread_destroy", Errno.ESRCH, tid=999, now=0.9)  # a refused call renews too
    out = k.svc.expire(1.5)
    assert [e["pid"] for e in out] == [b] and out[0]["reason"] == "lease"
    k.svc.handle(A, wire.request(1, "ping"), now=1.8)  # through the envelope
    assert k.svc.expire(2.5) == []
    out = k.svc.expire(2.9)
    assert [e["pid"] for e in out] == [a] and out[0]["frames"] == runs(f)
    assert k.core.procs == {} and k.refs(f) == [0, 0]
    assert k.counts()["kernel_free"] == free0 + 4  # all is back: free0 was taken after the two processes
    assert k.core.reserved == 0
    assert [e["reason"] for e in k.ok(MM, "events")["events"]] == ["lease", "lease"]
    assert k.svc.expire(10.0) == [] and k.svc.next_deadline() is None
    k.invariants()


def test_a_stall_of_the_kernel_is_added_to_every_lease():
    k = K(lease=1.0)
    a = k.proc(A, now=0.0)
    b = k.proc(B, now=0.5)
    k.svc.credit_stall(3.0)  # the kernel read no request for 3 s (stopped, or busy): no lease ran meanwhile
    k.svc.credit_stall(-1.0)  # (nothing to credit)
    assert k.svc.next_deadline() == pytest.approx(0.0 + 1.0 + 3.0)
    assert k.svc.expire(3.9) == []
    assert [e["pid"] for e in k.svc.expire(4.1)] == [a]
    k.ok(B, "ping", now=4.4)  # a call renews from its own time on
    assert k.svc.expire(5.3) == [] and k.svc.next_deadline() == pytest.approx(5.4)
    assert [e["pid"] for e in k.svc.expire(5.5)] == [b] and k.svc.next_deadline() is None


# ---- replay (I12) and malformed input (I10) through handle ---------------------------

def reply_of(data: bytes) -> dict:
    return wire.parse_reply(data)


def test_a_retried_request_runs_once():
    k = K()
    k.proc(A)
    req = wire.request(7, "thread_create")
    r1 = k.svc.handle(A, req, now=0.0)
    d = k.core.digest()
    r2 = k.svc.handle(A, req, now=0.1)
    assert r1 == r2 and reply_of(r1)["ok"] is True
    assert len(k.core.procs[1].threads) == 1 and k.core.digest() == d and k.svc.replayed == 1
    # the same id with other bytes is refused and changes nothing
    bad = reply_of(k.svc.handle(A, wire.request(7, "endpoint_create"), now=0.2))
    assert bad["ok"] is False and bad["id"] == 7
    assert Error.from_wire(bad["error"]).code == Errno.EINVAL and k.core.digest() == d
    # another identity's id 7 is its own
    k.proc(B)
    assert reply_of(k.svc.handle(B, req, now=0.3))["ok"] is True
    # a retried donate is not refused as EEXIST: it is not run again
    f = runs(k.user(4))
    dreq = wire.request(1, "donate", {"frames": f})
    first = k.svc.handle(MM, dreq, now=0.4)
    assert reply_of(first)["ok"] is True and k.svc.handle(MM, dreq, now=0.5) == first
    k.invariants()


def test_thousands_of_callers_without_a_process_never_evict_a_live_clients_replies():
    k = K()
    k.proc(A)
    mine = wire.request(7, "thread_create")
    first = k.svc.handle(A, mine, now=0.0)
    f = runs(k.user(2))
    donated = k.svc.handle(MM, wire.request(9, "donate", {"frames": f}), now=0.0)
    places = k.svc.replay.identities
    for i in range(places + 1000):  # each a caller the cache has never seen, with no process
        key = f"S{i:039d}"
        assert reply_of(k.svc.handle(key, wire.request(7, "ping"), now=0.0))["ok"] is True
    assert k.svc.replay.evicted >= 1000 and len(k.svc.replay.replies) <= places + 2
    replayed = k.svc.replayed
    assert k.svc.handle(A, mine, now=0.1) == first  # the retry is answered from the cache, not run again
    assert k.svc.handle(MM, wire.request(9, "donate", {"frames": f}), now=0.1) == donated
    assert k.svc.replayed == replayed + 2 and len(k.core.procs[1].threads) == 1
    k.invariants()


HUGE_RUNS = [[i * 2, 1] for i in range(wire.MAX_RUNS + 1)]


@pytest.mark.parametrize("identity, data, code", [
    (A, b"\xc1\xc1\xc1", Errno.EPROTO),
    (A, b"", Errno.EPROTO),
    (A, wire.encode([1, 2, 3]), Errno.EPROTO),
    (A, wire.encode({"v": 1, "id": "7", "call": "ping", "args": {}}), Errno.EPROTO),
    (A, wire.encode({"v": 1, "id": 7, "call": "ping", "args": {}, "x": 1}), Errno.EPROTO),
    (MM, wire.request(7, "donate", {"frames": "all"}), Errno.EINVAL),
    (MM, wire.request(7, "donate", {"frames": [["1", 1]]}), Errno.EINVAL),
    (MM, wire.request(7, "map", {"pid": 1, "vaddr": 0, "frames": [[500, 1]], "prot": 1.0}), Errno.EINVAL),
    (MM, wire.request(7, "map", {"pid": 1, "vaddr": 0, "frames": [[500, 1]], "prot": 1, "force": 1}), Errno.EINVAL),
    (A, wire.request(7, "reboot"), Errno.ENOSYS),
    (MM, wire.request(7, "donate", {"frames": HUGE_RUNS}), Errno.E2BIG),
    (MM, wire.request(7, "donate", {"frames": HUGE_RUNS[:-2] + [[1, 1, 1]]}), Errno.EINVAL),
    (MM, wire.request(7, "donate", {"frames": [[0, MAX_FRAMES_PER_CALL]]}), Errno.EINVAL),
    (MM, wire.request(7, "reclaim", {"frames": [[5, MAX_FRAMES_PER_CALL]]}), Errno.EINVAL),
    (MM, wire.request(7, "map", {"pid": 1, "vaddr": 0, "frames": [[1, MAX_FRAMES_PER_CALL]], "prot": 1}), Errno.EINVAL),
    (MM, wire.request(7, "frame_info", {"frames": [[0, MAX_FRAMES_PER_CALL]]}), Errno.EINVAL),
    (MM, wire.encode({"v": 1, "id": 7, "call": "ping", "args": {"pad": b"x" * wire.MAX_REQUEST_BYTES}}), Errno.E2BIG),
    (None, wire.request(7, "ping"), Errno.EPERM),
])
def test_malformed_input_gets_a_named_error_and_changes_nothing(identity, data, code):
    k = K()
    k.proc(A)
    d = k.core.digest()
    refused = k.svc.refused
    reply = reply_of(k.svc.handle(identity, data, now=0.0))
    assert reply["ok"] is False and reply["v"] == 1
    err = Error.from_wire(reply["error"])
    assert err.code == code and reply["error"]["errno"] == int(code) and err.message
    assert reply["id"] in (None, 7)
    assert k.core.digest() == d and k.svc.refused == refused + 1
    k.invariants()


# ---- boot at scale ------------------------------------------------------------------

def test_boot_of_16_mi_frames_keeps_the_frame_table_small():
    # 64 GiB of RAM on PAE: the PCI hole moves 0.5 GiB above 64 GiB, which PAE cannot address: the boot
    # map ends at 64 GiB (exactly 2^24 frames), and says what it left out
    k = K("i686-pae", memory=64 * GiB, pool=None, check=False)
    n = k.ft.n
    assert n == 16 << 20
    amap = k.ok(MM, "address_map")
    assert amap["unaddressable"] == 512 * MiB and amap["frames"] == n
    assert max(e["first"] + e["count"] for e in amap["entries"]) == n
    assert "; 0.5 GiB of RAM above 64 GiB not addressable on i686-pae" in k.svc.summary()
    assert k.ft.nbytes() <= 16 * n
    c = k.counts()
    assert sum(v for key, v in c.items() if key != "ram") == c["ram"]
    # donate and reclaim need nothing more: frames below 4 GiB only
    high = n - 1
    k.refused(MM, "donate", Errno.EINVAL, frames=[[high - 9, 10]])
    low = k.user(10)
    assert k.ok(MM, "donate", frames=runs(low))["donated"] == 10
    assert k.ok(MM, "reclaim", frames=runs(low))["reclaimed"] == 10
    assert check_kernel(k.core) == []


@pytest.mark.parametrize("arch, memory, left_out", [("i686", 5 * GiB, 3 * GiB // 2), ("i686", 3 * GiB, 0),
                                                    ("i686-pae", 64 * GiB - 512 * MiB, 0), ("x86_64", 8 * GiB, 0)])
def test_ram_beyond_the_profile_is_left_out_of_the_boot_map(arch, memory, left_out):
    bm = pc_map(get_profile(arch), memory)
    assert bm.unaddressable == left_out
    ram = sum(r.count for r in bm.regions if r.kind != "reserved") + 256  # (the low 1 MiB is RAM too)
    assert ram * PAGE_SIZE == memory - left_out
    assert bm.span * PAGE_SIZE <= get_profile(arch).max_phys
    assert ("not addressable on" in bm.unaddressable_note(arch)) == bool(left_out)


# ---- refusal precedence: which errno wins when a request breaks two rules ------------------------------
#
# Each scenario breaks an earlier and a later rule of a call's documented order (kernel_server.calls:
# COMMON, then CALLS[call].rules). Each breaker alone must give its own rule's refusal (so the scenario
# really breaks both), and both at once the earlier rule's. Overrides are argument changes ("_caller"
# changes who calls; DROP removes an argument); "both" gives the combined request when the two breakers
# change the same argument.

DROP = object()


class Precedence:
    """A kernel with: A (pid a, quota 16) holding two mm pages at V and its own map of a boot-image frame at
    V + 2 pages, and a thread; B (pid b) with a quota of exactly its process (no room for a page table);
    C with no process."""

    def __init__(self) -> None:
        self.k = k = K(memory=32 * MiB, pool=64)
        self.a = k.proc(A)
        self.b = k.proc(B, quota=2)
        f = k.user(4)
        self.mapped, self.free_user = f[0], f[3]
        k.ok(MM, "map", pid=self.a, vaddr=V, frames=runs(f[:2]), prot=RW)
        self.image = k.of_kind(KERNEL_SHARED)[:4]
        k.ok(A, "map", vaddr=V + 2 * PAGE_SIZE, frames=[[self.image[0], 1]], prot=READ)
        self.thread_frame = k.core.procs[self.a].threads[k.ok(A, "thread_create")["tid"]]
        self.kfree = k.ft.free_list()[0]
        self.block = k.block(1024)
        self.n = k.ft.n
        self.top = k.core.profile.user_top

    def refused(self, call: str, caller: str, base: dict, over: dict, rule) -> Error:
        """The request ``base`` changed by ``over`` is refused by ``rule`` (its errno and its words), and
        changes nothing (K.refused)."""
        args = dict(base)
        for key, value in over.items():
            if key == "_caller":
                caller = value
            elif value is DROP:
                args.pop(key, None)
            else:
                args[key] = value
        e = self.k.refused(caller, call, rule.errno, **args)
        assert rule.says in e.message, (call, rule.name, e)
        return e


def _scenarios(p: Precedence) -> list[tuple]:
    """(call, caller, base args, (early rule, overrides), (late rule, overrides), overrides for both or None)."""
    v8 = V + 8 * PAGE_SIZE  # free, in A's page table
    mm_map = {"pid": p.a, "vaddr": v8, "frames": [[p.free_user, 1]], "prot": READ}
    own_map = {"vaddr": V + 16 * PAGE_SIZE, "frames": [[p.image[1], 1]], "prot": READ}
    mm_unmap = {"pid": p.a, "vaddr": V, "pages": 1}
    own_unmap = {"vaddr": V + 2 * PAGE_SIZE, "pages": 1}
    donate = {"frames": [[p.free_user, 1]]}
    reclaim = {"frames": [[p.kfree, 1]]}
    create = {"key": "D" * 40, "kernel_quota": 2}
    wx = {"prot": WRITE | EXEC}
    return [
        # what every call goes through
        ("donate", MM, donate, ("caller", {"_caller": A}), ("args", {"frames": "all"}), None),
        ("events", MM, {}, ("caller", {"_caller": A}), ("args", {"limit": 0}), None),
        ("thread_destroy", A, {"tid": 1}, ("caller_process", {"_caller": C}), ("args", {"tid": "1"}), None),
        ("map", MM, mm_map, ("args", {"prot": 0}), ("no_process", {"pid": 99}), None),
        # map by the mm
        ("map", MM, mm_map, ("pid_missing", {"pid": DROP}), ("write_exec", wx), None),
        ("map", MM, mm_map, ("no_process", {"pid": 99}), ("write_exec", wx), None),
        ("map", MM, mm_map, ("write_exec", wx), ("alignment", {"vaddr": v8 + 8}), None),
        ("map", MM, mm_map, ("page_size", {"page_size": 8192}), ("beyond_memory", {"frames": [[p.n, 1]]}), None),
        ("map", MM, mm_map, ("alignment", {"vaddr": v8 + 8}), ("beyond_memory", {"frames": [[p.n, 1]]}), None),
        ("map", MM, mm_map, ("user_space", {"vaddr": p.top}), ("not_ram", {"frames": [[0, 1]]}), None),
        ("map", MM, mm_map, ("beyond_memory", {"frames": [[p.n, 1]]}), ("quota", {"pid": p.b}), None),
        ("map", MM, mm_map, ("large_shape", {"large": True, "vaddr": VL, "frames": [[p.block + 1, 1024]]}),
         ("busy", {"vaddr": V}), {"large": True, "vaddr": V - V % (4 * MiB), "frames": [[p.block + 1, 1024]]}),
        ("map", MM, mm_map, ("quota", {"pid": p.b}), ("not_ram", {"frames": [[0, 1]]}), None),
        ("map", MM, mm_map, ("quota", {"pid": p.b}), ("kernel_owned", {"frames": [[p.kfree, 1]]}), None),
        ("map", MM, mm_map, ("not_ram", {"frames": [[0, 1]]}), ("busy", {"vaddr": V}), None),
        ("map", MM, mm_map, ("kernel_owned", {"frames": [[p.kfree, 1]]}), ("busy", {"vaddr": V}), None),
        ("map", MM, mm_map, ("shared_read_only", {"frames": [[p.image[1], 1]], "prot": RW}),
         ("busy", {"vaddr": V}), None),
        # map by a client, into itself
        ("map", A, own_map, ("client_size", {"frames": [[p.image[0], 1]] * (MAX_CLIENT_RUNS + 1)}),
         ("args", {"prot": 0}), None),
        ("map", A, own_map, ("client_size", {"frames": [[p.image[0], 1]] * (MAX_CLIENT_RUNS + 1)}),
         ("other_process", {"pid": p.b}), None),
        ("map", A, own_map, ("no_process", {"_caller": C}), ("write_exec", wx), None),
        ("map", A, own_map, ("client_size", {"frames": [[p.image[0], 128]] * 3}), ("write_exec", wx), None),
        ("map", A, own_map, ("write_exec", wx), ("client_not_shared", {"frames": [[p.free_user, 1]]}), None),
        ("map", A, own_map, ("client_not_shared", {"frames": [[p.free_user, 1]]}),
         ("busy", {"vaddr": V + 2 * PAGE_SIZE}), None),
        ("map", A, own_map, ("shared_read_only", {"prot": RW}), ("busy", {"vaddr": V + 2 * PAGE_SIZE}), None),
        # unmap
        ("unmap", MM, mm_unmap, ("no_process", {"pid": 99}), ("alignment", {"vaddr": V + 1}), None),
        ("unmap", MM, mm_unmap, ("alignment", {"vaddr": V + 1}), ("user_space", {"pages": p.top >> 12}), None),
        ("unmap", MM, mm_unmap, ("user_space", {"pages": p.top >> 12}), ("hole", {"vaddr": V + 100 * PAGE_SIZE}),
         None),
        ("unmap", A, own_unmap, ("client_size", {"pages": MAX_CLIENT_PAGES + 1}), ("other_process", {"pid": p.b}),
         None),
        ("unmap", A, own_unmap, ("client_size", {"pages": MAX_CLIENT_PAGES + 1}), ("alignment", {"vaddr": V + 1}),
         None),
        ("unmap", A, own_unmap, ("hole", {"pages": 2}), ("made_by_mm", {"vaddr": V + PAGE_SIZE, "pages": 2}),
         {"vaddr": V + PAGE_SIZE, "pages": 3}),
        # donate
        ("donate", MM, donate, ("beyond_memory", {"frames": [[p.n - 1, 2]]}),
         ("duplicate", {"frames": [[p.free_user, 1], [p.free_user, 1]]}), {"frames": [[p.n - 1, 2], [p.n - 1, 1]]}),
        ("donate", MM, donate, ("duplicate", {"frames": [[p.free_user, 1], [p.free_user, 1]]}),
         ("not_ram", {"frames": [[0, 1]]}), {"frames": [[0, 1], [0, 1]]}),
        ("donate", MM, donate, ("not_ram", {"frames": [[0, 1]]}), ("kernel_owned", {"frames": [[p.kfree, 1]]}),
         {"frames": [[p.kfree, 1], [0, 1]]}),
        ("donate", MM, donate, ("kernel_owned", {"frames": [[p.kfree, 1]]}), ("mapped", {"frames": [[p.mapped, 1]]}),
         {"frames": [[p.mapped, 1], [p.kfree, 1]]}),
        # reclaim
        ("reclaim", MM, reclaim, ("not_ram", {"frames": [[0, 1]]}), ("user_owned", {"frames": [[p.free_user, 1]]}),
         {"frames": [[p.free_user, 1], [0, 1]]}),
        ("reclaim", MM, reclaim, ("user_owned", {"frames": [[p.free_user, 1]]}),
         ("in_use", {"frames": [[p.thread_frame, 1]]}), {"frames": [[p.thread_frame, 1], [p.free_user, 1]]}),
        ("reclaim", MM, reclaim, ("in_use", {"frames": [[p.thread_frame, 1]]}),
         ("reserved", {"frames": [[f, 1] for f in sorted(p.k.ft.free_list())]}),
         {"frames": [[f, 1] for f in sorted(p.k.ft.free_list() + [p.thread_frame])]}),
        # proc_create
        ("proc_create", MM, create, ("caller", {"_caller": OP}), ("server_key", {"key": MM}), None),
        ("proc_create", MM, create, ("server_key", {"key": MM}), ("quota_below_cost", {"kernel_quota": 1}), None),
        ("proc_create", MM, create, ("has_process", {"key": A}), ("quota_below_cost", {"kernel_quota": 1}), None),
        ("proc_create", MM, create, ("has_process", {"key": A}), ("pool", {"kernel_quota": 1 << 20}), None),
    ]


def test_when_two_rules_break_the_documented_earlier_one_wins():
    from kernel_server.calls import CALLS, COMMON

    p = Precedence()
    scenarios = _scenarios(p)
    for call, caller, base, (early, e_over), (late, l_over), both in scenarios:
        spec = CALLS[call]
        order = [r.name for r in COMMON + spec.rules]
        assert order.index(early) < order.index(late), (call, early, late)
        p.refused(call, caller, base, e_over, spec.rule(early))
        p.refused(call, caller, base, l_over, spec.rule(late))
        p.refused(call, caller, base, both if both is not None else {**l_over, **e_over}, spec.rule(early))
    assert len(scenarios) >= 35


def test_the_call_table_is_the_dispatch():
    from kernel_server.calls import ADAPTERS, CALLS, MUTATING, Who

    k = K()
    assert set(CALLS) == set(ADAPTERS) == set(k.core._dispatch)
    for name, spec in CALLS.items():
        names = [r.name for r in spec.rules]
        assert len(names) == len(set(names)), name  # one rule, one name
        if spec.who is Who.MM:  # the caller's rule is the table's: a client is refused with the same words
            assert f"only the memory manager may {spec.verb}" == k.core.refuse_caller(A, name).message
        elif spec.who is Who.READER:
            assert "the operator" in k.core.refuse_caller(A, name).message and k.core.refuse_caller(OP, name) is None
        elif spec.who is Who.PROCESS:
            assert k.core.refuse_caller(C, name).code == Errno.ESRCH
        else:
            assert k.core.refuse_caller(C, name) is None
    assert MUTATING == {"proc_create", "proc_destroy", "donate", "reclaim", "map", "unmap", "thread_create",
                        "thread_destroy", "endpoint_create", "endpoint_destroy"}


# ---- the worst requests (bench.kernel.worst_catalog): refused as they must be, replies bounded ------------

def test_the_worst_requests_get_their_answers_and_bounded_replies():
    """The benchmark's catalog of the costliest requests (timed there, never here): each is refused with
    its errno or answered, within the reply limit, and a refused one changes nothing."""
    from bench.kernel import worst_catalog

    svc, cat, ordinary = worst_catalog()
    assert {w.who for w in cat} == {"client", "privileged"} and len(cat) >= 25
    for i, w in enumerate(cat):
        before = svc.core.digest()
        data = w.make(2 * i + 1)
        raw = svc.handle(w.identity, data, now=0.0)
        assert len(raw) <= wire.MAX_REPLY_BYTES, w.name
        reply = reply_of(raw)
        if w.expect is None:
            assert reply["ok"] is True, (w.name, reply)
            if w.undo is not None:
                assert reply_of(svc.handle(w.identity, w.undo(2 * i + 2), now=0.0))["ok"] is True, w.name
        else:
            assert reply["ok"] is False and reply["error"]["code"] == w.expect, (w.name, reply)
            assert svc.core.digest() == before, f"refused {w.name} changed the kernel"
        assert check_kernel(svc.core) == [], w.name
    m, u = ordinary(10_000)
    assert reply_of(svc.handle(MM, m, now=0.0))["ok"] and reply_of(svc.handle(MM, u, now=0.0))["ok"]


# ---- replies stay bounded -------------------------------------------------------------------------------

def test_events_stop_at_a_byte_budget_and_list_at_most_so_many_runs_per_process():
    from kernel_server.core import EVENT_RUNS, EVENTS_BYTES

    k = K(memory=64 * MiB, pool=256, check=False)
    scattered = k.user(2 * (EVENT_RUNS + 44))[::2]  # every other free frame: one run each
    pids = []
    for i in range(100):
        pid = k.proc(f"{i:040d}", quota=3)
        k.ok(MM, "map", pid=pid, vaddr=V, frames=[[f, 1] for f in scattered], prot=READ)
        k.ok(MM, "proc_destroy", pid=pid)
        pids.append(pid)
    k.invariants()
    ev = k.ok(MM, "events", limit=1000)
    got = ev["events"]
    assert 0 < len(got) < 100 and ev["next"] == got[-1]["seq"] < ev["latest"] == 100
    assert len(wire.encode(ev)) < min(2 * EVENTS_BYTES, wire.MAX_REPLY_BYTES)
    first = got[0]
    assert first["truncated"] is True and first["frames"] == [[f, 1] for f in scattered[:EVENT_RUNS]]
    seen = [e["pid"] for e in got]
    while ev["next"] < ev["latest"]:  # the mm reads on from ``next``
        ev = k.ok(MM, "events", since=ev["next"], limit=1000)
        seen += [e["pid"] for e in ev["events"]]
    assert seen == pids


def test_unmap_and_reclaim_replies_list_at_most_so_many_runs():
    from kernel_server.core import REPLY_RUNS

    k = K(memory=128 * MiB, pool=64, check=False)
    a = k.proc(A, quota=64)
    every_other = k.user(2 * (REPLY_RUNS + 100))[::2]
    for i in range(0, len(every_other), 1000):  # (at most MAX_RUNS runs a call)
        part = every_other[i:i + 1000]
        k.ok(MM, "map", pid=a, vaddr=V + i * PAGE_SIZE, frames=[[f, 1] for f in part], prot=READ)
    r = k.ok(MM, "unmap", pid=a, vaddr=V, pages=len(every_other))
    assert r["pages"] == len(every_other) and r["truncated"] is True
    assert r["frames"] == [[f, 1] for f in every_other[:REPLY_RUNS]]
    assert set(k.refs(every_other)) == {0}
    # scattered free kernel frames: a reclaim by count takes no more runs than a reply lists
    for f in every_other:
        k.ok(MM, "donate", frames=[[f, 1]])
    want = k.core.unreserved()
    r = k.ok(MM, "reclaim", count=want)
    assert len(r["frames"]) <= REPLY_RUNS and r["reclaimed"] < want
    r2 = k.ok(MM, "reclaim", count=want)
    assert r["reclaimed"] + r2["reclaimed"] == want and k.core.unreserved() == 0
    k.invariants()


def test_frame_info_looks_at_so_many_frames_per_call():
    from kernel_server.core import FRAME_INFO_SCAN

    k = K(memory=512 * MiB, pool=64, check=False)
    n = k.ft.n
    assert n > FRAME_INFO_SCAN
    part = k.ok(MM, "frame_info", frames=[[0, n]])
    assert part["rest"] == [[FRAME_INFO_SCAN, n - FRAME_INFO_SCAN]]
    got, ask = part["segments"], part["rest"]
    while ask:
        part = k.ok(MM, "frame_info", frames=ask)
        got += part["segments"]
        ask = part["rest"]
    kinds = np.zeros(n, dtype=np.uint8)
    names = {"none": 0, "kernel_free": 1, "kernel_used": 2, "kernel_shared": 3, "user": 4}
    for first, count, kind, _refs in got:
        kinds[first:first + count] = names[kind]
    assert np.array_equal(kinds, k.ft.kind)
