"""The simulated memory manager process: the real ``MMService``/``MMCore`` driven effect by effect.

The node is the sans-I/O policy's driver, as ``mm_service.server`` is for the
real process, but each effect takes its own simulated step, so a crash can
fall between any two of them (after the kernel answered and before the
journal write, after the journal write and before the reply, ...):

- ``Persist(ops)``: written to the simulated journal (``mutants.Journal``),
  which is all that survives a crash;
- ``KCall(call, args)``: sent to the kernel over the simulated network with a
  fresh request id; with no reply within the timeout the *same bytes* are
  sent again (the Lazy Pirate of ``protocol.connection``), and when the
  retries run out the policy gets ``Error(EIO)``, as from the real ``kcall``.

Jobs run one at a time, like the real server: a client request (then
``maintain``, which compacts the journal when a snapshot is due: every
10-150 ops, drawn from the seed, so crashes fall around compactions too), a
tick, or, after a restart, ``recover`` (the journal replayed into the view
and the replay cache first) then ``maintain``. As in ``mm_service.server``: a
kernel call that gets no answer marks the kernel *lost*, and while it is lost
every kernel call fails at once with EIO; each tick runs the real
``mm_service.health.check`` (its ``hello`` a probe, never resent), so when a
lost kernel answers again the mm settles with it (``recover``) before it
reads events, keeps its watermarks and journals what requests deferred.
(The real server's boot-id check after a resend is left out: the simulated
kernel never restarts.)

I12 across crashes: a request that a crash cut short may run again when the
client resends it to the restarted mm only if the kernel had not carried
out its map or unmap (it had no effect); if the kernel had, recovery must
answer the resend from the journal, and running it again is a violation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from simulator.faults import child
from simulator.mutants import Journal
from simulator.net import Msg
from mm_service import health
from mm_service.policy import Config, KCall, MMCore, Persist
from mm_service.service import MMService
from protocol import wire
from protocol.errors import Errno, Error

if TYPE_CHECKING:
    from simulator.world import World

MUTATING = frozenset(("alloc", "alloc(large)", "free", "share"))
KERNEL_MUTATING = frozenset(("donate", "reclaim", "map", "unmap", "proc_create", "proc_destroy"))


class MMNode:
    def __init__(self, world: World, key: str, journal: Journal) -> None:
        self.world = world
        self.key = key
        self.journal = journal
        journal.on_durable = self._durable
        self.inc = 0  # incarnation: bumped by every restart; stale events and replies are dropped
        self.alive = False
        self.next_kid = 1  # kernel request ids only grow, across restarts too (the real ones start
        # from the clock)
        self.executed: set[tuple[str, int]] = set()  # (identity, request id) executed by this incarnation
        self.answered: set[tuple[str, int]] = set()  # ... and answered, by any incarnation (I12)
        self.started: set[tuple[str, int]] = set()  # ... or only started, by any incarnation
        self.core: MMCore | None = None
        self.service: MMService | None = None
        self.job: tuple[str, Generator, Any] | None = None
        self.value: Any = None
        self.jobs: deque[tuple[str, Generator]] = deque()
        self.inbox: deque[Msg] = deque()
        self.waiting: tuple[int, bytes, int, int, str] | None = None  # kernel request id, bytes, attempt,
        # retries, call
        self.tick_due = False
        self.step_scheduled = False
        self.durable_outcomes: set[int] = set()  # intents whose outcome the journal can settle: the intent
        # is durable (its done/undo rides with a later write; recovery settles it from the kernel)
        self.request_kids: dict[tuple[str, int], list[int]] = {}  # (identity, request id) -> the ids of the
        # map/unmap kernel calls the mm made for it (the world records which ones the kernel carried out)
        self.current: tuple[str, int] | None = None
        self.fresh = False  # the current request missed the replay cache
        self.endpoint: tuple = ("mm", 0)
        self.crash_armed: str | None = None  # "kernel_reply" / "client_reply": crash at that boundary
        self.job_kind_at_crash: str | None = None
        self.watch = health.KernelWatch()  # lost: fail fast until a tick's probe gets an answer
        self.compact_every = child(world.seed, "mm-compact").randint(10, 150)
        self.probe_next = False  # the next KCall is the tick's probe: sent even when lost, never resent
        self.job_effects = 0

    # ---- life -----------------------------------------------------------------------

    def boot(self) -> None:
        w = self.world
        svc = w.kernel.svc
        now = w.clock.now / 1e6
        hello = svc.call(self.key, "hello", now=now)
        amap = svc.call(self.key, "address_map", now=now)
        assert isinstance(hello, dict) and isinstance(amap, dict), (hello, amap)
        self.inc += 1
        self.endpoint = ("mm", self.inc)
        self.alive = True
        bug = w.the_bug
        core = bug.mm_core(amap, hello, Config(**w.plan.mm, quota=w.quota, compact_every=self.compact_every))
        ops = self.journal.replay()
        self.core = core
        self.service = service = bug.mm_service(core, self.key)
        service.restore(ops)
        self._observe(core, service)
        self.job = None
        self.watch = health.KernelWatch(boot_id=health.boot_of(hello))
        first = ("recover", service.recover()) if ops or bug.recover_empty_journal else ("refresh", core.refresh())
        self.jobs = deque([first, ("maintain", service.maintain())])
        self.inbox.clear()
        self.waiting = None
        self.step_scheduled = False
        self.durable_outcomes = set()
        self.executed = set()  # a request the last incarnation died in the middle of may run again:
        # recovery settled whatever it had done (I12 holds for requests that were answered)
        w.view_dirty = True
        w.clock.after(w.plan.timing.mm_tick, "mm_tick", self.inc)
        if self.inc > 1:
            w.trace.event(w.step, w.clock.now, "mm_restart", incarnation=self.inc, journal_ops=len(ops),
                          pending=len(core.view.pending))
        self.kick()

    def _observe(self, core: MMCore, service: MMService) -> None:
        w = self.world
        view_apply = core.view.apply

        def apply(op: dict[str, Any]) -> None:
            w.view_dirty = True
            track = w.vtrack
            if track is not None:  # the clients and frames this op may change, for the incremental check
                kind = op.get("op")
                if kind in ("done", "undo"):
                    track.touch((core.view.pending.get(op.get("n")) or {}).get("key"))
                elif kind == "snapshot":
                    track.view = None  # everything replaced: the next check is a full one
                else:
                    track.touch(op.get("key"), op.get("frames"))
            view_apply(op)

        core.view.apply = apply  # type: ignore[method-assign]
        lookup = service.replay.lookup

        def counted_lookup(identity: str, req_id: int, digest: bytes) -> bytes | None:
            hit = lookup(identity, req_id, digest)
            if hit is None:
                self.fresh = True
                key = (identity, req_id)
                if key in self.executed:
                    w.flag("I12", f"the mm executed request #{req_id} of {w.trace.name(identity)} a second time")
                elif key in self.answered:
                    w.flag("I12", f"the mm executed request #{req_id} of {w.trace.name(identity)} again after a "
                                  "restart, though it had answered it before (its replay cache is not durable)")
                elif key in self.started:  # a crash cut its first run short
                    done = [k for k in self.request_kids.get(key, ()) if k in w.kernel_did]
                    if done:
                        w.flag("I12", f"the mm executed request #{req_id} of {w.trace.name(identity)} again after a "
                                      f"restart, though the kernel had carried out its kernel request #{done[0]} "
                                      "before the crash (recovery must answer the resend, not run it)")
                    else:
                        w.faults["mm_rerun_no_effect"] += 1  # the kernel had done nothing for it: it may run
                self.executed.add(key)
                self.started.add(key)
            return hit

        service.replay.lookup = counted_lookup  # type: ignore[method-assign]

    def crash(self, where: str = "at a step") -> None:
        w = self.world
        w.faults["mm_crash"] += 1
        self.crash_armed = None
        self.alive = False
        self.job = None
        self.jobs.clear()
        self.inbox.clear()
        self.waiting = None
        self.step_scheduled = False
        self.journal.crash()
        t = w.plan.timing
        w.trace.event(w.step, w.clock.now, "mm_crash", incarnation=self.inc, where=where,
                      job=self.job_kind_at_crash)
        w.clock.after(w.rng.randint(*t.mm_restart), "mm_restart", self.inc)

    @property
    def lost(self) -> bool:
        return self.watch.lost is not None

    def _durable(self, ops: list[dict[str, Any]]) -> None:
        for op in ops:
            if op["op"] == "intent":
                self.durable_outcomes.add(op["n"])

    # ---- scheduling -------------------------------------------------------------------

    def idle(self) -> bool:
        return (self.alive and self.job is None and not self.jobs and not self.inbox and not self.step_scheduled
                and self.waiting is None)

    def _schedule(self, delay: int) -> None:
        self.step_scheduled = True
        self.world.clock.after(delay, "mm_step", self.inc)

    def kick(self) -> None:
        """Start the next job if the mm is free."""
        if not self.alive or self.job is not None or self.step_scheduled:
            return
        core, service = self.core, self.service
        assert core is not None and service is not None
        if self.jobs:
            kind, gen = self.jobs.popleft()
            self.job = (kind, gen, None)
        elif self.tick_due:
            self.tick_due = False
            self.job = ("tick", self._tick(core), None)
        elif self.inbox:
            msg = self.inbox.popleft()
            parsed = wire.parse_request(msg.data)
            rid = parsed[0]
            call = parsed[1] if len(parsed) == 3 else "?"
            if call == "alloc" and parsed[2].get("large") is True:
                call = "alloc(large)"  # counted apart: the workloads use large pages too
            if call == "free" and isinstance(parsed[2].get("vaddr"), int):
                self.world.promised.pop((msg.identity, parsed[2]["vaddr"]), None)  # asked to free it: no
                # longer promised, whether or not the reply makes it back
            self.fresh = False
            self.job = ("request", service.handle(msg.identity, msg.data), (msg, rid, call, core.intent_no))
        else:
            return
        self.value = None
        self.job_effects = 0
        self._schedule(self.world.plan.timing.mm_effect)

    def _tick(self, core: MMCore) -> Generator:
        """The real server's tick: ``health.check`` (its hello is the probe), then events, watermarks
        and the deferred ops journaled."""
        assert self.service is not None
        w = self.world
        self.probe_next = True
        verdict = yield from health.check(self.watch, self.service)
        if verdict.state == "back":
            rec = verdict.recovery or {}
            w.trace.event(w.step, w.clock.now, "mm_reconciled", settled=rec["settled_intents"],
                          found=rec["found"]["divergences"], remaining=rec["remaining"]["divergences"])
        elif verdict.state in ("new_boot", "foreign", "refused"):
            w.flag("I10", f"the mm's kernel check says {verdict.state} ({verdict.message}) of a kernel that never "
                          "restarted")
        if verdict.serving:
            yield from core.poll_events()
            yield from self.service.maintain()
        yield from core.flush()

    def tick(self, inc: int) -> None:
        if inc != self.inc or not self.alive:
            return
        self.tick_due = True
        self.kick()
        self.world.clock.after(self.world.plan.timing.mm_tick, "mm_tick", self.inc)

    # ---- effects -------------------------------------------------------------------------

    def step(self, inc: int) -> None:
        if inc != self.inc or not self.alive or self.job is None:
            return
        self.step_scheduled = False
        w = self.world
        kind, gen, meta = self.job
        try:
            effect = gen.send(self.value)
        except StopIteration as stop:
            self.finish(kind, meta, stop.value)
            return
        except Exception as exc:  # noqa: BLE001 - any exception out of the mm is the finding itself
            w.flag("I10", f"the mm raised {type(exc).__name__} in {kind}: {exc}")
            self.job = None
            return
        self.job_effects += 1
        if isinstance(effect, Persist):
            self.journal.write(effect.ops)
            self.value = None
            self._schedule(w.plan.timing.persist)
        elif isinstance(effect, KCall):
            probe, self.probe_next = self.probe_next, False
            if self.lost and not probe:  # fail fast, as the real server does while the kernel is away
                self.value = Error(Errno.EIO, "the kernel is unreachable; the mm probes it every tick")
                self._schedule(w.plan.timing.mm_effect)
                return
            kid = self.next_kid
            self.next_kid += 1
            if kind == "request" and effect.call in ("map", "unmap"):
                self.request_kids.setdefault((meta[0].identity, meta[1]), []).append(kid)
            data = wire.request(kid, effect.call, effect.args)
            retries = 0 if probe else w.plan.timing.mm_retries
            self.waiting = (kid, data, 0, retries, effect.call)
            w.net.send(Msg(("kernel",), self.endpoint, self.key, data, False, 0))
            w.clock.after(w.plan.timing.mm_timeout, "mm_timeout", self.inc, kid, 0)
        else:
            w.flag("I10", f"the mm policy yielded an unknown effect {effect!r}")

    def timeout(self, inc: int, kid: int, attempt: int) -> None:
        if inc != self.inc or not self.alive or self.waiting is None or self.waiting[0] != kid \
                or self.waiting[2] != attempt:
            return
        w = self.world
        t = w.plan.timing
        _, data, _, retries, call = self.waiting
        if attempt < retries:
            self.waiting = (kid, data, attempt + 1, retries, call)
            w.faults["resend_mm"] += 1
            w.net.send(Msg(("kernel",), self.endpoint, self.key, data, False, 0))
            w.clock.after(t.mm_timeout, "mm_timeout", self.inc, kid, attempt + 1)
            return
        self.waiting = None
        self.watch.lose(f"no reply to {call}")
        w.faults["mm_gave_up"] += 1
        w.trace.event(w.step, w.clock.now, "mm_gave_up", request=kid, attempts=retries + 1,
                      job=self.job[0] if self.job else None)
        self.value = Error(Errno.EIO, f"no reply from the kernel after {retries + 1} attempt(s)")
        self._schedule(0)

    def deliver_reply(self, msg: Msg) -> None:
        if msg.dst != self.endpoint or not self.alive:
            return  # a reply to an earlier incarnation: its socket is gone
        if self.waiting is None:
            return
        try:
            reply = wire.parse_reply(msg.data)
        except ValueError:
            self.world.flag("I10", "the kernel sent the mm a malformed reply")
            return
        if reply.get("id") != self.waiting[0]:
            return  # a late reply to an earlier request
        call = self.waiting[4]
        self.waiting = None
        w = self.world
        if self.crash_armed == "kernel_reply" and call in KERNEL_MUTATING:
            self._crash_in_job(f"after the kernel's reply to {call}")  # the kernel did it; the mm dies
            return  # before it notes it anywhere
        if w.death_armed and self.job is not None and self.job[0] == "request":
            w.death_armed = False  # the client dies while the mm works on its request
            c = w.client_of(self.job[2][0].identity)
            if c is not None and c.alive:
                w.kill(c)
        if reply.get("ok") is True:
            result = reply.get("result")
            self.value = result if isinstance(result, dict) else {"value": result}
        else:
            self.value = Error.from_wire(reply.get("error"))
        self._schedule(w.plan.timing.mm_effect)

    def _crash_in_job(self, where: str) -> None:
        self.job_kind_at_crash = self.job[0] if self.job is not None else None
        self.crash(where)
        self.job_kind_at_crash = None

    def deliver_request(self, msg: Msg) -> None:
        if not self.alive:
            self.world.faults["lost_mm_down"] += 1
            return
        self.inbox.append(msg)
        self.kick()

    # ---- job ends ---------------------------------------------------------------------------

    def finish(self, kind: str, meta: Any, result: Any) -> None:
        w = self.world
        core = self.core
        assert core is not None
        self.job = None
        if kind == "request":
            msg, rid, call, intents_before = meta
            reply = result
            w.calls += 1
            try:
                decoded = wire.parse_reply(reply)
            except ValueError:
                decoded = {}
                w.flag("I10", f"the mm answered {call} with a malformed reply")
            ok = decoded.get("ok") is True
            outcome = "ok" if ok else str((decoded.get("error") or {}).get("code", "?"))
            w.count("mm", call if self.fresh else "(replayed)", outcome if self.fresh else "cached")
            if self.fresh and ok and call in MUTATING:
                for n in range(intents_before + 1, core.intent_no + 1):
                    if n not in self.durable_outcomes:
                        w.flag("I8", f"the mm replied to {call}#{rid} of {w.trace.name(msg.identity)} before "
                                     f"journaling intent {n} (a crash now would lose what it did)")
                w.promise(msg.identity, call, decoded.get("result") or {})
            if rid is not None and self.fresh and self.job_effects and call in MUTATING:
                self.answered.add((msg.identity, rid))  # it did something: a resend must not do it again
            if self.crash_armed == "client_reply":  # dies with the reply still in its socket
                self.job = ("request", None, meta)
                self._crash_in_job("before sending a reply")
                return
            w.trace.call(w.step, w.clock.now, msg.identity, "mm", msg.data, reply, not self.fresh)
            w.net.send(Msg(msg.src, self.endpoint, self.key, reply, True, 0))
            self.journal.replied()
            assert self.service is not None
            self.jobs.appendleft(("maintain", self.service.maintain()))
        elif kind == "recover":
            if isinstance(result, Error):
                w.trace.event(w.step, w.clock.now, "mm_recovery_failed", error=result.code.name,
                              message=result.message)
                self.crash("its recovery failed")
                return
            w.trace.event(w.step, w.clock.now, "mm_recovered", settled=result["settled_intents"],
                          found=result["found"]["divergences"], repairs=result["repairs"],
                          remaining=result["remaining"]["divergences"])
            w.faults["mm_recovered"] += 1
        self.kick()
