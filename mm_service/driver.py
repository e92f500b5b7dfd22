"""The mm's driver: one sans-I/O state machine for boot, recovery, client requests and housekeeping.

Rules for this file (as h11 states its own): no sockets, no clocks, no
randomness, no sqlite, no threads, no I/O of any kind. The driver is fed
*events* and answers with *actions*; whoever drives it (the ZeroMQ server in
``mm_service.server``, the simulator's mm node, a test) performs the actions
with its own I/O and feeds back what happened. Time exists only as events
(``TickDue``, ``KernelTimeout``); kernel request ids start where the caller
says (``first_kid``: the server draws it at random, so a restarted mm never
reuses an id the kernel's replay cache still holds).

Events in (``Driver.handle(*events)``; feed everything one wake-up brought
in one call, so their journal writes go in one transaction):

- ``ClientRequest(peer, identity, data)``: a request's bytes; ``peer`` is
  whatever the driver needs to route the reply (a ROUTER id), ``identity``
  the caller's authenticated key (None: unauthenticated).
- ``KernelReply(data)``: a reply from the kernel (matched by request id:
  replies may come in any order).
- ``KernelResent(kid)``: the driver of I/O sent kernel request ``kid`` again
  after a timeout (its reply may come from a kernel that restarted: the
  driver checks the boot id).
- ``KernelTimeout(kid)``: no reply to ``kid`` after its resends: the kernel
  is lost; every kernel call in flight fails with EIO, and every later one
  at once, until a tick's probe gets an answer.
- ``JournalCommitted(batch)``: the ``WriteJournal`` of that batch is durable.
- ``TickDue()``: time for housekeeping (the kernel's health, its events,
  the pool's watermarks, journal compaction, writing what is unwritten).

Actions out (in order; perform them in order):

- ``SendKernel(kid, data, probe)``: send request bytes to the kernel. A probe
  (a ``hello`` checking on the kernel) is never resent and times out sooner.
- ``ResetKernel()``: the kernel is lost: drop the connection and every
  request still in flight (their timeouts too).
- ``WriteJournal(batch, records)``: append the records in one transaction
  (a batch holding a ``Snapshot`` replaces everything before it), then feed
  ``JournalCommitted(batch)``. One batch is written at a time.
- ``SendReply(peer, data)``: the reply to a client request.
- ``Log(text, level)``: something the operator should see.
- ``NewBoot(hello, address_map)``: the kernel restarted: set the old boot's
  journal aside, open one for this boot and call ``boot`` again.
- ``Fatal(text)``: the mm cannot go on.

How requests overlap. A client request runs until it yields (a kernel call
or a journal write) and then the next one runs; up to ``max_in_flight``
requests are in flight at once, one per caller identity (a caller's next
request, or a resend of the same one, waits for the previous one: a resend
then finds its reply in the replay cache); a caller with ``MAX_WAITING`` requests waiting gets EAGAIN
for the next ones at once, so a flood (or a client that never reads its replies) costs bounded memory.
The view changes at once (the
policy applies its records when it makes them), so two requests never pick
the same frames or virtual range; a donation marks its frames before it is
sent and frees them again if the kernel refuses. Every record is journaled
in the order applied, batched: the records of all requests handled in one
wake-up go in one transaction, before any kernel call that needs them is
sent (intents) and before any reply that reports them (outcomes). Read-only
calls (``hello``, ``ping``, ``stats``) and malformed requests are answered at
once; a request from anyone but the operator (and the mm's own key) larger
than ``wire.MAX_CLIENT_REQUEST_BYTES`` is refused with E2BIG before it is
decoded. Housekeeping and recovery (and the operator's ``audit``) run
exclusively: once one is due no new request starts, and it runs when the
requests in flight have finished.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from mm_service import health
from mm_service import records as J
from mm_service.observe import MMObserver
from mm_service.policy import Admission, Config, KCall, MMCore, Op
from mm_service.service import READ_ONLY, MMService
from protocol import PROTOCOL_VERSION, wire
from protocol.errors import Errno, Error

MAX_WAITING = 64  # requests one caller may have waiting for their turn; past it, EAGAIN at once

# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientRequest:
    peer: Any
    identity: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class KernelReply:
    data: bytes


@dataclass(frozen=True, slots=True)
class KernelResent:
    kid: int


@dataclass(frozen=True, slots=True)
class KernelTimeout:
    kid: int


@dataclass(frozen=True, slots=True)
class JournalCommitted:
    batch: int


@dataclass(frozen=True, slots=True)
class TickDue:
    pass


# ---- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendKernel:
    kid: int
    data: bytes
    probe: bool = False


@dataclass(frozen=True, slots=True)
class ResetKernel:
    pass


@dataclass(frozen=True, slots=True)
class WriteJournal:
    batch: int
    records: list


@dataclass(frozen=True, slots=True)
class SendReply:
    peer: Any
    data: bytes


@dataclass(frozen=True, slots=True)
class Log:
    text: str
    level: str = "info"


@dataclass(frozen=True, slots=True)
class NewBoot:
    hello: dict
    address_map: dict


@dataclass(frozen=True, slots=True)
class Fatal:
    text: str


for _cls in (ClientRequest, KernelReply, KernelResent, KernelTimeout, JournalCommitted, TickDue, SendKernel, ResetKernel,
             WriteJournal, SendReply, Log, NewBoot, Fatal):
    J.quick_init(_cls)  # (the same __init__, the slots' setters bound once: events and actions are made per call)


def oversized(data: bytes) -> bytes:
    """The reply to a client's request longer than ``wire.MAX_CLIENT_REQUEST_BYTES``: E2BIG, before it is even
    decoded (the operator and the mm's own key may send up to ``wire.MAX_REQUEST_BYTES``)."""
    return wire.error_reply(None, Error(Errno.E2BIG, f"message of {len(data)} bytes exceeds the limit of "
                                        f"{wire.MAX_CLIENT_REQUEST_BYTES} for a client (only the operator sends "
                                        "larger requests)"))


class _Task:
    """An operation generator in flight: a client request or a housekeeping job."""

    __slots__ = ("kind", "gen", "peer", "identity", "done", "name")

    def __init__(self, kind: str, gen: Op, peer: Any = None, identity: str | None = None,
                 done: Callable[[Any], None] | None = None, name: str = "") -> None:
        self.kind, self.gen, self.peer, self.identity, self.done, self.name = kind, gen, peer, identity, done, name


class Driver:
    """The state machine (see the module docstring). ``observer`` (``mm_service.observe``) hears of every
    request executed and every record applied to the view, from each boot on. A subclass may name other
    ``core_class``/``service_class`` (the simulator's planted bugs do)."""

    core_class: type[MMCore] = MMCore
    service_class: type[MMService] = MMService

    def __init__(self, config: Config, mm_key: str, operator_key: str | None = None,
                 admission: Admission | None = None, first_kid: int = 1, max_in_flight: int = 64,
                 observer: MMObserver | None = None) -> None:
        self.config = config
        self.observer = observer
        self.mm_key = mm_key
        self.operator_key = operator_key
        self.admission = admission
        self.max_in_flight = max_in_flight
        self.next_kid = first_kid
        self.core: MMCore | None = None
        self.service: MMService | None = None
        self.watch = health.KernelWatch()
        self.state = "down"  # "down" (no boot yet), "serving", "rebooting" (NewBoot sent), "stopped"
        self.out: list[Any] = []
        self.kwait: dict[int, tuple[_Task, str]] = {}  # kernel request id -> (task, call)
        self.jwait: list[tuple[int, _Task]] = []  # (batch it needs committed, task)
        self.to_write: list[J.Record] = []  # records for the next batch
        self.issued = 0  # batches handed out (WriteJournal)
        self.committed = 0  # batches durable
        self.queues: dict[str, deque[tuple[ClientRequest, Any]]] = {}  # requests waiting (with their parse, None
        # if queued before a boot), per caller, callers in arrival order
        self.busy: set[str] = set()  # callers with a request in flight
        self.running = 0  # client requests in flight
        self.house: deque[tuple[str, Callable[[], Op], Callable[[Any], None] | None]] = deque()
        self.house_task: _Task | None = None
        self.probe_kid: int | None = None  # the hello checking on a lost kernel
        self.probe_result: dict | None = None
        self.verify_kid: int | None = None  # the hello checking the boot id after a resend
        self.replayed = 0
        self.stats = {"requests": 0, "batches": 0, "records": 0, "max_in_flight": 0}
        self._pack = msgpack.Packer(use_bin_type=True).pack  # kernel requests: the bytes of ``wire.request``

    # ---- entry points ----------------------------------------------------------------------

    def boot(self, hello: dict[str, Any], address_map: dict[str, Any], records: Any = ()) -> list[Any]:
        """Serve kernel boot ``hello``/``address_map``, with the view rebuilt from this boot's journal
        ``records``; recovery (settling with the kernel) runs first. Returns the actions."""
        self.core = core = self.core_class(address_map, hello, dataclasses.replace(self.config), self.admission)
        self.service = self.service_class(core, self.mm_key, self.operator_key)
        if self.observer is not None:
            self.service.set_observer(self.observer)
        self.replayed = self.service.restore(records)
        self.watch.boot_id = health.boot_of(hello)
        self.watch.lost = None
        self.kwait.clear()
        self.jwait.clear()
        self.to_write = []
        self.committed = self.issued
        self.house.clear()
        self.house_task = None
        self.running = 0
        self.busy.clear()
        self.probe_kid = self.verify_kid = None
        self.probe_result = None
        self.state = "serving"
        self.house.append(("recover", self.service.recover, self._recovered))
        self.house.append(("maintain", self.service.maintain, None))
        return self._pump()

    def handle(self, *events: Any) -> list[Any]:
        """Feed events (all those one wake-up brought); the actions to perform, in order."""
        for ev in events:
            kind = type(ev)
            if kind is ClientRequest:
                self._request(ev)
            elif kind is KernelReply:
                self._kernel_reply(ev.data)
            elif kind is JournalCommitted:
                self._committed(ev.batch)
            elif kind is TickDue:
                self._want_house("tick", self._tick, self._ticked)
            elif kind is KernelTimeout:
                self._timeout(ev.kid)
            elif kind is KernelResent:
                if ev.kid in self.kwait and self.verify_kid is None and self.watch.lost is None:
                    self.verify_kid = self._send("hello", {}, probe=True)
            else:
                raise TypeError(f"not a driver event: {ev!r}")
        return self._pump()

    def awaiting(self, kid: int) -> bool:
        """Whether kernel request ``kid`` still waits for its reply (a shell stops timing those that do not)."""
        return kid in self.kwait or kid == self.probe_kid or kid == self.verify_kid

    @property
    def quiet(self) -> bool:
        """Nothing in flight: no request, no housekeeping, no kernel call, no journal write due."""
        return (not self.kwait and not self.jwait and not self.to_write and self.committed == self.issued
                and self.running == 0 and self.house_task is None and not self.house
                and not any(self.queues.values()))

    # ---- client requests ------------------------------------------------------------------------

    def _request(self, req: ClientRequest) -> None:
        if self.state == "stopped":
            return
        if len(req.data) > wire.MAX_CLIENT_REQUEST_BYTES and req.identity not in (self.operator_key, self.mm_key):
            self.out.append(SendReply(req.peer, oversized(req.data)))
            return
        if self.state in ("down", "rebooting"):
            self._enqueue(req)
            return
        assert self.service is not None
        self.stats["requests"] += 1
        parsed = wire.parse_request(req.data)
        call = parsed[1] if len(parsed) == 3 else None
        if call is None or call in READ_ONLY or not req.identity:  # answered from the view, at once
            self._advance(_Task("request", self.service.handle(req.identity, req.data, parsed), req.peer), None)
            return
        self._enqueue(req, parsed)

    def _enqueue(self, req: ClientRequest, parsed: Any = None) -> None:
        """Queue a request for its caller's turn; past ``MAX_WAITING`` waiting, EAGAIN at once (not
        remembered: sent again later, it runs), so a caller that sends faster than its requests run
        costs bounded memory."""
        key = req.identity or ""
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = deque()
        elif len(q) >= MAX_WAITING:
            rid = (parsed or wire.parse_request(req.data))[0]
            self.out.append(SendReply(req.peer, wire.error_reply(rid, Error(
                Errno.EAGAIN, f"{len(q)} of your requests are waiting for their turn already (at most "
                f"{MAX_WAITING}): wait for their replies", {"limit": MAX_WAITING}))))
            return
        q.append((req, parsed))  # (parsed once: ``_start`` takes it as it is; None: queued before a boot)

    def _start(self, req: ClientRequest, parsed: Any = None) -> None:
        assert self.service is not None
        if parsed is None:  # (queued before a boot)
            parsed = wire.parse_request(req.data)
        if len(parsed) != 3 or parsed[1] in READ_ONLY or not req.identity:  # (those queued before a boot)
            self._advance(_Task("request", self.service.handle(req.identity, req.data, parsed), req.peer), None)
            return
        if parsed[1] == "audit":  # the operator's look at everything: exclusively
            peer = req.peer
            self.house.append(("audit", lambda: self.service.handle(req.identity, req.data, parsed),  # type: ignore
                               lambda reply: self.out.append(SendReply(peer, reply))))
            return
        self.busy.add(req.identity)
        self.running += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.running)
        self._advance(_Task("request", self.service.handle(req.identity, req.data, parsed), req.peer,
                            req.identity), None)

    # ---- running operations ---------------------------------------------------------------------

    def _advance(self, task: _Task, value: Any) -> None:
        """Run ``task`` until it waits on the kernel or the journal, or ends."""
        gen = task.gen
        while True:
            try:
                eff = gen.send(value)
            except StopIteration as stop:
                self._finish(task, stop.value)
                return
            except Exception as exc:  # a bug: report it, keep serving
                self._finish(task, exc)
                return
            if type(eff) is KCall:
                if self.watch.lost is not None:  # fail fast: never wait on a kernel known to be away
                    if task.kind == "house" and eff.call == "hello":
                        value = self._probe()
                    else:
                        value = Error(Errno.EIO, f"the kernel is unreachable ({self.watch.lost}); the mm checks on "
                                      "it every tick")
                    continue
                kid = self._send(eff.call, eff.args)
                self.kwait[kid] = (task, eff.call)
                return
            # Persist: every record applied so far durable (a concurrent task may have handed some over)
            if eff.ops:
                self.to_write.extend(eff.ops)
            need = self.issued + 1 if self.to_write else self.issued
            if need <= self.committed:
                value = None
                continue
            self.jwait.append((need, task))
            return

    def _finish(self, task: _Task, result: Any) -> None:
        assert self.core is not None and self.service is not None
        if task.kind == "request":
            if isinstance(result, Exception):
                self.out.append(Log(f"mm: internal error in a request: {type(result).__name__}: {result}", "error"))
                result = wire.error_reply(None, Error(Errno.EIO, f"internal error: {type(result).__name__}"))
            self.out.append(SendReply(task.peer, result))
            if task.identity is not None:
                self.busy.discard(task.identity)
                self.running -= 1
                if self.service.maintain_due():
                    self._want_house("maintain", self.service.maintain, None)
        else:
            self.house_task = None
            if isinstance(result, Exception):
                self.out.append(Log(f"mm: internal error in housekeeping: {type(result).__name__}: {result}",
                                    "error"))
            elif task.done is not None:
                task.done(result)
        if self.core.reports:
            for text in self.core.take_reports():
                self.out.append(Log(f"mm: {text}", "warning"))

    def _want_house(self, name: str, make: Callable[[], Op], done: Callable[[Any], None] | None) -> None:
        if self.state != "serving":
            return
        if any(h[0] == name for h in self.house) or (self.house_task is not None and self.house_task.name == name):
            return
        self.house.append((name, make, done))

    def _pump(self) -> list[Any]:
        """Start what may start; hand out the next journal batch; the actions so far."""
        while self.state == "serving":
            if self.house:
                if self.house_task is None and self.running == 0:
                    name, make, done = self.house.popleft()
                    self.house_task = _Task("house", make(), done=done, name=name)
                    self._advance(self.house_task, None)
                    continue
                break  # housekeeping is due: no new request starts
            if self.house_task is not None:
                break
            started = False
            for ident in list(self.queues):
                if self.running >= self.max_in_flight or self.house:
                    break
                if ident in self.busy:
                    continue
                q = self.queues[ident]
                req, parsed = q.popleft()
                if not q:
                    del self.queues[ident]
                self._start(req, parsed)
                started = True
            if not started:
                break
        if self.to_write and self.committed == self.issued and self.state != "stopped":
            self.issued += 1
            batch, self.to_write = self.to_write, []
            self.stats["batches"] += 1
            self.stats["records"] += len(batch)
            self.out.append(WriteJournal(self.issued, batch))
        out, self.out = self.out, []
        return out

    def _committed(self, batch: int) -> None:
        self.committed = max(self.committed, batch)
        ready = [t for need, t in self.jwait if need <= self.committed]
        self.jwait = [(need, t) for need, t in self.jwait if need > self.committed]
        for task in ready:
            self._advance(task, None)

    # ---- the kernel ----------------------------------------------------------------------------

    def _send(self, call: str, args: dict[str, Any], probe: bool = False) -> int:
        kid = self.next_kid
        self.next_kid += 1
        self.out.append(SendKernel(kid, self._pack({"v": PROTOCOL_VERSION, "id": kid, "call": call, "args": args or {}}),
                                   probe))
        return kid

    def _kernel_reply(self, data: bytes) -> None:
        try:
            msg = wire.parse_reply(data)
        except ValueError:
            return
        kid = msg.get("id")
        if msg.get("ok") is True:
            r = msg.get("result")
            result: Any = r if isinstance(r, dict) else {"value": r}
        else:
            result = Error.from_wire(msg.get("error"))
        waiting = self.kwait.pop(kid, None)
        if waiting is not None:
            self._advance(waiting[0], result)
        elif kid is not None and kid == self.probe_kid:
            self.probe_kid = None
            if isinstance(result, dict):  # the kernel answers again: settle with it now
                self.probe_result = result
                self._want_house("tick", self._tick, self._ticked)
        elif kid is not None and kid == self.verify_kid:
            self.verify_kid = None
            if isinstance(result, dict) and health.boot_of(result) != self.watch.boot_id:
                self._lose(f"it restarted: boot {str(self.watch.boot_id)[:12]} -> {health.boot_of(result)[:12]}")
        # (else: a late reply to a request the driver gave up on)

    def _timeout(self, kid: int) -> None:
        if kid == self.probe_kid:
            self.probe_kid = None  # the next tick probes again
        elif kid == self.verify_kid:
            self.verify_kid = None
            self._lose("no reply to hello after a resend")
        elif kid in self.kwait:
            self._lose(f"no reply to {self.kwait[kid][1]}")

    def _lose(self, why: str) -> None:
        """The kernel is lost: every call in flight fails with EIO, every later one at once."""
        if not self.watch.lose(why):
            return
        if self.observer is not None:
            self.observer.probe("mm.kernel.lost")
        self.probe_kid = self.verify_kid = None
        self.probe_result = None
        self.out.append(ResetKernel())
        self.out.append(Log(f"mm: kernel unreachable ({why}): answering EIO to requests that need it and checking on "
                            "it every tick", "warning"))
        waiting = list(self.kwait.values())
        self.kwait.clear()
        for task, call in waiting:
            self._advance(task, Error(Errno.EIO, f"no reply from the kernel to {call}"))

    def _probe(self) -> Any:
        """A lost kernel's hello for ``health.check``: the answer to an earlier probe, or EIO at once (a
        probe is sent if none is out: the mm never waits on a kernel that is away)."""
        if self.probe_result is not None:
            r, self.probe_result = self.probe_result, None
            return r
        if self.probe_kid is None:
            self.probe_kid = self._send("hello", {}, probe=True)
        return Error(Errno.EIO, "no answer to the probe yet")

    # ---- housekeeping ---------------------------------------------------------------------------

    def _tick(self) -> Op:
        """The kernel's health (``health.check``; it settles with a kernel that was away), then its
        events, the watermarks and compaction, and what is unwritten journaled."""
        assert self.core is not None and self.service is not None
        verdict = yield from health.check(self.watch, self.service)
        if verdict.state in ("new_boot", "foreign"):
            return verdict
        if verdict.serving:
            yield from self.core.poll_events()
            yield from self.service.maintain()
        yield from self.core.flush()
        return verdict

    def _ticked(self, verdict: health.Verdict) -> None:
        if verdict.state == "new_boot":
            self.state = "rebooting"
            self.out.append(Log(f"mm: the kernel restarted ({verdict.message}): its processes and frames are gone; "
                                "rebuilding the view from the new boot's address map", "warning"))
            self.out.append(NewBoot(verdict.hello or {}, verdict.amap or {}))
        elif verdict.state == "foreign":
            self.state = "stopped"
            self.out.append(Fatal(f"mm: {verdict.message}"))
        elif verdict.state == "refused":
            self.out.append(Log(f"mm: {verdict.message}", "error"))
        elif verdict.state == "back":
            rec = verdict.recovery or {}
            self.out.append(Log(f"mm: {verdict.message}; reconciled: {rec['found']['divergences']} divergent "
                                f"frame(s) found, {rec['remaining']['divergences']} left"))

    def _recovered(self, rec: Any) -> None:
        if isinstance(rec, Error):
            if rec.code == Errno.EIO:  # the kernel is away: requests get EIO at once until a tick's probe
                self.out.append(Log(f"mm: could not settle with the kernel yet ({rec.message}); settling when it "
                                    "answers", "warning"))  # is answered, and the mm settles then ("back")
            else:
                self.state = "stopped"
                self.out.append(Fatal(f"mm: recovery failed: {rec.message}"))
            return
        found, left = rec["found"]["divergences"], rec["remaining"]["divergences"]
        if self.replayed or found:
            self.out.append(Log(f"mm: rebuilt the view from {self.replayed} journal records; settled "
                                f"{rec['settled_intents']} pending intent(s); {found} divergent frame(s) found, "
                                f"{left} left after repair"))
