"""The mm as a bytes-in, bytes-out service: envelope, validation, replay cache, audit.

Rules for this file: no sockets, clocks, randomness or I/O. ``handle`` is an
operation generator (see ``policy``): it yields the kernel calls and journal
writes the request needs and returns the reply bytes. The ZeroMQ server and
the simulator both drive it.

The replay cache survives a restart for the calls that change state (I12):
the reply to an ``alloc``, ``free`` or ``share`` is journaled (a ``reply``
op) before it is sent, and ``restore`` refills the cache from the journal, so
a client's Lazy Pirate resend that reaches a restarted mm is answered, not
executed again.
"""

from __future__ import annotations

import logging
from typing import Any

from mm_service.policy import MMCore, Op, Persist
from protocol import wire
from protocol.calls import MM_CALLS, validate
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

log = logging.getLogger("mmsim.mm")
DURABLE_REPLIES = frozenset(("alloc", "free", "share"))  # the calls that change state


class MMService:
    def __init__(self, core: MMCore, admin_key: str) -> None:
        self.core = core
        self.admin_key = admin_key  # the mm's own public key: may call audit
        self.replay = ReplayCache()
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
            try:
                result, acted = yield from _acted(self.core.request(identity, call, model))
            except Exception as exc:  # a bug: answer it, log it, keep serving
                log.exception("internal error in %s", call)
                result, acted = Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}"), True
        if isinstance(result, Error):
            log.debug("refused %s from %s: %s", call, identity[:8], result.message)
            reply = wire.error_reply(req_id, result)
        else:
            reply = wire.ok_reply(req_id, result)
        if acted and call in DURABLE_REPLIES:  # journaled before it is sent: a resend after a restart
            # gets it too (a refusal that did nothing is simply given again)
            yield Persist([{"op": "reply", "key": identity, "id": req_id, "digest": digest, "reply": reply}])
        self.replay.remember(identity, req_id, digest, reply)
        return reply

    def restore(self, ops: Any) -> int:
        """Refill the replay cache from the journal's ``reply`` ops (after a restart); returns how many."""
        n = 0
        for op in ops:
            if op.get("op") == "reply":
                self.replay.remember(op["key"], op["id"], op["digest"], op["reply"])
                n += 1
        return n

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
