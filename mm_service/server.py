"""The memory manager process: a thin ZeroMQ shell around ``MMCore``.

One CURVE ROUTER for clients (identity = the ZAP User-Id, never the routing
id), one ``Connection`` (DEALER) to the kernel, one SQLite journal. Requests
are served one at a time; after each reply and every ``tick`` seconds the mm
reads the kernel's events (client deaths) and keeps the kernel pool between
its watermarks.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mm_service.journal import Journal
from mm_service.policy import Config, MMCore, drive
from mm_service.service import MMService
from protocol import keys, wire
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
    fsync: bool = False


class MMServer:
    def __init__(self, opts: MMOptions) -> None:
        self.opts = opts
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self.mm_pub, self.mm_sec = keys.load_keypair(opts.run_dir, "mm")
        self.kernel_pub = keys.public_key(opts.run_dir, "kernel")
        self.kernel = Connection(opts.kernel, self.kernel_pub, self.mm_pub, self.mm_sec,
                                 timeout=opts.kernel_timeout, retries=2, ctx=self.ctx)
        self.core: MMCore | None = None
        self.service: MMService | None = None
        self.journal: Journal | None = None
        self.running = True

    # ---- effects ------------------------------------------------------------

    def kcall(self, call: str, args: dict[str, Any]) -> Any:
        try:
            return self.kernel.call(call, args)
        except CallError as exc:
            return exc.error

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
                if exc.code != Errno.EIO or time.monotonic() > deadline:
                    raise
                log.info("waiting for the kernel at %s", self.opts.kernel)

    def start(self) -> None:
        hello, amap = self.connect_kernel()
        if not hello.get("is_mm"):
            raise SystemExit("the kernel does not know this mm key as its memory manager (keys from another run?)")
        path = os.path.join(self.opts.run_dir, "mm.db")
        self.journal, moved = Journal.open_for_boot(path, str(hello.get("boot_id", "0")), self.opts.fsync)
        if moved:
            print(f"mm: the kernel restarted (new boot); the old journal was set aside as {moved}", flush=True)
        self.core = MMCore(amap, hello, self.opts.config)
        self.service = MMService(self.core, self.mm_pub.decode())
        replayed = 0
        for op in self.journal.replay():
            self.core.view.apply(op)
            replayed += 1
        self.core.intent_no = max([0] + list(self.core.view.pending))
        if replayed:
            self.service.recovery = self.run_op(self.core.recover())
            rec = self.service.recovery
            if isinstance(rec, Error):
                raise SystemExit(f"mm: recovery failed: {rec.message}")
            found = rec["found"]["divergences"]
            left = rec["remaining"]["divergences"]
            print(f"mm: rebuilt the view from {replayed} journal ops; settled {rec['settled_intents']} "
                  f"pending intent(s); {found} divergent frame(s) found, {left} left after repair", flush=True)
        else:
            self.run_op(self.core.refresh())
        self.run_op(self.core.maintain())

    # ---- serving ---------------------------------------------------------------

    def serve(self) -> None:
        auth = ThreadAuthenticator(self.ctx)
        auth.start()
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.curve_server = True
        sock.curve_publickey = self.mm_pub
        sock.curve_secretkey = self.mm_sec
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_TRANSPORT_BYTES)
        try:
            sock.bind(self.opts.bind)
        except zmq.ZMQError as exc:
            raise SystemExit(f"mm: cannot bind {self.opts.bind}: {exc}") from None
        endpoint = keys.connectable(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        keys.write_endpoint(self.opts.run_dir, "mm", endpoint)
        assert self.core is not None
        c = self.core.view.counts()
        print(f"mm listening on {endpoint}; kernel {self.opts.kernel}; view: free {c['free']}, used {c['used']}, "
              f"kernel {c['kernel']} of {c['ram']} RAM frames; kernel pool {self.core.kernel_free} "
              f"(watermarks {self.core.config.low}/{self.core.config.target}/{self.core.config.high}); "
              f"quota {self.core.config.quota} pages per client", flush=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._stop)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while self.running:
                timeout = max(0.0, next_tick - time.monotonic())
                events = dict(poller.poll(timeout * 1000))
                if sock in events:
                    for _ in range(64):  # a burst, then housekeeping
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(sock, frames)
                        self.run_op(self.core.maintain())
                if time.monotonic() >= next_tick:
                    self.run_op(self.core.poll_events())
                    self.run_op(self.core.maintain())
                    next_tick = time.monotonic() + self.opts.tick
        finally:
            sock.close(0)
            auth.stop()
            self.kernel.close()
            if self.journal:
                self.journal.close()
            self.ctx.term()

    def _stop(self, *_: Any) -> None:
        self.running = False

    def _handle(self, sock: zmq.Socket, frames: list) -> None:
        rid = frames[0].bytes
        if len(frames) != 2:
            sock.send_multipart([rid, wire.error_reply(None, Error(Errno.EPROTO, f"expected 1 frame, got {len(frames) - 1}"))])
            return
        identity = frames[1].get("User-Id")
        data = frames[1].bytes
        sock.send_multipart([rid, self.handle(identity, data)])

    def handle(self, identity: str | None, data: bytes) -> bytes:
        assert self.service is not None
        return self.run_op(self.service.handle(identity, data))


def run(opts: MMOptions) -> None:
    server = MMServer(opts)
    server.start()
    server.serve()
