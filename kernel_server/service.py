"""The kernel as a bytes-in, bytes-out service: envelope, validation, replay cache, leases.

Rules for this file: no sockets, no clocks, no randomness. Time comes in as the ``now``
argument. ``handle(identity, data, now)`` never raises and always returns exactly one reply
(I10); a retried request (same identity, same request id, same bytes) gets the cached reply and
is not executed again (I12); a client whose process has not called for ``lease_seconds`` is
destroyed by ``expire(now)`` (I11).

A request is refused in this order (the call table's ``COMMON`` rules): size (E2BIG: past
``wire.MAX_CLIENT_REQUEST_BYTES`` unless the mm or the operator sends it) and envelope (E2BIG,
EPROTO), no identity (EPERM), unknown call (ENOSYS), the caller's rule by identity alone
(EPERM/ESRCH: a stranger's privileged call costs no validation), the size of a client's map or
unmap from the raw counts (E2BIG: a client's call costs little to validate), the arguments
(EINVAL), then the call's own rules in the kernel core.

Replay cache: the mm, the operator and every identity with a live process are pinned (their
replies are never evicted by anyone else's traffic).

The hot path (see docs/performance.md): the usual envelope is checked at once (``wire.parse_request``),
``map``/``unmap``/``ping``/``hello`` arguments by ``fastargs`` (equivalent to the pydantic models, which
decide everything else and give every refusal; while an observer is set they give the genuine models, so
the observer is told what the general path tells it), and replies are encoded with a ``wire.Replies`` made
once.

Leases measure the client, not the kernel: ``credit_stall(seconds)`` adds time the kernel was
not reading requests (it was stopped, or busy) to every lease; the server shell measures it.
"""

from __future__ import annotations

from typing import Any, Callable

from kernel_server.arch import get_profile
from kernel_server.bootmap import BootMap, pc_map
from kernel_server.calls import ADAPTERS, CALLS, Who
from kernel_server.core import KernelCore
from kernel_server.fastargs import FAST, FAST_MODELS
from kernel_server.observe import NO_OBSERVER, KernelObserver
from protocol import wire
from protocol.calls import validate
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

Refused = Callable[[str | None, str, Error], None]
_AFTER = frozenset(("proc_create", "proc_destroy", "hello", "stats"))  # results the service adds to
# When ``KernelCore.refuse_caller`` must look at a call's caller: 0 never (anyone may make it), 1 unless it is the mm
# (map and unmap: the mm may act on any process), 2 always. Calls not in the table have no entry (ENOSYS).
_CALLER_CHECK = {name: 0 if c.who is Who.ANYONE else 1 if c.who is Who.MM_OR_OWN else 2 for name, c in CALLS.items()}
_MAX_CLIENT_REQUEST = wire.MAX_CLIENT_REQUEST_BYTES
_parse_request = wire.parse_request


class KernelService:
    def __init__(self, core: KernelCore, lease_seconds: float = 5.0, on_refused: Refused | None = None,
                 boot_id: str = "0", observer: KernelObserver | None = None) -> None:
        self.core = core
        self.lease_seconds = lease_seconds
        self.on_refused = on_refused  # the server's log of refusals (the observer hears them too)
        self.boot_id = boot_id  # told to callers by hello, so the mm notices a kernel restart
        self.replay = ReplayCache(pinned=self.pinned)
        self.last_seen: dict[int, float] = {}  # pid -> when its client last called, on the lease clock
        self.stalled = 0.0  # seconds credited to every lease: the kernel was not reading requests
        self.calls = 0
        self.refused = 0
        self.replayed = 0
        self.replies_dropped = 0  # counted by the server shell: peers that did not read their replies
        self.observer: KernelObserver = NO_OBSERVER
        self._watched = False
        self._fast = FAST  # argument checks equivalent to the models (genuine models while an observer is set)
        self._replies = wire.Replies()
        if observer is not None:
            self.set_observer(observer)

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
        observer: KernelObserver | None = None,
    ) -> "KernelService":
        profile = get_profile(arch)
        bm = bootmap if bootmap is not None else pc_map(profile, memory, kernel_pool_frames)
        return cls(KernelCore(profile, bm, mm_key, operator_key), lease_seconds, on_refused, boot_id, observer)

    def set_observer(self, observer: KernelObserver | None) -> None:
        """Tell ``observer`` of every call, refusal, replay-cache miss and write (None: nobody)."""
        self.core.set_observer(observer)
        self.observer = self.core.observer
        self._watched = self.core._watched
        self._fast = FAST_MODELS if self._watched else FAST  # an observer is told of genuine models

    def pinned(self, identity: str) -> bool:
        """Whose replies the replay cache keeps whatever others send: the mm, the operator, and every
        identity with a live process."""
        return identity in self.core.by_key or self.core.is_reader(identity)

    # ---- requests ---------------------------------------------------------------------------------

    def handle(self, identity: str | None, data: bytes, now: float) -> bytes:
        if len(data) > _MAX_CLIENT_REQUEST and not (identity is not None and self.core.is_reader(identity)):
            return self._refuse(identity, None, "?", Error(
                Errno.E2BIG, f"message of {len(data)} bytes exceeds the limit of {wire.MAX_CLIENT_REQUEST_BYTES} "
                "for a client (only the memory manager and the operator send larger requests)"))
        parsed = _parse_request(data)
        if len(parsed) == 2:
            req_id, err = parsed
            return self._refuse(identity, req_id, "?", err)
        req_id, call, args = parsed
        if identity is None:
            return self._refuse(identity, req_id, call, Error(Errno.EPERM, "unauthenticated caller (CURVE required)"))
        pid = self.core.by_key.get(identity)  # (the lease: ``_renew``)
        if pid is not None:
            self.last_seen[pid] = now - self.stalled
        replay = self.replay
        digest = replay.key(data)
        cached = replay.lookup(identity, req_id, digest)
        if cached is not None:
            self.replayed += 1
            return cached
        if self._watched:
            self.observer.replay_miss(identity, req_id)
        reply = self._execute(identity, req_id, call, args, now)
        replay.remember(identity, req_id, digest, reply)
        return reply

    def call(self, identity: str, call: str, args: dict[str, Any] | None = None, now: float = 0.0) -> dict | Error:
        """Validate and run one call in-process (no envelope, no replay cache). For tests and the simulator.

        Like ``handle``, any call renews the caller's lease; refusals are counted and reported alike."""
        self._renew(identity, now)
        out = self._checked(identity, call, args or {}, now)
        if isinstance(out, Error):
            self._refused(identity, call, out)
        return out

    def _checked(self, identity: str, call: str, args: dict[str, Any], now: float) -> dict | Error:
        """The caller's rule by identity, the arguments, then the call."""
        if call in ADAPTERS:
            e = self.core.refuse_caller(identity, call, args)
            if e is not None:
                return e
        fast = self._fast.get(call)
        model = fast(args) if fast is not None else None
        if model is None:
            model = validate(ADAPTERS, call, args)
            if isinstance(model, Error):
                return model
        return self._run(identity, call, model, now)

    def _renew(self, identity: str, now: float) -> None:
        pid = self.core.by_key.get(identity)
        if pid is not None:
            self.last_seen[pid] = now - self.stalled

    def _execute(self, identity: str, req_id: int, call: str, args: dict, now: float) -> bytes:
        """``_checked`` and its reply, written out (the hot path: the same steps in the same order)."""
        core = self.core
        check = _CALLER_CHECK.get(call, 0)
        if check and (check == 2 or identity != core.mm_key):
            e = core.refuse_caller(identity, call, args)
            if e is not None:
                return self._refuse(identity, req_id, call, e)
        fast = self._fast.get(call)
        model = fast(args) if fast is not None else None
        if model is None:
            model = validate(ADAPTERS, call, args)
            if isinstance(model, Error):
                return self._refuse(identity, req_id, call, model)
        self.calls += 1
        try:
            result = core.call(identity, call, model)
        except Exception as exc:  # a bug, not the caller's fault: report it, never crash
            result = Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}")
        if isinstance(result, Error):
            return self._refuse(identity, req_id, call, result)
        if call in _AFTER:
            self._after(call, result, now)
        return self._replies.ok(req_id, result)

    def _run(self, identity: str, call: str, model: Any, now: float) -> dict | Error:
        self.calls += 1
        try:
            result = self.core.call(identity, call, model)
        except Exception as exc:  # a bug, not the caller's fault: report it, never crash
            return Error(Errno.EIO, f"internal error in {call}: {type(exc).__name__}: {exc}")
        if call in _AFTER and type(result) is dict:
            self._after(call, result, now)
        return result

    def _after(self, call: str, result: dict, now: float) -> None:
        """What the service adds to a call's success: leases, hello's lease and boot id, stats' counters."""
        if call == "proc_create":
            self.last_seen[result["pid"]] = now - self.stalled
        elif call == "proc_destroy":
            self.last_seen.pop(result["pid"], None)
        elif call == "hello":
            result["lease_seconds"] = self.lease_seconds
            result["boot_id"] = self.boot_id
        elif call == "stats":  # call counters, for rates in pictures
            result.update(calls=self.calls, refused=self.refused, replayed=self.replayed,
                          replies_dropped=self.replies_dropped)

    def _refused(self, identity: str | None, call: str, err: Error) -> None:
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(identity, call, err)
        if self._watched:
            self.observer.refused(identity, call, err)

    def _refuse(self, identity: str | None, req_id: int | None, call: str, err: Error) -> bytes:
        self._refused(identity, call, err)
        return self._replies.error(req_id, err)

    # ---- leases -----------------------------------------------------------------------------------
    #
    # ``last_seen`` is kept on the lease clock: real time less the stall credited so far, so crediting
    # a stall moves every deadline at once.

    def credit_stall(self, seconds: float) -> None:
        """The kernel did not read requests for ``seconds`` (it was stopped, or busy): no lease runs out
        for that time."""
        if seconds > 0:
            self.stalled += seconds

    def expire(self, now: float) -> list[dict[str, Any]]:
        """Destroy every client process whose lease ran out; returns the events."""
        out = []
        clock = now - self.stalled
        for pid, seen in list(self.last_seen.items()):
            if clock - seen > self.lease_seconds and pid in self.core.procs:
                self.core.proc_destroy(pid, "lease")
                del self.last_seen[pid]
                out.append(self.core.events[-1])
            elif pid not in self.core.procs:
                del self.last_seen[pid]
        return out

    def next_deadline(self) -> float | None:
        """When the first lease runs out (real time), or None."""
        if not self.last_seen:
            return None
        return min(self.last_seen.values()) + self.lease_seconds + self.stalled

    # ---- reporting ----------------------------------------------------------------------------------

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
