"""Planted bugs, for proving that the simulator bites. Test-only: never used by the real servers.

Each bug is a subclass of a real class (the kernel core, the replay cache) or
a journal driver, built and used *inside the simulation only*; the real cores
have no bug switches. ``mmsim sim --bug NAME`` and tests/test_sim.py run the
simulator with one of them and expect a violation within a bounded number of
seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from kernel_server.arch import PAGE_SHIFT
from kernel_server.core import CLIENT_MADE, KernelCore
from mm_service.policy import MMCore, Op
from mm_service.service import MMService
from protocol import runs as R
from protocol.errors import Errno, Error
from protocol.replay import ReplayCache

# ---- the kernel ------------------------------------------------------------------------------

class DonateSkipsRefcount(KernelCore):
    """donate takes user frames that are still mapped: the refcount check is skipped."""

    def _check_donate(self, caller: str, args: Any) -> np.ndarray | Error:
        out = super()._check_donate(caller, args)
        if isinstance(out, Error) and out.code == Errno.EBUSY:
            a = self._frames_arg(args.frames)
            if not isinstance(a, Error) and not np.any(a >= self.frames.kernel_limit):
                return a
        return out


class UnmapForgetsDecrement(KernelCore):
    """unmap of two or more pages forgets to drop the reference count of the last frame."""

    def unmap(self, caller: str, args: Any) -> dict | Error:
        out = super().unmap(caller, args)
        if isinstance(out, dict) and out["pages"] >= 2:
            self.frames.add_refs(R.to_array(out["frames"])[-1:], +1)
        return out


class LeaseForgetsFrames(KernelCore):
    """Destroying a process whose lease ran out frees its kernel objects but not its user frames."""

    def proc_destroy(self, pid: int, reason: str) -> dict:
        user = self._mapped_frames(self.procs[pid])
        out = super().proc_destroy(pid, reason)
        if reason == "lease" and user.size:
            self.frames.add_refs(user, +1)
        return out


class MapPartialOnEnomem(KernelCore):
    """map as Jinue's MMAP does it: page by page, allocating page tables as it goes, so an ENOMEM
    leaves the pages (and tables) it got to behind instead of changing nothing."""

    def map(self, caller: str, args: Any) -> dict | Error:
        out = super().map(caller, args)
        if isinstance(out, Error) and out.code == Errno.ENOMEM and not args.large and args.page_size is None:
            self._partial(caller, args)
        return out

    def _partial(self, caller: str, args: Any) -> None:
        proc = self._target(caller, args.pid)
        a = self._frames_arg(args.frames)
        if isinstance(proc, Error) or isinstance(a, Error):
            return
        bits = args.prot if caller == self.mm_key else args.prot | CLIENT_MADE
        vp0 = args.vaddr >> PAGE_SHIFT
        for i in range(a.size):
            vp = vp0 + i
            missing = self._missing_tables(proc, vp, vp + 1, self.leaf)
            enough = len(missing) <= self.frames.free_count
            take = missing if enough else missing[: self.frames.free_count]
            if take:
                self._add_tables(proc, take)
            if not enough:
                return
            self._write_small(proc, vp, a[i:i + 1], bits)
            self.frames.add_refs(a[i:i + 1], +1)


class NoReplay(ReplayCache):
    """A replay cache that never finds anything: every retry and duplicate runs again."""

    def lookup(self, identity: str, req_id: int, digest: bytes) -> bytes | None:
        return None


# ---- the mm (bugs the simulator found in it, kept as regressions) --------------------------------

class UndoOnEIO(MMCore):
    """A kernel map/unmap that got no answer is treated as refused: the intent is undone, though the
    kernel may have done it (the policy before the simulator found this)."""

    def _kcall(self, call: str, args: dict[str, Any]) -> Op:
        result = yield from super()._kcall(call, args)
        if call in ("map", "unmap") and isinstance(result, Error) and result.code == Errno.EIO:
            return Error(Errno.EAGAIN, result.message)  # any other error: _map/free undo it
        return result


class VolatileReplies(MMService):
    """The replay cache lives in memory only: nothing of it comes back from the journal or from recovery,
    so a resend that reaches a restarted mm runs again (I12)."""

    def _remember(self, identity: str, req_id: int, digest: bytes, reply: bytes) -> None:
        pass  # the restored and the rebuilt replies are dropped


# ---- the mm's journal (the sim drives it) ------------------------------------------------------

class Journal:
    """The mm's durable journal in the simulation: batches of ops, msgpack-encoded as the real one
    stores them. It survives an mm crash; nothing else of the mm does."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []
        self.on_durable: Callable[[list[dict]], None] | None = None

    def write(self, ops: list[dict[str, Any]]) -> None:
        self.batches.append(msgpack.packb(ops, use_bin_type=True))
        if self.on_durable is not None:
            self.on_durable(ops)

    def replied(self) -> None:
        """Called after the mm sent a reply to a client."""

    def crash(self) -> None:
        """The mm died: what is not durable is gone."""

    def replay(self) -> list[dict[str, Any]]:
        return [op for b in self.batches for op in msgpack.unpackb(b, raw=False, strict_map_key=False)]


class LazyJournal(Journal):
    """Write-behind: a request's journal writes reach the disk only after the *next* reply is sent,
    so the mm replies before its outcome is durable (and loses it if it dies in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer: list[list[dict[str, Any]]] = []
        self.held: list[list[dict[str, Any]]] = []

    def write(self, ops: list[dict[str, Any]]) -> None:
        self.buffer.append(ops)

    def replied(self) -> None:
        for ops in self.held:
            super().write(ops)
        self.held, self.buffer = self.buffer, []

    def crash(self) -> None:
        self.buffer, self.held = [], []


# ---- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bug:
    description: str
    kernel_core: type[KernelCore] = KernelCore
    kernel_replay: type[ReplayCache] | None = None
    journal: type[Journal] = Journal
    mm_core: type[MMCore] = MMCore
    mm_service: type[MMService] = MMService
    recover_empty_journal: bool = True  # a restarted mm settles with the kernel even with an empty journal


BUGS: dict[str, Bug] = {
    "donate_skips_refcount": Bug("donate accepts mapped user frames (the refcount check is skipped)",
                                 kernel_core=DonateSkipsRefcount),
    "unmap_forgets_decrement": Bug("unmap of 2+ pages forgets one refcount decrement",
                                   kernel_core=UnmapForgetsDecrement),
    "mm_reply_before_journal": Bug("the mm replies before its journal writes are durable (write-behind)",
                                   journal=LazyJournal),
    "kernel_replay_disabled": Bug("the kernel's replay cache never hits: retries and duplicates run again (I12)",
                                  kernel_replay=NoReplay),
    "lease_forgets_frames": Bug("lease expiry destroys the process but leaves its frames' refcounts",
                                kernel_core=LeaseForgetsFrames),
    "map_partial_on_enomem": Bug("map on ENOMEM leaves the pages and tables it got to (Jinue's MMAP)",
                                 kernel_core=MapPartialOnEnomem),
    # bugs the simulator found in the real mm (now fixed there), planted back as regressions
    "mm_undo_on_eio": Bug("the mm undoes a map/unmap the kernel did not answer, though it may have done it",
                          mm_core=UndoOnEIO),
    "mm_volatile_replies": Bug("the mm's replay cache is lost in a crash: resends to the restarted mm run again",
                               mm_service=VolatileReplies),
    "mm_trusts_empty_journal": Bug("a restarted mm with an empty journal skips recovery (a donation made before "
                                   "its first journal write is forgotten)", recover_empty_journal=False),
}


def get(name: str | None) -> Bug:
    if name is None:
        return Bug("none")
    try:
        return BUGS[name]
    except KeyError:
        raise ValueError(f"unknown bug {name!r}; choose one of {', '.join(BUGS)}") from None
