"""The memory manager process: a thin ZeroMQ shell around the sans-I/O ``Driver``.

One CURVE ROUTER for clients (identity = the ZAP User-Id, never the routing
id), one CURVE DEALER to the kernel with many requests in flight, one SQLite
journal. All the logic (boot, recovery, requests, housekeeping, the kernel's
health) is in ``mm_service.driver``; this file only does the I/O:

- each wake-up it receives everything available on both sockets (client
  requests up to ``BATCH`` at a time, every kernel reply) and feeds it to the
  driver in one call, so the journal records of all those requests go in one
  transaction;
- it performs the driver's actions in order: kernel requests sent (and
  resent with the same bytes after ``kernel_timeout``, ``retries`` times,
  then reported as a timeout: the kernel is lost), journal batches written
  (then reported committed), replies sent, log lines printed;
- every ``tick`` seconds, also under a flood of requests, it re-reads the
  admitted keys and tells the driver a tick is due;
- it reads the clock, draws the first kernel request id at random (a
  restarted mm never reuses an id the kernel's replay cache remembers), and
  sets the journal of an earlier kernel boot aside when the driver says the
  kernel restarted.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any

import zmq

from mm_service import driver as D
from mm_service import health
from mm_service.journal import Journal, JournalFormatError
from mm_service.policy import Config
from protocol import rundir, serving, wire
from protocol.connection import Connection
from protocol.errors import CallError, Errno, Error

log = logging.getLogger("mmsim.mm")
BATCH = 32  # client requests taken in one wake-up at most (then the kernel's replies and the clock get a turn)


@dataclass
class MMOptions:
    run_dir: str
    kernel: str  # kernel endpoint
    bind: str
    config: Config
    tick: float = 0.2  # seconds between housekeeping ticks (events, watermarks, the kernel's health)
    kernel_timeout: float = 2.0  # seconds before a kernel request is sent again
    retries: int = 2  # resends before the kernel counts as lost
    connect_wait: float = 20.0  # how long to wait for the kernel at start
    probe_timeout: float = 0.5  # seconds a probe of a lost kernel waits for its answer (the mm never waits on it)
    fsync: bool = False


class MMServer:
    def __init__(self, opts: MMOptions) -> None:
        self.opts = opts
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self.mm_pub, self.mm_sec = rundir.load_keypair(opts.run_dir, "mm")
        self.kernel_pub = rundir.public_key(opts.run_dir, "kernel")
        self.operator = rundir.operator_key(opts.run_dir)
        self.admission = rundir.Admission(opts.run_dir, always=tuple(
            k for k in (self.mm_pub.decode(), self.operator) if k))
        self.driver = D.Driver(opts.config, self.mm_pub.decode(), self.operator, admission=self.admission.grant,
                               first_kid=secrets.randbits(62))
        self.journal: Journal | None = None
        self.dealer: zmq.Socket | None = None
        self.router: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.pending: dict[int, list[Any]] = {}  # kernel request id -> [bytes, deadline, resends left, probe]
        self.running = True

    # ---- the kernel socket ----------------------------------------------------------

    def _open_dealer(self) -> None:
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.dealer.close(0)
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.curve_serverkey = self.kernel_pub
        s.curve_publickey = self.mm_pub
        s.curve_secretkey = self.mm_sec
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_REPLY_BYTES)
        s.sndhwm = s.rcvhwm = wire.REPLY_QUEUE
        s.connect(self.opts.kernel)
        self.dealer = s
        self.poller.register(s, zmq.POLLIN)
        self.pending.clear()

    def _kernel_send(self, kid: int, data: bytes, probe: bool) -> None:
        assert self.dealer is not None
        o = self.opts
        timeout, resends = (o.probe_timeout, 0) if probe else (o.kernel_timeout, o.retries)
        try:
            self.dealer.send(data, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the queue towards a dead kernel is full: the timeout reports it
        self.pending[kid] = [data, time.monotonic() + timeout, resends, probe]

    def _kernel_deadlines(self, now: float) -> list[Any]:
        """Resend what timed out (the same bytes: the kernel's replay cache makes it safe), or report it."""
        events: list[Any] = []
        for kid, p in list(self.pending.items()):
            if p[1] > now:
                continue
            if p[2] > 0:
                p[2] -= 1
                p[1] = now + self.opts.kernel_timeout
                try:
                    self.dealer.send(p[0], zmq.NOBLOCK)  # type: ignore[union-attr]
                except zmq.Again:
                    pass
                events.append(D.KernelResent(kid))
            else:
                del self.pending[kid]
                events.append(D.KernelTimeout(kid))
        return events

    # ---- actions ------------------------------------------------------------------------

    def perform(self, actions: list[Any]) -> None:
        for a in actions:
            kind = type(a)
            if kind is D.SendKernel:
                self._kernel_send(a.kid, a.data, a.probe)
            elif kind is D.SendReply:
                serving.send_reply(self.router, a.peer, a.data)  # type: ignore[arg-type]
            elif kind is D.WriteJournal:
                assert self.journal is not None
                self.journal.append(a.records)
                self.perform(self.driver.handle(D.JournalCommitted(a.batch)))
            elif kind is D.ResetKernel:
                self._open_dealer()
            elif kind is D.Log:
                print(a.text, flush=True)  # (stdout is the mm's log)
            elif kind is D.NewBoot:
                self._open_boot(a.hello, a.address_map)
                c = self.driver.core.view.counts()  # type: ignore[union-attr]
                print(f"mm: serving the new boot: view free {c['free']}, used {c['used']}, kernel {c['kernel']} "
                      f"of {c['ram']} RAM frames", flush=True)
            elif kind is D.Fatal:
                raise SystemExit(a.text)

    # ---- start-up -------------------------------------------------------------------------

    def connect_kernel(self) -> tuple[dict, dict]:
        deadline = time.monotonic() + self.opts.connect_wait
        with Connection(self.opts.kernel, self.kernel_pub, self.mm_pub, self.mm_sec, ctx=self.ctx) as conn:
            while True:
                try:
                    hello = conn.call("hello", timeout=1.0, retries=0)
                    amap = conn.call("address_map")
                    return hello, amap
                except CallError as exc:
                    if exc.code != Errno.EIO:
                        raise SystemExit(f"mm: the kernel at {self.opts.kernel} refused {exc}") from None
                    if time.monotonic() > deadline:
                        raise SystemExit(f"mm: no kernel answered at {self.opts.kernel} within "
                                         f"{self.opts.connect_wait:g}s") from None
                    log.info("waiting for the kernel at %s", self.opts.kernel)

    def start(self) -> None:
        hello, amap = self.connect_kernel()
        if not hello.get("is_mm"):
            raise SystemExit("the kernel does not know this mm key as its memory manager (keys from another run?)")
        self._open_dealer()
        self._open_boot(hello, amap)
        # boot's recovery runs on the sockets: serve until it is done, then bind for clients
        while self.driver.house or self.driver.house_task is not None:
            self._wake(self.opts.kernel_timeout, accept_clients=False)

    def _open_boot(self, hello: dict, amap: dict) -> None:
        """(Re)build the view for the kernel boot ``hello`` describes: from the journal if it belongs to that
        boot, else from the address map (a journal of an earlier boot is set aside)."""
        path = os.path.join(self.opts.run_dir, "mm.db")
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        try:
            self.journal, moved = Journal.open_for_boot(path, health.boot_of(hello), self.opts.fsync)
        except JournalFormatError as exc:
            raise SystemExit(f"mm: {exc}") from None
        if moved:
            print(f"mm: the kernel restarted (new boot {health.boot_of(hello)[:12]}); the old journal was set aside "
                  f"as {moved}", flush=True)
        self.perform(self.driver.boot(hello, amap, self.journal.replay()))

    # ---- serving --------------------------------------------------------------------------------

    def serve(self) -> None:
        sock, auth, endpoint = serving.bind_router(self.ctx, self.opts.bind, self.mm_pub, self.mm_sec, "mm",
                                                   self.admission)
        self.router = sock
        self.poller.register(sock, zmq.POLLIN)
        rundir.write_endpoint(self.opts.run_dir, "mm", endpoint)
        core = self.driver.core
        assert core is not None
        c = core.view.counts()
        cfg = core.config
        print(f"mm listening on {endpoint}; kernel {self.opts.kernel}; view: free {c['free']}, used {c['used']}, "
              f"kernel {c['kernel']} of {c['ram']} RAM frames; kernel pool {core.kernel_free} "
              f"({core.unreserved} unreserved; watermarks {cfg.low}/{cfg.target}/{cfg.high}); quotas per client "
              f"{core.quota} pages and {core.kernel_quota} kernel frames (budget {core.budget} frames)", flush=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._stop)
        try:
            while self.running:
                self._wake(self.opts.tick)
        finally:
            rundir.withdraw(self.opts.run_dir, "mm", endpoint)  # (the lock is still held)
            sock.close(0)
            auth.stop()
            if self.dealer is not None:
                self.dealer.close(0)
            if self.journal:
                self.journal.close()
            self.ctx.term()

    def _wake(self, longest: float, accept_clients: bool = True) -> None:
        """One wake-up: wait for input (or the next deadline), take everything available, feed the driver."""
        now = time.monotonic()
        if not hasattr(self, "next_tick"):
            self.next_tick = now + self.opts.tick
        deadline = min([self.next_tick if accept_clients else now + longest] + [p[1] for p in self.pending.values()])
        ready = dict(self.poller.poll(max(0, int((deadline - now) * 1000) + 1)))
        events: list[Any] = []
        if self.dealer is not None and ready.get(self.dealer):
            recv, more = self.dealer.recv, self.dealer.getsockopt
            while more(zmq.EVENTS) & zmq.POLLIN:  # (asking costs less than the zmq.Again that ends a loop)
                data = recv(zmq.NOBLOCK)
                try:
                    kid = wire.parse_reply(data).get("id")
                except ValueError:
                    continue
                if self.pending.pop(kid, None) is not None:
                    events.append(D.KernelReply(data))
        if accept_clients and self.router is not None and ready.get(self.router):
            events.extend(self._client_requests())
        now = time.monotonic()
        events.extend(self._kernel_deadlines(now))
        if accept_clients and now >= self.next_tick:
            self.admission.refresh()
            events.append(D.TickDue())
            self.next_tick = now + self.opts.tick
        if events:
            self.perform(self.driver.handle(*events))

    def _client_requests(self) -> list[Any]:
        sock = self.router
        assert sock is not None
        out: list[Any] = []
        events = sock.getsockopt
        for _ in range(BATCH):
            if not events(zmq.EVENTS) & zmq.POLLIN:
                break
            rid = sock.recv(zmq.NOBLOCK)
            frame = sock.recv(copy=False)  # (the rest of a message is there once its first part is)
            if frame.more:  # more parts than a request has: refuse it whole
                parts = 2
                while frame.more:
                    frame = sock.recv(copy=False)
                    parts += 1
                serving.send_reply(sock, rid, wire.error_reply(None, Error(Errno.EPROTO, f"expected 1 frame, got "
                                                                                           f"{parts - 1}")))
                continue
            out.append(D.ClientRequest(rid, frame.get("User-Id"), frame.bytes))
        return out

    def _stop(self, *_: Any) -> None:
        self.running = False


def run(opts: MMOptions) -> None:
    lock = rundir.lock(opts.run_dir, "mm")
    try:
        if rundir.ipc_in_use(opts.bind):
            raise SystemExit(f"mm: cannot bind {opts.bind}: another process listens there")
        server = MMServer(opts)
        server.start()
        server.serve()
    finally:
        os.close(lock)
