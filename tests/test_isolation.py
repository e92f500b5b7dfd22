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

import time

import zmq

from clients.honest import HonestProcess
from mm_service import driver as D
from mm_service.policy import Config
from mm_support import OP
from protocol import rundir, wire
from support import LEASE
from test_mm_driver import KEYS, Harness

STRANGERS = 5000  # strangers connecting at once: seconds of the kernel's I/O thread at ~0.5 ms a handshake

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


# ---- real processes: a stranger's handshakes ---------------------------------------------------------------

def test_a_burst_of_stranger_handshakes_costs_no_honest_client_its_process(make_system):
    """Thousands of strangers connecting at once keep the kernel's I/O busy with their CURVE handshakes (each
    refused at the end of it): the kernel hears nobody for a while, the honest client included. Its lease must
    measure it, not the kernel's deafness: it keeps its process (the same pid, no ESRCH)."""
    s = make_system(clients=0, memory="64MiB")
    s.start()
    s.admit("honest")
    honest = HonestProcess(s.run_dir, "honest")
    zctx = zmq.Context()
    zctx.linger = 0
    zctx.set(zmq.MAX_SOCKETS, STRANGERS + 16)
    socks = []
    try:
        honest.window(0.5)
        endpoint, key = rundir.read_endpoint(s.run_dir, "kernel"), rundir.public_key(s.run_dir, "kernel")
        for _ in range(STRANGERS):
            pub, sec = rundir.fresh_keypair()
            sock = zctx.socket(zmq.DEALER)
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = key, pub, sec
            sock.connect(endpoint)
            sock.send(wire.request(1, "ping"), zmq.NOBLOCK)
            socks.append(sock)
        time.sleep(3 * LEASE)
        w = honest.mark()
        assert w["pids"] == [honest.pid] and not w["errors"], w
        assert not any(sock.poll(0, zmq.POLLIN) for sock in socks)  # and no stranger was answered
    finally:
        for sock in socks:
            sock.close(0)
        zctx.term()
        honest.stop()
