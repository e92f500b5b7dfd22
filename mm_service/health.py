"""Is the kernel there, and is it still the boot the mm's view belongs to? The decision, sans-I/O.

Rules for this file: no sockets, clocks, randomness or I/O. ``check`` is the
mm's once-per-tick look at the kernel, an operation generator (see
``policy``) that yields ``KCall``s and keeps its conclusions in a
``KernelWatch``. The driver (``mm_service.driver``) runs it as housekeeping:

- no reply to ``hello``: the kernel is *lost* (``watch.lost`` says why); the
  driver answers every request that needs the kernel with EIO at once, and
  sends a ``hello`` probe that never blocks the mm;
- the same boot id again after it was lost (a pause, not a restart): the mm
  settles with the kernel (``MMService.recover``) and carries on (``"back"``);
- another boot id (the kernel restarted: its processes and frames are gone):
  the verdict is ``"new_boot"`` with the new boot's ``hello`` and address
  map; the driver's I/O sets the journal of the old boot aside and the view
  is rebuilt for the new one, then the mm serves again;
- a restarted kernel that does not know the mm's key: ``"foreign"``, the mm
  cannot go on.

(After a kernel request that had to be resent, the driver checks the boot id
at once with a ``hello`` of its own: the resend may have reached a kernel
that restarted meanwhile.)
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
            if watch.lose("no reply to hello") and service._watched:
                service.observer.probe("mm.kernel.lost")
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
        if service._watched:
            service.observer.probe("mm.kernel.back")
        return Verdict("back", f"the kernel is back (same boot {boot[:12]})", recovery=rec)
    return Verdict("up")
