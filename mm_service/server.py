"""The memory manager process: a thin ZeroMQ shell around ``MMCore``.

One CURVE ROUTER for clients (identity = the ZAP User-Id, never the routing
id), one ``Connection`` (DEALER) to the kernel, one SQLite journal. Requests
are served one at a time, each woken for by a blocking receive (no poll
first). After a reply the mm brings the kernel pool back between its
watermarks if it left them (or writes a snapshot when one is due), and every
``tick`` seconds, also under a flood of requests, it reads the kernel's
events (client deaths) and checks the watermarks.

The kernel going away is part of the model (DESIGN section 7). Each tick the
mm runs ``health.check`` (the decision logic, shared with the simulator):

- no reply (a kernel call or the hello got EIO after its retries): the mm
  logs "kernel unreachable" once and answers every request that needs the
  kernel at once with EIO (no waiting on a dead peer); a non-blocking hello
  probes the kernel, its reply picked up on a later tick;
- the same boot id again (a pause, not a restart): it reconciles its view
  with the kernel's frame table (``recover``) and carries on;
- another boot id (the kernel restarted: all its processes and frames are
  gone): the journal of the old boot is set aside, the view is rebuilt from
  the new boot's address map and reconciled with its frame table (a call
  resent across the restart may have reached the new kernel), and service
  resumes. Clients' old allocations are gone with the old kernel; they see
  EIO while it is down and fresh state afterwards.

A kernel call that needed a resend makes the mm check the boot id at once
(``health.verify``), so it stops calling a restarted kernel with the old
boot's state.

Each tick also journals what the requests deferred (their outcomes ride with
the next write, see ``policy``), so an idle mm's journal is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import zmq

from mm_service import health
from mm_service.journal import Journal
from mm_service.policy import Config, MMCore, drive
from mm_service.service import MMService
from protocol import rundir, serving, wire
from protocol.connection import Connection
from protocol.errors import CallError, Errno, Error

log = logging.getLogger("mmsim.mm")


@dataclass
class MMOptions:
    run_dir: str
    kernel: str  # kernel endpoint
    bind: str
    config: Config
    tick: float = 0.2  # seconds between event polls / watermark checks
    kernel_timeout: float = 2.0
    connect_wait: float = 20.0  # how long to wait for the kernel at start
    probe_timeout: float = 0.5  # seconds before a probe of a lost kernel is sent again (the mm never waits on it)
    fsync: bool = False


class MMServer:
    def __init__(self, opts: MMOptions) -> None:
        self.opts = opts
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self.mm_pub, self.mm_sec = rundir.load_keypair(opts.run_dir, "mm")
        self.kernel_pub = rundir.public_key(opts.run_dir, "kernel")
        self.kernel = Connection(opts.kernel, self.kernel_pub, self.mm_pub, self.mm_sec,
                                 timeout=opts.kernel_timeout, retries=2, ctx=self.ctx)
        self.core: MMCore | None = None
        self.service: MMService | None = None
        self.journal: Journal | None = None
        self.watch = health.KernelWatch()  # the kernel boot the view belongs to; whether the kernel is lost
        self.probe: tuple[int, float] | None = None  # (request id, sent at) of the hello probing a lost kernel
        self.in_kcall = False  # waiting on the kernel: a stop signal aborts the wait (as kill -9 would)
        self.running = True

    # ---- effects ------------------------------------------------------------

    def kcall(self, call: str, args: dict[str, Any]) -> Any:
        if self.watch.lost is not None:  # fail fast: do not wait on a kernel known to be away
            return Error(Errno.EIO, f"the kernel is unreachable ({self.watch.lost}); the mm retries every "
                         f"{self.opts.tick:g}s", {"endpoint": self.opts.kernel})
        resends = self.kernel.resends
        try:
            result: Any = self._kernel_call(call, args)
        except CallError as exc:
            if exc.code == Errno.EIO:
                self._kernel_lost(f"no reply to {call}")
                return exc.error
            result = exc.error
        if self.kernel.resends != resends:  # the resend may have reached a kernel that restarted meanwhile
            self._run_watch(health.verify(self.watch))
        return result

    def _hello(self) -> Any:
        """The hello of ``health.check``/``verify``: never resent; while the kernel is lost a probe
        that does not block (EIO until its answer arrives on a later tick)."""
        if self.watch.lost is not None:
            hello = self._probe()
            return hello if hello is not None else Error(Errno.EIO, "no answer to the probe yet")
        try:
            return self._kernel_call("hello", timeout=self.opts.kernel_timeout, retries=0)
        except CallError as exc:
            return exc.error

    def _run_watch(self, gen: Any) -> Any:
        """Drive a ``health`` generator; says so once when it finds the kernel lost."""
        was = self.watch.lost
        out = drive(gen, lambda call, args: self._hello() if call == "hello" else self.kcall(call, args),
                    self.persist)
        if was is None and self.watch.lost is not None:
            self._announce_lost()
        return out

    def _kernel_call(self, call: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """``Connection.call`` to the kernel, marked so a stop signal may abort the wait."""
        self.in_kcall = True
        try:
            return self.kernel.call(call, args, **kw)
        finally:
            self.in_kcall = False

    def _kernel_lost(self, why: str) -> None:
        if self.watch.lose(why):
            self._announce_lost()

    def _announce_lost(self) -> None:
        self.probe = None
        msg = (f"mm: kernel unreachable at {self.opts.kernel} ({self.watch.lost}): answering EIO to requests that "
               "need it and checking on it every tick")
        log.warning(msg)
        print(msg, flush=True)

    def persist(self, ops: list[dict[str, Any]]) -> None:
        assert self.journal is not None
        self.journal.append(ops)

    def run_op(self, gen: Any) -> Any:
        return drive(gen, self.kcall, self.persist)

    # ---- start-up -------------------------------------------------------------

    def connect_kernel(self) -> tuple[dict, dict]:
        deadline = time.monotonic() + self.opts.connect_wait
        while True:
            try:
                hello = self.kernel.call("hello", timeout=1.0, retries=0)
                amap = self.kernel.call("address_map")
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
        self._open_boot(hello, amap)

    def _open_boot(self, hello: dict, amap: dict) -> None:
        """(Re)build the view for the kernel boot ``hello`` describes: from the journal if it belongs to
        that boot, else from the address map (a journal of an earlier boot is set aside)."""
        path = os.path.join(self.opts.run_dir, "mm.db")
        self.watch.boot_id = health.boot_of(hello)
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.journal, moved = Journal.open_for_boot(path, self.watch.boot_id, self.opts.fsync)
        if moved:
            print(f"mm: the kernel restarted (new boot {self.watch.boot_id[:12]}); the old journal was set aside as "
                  f"{moved}", flush=True)
        self.core = MMCore(amap, hello, dataclasses.replace(self.opts.config))
        self.service = MMService(self.core, self.mm_pub.decode())
        t0 = time.monotonic()
        replayed = self.service.restore(self.journal.replay())
        # always settle with the kernel, even with an empty journal: a donation made before the first
        # journal write (donate ops ride with the next batch) is known to the kernel only
        rec = self.run_op(self.service.recover())
        if isinstance(rec, Error):
            if replayed:
                raise SystemExit(f"mm: recovery failed: {rec.message}")
            log.warning("mm: could not settle with the kernel yet: %s", rec.message)
        else:
            found = rec["found"]["divergences"]
            left = rec["remaining"]["divergences"]
            if replayed or found:
                print(f"mm: rebuilt the view from {replayed} journal ops in {time.monotonic() - t0:.3f}s; settled "
                      f"{rec['settled_intents']} pending intent(s); {found} divergent frame(s) found, {left} left "
                      "after repair", flush=True)
        self.run_op(self.service.maintain())

    # ---- the kernel's health ---------------------------------------------------

    def check_kernel(self) -> bool:
        """Once per tick: is the kernel there, and is it still the boot our view belongs to
        (``health.check``)? Returns True when the mm may go on with its housekeeping."""
        assert self.service is not None
        verdict = self._run_watch(health.check(self.watch, self.service))
        if verdict.state == "refused":
            log.error("%s", verdict.message)
        elif verdict.state == "foreign":
            raise SystemExit(f"mm: {verdict.message}")
        elif verdict.state == "new_boot":
            print(f"mm: the kernel restarted ({verdict.message}): its processes and frames are gone; rebuilding "
                  "the view from the new boot's address map", flush=True)
            self._open_boot(verdict.hello, verdict.amap)  # settles with the new kernel's frame table too
            assert self.core is not None  # (``recover``): a call resent across the restart may have reached it
            c = self.core.view.counts()
            print(f"mm: serving the new boot: view free {c['free']}, used {c['used']}, kernel {c['kernel']} "
                  f"of {c['ram']} RAM frames", flush=True)
            return True
        elif verdict.state == "back":
            rec = verdict.recovery or {}
            print(f"mm: {verdict.message}; reconciled: {rec['found']['divergences']} divergent frame(s) found, "
                  f"{rec['remaining']['divergences']} left", flush=True)
        return verdict.serving

    def _probe(self) -> dict | None:
        """While the kernel is lost: a ``hello`` that never blocks the mm (clients keep getting quick
        answers). Sends one, and on later ticks picks up its reply; resends after ``probe_timeout``.
        The kernel's hello result once it answers, else None."""
        now = time.monotonic()
        if self.probe is not None:
            rid, sent = self.probe
            while True:
                got, result = self.kernel.collect(timeout=0)
                if got is None and isinstance(result, Error) and result.code == Errno.EIO:
                    break  # nothing (more) has arrived
                if got == rid:
                    self.probe = None
                    return result if isinstance(result, dict) else None
            if now - sent < self.opts.probe_timeout:
                return None
            self.kernel.reset()  # drop the socket queued towards a dead peer
        self.probe = (self.kernel.submit("hello"), now)
        return None

    # ---- serving ---------------------------------------------------------------

    def serve(self) -> None:
        self.admission = rundir.Admission(self.opts.run_dir, always=tuple(
            k for k in (self.mm_pub.decode(), rundir.operator_key(self.opts.run_dir)) if k))
        sock, auth, endpoint = serving.bind_router(self.ctx, self.opts.bind, self.mm_pub, self.mm_sec, "mm",
                                                   self.admission)
        rundir.write_endpoint(self.opts.run_dir, "mm", endpoint)
        assert self.core is not None
        c = self.core.view.counts()
        print(f"mm listening on {endpoint}; kernel {self.opts.kernel}; view: free {c['free']}, used {c['used']}, "
              f"kernel {c['kernel']} of {c['ram']} RAM frames; kernel pool {self.core.kernel_free} "
              f"(watermarks {self.core.config.low}/{self.core.config.target}/{self.core.config.high}); "
              f"quota {self.core.config.quota} pages per client", flush=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._stop)
        recv, clock = sock.recv, time.monotonic
        next_tick = clock()
        wait = serving.Deadline(sock)
        try:
            while self.running:
                # A blocking receive with a timeout (as the kernel's loop): one wake-up per request. A poll,
                # then non-blocking receives ending in zmq.Again, cost more CPU per request sent one at a
                # time. The timeout is the time left until the next tick, so the tick's housekeeping
                # (events, watermarks) and a stop signal are seen on time even under a flood of requests:
                # the clock is read after every request.
                wait.until(next_tick)
                try:
                    rid = recv()  # the routing id (bytes); the rest of the message is there already
                except zmq.Again:
                    rid = None
                if rid is not None:
                    self._handle(sock, rid, recv(copy=False))
                    if self.service.maintain_due():  # after the reply is sent: watermarks, a snapshot
                        self.run_op(self.service.maintain())
                if clock() >= next_tick:
                    self.admission.refresh()
                    if self.check_kernel():
                        self.run_op(self.core.poll_events())
                        self.run_op(self.service.maintain())
                    self.run_op(self.core.flush())  # what the requests deferred: an idle mm's journal is complete
                    next_tick = clock() + self.opts.tick
        finally:
            sock.close(0)
            auth.stop()
            self.kernel.close()
            if self.journal:
                self.journal.close()
            self.ctx.term()

    def _stop(self, *_: Any) -> None:
        self.running = False
        if self.in_kcall:  # do not sit out a dead kernel's timeouts; the journal makes this safe
            raise SystemExit("mm: stopped by a signal while waiting on the kernel")

    def _handle(self, sock: zmq.Socket, rid: bytes, frame: zmq.Frame) -> None:
        """Answer one message: ``frame`` is its first part (a Frame, for the CURVE User-Id); a message of
        more parts is read whole and refused."""
        if frame.more:
            parts = 1
            more = True
            while more:
                more = sock.recv(copy=False).more
                parts += 1
            reply = wire.error_reply(None, Error(Errno.EPROTO, f"expected 1 frame, got {parts}"))
        else:
            reply = self.handle(frame.get("User-Id"), frame.bytes)
        serving.send_reply(sock, rid, reply)

    def handle(self, identity: str | None, data: bytes) -> bytes:
        assert self.service is not None
        return self.run_op(self.service.handle(identity, data))


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
