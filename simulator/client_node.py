"""A simulated client process: one of the real workload generators, driven over the simulated network.

The workload (``clients.workloads``: steady, sparse, kobjects, sharer) is the
very generator the real client process runs; this node only does what
``clients.runner`` does with sockets: it sends each ``Req`` as wire bytes
with its identity (or its peer identity, for ``as_peer``), resends the same
bytes after a timeout (Lazy Pirate), gives the workload ``Error(EIO)`` when
the retries run out, pings the kernel to keep its leases, and checks every
answer with the runner's own ``check_reply`` (a wrong answer is a violation).
A dead client sends nothing more; what it already sent is still delivered.

Once the world has healed (the liveness phase) a client resends until it is
answered: every request must then get its answer within a bounded time.

Each answer is one client operation (the simulator's throughput counts
these). What an ok answer tells the client it holds (an allocation, an
accepted offer) is remembered with the process it was made for; quiet
points check the mm still has it (``World.quiet_checks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clients.runner import Bounds, check_reply
from clients.workloads import Req, env_from, make
from simulator.faults import child
from simulator.net import Msg
from protocol import wire
from protocol.errors import Errno, Error

if TYPE_CHECKING:
    from simulator.world import World

LIMITS = {"max_live": 24, "slots": 48, "threads": 8, "endpoints": 48}


class ClientNode:
    def __init__(self, world: World, idx: int, workload: str, identity: str, peer: str) -> None:
        self.world = world
        self.idx = idx
        self.workload = workload
        self.identity = identity
        self.peer = peer
        self.endpoint = ("c", idx)
        hello, amap = world.boot_info
        env = env_from(identity, hello, amap, peer=peer, large=True, limits=LIMITS)
        self.bounds = Bounds(int(hello["frames"]), int(hello["user_top"]), env.large_frames)
        self.gen = make(workload, child(world.seed, f"client/{idx}"), env)
        self.started = False
        self.result: Any = None
        self.req: Req | None = None
        self.waiting: tuple[int, bytes, str, str, int] | None = None  # id, bytes, target, identity, attempt
        self.next_id = 1
        self.alive = True
        self.parked = False
        self.requests = 0
        self.holds: dict[str, dict[int, tuple[int, int]]] = {i: {} for i in self.identities}  # identity ->
        # vaddr -> (pages, pid): what ok answers said it holds

    @property
    def identities(self) -> tuple[str, ...]:
        return (self.identity, self.peer) if self.peer else (self.identity,)

    def _new_id(self) -> int:
        n = self.next_id
        self.next_id = n + 1
        return n

    # ---- the workload ---------------------------------------------------------------

    def think(self) -> None:
        w = self.world
        if not self.alive or self.waiting is not None:
            return
        if w.quiescing:
            self.parked = True
            return
        try:
            req = self.gen.send(self.result) if self.started else next(self.gen)
        except StopIteration:  # (a scripted workload that ran out: the client stays, idle, keeping its leases)
            return
        self.started = True
        self.req = req
        identity = self.peer if req.as_peer else self.identity
        if req.target == "mm" and req.call == "free":  # asked to free it: no longer promised, whatever the answer
            self.holds[identity].pop(req.args.get("vaddr"), None)
        rid = self._new_id()
        data = wire.request(rid, req.call, req.args)
        self.waiting = (rid, data, req.target, identity, 0)
        self.requests += 1
        self._send(req.target, identity, data, req.call)
        w.clock.after(w.plan.timing.client_timeout, self.timeout, rid, 0)

    def _send(self, target: str, identity: str, data: bytes, call: str) -> None:
        dst = ("kernel",) if target == "kernel" else ("mm",)
        self.world.net.send(Msg(dst, self.endpoint, identity, data, False, call))

    def timeout(self, rid: int, attempt: int) -> None:
        if not self.alive or self.waiting is None or self.waiting[0] != rid or self.waiting[4] != attempt:
            return
        w = self.world
        t = w.plan.timing
        _, data, target, identity, _ = self.waiting
        if attempt < t.client_retries or w.healed:  # healed: resend until answered (liveness)
            self.waiting = (rid, data, target, identity, attempt + 1)
            w.faults["resend_client"] += 1
            assert self.req is not None
            self._send(target, identity, data, self.req.call)
            w.clock.after(t.client_timeout, self.timeout, rid, attempt + 1)
            return
        self.waiting = None
        w.faults["client_gave_up"] += 1
        self._answer(Error(Errno.EIO, f"no reply after {t.client_retries + 1} attempt(s)"), identity)

    def deliver_reply(self, msg: Msg) -> None:
        if not self.alive or self.waiting is None:
            return
        try:
            reply = wire.parse_reply(msg.data)
        except ValueError:
            self.world.flag("I10", f"{self.world.trace.name(self.identity)} got a malformed reply")
            return
        if reply.get("id") != self.waiting[0]:
            return  # a keepalive's reply, or a late one to an earlier request
        identity = self.waiting[3]
        self.waiting = None
        if reply.get("ok") is True:
            result = reply.get("result")
            self._answer(result if isinstance(result, dict) else {"value": result}, identity)
        else:
            self._answer(Error.from_wire(reply.get("error")), identity)

    def _answer(self, result: Any, identity: str) -> None:
        w = self.world
        req = self.req
        assert req is not None
        w.client_ops += 1
        problem = check_reply(req, result, self.bounds)
        if problem is not None:
            w.flag("I10", f"{w.trace.name(self.identity)} ({self.workload}) got a wrong answer: {problem}")
        if req.target == "mm":
            self._learn(identity, req, result)
        self.result = result
        w.clock.after(w.rng.randint(*w.plan.timing.think), self.think)

    def _learn(self, identity: str, req: Req, result: Any) -> None:
        """What an ok alloc or accept says this identity holds (what it asked to free it no longer counts
        on, whatever the answer: ``think``)."""
        holds = self.holds[identity]
        if req.call in ("alloc", "accept") and isinstance(result, dict):
            pid = self.world.kernel.core.by_key.get(identity)
            if pid is not None:
                holds[result["vaddr"]] = (result["pages"], pid)

    def resume(self) -> None:
        if self.parked and self.alive:
            self.parked = False
            self.world.clock.after(self.world.rng.randint(*self.world.plan.timing.think), self.think)

    def keepalive(self) -> None:
        if not self.alive:
            return
        w = self.world
        for identity in self.identities:
            self._send("kernel", identity, wire.request(self._new_id(), "ping", {}), "ping")
        w.clock.after(w.plan.timing.keepalive, self.keepalive)
