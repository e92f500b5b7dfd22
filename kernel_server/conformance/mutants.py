"""Kernel cores with one planted bug each, to prove that ``mmsim check`` and the vectors bite.

Each is a subclass of the real ``KernelCore`` that breaks one rule of the design; the real core has
no bug switches and the servers never import this module. ``BUGS[name]`` gives the class and what
it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel_server.core import DonatePlan, KernelCore, ReclaimPlan, _expand
from kernel_server.frames import KERNEL_FREE, USER
from protocol.errors import Errno, Error


class DonateIgnoresRefcount(KernelCore):
    """donate takes user frames that are still mapped (the refcount rule is skipped)."""

    def _check_donate(self, caller: str, _proc: Any, args: Any) -> Any:
        out = super()._check_donate(caller, _proc, args)
        if isinstance(out, Error) and out.code == Errno.EBUSY:
            a = _expand(args.frames)
            return DonatePlan(a, int(a[0]), int(a.size))
        return out


class ReclaimIgnoresReservation(KernelCore):
    """reclaim {count} takes free frames that processes' quotas reserve."""

    def _check_reclaim(self, caller: str, _proc: Any, args: Any) -> Any:
        if args.count is not None:
            return ReclaimPlan(None, min(args.count, self.frames.free_count), [])
        return super()._check_reclaim(caller, _proc, args)


class UnmapKeepsReference(KernelCore):
    """unmap forgets to drop the reference count of the first frame it unmaps."""

    def _commit_unmap(self, plan: Any) -> dict:
        out = super()._commit_unmap(plan)
        self.frames.add_ref(out["frames"][0][0], +1)
        return out


class MapIgnoresQuota(KernelCore):
    """map takes page tables past the process's kernel quota."""

    def _over_quota(self, proc: Any, needed: int, what: str) -> Error | None:
        return None if what == "map" else super()._over_quota(proc, needed, what)


class DestroyLeaksThreads(KernelCore):
    """proc_destroy forgets the process's threads: their frames stay in use, held by nobody."""

    def _commit_proc_destroy(self, plan: Any) -> dict:
        plan.proc.threads.clear()
        return super()._commit_proc_destroy(plan)


class ReclaimPartial(KernelCore):
    """An explicit reclaim refused because a frame is in use still takes the free frames it named (not
    all-or-nothing: I5/I6)."""

    def _check_reclaim(self, caller: str, _proc: Any, args: Any) -> Any:
        out = super()._check_reclaim(caller, _proc, args)
        if isinstance(out, Error) and out.code == Errno.EBUSY and args.frames is not None:
            a = _expand(args.frames)
            free = a[(a < self.frames.n) & (self.frames.kind[np.minimum(a, self.frames.n - 1)] == KERNEL_FREE)]
            if free.size:
                self.frames.unlink_free(free)
                self.frames.set_kind(free, KERNEL_FREE, USER)
        return out


class ClientMapsUserFrames(KernelCore):
    """A client may map any user frame into itself, not only kernel-shared ones read-only (I9)."""

    def _map_frame_rules(self, a: np.ndarray, kinds: np.ndarray, large: bool, by_mm: bool, prot: int) -> Error | None:
        return super()._map_frame_rules(a, kinds, large, True, prot)

    def _check_map(self, caller: str, proc: Any, args: Any) -> Any:
        if caller != self.mm_key:  # take the mm's path for the frames, keep the client's bit on the entries
            plan = super()._check_map(self.mm_key, proc, args)
            if isinstance(plan, Error):
                return plan
            from kernel_server.pagetable import CLIENT_MADE

            return plan._replace(bits=plan.bits | CLIENT_MADE)
        return super()._check_map(caller, proc, args)


class EndpointSlabLeak(KernelCore):
    """endpoint_destroy keeps the slab frame its last endpoint emptied: in use, held by nobody."""

    def _commit_endpoint_destroy(self, plan: Any) -> dict:
        proc = plan.proc
        proc.slab.free(*proc.endpoints.pop(plan.eid))
        self._changed(proc)
        return {"eid": plan.eid}


@dataclass(frozen=True)
class Bug:
    core: type[KernelCore]
    breaks: str


BUGS: dict[str, Bug] = {
    "donate-ignores-refcount": Bug(DonateIgnoresRefcount, "I3/I5: donate takes mapped user frames"),
    "reclaim-ignores-reservation": Bug(ReclaimIgnoresReservation, "I13: reclaim {count} takes reserved frames"),
    "unmap-keeps-reference": Bug(UnmapKeepsReference, "I4: unmap leaves a reference behind"),
    "map-ignores-quota": Bug(MapIgnoresQuota, "I13: map charges page tables past the quota"),
    "destroy-leaks-threads": Bug(DestroyLeaksThreads, "I2/I11: a destroyed process's thread frames leak"),
    "reclaim-partial": Bug(ReclaimPartial, "I6: a refused explicit reclaim takes some frames"),
    "client-maps-user-frames": Bug(ClientMapsUserFrames, "I9: a client maps user frames into itself"),
    "endpoint-slab-leak": Bug(EndpointSlabLeak, "I2/I13: an emptied endpoint slab frame leaks"),
}

__all__ = ["BUGS", "Bug"]
