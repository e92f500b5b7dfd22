"""The simulated kernel process: the real ``KernelService`` fed the bytes the network delivers.

Nothing of the kernel is re-implemented or patched here. The node is the
kernel's observer (``kernel_server.observe``), the one declared seam:

- ``replay_miss``: a request is executed (not answered from the replay
  cache): I12 counts executions per identity and request id, and the mm's
  map/unmap requests the kernel carries out are told to the world (the
  judge of the mm's settlements, ``World.kernel_executed``);
- ``call_begun``/``call_ended``: a refused call must have reported no write
  and left the kernel's ``fingerprint`` as it was (I6); calls are counted by
  kind and result; ``proc_create`` renews what I11 watches;
- ``frames_written``/``process_changed``: the kernel changed (the state
  checks run) and what changed (the incremental check, ``checks.KernelTracker``);
- ``refused``: refusals by kind.

Reads the checkers make themselves (the quiet points' audit, the view
recorder) are made with ``reading`` set: they are not part of the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simulator import checks
from simulator.net import Msg
from kernel_server.calls import CALLS
from kernel_server.observe import KernelObserver
from kernel_server.service import KernelService
from protocol.errors import Error

if TYPE_CHECKING:
    from simulator.world import World

MUTATES = frozenset(name for name, spec in CALLS.items() if spec.mutates)
OBJECTS_ONLY = frozenset(("thread_create", "thread_destroy", "endpoint_create", "endpoint_destroy"))  # map nothing


class KernelNode(KernelObserver):
    endpoint = ("kernel",)

    def __init__(self, world: World) -> None:
        self.world = world
        self.svc: KernelService | None = None
        self.executed: set[tuple[str, int]] = set()
        self.lying = False  # a forged request is being handled (counted as a lie, not as a call)
        self.reading = False  # a checker reads the kernel: not part of the run
        self.current: tuple[str, int] | None = None  # the request being executed
        self.writes = 0  # writes reported since the current call began
        self.before: tuple | None = None
        self.objects_only = False  # the current call makes or drops kernel objects only

    def attach(self, svc: KernelService) -> None:
        self.svc = svc
        self.core = svc.core

    # ---- the observer seam ------------------------------------------------------------

    def replay_miss(self, identity: str, req_id: int) -> None:
        key = (identity, req_id)
        if key in self.executed:
            w = self.world
            w.flag("I12", f"the kernel executed request #{req_id} of {w.trace.name(identity)} a second time")
        else:
            self.executed.add(key)
        self.current = key

    def call_begun(self, caller: str, name: str, args: Any) -> None:
        if self.reading:
            return
        self.writes = 0
        self._args = args
        self.before = checks.fingerprint(self.core) if name in MUTATES else None
        self.objects_only = name in OBJECTS_ONLY

    def call_ended(self, caller: str, name: str, result: Any) -> None:
        if self.reading:
            return
        w = self.world
        current, self.current = self.current, None
        self.objects_only = False
        if isinstance(result, Error):
            if self.writes:
                w.flag("I6", f"{name} by {w.trace.name(caller)} failed with {result.code.name} ({result.message}) "
                             f"but reported {self.writes} write(s) to the kernel's state")
            elif self.before is not None and checks.fingerprint(self.core) != self.before:
                w.flag("I6", f"{name} by {w.trace.name(caller)} failed with {result.code.name} ({result.message}) "
                             "but changed the kernel's state")
            return
        if not self.lying:
            w.count("kernel", name, "ok")
        if name == "proc_create":
            w.touched(_key_of(self.core, result["pid"]))
        if current is not None and caller == w.mm_key and name in MUTATES:
            mapping = name == "map" or name == "unmap"
            if mapping:
                w.kernel_executed(current[1])
            armed = w.partition_after_exec
            if armed:  # (whether it touched shared frames matters only to a partition armed for that)
                shared = False
                if mapping and armed.endswith("_shared"):
                    runs = self._args.frames if name == "map" else result.get("frames") or []
                    refs = self.core.frames.refs
                    shared = any(int(refs[f:f + c].max()) >= (2 if name == "map" else 1) for f, c in runs if c)
                w.kernel_changed_for_mm(name, shared)

    def refused(self, identity: str | None, name: str, error: Any) -> None:
        if not self.lying and not self.reading:
            self.world.count("kernel", name, error.code.name)

    def frames_written(self, frames: Any) -> None:
        if self.reading:
            return
        self.writes += 1
        w = self.world
        w.kernel_dirty = True
        if w.ktrack is not None:
            w.ktrack.written(frames)

    def probe(self, name: str) -> None:
        if not self.reading:
            self.world.probes[name] += 1

    def process_changed(self, pid: int) -> None:
        if self.reading:
            return
        self.writes += 1
        w = self.world
        w.kernel_dirty = True
        if w.ktrack is not None:
            w.ktrack.changed(pid, self.objects_only)

    # ---- events ---------------------------------------------------------------------

    def deliver(self, msg: Msg) -> None:
        w = self.world
        svc = self.svc
        assert svc is not None
        identity = msg.identity
        if identity in w.dead_touch:
            w.dead_touch[identity] = w.clock.now
        replayed = svc.replayed
        reply = svc.handle(identity, msg.data, w.clock.now / 1e6)
        cached = svc.replayed != replayed
        if cached:
            w.count("kernel", "(replayed)", "cached")
        w.trace.call(w.step, w.clock.now, identity, "kernel", msg.data, reply, cached)
        w.net.send(Msg(msg.src, self.endpoint, "kernel", reply, True, msg.call))

    def tick(self) -> None:
        w = self.world
        assert self.svc is not None
        events = self.svc.expire(w.clock.now / 1e6)
        for ev in events:
            w.faults["lease_expired"] += 1
            w.trace.event(w.step, w.clock.now, "lease_expired", pid=ev["pid"], who=w.trace.name(ev["key"]),
                          pages=sum(c for _, c in ev["frames"]))
        w.check_leases()
        w.clock.after(w.plan.timing.kernel_tick, self.tick)


def _key_of(core: Any, pid: int) -> str | None:
    p = core.procs.get(pid)
    return p.key if p is not None else None
