"""Is the kernel there, and is it still the boot the mm's view belongs to? The decision, sans-I/O.

Rules for this file: no sockets, clocks, randomness or I/O. ``check`` is the
mm's once-per-tick look at the kernel and ``verify`` its look after a kernel
call that needed a resend; both are operation generators (see ``policy``)
that yield ``KCall``s and keep their conclusions in a ``KernelWatch``. The
ZeroMQ server (``mm_service.server``) and the simulator's mm node both drive
them, so the simulator runs the real logic:

- no reply to ``hello``: the kernel is *lost* (``watch.lost`` says why); the
  drivers answer every request that needs the kernel with EIO at once, and
  send the next tick's ``hello`` as a probe that never blocks the mm;
- the same boot id again after it was lost (a pause, not a restart): the mm
  reconciles its view with the kernel's frame table (``MMService.recover``)
  and carries on (``"back"``);
- another boot id (the kernel restarted: its processes and frames are gone):
  the verdict is ``"new_boot"`` with the new boot's ``hello`` and address
  map; the driver sets the journal of the old boot aside and rebuilds the
  view for the new one (its I/O), then serves again;
- a restarted kernel that does not know the mm's key: ``"foreign"``, the mm
  cannot go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from mm_service.policy import KCall, Op
from protocol.errors import Errno, Error

if TYPE_CHECKING:
    from mm_service.service import MMService


@dataclass
class KernelWatch:
    boot_id: str | None = None  # the kernel boot the mm's view belongs to
    lost: str | None = None  # why the kernel is considered unreachable, or None
    restarts: int = 0  # new boots seen

    def lose(self, why: str) -> bool:
        """Mark the kernel lost; True if it was not already (the driver says so once)."""
        if self.lost is not None:
            return False
        self.lost = why
        return True


class Verdict(NamedTuple):
    state: str  # "up", "down", "refused", "back", "new_boot" or "foreign" (see the module docstring)
    message: str = ""
    hello: dict[str, Any] | None = None
    amap: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None

    @property
    def serving(self) -> bool:
        """May the mm go on with its housekeeping (events, watermarks) this tick?"""
        return self.state in ("up", "back")


def boot_of(hello: dict[str, Any]) -> str:
    return str(hello.get("boot_id", "0"))


def check(watch: KernelWatch, service: MMService) -> Op:
    """One tick's look at the kernel. The first effect is always ``KCall("hello")``: while the kernel
    is lost, a driver may answer it with ``Error(EIO)`` until a probe it sent earlier is answered."""
    hello = yield KCall("hello", {})
    if isinstance(hello, Error):
        if hello.code == Errno.EIO:
            watch.lose("no reply to hello")
            return Verdict("down", watch.lost or "")
        return Verdict("refused", f"the kernel refused hello: {hello}")
    boot = boot_of(hello)
    was_lost = watch.lost is not None
    watch.lost = None
    if boot != watch.boot_id:
        amap = yield KCall("address_map", {})
        if isinstance(amap, Error):
            if amap.code == Errno.EIO:
                watch.lose("no reply to address_map")
                return Verdict("down", watch.lost or "")
            return Verdict("refused", f"the kernel refused address_map: {amap}")
        if not hello.get("is_mm"):
            return Verdict("foreign", "the restarted kernel does not know this mm key as its memory manager")
        watch.restarts += 1
        return Verdict("new_boot", f"boot {str(watch.boot_id)[:12]} -> {boot[:12]}", hello=hello, amap=amap)
    if was_lost:  # the same boot: calls may have happened whose replies were lost; settle with the kernel
        rec = yield from service.recover()
        if isinstance(rec, Error):
            if rec.code == Errno.EIO:
                watch.lose(f"no reply during reconciliation ({rec.message})")
            return Verdict("down", rec.message)
        return Verdict("back", f"the kernel is back (same boot {boot[:12]})", recovery=rec)
    return Verdict("up")


def verify(watch: KernelWatch) -> Op:
    """After a kernel call that needed a resend: the resend may have reached a kernel that restarted
    meanwhile. If the answer came from another boot (or none came), the kernel is marked lost, so the
    mm stops calling it with the old boot's state until the next ``check`` rebuilds the view."""
    hello = yield KCall("hello", {})
    if isinstance(hello, Error):
        watch.lose("no reply to hello after a resend")
    elif boot_of(hello) != watch.boot_id:
        watch.lose(f"it restarted: boot {str(watch.boot_id)[:12]} -> {boot_of(hello)[:12]}")
    return watch.lost is None
