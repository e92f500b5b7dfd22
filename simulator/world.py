"""The whole system in one process: kernel, mm and clients stepping on one simulated clock.

``World(seed, ...)`` boots the real kernel service (with a planted bug's
subclass when asked), the mm node (the real driver, ``mm_node``) and the
clients the seed's plan names, then ``run()`` processes one event per step (a
message delivered, an mm wake-up or journal commit, a client's next request,
a timeout, a tick), applies the faults the plan puts at that step, and
checks the invariants after it (the state checks: the exact incremental check
of what the step changed, and the full recomputation every ``check_every``
steps; ``simulator/checks.py`` says what runs when). The first violation
stops the run; ``World.result()`` says what happened.

Checks that need history, kept here:

- the mm's settlements: every intent the mm settles as done (``Done``) must
  be one whose map or unmap the kernel carried out, and every one it settles
  as undone (``Undo``) one the kernel did not (I8: the judge knows, from the
  kernel's observer, which of the mm's requests the kernel executed);
- I12 at the mm: a request takes effect at most once (the kernel carries out
  a map or unmap for at most one of its intents, at most one offer of it is
  journaled), and a request answered ok is never executed again (its resend
  gets that answer); a request may run again when its earlier runs had no
  effect, or, while the kernel is lost, fail fast again (recovery then
  settles what the first run did and the resend gets that);
- write-ahead (``wal_check``): the mm sends a map or unmap only for an intent
  that is durable, and an ok answer to a request only once its outcome is
  (or, for an intent recovery settled from what the kernel maps, once it is
  settled: the mm may answer a resend from a recovery that then failed
  before journaling; a crash then re-derives the same outcome from the
  kernel, so nothing confirmed is lost; counted as
  ``reply_settled_not_durable``);
- I11: a dead client's processes are gone within lease + tick.

Quiet points: every ``plan.quiesce_every`` steps (once the mm is up and not
cut off from the kernel) the clients stop starting requests until nothing is
in flight, the mm is serving and idle with no pending intent and has read
every kernel event; then everything is checked in full, I8 exactly (every frame's owner, every page of every process), the mm's
own audit (I8 and its I13 part), and every allocation the mm confirmed to a
client. A system that never gets quiet is a violation too.

Liveness: after ``steps`` steps every fault stops (the network heals, no
crash, death, partition or lie is started any more), the clients resend until
answered and start nothing new; within ``LIVENESS_STEPS`` steps every pending
request must be answered, no intent may stay pending, and the quiet point's
checks must pass.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

from simulator import checks, lies, mutants
from simulator.client_node import ClientNode
from simulator.clock import Clock
from simulator.faults import WORKLOADS, Plan, child, make_plan
from simulator.kernel_node import KernelNode
from simulator.mm_node import MMNode, admission_of
from simulator.net import Msg, Net
from simulator.trace import Trace
from kernel_server.arch import get_profile
from kernel_server.bootmap import pc_map
from mm_service import records as J
from mm_service.policy import drive
from protocol import wire
from protocol.errors import Error

QUIET_LIMIT = 3_000_000  # simulated microseconds a quiet point may take before it is a liveness violation
LIVENESS_STEPS = 5_000  # steps after healing within which everything must be answered and settled
# (healthy seeds take under 1,100)


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
    ops: int  # client operations answered (keepalives, lies and the mm's own kernel calls not counted)
    faults: Counter
    stats: Counter  # (target, call, outcome) -> count
    violation: Violation | None
    tail: list[str]
    plan: dict[str, Any]
    quiet_points: int
    sim_seconds: float
    wall_seconds: float
    cpu_seconds: float = 0.0
    bug: str | None = None
    liveness_steps: int | None = None  # steps the healed system took to answer and settle everything
    trace_hash: str | None = None
    replays: list[str] = field(default_factory=list)  # trace hashes of the replays of a failing seed

    @property
    def ok(self) -> bool:
        return self.violation is None


class World:
    def __init__(self, seed: int, steps: int = 2000, arch: str | None = None, memory: int = 16 << 20,
                 bug: str | None = None, check_every: int = checks.FULL_EVERY, trace: IO[str] | None = None,
                 plan: Plan | None = None, zombies: bool = False, incremental: bool = True, mode: str = "swarm",
                 wal_check: bool = True, recorder: Any = None, record_every: int = 0, script: Any = None) -> None:
        self.seed = seed
        self.steps = steps
        self.bug = bug
        self.check_every = check_every  # full recomputation every N steps (1: after every step; 0: quiet points)
        self.incremental = incremental and check_every != 1  # the exact incremental check between full ones
        self.wal_check = wal_check
        self.plan = plan or make_plan(seed, steps, arch, memory, zombies, mode)
        self.faults_at = self.plan.faults  # step -> the faults planned then
        self.rng = child(seed, "world")
        self.lie_rng = child(seed, "lies")
        self.clock = Clock()
        self.step = 0
        self.client_ops = 0
        self.calls = 0  # forged requests handled (``lies``)
        self.faults: Counter = Counter()
        self.stats: Counter = Counter()
        self.violations: list[Violation] = []
        self.probes: Counter = Counter()  # coverage probes the cores hit (``simulator.probes``)
        self.script = script  # the clients' operations, recorded or scripted (``simulator.shrink``)
        self.kernel_dirty = True  # changed since the last state check (full or incremental)
        self.view_dirty = True
        self.kernel_partial = False  # changed since the last full check (checked incrementally only)
        self.view_partial = False
        self.ktrack: checks.KernelTracker | None = None
        self.ktrack_synced = False
        self.vtrack: checks.ViewTracker | None = checks.ViewTracker() if self.incremental else None
        self.quiescing = False
        self.quiesce_since = 0
        self.next_quiet = self.plan.quiesce_every  # the step from which the next quiet point may begin
        self.quiet_points = 0
        self.healed = False
        self.liveness_steps: int | None = None
        self.auditing = False
        self.death_armed = False
        self.partition_after_exec = ""  # a partition starts when the kernel next carries out this call of the mm
        self.dead_touch: dict[str, int] = {}  # identity of a dead client -> last time it could renew a lease
        self.next_lie_id = lies.LIE_ID_BASE
        self.names: dict[str, str] = {}
        self.recorder = recorder
        self.record_every = record_every
        self.rec_lines: list[str] = []
        self.trace = Trace(self.names, trace, listener=self.rec_lines.append if recorder is not None else None)
        self.trace.header(**self.plan.describe(), steps=steps, bug=bug)
        self.the_bug = the_bug = mutants.get(bug)
        p = self.plan
        if not p.zombies and not (p.timing.mm_timeout > p.net.max_delay and p.timing.mm_restart[0] > p.net.max_delay):
            raise ValueError("the timing breaks the transport assumption (see simulator/net.py)")
        # the judge of the mm's settlements, I12 at the mm, write-ahead (see the module docstring)
        self.intents: dict[int, dict[str, Any]] = {}  # intent number -> {"rec", "executed", "durable"}
        self.kid_intent: dict[int, int] = {}  # the mm's kernel request id -> the intent it carries out
        self.req_effect: dict[tuple[str, int], str] = {}  # requests whose kernel work or offer took effect -> which
        self.req_runs: dict[tuple[str, int], int] = {}  # requests the mm executed -> how many times
        self.req_done: set[tuple[str, int]] = set()  # requests whose outcome is durable
        self.req_intent: dict[int, tuple[str, int]] = {}  # durable intent -> the request it serves
        self.req_settled: set[tuple[str, int]] = set()  # requests whose intent recovery settled from the kernel
        self.answered_ok: set[tuple[str, int]] = set()
        self.mm_key = key_of("mm")
        self.operator = key_of("operator")
        self.outsider = key_of("outsider")  # a key nobody admitted
        self.stranger = key_of("stranger")  # an admitted key that never gets a process (it only lies)
        self.names.update({self.mm_key: "mm", self.operator: "operator", self.outsider: "outsider",
                           self.stranger: "stranger"})
        self.admitted: set[str] = {self.stranger}
        self.admission = admission_of(self)
        profile = get_profile(p.arch)
        core = the_bug.kernel_core(profile, pc_map(profile, p.memory, p.pool), self.mm_key, self.operator)
        self.kernel = KernelNode(self)
        svc = the_bug.kernel_service(core, lease_seconds=p.timing.lease / 1e6, boot_id="sim", observer=self.kernel)
        self.kernel.attach(svc)
        if self.incremental:
            self.ktrack = checks.KernelTracker(core)
        self.net = Net(self.clock, child(seed, "net"), p.net, self._net_fault, self.deliver)
        self.kernel.reading = True
        try:
            self.boot_info = (svc.call(self.mm_key, "hello"), svc.call(self.mm_key, "address_map"))
        finally:
            self.kernel.reading = False
        self.mm = MMNode(self, self.mm_key, self.operator, the_bug.driver)
        self.mm.boot()
        self.clients: dict[int, ClientNode] = {}
        for workload in p.workloads:
            self.spawn(workload)
        self.clock.after(p.timing.kernel_tick, self.kernel.tick)

    # ---- bookkeeping used by the nodes -----------------------------------------------------

    def flag(self, invariant: str, message: str) -> None:
        self.violations.append(Violation(invariant, message, self.step, self.clock.now))
        self.trace.event(self.step, self.clock.now, "violation", invariant=invariant, message=message)

    def count(self, target: str, call: str, outcome: str) -> None:
        self.stats[(target, call, outcome)] += 1

    def touched(self, key: str | None) -> None:
        if key in self.dead_touch:
            self.dead_touch[key] = self.clock.now  # type: ignore[index]

    def lie_id(self) -> int:
        self.next_lie_id += 1
        return self.next_lie_id

    def _net_fault(self, kind: str, msg: Msg) -> None:
        self.faults[kind] += 1
        if kind == "reply_lost" or (kind == "partitioned" and msg.reply):
            self.faults[f"reply_lost:{msg.call}"] += 1
        if self.trace.sink is not None:
            self.trace.event(self.step, self.clock.now, kind, to=msg.dst[0], who=self.trace.name(msg.identity),
                             call=msg.call, reply=msg.reply)

    # ---- the judge of the mm (see the module docstring) --------------------------------------------

    def mm_sends(self, kid: int, call: str, args: dict[str, Any]) -> None:
        """The mm sends kernel request ``kid``: a map or unmap is matched with the pending intent it
        carries out (that process, that address)."""
        if call not in ("map", "unmap"):
            return
        d = self.mm.driver
        if d is None or d.core is None:
            return
        view = d.core.view
        for p in view.pending.values():
            if p.do == call and p.vaddr == args.get("vaddr"):
                c = view.clients.get(p.key)
                if c is not None and c.pid == args.get("pid"):
                    break
        else:
            return  # (recovery unmapping what an intent left in a state it did not ask for)
        self.kid_intent[kid] = p.n
        t = self.intents.get(p.n)
        if self.wal_check and (t is None or not t["durable"]):
            self.flag("I8", f"the mm sent its {call} for intent {p.n} ({self.trace.name(p.key)}, {p.pages} page(s) "
                            f"at {p.vaddr:#x}) before the intent was durable (a crash now would forget it)")
        if self.death_armed and p.caller is not None:
            c = self.client_of(p.caller)
            if c is not None and c.alive:
                self.death_armed = False  # the client dies while the mm works on its request
                self.kill(c)

    def kernel_changed_for_mm(self, call: str, shared: bool = False) -> None:
        """The kernel carried out a call of the mm that changes something (its reply is not sent yet);
        ``shared``: a map or unmap of frames mapped more than once."""
        if self.partition_after_exec in (call, f"{call}_shared" if shared else call):
            self.partition_after_exec = ""
            self.start_partition(f"just after the kernel carried out the mm's {call}")

    def kernel_executed(self, kid: int) -> None:
        """The kernel carried out the mm's map or unmap request ``kid``."""
        n = self.kid_intent.get(kid)
        t = self.intents.get(n) if n is not None else None
        if t is None:
            return
        t["executed"] = kid
        rec = t["rec"]
        if rec.caller is not None:
            self._took_effect((rec.caller, rec.rid), f"intent {rec.n}")

    def _took_effect(self, req: tuple[str, int], what: str) -> None:
        first = self.req_effect.setdefault(req, what)
        if first != what:
            self.flag("I12", f"request #{req[1]} of {self.trace.name(req[0])} took effect twice: {first} and then "
                             f"{what} (a resend ran it again instead of getting the first run's answer)")

    def mm_applied(self, rec: Any, driver: Any) -> None:
        kind = type(rec)
        if kind is J.Intent:
            self.intents[rec.n] = {"rec": rec, "executed": 0, "durable": False}
        elif kind is J.Done or kind is J.Undo:
            t = self.intents.pop(rec.n, None)
            if t is None:
                return
            task = driver.house_task if driver is not None else None
            p = t["rec"]
            if task is not None and task.name in ("recover", "tick"):
                self.faults[f"settled_by_recovery:{'done' if kind is J.Done else 'undo'}"] += 1
                if p.caller is not None:
                    self.req_settled.add((p.caller, p.rid))
            if kind is J.Done and not t["executed"]:
                self.flag("I8", f"the mm settled {self._intent_words(p)} as done, but the kernel never carried "
                                f"out its {p.do}")
            elif kind is J.Undo and t["executed"]:
                self.flag("I8", f"the mm settled {self._intent_words(p)} as undone, but the kernel carried out its "
                                f"{p.do} (kernel request #{t['executed']})")

    def _intent_words(self, p: J.Intent) -> str:
        return (f"intent {p.n} ({p.do} of {p.pages} page(s) at {p.vaddr:#x} for {self.trace.name(p.key)}"
                f"{f', request #{p.rid} of {self.trace.name(p.caller)}' if p.caller else ''})")

    def durable(self, records: list[Any]) -> None:
        """A journal batch is committed: what it makes durable."""
        for rec in records:
            kind = type(rec)
            if kind is J.Intent:
                self._durable_intent(rec)
            elif kind is J.Done:
                req = self.req_intent.get(rec.n)
                if req is not None:
                    self.req_done.add(req)
            elif kind is J.Offered:
                if rec.caller is not None:
                    self.req_done.add((rec.caller, rec.rid))
                    self._took_effect((rec.caller, rec.rid), f"offer {rec.offer}")
            elif kind is J.Reply:
                self.req_done.add((rec.key, rec.rid))
            elif kind is J.Snapshot:  # the whole view: its pending intents and the replies it keeps
                for item in rec.body["pending"]:
                    self._durable_intent(J.decode(item))
                for key, rid, _digest, _reply in rec.body["replies"]:
                    self.req_done.add((key, rid))

    def _durable_intent(self, rec: J.Intent) -> None:
        t = self.intents.get(rec.n)
        if t is not None:
            t["durable"] = True
        if rec.caller is not None:
            self.req_intent[rec.n] = (rec.caller, rec.rid)

    def mm_crashed(self) -> None:
        """What the mm applied but never made durable is forgotten (its numbers may be used again)."""
        for n in [n for n, t in self.intents.items() if not t["durable"]]:
            del self.intents[n]

    def mm_executes(self, identity: str, rid: int) -> None:
        """I12 at the mm: a request answered ok is not executed again (see the module docstring)."""
        key = (identity, rid)
        runs = self.req_runs.get(key, 0)
        if runs:
            if key in self.answered_ok:
                self.flag("I12", f"the mm executed request #{rid} of {self.trace.name(identity)} again, though it "
                                 "had answered it ok (the resend must get that answer)")
            else:  # its earlier runs had no effect, or it fails fast again while the kernel is lost
                self.faults["mm_rerun_after_effect" if key in self.req_effect else "mm_rerun_no_effect"] += 1
        self.req_runs[key] = runs + 1

    def replied_ok(self, identity: str, rid: int, call: str) -> None:
        """The mm sends an ok answer to a request that changes state: its outcome must be durable."""
        key = (identity, rid)
        self.answered_ok.add(key)
        if key in self.req_done:
            return
        if key in self.req_settled:
            self.faults["reply_settled_not_durable"] += 1
        elif self.wal_check:
            self.flag("I8", f"the mm answered {call}#{rid} of {self.trace.name(identity)} ok before its outcome "
                            "was durable (a crash now would lose what it confirmed)")

    # ---- clients ----------------------------------------------------------------------------

    def spawn(self, workload: str) -> ClientNode:
        idx = len(self.clients)
        if self.script is not None:
            workload = self.script.workload(idx, workload)
        name = f"c{idx}"
        identity = key_of(name)
        peer = key_of(f"{name}-peer") if workload == "sharer" else ""
        self.names[identity] = name
        self.admitted.add(identity)
        if peer:
            self.names[peer] = f"{name}-peer"
            self.admitted.add(peer)
        c = ClientNode(self, idx, workload, identity, peer)
        if self.script is not None:
            self.script.started(c)  # its requests are recorded, or come from the script
        self.clients[idx] = c
        t = self.plan.timing
        self.clock.after(self.rng.randint(*t.think), c.think)
        self.clock.after(self.rng.randint(1, t.keepalive), c.keepalive)
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
        self.clock.after(self.rng.randint(*self.plan.timing.respawn), self.respawn, c.workload)

    # ---- faults ---------------------------------------------------------------------------------

    def apply_fault(self, kind: str, variant: str = "") -> None:
        if kind == "client_death":
            live = [c for c in self.clients.values() if c.alive]
            if variant == "in_request":
                self.death_armed = True  # the client of the next map/unmap the mm sends dies then
            elif live:
                self.kill(live[self.rng.randrange(len(live))])
        elif kind == "mm_crash":
            self.mm.arm(variant or "step")
        elif kind == "recovery_crash":
            self.mm.arm("recovery")
        elif kind == "partition":
            self.start_partition("at a step")
        elif kind in ("lost_after_exec", "lost_after_shared"):
            self.partition_after_exec = variant
        elif kind == "recovery_loss":
            self.mm.partition_armed = True
        elif kind == "lie_client":
            self.faults[kind] += 1
            lies.lie_client(self)
        elif kind == "lie_mm":
            self.faults[kind] += 1
            lies.lie_mm(self)

    def start_partition(self, why: str) -> None:
        self.faults["partition"] += 1
        length = self.rng.randint(*self.plan.timing.partition)
        self.net.partition(self.clock.now + length)
        self.trace.event(self.step, self.clock.now, "partition", ms=length / 1000, why=why)

    def heal(self) -> None:
        """No more faults: the network heals, nothing more is armed, the clients resend until answered."""
        self.healed = True
        self.net.heal()
        self.mm.armed = None
        self.mm.partition_armed = False
        self.partition_after_exec = ""
        self.death_armed = False
        waiting = sum(1 for c in self.clients.values() if c.alive and c.waiting is not None)
        self.trace.event(self.step, self.clock.now, "heal", waiting=waiting, mm_alive=self.mm.alive)

    def check_leases(self) -> None:
        """I11: a dead client's processes are gone within lease + tick of the last thing that renewed them."""
        t = self.plan.timing
        now = self.clock.now
        by_key = self.kernel.core.by_key
        for identity, last in self.dead_touch.items():
            if now - last > t.lease + t.kernel_tick and identity in by_key:
                self.flag("I11", f"{self.trace.name(identity)} died (last call {last / 1000:.3f}ms) but its process "
                                 f"{by_key[identity]} still exists at {now / 1000:.3f}ms (lease {t.lease / 1000:g}ms)")

    # ---- state checks -------------------------------------------------------------------------------

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
                counts: dict = {}
                problems = checks.kernel(core, counts)
                self.kernel_partial = False
                if kt is not None:
                    kt.reset(counts)
                    self.ktrack_synced = not problems
            else:
                problems = kt.check()  # type: ignore[union-attr]
                self.kernel_partial = True
                if problems:  # the full recomputation names what is wrong
                    problems = checks.kernel(core) or [f"{p} (found by the incremental check)" for p in problems]
            for v in problems:
                self.flag(v.split(":", 1)[0].split(" ")[0].split("/")[0], "kernel: " + v)
        vt = self.vtrack
        core = self.mm.core
        if ((self.view_dirty or (full and self.view_partial)) and (full or vt is not None) and self.mm.alive
                and core is not None):
            self.view_dirty = False
            v = core.view
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

    # ---- quiet points ---------------------------------------------------------------------------------

    def quiet(self) -> bool:
        mm = self.mm
        if self.net.in_flight or not mm.quiet():
            return False
        view = mm.core.view  # type: ignore[union-attr]
        return not view.pending and view.event_seq == self.kernel.core.event_seq

    def audit(self) -> Any:
        """The mm's own audit (the operator's request, through the mm's service), run at a quiet point
        against the kernel in-process: its I8 (every frame) and I13 (charges) parts."""
        svc = self.kernel.svc
        service = self.mm.service
        assert svc is not None and service is not None
        now = self.clock.now / 1e6
        self.kernel.reading = self.auditing = True
        wrote: list[Any] = []
        try:
            reply = drive(service.handle(self.operator, wire.request(self.lie_id(), "audit", {})),
                          lambda call, args: svc.call(self.mm_key, call, args, now), wrote.extend)
        finally:
            self.kernel.reading = self.auditing = False
        if wrote:
            self.flag("I8", f"the mm's audit changed its view: {wrote[:3]}")
        r = wire.parse_reply(reply)
        return r.get("result") if r.get("ok") else Error.from_wire(r.get("error"))

    def quiet_checks(self) -> None:
        self.quiet_points += 1
        view = self.mm.core.view  # type: ignore[union-attr]
        core = self.kernel.core
        self.kernel_dirty = self.view_dirty = True
        self.check_state()  # a quiet point checks everything, whatever --check-every says
        for v in checks.agreement(view, core):
            self.flag("I8", v)
        for v in checks.exact_agreement(view, core, self.trace.name):
            self.flag("I8", v)
        report = self.audit()
        if isinstance(report, Error):
            self.flag("I10", f"the mm's audit failed at a quiet point: {report}")
        else:
            if report["divergences"] or report["pending"]:
                self.flag("I8", f"the mm's audit at a quiet point finds {report['divergences']} divergent frame(s) "
                                f"and {report['pending']} pending intent(s)")
            for problem in report["i13"]["problems"][:3]:
                self.flag("I13", f"the mm's audit at a quiet point: {problem}")
        for c in self.clients.values():
            if not c.alive:
                continue
            for identity, holds in c.holds.items():
                pid = core.by_key.get(identity)
                cl = view.clients.get(identity)
                for vaddr, (pages, ppid) in list(holds.items()):
                    if ppid != pid:
                        del holds[vaddr]  # that process is gone: so is what it held
                        continue
                    m = cl.maps.get(vaddr) if cl is not None and cl.pid == pid else None
                    if m is None or m.pages != pages:
                        self.flag("I8", f"the mm confirmed {pages} page(s) at {vaddr:#x} to "
                                        f"{self.trace.name(identity)} (pid {pid}) but its view has "
                                        f"{'no such allocation' if m is None else f'{m.pages} pages'} (a confirmed "
                                        "answer was not durable, or was undone)")
        if self.trace.sink is not None:
            cnt = core.frames.counts()
            self.trace.event(self.step, self.clock.now, "quiet", kernel_free=cnt["kernel_free"],
                             user_mapped=cnt["user_mapped"], clients=len(view.clients))

    def _may_quiesce(self) -> bool:
        """A quiet point waits while the mm is cut off from the kernel or down (the clients go on meanwhile:
        their requests failing fast while the kernel is lost is what recovery has to settle)."""
        d = self.mm.driver
        return (self.clock.now >= self.net.partition_until and self.mm.alive and d is not None
                and d.watch.lost is None)

    def _start_quiesce(self) -> None:
        self.quiescing = True
        self.quiesce_since = self.clock.now
        self.next_quiet = self.step + self.plan.quiesce_every

    def _end_quiesce(self) -> None:
        self.quiescing = False
        for c in self.clients.values():
            c.resume()

    # ---- the loop -----------------------------------------------------------------------------------

    def deliver(self, msg: Msg) -> None:
        """A message arrives (scheduled by the network)."""
        self.net.in_flight -= 1
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

    def respawn(self, workload: str) -> None:
        """A dead client is replaced (half the time by one of another workload)."""
        self.spawn(workload if self.rng.random() < 0.5 else WORKLOADS[self.rng.randrange(len(WORKLOADS))])

    def one_step(self) -> None:
        step = self.step = self.step + 1
        healed = self.healed
        if not healed:
            todo = self.faults_at.get(step)
            if todo:
                for kind, variant in todo:
                    self.apply_fault(kind, variant)
        fn, args = self.clock.pop()
        fn(*args)
        if self.kernel_dirty or self.view_dirty:
            every = self.check_every
            full = every != 0 and step % every == 0
            if full or self.incremental:
                self.check_state(full)
        elif self.kernel_partial or self.view_partial:
            every = self.check_every
            if every != 0 and step % every == 0:
                self.check_state(True)  # (nothing changed this step: only a full recomputation is due)
        if self.recorder is not None and (self.violations or step % self.record_every == 0):
            self.record()
        if healed:
            return
        if self.quiescing:
            if self.quiet():
                self.quiet_checks()
                self._end_quiesce()
            elif self.clock.now - self.quiesce_since > QUIET_LIMIT:
                self.flag("I10", f"the system did not get quiet within {QUIET_LIMIT / 1e6:g}s of simulated time "
                                 f"({self._busy()})")
        elif step >= self.next_quiet and self._may_quiesce():
            self._start_quiesce()

    def _busy(self) -> str:
        """What keeps the system from being quiet (for a liveness violation's message)."""
        mm = self.mm
        d = mm.driver
        waiting = [f"{self.trace.name(c.waiting[3])}#{c.waiting[0]}" for c in self.clients.values()
                   if c.alive and c.waiting is not None]
        parts = [f"in flight {self.net.in_flight}", f"mm {mm.phase if mm.alive else 'dead'}"]
        if d is not None and d.core is not None:
            parts.append(f"pending intents {sorted(d.core.view.pending)[:6]}")
            parts.append(f"kernel lost: {d.watch.lost}" if d.watch.lost else "kernel reachable")
            if d.house_task is not None:
                parts.append(f"housekeeping {d.house_task.name}")
            parts.append(f"events read {d.core.view.event_seq} of {self.kernel.core.event_seq}")
        if waiting:
            parts.append(f"clients waiting {waiting[:6]}")
        return ", ".join(parts)

    def run(self) -> SimResult:
        start, cpu = time.perf_counter(), time.process_time()
        while self.step < self.steps and not self.violations:
            self.one_step()
        if not self.violations:
            self.liveness()
        if self.recorder is not None:
            self.record(final=True)
        return self.result(time.perf_counter() - start, time.process_time() - cpu)

    def liveness(self) -> None:
        """Heal everything; within ``LIVENESS_STEPS`` steps every pending request is answered, no intent
        stays pending, and the quiet point's checks (I8 exactly, I13, the mm's audit) pass."""
        self.heal()
        self._start_quiesce()
        began = self.step
        limit = self.step + LIVENESS_STEPS
        while not self.violations:
            if self.quiet() and not any(c.alive and c.waiting is not None for c in self.clients.values()):
                self.liveness_steps = self.step - began
                self.quiet_checks()
                return
            if self.step >= limit:
                self.flag("I10", f"liveness: {LIVENESS_STEPS} steps after every fault stopped, the system has not "
                                 f"answered and settled everything ({self._busy()})")
                return
            self.one_step()

    # ---- the view recorder ----------------------------------------------------------------------------

    def record(self, final: bool = False) -> None:
        """A snapshot for the HTML view (``mmsim.view.Recorder``): read through the kernel's calls, not part
        of the run."""
        rec = self.recorder
        v = self.violations[0] if self.violations else None
        if v is not None and getattr(self, "_recorded_violation", False) and not final:
            return
        core = self.mm.core
        self.kernel.reading = True
        try:
            rec.snapshot(f"step {self.step}{' (end)' if final else ''}", self.clock.now / 1e6, self.kernel.svc,
                         mm_view=core.view if core is not None and self.mm.alive else None,
                         mm_stats=core.stats() if core is not None and self.mm.alive else None,
                         events=self.rec_lines[-200:], violation=f"{v.invariant}: {v.message}" if v else None,
                         names=dict(self.names))
        finally:
            self.kernel.reading = False
        self.rec_lines.clear()
        if v is not None:
            self._recorded_violation = True

    def result(self, wall: float, cpu: float = 0.0) -> SimResult:
        v = self.violations[0] if self.violations else None
        return SimResult(seed=self.seed, steps=self.step, ops=self.client_ops, faults=self.faults, stats=self.stats,
                         violation=v, tail=self.trace.tail(), plan=self.plan.describe(),
                         quiet_points=self.quiet_points, sim_seconds=self.clock.now / 1e6, wall_seconds=wall,
                         cpu_seconds=cpu, bug=self.bug, liveness_steps=self.liveness_steps)
