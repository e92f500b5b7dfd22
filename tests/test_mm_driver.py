"""The mm's driver (the sans-I/O state machine the server and the simulator run) against the in-process
kernel and an in-memory journal, with events interleaved in every order hypothesis finds: client requests
from several callers in flight at once, the kernel executing them and its replies delivered in any order,
journal commits late, ticks, resends, a kernel that stops answering, and kill -9 of the mm at any moment.

Checked all along: no kernel map/unmap is sent before its intent is durable, no reply before everything
its request changed is durable, no request is executed twice by the kernel (I12); and when everything has
settled: the mm's view is the kernel's exactly (every frame, every page of every process, every charge),
and every request's resend gets the reply of what the kernel did."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_server.service import KernelService
from mm_service import driver as D
from mm_service import records as J
from mm_service.policy import Config
from mm_support import MM, OP, kernel_maps, view_maps
from protocol import wire

KEYS = [f"K{i}" + "k" * 38 for i in range(4)]


class Harness:
    def __init__(self, config: Config | None = None, memory: int = 16 << 20, pool: int = 64) -> None:
        self.kernel = KernelService.boot(arch="i686", memory=memory, mm_key=MM, kernel_pool_frames=pool,
                                         operator_key=OP, lease_seconds=1e9)
        self.config = config or Config(low=8, target=32, high=256, compact_every=25)
        self.journal: list[J.Record] = []  # what is durable
        self.committed: set[int] = set()  # ids of the durable records
        self.write: tuple[int, list] | None = None  # the batch being written
        self.inbox: list[tuple[int, bytes]] = []  # sent to the kernel, not executed yet
        self.outbox: list[bytes] = []  # executed, reply not delivered yet
        self.incarnation = 0
        self.peers: dict[int, tuple[str, int, bytes]] = {}  # reply token -> (identity, request id, bytes)
        self.replies: dict[int, dict] = {}
        self.next_peer = 0
        self.kid_owner: dict[int, tuple[str, int] | None] = {}  # kernel request id -> the request it serves
        self.executed: dict[tuple[str, int], list] = {}  # request -> kernel map/unmap calls carried out
        self.sent: list[tuple[str, bytes]] = []  # every request sent (identity, bytes)
        self.rid = 0
        self.boot()

    # ---- the mm process ------------------------------------------------------------------------

    def boot(self) -> None:
        self.incarnation += 1
        self.d = D.Driver(Config(**vars(self.config)), MM, OP, first_kid=self.incarnation * 10**9)
        self.applied: list[J.Record] = []
        self.perform(self.d.boot(self.kernel.call(MM, "hello"), self.kernel.call(MM, "address_map"),
                                 list(self.journal)))

    def _watch(self) -> None:
        core = self.d.core
        if core is not None and not hasattr(core, "_watched"):
            record = core.record

            def watched(rec: J.Record) -> None:
                self.applied.append(rec)
                record(rec)

            core.record = watched  # type: ignore[method-assign]
            core._watched = True  # type: ignore[attr-defined]

    def crash(self, kernel_runs_what_was_sent: bool) -> None:
        """kill -9 of the mm: the batch being written is lost, replies in flight are lost; what it sent the
        kernel is carried out (the kernel had it) or not."""
        self.write = None
        if kernel_runs_what_was_sent:
            while self.inbox:
                self.execute(0)
        self.inbox.clear()
        self.outbox.clear()
        self.peers.clear()
        self.boot()

    # ---- actions -----------------------------------------------------------------------------------

    def perform(self, actions: list[Any]) -> None:
        self._watch()
        for a in actions:
            kind = type(a)
            if kind is D.SendKernel:
                self.inbox.append((a.kid, a.data))
                self.kid_owner[a.kid] = self._owner_of(a)
            elif kind is D.WriteJournal:
                assert self.write is None, "one batch is written at a time"
                self.write = (a.batch, a.records)
            elif kind is D.SendReply:
                self._reply(a)
            elif kind is D.ResetKernel:
                self.outbox.clear()  # replies on the old connection are lost
            elif kind is D.Fatal:
                raise AssertionError(a.text)
            elif kind is D.NewBoot:
                raise AssertionError("the kernel never restarts here")
            self._watch()

    def _owner_of(self, a: D.SendKernel) -> tuple[str, int] | None:
        """The request a map/unmap serves; its intent must be durable before it is sent."""
        msg = wire.decode(a.data)
        if msg["call"] not in ("map", "unmap"):
            return None
        core = self.d.core
        args = msg["args"]
        for p in core.view.pending.values():
            c = core.view.clients.get(p.key)
            if c is not None and c.pid == args["pid"] and p.vaddr == args["vaddr"]:
                assert id(p) in self.committed, f"{msg['call']} sent before its intent {p.n} was durable"
                return (p.caller, p.rid) if p.caller is not None else None
        raise AssertionError(f"a {msg['call']} with no pending intent: {args}")

    def _reply(self, a: D.SendReply) -> None:
        who = self.peers.pop(a.peer, None)
        if who is None:
            return  # (a reply to a request of an earlier incarnation's peer table)
        identity, rid, _ = who
        for rec in self.applied:  # everything the request changed is durable before its reply
            if self._serves(rec, identity, rid):
                assert id(rec) in self.committed, f"reply to #{rid} before {rec} was durable"
        self.replies[a.peer] = wire.parse_reply(a.data)

    def _serves(self, rec: J.Record, identity: str, rid: int) -> bool:
        if isinstance(rec, (J.Intent, J.Offered)):
            return rec.caller == identity and rec.rid == rid
        if isinstance(rec, J.Reply):
            return rec.key == identity and rec.rid == rid
        if isinstance(rec, (J.Done, J.Undo)):
            p = next((r for r in self.applied if isinstance(r, J.Intent) and r.n == rec.n), None)
            return p is not None and p.caller == identity and p.rid == rid
        return False

    # ---- events ----------------------------------------------------------------------------------

    def request(self, identity: str, data: bytes | None = None, call: str = "", **args: Any) -> int:
        if data is None:
            self.rid += 1
            data = wire.request(self.rid, call, args)
            self.sent.append((identity, data))
        self.next_peer += 1
        self.peers[self.next_peer] = (identity, wire.decode(data)["id"], data)
        self.perform(self.d.handle(D.ClientRequest(self.next_peer, identity, data)))
        return self.next_peer

    def wakeup(self, reqs: list[tuple[str, str, dict]]) -> list[int]:
        """Several requests arriving in one wake-up: fed to the driver in one call."""
        events, peers = [], []
        for identity, call, args in reqs:
            self.rid += 1
            data = wire.request(self.rid, call, args)
            self.sent.append((identity, data))
            self.next_peer += 1
            self.peers[self.next_peer] = (identity, self.rid, data)
            events.append(D.ClientRequest(self.next_peer, identity, data))
            peers.append(self.next_peer)
        self.perform(self.d.handle(*events))
        return peers

    def commit(self) -> None:
        batch, recs = self.write
        self.write = None
        snaps = [i for i, r in enumerate(recs) if isinstance(r, J.Snapshot)]
        if snaps:
            self.journal = list(recs[snaps[-1]:])
        else:
            self.journal.extend(recs)
        self.committed.update(id(r) for r in recs)
        self.perform(self.d.handle(D.JournalCommitted(batch)))

    def execute(self, i: int) -> None:
        kid, data = self.inbox.pop(i)
        reply = self.kernel.handle(MM, data, 0.0)
        self.outbox.append(reply)
        owner = self.kid_owner.get(kid)
        msg = wire.parse_reply(reply)
        if owner is not None and msg["ok"] and wire.decode(data)["call"] in ("map", "unmap"):
            self.executed.setdefault(owner, []).append(wire.decode(data)["args"])
            assert len(self.executed[owner]) == 1, f"request {owner[1]} executed twice by the kernel (I12)"

    def deliver(self, i: int) -> None:
        self.perform(self.d.handle(D.KernelReply(self.outbox.pop(i))))

    def timeout(self, i: int) -> None:
        """No reply to kernel request i (after the resends): the driver counts the kernel as lost."""
        kid, _ = self.inbox[i]
        self.perform(self.d.handle(D.KernelTimeout(kid)))

    def settle(self) -> None:
        """Let everything finish: writes commit, the kernel executes and answers, ticks until quiet."""
        for _ in range(10_000):
            if self.write is not None:
                self.commit()
            elif self.outbox:
                self.deliver(0)
            elif self.inbox:
                self.execute(0)
            elif not self.d.quiet or self.d.watch.lost is not None or self.d.core.view.pending:
                self.perform(self.d.handle(D.TickDue()))
            else:
                return
        raise AssertionError("the mm never became quiet")

    # ---- checks -----------------------------------------------------------------------------------

    def exact(self) -> None:
        core, k = self.d.core, self.kernel.core
        assert not core.view.pending
        assert {key: c.pid for key, c in core.view.clients.items()} == {p.key: p.pid for p in k.procs.values()}
        for key, c in core.view.clients.items():
            assert view_maps(core, key) == kernel_maps(self.kernel, c.pid)
            assert c.charged == sum(m.pages for m in c.maps.values())
        peer = self.request(OP, call="audit")
        self.settle()
        report = self.replies[peer]["result"]
        assert report["divergences"] == 0 and report["i13"]["problems"] == [], report

    def resend_all(self) -> None:
        """Every request sent again: a request the kernel carried out gets its result and runs no more."""
        for identity, data in list(self.sent):
            rid = wire.decode(data)["id"]
            before = list(self.executed.get((identity, rid), []))
            peer = self.request(identity, data)
            self.settle()
            got = self.replies[peer]
            if before:
                assert got["ok"] is True and self.executed[(identity, rid)] == before, (got, before)
                assert got["result"]["vaddr"] == before[0]["vaddr"]


# ---- hypothesis: every interleaving -------------------------------------------------------------------

class Clients:
    """What each client knows from its replies: its allocations and the offers made to it."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.held: dict[str, list[tuple[int, int]]] = {k: [] for k in KEYS}
        self.offers: dict[str, list[int]] = {k: [] for k in KEYS}
        self.waiting: dict[int, tuple[str, str]] = {}  # peer -> (client, call)

    def learn(self) -> None:
        for peer, (key, call) in list(self.waiting.items()):
            got = self.h.replies.get(peer)
            if got is None:
                if peer not in self.h.peers:
                    del self.waiting[peer]  # lost in a crash
                continue
            del self.waiting[peer]
            if got["ok"] and call in ("alloc", "accept"):
                self.held[key].append((got["result"]["vaddr"], got["result"]["pages"]))
            elif got["ok"] and call == "share":
                self.offers[got["result"]["peer"]].append(got["result"]["offer"])

    def act(self, ci: int, kind: int, param: int) -> None:
        key = KEYS[ci]
        h = self.h
        held = self.held[key]
        if kind == 1 and held:
            vaddr, pages = held.pop(param % len(held))
            peer, call = h.request(key, call="free", vaddr=vaddr, pages=pages), "free"
        elif kind == 2 and held:
            vaddr, pages = held[param % len(held)]
            peer, call = h.request(key, call="share", vaddr=vaddr, pages=pages, peer=KEYS[(ci + 1) % len(KEYS)]), \
                "share"
        elif kind == 3 and self.offers[key]:
            peer, call = h.request(key, call="accept", offer=self.offers[key].pop()), "accept"
        else:
            peer, call = h.request(key, call="alloc", pages=1 + param % 4, prot=3), "alloc"
        self.waiting[peer] = (key, call)


STEP = st.one_of(
    st.tuples(st.just("req"), st.integers(0, len(KEYS) - 1), st.integers(0, 3), st.integers(0, 1000)),
    st.tuples(st.just("exec"), st.integers(0, 1000)),
    st.tuples(st.just("deliver"), st.integers(0, 1000)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("tick")),
    st.tuples(st.just("resend"), st.integers(0, 1000)),
)
RARE = st.one_of(
    st.tuples(st.just("crash"), st.booleans()),
    st.tuples(st.just("timeout"), st.integers(0, 1000)),
)


def _run(steps: list) -> Harness:
    h = Harness()
    cl = Clients(h)
    for step in steps:
        op = step[0]
        if op == "req":
            cl.act(step[1], step[2], step[3])
        elif op == "exec" and h.inbox:
            h.execute(step[1] % len(h.inbox))
        elif op == "deliver" and h.outbox:
            h.deliver(step[1] % len(h.outbox))
        elif op == "commit" and h.write is not None:
            h.commit()
        elif op == "tick":
            h.perform(h.d.handle(D.TickDue()))
        elif op == "resend" and h.sent:
            identity, data = h.sent[step[1] % len(h.sent)]
            h.request(identity, data)
        elif op == "crash":
            h.crash(step[1])
        elif op == "timeout" and h.inbox:
            h.timeout(step[1] % len(h.inbox))
        cl.learn()
    h.settle()
    cl.learn()
    return h


@settings(max_examples=60)
@given(st.lists(st.one_of(STEP, STEP, STEP, STEP, STEP, STEP, RARE), min_size=1, max_size=150))
def test_any_interleaving_keeps_durability_order_at_most_once_and_ends_exact(steps):
    h = _run(steps)
    h.exact()
    h.resend_all()
    h.exact()


# ---- overlap ----------------------------------------------------------------------------------------------

def test_sixteen_clients_in_flight_share_journal_writes_and_their_replies_come_in_any_order():
    h = Harness(config=Config(low=8, target=32, high=256), memory=64 << 20, pool=512)
    keys = [f"{i:02d}" + "c" * 38 for i in range(16)]
    for k in keys:  # processes first (each proc_create is a kernel call of its own)
        h.request(k, call="alloc", pages=1, prot=3)
    h.settle()
    batches = h.d.stats["batches"]
    peers = h.wakeup([(k, "alloc", {"pages": 2, "prot": 3}) for k in keys])  # one wake-up
    assert h.write is not None and sum(isinstance(r, J.Intent) for r in h.write[1]) == 16
    assert not h.inbox  # no map before its intent is durable
    h.commit()
    assert len(h.inbox) == 16 and h.d.stats["max_in_flight"] == 16  # all sixteen at the kernel at once
    for i in range(16):
        h.execute(0)
    replies, h.outbox = h.outbox[::-1], []  # all sixteen replies in one wake-up, in the reverse order
    h.perform(h.d.handle(*[D.KernelReply(r) for r in replies]))
    assert not h.replies.keys() & set(peers)  # the outcomes are not durable yet: no reply
    assert sum(isinstance(r, J.Done) for r in h.write[1]) == 16
    h.commit()
    assert all(h.replies[p]["ok"] for p in peers)
    assert h.d.stats["batches"] - batches == 2  # sixteen requests, two transactions
    frames = [f for p in peers for f in range(h.replies[p]["result"]["frames"][0][0],
                                               h.replies[p]["result"]["frames"][0][0] + 2)]
    assert len(frames) == len(set(frames)) == 32  # never the same frame twice
    h.settle()
    h.exact()


def test_a_callers_requests_run_one_at_a_time_and_a_resend_in_flight_is_answered_not_rerun():
    h = Harness()
    key = KEYS[0]
    first = h.request(key, call="alloc", pages=1, prot=3)
    identity, data = h.sent[-1]
    again = h.request(identity, data)  # the Lazy Pirate resend while the first is still running
    second = h.request(key, call="alloc", pages=2, prot=3)
    h.settle()
    assert h.replies[first] == h.replies[again] and h.replies[second]["ok"]
    assert len(h.executed[(key, wire.decode(data)["id"])]) == 1
    h.exact()


def test_housekeeping_waits_for_requests_in_flight_and_holds_new_ones():
    h = Harness()
    h.request(KEYS[0], call="alloc", pages=1, prot=3)
    h.settle()
    p1 = h.request(KEYS[0], call="alloc", pages=1, prot=3)
    h.commit()
    assert h.inbox  # the map is at the kernel
    h.perform(h.d.handle(D.TickDue()))
    sent = len(h.inbox)
    p2 = h.request(KEYS[1], call="alloc", pages=1, prot=3)  # held while the tick is due
    assert len(h.inbox) == sent and p2 not in h.replies
    h.execute(0)
    h.deliver(0)
    h.commit()
    assert p1 in h.replies and h.d.house_task is not None and h.d.house_task.name == "tick"
    assert not any(wire.decode(d)["call"] == "proc_create" for _, d in h.inbox)  # K1 still waits
    h.settle()
    assert h.replies[p2]["ok"]
    h.exact()


def test_a_lost_kernel_fails_every_call_in_flight_at_once_and_a_probe_brings_it_back():
    h = Harness()
    h.request(KEYS[0], call="alloc", pages=1, prot=3)
    h.settle()
    peers = h.wakeup([(k, "alloc", {"pages": 1, "prot": 3}) for k in KEYS])
    while h.write is not None or any(wire.decode(d)["call"] != "map" for _, d in h.inbox):
        if h.write is not None:
            h.commit()
        else:
            i = next(i for i, (_, d) in enumerate(h.inbox) if wire.decode(d)["call"] != "map")
            h.execute(i)
            h.deliver(len(h.outbox) - 1)
    h.execute(0)  # one map done, its reply never comes
    h.timeout(0)
    h.inbox.clear()  # the connection is reset: the others never reach the kernel
    while h.write is not None:
        h.commit()
    assert all(h.replies[p]["error"]["code"] == "EIO" for p in peers)
    assert h.d.watch.lost is not None and len(h.d.core.view.pending) == len(KEYS)
    late = h.request(KEYS[0], call="alloc", pages=1, prot=3)  # while lost: EIO at once, nothing sent
    while h.write is not None:
        h.commit()
    assert h.replies[late]["error"]["code"] == "EIO" and not h.inbox
    h.perform(h.d.handle(D.TickDue()))  # the tick probes the kernel
    (probe,) = h.inbox
    assert wire.decode(probe[1])["call"] == "hello" and h.d.watch.lost is not None
    h.settle()  # the probe's answer: the mm settles with the kernel
    assert h.d.watch.lost is None
    h.exact()
    h.resend_all()
    h.exact()
