"""At-most-once execution (I12): replies cached per caller identity by request id.

A request that arrives again with the same identity, id and bytes gets the
cached reply without being executed again; the same id with different bytes
is refused. No I/O, no clocks. What is kept of a request to compare its
bytes is ``digest(data)``, a 16-byte BLAKE2b digest (what the mm journals),
or ``key(data)``: the request itself when it is short (17 to ``SHORT``
bytes: keeping it costs less than hashing it; every request is longer than
16 bytes), its digest otherwise; the two never compare equal, so the
comparison is exact either way (the kernel's service uses ``key``).

Bounded, and fair (I13): each caller keeps its ``per_identity`` most recent
replies (its own traffic evicts its own oldest ones). Callers the server
*pins* (``pinned(identity)`` is true: an admitted client with a live
process, the mm, the operator) are never evicted by anyone else's traffic;
the others (a caller with no process yet, or one whose process is gone) are
forgotten least recently seen first once more than ``identities`` callers are
remembered (pinned ones count, but are skipped: they go to the back of the
line). How many callers can be pinned is bounded by admission and quotas, not
here. Making room costs O(1) amortised: each eviction looks at the oldest
callers only, and a pinned one it meets is not looked at again until every
caller behind it was.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

from protocol import wire
from protocol.errors import Errno, Error


SHORT = 80  # requests up to this size are kept whole instead of their digest (a one-page map: about 70 bytes)
_blake2b = hashlib.blake2b


def _never(identity: str) -> bool:
    return False


class ReplayCache:
    def __init__(self, per_identity: int = 256, identities: int = 4096,
                 pinned: Callable[[str], bool] | None = None) -> None:
        self.per_identity = per_identity
        self.identities = identities  # places for callers that are not pinned
        self.pinned = pinned or _never
        self.replies: OrderedDict[str, OrderedDict[int, tuple[bytes, bytes]]] = OrderedDict()
        self._latest: str | None = None  # the caller last remembered: already at the back of ``replies``
        self.hits = 0
        self.evicted = 0  # callers forgotten to make room (never a pinned one)

    @staticmethod
    def digest(data: bytes) -> bytes:
        return _blake2b(data, digest_size=16).digest()

    @staticmethod
    def key(data: bytes) -> bytes:
        """What is kept to recognise ``data`` again: itself if 17..SHORT bytes long, else its digest."""
        if 16 < len(data) <= SHORT:
            return data
        return _blake2b(data, digest_size=16).digest()

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
        replies = self.replies
        cache = replies.get(identity)
        if cache is None:
            cache = replies[identity] = OrderedDict()
            self._latest = identity
            if len(replies) > self.identities:
                self._evict()
        elif identity != self._latest:  # (a caller that calls again and again stays at the back)
            replies.move_to_end(identity)
            self._latest = identity
        cache[req_id] = (digest, reply)
        if len(cache) > self.per_identity:
            cache.popitem(last=False)

    def _evict(self) -> None:
        """Forget the least recently seen caller that is not pinned (pinned callers met on the way go to
        the back, never dropped; the caller just added, at the back, is never the one forgotten)."""
        replies = self.replies
        for _ in range(len(replies) - 1):
            oldest = next(iter(replies))
            if self.pinned(oldest):
                replies.move_to_end(oldest)
                self._latest = None  # (no longer the one at the back)
                continue
            del replies[oldest]
            self.evicted += 1
            return

    def forget(self, identity: str) -> None:
        """Drop a caller's replies (its process is gone and a new one starts afresh)."""
        self.replies.pop(identity, None)
        if identity == self._latest:
            self._latest = None
