"""The kernel process: a thin ZeroMQ shell around ``KernelService``.

One CURVE ROUTER socket. The ZAP handler (pyzmq's ``ThreadAuthenticator``)
admits the mm, the operator and the admitted client keys (``rundir.Admission``,
re-read while running) and reports the key as the ``User-Id`` of every frame:
that key, never the routing id, is the caller; every other key is refused at
the handshake. The socket loop is the servers' shared ``serving.Loop``: each
request is answered with exactly one reply, sent without blocking (a peer
that leaves its replies unread loses them, counted as ``replies_dropped``).
The clock (``time.monotonic``) lives here, not in the core.

Leases measure the client, not the kernel. Each turn of the loop should take
at most its receive timeout plus a little; whatever it took beyond that plus
``STALL_SLACK`` (a long request, a late return from the blocking receive, the
process stopped by SIGSTOP) is time the kernel did not read requests, and is
credited to every lease (``KernelService.credit_stall``). Leases are expired
when the earliest deadline passes, and only right after the requests already
queued have been handled (at most ``DRAIN_MAX`` of them), so pings that waited
in the queue while the kernel was stopped renew their leases first.

The kernel can also be deaf while its loop runs: ZeroMQ's I/O thread, which
every request passes through, may be busy elsewhere (thousands of strangers'
CURVE handshakes at once cost it seconds). So the kernel hears itself: each
check it sends a heartbeat (a ping with its own key, stamped with the time)
through its own endpoint. The lease clock advances only as far as the last
heartbeat heard (``heard``): no lease runs out while the kernel hears nobody;
and a heartbeat that arrives late has its lateness (beyond ``STALL_SLACK``)
credited to every lease, since nobody's requests came through meanwhile.
Periods already credited are not credited twice (``credited``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from kernel_server.service import KernelService
from protocol import rundir, serving, wire
from protocol.errors import Error

log = logging.getLogger("mmsim.kernel")
STOP_CHECK_MS = 100.0  # the longest the loop sleeps: a signal's flag is seen within this
STALL_SLACK = 0.05  # seconds a turn of the loop may run over its receive timeout before it counts as a stall
DRAIN_MAX = 4096  # requests handled, at most, before leases are looked at
HEARD_SLACK = 2 * STOP_CHECK_MS / 1000  # the lease clock may run this far past the last heartbeat heard


@dataclass
class KernelOptions:
    run_dir: str
    bind: str
    arch: str = "i686"
    memory: int = 256 << 20
    lease_seconds: float = 5.0
    kernel_pool_frames: int | None = None
    mm_key: str | None = None  # default: RUN/keys/mm.key
    bootmap: Any = None  # a bootmap.BootMap to boot from instead of the PC-like map of ``memory``


class KernelServer:
    def __init__(self, opts: KernelOptions) -> None:
        self.opts = opts
        mm_key = opts.mm_key or rundir.public_key(opts.run_dir, "mm").decode()
        self.pub, self.sec = rundir.load_keypair(opts.run_dir, "kernel")
        self.service = KernelService.boot(
            arch=opts.arch,
            memory=opts.memory,
            mm_key=mm_key,
            lease_seconds=opts.lease_seconds,
            kernel_pool_frames=opts.kernel_pool_frames,
            bootmap=opts.bootmap,
            on_refused=self._log_refused,
            boot_id=uuid.uuid4().hex,
            operator_key=rundir.operator_key(opts.run_dir),
        )
        self.admission = rundir.Admission(opts.run_dir, always=tuple(k for k in (mm_key, rundir.operator_key(
            opts.run_dir), self.pub.decode()) if k))  # (its own key: the heartbeat)
        self.running = True
        self.endpoint = ""
        self.own_key = self.pub.decode()
        self.heard = 0.0  # when the last heartbeat heard was sent (time.monotonic)
        self.credited = 0.0  # stalls are credited up to this time

    @staticmethod
    def _log_refused(identity: str | None, call: str, err: Error) -> None:
        if log.isEnabledFor(logging.DEBUG):
            who = identity[:8] if identity else "anonymous"
            log.debug("refused %s from %s: %s (%d) %s", call, who, err.code.name, int(err.code), err.message)

    def _stop(self, *_: Any) -> None:
        self.running = False

    def serve(self) -> None:
        ctx = zmq.Context()
        ctx.linger = 0
        try:
            sock, auth, self.endpoint = serving.bind_router(ctx, self.opts.bind, self.pub, self.sec, "kernel",
                                                            self.admission)
        except SystemExit:
            ctx.term()
            raise
        beat = ctx.socket(zmq.DEALER)  # the kernel hears itself through its own endpoint
        beat.linger = 0
        beat.sndhwm = 16
        beat.curve_serverkey, beat.curve_publickey, beat.curve_secretkey = self.pub, self.pub, self.sec
        beat.connect(self.endpoint)
        self.heard = time.monotonic()
        rundir.write_endpoint(self.opts.run_dir, "kernel", self.endpoint)
        print(f"kernel listening on {self.endpoint}", flush=True)
        print(f"kernel {self.service.summary()}", flush=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._stop)
        svc = self.service
        clock = time.monotonic
        handle = svc.handle

        own, heard = self.own_key, self._heard

        def answer(identity: str | None, data: bytes) -> bytes | None:
            if identity == own:  # its own heartbeat: no request, no reply
                heard(data)
                return None
            return handle(identity, data, clock())

        # The servers' shared socket loop (the benchmarks' floor serves with the very same one).
        loop = serving.Loop(sock, answer, on_refused=self._refused_by_loop, on_dropped=self._dropped)
        next_check = 0.0  # when leases are looked at next: the earliest deadline, or STOP_CHECK_MS from now
        turn = clock()  # when the last turn of the loop ended
        try:
            while self.running:
                # A blocking receive that returns by the next lease check: one wake-up per request, and a
                # signal's flag is seen within STOP_CHECK_MS.
                loop.turn(next_check)
                now = clock()
                self._credit(turn + loop.timeout_ms / 1000, now)  # (a turn that ran over its receive timeout)
                if now >= next_check:  # leases are checked on time even under a flood of requests
                    self._drain(loop)
                    now = clock()
                    self.admission.refresh()
                    try:
                        beat.send(wire.request(int(now * 1e6), "ping"), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # (sixteen unheard already: the next check sends again)
                    for ev in svc.expire(min(now, self.heard + HEARD_SLACK)):
                        log.info("lease of pid %d expired: destroyed, %d pages unmapped", ev["pid"],
                                 sum(c for _, c in ev["frames"]))
                    deadline = svc.next_deadline()
                    next_check = now + STOP_CHECK_MS / 1000
                    if deadline is not None:
                        next_check = min(next_check, deadline + 0.001)
                turn = clock()
        finally:
            rundir.withdraw(self.opts.run_dir, "kernel", self.endpoint)  # (the lock is still held)
            beat.close(0)
            sock.close(0)
            auth.stop()
            ctx.term()

    def _credit(self, start: float, end: float) -> None:
        """Credit to every lease the time from ``start`` to ``end`` (time.monotonic) the kernel did not hear
        requests, if beyond the slack, less what was credited already."""
        if end - start <= STALL_SLACK:
            return
        start = max(start, self.credited)
        if end > start:
            self.credited = end
            self.service.credit_stall(end - start)
            log.log(logging.INFO if end - start > 1.0 else logging.DEBUG, "the kernel did not hear requests for "
                    "%.2fs (stopped, busy or deaf): credited to every lease", end - start)

    def _drain(self, loop: serving.Loop) -> None:
        """Handle what is already queued (at most DRAIN_MAX requests), without waiting; a request that took
        long is credited to the leases."""
        last = time.monotonic()

        def each() -> None:
            nonlocal last
            now = time.monotonic()
            self._credit(last, now)
            last = now

        loop.drain_queued(DRAIN_MAX, each)

    def _refused_by_loop(self, identity: str | None, err: Error) -> None:
        self.service._refused(identity, "?", err)

    def _dropped(self) -> None:
        self.service.replies_dropped += 1

    def _heard(self, data: bytes) -> None:
        """A heartbeat came through: the lease clock may run up to when it was sent; its lateness beyond the
        slack was time nobody was heard."""
        sent = (wire.decode(data).get("id") or 0) / 1e6
        now = time.monotonic()
        self.heard = max(self.heard, sent)
        self._credit(sent, now)


def run(opts: KernelOptions) -> None:
    lock = rundir.lock(opts.run_dir, "kernel")  # one kernel per run directory, whatever it binds
    try:
        KernelServer(opts).serve()
    finally:
        os.close(lock)
