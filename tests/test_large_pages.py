"""Large pages (docs/large-pages.md): the kernel's rules per profile, through the in-process
kernel service; a property test mixing small and large maps with the invariant checker after
every step; and the mm's side: aligned large allocations, block-keeping placement, reclaim
that gives whole blocks back, journal replay, and pageblock against first fit after churn."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.largepages import churn
from kernel_server.frames import USER
from kernel_server.invariants import check_kernel
from kernel_server.service import KernelService
from mm_service import placement
from mm_service import records as J
from mm_service.policy import Config, MMCore, drive
from mm_service.view import View
from protocol import runs as R
from protocol.calls import MM_CALLS, validate
from protocol.errors import Errno, Error

MM = "M" * 40
A = "A" * 40
B = "B" * 40
MiB, GiB = 1 << 20, 1 << 30
SIZES = {"i686": [4 * MiB], "i686-pae": [2 * MiB], "x86_64": [2 * MiB, 1 * GiB]}
V0 = 0x4000_0000  # a virtual address aligned to every large page size


class Kernel:
    """A booted kernel service with one process, and helpers for map/unmap/donate."""

    def __init__(self, arch: str, memory: int = 64 * MiB, pool: int = 64, quota: int = 16) -> None:
        self.k = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=pool)
        self.core = self.k.core
        self.large = min(self.k.call(MM, "hello")["large_page_sizes"])
        self.n = self.large // 4096  # frames per (smallest) large page
        self.pid = self.k.call(MM, "proc_create", {"key": A, "kernel_quota": quota})["pid"]

    def call(self, name: str, **args):
        return self.k.call(MM, name, args)

    def map(self, vaddr: int, first: int, count: int, pid: int | None = None, **kw):
        return self.call("map", pid=pid or self.pid, vaddr=vaddr, frames=[[first, count]], prot=3, **kw)

    def unmap(self, vaddr: int, pages: int, pid: int | None = None):
        return self.call("unmap", pid=pid or self.pid, vaddr=vaddr, pages=pages)

    def user_block(self, k: int = 0) -> int:
        """The first frame of the k-th large-page-aligned run whose frames are all user-owned."""
        kinds = self.core.frames.kind
        found = 0
        for first in range(0, self.core.frames.n - self.n + 1, self.n):
            if np.all(kinds[first:first + self.n] == USER):
                if found == k:
                    return first
                found += 1
        raise AssertionError("no such user block")

    def refs(self, first: int, count: int) -> np.ndarray:
        return self.core.frames.refs[first:first + count]


def assert_refused(result, code: Errno, k: Kernel | None = None, digest: str | None = None) -> Error:
    assert isinstance(result, Error), result
    assert result.code == code, result
    if k is not None:
        assert k.core.digest() == digest, "a refused call changed kernel state (I6)"
    return result


PROFILES = ["i686", "i686-pae", "x86_64"]


# ---- the kernel's rules ------------------------------------------------------------


@pytest.mark.parametrize("arch", PROFILES)
def test_sizes_per_profile(arch):
    k = Kernel(arch)
    assert k.call("hello")["large_page_sizes"] == SIZES[arch]
    f = k.user_block()
    r = k.map(V0, f, k.n, large=True)
    assert r["pages"] == k.n
    assert k.call("stats")["per_process"][0]["large_pages"] == 1
    # the same size named in bytes is the same thing
    r2 = k.map(V0 + k.large, k.user_block(1), k.n, page_size=k.large)
    assert isinstance(r2, dict) and k.call("stats")["per_process"][0]["large_pages"] == 2
    # a size the profile lacks
    other = 4 * MiB if arch != "i686" else 2 * MiB
    e = assert_refused(k.map(V0 + 8 * k.large, k.user_block(2), other // 4096, page_size=other), Errno.EINVAL)
    assert e.details.get("field") == "page_size"
    assert check_kernel(k.core) == []


@pytest.mark.parametrize("arch", PROFILES)
def test_alignment_and_contiguity(arch):
    k = Kernel(arch)
    f = k.user_block()
    d = k.core.digest()
    e = assert_refused(k.map(V0 + 4096, f, k.n, large=True), Errno.EINVAL, k, d)
    assert e.details["field"] == "vaddr"
    e = assert_refused(k.map(V0, f + 1, k.n, large=True), Errno.EINVAL, k, d)  # frames not aligned
    assert e.details["field"] == "frames"
    e = assert_refused(k.map(V0, f, k.n - 1, large=True), Errno.EINVAL, k, d)  # not a whole large page
    assert e.details["field"] == "frames"
    split = [[f, k.n // 2], [f + k.n // 2 + 1, k.n // 2]]  # right count, not contiguous
    e = assert_refused(k.call("map", pid=k.pid, vaddr=V0, frames=split, prot=3, large=True), Errno.EINVAL, k, d)
    assert e.details["field"] == "frames"
    assert isinstance(k.map(V0, f, k.n, large=True), dict)


@pytest.mark.parametrize("arch", PROFILES)
def test_every_frame_must_be_user_owned(arch):
    k = Kernel(arch)
    # the block holding the kernel image (kernel-shared) at 16 MiB: refused even read-only
    image = k.core.bootmap.of_kind("kernel_image")[0].first
    base = image - image % k.n
    d = k.core.digest()
    e = assert_refused(k.call("map", pid=k.pid, vaddr=V0, frames=[[base, k.n]], prot=1, large=True),
                       Errno.EPERM, k, d)
    assert image in R.to_array(e.details["frames"])
    # a donated frame inside an otherwise user block: EPERM naming it
    f = k.user_block()
    assert isinstance(k.call("donate", frames=[[f + 7, 1]]), dict)
    d = k.core.digest()
    e = assert_refused(k.map(V0, f, k.n, large=True), Errno.EPERM, k, d)
    assert e.details["frames"] == [[f + 7, 1]]
    # a client maps no large pages itself (one is more than a client's call may map), and W+X stays refused
    g = k.user_block(1)
    assert_refused(k.k.call(A, "map", {"vaddr": V0, "frames": [[g, k.n]], "prot": 1, "large": True}), Errno.E2BIG, k, d)
    assert_refused(k.call("map", pid=k.pid, vaddr=V0, frames=[[g, k.n]], prot=6, large=True), Errno.ENOTSUP, k, d)


@pytest.mark.parametrize("arch", PROFILES)
def test_refcount_on_each_frame_and_unmap_whole(arch):
    k = Kernel(arch)
    pid2 = k.call("proc_create", key=B, kernel_quota=16)["pid"]
    f = k.user_block()
    assert isinstance(k.map(V0, f, k.n, large=True), dict)
    assert np.all(k.refs(f, k.n) == 1)
    # the same frames, once more as a large page and once as small pages elsewhere
    assert isinstance(k.map(V0, f, k.n, pid=pid2, large=True), dict)
    assert isinstance(k.map(V0 + 4 * k.large, f, 3), dict)
    assert np.all(k.refs(f + 3, k.n - 3) == 2) and np.all(k.refs(f, 3) == 3)
    assert check_kernel(k.core) == []
    # partial unmap of a large page: EINVAL, nothing changes
    d = k.core.digest()
    e = assert_refused(k.unmap(V0, k.n - 1), Errno.EINVAL, k, d)
    assert e.details["vaddr"] == V0
    assert_refused(k.unmap(V0 + 4096, 1), Errno.EINVAL, k, d)
    assert_refused(k.unmap(V0 - 4096, k.n), Errno.EINVAL, k, d)  # starts before it, cuts it
    r = k.unmap(V0, k.n)
    assert r["pages"] == k.n and r["frames"] == [[f, k.n]]
    assert np.all(k.refs(f + 3, k.n - 3) == 1)
    # an unmap range may hold small and large mappings, each large one whole
    g = k.user_block(1)
    assert isinstance(k.map(V0 + k.large, g, k.n, large=True), dict)
    assert isinstance(k.map(V0 + 2 * k.large, g, 5), dict)
    r = k.unmap(V0 + k.large, k.n + 5)
    assert r["pages"] == k.n + 5
    assert np.all(k.refs(g, k.n) == 0)
    assert check_kernel(k.core) == []


@pytest.mark.parametrize("arch", PROFILES)
def test_ebusy_over_existing_mappings(arch):
    k = Kernel(arch)
    f, g = k.user_block(), k.user_block(1)
    assert isinstance(k.map(V0 + 5 * 4096, g, 1), dict)  # a small page inside the range
    d = k.core.digest()
    e = assert_refused(k.map(V0, f, k.n, large=True), Errno.EBUSY, k, d)
    assert e.details["vaddr"] == V0
    assert isinstance(k.unmap(V0 + 5 * 4096, 1), dict)  # its page table went with it
    assert isinstance(k.map(V0, f, k.n, large=True), dict)
    d = k.core.digest()
    assert_refused(k.map(V0, g, k.n, large=True), Errno.EBUSY, k, d)  # large over large
    e = assert_refused(k.map(V0 + k.large - 4096, g, 1), Errno.EBUSY, k, d)  # small over large
    assert e.details["vaddr"] == V0
    assert_refused(k.map(V0 + k.large - 4096, g, 2), Errno.EBUSY, k, d)  # small run reaching into it
    assert check_kernel(k.core) == []


@pytest.mark.parametrize("arch", PROFILES)
def test_donating_a_frame_of_a_mapped_large_page_is_ebusy(arch):
    k = Kernel(arch)
    f = k.user_block()
    assert isinstance(k.map(V0, f, k.n, large=True), dict)
    d = k.core.digest()
    e = assert_refused(k.call("donate", frames=[[f + k.n - 1, 1]]), Errno.EBUSY, k, d)
    assert e.details["frames"] == [[f + k.n - 1, 1]]
    g = k.user_block(1)
    e = assert_refused(k.call("donate", frames=[[g, 4], [f + 2, 2]]), Errno.EBUSY, k, d)  # all or nothing
    assert e.details["frames"] == [[f + 2, 2]]
    assert isinstance(k.unmap(V0, k.n), dict)
    assert isinstance(k.call("donate", frames=[[f + k.n - 1, 1]]), dict)
    assert check_kernel(k.core) == []


@pytest.mark.parametrize("arch", PROFILES)
def test_a_large_page_needs_no_leaf_table(arch):
    k = Kernel(arch)
    levels = k.core.profile.levels
    f = k.user_block()
    r = k.map(V0, f, k.n, large=True)
    small_pid = k.call("proc_create", key=B, kernel_quota=16)["pid"]
    s = k.map(V0, f, k.n, pid=small_pid)
    # a fresh address space: the small pages need every level below the root, the large page one less
    assert s["tables_allocated"] == levels - 1
    assert r["tables_allocated"] == levels - 2
    per = {p["pid"]: p for p in k.call("stats")["per_process"]}
    assert per[small_pid]["tables"] - per[k.pid]["tables"] == 1
    # unmapping the large page frees the tables it needed; the kernel gets them back
    before = k.core.frames.free_count
    u = k.unmap(V0, k.n)
    assert u["tables_freed"] == levels - 2 and k.core.frames.free_count == before + levels - 2
    assert check_kernel(k.core) == []


def test_one_gib_pages_on_x86_64():
    k = Kernel("x86_64", memory=3 * GiB)
    G = GiB // 4096
    assert np.all(k.core.frames.kind[G:2 * G] == k.core.frames.kind[G])
    e = assert_refused(k.map(V0, G + k.n, G, page_size=GiB), Errno.EINVAL)  # 2 MiB-aligned only
    assert e.details["field"] == "frames"
    r = k.map(GiB, G, G, page_size=GiB)
    assert r["pages"] == G and r["tables_allocated"] == 1  # only the PDPT: no PD, no page tables
    assert np.all(k.refs(G, G) == 1)
    d = k.core.digest()
    assert_refused(k.map(GiB + 64 * MiB, k.user_block(), k.n, large=True), Errno.EBUSY, k, d)  # 2 MiB inside
    assert_refused(k.unmap(GiB, G // 2), Errno.EINVAL, k, d)
    assert_refused(k.call("donate", frames=[[G + 12345, 1]]), Errno.EBUSY, k, d)
    assert check_kernel(k.core) == []
    u = k.unmap(GiB, G)
    assert u["pages"] == G and u["tables_freed"] == 1 and np.all(k.refs(G, G) == 0)
    assert check_kernel(k.core) == []


# ---- property: small and large maps, unmaps, donations and reclaims --------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("large"), st.integers(0, 1), st.integers(0, 3), st.integers(0, 8), st.booleans()),
    st.tuples(st.just("small"), st.integers(0, 1), st.integers(0, 3), st.integers(0, 7), st.integers(0, 8),
              st.integers(1, 4)),
    st.tuples(st.just("unmap"), st.integers(0, 1), st.integers(0, 63), st.sampled_from(["exact", "short", "slot"])),
    st.tuples(st.just("donate"), st.integers(0, 8), st.integers(0, 7), st.integers(1, 8)),
    st.tuples(st.just("reclaim"), st.integers(1, 16)),
), min_size=1, max_size=30)


@given(arch=st.sampled_from(PROFILES), ops=OPS)
def test_mixed_small_and_large_keep_the_invariants(arch, ops):
    k = Kernel(arch, memory=32 * MiB, pool=16, quota=7)  # the two quotas fill the pool: ENOMEM is a quota's
    pids = [k.pid, k.call("proc_create", key=B, kernel_quota=7)["pid"]]
    n = k.n
    vaddr = lambda slot, page=0: V0 + slot * k.large + page * 4096
    for op in ops:
        kind = op[0]
        if kind == "large":
            _, p, slot, block, by_size = op
            extra = {"page_size": k.large} if by_size else {"large": True}
            r = k.map(vaddr(slot), block * n, n, pid=pids[p], **extra)
        elif kind == "small":
            _, p, slot, page, block, count = op
            r = k.map(vaddr(slot, page * (n // 8)), block * n + page, count, pid=pids[p])
        elif kind == "unmap":  # one of the process's mappings: exactly, short of its end, or its whole slot
            _, p, i, how = op
            proc = k.core.procs[pids[p]]
            maps = sorted([(vp, 1) for vp in proc.pages] + [(vp, n) for vp in proc.large])
            if not maps:
                continue
            vp, pages = maps[i % len(maps)]
            if how == "slot":
                vp, pages = vp - vp % n, n
            r = k.unmap(vp * 4096, pages - (how == "short"), pid=pids[p])
        elif kind == "donate":
            _, block, page, count = op
            r = k.call("donate", frames=[[block * n + page * (n // 8), count]])
        else:
            r = k.call("reclaim", count=op[1])
        if isinstance(r, Error):
            assert r.code in (Errno.EINVAL, Errno.EPERM, Errno.EBUSY, Errno.EEXIST, Errno.ENOMEM), r
            if r.code == Errno.ENOMEM:  # only ever past the process's own quota
                assert r.details["used"] + r.details["needed"] > r.details["limit"], r
        problems = check_kernel(k.core)
        assert problems == [], (op, problems)


def test_refused_large_calls_change_nothing():
    """I6 for the large-page refusals the property test hits, checked by digest."""
    k = Kernel("i686-pae", memory=32 * MiB, pool=16)
    f = k.user_block()
    assert isinstance(k.map(V0, f, k.n, large=True), dict)
    for bad in (lambda: k.map(V0, f, k.n, large=True), lambda: k.unmap(V0, 3),
                lambda: k.call("donate", frames=[[f, k.n]]), lambda: k.map(V0 + 4096, f, 1)):
        d = k.core.digest()
        assert isinstance(bad(), Error)
        assert k.core.digest() == d


# ---- the mm's side -----------------------------------------------------------------


class World:
    """A kernel service, an mm core on it, the journal the mm wrote, and its kernel calls. Each key's user
    quota is ``quotas[key]`` (default 2000 pages): the mm grants no more than exists, so a test that has one
    client take most of memory says so."""

    def __init__(self, arch: str = "i686-pae", memory: int = 64 * MiB, pool: int = 64,
                 config: Config | None = None) -> None:
        self.kernel = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=pool)
        self.address_map = self.kernel.call(MM, "address_map")
        self.quotas: dict[str, int] = {}
        self.mm = MMCore(self.address_map, self.kernel.call(MM, "hello"),
                         config or Config(low=8, target=32, high=128),
                         admission=lambda key: SimpleNamespace(quota=self.quotas.get(key, 2000), kernel_quota=None))
        self.journal: list[dict] = []
        self.kcalls: list[tuple[str, dict]] = []
        self.run(self.mm.refresh())

    def kcall(self, call: str, args: dict):
        self.kcalls.append((call, args))
        return self.kernel.call(MM, call, args)

    def run(self, gen):
        return drive(gen, self.kcall, self.journal.extend)

    def req(self, key: str, call: str, **args):
        result = self.run(self.mm.request(key, call, validate(MM_CALLS, call, args)))
        self.run(self.mm.maintain())
        return result

    def die(self, key: str) -> None:
        self.kernel.call(MM, "proc_destroy", {"pid": self.mm.view.clients[key].pid})
        self.run(self.mm.poll_events())
        self.run(self.mm.refresh())

    def blocks_of(self, runs) -> set[int]:
        return set((R.to_array(runs) // self.mm.view.block).tolist())

    def fill_spoilt(self, key: str = "F" * 40) -> None:
        """Take every free frame of the blocks that can never be large pages (placement uses them first)."""
        v = self.mm.view
        self.quotas[key] = int(v.bfree[v.never_whole].sum())
        for first in (True, False):  # (the first alloc makes the process, which may cost a donation)
            spare = 1 if first else int(v.bfree[v.never_whole].sum())
            r = self.req(key, "alloc", pages=spare, prot=3)
            assert isinstance(r, dict) and all(v.never_whole[b] for b in self.blocks_of(r["frames"]))
        assert v.bfree[v.never_whole].sum() == 0


def test_alloc_large_gives_aligned_runs():
    w = World()
    v = w.mm.view
    r = w.req(A, "alloc", pages=2 * v.block, prot=3, large=True)
    assert r["vaddr"] % w.mm.large_bytes == 0
    frames = R.to_array(r["frames"])
    pages = frames.reshape(-1, v.block)
    assert np.all(pages[:, 0] % v.block == 0) and np.all(pages - pages[:, :1] == np.arange(v.block))
    proc = w.kernel.core.procs[v.clients[A].pid]
    assert len(proc.large) == 2 and not proc.pages
    assert np.all(w.kernel.core.frames.refs[frames] == 1)
    assert w.run(w.mm.audit())["divergences"] == 0
    # a large alloc that is not a whole number of large pages, and one with no whole block left
    assert w.req(A, "alloc", pages=v.block + 1, prot=3, large=True).code == Errno.EINVAL
    whole = v.counts()["free_large_blocks"]
    w.quotas[B] = (whole + 1) * v.block  # (within its quota: the blocks are what is missing)
    e = w.req(B, "alloc", pages=(whole + 1) * v.block, prot=3, large=True)
    assert e.code == Errno.ENOMEM and "large-aligned" in e.message
    f = w.req(A, "free", vaddr=r["vaddr"], pages=2 * v.block)
    assert f["frames"] == r["frames"] and not proc.large


def test_an_owners_small_pages_gather_and_leave_whole_blocks():
    w = World(pool=256, config=Config(low=8, target=32, high=1024))  # room in the pool for both kernel quotas
    v = w.mm.view
    w.fill_spoilt()
    whole = v.counts()["free_large_blocks"]
    got = {A: [], B: []}
    for i in range(60):  # two clients allocate small pieces, interleaved
        for key in (A, B):
            r = w.req(key, "alloc", pages=1 + i % 3, prot=3)
            got[key].append(r)
    a = set().union(*(w.blocks_of(r["frames"]) for r in got[A]))
    b = set().union(*(w.blocks_of(r["frames"]) for r in got[B]))
    assert len(a) == 1 and len(b) == 1 and a != b  # 120 pages each: one block each, not shared
    assert v.counts()["free_large_blocks"] == whole - 2
    for r in got[A]:  # A frees everything: its block is a large page again
        w.req(A, "free", vaddr=r["vaddr"], pages=r["pages"])
    assert v.counts()["free_large_blocks"] == whole - 1
    w.die(B)  # B dies: its block comes back too
    assert v.counts()["free_large_blocks"] == whole
    assert w.run(w.mm.audit())["divergences"] == 0


def test_first_fit_mixes_owners_in_the_same_blocks():
    """The comparison policy really is different: interleaved owners share blocks."""
    w = World(config=Config(low=8, target=32, high=128, placement="first-fit"))
    got = {A: [], B: []}
    for i in range(60):
        for key in (A, B):
            got[key].append(w.req(key, "alloc", pages=1 + i % 3, prot=3))
    a = set().union(*(w.blocks_of(r["frames"]) for r in got[A]))
    b = set().union(*(w.blocks_of(r["frames"]) for r in got[B]))
    assert a & b


def test_donations_gather_in_kernel_blocks_and_reclaim_gives_whole_blocks_back():
    w = World(pool=0, config=Config(low=8, target=32, high=128))
    v = w.mm.view
    w.fill_spoilt()
    whole = v.counts()["free_large_blocks"]
    n1 = w.run(w.mm._donate(100))
    n2 = w.run(w.mm._donate(100))
    w.run(w.mm.flush())
    assert n1 == n2 == 100
    donated = [a["frames"] for c, a in w.kcalls if c == "donate"][-2:]
    assert len(w.blocks_of(donated[0] + donated[1])) == 1  # one kernel block, not two
    assert v.counts()["free_large_blocks"] == whole - 1
    # the kernel now holds too much: the mm reclaims, naming the frames that make its block whole
    w.run(w.mm.refresh())
    w.run(w.mm.maintain())
    reclaims = [a for c, a in w.kcalls if c == "reclaim"]
    assert reclaims and "frames" in reclaims[-1]
    assert v.counts()["free_large_blocks"] == whole
    assert w.kernel.core.frames.free_count >= w.mm.config.low
    assert w.run(w.mm.audit())["divergences"] == 0


def test_an_older_owner_takes_a_younger_ones_block_over_never_the_reverse():
    w = World()
    v = w.mm.view
    w.fill_spoilt()
    w.quotas.update({A: 2 * v.block, B: 64})  # (G takes all the rest)
    ra = w.req(A, "alloc", pages=10, prot=3)  # A (older) breaks a block
    rb = w.req(B, "alloc", pages=10, prot=3)  # B (younger) breaks another: whole blocks before others'
    (ba,), (bb,) = w.blocks_of(ra["frames"]), w.blocks_of(rb["frames"])
    ta, tb = v.clients[A].tag, v.clients[B].tag
    assert ba != bb and v.bowner[ba] == ta and v.bowner[bb] == tb and ta < tb
    whole = v.counts()["free_large_blocks"]
    w.quotas["G" * 40] = whole * v.block
    assert isinstance(w.req("G" * 40, "alloc", pages=whole * v.block, prot=3, large=True), dict)
    # no whole block left: A overflows its own block into B's, and takes it over
    r = w.req(A, "alloc", pages=int(v.bfree[ba]) + 50, prot=3)
    assert w.blocks_of(r["frames"]) == {ba, bb} and v.bowner[bb] == ta
    # B then fills the holes of the blocks it can find, but takes none over from the older A
    r = w.req(B, "alloc", pages=20, prot=3)
    assert w.blocks_of(r["frames"]) <= {ba, bb} and v.bowner[ba] == ta and v.bowner[bb] == ta
    w.die(A)  # once A is gone, anyone takes its blocks over
    assert v._may_take(np.array([ta]), tb)[0] and not v._may_take(np.array([tb]), ta + 1000)[0]
    assert w.run(w.mm.audit())["divergences"] == 0


def test_journal_replay_rebuilds_the_same_placement_state():
    w = World(pool=16)
    keys = [f"{i:040d}" for i in range(6)]
    rng = np.random.default_rng(7)
    live: dict[str, list] = {k: [] for k in keys}
    for step in range(300):
        key = keys[int(rng.integers(len(keys)))]
        if key in w.mm.view.clients and step % 97 == 0:
            w.die(key)
            live[key] = []
        elif live[key] and rng.random() < 0.4:
            r = live[key].pop(int(rng.integers(len(live[key]))))
            w.req(key, "free", vaddr=r["vaddr"], pages=r["pages"])
        else:
            large = rng.random() < 0.05
            pages = w.mm.view.block if large else int(rng.integers(1, 40))
            r = w.req(key, "alloc", pages=pages, prot=3, large=large)
            if isinstance(r, dict):
                live[key].append(r)
    w.run(w.mm.flush())
    kinds = {type(rec) for rec in w.journal}
    assert {J.Donate, J.NewClient, J.ClientGone, J.Intent, J.Done} <= kinds
    v = w.mm.view
    replay = View(w.address_map, v.block)
    for rec in w.journal:
        replay.apply(rec)
    for name in ("state", "refs", "bfree", "bowner", "never_whole"):
        assert np.array_equal(getattr(replay, name), getattr(v, name)), name
    assert replay.alive == v.alive and replay.next_tag == v.next_tag
    assert {k: c.tag for k, c in replay.clients.items()} == {k: c.tag for k, c in v.clients.items()}
    # and the replayed view places the next request exactly where the live one would
    for owner in sorted(v.alive):
        assert np.array_equal(placement.pick(replay, 37, owner=owner), placement.pick(v, 37, owner=owner))


def test_pageblock_placement_keeps_more_large_pages_than_first_fit_after_churn():
    a = churn("pageblock", seed=3, steps=2500)
    b = churn("first-fit", seed=3, steps=2500)
    # the same request sequence for both (the workload does not depend on placement)
    assert a["churn_requests"] == b["churn_requests"] and a["ticks"] == b["ticks"]
    assert a["possible"] == b["possible"]
    assert a["large_pages"] > b["large_pages"]
    # 4 daemons and the kernel (its pool holds the live clients' whole kernel quotas) keep a block or two each
    assert a["large_pages"] >= a["possible"] - 10
    assert a["donations"] > 0 and a["exits"] > 0
