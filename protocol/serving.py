"""The server side of a socket, shared by the kernel, the mm and the benchmark floor.

``bind_router`` opens the CURVE ROUTER every server uses: pyzmq's
``ThreadAuthenticator`` as the ZAP handler, accepting any CURVE key and
reporting it as the ``User-Id`` of every frame (the caller's identity);
the transport size limit; a reply queue deep enough that no reply is dropped
for a client with many requests in flight (I10); and a bind that refuses an
ipc path another process listens on. ``Deadline`` sets a socket's receive
timeout so that a blocking receive returns in time for the server's next
housekeeping (one wake-up per request, unlike a poll followed by receives
that end in ``zmq.Again``).
"""

from __future__ import annotations

import time

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol import rundir, wire


def bind_router(ctx: zmq.Context, bind: str, public: bytes, secret: bytes,
                who: str) -> tuple[zmq.Socket, ThreadAuthenticator, str]:
    """(socket, authenticator, connectable endpoint); SystemExit naming ``who`` if the bind fails."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_TRANSPORT_BYTES)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    # Replies queued for one peer: ZeroMQ's default (1000) silently drops replies to a client with more
    # requests than that in flight. Only a peer that leaves REPLY_QUEUE replies unread loses replies,
    # and the server's memory stays bounded.
    sock.sndhwm = wire.REPLY_QUEUE
    try:
        if rundir.ipc_in_use(bind):  # ZeroMQ's ipc bind would silently take the path over
            raise zmq.ZMQError(zmq.EADDRINUSE, "Address already in use (another process listens there)")
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(0)
        auth.stop()
        raise SystemExit(f"{who}: cannot bind {bind}: {exc}") from None
    return sock, auth, rundir.connectable(sock.getsockopt_string(zmq.LAST_ENDPOINT))


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
