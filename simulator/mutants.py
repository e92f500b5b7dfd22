"""Planted bugs, for proving that the simulator bites. Test-only: never used by the real servers.

Each bug is a subclass of a real class (the kernel core or service, the replay
cache, the mm's core, service or driver), built and used *inside the
simulation only*; the real classes have no bug switches. ``mmsim sim --bug
NAME`` and tests/test_sim.py run the simulator with one of them and expect a
violation within a bounded number of seeds.

Changes to the earlier catalogue: the journal-driver bug (``LazyJournal``)
became ``mm_reply_before_journal``, a service that sends a request's reply
before its outcome is committed (planted bugs subclass the mm, not the
simulator's journal); ``mm_trusts_empty_journal`` is a service that skips its
first recovery. ``map_partial_on_enomem`` (Jinue's page-by-page MMAP leaving
what it got to on ENOMEM) is gone: the pool's ENOMEM no longer exists for a
map (kernel quotas are reserved whole), a quota's ENOMEM is decided by
arithmetic before anything is written, and the maps that reach a quota in the
workloads need one new table at most (one page per table span), so a
page-by-page map has nothing to leave behind and no seed could find it; the
kernel's own tests keep I6 on ENOMEM. The two recovery judgements exact
settlement replaced are new: ``recovery_one_snapshot``, ``recovery_frees_both_done``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel_server.core import KernelCore, DonatePlan, _expand
from kernel_server.frames import USER
from kernel_server.service import KernelService
from mm_service import records as J
from mm_service.driver import Driver
from mm_service.policy import MMCore, Op, Persist
from mm_service.service import MMService
from protocol import runs as R
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

# ---- the kernel ------------------------------------------------------------------------------


class DonateSkipsRefcount(KernelCore):
    """donate takes user frames that are still mapped: the refcount check is skipped."""

    def _check_donate(self, caller: str, proc: Any, args: Any) -> DonatePlan | Error:
        out = super()._check_donate(caller, proc, args)
        if isinstance(out, Error) and out.code == Errno.EBUSY and "is mapped" in out.message:
            a = _expand(args.frames)
            if bool((self.frames.kind[a] == USER).all()) and int(a.max()) < self.frames.kernel_limit:
                return DonatePlan(a, int(a[0]), int(a.size))
        return out


class UnmapForgetsDecrement(KernelCore):
    """unmap of two or more pages forgets to drop the reference count of the last frame."""

    def _commit_unmap(self, plan: Any) -> dict:
        out = super()._commit_unmap(plan)
        if out["pages"] >= 2:
            self.frames.add_refs(R.to_array(out["frames"])[-1:], +1)
        return out


class LeaseForgetsFrames(KernelCore):
    """Destroying a process whose lease ran out frees its kernel objects but not its user frames."""

    def _commit_proc_destroy(self, plan: Any) -> dict:
        user = plan.proc.mapped_frames()
        user = user[self.frames.kind[user] == USER]
        out = super()._commit_proc_destroy(plan)
        if plan.reason == "lease" and user.size:
            self.frames.add_refs(user, +1)
        return out


class NoReplay(ReplayCache):
    """A replay cache that never finds anything: every retry and duplicate runs again."""

    def lookup(self, identity: str, req_id: int, digest: bytes) -> bytes | None:
        return None


class NoReplayKernel(KernelService):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.replay = NoReplay(pinned=self.pinned)


# ---- the mm (bugs the simulator found in it, kept as regressions, and the old recoveries) ---------

class UndoOnEIO(MMCore):
    """A kernel map/unmap that got no answer is treated as refused: the intent is undone, though the
    kernel may have done it (the policy before the simulator found this)."""

    def _kcall(self, call: str, args: dict[str, Any]) -> Op:
        result = yield from super()._kcall(call, args)
        if call in ("map", "unmap") and isinstance(result, Error) and result.code == Errno.EIO:
            return Error(Errno.EAGAIN, result.message)  # any other error: _map/free undo it
        return result


class RecoveryOneSnapshot(MMCore):
    """Recovery as it was before exact settlement: every pending intent judged against one reading of the
    kernel's reference counts, taken before any is settled (a map done if the kernel counts what the view
    counts with the map in it; an unmap done if the kernel counts one less). Two pending intents on the
    same frames make each other look done or undone."""

    judged = ("map", "unmap")

    def recover(self) -> Op:
        self._snap: tuple[np.ndarray, np.ndarray] | None = None
        return (yield from super().recover())

    def _settle(self, p: J.Intent) -> Op:
        if p.do not in self.judged or p.key not in self.view.clients:
            return (yield from super()._settle(p))
        if getattr(self, "_snap", None) is None:
            got = yield from self.kernel_frames()
            if isinstance(got, Error):
                return got
            self._snap = (got[1].astype(np.int64), self.view.refs.astype(np.int64))
        kref, vref = self._snap  # type: ignore[misc]
        f = R.to_array(p.frames)
        done = bool(np.all(kref[f] == vref[f] - (0 if p.do == "map" else 1)))
        self.record(J.Done(p.n) if done else J.Undo(p.n))
        return "done" if done else "undo"


class RecoveryFreesBothDone(RecoveryOneSnapshot):
    """The variant that settles maps exactly but judges frees against one reading of reference counts:
    two frees of the same frames (an allocation and an accepted offer of it), one carried out, are both
    judged done."""

    judged = ("unmap",)


class VolatileReplies(MMService):
    """The replay cache lives in memory only: nothing of it comes back from the journal or from recovery,
    so a resend that reaches a restarted mm runs again (I12)."""

    def _remember(self, identity: str, req_id: int, digest: bytes, reply: bytes) -> None:
        pass  # the restored and the rebuilt replies are dropped


class TrustsEmptyJournal(MMService):
    """A restarted mm with an empty journal skips its recovery (a donation made before its first journal
    write is forgotten)."""

    skip = False

    def restore(self, ops: Any) -> int:
        n = super().restore(ops)
        self.skip = n == 0
        return n

    def recover(self) -> Op:
        if not self.skip:
            return (yield from super().recover())
        self.skip = False
        r = yield from self.core.refresh()
        if isinstance(r, Error):
            return r
        none = {"divergences": 0, "classes": {}, "class_counts": {}}
        return {"settled_intents": 0, "found": none, "repairs": 0, "remaining": none}


class RepliesBeforeJournal(MMService):
    """Write-behind: a request's last journal write (its outcome) is left for whatever writes next, and
    the reply goes out at once, before its outcome is durable."""

    def handle(self, identity: str | None, data: bytes, parsed: Any = None) -> Op:
        inner = super().handle(identity, data, parsed)
        value: Any = None
        held: Persist | None = None
        while True:
            try:
                eff = inner.send(value)
            except StopIteration as stop:
                if held is not None and held.ops:
                    self.core.unwritten[:0] = held.ops  # journaled by the next write, whoever makes it
                return stop.value
            if held is not None:  # something follows it: it was not the last, write it now
                yield held
                held = None
            if isinstance(eff, Persist):
                held, value = eff, None
                continue
            value = yield eff


class NeverProbes(Driver):
    """Once the kernel is lost the mm never probes it again: it answers EIO for ever, and the intents the
    loss left pending are never settled (a liveness bug: nothing is wrong at any one step)."""

    def _probe(self) -> Any:
        return Error(Errno.EIO, "no answer to the probe yet")


# ---- the registry -------------------------------------------------------------------------------

def _driver(name: str, core: type[MMCore] = MMCore, service: type[MMService] = MMService) -> type[Driver]:
    return type(name, (Driver,), {"core_class": core, "service_class": service})


@dataclass(frozen=True)
class Bug:
    description: str
    kernel_core: type[KernelCore] = KernelCore
    kernel_service: type[KernelService] = KernelService
    driver: type[Driver] = Driver


BUGS: dict[str, Bug] = {
    "donate_skips_refcount": Bug("donate accepts mapped user frames (the refcount check is skipped)",
                                 kernel_core=DonateSkipsRefcount),
    "unmap_forgets_decrement": Bug("unmap of 2+ pages forgets one refcount decrement",
                                   kernel_core=UnmapForgetsDecrement),
    "kernel_replay_disabled": Bug("the kernel's replay cache never hits: retries and duplicates run again (I12)",
                                  kernel_service=NoReplayKernel),
    "lease_forgets_frames": Bug("lease expiry destroys the process but leaves its frames' refcounts",
                                kernel_core=LeaseForgetsFrames),
    # bugs the simulator found in the real mm (now fixed there), planted back as regressions
    "mm_undo_on_eio": Bug("the mm undoes a map/unmap the kernel did not answer, though it may have done it",
                          driver=_driver("UndoOnEIODriver", core=UndoOnEIO)),
    "mm_volatile_replies": Bug("the mm's replay cache is lost in a crash: resends to the restarted mm run again",
                               driver=_driver("VolatileRepliesDriver", service=VolatileReplies)),
    "mm_trusts_empty_journal": Bug("a restarted mm with an empty journal skips recovery (a donation made before "
                                   "its first journal write is forgotten)",
                                   driver=_driver("TrustsEmptyJournalDriver", service=TrustsEmptyJournal)),
    "mm_reply_before_journal": Bug("the mm replies before a request's outcome is durable (write-behind)",
                                   driver=_driver("RepliesBeforeJournalDriver", service=RepliesBeforeJournal)),
    # the recovery judgements exact settlement replaced
    "recovery_one_snapshot": Bug("recovery judges every pending intent against one reading of the kernel's "
                                 "reference counts", driver=_driver("OneSnapshotDriver", core=RecoveryOneSnapshot)),
    "mm_never_probes": Bug("once the kernel is lost the mm never probes it again: pending intents never settle "
                           "(found by the liveness phase)", driver=NeverProbes),
    "recovery_frees_both_done": Bug("recovery judges frees against one reading of reference counts: two frees of "
                                    "shared frames, one carried out, are both judged done",
                                    driver=_driver("FreesBothDoneDriver", core=RecoveryFreesBothDone)),
}


def get(name: str | None) -> Bug:
    if name is None:
        return Bug("none")
    try:
        return BUGS[name]
    except KeyError:
        raise ValueError(f"unknown bug {name!r}; choose one of {', '.join(BUGS)}") from None
