"""The memory manager's policy, written sans-I/O as generators of effects.

Rules for this file: no sockets, clocks, randomness or I/O. Every operation is
a generator that *yields* effects and receives their outcomes:

- ``KCall(call, args)``: a kernel system call; the driver sends back the
  result dict or an ``Error`` (a lost kernel is ``Error(EIO)``).
- ``Persist(records)``: make every record applied so far durable (these
  records, and any a concurrent operation handed over earlier); the driver
  sends back None once they are.

and *returns* its result (a dict or an ``Error``). A driver runs them: the
test helper ``drive`` one at a time, ``mm_service.driver`` several client
requests at once (each runs until it yields; a kernel call in flight does
not stop the others).

Every change of the view is a journal record (``mm_service.records``),
applied at once (``record``: so two requests in flight never pick the same
frames or virtual range) and journaled in the order applied by the next
``Persist``, so the journal is always a prefix of what was applied.
Durability: an intent is journaled before the kernel is asked to map or
unmap, and a request's outcome before its reply (``MMService.handle``). A
crash in between is settled by ``recover``: for each pending intent, one at
a time in journal order, it asks the kernel what that process maps in that
range (``mappings``), never guessing from reference counts, then makes every
frame's reference count match the kernel's.

Resources (I13). Every client gets two quotas when its process is made: user
pages (enforced here) and kernel frames (the kernel enforces it; the whole
quota is reserved in the kernel's pool). The mm never grants more than
exists (``budget``): the sum of all granted quotas stays within user RAM
plus the kernel's boot pool, minus the ``low`` watermark the pool keeps
unreserved. So a client within its quota always finds frames: free ones, or
unreserved ones the mm reclaims from the kernel's pool for it. The one
exception is a large-page allocation when no aligned free block is left
(the memory is there, just not in aligned blocks): its ENOMEM says so. (A
client can also run out of its own virtual address space, and exhaust its
own kernel quota: those ENOMEMs name the client's own limit. On i686 with
PAE and RAM above 4 GiB, kernel quotas are granted only within the frames
the kernel may own, ``kernel_budget``.) A new client whose quotas do not fit
in what is left of the budget gets ENOMEM on its first request, and nothing
is made for it; a dead client's quotas go back to the budget.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, NamedTuple

import numpy as np

from mm_service import placement
from mm_service import records as J
from mm_service.view import FREE, KERNEL, KERNEL_TAG, PAGE, USED, ClientState, View
from protocol import PROT_EXEC, PROT_WRITE
from protocol import runs as R
from protocol.calls import MAX_SEGMENTS
from protocol.errors import Errno, Error
from protocol.wire import MAX_RUNS

ENOMEM_RETRIES = 3
KIND_CODE = {"none": 0, "kernel_free": 1, "kernel_used": 1, "kernel_shared": 1, "user": 2}
LISTING_PAGE = 1000  # processes per page of the kernel's listing
DEFAULT_KERNEL_QUOTA = 64  # kernel frames per client: tables for ~48 sparse pages, 16 threads, 96 endpoints


class KCall(NamedTuple):
    call: str
    args: dict[str, Any]


class Persist(NamedTuple):
    ops: list[J.Record]


Op = Generator[Any, Any, Any]
_tuple_new = tuple.__new__
Origin = tuple[str, int, bytes]  # (caller, request id, digest): the request an intent or offer serves
Admission = Callable[[str], Any]  # key -> grant (``.quota``, ``.kernel_quota``, None: the default) or None


@dataclass
class Config:
    low: int = 64  # donate when the kernel has fewer unreserved free frames than this
    high: int = 1024  # reclaim when it has more than this
    target: int = 256  # what donate/reclaim aim for
    headroom: int = 32  # extra frames donated on ENOMEM beyond what the error says
    quota: int | None = None  # user pages per client (None: the budget shared by ``room`` clients)
    kernel_quota: int | None = None  # kernel frames per client (None: 64, less on a very small machine)
    room: int = 16  # clients the default quotas leave room for
    max_alloc: int = 1 << 18  # pages in one alloc
    max_offers: int = 64  # open offers one client may have made
    placement: str = "pageblock"  # or "first-fit" (naive, for comparison)
    compact_every: int = 2000  # journal records between snapshots (a restart replays at most about this many)
    defer_limit: int = 256  # records applied but not yet journaled before a write is forced

    def check(self) -> None:
        if not 0 <= self.low <= self.target <= self.high:
            raise ValueError(f"watermarks must satisfy low <= target <= high (got {self.low}, {self.target}, {self.high})")
        if self.compact_every < 1 or self.defer_limit < 1:
            raise ValueError("compact_every and defer_limit must be at least 1")
        if self.placement not in ("pageblock", "first-fit"):
            raise ValueError(f"placement must be 'pageblock' or 'first-fit', not {self.placement!r}")
        if self.room < 1 or self.max_offers < 1:
            raise ValueError("room and max_offers must be at least 1")
        for name in ("quota", "kernel_quota"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1, not {v}")


def drive(gen: Op, kernel: Callable[[str, dict], Any], persist: Callable[[list], None]) -> Any:
    """Run an operation to completion with synchronous effect handlers (tests, benchmarks)."""
    value: Any = None
    while True:
        try:
            effect = gen.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(effect, KCall):
            value = kernel(effect.call, effect.args)
        else:
            persist(effect.ops)
            value = None


def intent_result(rec: J.Intent) -> dict[str, Any]:
    """The result a request whose intent is ``rec`` gets when the kernel did it: the same dict
    whether the reply is made at once or rebuilt after a crash (so the replies are identical)."""
    out = {"vaddr": rec.vaddr, "pages": rec.pages, "frames": rec.frames}
    if rec.do == "map" and rec.offer:  # an accept
        out["offer"] = rec.offer
        out["prot"] = rec.prot
    return out


def offer_result(rec: J.Offered) -> dict[str, Any]:
    """The result of the ``share`` that made offer ``rec`` (also rebuilt after a crash)."""
    return {"offer": rec.offer, "peer": rec.peer, "pages": rec.pages, "prot": rec.prot}


def _wx(prot: int) -> Error | None:
    if prot & PROT_WRITE and prot & PROT_EXEC:
        return Error(Errno.ENOTSUP, "writable and executable at once (W+X) is not supported", {"field": "prot"})
    return None


@dataclass
class Counters:
    requests: int = 0
    refused: int = 0
    donations: int = 0
    donated_frames: int = 0
    reclaims: int = 0
    reclaimed_frames: int = 0
    enomem_retries: int = 0
    deaths: int = 0
    journal_writes: int = 0
    grants_refused: int = 0  # first requests refused because the budget had no room for the quotas
    adopted: int = 0  # processes recovery found that the view had lost track of
    anomalies: int = 0  # intents the kernel shows neither done nor undone (repaired)
    refs_repaired: int = 0  # frames whose reference count recovery found different (repaired)
    watermark_events: list[str] = field(default_factory=list)


class MMCore:
    def __init__(self, address_map: dict[str, Any], hello: dict[str, Any], config: Config | None = None,
                 admission: Admission | None = None) -> None:
        self.config = cfg = config or Config()
        cfg.check()
        self.admission = admission  # None: every key admitted with the default quotas
        self.naive = cfg.placement == "first-fit"
        sizes = hello.get("large_page_sizes") or []
        self.has_large = bool(sizes)
        self.large_bytes = min(sizes) if sizes else PAGE
        self.view = View(address_map, self.large_bytes // PAGE)
        self.user_top = int(hello["user_top"])
        self.process_cost = int(hello.get("process_cost", 2))
        self.kernel_free = 0  # last figures the kernel told us
        self.kernel_reserved = 0
        self.intent_no = 0
        self.offer_no = 0
        self.unwritten: list[J.Record] = []  # records applied, to be journaled by the next Persist
        self.journaled = 0  # records in the journal (since its last snapshot)
        self.settled: list[tuple[J.Intent, str]] = []  # (intent, "done"/"undo") settled by ``recover``
        self.reports: list[str] = []  # loud findings (anomalies, repairs) for the driver to log
        self.granting: dict[str, tuple[int, int]] = {}  # quotas of processes being created (budget held)
        self.counters = Counters()
        # the budget (I13): what exists, less what the kernel pool's low watermark keeps unreserved
        v = self.view
        pool = sum(int(e["count"]) for e in address_map["entries"] if e.get("kind") == "kernel_pool")
        self.budget = max(0, v.free_count() + pool - cfg.low)
        eligible = int(np.count_nonzero(v.state[: v.kernel_limit] == FREE))
        self.kernel_budget = max(0, eligible + pool - cfg.low)  # kernel quotas need kernel-eligible frames
        share = self.budget // cfg.room
        self.kernel_quota = cfg.kernel_quota or min(DEFAULT_KERNEL_QUOTA, max(self.process_cost + 8, share // 4))
        self.quota = cfg.quota or max(1, share - self.kernel_quota)

    # ---- records and the journal --------------------------------------------------

    def record(self, rec: J.Record) -> None:
        """Apply a record to the view now; the next ``persist`` journals it."""
        self.view.apply(rec)
        self.unwritten.append(rec)

    def persist(self) -> Op:
        """Wait until every record applied so far is durable."""
        batch, self.unwritten = self.unwritten, []
        yield _tuple_new(Persist, (batch,))  # (``Persist(batch)`` without its Python-level __new__)
        self.journaled += len(batch)
        if batch:
            self.counters.journal_writes += 1

    def flush(self) -> Op:
        if self.unwritten:
            yield from self.persist()

    def replay(self, ops: Any) -> int:
        """Rebuild the view from the journal's records (after a restart); returns how many."""
        n = 0
        apply = self.view.apply
        for rec in ops:
            apply(rec)
            n += 1
            if isinstance(rec, J.Snapshot):
                n = 1
        self.journaled = n
        self.intent_no = max([self.view.last_intent, *self.view.pending])
        self.offer_no = self.view.last_offer
        return n

    def snapshot(self) -> J.Snapshot:
        """A snapshot record of the view as it is (unwritten records included: it replaces them too)."""
        self.unwritten = []
        return self.view.snapshot()

    def take_reports(self) -> list[str]:
        out, self.reports = self.reports, []
        return out

    def _report(self, text: str) -> None:
        self.reports.append(text)
        del self.reports[:-100]

    # ---- the kernel's pool ------------------------------------------------------------

    @property
    def unreserved(self) -> int:
        """The kernel's free frames promised to no process (the watermarks are on this)."""
        return self.kernel_free - self.kernel_reserved

    def _note(self, result: Any) -> None:
        if isinstance(result, dict) and "kernel_free" in result:
            self.kernel_free = result["kernel_free"]
            self.kernel_reserved = result.get("kernel_reserved", self.kernel_reserved)

    def _kcall(self, call: str, args: dict[str, Any]) -> Op:
        """A kernel call; when the kernel's pool is short (ENOMEM with ``available``: only proc_create,
        whose quota is reserved whole) it donates what is missing and retries (Genode's upgrade
        loop). ENOMEM with ``limit`` is the process's own kernel quota: never donated for."""
        for attempt in range(ENOMEM_RETRIES + 1):
            result = yield _tuple_new(KCall, (call, args))  # (``KCall(call, args)``, as above)
            self._note(result)
            if not (isinstance(result, Error) and result.code == Errno.ENOMEM) or "limit" in result.details \
                    or attempt == ENOMEM_RETRIES:
                return result
            needed = int(result.details.get("needed", 1))
            available = int(result.details.get("available", 0))
            self.counters.enomem_retries += 1
            if self.view._watched:
                self.view.observer.probe("mm.enomem.donate_retry")
            got = yield from self._donate(needed - available + self.config.headroom)
            if isinstance(got, Error) or got == 0:
                return result
        return result  # pragma: no cover

    def _donate(self, n: int) -> Op:
        """Donate ``n`` free frames (or what there is). They are marked kernel-owned before the kernel
        is asked, so no request in flight picks them, and marked free again if it refuses."""
        v = self.view
        n = min(n, int(np.count_nonzero(v.state[: v.kernel_limit] == FREE)))
        frames = placement.pick(v, n, below=v.kernel_limit, naive=self.naive, owner=KERNEL_TAG) if n > 0 else None
        if frames is None or frames.size == 0:
            return 0
        runs = placement.runs_of(np.sort(frames))
        self.record(J.Donate(runs))
        result = yield KCall("donate", {"frames": runs})
        self._note(result)
        if isinstance(result, Error):
            if result.code != Errno.EIO:  # refused: free again (no answer: the kernel may have them; they stay
                self.record(J.Reclaim(runs))  # marked until recovery asks the kernel)
            return result
        self.counters.donations += 1
        self.counters.donated_frames += int(frames.size)
        return int(frames.size)

    def _reclaim(self, want: int, most: int) -> Op:
        """Take about ``want`` (at most ``most``) free frames back from the kernel. With the
        pageblock policy the mm asks which of its kernel frames are free and names those that
        give whole blocks back first; with first fit (or if the named frames were taken
        meanwhile by a client's own call) the kernel chooses ``want`` frames."""
        if not self.naive:
            free = yield from self._kernel_free_frames()
            if isinstance(free, np.ndarray):
                frames = placement.pick_reclaim(self.view, free, want, most)
                if frames.size:
                    result = yield KCall("reclaim", {"frames": R.from_array(frames)})
                    self._note(result)
                    if not isinstance(result, Error):
                        return result
        result = yield KCall("reclaim", {"count": want})
        self._note(result)
        return result

    def _took_back(self, result: Any) -> int:
        """Record what a reclaim gave back; how many frames."""
        if isinstance(result, dict) and result.get("reclaimed"):
            self.counters.reclaims += 1
            self.counters.reclaimed_frames += result["reclaimed"]
            self.record(J.Reclaim(result["frames"]))
            return int(result["reclaimed"])
        return 0

    def _kernel_free_frames(self) -> Op:
        """The kernel's free frames among those the view shows kernel-owned (a frame_info query)."""
        runs = R.from_array(np.flatnonzero(self.view.state == KERNEL))
        out = []
        for i in range(0, len(runs), MAX_RUNS):
            todo = runs[i:i + MAX_RUNS]
            while todo:
                result = yield KCall("frame_info", {"frames": todo, "max_segments": MAX_SEGMENTS})
                if isinstance(result, Error):
                    return result
                out.extend(np.arange(first, first + count, dtype=np.int64)
                           for first, count, kind, _ in result["segments"] if kind == "kernel_free")
                todo = result["rest"]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def maintain_due(self) -> bool:
        """Whether ``maintain`` has anything to do: the pool is outside the watermarks, or enough records
        are unwritten to force a write."""
        cfg = self.config
        return not cfg.low <= self.unreserved <= cfg.high or len(self.unwritten) >= cfg.defer_limit

    def maintain(self) -> Op:
        """Keep the kernel's unreserved free pool between the watermarks."""
        cfg = self.config
        u = self.unreserved
        if u < cfg.low:
            got = yield from self._donate(cfg.target - u)
            if isinstance(got, int) and got:
                self._event(f"kernel pool {u} < low {cfg.low}: donated {got}")
                if self.view._watched:
                    self.view.observer.probe("mm.watermark.donate")
        elif u > cfg.high:
            result = yield from self._reclaim(u - cfg.target, u - cfg.low)
            if self._took_back(result):
                self._event(f"kernel pool above high {cfg.high}: reclaimed {result['reclaimed']}")
                if self.view._watched:
                    self.view.observer.probe("mm.watermark.reclaim")
        if len(self.unwritten) >= cfg.defer_limit:
            yield from self.flush()

    def _event(self, text: str) -> None:
        ev = self.counters.watermark_events
        ev.append(text)
        del ev[:-50]

    def refresh(self) -> Op:
        """Learn the kernel's pool figures (start-up, or when unsure)."""
        result = yield KCall("stats", {})
        self._note(result)
        return result

    # ---- quotas and the budget (I13) ---------------------------------------------------

    def grant_of(self, key: str) -> tuple[int, int] | Error:
        """The quotas (user pages, kernel frames) a new process of ``key`` would get, or EPERM if the
        key is not admitted (the admitted certificate's metadata may override the defaults)."""
        g = None
        if self.admission is not None:
            g = self.admission(key)
            if g is None:
                return Error(Errno.EPERM, "this key is not admitted as a client (the operator admits keys)")
        quota = g.quota if g is not None and g.quota is not None else self.quota
        kquota = g.kernel_quota if g is not None and g.kernel_quota is not None else self.kernel_quota
        return int(quota), int(kquota)

    def granted(self) -> tuple[int, int]:
        """(user pages, kernel frames) granted: live clients and processes being made."""
        v = self.view
        return (v.granted_user + sum(u for u, _ in self.granting.values()),
                v.granted_kernel + sum(k for _, k in self.granting.values()))

    def _fits(self, quota: int, kquota: int) -> Error | None:
        """ENOMEM if granting these quotas would overcommit (the sum of all quotas beyond the budget)."""
        if kquota < self.process_cost:
            return Error(Errno.ENOMEM, f"your kernel quota of {kquota} frame(s) is less than the {self.process_cost} "
                         "a process costs", {"needed": self.process_cost, "kernel_quota": kquota})
        gu, gk = self.granted()
        room = self.budget - gu - gk
        kroom = self.kernel_budget - gk
        if quota + kquota > room or kquota > kroom:
            self.counters.grants_refused += 1
            if self.view._watched:
                self.view.observer.probe("mm.quota.grant_refused")
            return Error(Errno.ENOMEM, f"the mm cannot grant your quotas ({quota} user pages and {kquota} kernel "
                         f"frames): {gu + gk} of the {self.budget} frames it may grant are granted to "
                         f"{len(self.view.clients) + len(self.granting)} client(s); try again when one exits",
                         {"needed": quota + kquota, "available": max(0, min(room, kroom + quota)),
                          "quota": quota, "kernel_quota": kquota})
        return None

    def _create(self, key: str, grant: tuple[int, int]) -> Op:
        """Make ``key``'s process with its quotas (budget checked first). (client, made by us?) or Error."""
        quota, kquota = grant
        if (e := self._fits(quota, kquota)) is not None:
            return e
        self.granting[key] = grant
        try:
            result = yield from self._kcall("proc_create", {"key": key, "kernel_quota": kquota, "user_quota": quota})
        finally:
            self.granting.pop(key, None)
        if isinstance(result, Error):
            if result.code == Errno.EBUSY and "pid" in result.details:  # the kernel has one: we lost track of it
                if self.view._watched:
                    self.view.observer.probe("mm.process.adopted")
                d = result.details
                self.record(J.NewClient(key, int(d["pid"]), int(d.get("user_quota") or quota),
                                        int(d.get("kernel_limit") or kquota)))
                return self.view.clients[key], False
            if result.code == Errno.ENOMEM:
                return Error(Errno.ENOMEM, f"the kernel's pool has no room for your kernel quota ({kquota} frames) "
                             "and the mm has no free frame to donate", result.details)
            return result
        self.record(J.NewClient(key, result["pid"], quota, kquota))
        return self.view.clients[key], True

    def _destroy(self, c: ClientState) -> Op:
        """Undo the process a refused request made: no process, mapping or charge remains."""
        result = yield KCall("proc_destroy", {"pid": c.pid})
        self._note(result)
        if not isinstance(result, Error) or result.code == Errno.ESRCH:
            self.record(J.ClientGone(c.key))
        # (EIO: the kernel is away; the process stays the client's, with nothing charged, until it exits)

    # ---- client requests ----------------------------------------------------------

    def request(self, key: str, call: str, args: Any, origin: Origin | None = None) -> Op:
        """One client request (args already validated by protocol.calls.MM_CALLS). ``origin``
        (caller, request id, digest) goes into its intent or offer, so that after a crash the
        request gets the reply it got (or would have got)."""
        self.counters.requests += 1
        if call == "alloc":
            result = yield from self.alloc(key, args, origin)
        elif call == "free":
            result = yield from self.free(key, args, origin)
        elif call == "share":
            result = yield from self.share(key, args, origin)
        elif call == "accept":
            result = yield from self.accept(key, args, origin)
        elif call == "stats":
            result = self.stats(key)
        elif call in ("hello", "ping"):
            result = self.hello(key)
        else:
            result = Error(Errno.ENOSYS, f"unknown call {call!r}")
        if isinstance(result, Error):
            self.counters.refused += 1
        return result

    def _place_vaddr(self, c: ClientState, pages: int, align: int) -> int | None:
        size = pages * PAGE
        v = -(-c.va_next // align) * align
        if v + size <= self.user_top and c.overlaps(v, pages) is None:
            return v
        # first fit over the gaps
        v = -(-0x40_0000 // align) * align
        for start in c.starts + [self.user_top]:
            if v + size <= start:
                if c.overlaps(v, pages) is None:
                    return v
            m = c.maps.get(start)
            if m is not None:
                v = max(v, -(-(m.vaddr + m.pages * PAGE) // align) * align)
        return None

    def _check_vaddr(self, vaddr: int | None, pages: int, align: int) -> Error | None:
        if vaddr is None:
            return None
        if vaddr % align:
            return Error(Errno.EINVAL, f"args.vaddr: {vaddr:#x} is not aligned to {align:#x}", {"field": "vaddr"})
        if vaddr + pages * PAGE > self.user_top:
            return Error(Errno.EINVAL, f"args.vaddr: the range goes beyond user space ({self.user_top:#x})",
                         {"field": "vaddr"})
        return None

    def _vaddr_for(self, c: ClientState, vaddr: int | None, pages: int, align: int) -> int | Error:
        if vaddr is not None:
            hit = c.overlaps(vaddr, pages)
            if hit is not None:
                return Error(Errno.EBUSY, f"virtual address {hit.vaddr:#x} is already allocated", {"vaddr": hit.vaddr})
            return vaddr
        v = self._place_vaddr(c, pages, align)
        if v is None:
            return Error(Errno.ENOMEM, "no free virtual range of that size in your address space",
                         {"needed": pages, "available": 0})
        return v

    def _over_quota(self, charged: int, pages: int, quota: int) -> Error | None:
        if charged + pages > quota:
            if self.view._watched:
                self.view.observer.probe("mm.quota.refused")
            return Error(Errno.ENOMEM, f"quota exceeded: {charged} + {pages} pages > your quota of {quota}",
                         {"limit": quota, "used": charged, "needed": pages})  # (as the kernel's quota refusal)
        return None

    def _no_memory(self, pages: int, large: bool) -> Error:
        v = self.view
        if large:
            blocks = pages // v.block
            whole = int(np.count_nonzero(v.bfree == v.block))
            return Error(Errno.ENOMEM, f"no {blocks} free large-aligned block(s) of {v.block} frames ({whole} left): "
                         "the memory may be free but not in aligned blocks (the one ENOMEM a client within its quota "
                         "can get)", {"needed": pages, "available": whole * v.block})
        return Error(Errno.ENOMEM, f"out of user memory: {pages} pages wanted, {v.free_count()} frames free",
                     {"needed": pages, "available": v.free_count()})

    def _room_for(self, pages: int, large: bool) -> bool:
        """Could ``pages`` be picked now (counting what the kernel's pool would give back)?"""
        v = self.view
        if large:
            return int(np.count_nonzero(v.bfree == v.block)) * v.block >= pages
        return v.free_count() + max(0, self.unreserved) >= pages

    def _frames(self, c: ClientState, pages: int, large: bool) -> Op:
        """The frames for a request of ``c``, as runs (None if there are none): when the view has too few
        free frames but the kernel's pool holds unreserved ones, it reclaims them and picks again."""
        if pages == 1 and not large and not self.naive:  # one page: its frame without arrays
            f = placement.pick_one(self.view, c.tag)
            if f >= 0:
                return [[f, 1]]
            frames = None
        else:
            frames = placement.pick(self.view, pages, large=large, naive=self.naive, owner=c.tag)
        if frames is None and not large:
            short = pages - self.view.free_count()
            if 0 < short and self.unreserved > 0:
                if self.view._watched:
                    self.view.observer.probe("mm.reclaim_for_alloc")
                result = yield KCall("reclaim", {"count": min(short, self.unreserved)})
                self._note(result)
                self._took_back(result)
                frames = placement.pick(self.view, pages, naive=self.naive, owner=c.tag)
        if frames is None:
            return None
        return [[int(frames[0]), 1]] if frames.size == 1 else placement.runs_of(frames)

    def alloc(self, key: str, args: Any, origin: Origin | None = None) -> Op:
        pages, large = args.pages, args.large
        block = self.view.block
        if (e := _wx(args.prot)) is not None:
            return e
        if pages > self.config.max_alloc:
            return Error(Errno.EINVAL, f"args.pages: at most {self.config.max_alloc} pages per alloc", {"field": "pages"})
        if large and not self.has_large:
            return Error(Errno.ENOTSUP, "this machine has no large pages", {"field": "large"})
        if large and (pages % block):
            return Error(Errno.EINVAL, f"args.pages: a large alloc is a multiple of {block} pages "
                         f"({self.large_bytes // 1024} KiB)", {"field": "pages"})
        align = self.large_bytes if large else PAGE
        if (e := self._check_vaddr(args.vaddr, pages, align)) is not None:
            return e
        c = self.view.clients.get(key)
        grant: tuple[int, int] | Error | None = None
        if c is None:
            grant = self.grant_of(key)
            if isinstance(grant, Error):
                return grant
            if (e := self._over_quota(0, pages, grant[0])) is not None:
                return e
        else:
            if (e := self._over_quota(c.charged, pages, c.quota)) is not None:
                return e
            v = self._vaddr_for(c, args.vaddr, pages, align)
            if isinstance(v, Error):
                return v
        if not self._room_for(pages, large):
            return self._no_memory(pages, large)
        created = False
        if c is None:  # everything is checked: now the process, then the frames
            assert isinstance(grant, tuple)
            got = yield from self._create(key, grant)
            if isinstance(got, Error):
                return got
            c, created = got
            v = self._vaddr_for(c, args.vaddr, pages, align)  # (a live client's: found above, nothing changed since)
        runs = None if isinstance(v, Error) else (yield from self._frames(c, pages, large))
        if isinstance(v, Error) or runs is None:
            if created:
                yield from self._destroy(c)
            return v if isinstance(v, Error) else self._no_memory(pages, large)
        return (yield from self._map(c, v, pages, args.prot, large, runs, 0, origin, created))

    def _map(self, c: ClientState, vaddr: int, pages: int, prot: int, large: bool, runs: list, offer: int,
             origin: Origin | None, created: bool = False) -> Op:
        self.intent_no += 1
        rec = J.Intent(self.intent_no, "map", c.key, vaddr, pages, runs, prot, large, offer, *(origin or (None,) * 3))
        self.record(rec)
        yield from self.persist()  # durable before the kernel is asked
        result = yield from self._kcall("map", {"pid": c.pid, "vaddr": vaddr, "frames": runs, "prot": prot,
                                                "large": large})
        if isinstance(result, Error):
            if result.code == Errno.EIO:  # no answer: the kernel may have done it; it stays pending until
                return result  # ``recover`` asks the kernel
            self.record(J.Undo(rec.n))
            if created:
                yield from self._destroy(c)
            return self._kernel_refusal(result)
        self.record(J.Done(rec.n))
        return intent_result(rec)

    @staticmethod
    def _kernel_refusal(err: Error) -> Error:
        d = err.details
        if err.code == Errno.ENOMEM and "limit" in d:
            return Error(Errno.ENOMEM, f"your kernel quota is used up: this needs {d.get('needed')} more kernel "
                         f"frame(s) (page tables) and {d.get('used')} of your {d['limit']} are in use",
                         {"needed": d.get("needed"), "limit": d["limit"], "used": d.get("used"),
                          "kernel_quota": d["limit"]})
        return err

    def free(self, key: str, args: Any, origin: Origin | None = None) -> Op:
        c = self.view.clients.get(key)
        m = c.maps.get(args.vaddr) if c else None
        if m is None:
            return Error(Errno.EINVAL, f"no allocation starts at {args.vaddr:#x}", {"vaddr": args.vaddr})
        if m.pages != args.pages:
            return Error(Errno.EINVAL, f"args.pages: the allocation at {args.vaddr:#x} has {m.pages} pages, "
                         f"not {args.pages}; free it whole", {"field": "pages"})
        if m.pending:
            return Error(Errno.EAGAIN, f"the allocation at {args.vaddr:#x} is still being settled with the kernel; "
                         "try again", {"vaddr": args.vaddr})
        assert c is not None
        self.intent_no += 1
        rec = J.Intent(self.intent_no, "unmap", key, m.vaddr, m.pages, m.frames, m.prot, m.large, m.offer,
                       *(origin or (None,) * 3))
        self.record(rec)  # (the offers of this allocation die here)
        yield from self.persist()
        result = yield from self._kcall("unmap", {"pid": c.pid, "vaddr": m.vaddr, "pages": m.pages})
        if isinstance(result, Error):
            if result.code != Errno.EIO:
                self.record(J.Undo(rec.n))
            return result
        self.record(J.Done(rec.n))
        return intent_result(rec)

    def share(self, key: str, args: Any, origin: Origin | None = None) -> Op:
        """An offer of the caller's allocation at ``vaddr`` to ``peer``; nothing is mapped until the peer
        accepts it. The offer is journaled before the reply (a resend after a restart gets this offer)."""
        if (e := _wx(args.prot)) is not None:
            return e
        c = self.view.clients.get(key)
        m = c.maps.get(args.vaddr) if c else None
        if c is None or m is None:
            return Error(Errno.EINVAL, f"no allocation starts at {args.vaddr:#x}", {"vaddr": args.vaddr})
        if m.pages != args.pages:
            return Error(Errno.EINVAL, f"args.pages: the allocation at {args.vaddr:#x} has {m.pages} pages; "
                         "share it whole", {"field": "pages"})
        if m.pending:
            return Error(Errno.EAGAIN, f"the allocation at {args.vaddr:#x} is still being settled with the kernel; "
                         "try again", {"vaddr": args.vaddr})
        if args.peer == key:
            return Error(Errno.EINVAL, "args.peer: a client cannot share with itself", {"field": "peer"})
        if args.prot & ~m.prot:
            return Error(Errno.EPERM, "a share cannot grant more access than the allocation has")
        if args.peer not in self.view.clients or (self.admission is not None and self.admission(args.peer) is None):
            return Error(Errno.ESRCH, f"no admitted client with a live process has the key {args.peer[:12]}...",
                         {"peer": args.peer})
        if len(c.offers_out) >= self.config.max_offers:
            return Error(Errno.EAGAIN, f"you have {len(c.offers_out)} open offers, the most one client may have: "
                         "wait until peers accept them, or free the allocations offered",
                         {"limit": self.config.max_offers})
        self.offer_no += 1
        rec = J.Offered(self.offer_no, key, m.vaddr, m.pages, args.prot, args.peer, *(origin or (None,) * 3))
        self.record(rec)
        yield from self.persist()
        return offer_result(rec)

    def accept(self, key: str, args: Any, origin: Origin | None = None) -> Op:
        """Map an offer made to the caller into its own address space, charged to its own quota."""
        off = self.view.offers.get(args.offer)
        if off is None or off.peer != key:
            return Error(Errno.ESRCH, f"no open offer {args.offer} for you", {"offer": args.offer})
        if off.taken:
            return Error(Errno.EAGAIN, f"offer {args.offer} is being accepted already", {"offer": args.offer})
        c = self.view.clients[key]
        src = self.view.clients[off.key].maps[off.vaddr]
        align = self.large_bytes if src.large else PAGE
        if (e := self._check_vaddr(args.vaddr, off.pages, align)) is not None:
            return e
        if (e := self._over_quota(c.charged, off.pages, c.quota)) is not None:
            return e
        v = self._vaddr_for(c, args.vaddr, off.pages, align)
        if isinstance(v, Error):
            return v
        result = yield from self._map(c, v, off.pages, off.prot, src.large, src.frames, off.offer, origin)
        if self.view._watched and not isinstance(result, Error):
            self.view.observer.probe("mm.offer.accepted")
        return result

    def hello(self, key: str) -> dict[str, Any]:
        c = self.view.clients.get(key)
        out = {"identity": key, "pid": c.pid if c else None, "large_page_size": self.large_bytes}
        return {**out, **self._quotas(key, c)}

    def _quotas(self, key: str, c: ClientState | None) -> dict[str, Any]:
        """A client's quotas (granted, or what it would be granted), what is charged, its offers."""
        if c is not None:
            quota, kquota = c.quota, c.kernel_quota
        else:
            g = self.grant_of(key)
            quota, kquota = g if isinstance(g, tuple) else (0, 0)
        v = self.view
        return {"quota": quota, "kernel_quota": kquota, "charged": c.charged if c else 0,
                "offers": {"made": len(c.offers_out) if c else 0,
                           "to_you": [{"offer": o, "from": v.offers[o].key, "pages": v.offers[o].pages,
                                       "prot": v.offers[o].prot} for o in sorted(c.offers_in)[:64]] if c else []}}

    def stats(self, key: str | None = None) -> dict[str, Any]:
        c = self.view.clients.get(key) if key else None
        k = self.counters
        gu, gk = self.granted()
        return {
            "view": self.view.counts(),
            "kernel_free": self.kernel_free,
            "kernel_reserved": self.kernel_reserved,
            "clients": len(self.view.clients),
            "quota": self.quota,
            "kernel_quota": self.kernel_quota,
            "budget": {"frames": self.budget, "granted": gu + gk, "granted_user": gu, "granted_kernel": gk},
            "offers": len(self.view.offers),
            "pending": len(self.view.pending),  # intents whose kernel call is not settled yet
            "watermarks": {"low": self.config.low, "target": self.config.target, "high": self.config.high},
            "you": ({"pid": c.pid, "mappings": len(c.maps), **self._quotas(c.key, c)} if c else None),
            "counters": {"requests": k.requests, "refused": k.refused, "donations": k.donations,
                         "donated_frames": k.donated_frames, "reclaims": k.reclaims,
                         "reclaimed_frames": k.reclaimed_frames, "enomem_retries": k.enomem_retries,
                         "deaths": k.deaths, "journal_writes": k.journal_writes, "grants_refused": k.grants_refused,
                         "adopted": k.adopted, "anomalies": k.anomalies, "refs_repaired": k.refs_repaired},
            "watermark_events": k.watermark_events[-10:],
        }

    # ---- client death -------------------------------------------------------------

    def poll_events(self) -> Op:
        """Read the kernel's destroyed-process events and forget those clients (their quotas go back)."""
        while True:
            result = yield KCall("events", {"since": self.view.event_seq})
            if isinstance(result, Error):
                return result
            self._note(result)  # the pool grew by what the dead processes' objects held
            n = 0
            for ev in result["events"]:
                c = self.view.clients.get(ev["key"])
                if ev["kind"] == "proc_destroyed" and c is not None and c.pid == ev["pid"]:
                    self.record(J.ClientGone(ev["key"]))  # (lost in a crash: recovery reads the events again)
                    self.counters.deaths += 1
                    n += 1
            if result["events"]:
                self.record(J.EventsRead(result["next"]))
            if result.get("lost", False):
                yield from self._sync_clients()
            if not result["events"] or result["next"] >= result.get("latest", 0):
                return n

    def _processes(self) -> Op:
        """The kernel's processes (its paginated per-process listing): key -> usage, or an Error."""
        out: dict[str, dict[str, Any]] = {}
        start = 0
        while True:
            st = yield KCall("stats", {"from_pid": start, "limit": LISTING_PAGE})
            if isinstance(st, Error):
                return st
            self._note(st)
            for p in st["per_process"]:
                out[p["key"]] = p
            if st.get("next_pid") is None:
                return out
            start = st["next_pid"]

    def _sync_clients(self, adopt: bool = False) -> Op:
        """Drop clients whose process the kernel no longer has; with ``adopt``, take on the processes the
        kernel has that the view lost track of (made just before a crash), with the quotas they have."""
        procs = yield from self._processes()
        if isinstance(procs, Error):
            return procs
        for key, c in list(self.view.clients.items()):
            p = procs.get(key)
            if p is None or p["pid"] != c.pid:
                self.record(J.ClientGone(key))
                self.counters.deaths += 1
        if adopt:
            for key, p in procs.items():
                if key not in self.view.clients:
                    self.record(J.NewClient(key, p["pid"], int(p.get("user_quota") or 0), int(p["kernel_limit"])))
                    self.counters.adopted += 1
        return procs

    # ---- recovery: exact settlement --------------------------------------------------

    def kernel_frames(self) -> Op:
        """The kernel's frame table as arrays (kind code 0 none / 1 kernel / 2 user, refs)."""
        n = self.view.n
        kinds = np.zeros(n, dtype=np.uint8)
        refs = np.zeros(n, dtype=np.uint32)
        todo = [[0, n]]
        while todo:
            result = yield KCall("frame_info", {"frames": todo, "max_segments": MAX_SEGMENTS})
            if isinstance(result, Error):
                return result
            for first, count, kind, r in result["segments"]:
                kinds[first:first + count] = KIND_CODE.get(kind, 0)
                refs[first:first + count] = r
            todo = result["rest"]
        return kinds, refs

    def _mappings(self, pid: int, vaddr: int, pages: int) -> Op:
        """What the mm mapped in process ``pid`` over the range: segments [vaddr, pages, first frame, prot,
        page size] (the kernel's paginated ``mappings``; the client's own maps left out), or an Error."""
        segs: list[list[int]] = []
        v, end = vaddr, vaddr + pages * PAGE
        while True:
            r = yield KCall("mappings", {"pid": pid, "vaddr": v, "pages": (end - v) // PAGE,
                                         "max_segments": MAX_SEGMENTS})
            if isinstance(r, Error):
                return r
            segs.extend([s[0], s[1], s[2], s[3], s[5]] for s in r["segments"] if s[4] == "mm")
            if r["rest"] is None:
                return segs
            v = r["rest"]

    @staticmethod
    def _matches(segs: list[list[int]], vaddr: int, pages: int, frames: list, prot: int) -> bool:
        """Do the segments map exactly ``frames`` over [vaddr, vaddr + pages) with ``prot``, nothing else?"""
        got = np.full(pages, -1, dtype=np.int64)
        for sv, n, first, p, _ in segs:
            lo = (sv - vaddr) // PAGE
            if lo < 0 or lo + n > pages or p != prot:
                return False  # (a mapping reaching outside the range, or another protection)
            got[lo:lo + n] = np.arange(first, first + n, dtype=np.int64)
        return bool(np.array_equal(got, R.to_array(frames)))

    def _settle(self, p: J.Intent) -> Op:
        """Settle one pending intent by asking the kernel what that process maps in that range:
        "done", "undo", "gone" (the process died: settled with it) or an Error (recovery stops)."""
        c = self.view.clients.get(p.key)
        if c is None:
            return "gone"
        segs = yield from self._mappings(c.pid, p.vaddr, p.pages)
        if isinstance(segs, Error):
            if segs.code == Errno.ESRCH:
                self.record(J.ClientGone(p.key))
                self.counters.deaths += 1
                return "gone"
            return segs
        if not segs:
            outcome = "undo" if p.do == "map" else "done"
        elif self._matches(segs, p.vaddr, p.pages, p.frames, p.prot):
            outcome = "done" if p.do == "map" else "undo"
        else:  # neither what the intent asked nor nothing: make the kernel hold nothing there, loudly
            self.counters.anomalies += 1
            self._report(f"recovery: intent {p.n} ({p.do} of {p.pages} page(s) at {p.vaddr:#x} in pid {c.pid}) is "
                         f"neither done nor undone: the kernel maps {segs[:4]}; unmapping what is there")
            for sv, n, *_ in segs:
                r = yield KCall("unmap", {"pid": c.pid, "vaddr": sv, "pages": n})
                self._note(r)
                if isinstance(r, Error) and r.code != Errno.EINVAL:
                    return r
            outcome = "undo" if p.do == "map" else "done"
            if self.view._watched:
                self.view.observer.probe("mm.recovery.neither")
        if self.view._watched:
            self.view.observer.probe(f"mm.recovery.{p.do}.{'done' if outcome == 'done' else 'undone'}")
        self.record(J.Done(p.n) if outcome == "done" else J.Undo(p.n))
        return outcome

    def recover(self) -> Op:
        """After a restart from the journal (or a kernel that was away): settle with the kernel, repair,
        and report (I8). Pending intents are settled one at a time in journal order, each by asking the
        kernel about exactly its process and range (``_settle``), and applied before the next is judged;
        then every frame's reference count is compared with the kernel's and the view made to match
        it exactly. The intents it settles are left in ``settled`` (for the replies of their requests:
        ``MMService.recover``). Running it again after a crash in the middle settles the rest."""
        self.settled = []
        for step in (self.refresh, self.poll_events):
            r = yield from step()
            if isinstance(r, Error):
                return r
        r = yield from self._sync_clients(adopt=True)
        if isinstance(r, Error):
            return r
        for n in sorted(self.view.pending):
            p = self.view.pending.get(n)
            if p is None:
                continue  # settled with its process's death
            outcome = yield from self._settle(p)
            if isinstance(outcome, Error):
                return outcome
            if outcome != "gone":
                self.settled.append((p, outcome))
        got = yield from self.kernel_frames()
        if isinstance(got, Error):
            return got
        kinds, refs = got
        before = self.view.compare(kinds, refs)
        repairs = yield from self._repair(kinds, refs, before["arrays"])
        if isinstance(repairs, Error):
            return repairs
        yield from self.persist()
        after = self.view.compare(kinds, refs)
        after.pop("arrays")
        before.pop("arrays")
        return {"settled_intents": len(self.settled), "found": before, "repairs": repairs, "remaining": after}

    def _repair(self, kinds: np.ndarray, refs: np.ndarray, arr: dict[str, np.ndarray]) -> Op:
        """Make the view match the kernel's frame table; how many repair records it took."""
        n = 0
        if arr["free_but_kernel"].size:  # a donation that was not journaled
            self.record(J.Repair(R.from_array(arr["free_but_kernel"]), KERNEL))
            n += 1
        back = arr["kernel_but_user"]
        if back.size and (free_back := back[refs[back] == 0]).size:  # a reclaim not journaled, or a refused donation
            self.record(J.Repair(R.from_array(free_back), FREE))
            n += 1
        user = kinds == 2
        differ = np.flatnonzero(user & (refs != self.view.refs))
        if not differ.size:
            return n
        # reference counts differ: read every allocation of the live clients that maps such a frame
        self.counters.refs_repaired += int(differ.size)
        self._report(f"recovery: {differ.size} frame(s) have a reference count the kernel does not share "
                     f"(first runs {R.from_array(differ)[:4]}); reading those allocations from the kernel")
        mark = np.zeros(self.view.n, dtype=bool)
        mark[differ] = True
        for c in list(self.view.clients.values()):
            for m in list(c.maps.values()):
                if not mark[R.to_array(m.frames)].any():
                    continue
                segs = yield from self._mappings(c.pid, m.vaddr, m.pages)
                if isinstance(segs, Error):
                    if segs.code == Errno.ESRCH:
                        self.record(J.ClientGone(c.key))
                        break
                    return segs
                if not self._matches(segs, m.vaddr, m.pages, m.frames, m.prot):
                    self.record(J.RepairMapping(c.key, m.vaddr, [[sv, k, f, p, int(ps > PAGE)]
                                                                 for sv, k, f, p, ps in segs]))
                    n += 1
        # still different: mappings the view has no allocation for (a process it had lost track of, say):
        # read the live clients' whole address spaces and take on what the mm mapped there
        rest = np.flatnonzero(user & (refs != self.view.refs))
        if rest.size:
            for c in list(self.view.clients.values()):
                segs = yield from self._mappings(c.pid, 0, self.user_top // PAGE)
                if isinstance(segs, Error):
                    if segs.code == Errno.ESRCH:
                        continue
                    return segs
                found = [piece for seg in segs for piece in self._uncovered(c, seg)]
                if found:
                    self.record(J.RepairMapping(c.key, -1, found))
                    n += 1
        # what still differs is mapped where no allocation of any live client is: never hand it out
        rest = np.flatnonzero(user & (refs != self.view.refs))
        for r in np.unique(refs[rest]).tolist():
            these = rest[refs[rest] == r]
            self.record(J.Repair(R.from_array(these), USED if r else FREE, int(r)))
            n += 1
        if rest.size:
            self._report(f"recovery: {rest.size} frame(s) are mapped by no allocation the mm knows; kept in use "
                         f"(never handed out): first runs {R.from_array(rest)[:4]}")
        return n

    @staticmethod
    def _uncovered(c: ClientState, seg: list[int]) -> list[list[int]]:
        """The parts of a kernel segment [vaddr, pages, first, prot, page size] that no mapping of ``c``
        covers, as [vaddr, pages, first, prot, large] (a large page only whole)."""
        sv, k, first, prot, ps = seg
        end = sv + k * PAGE
        if ps > PAGE:
            return [] if c.overlaps(sv, k) is not None else [[sv, k, first, prot, 1]]
        out = []
        v = sv
        i = bisect.bisect_right(c.starts, v) - 1
        i = max(i, 0)
        while v < end:
            m = c.maps[c.starts[i]] if i < len(c.starts) else None
            if m is not None and m.vaddr + m.pages * PAGE <= v:
                i += 1
                continue
            stop = end if m is None else min(end, max(v, m.vaddr))
            if stop > v:
                out.append([v, (stop - v) // PAGE, first + (v - sv) // PAGE, prot, 0])
            if m is None:
                break
            v = max(v, m.vaddr + m.pages * PAGE)
            i += 1
        return out

    # ---- audit ---------------------------------------------------------------------------

    def audit(self) -> Op:
        """Compare the view with the kernel frame by frame (I8) and check the charges (I13). Changes
        nothing (except learning of deaths first)."""
        r = yield from self.poll_events()
        if isinstance(r, Error):
            return r
        got = yield from self.kernel_frames()
        if isinstance(got, Error):
            return got
        kinds, refs = got
        procs = yield from self._processes()
        if isinstance(procs, Error):
            return procs
        report = self.view.compare(kinds, refs)
        report.pop("arrays")
        report["kernel_view"] = {
            "none": int(np.count_nonzero(kinds == 0)), "kernel": int(np.count_nonzero(kinds == 1)),
            "user_free": int(np.count_nonzero((kinds == 2) & (refs == 0))),
            "user_mapped": int(np.count_nonzero((kinds == 2) & (refs > 0)))}
        report["mm_view"] = self.view.counts()
        report["pending"] = len(self.view.pending)
        report["i13"] = self._charges(kinds, refs, procs)
        report["i13_problems"] = len(report["i13"]["problems"])
        k = self.counters
        report["repaired"] = {"anomalies": k.anomalies, "refs_repaired": k.refs_repaired, "adopted": k.adopted}
        return report

    def _charges(self, kinds: np.ndarray, refs: np.ndarray, procs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """I13 at the mm: every user page charged to the clients that map it, the charges adding up to the
        view's and the kernel's reference counts, and each kernel quota what the mm granted."""
        v = self.view
        problems: list[str] = []
        rows = []
        for key, c in v.clients.items():
            mapped = sum(m.pages for m in c.maps.values())
            p = procs.get(key)
            if c.charged != mapped:
                problems.append(f"client {key[:8]}: charged {c.charged} pages, its mappings hold {mapped}")
            if c.charged > c.quota:
                problems.append(f"client {key[:8]}: charged {c.charged} pages, beyond its quota of {c.quota}")
            if p is None:
                problems.append(f"client {key[:8]} (pid {c.pid}): the kernel has no process for it")
            elif (p["kernel_limit"], p.get("user_quota")) != (c.kernel_quota, c.quota):
                problems.append(f"client {key[:8]}: the kernel shows quotas {p['kernel_limit']} kernel frames and "
                                f"{p.get('user_quota')} pages, the mm granted {c.kernel_quota} and {c.quota}")
            rows.append({"key": key, "pid": c.pid, "quota": c.quota, "charged": c.charged,
                         "kernel_quota": c.kernel_quota, "kernel_used": p["kernel_used"] if p else None,
                         "offers": len(c.offers_out)})
        for key, p in procs.items():
            if key not in v.clients:
                problems.append(f"the kernel's process {p['pid']} (key {key[:8]}) is unknown to the mm")
        charged = sum(c.charged for c in v.clients.values())
        view_refs = int(v.refs.sum(dtype=np.int64))
        kernel_refs = int(refs[kinds == 2].sum(dtype=np.int64))
        if charged != view_refs:
            problems.append(f"the clients are charged {charged} pages, the view counts {view_refs} references")
        if charged != kernel_refs and not v.pending:
            problems.append(f"the clients are charged {charged} pages, the kernel counts {kernel_refs} references")
        gu, gk = self.granted()
        if gu + gk > self.budget:
            problems.append(f"{gu + gk} frames granted, beyond the budget of {self.budget}")
        return {"problems": problems, "charged": charged, "view_refs": view_refs, "kernel_refs": kernel_refs,
                "budget": self.budget, "granted_user": gu, "granted_kernel": gk, "clients": rows[:64]}
