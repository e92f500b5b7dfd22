"""The memory manager's policy, written sans-I/O as generators of effects.

Rules for this file: no sockets, clocks, randomness or I/O. Every operation is
a generator that *yields* effects and receives their outcomes:

- ``KCall(call, args)``: a kernel system call; the driver sends back the
  result dict or an ``Error`` (a lost kernel is ``Error(EIO)``).
- ``Persist(ops)``: journal ops durably; the driver sends back None. The
  policy applies the ops to its view once they are journaled.

and *returns* the reply for its caller (a dict or an ``Error``). A driver
(the ZeroMQ server, the simulator, a test) runs it with ``drive``. Each client
request is one generator; the mm runs them one at a time.

Durability: an intent op is journaled before the kernel is asked to map or
unmap, and it carries the request's identity (caller, request id, digest).
That one write is the only one a request needs before its reply: its outcome
(``done``/``undo``), a new client's process, donations and the events read
are applied at once and ride with the next write (``_later``), because
recovery re-derives each of them from the kernel: after a crash ``recover``
settles pending intents by asking the kernel what really happened (and
reports them in ``settled``, so the service answers a resend with the reply
the request got, I12), then reconciles every frame (I8). The journal is
always a prefix of the ops applied, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, NamedTuple

import numpy as np

from mm_service.view import FREE, KERNEL, KERNEL_TAG, PAGE, USED, View
from protocol import runs as R
from protocol.errors import Errno, Error
from protocol.calls import MAX_SEGMENTS
from protocol.wire import MAX_RUNS

ENOMEM_RETRIES = 3
KIND_CODE = {"none": 0, "kernel_free": 1, "kernel_used": 1, "kernel_shared": 1, "user": 2}


class KCall(NamedTuple):
    call: str
    args: dict[str, Any]


class Persist(NamedTuple):
    ops: list[dict[str, Any]]


Op = Generator[Any, Any, Any]


@dataclass
class Config:
    low: int = 64  # donate when the kernel has fewer free frames than this
    high: int = 1024  # reclaim when it has more than this
    target: int = 256  # what donate/reclaim aim for
    headroom: int = 32  # extra frames donated on ENOMEM beyond what the error says
    quota: int | None = None  # pages per client (None: a quarter of user RAM)
    kernel_quota: int = 64  # kernel frames per client (page tables, threads, endpoints, its address space)
    max_alloc: int = 1 << 18  # pages in one alloc
    placement: str = "pageblock"  # or "first-fit" (naive, for comparison)
    compact_every: int = 2000  # journal ops between snapshots (a restart replays at most about this many)
    defer_limit: int = 256  # ops applied but not yet journaled before a write is forced

    def check(self) -> None:
        if not 0 <= self.low <= self.target <= self.high:
            raise ValueError(f"watermarks must satisfy low <= target <= high (got {self.low}, {self.target}, {self.high})")
        if self.compact_every < 1 or self.defer_limit < 1:
            raise ValueError("compact_every and defer_limit must be at least 1")
        if self.placement not in ("pageblock", "first-fit"):
            raise ValueError(f"placement must be 'pageblock' or 'first-fit', not {self.placement!r}")


def drive(gen: Op, kernel: Callable[[str, dict], Any], persist: Callable[[list[dict]], None]) -> Any:
    """Run an operation to completion with synchronous effect handlers."""
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


def intent_result(op: dict[str, Any]) -> dict[str, Any]:
    """The result a request whose intent is ``op`` gets when the kernel did it: the same dict
    whether the reply is made at once or rebuilt after a crash (so the replies are identical)."""
    out = {"vaddr": op["vaddr"], "pages": op["pages"], "frames": op["frames"]}
    if op["do"] == "map" and not op.get("owner", True):
        out["peer"] = op["key"]  # a share: the peer's new mapping
    return out


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
    watermark_events: list[str] = field(default_factory=list)


class MMCore:
    def __init__(self, address_map: dict[str, Any], hello: dict[str, Any], config: Config | None = None) -> None:
        self.config = config or Config()
        self.config.check()
        self.naive = self.config.placement == "first-fit"
        sizes = hello.get("large_page_sizes") or [PAGE]
        self.large_bytes = min(sizes)
        self.view = View(address_map, self.large_bytes // PAGE)
        self.user_top = int(hello["user_top"])
        self.kernel_free = 0  # last figure the kernel told us
        self.intent_no = 0
        self.deferred: list[dict[str, Any]] = []  # ops applied, to be journaled with the next Persist
        self.journaled = 0  # ops in the journal (since its last snapshot)
        self.settled: list[tuple[dict[str, Any], str]] = []  # (intent, "done"/"undo") settled by ``recover``
        self.counters = Counters()
        if self.config.quota is None:
            self.config.quota = max(1, self.view.counts()["free"] // 4)

    # ---- journal helpers ------------------------------------------------------

    def persist(self, *ops: dict[str, Any]) -> Op:
        """Journal the deferred ops and ``ops`` in one write, then apply ``ops``."""
        batch = self.deferred + list(ops)
        self.deferred = []
        yield Persist(batch)
        self.journaled += len(batch)
        self.counters.journal_writes += 1
        for op in ops:
            self.view.apply(op)

    def _later(self, op: dict[str, Any]) -> None:
        """Apply now, journal with the next batch (safe: recovery re-derives it from the kernel)."""
        self.view.apply(op)
        self.deferred.append(op)

    def flush(self) -> Op:
        if self.deferred:
            yield from self.persist()

    def replay(self, ops: Any) -> int:
        """Rebuild the view from the journal's ops (after a restart); returns how many."""
        n = 0
        apply = self.view.apply
        for op in ops:
            apply(op)
            n += 1
            if op["op"] == "snapshot":
                n = 1
        self.journaled = n
        self.intent_no = max([self.view.last_intent, *self.view.pending])
        return n

    def snapshot(self) -> dict[str, Any]:
        """A snapshot op of the view as it is (deferred ops included: it replaces them too)."""
        self.deferred = []
        return self.view.snapshot()

    def _note(self, result: Any) -> None:
        if isinstance(result, dict) and "kernel_free" in result:
            self.kernel_free = result["kernel_free"]

    def _kcall(self, call: str, args: dict[str, Any]) -> Op:
        """A kernel call that, on ENOMEM, donates what it needs and retries (Genode's upgrade loop)."""
        for attempt in range(ENOMEM_RETRIES + 1):
            result = yield KCall(call, args)
            self._note(result)
            if not (isinstance(result, Error) and result.code == Errno.ENOMEM) or attempt == ENOMEM_RETRIES:
                return result
            needed = int(result.details.get("needed", 1))
            available = int(result.details.get("available", 0))
            self.counters.enomem_retries += 1
            got = yield from self._donate(needed - available + self.config.headroom)
            if isinstance(got, Error) or got == 0:
                return result
        return result  # pragma: no cover

    # ---- kernel pool ------------------------------------------------------------

    def _donate(self, n: int) -> Op:
        avail = int(np.count_nonzero(self.view.state[: self.view.kernel_limit] == FREE))
        n = min(n, avail)  # give what there is
        frames = self.view.pick(n, below=self.view.kernel_limit, naive=self.naive, owner=KERNEL_TAG) if n > 0 else None
        if frames is None or frames.size == 0:
            return 0
        runs = R.from_array(np.sort(frames))
        result = yield KCall("donate", {"frames": runs})
        self._note(result)
        if isinstance(result, Error):
            return result
        self.counters.donations += 1
        self.counters.donated_frames += int(frames.size)
        self._later({"op": "donate", "frames": runs})
        return int(frames.size)

    def _reclaim(self, want: int, most: int) -> Op:
        """Take about ``want`` (at most ``most``) free frames back from the kernel. With the
        pageblock policy the mm asks which of its kernel frames are free and names those that
        give whole blocks back first; with first fit (or if the named frames were taken
        meanwhile by a client's own call) the kernel chooses ``want`` frames."""
        if not self.naive:
            free = yield from self._kernel_free_frames()
            if isinstance(free, np.ndarray):
                frames = self.view.pick_reclaim(free, want, most)
                if frames.size:
                    result = yield KCall("reclaim", {"frames": R.from_array(frames)})
                    self._note(result)
                    if not isinstance(result, Error):
                        return result
        result = yield KCall("reclaim", {"count": want})
        self._note(result)
        return result

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
        """Whether ``maintain`` has anything to do: the pool is outside the watermarks, or enough ops
        are deferred to force a write."""
        cfg = self.config
        return not cfg.low <= self.kernel_free <= cfg.high or len(self.deferred) >= cfg.defer_limit

    def maintain(self) -> Op:
        """Keep the kernel's free pool between the watermarks."""
        cfg = self.config
        if self.kernel_free < cfg.low:
            want = cfg.target - self.kernel_free
            got = yield from self._donate(want)
            if isinstance(got, int) and got:
                self._event(f"kernel pool {self.kernel_free - got} < low {cfg.low}: donated {got}")
        elif self.kernel_free > cfg.high:
            want = self.kernel_free - cfg.target
            result = yield from self._reclaim(want, self.kernel_free - cfg.low)
            if isinstance(result, dict) and result["reclaimed"]:
                self.counters.reclaims += 1
                self.counters.reclaimed_frames += result["reclaimed"]
                self._later({"op": "reclaim", "frames": result["frames"]})
                self._event(f"kernel pool above high {cfg.high}: reclaimed {result['reclaimed']}")
        if len(self.deferred) >= cfg.defer_limit:
            yield from self.flush()

    def _event(self, text: str) -> None:
        ev = self.counters.watermark_events
        ev.append(text)
        del ev[:-50]

    def refresh(self) -> Op:
        """Learn the kernel's free count (start-up, or when unsure)."""
        result = yield KCall("stats", {})
        if isinstance(result, dict):
            self.kernel_free = result["kernel_free"]
        return result

    # ---- client requests ----------------------------------------------------------

    def request(self, key: str, call: str, args: Any, origin: dict[str, Any] | None = None) -> Op:
        """One client request (args already validated by protocol.calls.MM_CALLS). ``origin``
        (``caller``, request ``id``, ``digest``) goes into the request's intent, so recovery can
        tell which request an intent it settles belongs to."""
        self.counters.requests += 1
        if call == "alloc":
            result = yield from self.alloc(key, args, origin)
        elif call == "free":
            result = yield from self.free(key, args, origin)
        elif call == "share":
            result = yield from self.share(key, args, origin)
        elif call == "stats":
            result = self.stats(key)
        elif call in ("hello", "ping"):
            c = self.view.clients.get(key)
            result = {"identity": key, "pid": c.pid if c else None, "quota": self.config.quota,
                      "large_page_size": self.large_bytes}
        else:
            result = Error(Errno.ENOSYS, f"unknown call {call!r}")
        if isinstance(result, Error):
            self.counters.refused += 1
        return result

    def _client(self, key: str) -> Op:
        c = self.view.clients.get(key)
        if c is not None:
            return c
        result = yield from self._kcall("proc_create", {"key": key, "kernel_quota": self.config.kernel_quota,
                                                        "user_quota": self.config.quota})
        if isinstance(result, Error):
            if result.code == Errno.EBUSY and "pid" in result.details:
                pid = int(result.details["pid"])  # the kernel already has one (we lost track of it)
            else:
                return result
        else:
            pid = result["pid"]
        # journaled with the next write: lost in a crash, the next request finds the process (EBUSY above)
        self._later({"op": "client", "key": key, "pid": pid})
        return self.view.clients[key]

    def _place_vaddr(self, c, pages: int, align: int) -> int | None:
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

    def alloc(self, key: str, args: Any, origin: dict[str, Any] | None = None) -> Op:
        pages, large = args.pages, args.large
        block = self.view.block
        if pages > self.config.max_alloc:
            return Error(Errno.EINVAL, f"args.pages: at most {self.config.max_alloc} pages per alloc", {"field": "pages"})
        if large and (pages % block):
            return Error(Errno.EINVAL, f"args.pages: a large alloc is a multiple of {block} pages "
                         f"({self.large_bytes // 1024} KiB)", {"field": "pages"})
        align = self.large_bytes if large else PAGE
        if args.vaddr is not None:
            if args.vaddr % align:
                return Error(Errno.EINVAL, f"args.vaddr: {args.vaddr:#x} is not aligned to {align:#x}", {"field": "vaddr"})
            if args.vaddr + pages * PAGE > self.user_top:
                return Error(Errno.EINVAL, f"args.vaddr: the range goes beyond user space ({self.user_top:#x})",
                             {"field": "vaddr"})
        c0 = self.view.clients.get(key)
        charged = c0.charged if c0 else 0
        if charged + pages > self.config.quota:
            return Error(Errno.ENOMEM, f"quota exceeded: {charged} + {pages} pages > quota of {self.config.quota}",
                         {"quota": self.config.quota, "charged": charged, "needed": pages,
                          "available": self.config.quota - charged})
        # a new client's process gets the next owner tag: pick for it now, again only if creating the
        # process changed the view (a donation)
        frames = self.view.pick(pages, large=large, naive=self.naive, owner=c0.tag if c0 else self.view.next_tag)
        if frames is None:
            return Error(Errno.ENOMEM, f"out of user memory: {pages} {'large-aligned ' if large else ''}pages "
                         f"wanted, {self.view.free_count()} frames free",
                         {"needed": pages, "available": self.view.free_count()})
        changes = self.view.changes
        c = yield from self._client(key)
        if isinstance(c, Error):
            return c
        if args.vaddr is not None:
            vaddr = args.vaddr
            hit = c.overlaps(vaddr, pages)
            if hit is not None:
                return Error(Errno.EBUSY, f"virtual address {hit.vaddr:#x} is already allocated", {"vaddr": hit.vaddr})
        else:
            vaddr = self._place_vaddr(c, pages, align)
            if vaddr is None:
                return Error(Errno.ENOMEM, "no free virtual range of that size", {"needed": pages, "available": 0})
        if self.view.changes != changes:  # creating the process cost a donation: pick again
            frames = self.view.pick(pages, large=large, naive=self.naive, owner=c.tag)
            if frames is None:
                return Error(Errno.ENOMEM, f"out of user memory: {pages} pages wanted",
                             {"needed": pages, "available": self.view.free_count()})
        runs = [[int(frames[0]), 1]] if frames.size == 1 else R.from_array(frames)
        return (yield from self._map(c, vaddr, pages, args.prot, large, runs, True, origin))

    def _intent(self, op: dict[str, Any], origin: dict[str, Any] | None) -> dict[str, Any]:
        self.intent_no += 1
        op["n"] = self.intent_no
        if origin:
            op.update(origin)
        return op

    def _map(self, c, vaddr: int, pages: int, prot: int, large: bool, runs: list, owner: bool,
             origin: dict[str, Any] | None = None) -> Op:
        intent = self._intent({"op": "intent", "do": "map", "key": c.key, "vaddr": vaddr, "pages": pages,
                               "prot": prot, "large": large, "frames": runs, "owner": owner}, origin)
        yield from self.persist(intent)  # the one write before the reply
        result = yield from self._kcall("map", {"pid": c.pid, "vaddr": vaddr, "frames": runs, "prot": prot,
                                                "large": large})
        return self._outcome(intent, result)

    def _outcome(self, intent: dict[str, Any], result: Any) -> Any:
        """Settle an intent with the kernel's answer; the outcome rides with the next write."""
        if isinstance(result, Error):
            if result.code != Errno.EIO:  # EIO, no answer: the kernel may have done it; the intent stays
                self._later({"op": "undo", "n": intent["n"]})  # pending until ``recover`` asks the kernel
            return result
        self._later({"op": "done", "n": intent["n"]})
        return intent_result(intent)

    def free(self, key: str, args: Any, origin: dict[str, Any] | None = None) -> Op:
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
        intent = self._intent({"op": "intent", "do": "unmap", "key": key, "vaddr": m.vaddr, "pages": m.pages,
                               "frames": m.frames}, origin)
        yield from self.persist(intent)
        result = yield from self._kcall("unmap", {"pid": c.pid, "vaddr": m.vaddr, "pages": m.pages})
        return self._outcome(intent, result)

    def share(self, key: str, args: Any, origin: dict[str, Any] | None = None) -> Op:
        c = self.view.clients.get(key)
        m = c.maps.get(args.vaddr) if c else None
        if m is None or m.pending:
            return Error(Errno.EINVAL, f"no allocation starts at {args.vaddr:#x}", {"vaddr": args.vaddr})
        if m.pages != args.pages:
            return Error(Errno.EINVAL, f"args.pages: the allocation at {args.vaddr:#x} has {m.pages} pages; "
                         "share it whole", {"field": "pages"})
        if args.peer == key:
            return Error(Errno.EINVAL, "args.peer: a client cannot share with itself", {"field": "peer"})
        align = self.large_bytes if m.large else PAGE
        if args.peer_vaddr % align or args.peer_vaddr + m.pages * PAGE > self.user_top:
            return Error(Errno.EINVAL, f"args.peer_vaddr: {args.peer_vaddr:#x} is not aligned to {align:#x} "
                         "or goes beyond user space", {"field": "peer_vaddr"})
        if args.prot & ~m.prot:
            return Error(Errno.EPERM, "a share cannot grant more access than the allocation has")
        peer = yield from self._client(args.peer)
        if isinstance(peer, Error):
            return peer
        hit = peer.overlaps(args.peer_vaddr, m.pages)
        if hit is not None:
            return Error(Errno.EBUSY, f"peer's virtual address {hit.vaddr:#x} is already allocated", {"vaddr": hit.vaddr})
        return (yield from self._map(peer, args.peer_vaddr, m.pages, args.prot, m.large, m.frames, False, origin))

    def stats(self, key: str | None = None) -> dict[str, Any]:
        c = self.view.clients.get(key) if key else None
        k = self.counters
        return {
            "view": self.view.counts(),
            "kernel_free": self.kernel_free,
            "clients": len(self.view.clients),
            "quota": self.config.quota,
            "watermarks": {"low": self.config.low, "target": self.config.target, "high": self.config.high},
            "you": {"pid": c.pid, "charged": c.charged, "mappings": len(c.maps)} if c else None,
            "counters": {"requests": k.requests, "refused": k.refused, "donations": k.donations,
                         "donated_frames": k.donated_frames, "reclaims": k.reclaims,
                         "reclaimed_frames": k.reclaimed_frames, "enomem_retries": k.enomem_retries,
                         "deaths": k.deaths, "journal_writes": k.journal_writes},
            "watermark_events": k.watermark_events[-10:],
        }

    # ---- client death -------------------------------------------------------------

    def poll_events(self) -> Op:
        """Read the kernel's destroyed-process events and forget those clients' mappings."""
        while True:
            result = yield KCall("events", {"since": self.view.event_seq})
            if isinstance(result, Error):
                return result
            self._note(result)  # the pool grew by what the dead processes' objects held
            ops = []
            for ev in result["events"]:
                if ev["kind"] == "proc_destroyed" and ev["key"] in self.view.clients \
                        and self.view.clients[ev["key"]].pid == ev["pid"]:
                    ops.append({"op": "client_gone", "key": ev["key"]})
                    self.counters.deaths += 1
            lost = result.get("lost", False)
            if result["events"]:
                ops.append({"op": "events", "seq": result["next"]})
            for op in ops:  # journaled with the next write: lost in a crash, recovery reads the events again
                self._later(op)
            if lost:
                yield from self._sync_clients()
            if not result["events"] or result["next"] >= result.get("latest", 0):
                return len(ops)

    def _sync_clients(self) -> Op:
        """Drop clients whose process the kernel no longer has."""
        st = yield KCall("stats", {})
        if isinstance(st, Error):
            return st
        live = {(p["key"], p["pid"]) for p in st["per_process"]}
        gone = [{"op": "client_gone", "key": k} for k, c in self.view.clients.items() if (k, c.pid) not in live]
        for op in gone:
            self._later(op)
        return len(gone)

    # ---- audit and recovery ---------------------------------------------------------

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

    def audit(self) -> Op:
        """Compare the view with the kernel, frame by frame (I8). Changes nothing."""
        got = yield from self.kernel_frames()
        if isinstance(got, Error):
            return got
        kinds, refs = got
        report = self.view.compare(kinds, refs)
        arrays = report.pop("arrays")
        del arrays
        kcount = {"none": int(np.count_nonzero(kinds == 0)), "kernel": int(np.count_nonzero(kinds == 1)),
                  "user_free": int(np.count_nonzero((kinds == 2) & (refs == 0))),
                  "user_mapped": int(np.count_nonzero((kinds == 2) & (refs > 0)))}
        report["kernel_view"] = kcount
        report["mm_view"] = self.view.counts()
        report["pending"] = len(self.view.pending)
        return report

    def recover(self) -> Op:
        """After a restart from the journal: settle with the kernel, repair, and report (I8). The intents
        it settles are left in ``settled`` (for the replies of their requests: ``MMService.recover``)."""
        self.settled = []
        yield from self.refresh()
        yield from self.poll_events()
        yield from self._sync_clients()
        got = yield from self.kernel_frames()
        if isinstance(got, Error):
            return got
        kinds, refs = got
        settled = []
        # pending intents: did the kernel do it? (the view already shows the intent applied)
        for n, p in sorted(self.view.pending.items()):
            c = self.view.clients.get(p["key"])
            if c is None or p["vaddr"] not in c.maps:
                settled.append({"op": "undo", "n": n})
                self.settled.append((p, "undo"))
                continue
            frames = R.to_array(c.maps[p["vaddr"]].frames)
            # a map intent is already counted in the view; an unmap intent is not yet
            expect = self.view.refs[frames].astype(np.int64) - (0 if p["do"] == "map" else 1)
            happened = bool(np.all(refs[frames] == expect))
            settled.append({"op": "done" if happened else "undo", "n": n})
            self.settled.append((p, settled[-1]["op"]))
        if settled:
            yield from self.persist(*settled)
        before = self.view.compare(kinds, refs)
        arr = before["arrays"]
        repairs = []
        if arr["free_but_kernel"].size:  # a donation we did not journal
            repairs.append({"op": "repair", "frames": R.from_array(arr["free_but_kernel"]), "state": KERNEL})
        if arr["kernel_but_user"].size:  # a reclaim we did not journal
            back = arr["kernel_but_user"]
            free_back = back[refs[back] == 0]
            if free_back.size:
                repairs.append({"op": "repair", "frames": R.from_array(free_back), "state": FREE})
        lost = arr["free_but_mapped"]
        for r in np.unique(refs[lost]).tolist():  # mapped by someone we lost track of: never hand out
            these = lost[refs[lost] == r]
            repairs.append({"op": "repair", "frames": R.from_array(these), "state": USED, "refs": int(r)})
        if repairs:
            yield from self.persist(*repairs)
        after = self.view.compare(kinds, refs)
        after.pop("arrays")
        before.pop("arrays")
        return {"settled_intents": len(settled), "found": before, "repairs": len(repairs), "remaining": after}
