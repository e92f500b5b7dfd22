"""The memory manager process: a thin ZeroMQ shell around the sans-I/O ``Driver``.

One CURVE ROUTER for clients (identity = the ZAP User-Id, never the routing
id), one CURVE DEALER to the kernel with many requests in flight, one SQLite
journal. All the logic (boot, recovery, requests, housekeeping, the kernel's
health) is in ``mm_service.driver``; this file only does the I/O, and does
it with as few calls per request as it can (what each costs:
docs/performance.md, "The memory manager"):

- each wake-up (one ``zmq_poll`` of both sockets, pyzmq's compiled
  function) it receives everything available on each socket that has
  input: kernel replies, then client requests (up to ``BATCH``), with the
  compiled socket methods and int flags (testing for more with ``EVENTS``
  after each message, or, after a wake-up that brought a burst, reading
  until a receive fails: whichever costs less), and feeds it all to the
  driver in one call, so the journal records of all those requests go in
  one transaction;
- it performs the driver's actions in order: journal batches written (then
  reported committed), kernel requests and replies sent without blocking,
  log lines printed. A reply is sent only once the batch recording its
  outcome is committed: the driver hands it out only then;
- kernel requests are timed in the order sent (one deadline queue; probes,
  which time out sooner, apart): one that is still unanswered at its
  deadline (``Driver.awaiting``) is sent again with the same bytes,
  ``retries`` times, then reported as a timeout (the kernel is lost); a
  reply is never decoded here, the driver matches it;
- every ``tick`` seconds, also under a flood of requests, it re-reads the
  admitted keys and tells the driver a tick is due;
- it reads the clock, draws the first kernel request id at random (a
  restarted mm never reuses an id the kernel's replay cache remembers), and
  sets the journal of an earlier kernel boot aside when the driver says the
  kernel restarted.

``kill -USR1`` counts the main thread's CPU by stage (``mm_service.stages``).
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.backend import Socket as _Socket  # the compiled socket pyzmq's zmq.Socket wraps
from zmq.backend import zmq_poll

from mm_service import driver as D
from mm_service import health
from mm_service.journal import Journal, JournalFormatError
from mm_service.policy import Config
from mm_service.stages import Stages
from protocol import rundir, serving, wire
from protocol.connection import Connection
from protocol.errors import CallError, Errno, Error

log = logging.getLogger("mmsim.mm")
BATCH = 32  # client requests taken in one wake-up at most (then the kernel's replies and the clock get a turn; a
# flood's refusals must not hold every other caller's next step behind hundreds of them)
SEND, SEND_MORE, RECV_NOW, USER_ID = serving.SEND, serving.SEND_MORE, serving.RECV_NOW, serving.USER_ID
POLLIN, EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)
BURST = 4  # messages a wake-up brings on one socket from which the next reads until a receive fails


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
        # kernel requests awaiting their reply, in the order of their deadlines: (deadline, kid, bytes, resends
        # left); all have the same timeout, so the order sent is the order of their deadlines
        self.timers: deque[tuple[float, int, bytes, int]] = deque()
        self.probes: dict[int, float] = {}  # probe kid -> deadline (probes time out sooner and are never resent)
        self.next_tick = time.monotonic() + opts.tick
        self.dropped = 0  # replies a client's full queue (or its absence) refused
        self.running = True
        self.stages: Stages | None = None  # CPU by stage, counted from the first SIGUSR1 (mm_service.stages)
        self.stages_written = 0
        self._poll: list[tuple[zmq.Socket, int]] = []  # the sockets a wake-up waits on
        # the compiled socket methods, bound to each socket (see serving.Loop: pyzmq's wrappers cost as much)
        self._drecv = self._dsend = self._dget = self._rrecv = self._rsend = self._rget = None  # type: Any
        self._kernel_burst = self._client_burst = False  # the last wake-up brought BURST messages or more

    # ---- the kernel socket ----------------------------------------------------------

    def _open_dealer(self) -> None:
        if self.dealer is not None:
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
        self._drecv = _Socket.recv.__get__(s)
        self._dget = _Socket.get.__get__(s)
        self._dsend = _Socket.send.__get__(s)
        self._poll = [(s, POLLIN)] + ([(self.router, POLLIN)] if self.router is not None else [])
        self.timers.clear()
        self.probes.clear()

    def _kernel_send(self, kid: int, data: bytes, probe: bool) -> None:
        try:
            self._dsend(data, SEND)
        except zmq.Again:
            pass  # the queue towards a dead kernel is full: the timeout reports it
        o = self.opts
        if probe:
            self.probes[kid] = time.monotonic() + o.probe_timeout
        else:
            self.timers.append((time.monotonic() + o.kernel_timeout, kid, data, o.retries))

    def _kernel_deadlines(self, now: float, events: list[Any]) -> None:
        """Requests still unanswered at their deadline: sent again (the same bytes: the kernel's replay cache
        makes it safe) or reported. Answered ones leave the queue from its head (replies come back about in
        the order sent, so the queue stays about as long as the requests in flight)."""
        timers, awaiting = self.timers, self.driver.awaiting
        while timers:
            deadline, kid, data, left = timers[0]
            if awaiting(kid):
                if deadline > now:
                    break
            else:  # answered
                timers.popleft()
                continue
            timers.popleft()
            if left > 0:
                try:
                    self._dsend(data, SEND)
                except zmq.Again:
                    pass
                timers.append((now + self.opts.kernel_timeout, kid, data, left - 1))
                events.append(D.KernelResent(kid))
            else:
                events.append(D.KernelTimeout(kid))
        if self.probes:
            for kid, deadline in list(self.probes.items()):
                if deadline <= now:
                    del self.probes[kid]
                    if awaiting(kid):
                        events.append(D.KernelTimeout(kid))

    # ---- actions ------------------------------------------------------------------------

    def perform(self, actions: list[Any]) -> None:
        st = self.stages
        for a in actions:
            kind = type(a)
            if kind is D.SendReply:
                send = self._rsend
                try:
                    send(a.peer, SEND_MORE)
                except zmq.ZMQError:  # EAGAIN (its queue is full: it does not read) or EHOSTUNREACH (gone)
                    self.dropped += 1
                else:
                    send(a.data, SEND)  # (the rest of a message whose first part was queued cannot fail)
                if st is not None:
                    st.mark("send")
                    st.counts["replies"] += 1
            elif kind is D.SendKernel:
                self._kernel_send(a.kid, a.data, a.probe)
                if st is not None:
                    st.mark("send")
                    st.counts["kernel_requests"] += 1
            elif kind is D.WriteJournal:
                assert self.journal is not None
                self.journal.append(a.records)
                if st is not None:
                    st.mark("journal")
                    st.counts["batches"] += 1
                acts = self.driver.handle(D.JournalCommitted(a.batch))
                if st is not None:
                    st.mark("driver")
                self.perform(acts)
            elif kind is D.ResetKernel:
                self._open_dealer()
            elif kind is D.Log:
                print(a.text, flush=True)  # (stdout is the mm's log)
            elif kind is D.NewBoot:
                self._open_boot(a.hello, a.address_map)
                gc.freeze()
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
        signal.signal(signal.SIGUSR1, self._stages_signal)  # (from the start: by default the signal would kill)
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
        self._rrecv = _Socket.recv.__get__(sock)
        self._rget = _Socket.get.__get__(sock)
        self._rsend = _Socket.send.__get__(sock)
        self._poll = [(self.dealer, POLLIN), (sock, POLLIN)]
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
        self.next_tick = time.monotonic() + self.opts.tick
        gc.freeze()  # what boot made lives on: the collector's full passes no longer walk it (they cost ~4 us/call)
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
        st = self.stages
        now = time.monotonic()
        deadline = self.next_tick if accept_clients else now + longest
        if self.timers and self.timers[0][0] < deadline:
            deadline = self.timers[0][0]
        if self.probes:
            deadline = min(deadline, *self.probes.values())
        if st is not None:
            st.mark("other")
        items = self._poll if accept_clients else self._poll[:1]  # (the dealer first)
        ready = zmq_poll(items, max(0, int((deadline - now) * 1000) + 1))
        if st is not None:
            st.mark("wait")
            st.counts["wakeups"] += 1
        events: list[Any] = []
        for sock, _ in ready:  # only the sockets with input, in the order given: the kernel's replies first
            if sock is self.dealer:
                self._kernel_replies(events)
            else:
                self._client_requests(events)
        if st is not None:
            st.mark("receive")
            st.counts["kernel_replies"] += sum(type(e) is D.KernelReply for e in events)
            st.counts["requests"] += sum(type(e) is D.ClientRequest for e in events)
        now = time.monotonic()
        if self.timers or self.probes:
            self._kernel_deadlines(now, events)
        if accept_clients and now >= self.next_tick:
            self.admission.refresh()
            events.append(D.TickDue())
            self.next_tick = now + self.opts.tick
        if st is not None:
            st.mark("other")
        if events:
            acts = self.driver.handle(*events)
            if st is not None:
                st.mark("driver")
            self.perform(acts)

    # Taking what a socket holds. ``zmq_poll`` said it holds something, so the first receive succeeds; whether
    # more is there costs a test: an EVENTS query (3-7 us in the server) or a receive that fails (10-14 us:
    # pyzmq raises zmq.Again). After a wake-up that brought a burst (BURST messages or more) the next
    # reads until a receive fails; otherwise it asks EVENTS after each message. (One at a time this about
    # halves what the tests cost; with many clients in flight the bursts are read as before.)

    def _kernel_replies(self, events: list[Any]) -> None:
        """Every reply the kernel socket holds (the driver matches them to its requests)."""
        recv, reply, more = self._drecv, D.KernelReply, self._dget
        n = len(events)
        try:
            if self._kernel_burst:
                while True:
                    events.append(reply(recv(RECV_NOW, True)))
            else:
                events.append(reply(recv(RECV_NOW, True)))
                while more(EVENTS) & POLLIN:
                    events.append(reply(recv(RECV_NOW, True)))
        except zmq.Again:
            pass
        self._kernel_burst = len(events) - n >= BURST

    def _client_requests(self, events: list[Any]) -> None:
        """The client requests the router holds, ``BATCH`` at most (the next wake-up takes the rest at once)."""
        recv, request, more = self._rrecv, D.ClientRequest, self._rget
        test = not self._client_burst
        n = 0
        try:
            while n < BATCH:
                if n and test and not more(EVENTS) & POLLIN:
                    break
                rid = recv(RECV_NOW, True)
                frame = recv(RECV_NOW, False)  # (the rest of a message is there once its first part is)
                n += 1
                if frame.more:  # more parts than a request has: refuse it whole
                    self._refuse(rid, frame)
                    continue
                events.append(request(rid, frame.get(USER_ID), frame.bytes))
        except zmq.Again:
            pass
        self._client_burst = n >= BURST

    def _refuse(self, rid: bytes, frame: zmq.Frame) -> None:
        parts = 2
        while frame.more:
            frame = self._rrecv(RECV_NOW, False)
            parts += 1
        serving.send_reply(self.router, rid, wire.error_reply(None, Error(Errno.EPROTO, f"expected 1 frame, got "
                                                                                          f"{parts - 1}")))

    def _stop(self, *_: Any) -> None:
        self.running = False

    def _stages_signal(self, *_: Any) -> None:
        """SIGUSR1: write what was counted since the previous one (if any), count again from now."""
        if self.stages is not None:
            self.stages.stop()
            self.stages_written += 1
            self.stages.write(self.opts.run_dir, self.stages_written)
        self.stages = Stages()
        self.stages.watch_gc()


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
