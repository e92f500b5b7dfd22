"""The mm as a bytes-in, bytes-out service: envelope, validation, replay cache, audit.

Rules for this file: no sockets, clocks, randomness or I/O. ``handle`` is an
operation generator (see ``policy``): it yields the kernel calls and journal
writes the request needs and returns the reply bytes. The ZeroMQ server and
the simulator both drive it.
"""

from __future__ import annotations

import logging
from typing import Any

from mm_service.policy import MMCore, Op
from protocol import wire
from protocol.calls import MM_CALLS, validate
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

log = logging.getLogger("mmsim.mm")


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
        if isinstance(model, Error):
            result: Any = model
        elif call == "audit":
            result = yield from self.audit(identity)
        else:
            try:
                result = yield from self.core.request(identity, call, model)
            except Exception as exc:  # a bug: answer it, log it, keep serving
                log.exception("internal error in %s", call)
                result = Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}")
        if isinstance(result, Error):
            log.debug("refused %s from %s: %s", call, identity[:8], result.message)
            reply = wire.error_reply(req_id, result)
        else:
            reply = wire.ok_reply(req_id, result)
        self.replay.remember(identity, req_id, digest, reply)
        return reply

    def audit(self, identity: str) -> Op:
        if identity != self.admin_key:
            return Error(Errno.EPERM, "audit is for the operator (the mm's own key)")
        yield from self.core.poll_events()
        report = yield from self.core.audit()
        if isinstance(report, dict):
            report["recovery"] = self.recovery
        return report
