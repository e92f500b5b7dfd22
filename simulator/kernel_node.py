"""The simulated kernel process: the real ``KernelService`` fed the bytes the network delivers.

Nothing of the kernel is re-implemented here. The node wraps three points of
the real service to observe it: ``_execute`` (runs once per request that
missed the replay cache: I12 counts executions per identity and request id),
``core.call`` (I6: a refused call must leave the kernel's fingerprint as it
was; successful calls mark the kernel as changed so the state checks run;
every call names the processes and pages it may change to the incremental
check, ``checks.KernelTracker.touch_call``), and ``on_refused`` (calls by
kind and result).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simulator import checks
from simulator.net import Msg
from kernel_server.service import KernelService
from protocol.errors import Error

if TYPE_CHECKING:
    from simulator.world import World

READ_ONLY = checks.READ_ONLY


class KernelNode:
    endpoint = ("kernel",)

    def __init__(self, world: World, svc: KernelService) -> None:
        self.world = world
        self.svc = svc
        self.core = svc.core
        self.executed: set[tuple[str, int]] = set()
        self.lying = False
        svc.on_refused = self._refused
        orig_execute = svc._execute
        core = self.core
        orig_call = core.call

        def _execute(identity: str, req_id: int, call: str, args: dict, now: float) -> bytes:
            key = (identity, req_id)
            if key in self.executed:
                world.flag("I12", f"the kernel executed request #{req_id} of {world.trace.name(identity)} "
                                  f"({call}) a second time")
            else:
                self.executed.add(key)
            return orig_execute(identity, req_id, call, args, now)

        def call(caller: str, name: str, args: Any) -> dict | Error:
            before = checks.fingerprint(core) if world.checking else None
            track = world.ktrack
            if track is not None:  # the processes (and pages) this call may change, for the incremental check
                track.touch_call(caller, name, args)
            try:
                result = orig_call(caller, name, args)
            except Exception as exc:
                world.flag("I10", f"the kernel core raised {type(exc).__name__} in {name}: {exc}")
                raise
            if isinstance(result, Error):
                if before is not None and checks.fingerprint(core) != before:
                    world.flag("I6", f"{name} by {world.trace.name(caller)} failed with {result.code.name} "
                                     f"({result.message}) but changed the kernel's state")
            else:
                if not self.lying:
                    world.count("kernel", name, "ok")
                if name not in READ_ONLY:
                    world.kernel_dirty = True
                if name == "proc_create":
                    world.touched(args.key)
            return result

        svc._execute = _execute
        core.call = call

    def _refused(self, identity: str | None, call: str, err: Error) -> None:
        if not self.lying:
            self.world.count("kernel", call, err.code.name)

    # ---- events ---------------------------------------------------------------------

    def deliver(self, msg: Msg) -> None:
        w = self.world
        identity = msg.identity
        if identity in w.dead_touch:
            w.dead_touch[identity] = w.clock.now
        replayed = self.svc.replayed
        reply = self.svc.handle(identity, msg.data, w.clock.now / 1e6)
        cached = self.svc.replayed != replayed
        if cached:
            w.count("kernel", "(replayed)", "cached")
        w.calls += 1
        w.trace.call(w.step, w.clock.now, identity, "kernel", msg.data, reply, cached)
        w.net.send(Msg(msg.src, self.endpoint, "kernel", reply, True, 0))

    def tick(self) -> None:
        w = self.world
        events = self.svc.expire(w.clock.now / 1e6)
        for ev in events:
            w.kernel_dirty = True
            w.faults["lease_expired"] += 1
            w.trace.event(w.step, w.clock.now, "lease_expired", pid=ev["pid"], who=w.trace.name(ev["key"]),
                          pages=sum(c for _, c in ev["frames"]))
        w.check_leases()
        w.clock.after(w.plan.timing.kernel_tick, "kernel_tick")
