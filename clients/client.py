"""The client library: one identity talking to the kernel and to the memory manager.

``Client`` wraps two ``protocol.Connection``s (kernel and mm) that share one
CURVE key pair, so both servers see the same identity. Memory comes from the
mm (``alloc``/``free``, and ``share``/``accept``: an offer of an allocation to a
peer, which maps it into its own address space, charged to its own quota);
kernel objects and the client's own address
space are system calls (``thread_create``, ``endpoint_create``, ``unmap``,
``map_shared_readonly``, ``ping``). Refusals raise ``CallError`` with the
error's name, number and details. Any kernel call renews the client's lease;
``start_keepalive`` pings from a background thread (its own socket, the same
key) for clients that may sit idle longer than the lease.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import zmq

from protocol import PROT_READ, PROT_WRITE, rundir
from protocol.connection import Connection


class Client:
    def __init__(
        self,
        kernel_endpoint: str,
        mm_endpoint: str,
        kernel_key: bytes | str,
        mm_key: bytes | str,
        public: bytes | str,
        secret: bytes | str,
        timeout: float = 2.0,
        retries: int = 2,
    ) -> None:
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self.kernel_endpoint, self.kernel_key = kernel_endpoint, kernel_key
        self.public, self.secret = public, secret
        self.kernel = Connection(kernel_endpoint, kernel_key, public, secret, timeout, retries, self.ctx)
        self.mm = Connection(mm_endpoint, mm_key, public, secret, timeout, retries, self.ctx)
        self._keepalive: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_run_dir(cls, run_dir: str, name: str = "client-0", *, create_key: bool = True,
                     kernel_endpoint: str | None = None, mm_endpoint: str | None = None,
                     **kw: Any) -> "Client":
        """A client using key pair ``name`` of the run directory (made and admitted if missing and
        ``create_key``: whoever may write the run directory acts as its operator)."""
        if create_key:
            rundir.generate(run_dir, name)
            if not os.path.exists(os.path.join(rundir.admitted_dir(run_dir), f"{name}.key")):
                rundir.admit(run_dir, name)
        pub, sec = rundir.load_keypair(run_dir, name)
        return cls(kernel_endpoint or rundir.read_endpoint(run_dir, "kernel"),
                   mm_endpoint or rundir.read_endpoint(run_dir, "mm"),
                   rundir.public_key(run_dir, "kernel"), rundir.public_key(run_dir, "mm"), pub, sec, **kw)

    @property
    def identity(self) -> str:
        return self.kernel.identity

    def close(self) -> None:
        self.stop_keepalive()
        self.kernel.close()
        self.mm.close()
        self.ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- generic ------------------------------------------------------------------

    def call(self, target: str, call: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """A call to ``"kernel"`` or ``"mm"`` by name (workload drivers use this)."""
        conn = {"kernel": self.kernel, "mm": self.mm}.get(target)
        if conn is None:
            raise ValueError(f"unknown target {target!r}: 'kernel' or 'mm'")
        return conn.call(call, args, **kw)

    # ---- the memory manager ---------------------------------------------------------

    def alloc(self, pages: int, prot: int = PROT_READ | PROT_WRITE, vaddr: int | None = None,
              large: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = {"pages": pages, "prot": prot}
        if vaddr is not None:
            args["vaddr"] = vaddr
        if large:
            args["large"] = True
        return self.mm.call("alloc", args)

    def free(self, vaddr: int, pages: int) -> dict[str, Any]:
        return self.mm.call("free", {"vaddr": vaddr, "pages": pages})

    def share(self, vaddr: int, pages: int, peer: str, prot: int = PROT_READ) -> dict[str, Any]:
        """Offer the allocation at ``vaddr`` to ``peer`` (an admitted client with a live process):
        ``{offer, peer, pages, prot}``. Nothing is mapped until the peer accepts the offer."""
        return self.mm.call("share", {"vaddr": vaddr, "pages": pages, "peer": peer, "prot": prot})

    def accept(self, offer: int, vaddr: int | None = None) -> dict[str, Any]:
        """Map offer ``offer`` (made to us) at ``vaddr`` (or where the mm places it), charged to our quota:
        ``{offer, vaddr, pages, frames, prot}``. Free it with ``free`` like an allocation."""
        args: dict[str, Any] = {"offer": offer}
        if vaddr is not None:
            args["vaddr"] = vaddr
        return self.mm.call("accept", args)

    def mm_stats(self) -> dict[str, Any]:
        return self.mm.call("stats")

    # ---- the kernel ---------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.kernel.call("hello")

    def ping(self) -> dict[str, Any]:
        return self.kernel.call("ping")

    def stats(self) -> dict[str, Any]:
        return self.kernel.call("stats")

    def address_map(self) -> dict[str, Any]:
        return self.kernel.call("address_map")

    def thread_create(self) -> int:
        return self.kernel.call("thread_create")["tid"]

    def thread_destroy(self, tid: int) -> dict[str, Any]:
        return self.kernel.call("thread_destroy", {"tid": tid})

    def endpoint_create(self) -> int:
        return self.kernel.call("endpoint_create")["eid"]

    def endpoint_destroy(self, eid: int) -> dict[str, Any]:
        return self.kernel.call("endpoint_destroy", {"eid": eid})

    def unmap(self, vaddr: int, pages: int) -> dict[str, Any]:
        return self.kernel.call("unmap", {"vaddr": vaddr, "pages": pages})

    def map_shared_readonly(self, frames: list[list[int]], vaddr: int) -> dict[str, Any]:
        """Map kernel-shared frames (boot image, RAM disk, firmware tables) read-only into itself."""
        return self.kernel.call("map", {"vaddr": vaddr, "frames": frames, "prot": PROT_READ})

    # ---- lease renewal ----------------------------------------------------------------------

    def start_keepalive(self, interval: float | None = None) -> None:
        """Ping the kernel every ``interval`` seconds (default: a third of the lease) from a thread."""
        if self._keepalive is not None:
            return
        if interval is None:
            interval = max(0.05, float(self.hello().get("lease_seconds", 5.0)) / 3)
        self._stop.clear()

        def loop() -> None:
            # Pings go out on one socket, whatever comes back: a ping that waited for its reply and, late, opened
            # a new socket would make a new CURVE handshake, which may queue behind thousands of others (a
            # stranger's flood) while the lease runs out; the kernel reads this one's pings as they come.
            conn = Connection(self.kernel_endpoint, self.kernel_key, self.public, self.secret,
                              timeout=interval, retries=0, ctx=self.ctx)
            try:
                while not self._stop.wait(interval):
                    conn.submit("ping")
                    while conn.collect(0)[0] is not None:
                        pass  # (the replies are not needed: the workload notices a kernel away on its own calls)
            finally:
                conn.close()  # the socket only: the context is the client's

        self._keepalive = threading.Thread(target=loop, name="keepalive", daemon=True)
        self._keepalive.start()

    def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._stop.set()
            self._keepalive.join(timeout=5)
            self._keepalive = None
