"""The mm as a bytes-in, bytes-out service: envelope, validation, replay cache, audit, compaction.

Rules for this file: no sockets, clocks, randomness or I/O. ``handle`` is an
operation generator (see ``policy``): it yields the kernel calls and journal
writes the request needs and returns the reply bytes. ``mm_service.driver``
runs it (several at once).

Who may do what: an admitted client uses its own memory (``alloc``, ``free``,
``share``, ``accept``); the operator's key may read (``hello``, ``stats``,
``audit``) and change nothing; ``audit`` is the operator's alone.

At most once (I12), across crashes too: a request's intent (or offer) carries
its caller, request id and digest, so the reply of a request the kernel
carried out is rebuilt from the journal (an intent and its ``Done``; an
offer) or, when a crash came before its outcome was journaled, from
``recover`` settling the intent with the kernel. A refusal after the request
changed something (an undone intent, a process made and destroyed again, a
kernel that did not answer) is journaled as a ``Reply`` record. Every reply
of a request that changed something is sent only after its outcome is
journaled. A resend that reaches a restarted mm is so answered, never
executed again; a request whose intent recovery undoes had no effect and
runs when it comes again. The first answer a request got stands: a rebuilt
reply never replaces one already given.

Arguments: ``alloc`` and ``free`` in their usual shape are checked by ``mm_service.fastargs`` (equivalent
to the pydantic models of ``protocol.calls.MM_CALLS``, which decide everything else and give every
refusal).

The replay cache pins the replies of live clients and of the operator
(``ReplayCache(pinned=...)``): no amount of other callers' traffic evicts
them.

Compaction: every ``Config.compact_every`` journaled records the service
writes a snapshot (the view, plus the recent replies that are durable), and
the journal drops everything before it in the same transaction.
"""

from __future__ import annotations

import logging
from typing import Any

from mm_service import records as J
from mm_service.fastargs import FAST
from mm_service.observe import NO_OBSERVER, MMObserver
from mm_service.policy import KCall, MMCore, Op, Persist, intent_result, offer_result
from protocol import wire
from protocol.calls import MM_CALLS, validate
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

log = logging.getLogger("mmsim.mm")
DURABLE_REPLIES = frozenset(("alloc", "free", "share", "accept"))  # the calls that change state
READ_ONLY = frozenset(("hello", "ping", "stats"))  # answered from the view, no effects
SNAPSHOT_REPLIES = 32  # durable replies per caller a snapshot keeps (a resend is of a recent request)


class MMService:
    def __init__(self, core: MMCore, mm_key: str, operator_key: str | None = None) -> None:
        self.core = core
        self.mm_key = mm_key
        self.operator_key = operator_key  # may read (audit, stats), never change anything
        self.replay = ReplayCache(pinned=self.pinned)
        self.durable = ReplayCache(per_identity=SNAPSHOT_REPLIES, pinned=self.pinned)  # what a restart brings back
        self.recovery: dict[str, Any] | None = None
        self.provisional: dict[tuple[str, int], int] = {}  # (caller, request id) -> its intent: EIO answered
        self.observer: MMObserver = NO_OBSERVER
        self._watched = False
        self._fast = FAST  # argument checks equivalent to the models for alloc and free (``mm_service.fastargs``)
        self._replies = wire.Replies()  # (replies encoded with a packer made once: the bytes of ``wire.ok_reply``)

    def set_observer(self, observer: MMObserver | None) -> None:
        """Tell ``observer`` of every request executed and every record applied to the view (None: nobody;
        see ``mm_service.observe``)."""
        self.observer = observer if observer is not None else NO_OBSERVER
        self._watched = self.observer is not NO_OBSERVER
        self.core.view.set_observer(observer)

    def pinned(self, identity: str) -> bool:
        """Callers whose replies others' traffic never evicts: live clients, the operator, the mm."""
        return identity in self.core.view.clients or identity == self.operator_key or identity == self.mm_key

    def handle(self, identity: str | None, data: bytes, parsed: Any = None) -> Op:
        """One request's reply bytes (``parsed``: ``wire.parse_request(data)`` if the caller made it)."""
        if parsed is None:
            parsed = wire.parse_request(data)
        if len(parsed) == 2:
            return wire.error_reply(parsed[0], parsed[1])
        req_id, call, args = parsed
        if not identity:
            return wire.error_reply(req_id, Error(Errno.EPERM, "unauthenticated caller (CURVE required)"))
        digest = self.replay.digest(data)
        cached = self.replay.lookup(identity, req_id, digest)
        if cached is not None:
            return cached
        if self._watched:
            self.observer.replay_miss(identity, req_id)
        fast = self._fast.get(call)
        model = fast(args) if fast is not None else None
        if model is None:
            model = validate(MM_CALLS, call, args)
        acted = False
        if isinstance(model, Error):
            result: Any = model
        elif call == "audit":
            result = yield from self.audit(identity)
        elif call in DURABLE_REPLIES and identity in (self.operator_key, self.mm_key):
            result = Error(Errno.EPERM, f"the operator's key may read, never change anything ({call})")
        else:
            origin = (identity, req_id, digest) if call in DURABLE_REPLIES else None
            gen = self.core.request(identity, call, model, origin)
            value: Any = None
            try:  # its effects passed on; ``acted``: whether it asked the kernel anything or wrote records
                while True:
                    try:
                        effect = gen.send(value)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if isinstance(effect, KCall) or effect.ops:
                        acted = True
                    value = yield effect
            except Exception as exc:  # a bug: answer it, log it, keep serving
                log.exception("internal error in %s", call)
                result, acted = Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}"), True
        if isinstance(result, Error):
            log.debug("refused %s from %s: %s", call, identity[:8], result.message)
            reply = self._replies.error(req_id, result)
            if result.code == Errno.EIO and call in DURABLE_REPLIES:  # not final (see the module docstring)
                n = self._pending_intent(identity, req_id)
                if n is None:  # it left nothing to settle: a resend simply runs
                    if acted:
                        yield from self.core.persist()
                    return reply
                self.provisional[(identity, req_id)] = n
            elif acted and call in DURABLE_REPLIES:  # journaled before it is sent: a resend after a restart gets
                # it too; a refusal that did nothing is simply given again
                self.core.record(J.Reply(identity, req_id, digest, reply))
                self.durable.remember(identity, req_id, digest, reply)
        else:
            reply = self._replies.ok(req_id, result)
            if acted and call in DURABLE_REPLIES:  # its intent or offer is journaled: a restart rebuilds it
                self.durable.remember(identity, req_id, digest, reply)
        if acted:
            yield from self.core.persist()  # the request's outcome durable before its reply
        self.replay.remember(identity, req_id, digest, reply)
        return reply

    # ---- restart --------------------------------------------------------------------

    def restore(self, ops: Any) -> int:
        """Rebuild the view from the journal's records and refill the replay cache with the replies they
        hold (after a restart). Returns how many records were replayed (from the last snapshot on)."""
        ops = list(ops)
        self.core.replay(ops)
        intents: dict[int, J.Intent] = {}
        for rec in ops:
            kind = type(rec)
            if kind is J.Intent:
                if rec.caller is not None:
                    intents[rec.n] = rec
            elif kind is J.Done:
                p = intents.pop(rec.n, None)
                if p is not None:
                    self._answered(p)
            elif kind is J.Undo:
                intents.pop(rec.n, None)
            elif kind is J.Offered:
                if rec.caller is not None:
                    self._remember(rec.caller, rec.rid, rec.digest, wire.ok_reply(rec.rid, offer_result(rec)))
            elif kind is J.Reply:
                self._remember(rec.key, rec.rid, rec.digest, rec.reply)
            elif kind is J.Snapshot:
                self.replay.replies.clear()
                self.durable.replies.clear()
                intents = {}
                for item in rec.body["pending"]:
                    p = J.decode(item)
                    if p.caller is not None:
                        intents[p.n] = p
                for key, req_id, digest, reply in rec.body["replies"]:
                    self._remember(key, req_id, digest, reply)
        return self.core.journaled

    def _pending_intent(self, identity: str, req_id: int) -> int | None:
        for n, p in self.core.view.pending.items():
            if p.caller == identity and p.rid == req_id:
                return n
        return None

    def recover(self) -> Op:
        """``MMCore.recover``, then the replies of the requests whose intents it settled: the result of
        those the kernel did; those it did not will run when they come again."""
        rec = yield from self.core.recover()
        for intent, outcome in self.core.settled:
            if intent.caller is None:
                continue
            if outcome == "done":
                self._answered(intent)
            elif self.provisional.pop((intent.caller, intent.rid), None) is not None:
                self._drop(intent.caller, intent.rid)  # (its EIO was not final: a resend runs)
        self.core.settled = []
        for (caller, rid), n in list(self.provisional.items()):
            if n not in self.core.view.pending:  # settled otherwise (its process died): a resend runs
                del self.provisional[(caller, rid)]
                self._drop(caller, rid)
        if isinstance(rec, dict):
            self.recovery = rec
        return rec

    def _answered(self, intent: J.Intent) -> None:
        """The kernel did what ``intent`` asked: the request gets the reply it would have got."""
        assert intent.caller is not None and intent.rid is not None and intent.digest is not None
        self._remember(intent.caller, intent.rid, intent.digest, wire.ok_reply(intent.rid, intent_result(intent)))

    def _drop(self, identity: str, req_id: int) -> None:
        for cache in (self.replay, self.durable):
            known = cache.replies.get(identity)
            if known is not None:
                known.pop(req_id, None)

    def _remember(self, identity: str, req_id: int, digest: bytes, reply: bytes) -> None:
        if self.provisional.pop((identity, req_id), None) is not None:
            self._drop(identity, req_id)  # an EIO answer replaced by what the kernel did
        known = self.replay.replies.get(identity)
        if known is not None and req_id in known:
            return  # the first answer stands
        self.replay.remember(identity, req_id, digest, reply)
        self.durable.remember(identity, req_id, digest, reply)

    # ---- housekeeping -----------------------------------------------------------------

    def maintain_due(self) -> bool:
        """Whether ``maintain`` has anything to do (a cheap test a driver may make after each request)."""
        return self.core.maintain_due() or self.core.journaled >= self.core.config.compact_every

    def maintain(self) -> Op:
        """The kernel pool's watermarks, and a snapshot when one is due."""
        yield from self.core.maintain()
        if self.core.journaled >= self.core.config.compact_every:
            yield from self.compact()

    def compact(self) -> Op:
        """Write a snapshot; the journal drops every record before it in the same transaction (a batch
        that starts with a snapshot replaces the journal: ``Journal.append``)."""
        snap = self.core.snapshot()
        snap.body["replies"] = [[key, req_id, digest, reply] for key, cache in self.durable.replies.items()
                                for req_id, (digest, reply) in cache.items()]
        if self._watched:
            self.observer.probe("mm.journal.compacted")
        yield Persist([snap])  # (the view is already what the snapshot holds: nothing to apply)
        self.core.journaled = 1
        self.core.counters.journal_writes += 1

    def audit(self, identity: str) -> Op:
        if identity != self.operator_key:
            return Error(Errno.EPERM, "audit is the operator's (the operator key of the run directory)")
        report = yield from self.core.audit()
        if isinstance(report, dict):
            report["recovery"] = self.recovery
        return report

