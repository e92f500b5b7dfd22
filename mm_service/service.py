"""The mm as a bytes-in, bytes-out service: envelope, validation, replay cache, audit, compaction.

Rules for this file: no sockets, clocks, randomness or I/O. ``handle`` is an
operation generator (see ``policy``): it yields the kernel calls and journal
writes the request needs and returns the reply bytes. The ZeroMQ server and
the simulator both drive it.

The replay cache survives a restart for the calls that change state (I12):
a request's intent carries its caller, request id and digest, so the reply
of a request the kernel carried out is rebuilt from the journal (an intent
and its ``done``) or, when a crash came before its outcome was journaled,
from ``recover`` settling the intent with the kernel. A refusal after the
request changed something (a new process, an undone intent, a kernel that
did not answer) is journaled as a ``reply`` op before it is sent. A resend
that reaches a restarted mm is so answered, never executed again; a request
whose intent recovery undoes had no effect and runs when it comes again.
The first answer a request got stands: a rebuilt reply never replaces one
already given.

Compaction: every ``Config.compact_every`` journaled ops the service writes a
snapshot op (the view, plus the recent replies that are durable), and the
journal drops everything before it in the same transaction.
"""

from __future__ import annotations

import logging
from typing import Any

from mm_service.policy import MMCore, Op, Persist, intent_result
from protocol import wire
from protocol.calls import MM_CALLS, validate
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

log = logging.getLogger("mmsim.mm")
DURABLE_REPLIES = frozenset(("alloc", "free", "share"))  # the calls that change state
SNAPSHOT_REPLIES = 32  # durable replies per caller a snapshot keeps (a resend is of a recent request)


class MMService:
    def __init__(self, core: MMCore, admin_key: str) -> None:
        self.core = core
        self.admin_key = admin_key  # the mm's own public key: may call audit
        self.replay = ReplayCache()
        self.durable = ReplayCache(per_identity=SNAPSHOT_REPLIES)  # the replies a restart brings back
        self.recovery: dict[str, Any] | None = None

    def handle(self, identity: str | None, data: bytes) -> Op:
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
        model = validate(MM_CALLS, call, args)
        acted = False
        if isinstance(model, Error):
            result: Any = model
        elif call == "audit":
            result = yield from self.audit(identity)
        else:
            origin = {"caller": identity, "id": req_id, "digest": digest} if call in DURABLE_REPLIES else None
            try:
                result, acted = yield from _acted(self.core.request(identity, call, model, origin))
            except Exception as exc:  # a bug: answer it, log it, keep serving
                log.exception("internal error in %s", call)
                result, acted = Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}"), True
        if isinstance(result, Error):
            log.debug("refused %s from %s: %s", call, identity[:8], result.message)
            reply = wire.error_reply(req_id, result)
            if acted and call in DURABLE_REPLIES:  # journaled before it is sent (with the undo and whatever
                # else is deferred): a resend after a restart gets it too; a refusal that did nothing is
                # simply given again
                yield from self.core.persist({"op": "reply", "key": identity, "id": req_id, "digest": digest,
                                              "reply": reply})
                self.durable.remember(identity, req_id, digest, reply)
        else:
            reply = wire.ok_reply(req_id, result)
            if acted and call in DURABLE_REPLIES:  # its intent is in the journal: recovery rebuilds it
                self.durable.remember(identity, req_id, digest, reply)
        self.replay.remember(identity, req_id, digest, reply)
        return reply

    # ---- restart --------------------------------------------------------------------

    def restore(self, ops: Any) -> int:
        """Rebuild the view from the journal's ops and refill the replay cache with the replies they
        hold (after a restart). Returns how many ops were replayed (from the last snapshot on)."""
        ops = list(ops)
        self.core.replay(ops)
        intents: dict[int, dict[str, Any]] = {}
        for op in ops:
            kind = op["op"]
            if kind == "intent":
                if "id" in op:
                    intents[op["n"]] = op
            elif kind == "done":
                p = intents.pop(op["n"], None)
                if p is not None:
                    self._answered(p)
            elif kind == "undo":
                intents.pop(op["n"], None)
            elif kind == "reply":
                self._remember(op["key"], op["id"], op["digest"], op["reply"])
            elif kind == "snapshot":
                self.replay.replies.clear()
                self.durable.replies.clear()
                intents = {p["n"]: p for p in op["pending"] if "id" in p}
                for key, req_id, digest, reply in op["replies"]:
                    self._remember(key, req_id, digest, reply)
        return self.core.journaled

    def recover(self) -> Op:
        """``MMCore.recover``, then the replies of the requests whose intents it found done."""
        rec = yield from self.core.recover()
        for intent, outcome in self.core.settled:
            if outcome == "done" and "id" in intent:
                self._answered(intent)
        self.core.settled = []
        if isinstance(rec, dict):
            self.recovery = rec
        return rec

    def _answered(self, intent: dict[str, Any]) -> None:
        """The kernel did what ``intent`` asked: the request gets the reply it would have got."""
        self._remember(intent["caller"], intent["id"], intent["digest"],
                       wire.ok_reply(intent["id"], intent_result(intent)))

    def _remember(self, identity: str, req_id: int, digest: bytes, reply: bytes) -> None:
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
        """After a request: the kernel pool's watermarks, and a snapshot when one is due."""
        yield from self.core.maintain()
        if self.core.journaled >= self.core.config.compact_every:
            yield from self.compact()

    def compact(self) -> Op:
        """Write a snapshot op; the journal drops every op before it in the same transaction (a batch
        that starts with a snapshot replaces the journal: ``Journal.append``)."""
        snap = self.core.snapshot()
        snap["replies"] = [[key, req_id, digest, reply] for key, cache in self.durable.replies.items()
                           for req_id, (digest, reply) in cache.items()]
        yield Persist([snap])  # (the view is already what the snapshot holds: nothing to apply)
        self.core.journaled = 1
        self.core.counters.journal_writes += 1

    def audit(self, identity: str) -> Op:
        if identity != self.admin_key:
            return Error(Errno.EPERM, "audit is for the operator (the mm's own key)")
        yield from self.core.poll_events()
        report = yield from self.core.audit()
        if isinstance(report, dict):
            report["recovery"] = self.recovery
        return report


def _acted(gen: Op) -> Op:
    """Run ``gen`` (yielding its effects); returns (its result, whether it yielded any effect)."""
    value: Any = None
    acted = False
    while True:
        try:
            effect = gen.send(value)
        except StopIteration as stop:
            return stop.value, acted
        acted = True
        value = yield effect
