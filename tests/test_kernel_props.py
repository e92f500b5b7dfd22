"""Property-based tests of the kernel: a hypothesis state machine drives the
service with valid and hostile calls on every profile, next to a plain
reference model (frame -> owner, frame -> reference count, and each process's
mappings), and checks after every step that:

- the invariant checker finds nothing (I1-I4, I7, I13);
- the kernel agrees with the model on every frame's owner and refcount, on
  every process's mappings, threads and endpoints, and on every kernel frame
  count: each process's charge (its object frame and root table, the page
  tables its mappings need, its threads, its endpoint slab frames), the
  reservation (the sum of the unused quotas) and the free pool;
- every call got the answer the model predicts, and every refused call left
  the state digest unchanged (I6);
- donate and reclaim never change kernel_used (I5: no kernel allocation),
  also when the kernel pool is empty (the machine boots with 0 to 24 frames);
- a client unmaps only mappings it made itself (EPERM for the mm's), and a
  destroyed process's event lists only the user frames it released;
- quotas (I13): every process gets a random kernel quota; a call that would
  take it past its quota is ENOMEM carrying needed, limit and used, and a
  call within its quota NEVER gets ENOMEM, whatever the other processes, the
  mm's donations and reclaims or an empty pool do; a pool ENOMEM (needed,
  available) happens only at proc_create, counting unreserved frames only.

A second property feeds arbitrary requests through ``handle`` (I10)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE
from kernel_server.bootmap import OWNER, SHARED
from kernel_server.calls import ADAPTERS
from kernel_server.core import MAX_CLIENT_PAGES
from kernel_server.pagetable import CLIENT_MADE
from kernel_server.frames import KERNEL_SHARED, USER
from kernel_server.invariants import check_kernel
from kernel_server.observe import KernelObserver, as_frames
from kernel_server.service import KernelService
from protocol import runs as R
from protocol import wire
from protocol.errors import Errno, Error

MM = "M" * 40
OP = "O" * 40
KEYS = ["A" * 40, "B" * 40, "C" * 40]
STRANGER = "S" * 40  # a valid identity that never gets a process
NEWKEY = "N" * 40
LEASE = 20.0
MiB = 1 << 20
NOPID = 10_000
QUOTAS = [8, 3, 4, 5, 12, 2, 1, 40]  # kernel quotas the mm sets (1 is below a process's cost but on PAE)


def often(data, p: int = 3) -> bool:
    """True p times out of p + 1: the useful case; False: the hostile one."""
    return data.draw(st.integers(0, p)) < p


class KernelMachine(RuleBasedStateMachine):
    arch = "i686"
    memory = 16 * MiB

    # ---- boot and the model ---------------------------------------------------

    # (hypothesis prefers the first choice of a sampled_from: the useful case comes first)
    @initialize(pool=st.sampled_from([0, 2, 8, 24, 1, 3, 5]), extra=st.sampled_from([16, 0, 4, 64]),
                procs=st.sampled_from([2, 3, 1, 0]))
    def boot(self, pool: int, extra: int, procs: int) -> None:
        self.svc = KernelService.boot(arch=self.arch, memory=self.memory, mm_key=MM, kernel_pool_frames=pool,
                                      lease_seconds=LEASE, operator_key=OP)
        self.core = self.svc.core
        self.ft = self.core.frames
        p = self.core.profile
        self.n = self.ft.n
        self.limit_frame = self.n if p.kernel_limit is None else min(self.n, p.kernel_limit)
        self.step = p.pages_at(max(p.large_levels))
        self.top_page = p.user_top >> PAGE_SHIFT
        self.window = 0x4000_0000 >> PAGE_SHIFT  # small and large mappings go here, so they collide
        # the reference model, from the boot map (not from the kernel's frame table)
        self.owner: dict[int, str] = {}
        for r in self.core.bootmap.regions:
            if r.kind == "reserved":
                continue
            o = "shared" if r.kind in SHARED else OWNER[r.kind]
            for f in range(r.first, r.end):
                self.owner[f] = o
        self.refs: dict[int, int] = {}
        self.ram = np.array(sorted(self.owner), dtype=np.int64)
        self.pids: dict[str, int] = {}
        self.small: dict[int, dict[int, int]] = {}  # pid -> vpage -> frame
        self.client_made: dict[int, set[int]] = {}  # pid -> vpages the client mapped itself (the rest: the mm)
        self.large: dict[int, dict[int, int]] = {}  # pid -> base vpage -> first frame
        self.threads: dict[int, set[int]] = {}
        self.endpoints: dict[int, set[int]] = {}
        # kernel memory (I13): what each process may hold and the endpoint slab frames it holds; the rest
        # of its charge follows from the model (process cost, page tables of its mappings, threads)
        self.base = 1 if self.arch == "i686-pae" else 2  # object frame (+ root table, except with PAE)
        self.limit: dict[int, int] = {}
        self.slab: dict[int, int] = {}
        self.boot_used = sum(r.count for r in self.core.bootmap.of_kind("frame_table"))
        self.seen: dict[int, float] = {}
        self.now = 0.0
        self.req_id = 0
        # frames worth choosing: a few of every kind, and the start of two large-page blocks
        bm = self.core.bootmap
        cands: set[int] = {0, 255, self.n, self.n + 5}
        users = bm.of_kind("user")
        cands |= set(range(users[0].first, users[0].first + 24))
        cands.add(users[-1].end - 1)
        self.blocks = list(range(0, self.n, self.step))
        self.user_blocks = [b for b in self.blocks
                            if all(self.owner.get(f) == "user" for f in range(b, b + self.step))][:3]
        for b in self.user_blocks[:2]:
            cands |= set(range(b, b + 12))
        self.blocks += [self.step + 1, self.n]  # misaligned, beyond memory
        for kind, k in (("kernel_pool", 24), ("kernel_image", 2), ("frame_table", 1), ("ramdisk", 1),
                        ("firmware", 1)):
            for r in bm.of_kind(kind):
                cands |= set(range(r.first, min(r.end, r.first + k)))
        self.cands = sorted(cands)
        self.cands_in_ram = np.array([f for f in self.cands if f in self.owner], dtype=np.int64)
        self.shared = [f for f in self.cands if self.owner.get(f) == "shared"]
        # a head start: some memory given to the kernel, some processes (either may fail: pool 0)
        if extra:
            self.do_donate([f for f in self.cands if self.owner.get(f) == "user"][:extra])
        for key in KEYS[:procs]:
            self.do_proc_create(key)

    # ---- helpers ------------------------------------------------------------------

    def call(self, who: str, name: str, **args):
        """One call through the service; a refused call must change nothing (I6)."""
        before = self.core.digest()
        used = self.ft.kernel_used
        out = self.svc.call(who, name, args, now=self.now)
        if who in self.pids:  # any call renews the caller's lease
            self.seen[self.pids[who]] = self.now
        if isinstance(out, Error):
            assert out.code != Errno.EIO, f"internal error: {out}"
            assert self.core.digest() == before, f"refused {name} {args} changed the state: {out}"
        return out, used

    @staticmethod
    def expect(out, code: Errno | None, what: str = "") -> None:
        if code is None:
            assert not isinstance(out, Error), f"{what}: expected success, got {out}"
        else:
            assert isinstance(out, Error) and out.code == code, f"{what}: expected {code.name}, got {out}"

    def frames(self, data, lo: int, hi: int, valid: bool, free: bool = True) -> list[int]:
        """Distinct user frames (free ones only if ``free``) when ``valid``, else anything at all."""
        good = [f for f in self.cands if self.owner.get(f) == "user" and not (free and self.refs.get(f))]
        if free:  # (to donate) the first large-page block stays whole, so large maps keep succeeding
            good = [f for f in good if not self.user_blocks[0] <= f < self.user_blocks[0] + self.step]
        if valid and len(good) >= lo:  # a run of them (cheap to draw, and what the mm would send)
            start = data.draw(st.integers(0, len(good) - 1))
            k = data.draw(st.integers(lo, min(hi, len(good))))
            return [good[(start + i) % len(good)] for i in range(k)]
        return data.draw(st.lists(st.sampled_from(self.cands), min_size=lo, max_size=hi))

    def target(self, data, valid: bool):
        """Who calls map/unmap on whom: (identity, pid argument, the error the kernel must give
        before looking at anything else, target pid). Valid: the mm, on a live process."""
        if valid and not self.pids:  # make a process first (the mm gives the kernel memory if need be)
            quota = self.base + 6
            if self.unreserved() < quota:
                self.do_donate([f for f in self.cands if self.owner.get(f) == "user" and not self.refs.get(f)
                                and f < self.limit_frame][:quota - self.unreserved()])
            self.do_proc_create(KEYS[0], quota)
        alive = sorted(k for k in KEYS if k in self.pids)
        key = data.draw(st.sampled_from(alive if alive and (valid or often(data)) else KEYS))
        who = "mm" if valid else data.draw(st.sampled_from(["mm", "self", "self", "other", "stranger"]))
        if who == "mm":
            pid = self.pids.get(key, NOPID)
            return MM, pid, (None if key in self.pids else Errno.ESRCH), pid
        if who == "stranger":
            return STRANGER, None, Errno.ESRCH, None
        if key not in self.pids:
            return key, None, Errno.ESRCH, None
        own = self.pids[key]
        if who == "self":
            return key, data.draw(st.sampled_from([None, own])), None, own
        other = data.draw(st.sampled_from([k for k in KEYS if k != key]))
        return key, self.pids.get(other, NOPID), Errno.EPERM, None

    def prot(self, data, valid: bool) -> int:
        return data.draw(st.sampled_from([1, 3, 5] if valid else [1, 3, 5, 2, 4, 6, 7]))

    def add_ref(self, f: int, d: int) -> None:
        r = self.refs.get(f, 0) + d
        assert r >= 0
        if r:
            self.refs[f] = r
        else:
            self.refs.pop(f, None)

    def overlaps(self, pid: int, lo: int, hi: int) -> bool:
        small = self.small[pid]
        if any(vp in small for vp in range(lo, hi)):
            return True
        return any(b < hi and b + self.step > lo for b in self.large[pid])

    def forget(self, pid: int, event: dict) -> int:
        """The model's side of a process's end: drop its mappings; returns the pages it had. The
        kernel's event (or reply) must list exactly the user frames among them."""
        key = next(k for k, v in self.pids.items() if v == pid)
        del self.pids[key]
        frames = list(self.small[pid].values()) + [f for b in self.large[pid].values() for f in range(b, b + self.step)]
        user = sorted({f for f in frames if self.owner[f] == "user"})
        assert R.to_array(event["frames"]).tolist() == user
        assert event["shared_unmapped"] == sum(1 for f in frames if self.owner[f] == "shared")
        del self.client_made[pid]
        pages = 0
        for f in self.small.pop(pid).values():
            self.add_ref(f, -1)
            pages += 1
        for first in self.large.pop(pid).values():
            for f in range(first, first + self.step):
                self.add_ref(f, -1)
            pages += self.step
        del self.threads[pid], self.endpoints[pid], self.limit[pid], self.slab[pid]
        self.seen.pop(pid, None)
        return pages

    # ---- kernel memory, as the model counts it ------------------------------------------

    def table_keys(self, vp: int, down_to: int) -> set[tuple[int, int]]:
        """The page tables (level, tag) of levels 1..down_to on the way to page ``vp``."""
        shifts = self.core.profile.entry_shifts
        return {(lv, vp >> (shifts[lv - 1] - PAGE_SHIFT)) for lv in range(1, down_to + 1)}

    def tables(self, pid: int, small=None, large=None) -> set[tuple[int, int]]:
        """Every page table process ``pid`` needs for its mappings (or for ``small``/``large`` vpages)."""
        p = self.core.profile
        out: set[tuple[int, int]] = set()
        for vp in (self.small[pid] if small is None else small):
            out |= self.table_keys(vp, p.levels - 1)
        for b in (self.large[pid] if large is None else large):
            out |= self.table_keys(b, max(p.large_levels))
        return out

    def used(self, pid: int) -> int:
        return self.base + len(self.tables(pid)) + len(self.threads[pid]) + self.slab[pid]

    def reserved(self) -> int:
        return sum(self.limit[pid] - self.used(pid) for pid in self.limit)

    def kernel_free(self) -> int:
        owned = sum(1 for o in self.owner.values() if o == "kernel")
        return owned - self.boot_used - sum(self.used(pid) for pid in self.limit)

    def unreserved(self) -> int:
        return self.kernel_free() - self.reserved()

    def over_quota(self, out, pid: int, needed: int, what: str) -> bool:
        """Whether ``needed`` more frames take ``pid`` past its quota; if so the call must have been refused
        with the quota's ENOMEM (and never otherwise: I13)."""
        used, limit = self.used(pid), self.limit[pid]
        if used + needed <= limit:
            return False
        self.expect(out, Errno.ENOMEM, f"{what} past the quota")
        assert (out.details["needed"], out.details["limit"], out.details["used"], out.details["pid"]) == \
            (needed, limit, used, pid), out
        return True

    # ---- processes ------------------------------------------------------------------

    @rule(data=st.data())
    def processes(self, data):
        if often(data, 2):
            free = [k for k in KEYS if k not in self.pids]
            key = data.draw(st.sampled_from(free if free and often(data) else KEYS + [MM, OP]))
            self.do_proc_create(key, data.draw(st.sampled_from(QUOTAS)))
        else:
            alive = sorted(self.pids)
            key = data.draw(st.sampled_from(alive if alive and often(data) else KEYS))
            pid = self.pids.get(key, NOPID)
            out, _ = self.call(MM, "proc_destroy", pid=pid)
            if key not in self.pids:
                self.expect(out, Errno.ESRCH, "proc_destroy of no process")
            else:
                self.expect(out, None, "proc_destroy")
                assert out["unmapped_pages"] == self.forget(pid, out)

    def do_proc_create(self, key: str, quota: int = 8) -> None:
        unreserved = self.unreserved()
        out, used = self.call(MM, "proc_create", key=key, kernel_quota=quota)
        if key in (MM, OP):
            self.expect(out, Errno.EINVAL, "proc_create for a server's key")
        elif key in self.pids:
            self.expect(out, Errno.EBUSY, "proc_create twice")
            assert out.details["pid"] == self.pids[key]
        elif quota < self.base:
            self.expect(out, Errno.EINVAL, "proc_create with a quota below the cost of a process")
        elif quota > unreserved:  # the pool's ENOMEM: only here, only the unreserved frames count
            self.expect(out, Errno.ENOMEM, "proc_create beyond the unreserved pool")
            assert (out.details["needed"], out.details["available"]) == (quota, unreserved), out
        else:
            self.expect(out, None, "proc_create")
            pid = out["pid"]
            assert pid not in self.small
            self.pids[key] = pid
            self.small[pid], self.large[pid], self.client_made[pid] = {}, {}, set()
            self.threads[pid], self.endpoints[pid] = set(), set()
            self.limit[pid], self.slab[pid] = quota, 0
            self.seen[pid] = self.now
            assert out["kernel_frames"] == self.base and out["kernel_limit"] == quota
            assert self.ft.kernel_used == used + out["kernel_frames"]

    # ---- donate and reclaim (I5) ---------------------------------------------------------

    @rule(data=st.data())
    def donate(self, data):
        mode = data.draw(st.sampled_from(["free", "free", "in use", "anything"]))
        frames = self.frames(data, 1, 6, valid=mode != "anything")
        mapped = sorted(f for f in self.refs if self.owner.get(f) == "user")
        if mode == "in use" and mapped:
            frames = sorted(set(frames) | {data.draw(st.sampled_from(mapped))})
        self.do_donate(frames)

    def predict_donate(self, frames: list[int]) -> tuple[Errno | None, list[int]]:
        if any(f >= self.n for f in frames) or len(set(frames)) != len(frames):
            return Errno.EINVAL, []
        if any(f not in self.owner for f in frames):
            return Errno.EINVAL, []
        if any(self.owner[f] != "user" for f in frames):
            return Errno.EEXIST, [f for f in frames if self.owner[f] != "user"]
        busy = [f for f in frames if self.refs.get(f)]
        if busy:
            return Errno.EBUSY, busy
        if any(f >= self.limit_frame for f in frames):
            return Errno.EINVAL, []
        return None, []

    def do_donate(self, frames: list[int]) -> None:
        out, used = self.call(MM, "donate", frames=R.from_array(frames))
        code, named = self.predict_donate(frames)
        self.expect(out, code, f"donate {frames}")
        if named:
            assert out.details["frames"] == R.from_array(np.unique(named))[:64]
        if code is None:
            assert out["donated"] == len(frames)
            for f in frames:
                self.owner[f] = "kernel"
        assert self.ft.kernel_used == used  # I5

    @rule(data=st.data())
    def reclaim(self, data):
        mode = data.draw(st.sampled_from(["count", "free frames", "anything"]))
        if mode == "count":
            count = data.draw(st.integers(1, 6))
            unreserved = self.unreserved()
            out, used = self.call(MM, "reclaim", count=count)
            self.expect(out, None, "reclaim count")
            got = R.to_array(out["frames"]).tolist()
            assert len(got) == min(count, unreserved) == out["reclaimed"]  # never a reserved frame
            for f in got:
                assert self.owner[f] == "kernel" and f not in self.refs
                self.owner[f] = "user"
            assert self.ft.kernel_used == used  # I5
            return
        free = self.ft.free_list()[:12]  # reading the kernel only to choose frames worth trying
        pool = free if free and mode == "free frames" else self.cands
        frames = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5, unique=mode != "anything"))
        unreserved = self.unreserved()
        out, used = self.call(MM, "reclaim", frames=R.from_array(frames))
        if any(f >= self.n for f in frames) or len(set(frames)) != len(frames) \
                or any(f not in self.owner or self.owner[f] == "user" for f in frames):
            self.expect(out, Errno.EINVAL, f"reclaim {frames}")
        elif any(self.owner[f] == "shared" for f in frames):
            self.expect(out, Errno.EBUSY, f"reclaim {frames}")
        elif isinstance(out, Error):  # the model does not know which kernel frames are in use
            self.expect(out, Errno.EBUSY, f"reclaim {frames}")
            if set(frames) <= set(self.ft.free_list()):  # all free: more than the unreserved ones
                assert len(frames) > unreserved and out.details["reserved"] == self.reserved(), out
            else:
                named = R.to_array(out.details["frames"]).tolist()
                assert named and set(named) <= set(frames) - set(self.ft.free_list())
        else:
            assert len(frames) <= unreserved
            assert out["reclaimed"] == len(frames)
            for f in frames:
                self.owner[f] = "user"
        assert self.ft.kernel_used == used  # I5

    # ---- map and unmap ------------------------------------------------------------

    @rule(data=st.data())
    def map_small(self, data):
        valid = often(data)
        identity, pid_arg, pre, pid = self.target(data, valid)
        prot = self.prot(data, valid)
        n = data.draw(st.integers(1, 4))
        where = "window" if valid else data.draw(st.sampled_from(["window", "window", "unaligned", "top"]))
        if where == "window":
            vaddr = (self.window + data.draw(st.integers(0, 4 * self.step - 1))) << PAGE_SHIFT
        elif where == "unaligned":
            vaddr = (self.window << PAGE_SHIFT) + 8
        else:
            n = max(n, 2)
            vaddr = (self.top_page - 1) << PAGE_SHIFT
        if identity != MM and often(data):  # a client maps the boot image into itself
            frames = data.draw(st.lists(st.sampled_from(self.shared), min_size=n, max_size=n))
        else:
            frames = self.frames(data, n, n, valid=valid or often(data, 1), free=False)
        args = {"vaddr": vaddr, "frames": R.from_array(frames), "prot": prot}
        if pid_arg is not None:
            args["pid"] = pid_arg
        out, used = self.call(identity, "map", **args)
        vp0 = vaddr >> PAGE_SHIFT
        owners = [self.owner.get(f) for f in frames]
        if pre is not None:
            code = pre
        elif prot & 2 and prot & 4:
            code = Errno.ENOTSUP
        elif vaddr % PAGE_SIZE or any(f >= self.n for f in frames) or vp0 + n > self.top_page:
            code = Errno.EINVAL  # (decided by arithmetic, before the quota)
        elif self.over_quota(out, pid, len(self.tables(pid, small=range(vp0, vp0 + n), large=()) - self.tables(pid)),
                             f"map {args}"):
            return
        elif None in owners:
            code = Errno.EINVAL
        elif identity != MM and any(o != "shared" for o in owners):
            code = Errno.EPERM
        elif "kernel" in owners or (prot != 1 and "shared" in owners):
            code = Errno.EPERM
        elif self.overlaps(pid, vp0, vp0 + n):
            code = Errno.EBUSY
        else:
            code = None
        self.expect(out, code, f"map {args} by {identity[0]}")
        if code is None:
            needed = len(self.tables(pid, small=range(vp0, vp0 + n), large=()) - self.tables(pid))
            assert out["tables_allocated"] == needed
            for i, f in enumerate(frames):
                self.small[pid][vp0 + i] = f
                self.add_ref(f, +1)
                if identity != MM:
                    self.client_made[pid].add(vp0 + i)
            assert out["pages"] == n and self.ft.kernel_used == used + out["tables_allocated"]

    @rule(data=st.data())
    def map_large(self, data):
        valid = often(data)
        identity, pid_arg, pre, pid = self.target(data, valid)
        prot = self.prot(data, valid)
        count = data.draw(st.integers(1, 2))
        pool = self.user_blocks if valid or often(data) else self.blocks
        firsts = data.draw(st.lists(st.sampled_from(pool), min_size=count, max_size=count))
        aligned = valid or often(data, 9)
        base = self.window + data.draw(st.integers(0, 3)) * self.step
        small = sorted(self.small.get(pid, {}))
        if small and often(data, 1):  # over small pages of the same process: EBUSY
            vp = data.draw(st.sampled_from(small))
            base = vp - vp % self.step
        vaddr = (base if aligned else base + 1) << PAGE_SHIFT
        args = {"vaddr": vaddr, "frames": [[f, self.step] for f in firsts], "prot": prot}
        if data.draw(st.booleans()):
            args["large"] = True
        else:
            args["page_size"] = self.step * PAGE_SIZE
        if pid_arg is not None:
            args["pid"] = pid_arg
        out, used = self.call(identity, "map", **args)
        frames = [f for first in firsts for f in range(first, first + self.step)]
        owners = {self.owner.get(f) for f in frames}
        bases = [base + i * self.step for i in range(count)]
        if identity != MM and len(frames) > MAX_CLIENT_PAGES:
            code = Errno.E2BIG  # a client's call is small: judged before anything else of it
        elif pre is not None:
            code = pre
        elif prot & 2 and prot & 4:
            code = Errno.ENOTSUP
        elif not aligned or any(f >= self.n for f in frames) or any(f % self.step for f in firsts):
            code = Errno.EINVAL  # (decided by arithmetic, before the quota)
        elif self.over_quota(out, pid, len(self.tables(pid, small=(), large=bases) - self.tables(pid)),
                             f"large map {args}"):
            return
        elif None in owners:
            code = Errno.EINVAL
        elif owners != {"user"} or identity != MM:
            code = Errno.EPERM
        elif any(self.overlaps(pid, b, b + self.step) for b in bases):
            code = Errno.EBUSY
        else:
            code = None
        self.expect(out, code, f"large map {args} by {identity[0]}")
        if code is None:
            assert out["tables_allocated"] == len(self.tables(pid, small=(), large=bases) - self.tables(pid))
            for b, first in zip(bases, firsts):
                self.large[pid][b] = first
            for f in frames:
                self.add_ref(f, +1)
            assert out["pages"] == len(frames) and self.ft.kernel_used == used + out["tables_allocated"]

    @rule(data=st.data())
    def unmap(self, data):
        valid = often(data)
        identity, pid_arg, pre, pid = self.target(data, valid)
        mine = []
        if pid in self.small:
            mine = sorted([(vp, 1) for vp in self.small[pid]] + [(b, self.step) for b in self.large[pid]])
        how = data.draw(st.sampled_from(["exact", "exact", "random", "top"]))
        if how == "exact" and mine:
            vp0, pages = data.draw(st.sampled_from(mine))
            if pages == 1:
                pages += data.draw(st.integers(0, 2))
            elif not valid:  # cut a large page: EINVAL
                cut = data.draw(st.sampled_from([0, 1, 2]))
                vp0, pages = vp0 + (cut == 2), pages - (cut > 0)
        elif how == "top":
            vp0, pages = self.top_page - 1, 2
        else:
            vp0 = self.window + data.draw(st.integers(0, 4 * self.step - 1))
            pages = data.draw(st.integers(1, self.step + 2))
        args = {"vaddr": vp0 << PAGE_SHIFT, "pages": pages}
        if pid_arg is not None:
            args["pid"] = pid_arg
        out, used = self.call(identity, "unmap", **args)
        vp1 = vp0 + pages
        code, small, large = pre, [], []
        if identity != MM and pages > MAX_CLIENT_PAGES:
            code = Errno.E2BIG  # a client's call is small: judged before anything else of it
        if code is None and vp1 > self.top_page:
            code = Errno.EINVAL
        if code is None:
            vp = vp0
            while vp < vp1:
                if vp in self.small[pid]:
                    small.append(vp)
                    vp += 1
                    continue
                b = next((b for b in self.large[pid] if b <= vp < b + self.step), None)
                if b is None or b < vp0 or b + self.step > vp1:
                    code = Errno.EINVAL
                    break
                large.append(b)
                vp = b + self.step
        if code is None and identity != MM and (large or not set(small) <= self.client_made[pid]):
            code = Errno.EPERM  # a client unmaps only what it mapped itself
        self.expect(out, code, f"unmap {args} by {identity[0]}")
        if code is None:
            before = self.tables(pid)
            self.client_made[pid] -= set(small)
            expect = [self.small[pid].pop(vp) for vp in small]
            for b in large:
                first = self.large[pid].pop(b)
                expect.extend(range(first, first + self.step))
            assert sorted(R.to_array(out["frames"]).tolist()) == sorted(expect)
            for f in expect:
                self.add_ref(f, -1)
            assert self.ft.kernel_used == used - out["tables_freed"]
            assert out["tables_freed"] == len(before - self.tables(pid))

    @rule(data=st.data())
    def client_unmaps_own_space(self, data):
        """A client unmaps in its own address space: what it mapped itself (boot image pages) goes,
        what the mm mapped there (its memory, or a large page) is EPERM and stays."""
        alive = sorted(k for k in KEYS if k in self.pids and (self.small[self.pids[k]] or self.large[self.pids[k]]))
        if not alive:
            return
        key = data.draw(st.sampled_from(alive))
        pid = self.pids[key]
        mine = sorted([(vp, 1) for vp in self.small[pid]] + [(b, self.step) for b in self.large[pid]])
        vp0, pages = data.draw(st.sampled_from(mine))
        if pages == 1:  # now and then a longer range: all the client's, or not
            while vp0 + pages in self.small[pid] and data.draw(st.booleans()):
                pages += 1
        out, used = self.call(key, "unmap", vaddr=vp0 << PAGE_SHIFT, pages=pages)
        vps = range(vp0, vp0 + pages)
        if pages > MAX_CLIENT_PAGES:  # (a large page: more than one client call may unmap)
            self.expect(out, Errno.E2BIG, f"client unmap of {pages} pages")
            return
        if not set(vps) <= self.client_made[pid]:  # (a large page is always the mm's)
            self.expect(out, Errno.EPERM, f"client unmap of the mm's mapping at page {vp0}")
            assert "memory manager" in out.message
            return
        self.expect(out, None, "client unmap of its own mapping")
        for vp in vps:
            self.add_ref(self.small[pid].pop(vp), -1)
            self.client_made[pid].discard(vp)
        assert self.ft.kernel_used == used - out["tables_freed"]

    # ---- threads and endpoints ---------------------------------------------------------

    @rule(data=st.data())
    def objects(self, data):
        op = data.draw(st.sampled_from(["thread_create", "endpoint_create", "thread_destroy", "endpoint_destroy"]))
        alive = sorted(self.pids)
        key = data.draw(st.sampled_from(alive if alive and often(data) else KEYS + [MM, STRANGER]))
        if op.endswith("create"):
            out, used = self.call(key, op)
            pid = self.pids.get(key)
            if pid is None:
                self.expect(out, Errno.ESRCH, f"{op} without a process")
                return
            if op == "thread_create":
                needed = 1
            else:  # a slot is free exactly when the slab frames hold fewer endpoints than they have room for
                needed = 0 if len(self.endpoints[pid]) < self.slab[pid] * (PAGE_SIZE // 64) else 1
            if self.over_quota(out, pid, needed, op):  # (and whatever the pool holds, never otherwise)
                return
            self.expect(out, None, op)
            if op == "thread_create":
                self.threads[pid].add(out["tid"])
                assert self.ft.kernel_used == used + 1
            else:
                assert out["kernel_frames"] == needed
                self.endpoints[pid].add(out["eid"])
                self.slab[pid] += needed
                assert self.ft.kernel_used == used + needed
            return
        table, arg = (self.threads, "tid") if op == "thread_destroy" else (self.endpoints, "eid")
        every = sorted(x for xs in table.values() for x in xs)
        obj = data.draw(st.sampled_from(every)) if every and often(data) else NOPID
        owner = next((k for k, pid in self.pids.items() if obj in table[pid]), None)
        if owner is not None and often(data):
            key = owner  # mostly the owner, now and then someone else
        out, used = self.call(key, op, **{arg: obj})
        pid = self.pids.get(key)
        if pid is not None and obj in table[pid]:
            self.expect(out, None, op)
            table[pid].remove(obj)
            assert self.ft.kernel_used in ((used - 1,) if op == "thread_destroy" else (used, used - 1))
            if op == "endpoint_destroy":  # a slab frame goes back when its last endpoint goes
                self.slab[pid] -= used - self.ft.kernel_used
                eps = len(self.endpoints[pid])
                assert -(-eps // (PAGE_SIZE // 64)) <= self.slab[pid] <= eps
        else:
            self.expect(out, Errno.ESRCH, f"{op} of another's or no object")

    # ---- wrong identities (I9) --------------------------------------------------------

    @rule(key=st.sampled_from(KEYS + [STRANGER]), which=st.integers(0, 6), data=st.data())
    def privileged_call_by_a_client(self, key, which, data):
        f = data.draw(st.sampled_from(self.cands))
        name, args = [
            ("donate", {"frames": [[f, 1]]}),
            ("reclaim", {"count": 1}),
            ("reclaim", {"frames": [[f, 1]]}),
            ("proc_create", {"key": NEWKEY}),  # (no quota: the caller is refused before its arguments)
            ("proc_destroy", {"pid": data.draw(st.sampled_from(sorted(self.pids.values()) + [1]))}),
            ("frame_info", {"frames": [[0, 8]]}),
            ("events", {}),
        ][which]
        out, _ = self.call(key, name, **args)
        self.expect(out, Errno.EPERM, f"{name} by a client")

    # ---- leases (I11) and retries (I12) -------------------------------------------------

    @rule(data=st.data())
    def time(self, data):
        op = data.draw(st.sampled_from(["ping", "pass", "retry"]))
        key = data.draw(st.sampled_from(KEYS + [STRANGER]))
        if op == "ping":
            out, _ = self.call(key, "ping")
            assert out == {"pid": self.pids.get(key)}
        elif op == "pass":
            self.now += data.draw(st.sampled_from([0.5, 1.0, 3.0, LEASE + 1]))
            expect = sorted(pid for pid, t in self.seen.items() if self.now - t > LEASE)
            events = self.svc.expire(self.now)
            assert sorted(e["pid"] for e in events) == expect
            for e in events:
                assert e["reason"] == "lease"
                self.forget(e["pid"], e)
        else:
            self.retried_thread_create(key)

    def retried_thread_create(self, key: str) -> None:
        self.req_id += 1
        req = wire.request(self.req_id, "thread_create")
        used = self.ft.kernel_used
        first = self.svc.handle(key, req, self.now)
        if key in self.pids:
            self.seen[self.pids[key]] = self.now
        d = self.core.digest()
        assert self.svc.handle(key, req, self.now) == first  # executed at most once
        again = wire.parse_reply(self.svc.handle(key, wire.request(self.req_id, "ping"), self.now))
        assert again["ok"] is False and again["error"]["code"] == "EINVAL"
        assert self.core.digest() == d
        reply = wire.parse_reply(first)
        if key not in self.pids:
            assert reply["error"]["code"] == "ESRCH"
        elif self.used(self.pids[key]) + 1 > self.limit[self.pids[key]]:
            assert reply["error"]["code"] == "ENOMEM" and reply["error"]["limit"] == self.limit[self.pids[key]]
        else:
            assert reply["ok"] is True
            self.threads[self.pids[key]].add(reply["result"]["tid"])
            assert self.ft.kernel_used == used + 1

    # ---- after every step ------------------------------------------------------------

    @invariant()
    def kernel_and_model_agree(self):
        if not hasattr(self, "core"):
            return
        assert check_kernel(self.core) == []
        # ownership changes only through donate and reclaim, which touch only the candidate
        # frames: compare those at every step, every frame at the end of each run (teardown)
        self.compare_owners(self.cands_in_ram)
        refs = self.ft.refs
        nz = np.flatnonzero(refs)
        assert dict(zip(nz.tolist(), refs[nz].tolist())) == self.refs
        # processes, mappings and objects
        assert {pid: p.key for pid, p in self.core.procs.items()} == {v: k for k, v in self.pids.items()}
        # kernel memory, frame for frame (I13): each charge, the reservation, the free pool
        for pid, proc in self.core.procs.items():
            assert (proc.kernel_used, proc.kernel_limit) == (self.used(pid), self.limit[pid]), pid
        assert self.core.reserved == self.reserved() and self.ft.free_count == self.kernel_free()
        for pid, proc in self.core.procs.items():
            assert {vp: e >> 3 for vp, e in proc.pages.items()} == self.small[pid]
            vps, entries = proc.entries()
            assert set(vps[(entries & CLIENT_MADE) != 0].tolist()) == self.client_made[pid]
            assert {b: m[1] for b, m in proc.large.items()} == self.large[pid]
            assert set(proc.threads) == self.threads[pid] and set(proc.endpoints) == self.endpoints[pid]
        assert set(self.svc.last_seen) == set(self.seen)

    def compare_owners(self, frames: np.ndarray) -> None:
        kind = self.ft.kind[frames]
        model = [self.owner[f] for f in frames.tolist()]
        assert np.array_equal(kind == USER, np.array([o == "user" for o in model], dtype=bool))
        assert np.array_equal(kind == KERNEL_SHARED, np.array([o == "shared" for o in model], dtype=bool))

    def teardown(self):
        if hasattr(self, "core"):
            self.compare_owners(self.ram)
            c = self.ft.counts()
            users = [f for f, o in self.owner.items() if o == "user"]
            mapped = sum(1 for f in users if self.refs.get(f))
            assert (c["user_free"], c["user_mapped"]) == (len(users) - mapped, mapped)


class I686Machine(KernelMachine):
    arch, memory = "i686", 16 * MiB


class PaeMachine(KernelMachine):
    arch, memory = "i686-pae", 16 * MiB


class X86_64Machine(KernelMachine):
    arch, memory = "x86_64", 32 * MiB


MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=50, deadline=None)
TestI686 = I686Machine.TestCase
TestI686.settings = MACHINE_SETTINGS
TestPae = PaeMachine.TestCase
TestPae.settings = MACHINE_SETTINGS
TestX86_64 = X86_64Machine.TestCase
TestX86_64.settings = MACHINE_SETTINGS


# ---- I10: arbitrary requests through handle -------------------------------------------

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=False),
              st.text(max_size=6), st.binary(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["pid", "vaddr", "frames", "prot", "count", "pages", "key", "tid", "eid", "large", "page_size",
          "since", "limit", "max_segments", "other"]


@given(identity=st.sampled_from([MM, KEYS[0], KEYS[1], None]),
       call=st.sampled_from(sorted(ADAPTERS) + ["nope", ""]),
       args=st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
       req_id=st.one_of(st.integers(0, 1 << 20), st.text(max_size=2)))
@settings(max_examples=300)
def test_every_request_gets_exactly_one_reply(identity, call, args, req_id):
    svc = KernelService.boot(arch="i686", memory=16 * MiB, mm_key=MM, kernel_pool_frames=8)
    svc.call(MM, "proc_create", {"key": KEYS[0], "kernel_quota": 4})
    svc.call(KEYS[0], "thread_create")
    data = wire.encode({"v": 1, "id": req_id, "call": call, "args": args})
    before = svc.core.digest()
    reply = wire.parse_reply(svc.handle(identity, data, now=0.0))
    assert reply["v"] == 1 and type(reply["ok"]) is bool
    if not reply["ok"]:
        err = Error.from_wire(reply["error"])
        assert err.code != Errno.EIO and err.code.name == reply["error"]["code"] and err.message
        assert svc.core.digest() == before
    assert check_kernel(svc.core) == []


# ---- the observer seam: every write is reported ---------------------------------------------------------

class Recorder(KernelObserver):
    """Everything the kernel reports."""

    def __init__(self) -> None:
        self.frames: set[int] = set()
        self.pids: set[int] = set()
        self.begun: list[str] = []
        self.ended: list[str] = []
        self.refusals: list[str] = []
        self.misses: list[int] = []

    def frames_written(self, frames) -> None:
        self.frames.update(as_frames(frames).tolist())

    def process_changed(self, pid: int) -> None:
        self.pids.add(pid)

    def call_begun(self, caller, name, args) -> None:
        self.begun.append(name)

    def call_ended(self, caller, name, result) -> None:
        self.ended.append(name)

    def refused(self, identity, name, error) -> None:
        self.refusals.append(name)

    def replay_miss(self, identity, req_id) -> None:
        self.misses.append(req_id)


def _snapshot(core):
    ft = core.frames
    return ([a.copy() for a in (ft.kind, ft.refs, ft.next, ft.prev)], ft.head,
            {pid: p.state() for pid, p in core.procs.items()})


@given(data=st.data(), arch=st.sampled_from(["i686", "i686-pae", "x86_64"]))
@settings(max_examples=40, deadline=None)
def test_every_write_is_reported_to_the_observer(data, arch):
    """Random calls (valid and not); after each, every frame whose kind, refcount or links changed was
    reported, and every process that changed, came or went. A mutator that forgets to report fails here."""
    rec = Recorder()
    svc = KernelService.boot(arch=arch, memory=32 * MiB, mm_key=MM, kernel_pool_frames=24, lease_seconds=LEASE,
                             operator_key=OP, observer=rec)
    core, ft = svc.core, svc.core.frames
    p = core.profile
    step = p.pages_at(max(p.large_levels))
    users = np.flatnonzero(ft.kind == USER)
    free_blocks = [b for b in range(0, ft.n - step, step) if (ft.kind[b:b + step] == USER).all()][:3]
    shared = np.flatnonzero(ft.kind == KERNEL_SHARED)[:4].tolist()
    window = 0x4000_0000
    now = 0.0
    for i in range(data.draw(st.integers(5, 40))):
        pids = sorted(core.procs)
        pid = data.draw(st.sampled_from(pids)) if pids else 1
        key = data.draw(st.sampled_from(KEYS))
        op = data.draw(st.sampled_from(["proc_create", "proc_destroy", "donate", "reclaim", "reclaim_frames", "map",
                                        "map_large", "map_own", "unmap", "thread_create", "thread_destroy",
                                        "endpoint_create", "endpoint_destroy", "expire", "handle"]))
        who, args = MM, {}
        if op == "proc_create":
            args = {"key": key, "kernel_quota": data.draw(st.sampled_from([2, 4, 8]))}
        elif op == "proc_destroy":
            args = {"pid": pid}
        elif op == "donate":
            f = int(data.draw(st.sampled_from(users[:64].tolist())))
            args = {"frames": [[f, data.draw(st.integers(1, 4))]]}
        elif op == "reclaim":
            args = {"count": data.draw(st.integers(1, 6))}
        elif op == "reclaim_frames":
            free = ft.free_list()
            op = "reclaim"
            args = {"frames": [[f, 1] for f in sorted(set(data.draw(st.lists(st.sampled_from(free), min_size=1,
                                                                                  max_size=4))))]} if free else \
                {"count": 1}
        elif op == "map":
            f = int(data.draw(st.sampled_from(users[:64].tolist())))
            args = {"pid": pid, "vaddr": window + data.draw(st.integers(0, 3 * step)) * PAGE_SIZE,
                    "frames": [[f, data.draw(st.integers(1, 3))]], "prot": 3}
        elif op == "map_large":
            op = "map"
            args = {"pid": pid, "vaddr": window + data.draw(st.integers(0, 3)) * step * PAGE_SIZE,
                    "frames": [[data.draw(st.sampled_from(free_blocks)), step]], "prot": 1, "large": True}
        elif op == "map_own":
            op, who = "map", key
            args = {"vaddr": window + data.draw(st.integers(0, 3 * step)) * PAGE_SIZE,
                    "frames": [[data.draw(st.sampled_from(shared)), 1]], "prot": 1}
        elif op == "unmap":
            proc = core.procs.get(pid)
            maps = sorted([(vp, 1) for vp in proc.pages] + [(b, step) for b in proc.large]) if proc else []
            vp, n = data.draw(st.sampled_from(maps)) if maps else (window >> 12, 1)
            who = data.draw(st.sampled_from([MM, proc.key if proc else KEYS[0]]))
            args = {"vaddr": vp << PAGE_SHIFT, "pages": n + data.draw(st.integers(0, 1))}
            if who == MM:
                args["pid"] = pid
        elif op in ("thread_create", "endpoint_create"):
            who = key
        elif op in ("thread_destroy", "endpoint_destroy"):
            proc = core.procs.get(pid)
            objs = sorted((proc.threads if op == "thread_destroy" else proc.endpoints) if proc else [1])
            who = proc.key if proc else key
            args = {"tid" if op == "thread_destroy" else "eid": data.draw(st.sampled_from(objs or [1]))}
        before = _snapshot(core)
        rec.frames.clear()
        rec.pids.clear()
        begun, refusals = len(rec.begun), len(rec.refusals)
        now += data.draw(st.sampled_from([0.0, 1.0, LEASE + 1]))
        if op == "expire":
            svc.expire(now)
        elif op == "handle":
            svc.handle(key, wire.request(i, "thread_create"), now)
            assert rec.misses and rec.misses[-1] == i
            svc.handle(key, wire.request(i, "thread_create"), now)  # answered from the cache: no second miss
            assert rec.misses.count(i) == 1
        else:
            out = svc.call(who, op, args, now=now)
            assert len(rec.refusals) == refusals + isinstance(out, Error)
            if not isinstance(out, Error) or out.code not in (Errno.EPERM, Errno.ESRCH, Errno.EINVAL) \
                    or core.refuse_caller(who, op) is None:
                assert rec.begun[begun:] in ([op], []) and rec.ended == rec.begun
        arrays, head, procs = _snapshot(core)
        changed = np.flatnonzero(np.logical_or.reduce([a != b for a, b in zip(before[0], arrays)]))
        missed = set(changed.tolist()) - rec.frames
        assert not missed, f"{op} {args}: frames {sorted(missed)[:8]} changed unreported"
        if head != before[1] and head != -1:
            assert head in rec.frames, f"{op}: the new head {head} was not reported"
        for q in set(before[2]) | set(procs):
            if before[2].get(q) != procs.get(q):
                assert q in rec.pids, f"{op} {args}: process {q} changed unreported"
        assert check_kernel(core) == []
