"""The whole system in one process: kernel, mm and clients stepping on one simulated clock.

``World(seed, ...)`` boots the real kernel service (with a planted bug's
subclass when asked), the mm node and the clients the seed's plan names,
then ``run()`` processes one event per step (a message delivered, an mm
effect, a client's next request, a timeout, a tick), applies the faults the
plan puts at that step, and checks the invariants after it (the state
checks: the exact incremental check of what the step changed, and the full
recomputation every ``check_every`` steps; ``simulator/checks.py`` says
what runs when). The first violation stops the run; ``World.result()`` says
what happened.

Quiet points: every ``plan.quiesce_every`` steps (and at the end) the
clients stop starting requests until nothing is in flight, the mm is idle
with no pending intent and has read every kernel event; then I8 (both views
agree), the clients both sides know, and every allocation the mm confirmed to
a client are checked. A system that never gets quiet is a violation too.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any

from simulator import checks, lies, mutants
from simulator.client_node import ClientNode
from simulator.clock import Clock
from simulator.faults import WORKLOADS, Plan, child, make_plan
from simulator.kernel_node import KernelNode
from simulator.mm_node import MMNode
from simulator.net import Msg, Net
from simulator.trace import Trace
from kernel_server.arch import get_profile
from kernel_server.bootmap import pc_map
from kernel_server.service import KernelService
from protocol import wire

QUIET_LIMIT = 3_000_000  # simulated microseconds a quiet point may take before it is a liveness violation
FINAL_STEPS = 50_000  # extra steps allowed to reach the final quiet point


def key_of(name: str) -> str:
    """A 40-character identity (the length of a Z85 CURVE key) that reads as its name."""
    return name.ljust(40, ".")


@dataclass
class Violation:
    invariant: str
    message: str
    step: int
    t: int  # simulated microseconds


@dataclass
class SimResult:
    seed: int
    steps: int
    calls: int
    faults: Counter
    stats: Counter  # (target, call, outcome) -> count
    violation: Violation | None
    tail: list[str]
    plan: dict[str, Any]
    quiet_points: int
    sim_seconds: float
    wall_seconds: float
    bug: str | None = None

    @property
    def ok(self) -> bool:
        return self.violation is None


class World:
    def __init__(self, seed: int, steps: int = 2000, arch: str | None = None, memory: int = 16 << 20,
                 bug: str | None = None, check_every: int = checks.FULL_EVERY, trace: IO[str] | None = None,
                 plan: Plan | None = None, zombies: bool = False, incremental: bool = True) -> None:
        self.seed = seed
        self.steps = steps
        self.bug = bug
        self.check_every = check_every  # full recomputation every N steps (1: after every step; 0: quiet points)
        self.incremental = incremental and check_every != 1  # the exact incremental check between full ones
        self.checking = True  # the cheap per-call checks (I6 fingerprints) always run
        self.plan = plan or make_plan(seed, steps, arch, memory, zombies)
        self.rng = child(seed, "world")
        self.lie_rng = child(seed, "lies")
        self.clock = Clock()
        self.step = 0
        self.calls = 0
        self.faults: Counter = Counter()
        self.stats: Counter = Counter()
        self.violations: list[Violation] = []
        self.kernel_dirty = True  # changed since the last state check (full or incremental)
        self.view_dirty = True
        self.kernel_partial = False  # changed since the last full check (checked incrementally only)
        self.view_partial = False
        self.ktrack: checks.KernelTracker | None = None
        self.vtrack: checks.ViewTracker | None = checks.ViewTracker() if self.incremental else None
        self.quiescing = False
        self.death_armed = False
        self.quiesce_since = 0
        self.quiet_points = 0
        self.dead_touch: dict[str, int] = {}  # identity of a dead client -> last time it could renew a lease
        self.promised: dict[tuple[str, int], tuple[int, int]] = {}  # (identity, vaddr) -> (pages, pid)
        self.next_lie_id = lies.LIE_ID_BASE
        self.names: dict[str, str] = {}
        self.trace = Trace(self.names, trace)
        self.trace.header(**self.plan.describe(), steps=steps, bug=bug)
        self.the_bug = the_bug = mutants.get(bug)
        p = self.plan
        if not p.zombies and not (p.timing.mm_timeout > p.net.max_delay
                                  and p.timing.mm_restart[0] > p.net.max_delay):
            raise ValueError("the timing breaks the transport assumption (see simulator/net.py)")
        mm_key = key_of("mm")
        self.names[mm_key] = "mm"
        self.outsider = key_of("outsider")
        self.names[self.outsider] = "outsider"
        profile = get_profile(p.arch)
        core = the_bug.kernel_core(profile, pc_map(profile, p.memory, p.pool), mm_key)
        svc = KernelService(core, lease_seconds=p.timing.lease / 1e6, boot_id="sim")
        if the_bug.kernel_replay is not None:
            svc.replay = the_bug.kernel_replay()
        if self.incremental:
            self.ktrack = checks.KernelTracker(core)
            self.ktrack_synced = False  # its copies are of a state no full check has passed yet
        self.kernel = KernelNode(self, svc)
        self.kernel_did: set[int] = set()  # request ids of the mm's map/unmap calls the kernel carried out
        self._watch_kernel_effects(svc, mm_key)
        self.net = Net(self.clock, child(seed, "net"), p.net, self._net_fault)
        hello = svc.call(mm_key, "hello")
        amap = svc.call(mm_key, "address_map")
        self.boot_info = (hello, amap)
        block = (min(hello["large_page_sizes"]) // 4096) if hello["large_page_sizes"] else 1
        self.quota = max(2 * block, core.frames.counts()["user_free"] // 3)
        self.mm = MMNode(self, mm_key, the_bug.journal())
        self.mm.boot()
        self.clients: dict[int, ClientNode] = {}
        for workload in p.workloads:
            self.spawn(workload)
        self.clock.after(p.timing.kernel_tick, "kernel_tick")

    def _watch_kernel_effects(self, svc: KernelService, mm_key: str) -> None:
        """Record which of the mm's map/unmap requests the kernel carried out (for the mm node's I12
        check across mm crashes: a request whose kernel work was done must not run again)."""
        execute = svc._execute

        def _execute(identity: str, req_id: int, call: str, args: dict, now: float) -> bytes:
            reply = execute(identity, req_id, call, args, now)
            if identity == mm_key and call in ("map", "unmap") and wire.decode(reply).get("ok") is True:
                self.kernel_did.add(req_id)
            return reply

        svc._execute = _execute  # type: ignore[method-assign]

    # ---- bookkeeping used by the nodes -----------------------------------------------------

    def flag(self, invariant: str, message: str) -> None:
        self.violations.append(Violation(invariant, message, self.step, self.clock.now))
        self.trace.event(self.step, self.clock.now, "violation", invariant=invariant, message=message)

    def count(self, target: str, call: str, outcome: str) -> None:
        self.stats[(target, call, outcome)] += 1

    def touched(self, key: str) -> None:
        if key in self.dead_touch:
            self.dead_touch[key] = self.clock.now

    def lie_id(self) -> int:
        self.next_lie_id += 1
        return self.next_lie_id

    def promise(self, identity: str, call: str, result: dict[str, Any]) -> None:
        """Remember what an ok reply told a client it has (checked at quiet points)."""
        view = self.mm.core.view  # type: ignore[union-attr]
        if call == "free":
            self.promised.pop((identity, result.get("vaddr")), None)
            return
        if "vaddr" not in result or "pages" not in result:
            return
        who = result.get("peer", identity) if call == "share" else identity
        c = view.clients.get(who)
        if c is not None:
            self.promised[(who, result["vaddr"])] = (result["pages"], c.pid)

    def _net_fault(self, kind: str, msg: Msg) -> None:
        self.faults[kind] += 1
        if self.trace.sink is not None:
            self.trace.event(self.step, self.clock.now, kind, to=msg.dst[0], who=self.trace.name(msg.identity),
                             reply=msg.reply)

    # ---- clients ----------------------------------------------------------------------------

    def spawn(self, workload: str) -> ClientNode:
        idx = len(self.clients)
        name = f"c{idx}"
        identity = key_of(name)
        peer = key_of(f"{name}-peer") if workload == "sharer" else ""
        self.names[identity] = name
        if peer:
            self.names[peer] = f"{name}-peer"
        c = ClientNode(self, idx, workload, identity, peer)
        self.clients[idx] = c
        t = self.plan.timing
        self.clock.after(self.rng.randint(*t.think), "think", idx)
        self.clock.after(self.rng.randint(1, t.keepalive), "keepalive", idx)
        if self.step:
            self.trace.event(self.step, self.clock.now, "client_start", who=name, workload=workload)
        return c

    def client_of(self, identity: str) -> ClientNode | None:
        for c in self.clients.values():
            if identity in c.identities:
                return c
        return None

    def kill(self, c: ClientNode) -> None:
        self.faults["client_death"] += 1
        c.alive = False
        for identity in c.identities:
            self.dead_touch[identity] = self.clock.now
        self.trace.event(self.step, self.clock.now, "client_death", who=self.trace.name(c.identity),
                         workload=c.workload, waiting=c.waiting is not None)
        self.clock.after(self.rng.randint(*self.plan.timing.respawn), "spawn", c.workload)

    # ---- faults ---------------------------------------------------------------------------------

    def apply_fault(self, kind: str) -> None:
        if kind == "client_death":
            live = [c for c in self.clients.values() if c.alive]
            if live and self.rng.random() < 0.3:
                self.death_armed = True  # the client of the request the mm is on dies when the kernel answers
            elif live:
                self.kill(live[self.rng.randrange(len(live))])
        elif kind == "mm_crash":
            if self.mm.alive:
                where = self.rng.choice(("now", "kernel_reply", "client_reply"))
                if where == "now":
                    self.mm._crash_in_job("at a step")
                else:
                    self.mm.crash_armed = where  # at that boundary of whatever the mm does next
        elif kind == "mm_crash_startup":
            if self.mm.alive:
                self.mm.crash_armed = "kernel_reply"
        elif kind == "lie_client":
            self.faults[kind] += 1
            lies.lie_client(self)
        elif kind == "lie_mm":
            self.faults[kind] += 1
            lies.lie_mm(self)
        elif kind == "partition":
            self.faults[kind] += 1
            length = self.rng.randint(*self.plan.timing.partition)
            self.net.partition(self.clock.now + length)
            self.trace.event(self.step, self.clock.now, "partition", ms=length / 1000)

    def check_leases(self) -> None:
        """I11: a dead client's processes are gone within lease + tick of the last thing that renewed them."""
        t = self.plan.timing
        now = self.clock.now
        by_key = self.kernel.core.by_key
        for identity, last in self.dead_touch.items():
            if now - last > t.lease + t.kernel_tick and identity in by_key:
                self.flag("I11", f"{self.trace.name(identity)} died (last call {last / 1000:.3f}ms) but its process "
                                 f"{by_key[identity]} still exists at {now / 1000:.3f}ms (lease {t.lease / 1000:g}ms)")

    def check_state(self, full: bool = True) -> None:
        """The state checks of each view that changed since its last check: the full recomputation
        (``full``), or the exact incremental check of what changed (``checks.KernelTracker`` /
        ``ViewTracker``; a full recomputation instead when the tracker has no sound copy to start from).
        What runs when is documented in ``simulator/checks.py``."""
        kt = self.ktrack
        if (self.kernel_dirty or (full and self.kernel_partial)) and (full or kt is not None):
            self.kernel_dirty = False
            core = self.kernel.core
            if full or not self.ktrack_synced:
                problems = checks.kernel(core)
                self.kernel_partial = False
                if kt is not None:
                    kt.reset()
                    self.ktrack_synced = not problems
            else:
                problems = kt.check()  # type: ignore[union-attr]
                self.kernel_partial = True
                if problems:  # the full recomputation names what is wrong
                    problems = checks.kernel(core) or [f"{p} (found by the incremental check)" for p in problems]
            for v in problems:
                self.flag(v.split(":", 1)[0].split(" ")[0], "kernel: " + v)
        vt = self.vtrack
        mm = self.mm
        if ((self.view_dirty or (full and self.view_partial)) and (full or vt is not None) and mm.alive
                and mm.core is not None):
            self.view_dirty = False
            v = mm.core.view
            if full or vt is None or vt.view is not v:
                problems = checks.view(v)
                self.view_partial = False
                if vt is not None:
                    vt.reset(v)
                    if problems:
                        vt.view = None
            else:
                problems = vt.check()
                self.view_partial = True
                if problems:
                    problems = checks.view(v) or [f"{p} (found by the incremental check)" for p in problems]
            for p in problems:
                self.flag(p.split(" ", 1)[0].rstrip(":"), p)

    def quiet(self) -> bool:
        mm = self.mm
        if self.net.in_flight or not mm.idle() or mm.lost:  # lost: it owes the kernel a reconciliation
            return False
        view = mm.core.view  # type: ignore[union-attr]
        return not view.pending and view.event_seq == self.kernel.core.event_seq

    def quiet_checks(self) -> None:
        self.quiet_points += 1
        view = self.mm.core.view  # type: ignore[union-attr]
        core = self.kernel.core
        self.kernel_dirty = self.view_dirty = True
        self.check_state()  # a quiet point checks everything, whatever --check-every says
        for v in checks.agreement(view, core):
            self.flag("I8", v)
        for key, c in view.clients.items():
            pid = core.by_key.get(key)
            if pid != c.pid:
                dead = " (a dead client: I11, nothing may be left of it)" if key in self.dead_touch else ""
                self.flag("I11" if dead else "I8",
                          f"the mm has {self.trace.name(key)} as pid {c.pid}, the kernel "
                          f"{'has no process for it' if pid is None else f'has pid {pid}'}{dead}")
        for (identity, vaddr), (pages, pid) in list(self.promised.items()):
            if core.by_key.get(identity) != pid:
                del self.promised[(identity, vaddr)]  # that process is gone: so is the promise
                continue
            c = view.clients.get(identity)
            m = c.maps.get(vaddr) if c is not None and c.pid == pid else None
            if m is None or m.pages != pages:
                self.flag("I8", f"the mm confirmed {pages} page(s) at {vaddr:#x} to {self.trace.name(identity)} "
                                f"(pid {pid}) but its view has {'no such allocation' if m is None else f'{m.pages} pages'}"
                                " (a confirmed reply was not durable)")
        if self.trace.sink is not None:
            c = core.frames.counts()
            self.trace.event(self.step, self.clock.now, "quiet", kernel_free=c["kernel_free"],
                             user_mapped=c["user_mapped"], clients=len(view.clients))

    def _start_quiesce(self) -> None:
        self.quiescing = True
        self.quiesce_since = self.clock.now
        if self.mm.alive:
            self.mm.tick_due = True
            self.mm.kick()

    def _end_quiesce(self) -> None:
        self.quiescing = False
        for c in self.clients.values():
            c.resume()

    # ---- the loop -----------------------------------------------------------------------------------

    def dispatch(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "deliver":
            msg: Msg = ev[1]
            self.net.delivered()
            dst = msg.dst[0]
            if dst == "kernel":
                self.kernel.deliver(msg)
            elif dst == "mm":
                if msg.reply:
                    self.mm.deliver_reply(msg)
                else:
                    self.mm.deliver_request(msg)
            else:
                self.clients[msg.dst[1]].deliver_reply(msg)
        elif kind == "mm_step":
            self.mm.step(ev[1])
        elif kind == "think":
            self.clients[ev[1]].think()
        elif kind == "client_timeout":
            self.clients[ev[1]].timeout(ev[2], ev[3])
        elif kind == "mm_timeout":
            self.mm.timeout(ev[1], ev[2], ev[3])
        elif kind == "keepalive":
            self.clients[ev[1]].keepalive()
        elif kind == "kernel_tick":
            self.kernel.tick()
        elif kind == "mm_tick":
            self.mm.tick(ev[1])
        elif kind == "mm_restart":
            if ev[1] == self.mm.inc and not self.mm.alive:
                self.mm.boot()
        elif kind == "spawn":
            workload = ev[1] if self.rng.random() < 0.5 else WORKLOADS[self.rng.randrange(len(WORKLOADS))]
            self.spawn(workload)
        else:  # pragma: no cover - a bug in the simulator itself
            raise ValueError(f"unknown event {ev!r}")

    def one_step(self) -> None:
        self.step += 1
        for kind in self.plan.faults.get(self.step, ()):
            self.apply_fault(kind)
        self.dispatch(self.clock.pop())
        if self.kernel_dirty or self.view_dirty or self.kernel_partial or self.view_partial:
            every = self.check_every
            full = every != 0 and self.step % every == 0
            if self.incremental or full:
                self.check_state(full)
        if self.quiescing:
            if self.quiet():
                self.quiet_checks()
                self._end_quiesce()
            elif self.clock.now - self.quiesce_since > QUIET_LIMIT:
                self.flag("I10", f"the system did not get quiet within {QUIET_LIMIT / 1e6:g}s of simulated time "
                                 f"(in flight {self.net.in_flight}, mm alive {self.mm.alive}, "
                                 f"idle {self.mm.idle()})")
        elif self.step % self.plan.quiesce_every == 0:
            self._start_quiesce()

    def run(self) -> SimResult:
        start = time.perf_counter()
        while self.step < self.steps and not self.violations:
            self.one_step()
        if not self.violations:
            self.finish()
        return self.result(time.perf_counter() - start)

    def finish(self) -> None:
        """The final quiet point and a full check of everything."""
        if not self.quiescing:
            self._start_quiesce()
        limit = self.step + FINAL_STEPS
        while self.quiescing and not self.violations and self.step < limit:
            self.one_step()
        if self.violations:
            return
        if self.quiescing:
            self.flag("I10", f"the system did not get quiet within {FINAL_STEPS} steps after the run")
            return
        self.kernel_dirty = self.view_dirty = True
        self.check_state()

    def result(self, wall: float) -> SimResult:
        v = self.violations[0] if self.violations else None
        return SimResult(seed=self.seed, steps=self.step, calls=self.calls, faults=self.faults, stats=self.stats,
                         violation=v, tail=self.trace.tail(), plan=self.plan.describe(),
                         quiet_points=self.quiet_points, sim_seconds=self.clock.now / 1e6, wall_seconds=wall,
                         bug=self.bug)
