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

``Loop`` is the socket loop itself, parameterised by a handler (``identity,
request bytes -> reply bytes``): the kernel serves with it, and so does the
benchmarks' floor echo, so the floor pays exactly the servers' socket costs
(same calls, flags, draining and batching) and a ratio against it measures
the server's own work. See ``Loop`` for what one turn does and why.
"""

from __future__ import annotations

import time

import zmq
import zmq.auth
from zmq.backend import Socket as _Socket  # the compiled socket pyzmq's zmq.Socket wraps
from zmq.auth.thread import ThreadAuthenticator

from typing import Callable

from protocol import rundir, wire
from protocol.errors import Errno, Error

SEND = int(zmq.NOBLOCK)
SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
RECV_WAIT = 0  # a blocking receive (bounded by the socket's receive timeout)
RECV_NOW = int(zmq.NOBLOCK)  # a receive that raises zmq.Again at once when nothing has arrived
USER_ID = b"User-Id"  # the frame property the ZAP handler sets to the caller's CURVE key (Z85)

Handler = Callable[[str | None, bytes], "bytes | None"]  # (caller identity or None, request bytes) -> reply bytes (None: none)


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


class Loop:
    """One server socket's loop: receive a request, hand it to ``handle(identity, data)``, send its
    reply; never blocks on a send (a reply a peer leaves unread is dropped and counted, as
    ``send_reply``). ``turn(deadline)`` waits for a request until ``deadline`` (time.monotonic) at the
    latest and answers it (and, with ``drain``, whatever else has already arrived, replies sent together);
    it returns how many requests it answered (0: the wait timed out). The caller does its housekeeping
    between turns.

    Costs (pyzmq 27, per request; see docs/performance.md): the socket's own methods are called on the
    compiled base class with int flags, not through pyzmq's Python-level wrappers
    (``recv_multipart``/``send_multipart`` cost about twice as much); the routing id is received as bytes
    and only the message part as a ``Frame`` (its ``User-Id`` property is the caller). Draining tests for
    more input with the socket's ``EVENTS`` (a failing non-blocking receive raises and costs more); each
    test costs about 1.4 us, so ``drain`` is off by default: with one request arriving at a time it finds
    nothing and the blocking receive is as cheap (measured, docs/performance.md).

    ``handle`` may return None: nothing is sent back (the kernel's own heartbeat through its endpoint).
    ``on_refused(identity, error)`` hears of requests the loop refuses itself (a message of more than one
    part: EPROTO); ``on_dropped()`` of replies it dropped.
    """

    def __init__(self, sock: zmq.Socket, handle: Handler, drain: int = 0,
                 on_refused: Callable[[str | None, Error], None] | None = None,
                 on_dropped: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.handle = handle
        self.drain = drain  # requests answered per turn beyond the first, at most, if already queued
        self.on_refused = on_refused
        self.on_dropped = on_dropped
        self.timeout_ms = -1  # the socket's receive timeout as last set
        self.handled = 0
        self.dropped = 0
        # the compiled socket methods (pyzmq's zmq.backend Socket), bound to this socket
        self._recv = _Socket.recv.__get__(sock)
        self._send = _Socket.send.__get__(sock)
        self._get = _Socket.get.__get__(sock)

    def wait_until(self, deadline: float) -> None:
        """The next blocking receive returns by ``deadline`` (time.monotonic) at the latest (the timeout is
        set only when it changes: setsockopt costs a couple of microseconds)."""
        left = max(1, int((deadline - time.monotonic()) * 1000) + 1)
        if left != self.timeout_ms:
            self.sock.setsockopt(zmq.RCVTIMEO, left)
            self.timeout_ms = left

    def turn(self, deadline: float) -> int:
        """Wait for a request until ``deadline`` at the latest; answer it (and what else is queued, up to
        ``drain`` more). How many were answered."""
        self.wait_until(deadline)
        recv = self._recv
        try:
            rid = recv(RECV_WAIT, True)
        except zmq.Again:
            return 0
        frame = recv(RECV_WAIT, False)  # (the rest of a message arrives with its first part)
        if not self.drain:
            self._reply(rid, self._answer(frame))
            self.handled += 1
            return 1
        out = [(rid, self._answer(frame))]
        get, events, pollin = self._get, zmq.EVENTS, zmq.POLLIN
        while len(out) <= self.drain and get(events) & pollin:
            rid = recv(RECV_NOW, True)
            out.append((rid, self._answer(recv(RECV_NOW, False))))
        for rid, reply in out:
            self._reply(rid, reply)
        self.handled += len(out)
        return len(out)

    def drain_queued(self, limit: int, each: Callable[[], None] | None = None) -> int:
        """Answer what is already queued (at most ``limit`` requests) without waiting; ``each()`` after
        every one. How many were answered."""
        recv = self._recv
        n = 0
        while n < limit:
            try:
                rid = recv(RECV_NOW, True)
            except zmq.Again:
                break
            self._reply(rid, self._answer(recv(RECV_NOW, False)))
            n += 1
            if each is not None:
                each()
        self.handled += n
        return n

    def _answer(self, frame: zmq.Frame) -> bytes:
        identity = frame.get(USER_ID)
        if not frame.more:
            return self.handle(identity, frame.bytes)
        parts = 1
        while frame.more:  # read the whole message, then refuse it
            frame = self._recv(RECV_WAIT, False)
            parts += 1
        err = Error(Errno.EPROTO, f"expected one message frame, got {parts}")
        if self.on_refused is not None:
            self.on_refused(identity, err)
        return wire.error_reply(None, err)

    def _reply(self, rid: bytes, reply: bytes | None) -> None:
        if reply is None:  # the handler answers nothing (the kernel's own heartbeat)
            return
        send = self._send
        try:
            send(rid, SEND_MORE)
        except zmq.ZMQError:  # EAGAIN (queue full) or EHOSTUNREACH (gone): nothing was queued
            self.dropped += 1
            if self.on_dropped is not None:
                self.on_dropped()
            return
        send(reply, SEND)
