"""The server side of a socket, shared by the kernel, the mm and the benchmark floor.

``bind_router`` opens the CURVE ROUTER every server uses: pyzmq's
``ThreadAuthenticator`` as the ZAP handler, reporting the client's CURVE key
as the ``User-Id`` of every frame (the caller's identity) and admitting only
the keys ``admission`` allows (``rundir.Admission``: the mm, the operator and
the admitted clients; every other key is refused at the handshake, before it
costs the server anything); the transport size limit; a bounded reply queue
per peer; and a bind that refuses an ipc path another process listens on.

``send_reply`` never blocks and never buffers without bound: a peer that
leaves ``wire.REPLY_QUEUE`` replies unread (or has gone) loses the reply,
which is counted; it gets it again by resending its request (the replay
cache answers). ``Deadline`` sets a socket's receive timeout so that a
blocking receive returns in time for the server's next housekeeping.
"""

from __future__ import annotations

import time

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol import rundir, wire

SEND = int(zmq.NOBLOCK)
SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def bind_router(ctx: zmq.Context, bind: str, public: bytes, secret: bytes, who: str,
                admission: rundir.Admission | None = None) -> tuple[zmq.Socket, ThreadAuthenticator, str]:
    """(socket, authenticator, connectable endpoint); SystemExit naming ``who`` if the bind fails.
    ``admission`` None admits any CURVE key (the benchmark floor only)."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    if admission is None:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    else:
        auth.configure_curve_callback(domain="*", credentials_provider=admission)
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_TRANSPORT_BYTES)
    # A reply that cannot be routed (the peer's queue is full, or the peer is gone) raises instead of
    # vanishing silently, so ``send_reply`` can count it.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.sndhwm = wire.REPLY_QUEUE
    sock.rcvhwm = wire.REPLY_QUEUE
    try:
        if rundir.ipc_in_use(bind):  # ZeroMQ's ipc bind would silently take the path over
            raise zmq.ZMQError(zmq.EADDRINUSE, "Address already in use (another process listens there)")
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(0)
        auth.stop()
        raise SystemExit(f"{who}: cannot bind {bind}: {exc}") from None
    return sock, auth, rundir.connectable(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def send_reply(sock: zmq.Socket, rid: bytes, reply: bytes) -> bool:
    """Send one reply to the peer ``rid`` without blocking; False if it was dropped (the peer's reply
    queue is full: it does not read; or the peer is gone)."""
    try:
        sock.send(rid, SEND_MORE)
    except zmq.ZMQError:  # EAGAIN (queue full) or EHOSTUNREACH (gone): nothing was queued
        return False
    sock.send(reply, SEND)  # (the rest of a message whose first part was queued cannot fail)
    return True


class Deadline:
    """A socket's receive timeout, kept at the time left until a deadline (set only when it changes:
    setsockopt costs a couple of microseconds per request)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.timeout_ms = -1

    def until(self, deadline: float) -> None:
        """The next blocking receive returns (``zmq.Again``) by ``deadline`` (time.monotonic) at the latest."""
        left = max(1, int((deadline - time.monotonic()) * 1000) + 1)
        if left != self.timeout_ms:
            self.sock.setsockopt(zmq.RCVTIMEO, left)
            self.timeout_ms = left
