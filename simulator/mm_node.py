"""The simulated memory manager process: the real ``mm_service.driver.Driver``, with simulated I/O.

The node is to the driver what ``mm_service.server`` is: it feeds it the same
events and performs the same actions, with the network, the clock and the
journal simulated. Nothing of the mm is re-implemented: boot, recovery,
requests, housekeeping and the kernel's health are the driver's.

- Start: ``hello`` then ``address_map`` asked of the kernel (a new request
  after each timeout, as ``connect_kernel`` does), then ``Driver.boot`` with
  the journal's records; client requests that arrive while the boot's
  recovery runs are held and handed over once it is done (the real server
  binds its client socket only then).
- Wake-ups: what arrives within ``Timing.mm_wake`` (kernel replies, client
  requests, the tick) is fed to the driver in one ``handle`` call, so the
  records of those requests go in one journal batch.
- ``SendKernel``: sent to the kernel on the current connection; with no
  reply within the timeout the same bytes are sent again (``KernelResent``),
  ``retries`` times, then ``KernelTimeout`` (a probe: once, a shorter
  timeout). Replies to requests no longer pending are dropped, as the server
  drops them. ``ResetKernel``: a new connection (replies to the old one are
  lost).
- ``WriteJournal``: the journal (a list of committed batches, encoded in the
  records' one wire form: all that survives a crash) gets the batch after
  ``Timing.persist`` (a batch with a snapshot replaces everything before it);
  then ``JournalCommitted``.
- ``SendReply``: to the client over the network. ``Log``: into the trace.
  ``NewBoot``/``Fatal``: violations (the simulated kernel never restarts).

Crashes: ``crash`` at any step, or armed to strike at a boundary
(``faults.CRASH_POINTS``): the kernel's ok reply to a changing call arriving
(not fed: the kernel did it, the mm never hears), a journal batch written (never committed), a commit made (the actions
it releases never performed), a reply about to go out, or the k-th kernel
reply of a recovery. The node is also the mm's observer (``mm_service.observe``):
records applied go to the view's incremental check and to the world's judge
of settlements; replay-cache misses to the world's I12 check.
"""

from __future__ import annotations

from collections import namedtuple
from typing import TYPE_CHECKING, Any

import msgpack

from simulator.net import Msg
from mm_service import driver as D
from mm_service import records as J
from mm_service.observe import MMObserver
from mm_service.policy import Config, MMCore
from mm_service.service import MMService
from protocol import wire

if TYPE_CHECKING:
    from simulator.world import World

KERNEL_MUTATING = frozenset(("donate", "reclaim", "map", "unmap", "proc_create", "proc_destroy"))
MUTATING = frozenset(("alloc", "free", "share", "accept"))
Grant = namedtuple("Grant", "quota kernel_quota")  # an admitted key's quotas (None: the mm's defaults)
DEFAULT_GRANT = Grant(None, None)


class MMNode(MMObserver):
    def __init__(self, world: World, key: str, operator: str, driver_class: type[D.Driver]) -> None:
        self.world = world
        self.key = key
        self.operator = operator
        self.driver_class = driver_class
        self.journal: list[bytes] = []  # committed batches: all that survives a crash
        self.inc = 0  # incarnation: bumped by every restart; stale events and replies are dropped
        self.alive = False
        self.phase = "down"  # "down", "connecting", "starting" (the boot's recovery), "serving"
        self.driver: D.Driver | None = None
        self.conn = 0  # the kernel connection (ResetKernel opens a new one)
        self.pending: dict[int, list[Any]] = {}  # kid -> [bytes, attempt, resends, probe, call]
        self.next_kid = 0
        self.hello: dict | None = None
        self.backlog: list[Msg] = []  # client requests that came while starting
        self.inbox: list[Any] = []  # events for the next wake-up
        self.wake_at = -1  # when the next wake-up is scheduled (-1: none)
        self.writing: tuple[int, list] | None = None  # the batch being committed
        self.peers: dict[int, tuple[Any, str | None, bytes, str]] = {}  # token -> (client endpoint, identity,
        # request bytes, call)
        self.next_peer = 0
        self.armed: str | None = None  # a crash point (faults.CRASH_POINTS) to die at
        self.recovery_replies = 0  # kernel replies fed during the current recovery (for "recovery" crashes)
        self.arm_after = 0
        self.partition_armed = False  # a partition starts when the next recovery does
        self.booting = False  # Driver.boot is replaying the journal (records applied are not new)
        self.fresh: set[tuple[str, int]] = set()  # requests executed (not from the replay cache), not answered
        self.recovering = False

    # ---- what the world and the checks read -------------------------------------------------

    @property
    def core(self) -> MMCore | None:
        return self.driver.core if self.driver is not None else None

    @property
    def service(self) -> MMService | None:
        return self.driver.service if self.driver is not None and self.phase != "connecting" else None

    @property
    def endpoint(self) -> tuple:
        return ("mm", self.inc, self.conn)

    def quiet(self) -> bool:
        """Serving with nothing in flight: no request, housekeeping, kernel call or journal write; the
        kernel not lost; nothing waiting to be fed."""
        d = self.driver
        return (self.alive and self.phase == "serving" and d is not None and d.quiet and not self.pending
                and self.writing is None and not self.inbox and not self.backlog and d.watch.lost is None)

    # ---- life -----------------------------------------------------------------------------

    def boot(self) -> None:
        w = self.world
        self.inc += 1
        self.alive = True
        self.phase = "connecting"
        self.conn = 0
        self.pending = {}
        self.inbox = []
        self.wake_at = -1
        self.writing = None
        self.peers = {}
        self.backlog = []
        self.fresh = set()
        self.driver = None
        self.recovering = False
        self.next_kid = self.inc << 40  # never an id an earlier incarnation used (the kernel remembers them)
        if self.inc > 1:
            w.trace.event(w.step, w.clock.now, "mm_restart", incarnation=self.inc, journal_batches=len(self.journal))
        self._connect("hello")

    def _connect(self, call: str) -> None:
        """One start-up call (a new request each time, as ``MMServer.connect_kernel`` makes them)."""
        kid = self.next_kid
        self.next_kid += 1
        self._send_kernel(kid, wire.request(kid, call, {}), call, 0, False)

    def _started(self, hello: dict, amap: dict) -> None:
        w = self.world
        cfg = Config(**w.plan.mm, kernel_quota=w.plan.kernel_quota, room=w.plan.room,
                     compact_every=w.plan.compact_every)
        self.driver = d = self.driver_class(cfg, self.key, self.operator, admission=w.admission,
                                            first_kid=self.next_kid, observer=self)
        records = [J.decode(item) for blob in self.journal for item in msgpack.unpackb(blob, raw=False,
                                                                                        strict_map_key=False)]
        self.phase = "starting"
        self.booting = True
        try:
            actions = d.boot(hello, amap, records)
        finally:
            self.booting = False
        w.view_dirty = True
        if w.vtrack is not None:
            w.vtrack.view = None  # a new view: the next check of it is a full one
        w.trace.event(w.step, w.clock.now, "mm_boot", incarnation=self.inc, records=len(records),
                      pending=len(d.core.view.pending) if d.core else 0)
        w.clock.after(w.plan.timing.mm_tick, self.tick, self.inc)
        self.perform(actions)
        self._maybe_serving()

    def _maybe_serving(self) -> None:
        d = self.driver
        if self.alive and self.phase == "starting" and d is not None and not d.house and d.house_task is None:
            self.phase = "serving"
            held, self.backlog = self.backlog, []
            for msg in held:
                self._take_request(msg)

    def crash(self, where: str) -> None:
        w = self.world
        w.faults["mm_crash"] += 1
        w.faults[f"mm_crash:{where}"] += 1
        d = self.driver
        w.trace.event(w.step, w.clock.now, "mm_crash", incarnation=self.inc, where=where, phase=self.phase,
                      house=d.house_task.name if d is not None and d.house_task is not None else None,
                      in_flight=len(self.pending))
        self.alive = False
        self.phase = "down"
        self.armed = None
        self.driver = None
        self.pending = {}
        self.inbox = []
        self.writing = None
        self.peers = {}
        self.backlog = []
        w.mm_crashed()
        w.clock.after(w.rng.randint(*w.plan.timing.mm_restart), self.restart, self.inc)

    def restart(self, inc: int) -> None:
        if inc == self.inc and not self.alive:
            self.boot()

    def arm(self, point: str) -> None:
        """Die at the next such boundary (``faults.CRASH_POINTS``; "step": now)."""
        if not self.alive:
            return
        if point == "step":
            self.crash("at a step")
            return
        self.armed = point
        self.arm_after = self.world.rng.randint(1, 6) if point == "recovery" else 0

    # ---- the kernel connection ------------------------------------------------------------

    def _send_kernel(self, kid: int, data: bytes, call: str, resends: int, probe: bool) -> None:
        w = self.world
        t = w.plan.timing
        self.pending[kid] = [data, 0, resends, probe, call]
        w.net.send(Msg(("kernel",), self.endpoint, self.key, data, False, call))
        w.clock.after(t.probe_timeout if probe else t.mm_timeout, self.kernel_timeout, self.inc, self.conn, kid, 0)

    def kernel_timeout(self, inc: int, conn: int, kid: int, attempt: int) -> None:
        if inc != self.inc or conn != self.conn or not self.alive:
            return
        p = self.pending.get(kid)
        if p is None or p[1] != attempt:
            return
        w = self.world
        if self.phase == "connecting":
            del self.pending[kid]
            self._connect(p[4])
            return
        if attempt < p[2]:
            p[1] = attempt + 1
            w.faults["resend_mm"] += 1
            w.net.send(Msg(("kernel",), self.endpoint, self.key, p[0], False, p[4]))
            w.clock.after(w.plan.timing.mm_timeout, self.kernel_timeout, self.inc, self.conn, kid, attempt + 1)
            self._queue(D.KernelResent(kid))
            return
        del self.pending[kid]
        if not p[3]:
            w.faults["mm_gave_up"] += 1
            w.trace.event(w.step, w.clock.now, "mm_gave_up", request=kid, call=p[4], attempts=p[2] + 1)
        self._queue(D.KernelTimeout(kid))

    def deliver_reply(self, msg: Msg) -> None:
        w = self.world
        if msg.dst != self.endpoint or not self.alive:
            w.faults["reply_to_gone_connection"] += 1
            return
        try:
            reply = wire.parse_reply(msg.data)
        except ValueError:
            w.flag("I10", "the kernel sent the mm a malformed reply")
            return
        p = self.pending.pop(reply.get("id"), None)
        if p is None:
            return  # late: a request it gave up on (or answered already: a duplicate)
        if self.phase == "connecting":
            if reply.get("ok") is not True:
                w.flag("I10", f"the kernel refused the mm's {p[4]}: {reply.get('error')}")
                return
            if p[4] == "hello":
                self.hello = reply["result"]
                self._connect("address_map")
            else:
                assert self.hello is not None
                self._started(self.hello, reply["result"])
            return
        if self.armed == "kernel_reply" and p[4] in KERNEL_MUTATING and reply.get("ok") is True:
            self.crash(f"as the kernel's reply to {p[4]} arrived")  # the kernel did it; the mm never hears
            return
        if self.in_recovery(p[4]):
            if self.armed == "recovery":
                self.recovery_replies += 1
                if self.recovery_replies >= self.arm_after:
                    self.crash(f"during recovery (at its kernel reply to {p[4]})")
                    return
        self._queue(D.KernelReply(msg.data))

    def in_recovery(self, call: str) -> bool:
        """Is the mm settling with the kernel (the boot's recovery, or a tick's after the kernel was lost)?"""
        d = self.driver
        t = d.house_task if d is not None else None
        if t is None:
            return False
        return t.name == "recover" or (t.name == "tick" and call in ("mappings", "frame_info", "stats"))

    # ---- client requests ---------------------------------------------------------------------

    def deliver_request(self, msg: Msg) -> None:
        if not self.alive:
            self.world.faults["lost_mm_down"] += 1
            return
        if self.phase != "serving":
            self.backlog.append(msg)
            return
        self._take_request(msg)

    def _take_request(self, msg: Msg) -> None:
        self.next_peer += 1
        self.peers[self.next_peer] = (msg.src, msg.identity, msg.data, msg.call)
        self._queue(D.ClientRequest(self.next_peer, msg.identity, msg.data))

    # ---- wake-ups ---------------------------------------------------------------------------------

    def _queue(self, ev: Any) -> None:
        self.inbox.append(ev)
        if self.wake_at < 0:
            w = self.world
            self.wake_at = w.clock.now + w.plan.timing.mm_wake
            w.clock.at(self.wake_at, self.wake, self.inc)

    def wake(self, inc: int) -> None:
        if inc != self.inc or not self.alive:
            return
        self.wake_at = -1
        events, self.inbox = self.inbox, []
        if events:
            self.feed(events)

    def tick(self, inc: int) -> None:
        if inc != self.inc or not self.alive:
            return
        w = self.world
        w.clock.after(w.plan.timing.mm_tick, self.tick, self.inc)
        if self.phase == "serving":
            self._queue(D.TickDue())

    def feed(self, events: list[Any]) -> None:
        d = self.driver
        assert d is not None
        try:
            actions = d.handle(*events)
        except Exception as exc:  # noqa: BLE001 - anything raised out of the mm is the finding itself
            self.world.flag("I10", f"the mm's driver raised {type(exc).__name__}: {exc}")
            self.crash("after raising")
            return
        self.perform(actions)
        self._maybe_serving()

    # ---- actions ---------------------------------------------------------------------------------------

    def perform(self, actions: list[Any]) -> None:
        inc = self.inc
        w = self.world
        for a in actions:
            if not self.alive or self.inc != inc:
                return  # crashed: what was left undone is lost
            kind = type(a)
            if kind is D.SendKernel:
                msg = wire.decode(a.data)
                call = msg.get("call", "?")
                if self.partition_armed and self.in_recovery(call):
                    self.partition_armed = False
                    w.start_partition("as a recovery began")
                w.mm_sends(a.kid, call, msg.get("args") or {})
                self._send_kernel(a.kid, a.data, call, 0 if a.probe else w.plan.timing.mm_retries, a.probe)
            elif kind is D.WriteJournal:
                if self.writing is not None:
                    w.flag("I10", "the mm wrote a journal batch before the previous one was committed")
                self.writing = (a.batch, a.records)
                if self.armed == "journal":
                    self.crash("with a journal batch written but not committed")
                    return
                w.clock.after(w.plan.timing.persist, self.commit, self.inc, a.batch)
            elif kind is D.SendReply:
                self._reply(a.peer, a.data)
            elif kind is D.ResetKernel:
                self.conn += 1
                self.pending = {}
            elif kind is D.Log:
                if a.level != "info":
                    w.faults[f"mm_log_{a.level}"] += 1
                w.trace.event(w.step, w.clock.now, "mm_log", level=a.level, text=a.text)
            elif kind is D.NewBoot:
                w.flag("I10", "the mm believes the kernel restarted (it never does in the simulation)")
            elif kind is D.Fatal:
                w.flag("I10", f"the mm stopped: {a.text}")
                self.crash("after a fatal error")
                return

    def commit(self, inc: int, batch: int) -> None:
        if inc != self.inc or not self.alive or self.writing is None or self.writing[0] != batch:
            return
        _, records = self.writing
        self.writing = None
        start = 0
        for i in range(len(records) - 1, -1, -1):
            if isinstance(records[i], J.Snapshot):
                start = i  # (what came before it in the batch is in it too)
                break
        blob = msgpack.packb([J.encode(r) for r in records[start:]], use_bin_type=True)
        if start or (records and isinstance(records[0], J.Snapshot)):
            self.journal = [blob]  # compaction: the snapshot replaces everything before it
        else:
            self.journal.append(blob)
        self.world.durable(records)
        if self.armed == "commit":
            self.crash("right after a journal commit, before what it released was done")
            return
        self.feed([D.JournalCommitted(batch)])

    def _reply(self, peer: int, data: bytes) -> None:
        w = self.world
        who = self.peers.pop(peer, None)
        if who is None:
            return
        src, identity, request, call = who
        try:
            reply = wire.parse_reply(data)
            rid = reply["id"]  # (a reply carries its request's id; only a malformed request's may not)
            if rid is None:
                rid = wire.decode(request).get("id")
        except Exception:  # noqa: BLE001 - a malformed request's bytes (a lie)
            reply, rid = {}, None
        fresh = identity is not None and (identity, rid) in self.fresh
        if fresh:
            self.fresh.discard((identity, rid))
        ok = reply.get("ok") is True
        if call in MUTATING and identity is not None and rid is not None:
            if self.armed == "client_reply":
                self.crash(f"about to send its reply to {call}")
                return
            if ok:
                w.replied_ok(identity, rid, call)
        if fresh:
            w.count("mm", call, "ok" if ok else str((reply.get("error") or {}).get("code", "?")))
        else:
            w.count("mm", "(replayed)" if rid is not None else call, "cached" if rid is not None else "refused")
        w.trace.call(w.step, w.clock.now, identity, "mm", request, data, not fresh)
        w.net.send(Msg(src, ("mm", self.inc), self.key, data, True, call))

    # ---- the mm's observer seam -----------------------------------------------------------------

    def applied(self, record: Any) -> None:
        w = self.world
        w.view_dirty = True
        if w.vtrack is not None:
            w.vtrack.note(record)
        if not self.booting:
            w.mm_applied(record, self.driver)

    def probe(self, name: str) -> None:
        if not self.booting and not self.world.auditing:
            self.world.probes[name] += 1

    def replay_miss(self, identity: str, req_id: int) -> None:
        if identity == self.operator and self.world.auditing:
            return
        self.fresh.add((identity, req_id))
        self.world.mm_executes(identity, req_id)


def admission_of(world: World) -> Any:
    """The admission callback the driver gets: the admitted clients' keys, with the mm's default quotas."""

    def grant(key: str) -> Grant | None:
        return DEFAULT_GRANT if key in world.admitted else None

    return grant
