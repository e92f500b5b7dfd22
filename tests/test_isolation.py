"""Isolation of resources (I13): what a hostile client, a stranger or a group of them can do to an honest
client, and what they get for it.

In-process first (quick and exact): the server bugs the attacks found, each shown on the sans-I/O core.
Then the attack classes with real processes (``clients.isolation``): a kernel and an mm from
``mmsim.system.System``, an honest client (``clients.honest``, a process of its own) running its
workload, and the attacker in this process. For each class the test asserts the victim's experience
itself (no error of any kind within its quota, the same process all along, its p99 latency within
``P99_BOUND`` times its own p99 alone measured just before, progress) and the attacker's refusals.
Several classes share one system: each leaves it as it found it (the class waits for what it made to go).
"""

from __future__ import annotations

from mm_service import driver as D
from mm_service.policy import Config
from mm_support import OP
from protocol import wire
from test_mm_driver import KEYS, Harness

# ---- in-process: the servers' bounds ----------------------------------------------------------------------


def test_the_mm_queues_a_bounded_number_of_requests_per_caller():
    """A caller that sends requests faster than they run (a reader that never reads, a pipelining flood) gets
    EAGAIN for those past its queue; the mm keeps at most MAX_WAITING of its requests, and other callers
    still get their turn."""
    h = Harness(Config(low=8, target=32, high=256))
    h.settle()
    a, b = KEYS[0], KEYS[1]
    first = h.request(a, call="alloc", pages=1, prot=3, vaddr=0x4000_0000)  # its kernel call stays unanswered
    flood = h.wakeup([(a, "alloc", {"pages": 1, "prot": 3}) for _ in range(10 * D.MAX_WAITING)])
    waiting = len(h.d.queues.get(a, ()))
    assert waiting <= D.MAX_WAITING, waiting
    refused = [h.replies[p] for p in flood if p in h.replies]
    assert len(refused) == 10 * D.MAX_WAITING - waiting
    assert all(r["ok"] is False and r["error"]["code"] == "EAGAIN" for r in refused), refused[:2]
    assert refused[0]["error"]["limit"] == D.MAX_WAITING
    other = h.request(b, call="alloc", pages=1, prot=3)  # another caller starts at once
    assert b in h.d.busy
    h.settle()
    assert h.replies[first]["ok"] and h.replies[other]["ok"]
    assert sum(1 for p in flood if h.replies.get(p, {}).get("ok")) == waiting  # the queued ones ran
    # a request refused for a full queue ran nowhere: sent again later, it runs
    identity, data = h.sent[10 * D.MAX_WAITING]  # the last of the flood: refused
    assert identity == a and h.replies[flood[-1]]["error"]["code"] == "EAGAIN"
    again = h.request(a, data)
    h.settle()
    assert h.replies[again]["ok"] is True
    h.exact()


def test_the_mm_takes_a_clients_request_of_at_most_the_client_size():
    """Anyone but the mm and the operator sends the mm at most ``wire.MAX_CLIENT_REQUEST_BYTES`` (a client's
    largest legal request is far smaller): past it, E2BIG before a byte is decoded (a 30 KiB request of
    integers cost the mm six times a 4 KiB one to decode and refuse)."""
    h = Harness(Config(low=8, target=32, high=256))
    h.settle()
    pad = {"pad": [b"x" * 200] * 25}  # about 5 KiB
    client = h.request(KEYS[0], wire.encode({"v": 1, "id": 7, "call": "ping", "args": pad}))
    stats = h.request(KEYS[0], wire.encode({"v": 1, "id": 8, "call": "alloc", "args": {"pages": 1, "prot": 3, **pad}}))
    operator = h.request(OP, wire.encode({"v": 1, "id": 9, "call": "ping", "args": pad}))
    small = h.request(KEYS[0], call="ping")
    h.settle()
    for peer in (client, stats):
        assert h.replies[peer]["ok"] is False and h.replies[peer]["error"]["code"] == "E2BIG", h.replies[peer]
    assert h.replies[operator]["error"]["code"] == "EINVAL"  # decoded: the operator may send larger requests
    assert h.replies[small]["ok"] is True
    assert not h.d.core.view.clients  # nothing was made for the refused alloc
