"""The kernel as a bytes-in, bytes-out service: envelope, validation, replay cache, leases.

Rules for this file: no sockets, no clocks, no randomness. Time comes in as
the ``now`` argument. ``handle(identity, data, now)`` never raises and always
returns exactly one reply (I10); a retried request (same identity, same
request id, same bytes) gets the cached reply and is not executed again
(I12); a client whose process has not called for ``lease_seconds`` is
destroyed by ``expire(now)`` (I11).
"""

from __future__ import annotations

from typing import Any, Callable

from kernel_server.arch import get_profile
from kernel_server.bootmap import BootMap, pc_map
from kernel_server.core import KernelCore
from protocol import wire
from protocol.calls import KERNEL_CALLS, validate
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

Refused = Callable[[str | None, str, Error], None]


class KernelService:
    def __init__(self, core: KernelCore, lease_seconds: float = 5.0, on_refused: Refused | None = None,
                 boot_id: str = "0") -> None:
        self.core = core
        self.lease_seconds = lease_seconds
        self.on_refused = on_refused
        self.boot_id = boot_id  # told to callers by hello, so the mm notices a kernel restart
        self.replay = ReplayCache()
        self.last_seen: dict[int, float] = {}  # pid -> last time its client called
        self.calls = 0
        self.refused = 0
        self.replayed = 0

    @classmethod
    def boot(
        cls,
        arch: str = "i686",
        memory: int = 256 << 20,
        mm_key: str = "",
        lease_seconds: float = 5.0,
        kernel_pool_frames: int | None = None,
        on_refused: Refused | None = None,
        bootmap: BootMap | None = None,
        boot_id: str = "0",
        operator_key: str | None = None,
    ) -> "KernelService":
        profile = get_profile(arch)
        bm = bootmap if bootmap is not None else pc_map(profile, memory, kernel_pool_frames)
        return cls(KernelCore(profile, bm, mm_key, operator_key), lease_seconds, on_refused, boot_id)

    # ---- requests ---------------------------------------------------------

    def handle(self, identity: str | None, data: bytes, now: float) -> bytes:
        parsed = wire.parse_request(data)
        if len(parsed) == 2:
            req_id, err = parsed
            return self._refuse(identity, req_id, "?", err)
        req_id, call, args = parsed
        if identity is None:
            return self._refuse(identity, req_id, call, Error(Errno.EPERM, "unauthenticated caller (CURVE required)"))
        self._renew(identity, now)
        digest = self.replay.digest(data)
        cached = self.replay.lookup(identity, req_id, digest)
        if cached is not None:
            self.replayed += 1
            return cached
        reply = self._execute(identity, req_id, call, args, now)
        self.replay.remember(identity, req_id, digest, reply)
        return reply

    def call(self, identity: str, call: str, args: dict[str, Any] | None = None, now: float = 0.0) -> dict | Error:
        """Validate and run one call in-process (no envelope, no replay cache). For tests and the simulator.

        Like ``handle``, any call renews the caller's lease."""
        self._renew(identity, now)
        model = validate(KERNEL_CALLS, call, args or {})
        if isinstance(model, Error):
            return model
        return self._run(identity, call, model, now)

    def _renew(self, identity: str, now: float) -> None:
        pid = self.core.by_key.get(identity)
        if pid is not None:
            self.last_seen[pid] = now

    def _execute(self, identity: str, req_id: int, call: str, args: dict, now: float) -> bytes:
        model = validate(KERNEL_CALLS, call, args)
        if isinstance(model, Error):
            return self._refuse(identity, req_id, call, model)
        result = self._run(identity, call, model, now)
        if isinstance(result, Error):
            return self._refuse(identity, req_id, call, result)
        return wire.ok_reply(req_id, result)

    def _run(self, identity: str, call: str, model: Any, now: float) -> dict | Error:
        self.calls += 1
        try:
            result = self.core.call(identity, call, model)
        except Exception as exc:  # a bug, not the caller's fault: report it, never crash
            return Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}")
        if isinstance(result, dict):
            if call == "proc_create":
                self.last_seen[result["pid"]] = now
            elif call == "proc_destroy":
                self.last_seen.pop(result["pid"], None)
            elif call == "hello":
                result["lease_seconds"] = self.lease_seconds
                result["boot_id"] = self.boot_id
            elif call == "stats":  # call counters, for rates in pictures
                result.update(calls=self.calls, refused=self.refused, replayed=self.replayed)
        return result

    def _refuse(self, identity: str | None, req_id: int | None, call: str, err: Error) -> bytes:
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(identity, call, err)
        return wire.error_reply(req_id, err)

    # ---- leases -----------------------------------------------------------

    def expire(self, now: float) -> list[dict[str, Any]]:
        """Destroy every client process whose lease ran out; returns the events."""
        out = []
        for pid, seen in list(self.last_seen.items()):
            if now - seen > self.lease_seconds and pid in self.core.procs:
                self.core.proc_destroy(pid, "lease")
                del self.last_seen[pid]
                out.append(self.core.events[-1])
            elif pid not in self.core.procs:
                del self.last_seen[pid]
        return out

    def next_deadline(self) -> float | None:
        if not self.last_seen:
            return None
        return min(self.last_seen.values()) + self.lease_seconds

    # ---- reporting ----------------------------------------------------------

    def summary(self) -> str:
        c = self.core.frames.counts()
        p = self.core.profile
        return (
            f"booted {p.name}: {self.core.frames.n} frames ({c['ram']} RAM): "
            f"kernel free {c['kernel_free']}, kernel used {c['kernel_used']}, kernel shared {c['kernel_shared']}, "
            f"user free {c['user_free']}, user mapped {c['user_mapped']}; "
            f"frame table {self.core.frames.nbytes() / self.core.frames.n:.0f} B/frame; lease {self.lease_seconds:g}s"
            + (f"; {note}" if (note := self.core.bootmap.unaddressable_note(p.name)) else "")
        )
