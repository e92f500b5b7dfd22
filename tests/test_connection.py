"""The client connection's retries (Lazy Pirate) against a scripted CURVE server in this process.

The server is a ROUTER that answers as each test says: late, only to some attempts, or never; what is
asserted is what a client of a slow server relies on (the answer it gets, the sockets it opens)."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest
import zmq

from protocol import wire
from protocol.connection import Connection
from protocol.errors import CallError, Errno


class Scripted:
    """A CURVE ROUTER (every key accepted: no ZAP handler) in a thread; ``answer(n, rid)`` says after
    how many seconds the ``n``-th request received (0-based) is answered (None: never)."""

    def __init__(self, answer, where: str | None = None, keys: tuple[bytes, bytes] | None = None) -> None:
        self.dir = where or tempfile.mkdtemp(prefix="mmc-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/s"
        self.public, secret = keys or zmq.curve_keypair()
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey = secret
        self.sock.bind(self.endpoint)
        self.answer = answer
        self.peers: list[bytes] = []  # the routing id of each request received, in order
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        due: list[tuple[float, bytes, bytes]] = []
        while not self.stop.is_set():
            if self.sock.poll(10):
                peer, data = self.sock.recv_multipart()
                rid = wire.parse_request(data)[0]
                after = self.answer(len(self.peers), rid)
                self.peers.append(peer)
                if after is not None:
                    due.append((time.monotonic() + after, peer, wire.ok_reply(rid, {"n": len(self.peers) - 1})))
            now = time.monotonic()
            for item in [d for d in due if d[0] <= now]:
                due.remove(item)
                self.sock.send_multipart([item[1], item[2]])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


@pytest.fixture
def scripted():
    made: list[Scripted] = []

    def make(answer, where: str | None = None, keys: tuple[bytes, bytes] | None = None) -> Scripted:
        made.append(Scripted(answer, where, keys))
        return made[-1]

    yield make
    for s in made:
        s.close()


def connect(s: Scripted, **kw) -> Connection:
    public, secret = zmq.curve_keypair()
    return Connection(s.endpoint, s.public, public, secret, **kw)


def test_a_late_reply_to_the_first_attempt_is_taken_on_the_same_socket(scripted):
    """The server takes longer than the timeout to answer the first attempt and ignores the resend: the
    client still gets the answer, and the resend went out on the socket it had (no new handshake)."""
    s = scripted(lambda n, rid: 0.5 if n == 0 else None)
    with connect(s, timeout=0.3, retries=2) as conn:
        assert conn.call("ping") == {"n": 0}
        assert conn.resends == 1
    assert len(s.peers) == 2 and s.peers[0] == s.peers[1]


def test_the_last_attempt_goes_out_on_a_new_socket(scripted):
    """A server that answers only a third attempt: the first resend shares the socket, the last one does not
    (a connection that died without a word is left behind)."""
    s = scripted(lambda n, rid: 0.0 if n == 2 else None)
    with connect(s, timeout=0.2, retries=2) as conn:
        assert conn.call("ping") == {"n": 2}
        assert conn.resends == 2
    assert len(s.peers) == 3 and s.peers[0] == s.peers[1] != s.peers[2]


def test_a_full_queue_is_waited_for_not_dropped(scripted):
    """Requests queued towards a server that is not up yet fill the socket's queue; a call then waits for
    room (the server comes up and drains it) instead of taking a new socket and dropping the queue."""
    where = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")
    keys = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    conn = Connection(f"ipc://{where}/s", keys[0], public, secret, timeout=5.0, retries=0)
    try:
        queued = 0
        while True:  # until the queue takes no more (its high-water mark)
            try:
                conn.sock.send(wire.request(conn.new_id(), "ping"), zmq.NOBLOCK)
                queued += 1
            except zmq.Again:
                break
        threading.Timer(0.3, lambda: scripted(lambda n, rid: 0.0, where, keys)).start()
        assert conn.call("ping") == {"n": queued}
    finally:
        conn.close()
    assert conn.resends == 0 and queued >= 100


def test_no_reply_at_all_is_eio_after_every_attempt(scripted):
    s = scripted(lambda n, rid: None)
    with connect(s, timeout=0.1, retries=2) as conn:
        with pytest.raises(CallError) as err:
            conn.call("ping")
    assert err.value.code == Errno.EIO and "3 attempt(s)" in str(err.value)
    assert len(s.peers) == 3 and len({*s.peers}) == 2


def test_a_refused_handshake_does_not_block_a_resend():
    """A server whose ZAP handler refuses the key: the socket is left with no way out (a send would block
    for ever); the resend opens a new socket instead, and the call ends with EIO in its time."""
    from zmq.auth.thread import ThreadAuthenticator

    d = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")
    ctx = zmq.Context()
    ctx.linger = 0
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=type("No", (), {"callback": lambda *_: False})())
    server_public, server_secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_secretkey = server_secret
    sock.bind(f"ipc://{d}/s")
    try:
        public, secret = zmq.curve_keypair()
        with Connection(f"ipc://{d}/s", server_public, public, secret, timeout=0.4, retries=2) as conn:
            t0 = time.monotonic()
            with pytest.raises(CallError) as err:
                conn.call("ping")
            assert err.value.code == Errno.EIO and time.monotonic() - t0 < 5.0
    finally:
        sock.close(0)
        auth.stop()
        ctx.term()
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
