"""At-most-once execution (I12): replies cached per caller identity by request id.

A request that arrives again with the same identity, id and bytes gets the
cached reply without being executed again; the same id with different bytes
is refused. Bounded: ``per_identity`` replies per caller, ``identities``
callers (least recently seen forgotten first). No I/O, no clocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from protocol import wire
from protocol.errors import Errno, Error


class ReplayCache:
    def __init__(self, per_identity: int = 256, identities: int = 4096) -> None:
        self.per_identity = per_identity
        self.identities = identities
        self.replies: OrderedDict[str, OrderedDict[int, tuple[bytes, bytes]]] = OrderedDict()
        self.hits = 0

    @staticmethod
    def digest(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    def lookup(self, identity: str, req_id: int, digest: bytes) -> bytes | None:
        """The cached reply, an error reply for a reused id, or None (execute it)."""
        cache = self.replies.get(identity)
        hit = cache.get(req_id) if cache is not None else None
        if hit is None:
            return None
        if hit[0] == digest:
            self.hits += 1
            return hit[1]
        return wire.error_reply(req_id, Error(Errno.EINVAL, f"request id {req_id} was already used for a "
                                              "different request", {"field": "id"}))

    def remember(self, identity: str, req_id: int, digest: bytes, reply: bytes) -> None:
        cache = self.replies.get(identity)
        if cache is None:
            cache = self.replies[identity] = OrderedDict()
            if len(self.replies) > self.identities:
                self.replies.popitem(last=False)
        else:
            self.replies.move_to_end(identity)
        cache[req_id] = (digest, reply)
        if len(cache) > self.per_identity:
            cache.popitem(last=False)
