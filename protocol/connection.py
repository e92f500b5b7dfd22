"""The small synchronous CURVE client every other part uses (Lazy Pirate retries).

``Connection(endpoint, server_key, public, secret)`` opens a DEALER socket with
CURVE. ``call(name, args)`` sends one request and waits for its reply; when
none comes within ``timeout`` seconds it sends the *same bytes with the same
request id* again, ``retries`` times (the ZeroMQ guide's Lazy Pirate). The
server's replay cache (I12) makes the retry safe: a request that already ran
is answered from the cache, not run again. Resends go out on the same socket
(ZeroMQ reconnects it by itself, and a reply to the first attempt that comes
late is still taken); only the last attempt, or a resend that finds no way
out (a refused handshake leaves the socket none), opens a new socket: a new
socket needs a new CURVE handshake, which under a flood of handshakes waits
behind all of them. A refused call raises ``CallError`` carrying the error's
name, number and details; no reply at all raises ``CallError`` with EIO.

Request ids start at a random point of a 63-bit space (fresh for every
connection), so neither a client restarted with the same key nor two
connections sharing a key (a keepalive thread, an operator tool using the
mm's key) reuse an id the server's replay cache still remembers for that key.
``submit``/``collect`` keep several requests in flight (benchmarks, floods).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import zmq

from protocol import wire
from protocol.errors import CallError, Errno, Error


class Connection:
    def __init__(
        self,
        endpoint: str,
        server_key: bytes | str,
        public: bytes | str,
        secret: bytes | str,
        timeout: float = 2.0,
        retries: int = 2,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.server_key = server_key.encode() if isinstance(server_key, str) else server_key
        self.public = public.encode() if isinstance(public, str) else public
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.timeout = timeout
        self.retries = retries
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        if self._own_ctx:
            self.ctx.linger = 0
        self.next_id = secrets.randbits(63)  # distinct per connection (see the module docstring)
        self.sock: zmq.Socket | None = None
        self.resends = 0  # requests sent again after a timeout (Lazy Pirate)
        self._open()

    @property
    def identity(self) -> str:
        """This connection's identity as servers see it (the Z85 public key)."""
        return self.public.decode()

    # ---- socket lifecycle ----------------------------------------------------

    def _open(self) -> None:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.curve_serverkey = self.server_key
        s.curve_publickey = self.public
        s.curve_secretkey = self.secret
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_REPLY_BYTES)
        s.connect(self.endpoint)
        self.sock = s
        self._rcvtimeo = -1  # the receive timeout set on the socket (ms), -1: ZeroMQ's default (none)

    def reset(self) -> None:
        """Drop the socket (and any late replies on it) and open a fresh one."""
        if self.sock is not None:
            self.sock.close(0)
        self._open()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- calls ------------------------------------------------------------------

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def call(self, call: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
             retries: int | None = None, req_id: int | None = None) -> dict[str, Any]:
        """One call; its result dict, or ``CallError`` (refused, or EIO when nothing answered)."""
        rid = self.new_id() if req_id is None else req_id
        reply = self.exchange(wire.request(rid, call, args), rid, timeout=timeout, retries=retries, call=call)
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {"value": result}
        raise CallError(Error.from_wire(reply.get("error")), call)

    def exchange(self, data: bytes, rid: int | None, *, timeout: float | None = None, retries: int | None = None,
                 call: str = "") -> dict[str, Any]:
        """Send raw request bytes and wait for the reply whose id is ``rid`` (any id if None)."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        clock = time.monotonic
        for attempt in range(retries + 1):
            if attempt:
                self.resends += 1
                if attempt == retries:  # the last one on a new socket (a connection that died unseen)
                    self.reset()
            self._send(data, timeout)
            sock = self.sock
            assert sock is not None
            deadline = clock() + timeout
            ms = max(1, int(timeout * 1000))
            while True:
                # a blocking receive with a timeout: one wake-up per reply (a poll before the receive
                # costs a second pass through ZeroMQ's command processing, every call)
                if ms != self._rcvtimeo:
                    sock.setsockopt(zmq.RCVTIMEO, ms)
                    self._rcvtimeo = ms
                try:
                    raw = sock.recv()
                except zmq.Again:
                    break
                try:
                    reply = wire.parse_reply(raw)
                except ValueError:
                    reply = None  # not a reply: ignore it
                if reply is not None and (rid is None or reply.get("id") == rid or reply.get("id") is None):
                    return reply
                # a late reply to an earlier request (or garbage): not ours, wait for the rest of the time
                left = deadline - clock()
                if left <= 0:
                    break
                ms = max(1, int(left * 1000))
        self.reset()
        raise CallError(Error(Errno.EIO, f"no reply from {self.endpoint} after {retries + 1} attempt(s) "
                                         f"of {timeout:g}s", {"endpoint": self.endpoint}), call)

    def _send(self, data: bytes, timeout: float) -> None:
        """Send on the socket as it is; if it takes nothing, wait up to ``timeout`` for room (a full queue
        drains), and if none comes it has no way out (its handshake was refused: a socket with no peer
        never has room): send on a new socket, which has one."""
        sock = self.sock
        assert sock is not None
        try:
            sock.send(data, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        if sock.poll(max(1, int(timeout * 1000)), zmq.POLLOUT):
            try:
                sock.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        self.reset()
        self.sock.send(data, zmq.NOBLOCK)  # type: ignore[union-attr]

    # ---- several in flight --------------------------------------------------------

    def submit(self, call: str, args: dict[str, Any] | None = None) -> int:
        """Send a request without waiting; returns its id (collect the reply with ``collect``)."""
        rid = self.new_id()
        assert self.sock is not None
        self.sock.send(wire.request(rid, call, args))
        return rid

    def collect(self, timeout: float | None = None) -> tuple[int | None, dict[str, Any] | Error]:
        """The next reply to arrive: (id, result dict or Error). EIO if none within ``timeout``."""
        timeout = self.timeout if timeout is None else timeout
        assert self.sock is not None
        if not self.sock.poll(timeout * 1000, zmq.POLLIN):
            return None, Error(Errno.EIO, f"no reply from {self.endpoint} within {timeout:g}s")
        try:
            reply = wire.parse_reply(self.sock.recv())
        except ValueError:
            return None, Error(Errno.EPROTO, "malformed reply")
        if reply.get("ok") is True:
            return reply.get("id"), reply.get("result")
        return reply.get("id"), Error.from_wire(reply.get("error"))
