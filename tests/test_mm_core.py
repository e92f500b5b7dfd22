"""The mm's sans-I/O policy against the in-process kernel core: watermarks, ENOMEM
retry, quotas, shares, client death, audit, recovery after a crash at any
effect boundary (and a resend of the cut-short request executed at most once),
one journal write per request, journal compaction, and the kernel watch."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

from kernel_server.service import KernelService
from mm_service import health
from mm_service.journal import Journal
from mm_service.policy import Config, KCall, MMCore, Persist, drive
from mm_service.service import MMService
from mm_service.view import FREE, KERNEL, USED, View
from protocol import wire
from protocol.calls import MM_CALLS, validate
from protocol.errors import Errno, Error

MM = "M" * 40
A = "A" * 40
B = "B" * 40


class World:
    """One kernel service, one mm core, a journal list, and a log of kernel calls."""

    def __init__(self, pool: int = 256, config: Config | None = None, memory: int = 64 << 20, arch: str = "i686"):
        self.kernel = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=pool, lease_seconds=1.0)
        self.journal: list[dict] = []
        self.kcalls: list[tuple[str, dict, object]] = []
        self.config = config or Config(low=16, target=64, high=256)
        self.mm = self.new_mm()
        self.run(self.mm.refresh())

    def new_mm(self) -> MMCore:
        cfg = Config(**vars(self.config))
        return MMCore(self.kernel.call(MM, "address_map"), self.kernel.call(MM, "hello"), cfg)

    def kcall(self, call: str, args: dict):
        result = self.kernel.call(MM, call, args)
        self.kcalls.append((call, args, result))
        return result

    def run(self, gen):
        return drive(gen, self.kcall, self.journal.extend)

    def req(self, key: str, call: str, **args):
        model = validate(MM_CALLS, call, args)
        assert not isinstance(model, Error), model
        result = self.run(self.mm.request(key, call, model))
        self.run(self.mm.maintain())
        return result

    def audit(self) -> dict:
        return self.run(self.mm.audit())

    def conservation(self) -> None:
        c = self.kernel.core.frames.counts()
        assert c["kernel_free"] + c["kernel_used"] + c["kernel_shared"] + c["user_free"] + c["user_mapped"] == c["ram"]
        v = self.mm.view.counts()
        assert v["kernel"] + v["free"] + v["used"] == v["ram"] == c["ram"]


def test_alloc_maps_frames_and_views_agree():
    w = World()
    r = w.req(A, "alloc", pages=8, prot=3)
    assert r["pages"] == 8 and r["vaddr"] % 4096 == 0
    pid = w.mm.view.clients[A].pid
    proc = w.kernel.core.procs[pid]
    assert len(proc.pages) == 8
    for first, count in r["frames"]:
        assert all(w.kernel.core.frames.refs[f] == 1 for f in range(first, first + count))
        assert all(w.mm.view.state[f] == USED for f in range(first, first + count))
    assert w.audit()["divergences"] == 0
    w.conservation()


def test_free_returns_frames_to_the_free_view():
    w = World()
    r = w.req(A, "alloc", pages=4, prot=1)
    f = w.req(A, "free", vaddr=r["vaddr"], pages=4)
    assert f["frames"] == r["frames"]
    first, count = r["frames"][0]
    assert w.mm.view.state[first] == FREE and w.kernel.core.frames.refs[first] == 0
    assert w.audit()["divergences"] == 0


def test_free_of_unknown_or_partial_allocation_is_einval():
    w = World()
    r = w.req(A, "alloc", pages=4, prot=1)
    assert w.req(A, "free", vaddr=r["vaddr"] + 4096, pages=1).code == Errno.EINVAL
    assert w.req(A, "free", vaddr=r["vaddr"], pages=2).code == Errno.EINVAL
    assert w.req(B, "free", vaddr=r["vaddr"], pages=4).code == Errno.EINVAL  # not B's
    assert w.audit()["divergences"] == 0


def test_donates_when_the_kernel_runs_low_without_the_client_seeing_enomem():
    # a tiny pool: the process and its page tables need more than the kernel has
    w = World(pool=2, config=Config(low=0, target=0, high=1 << 20, headroom=0))
    for i in range(40):  # 40 pages 4 MiB apart: 40 page tables
        r = w.req(A, "alloc", pages=1, prot=3, vaddr=0x1000_0000 + i * 0x40_0000)
        assert isinstance(r, dict), r
    assert w.mm.counters.enomem_retries > 0
    donated = [c for c in w.kcalls if c[0] == "donate"]
    assert donated, "the mm must have donated after ENOMEM"
    # the ENOMEM retry donated exactly what the error said was missing (headroom 0)
    assert all(isinstance(c[2], dict) for c in donated)
    assert w.audit()["divergences"] == 0
    w.conservation()


def test_watermarks_keep_the_kernel_pool_in_range():
    w = World(pool=4, config=Config(low=32, target=64, high=128))
    w.run(w.mm.maintain())
    assert w.kernel.core.frames.free_count == 64
    # give the kernel too much: the mm reclaims down to the target
    w.run(w.mm.maintain())
    frames = w.mm.view.pick(200, below=w.mm.view.kernel_limit)
    from protocol import runs as R
    runs = R.from_array(sorted(frames.tolist()))
    assert isinstance(w.run(w.mm._donate(200)), int)
    w.run(w.mm.flush())
    assert w.kernel.core.frames.free_count == 264
    w.run(w.mm.maintain())
    assert w.kernel.core.frames.free_count == 64
    assert w.mm.counters.reclaims == 1 and w.mm.counters.reclaimed_frames == 200
    assert any("reclaimed" in e for e in w.mm.counters.watermark_events)
    assert w.audit()["divergences"] == 0
    del runs


def test_donations_are_kernel_eligible_only():
    w = World(pool=0, arch="i686-pae", memory=5 << 30, config=Config(low=8, target=16, high=64))
    w.run(w.mm.maintain())
    limit = w.kernel.core.frames.kernel_limit
    for call, args, result in w.kcalls:
        if call == "donate":
            assert all(f + c <= limit for f, c in args["frames"])
    assert w.kernel.core.frames.free_count == 16


def test_donations_keep_large_aligned_blocks_intact():
    w = World(pool=0, config=Config(low=8, target=16, high=64))
    w.req(A, "alloc", pages=3, prot=1)  # breaks one block
    before = w.mm.view.counts()["free_large_blocks"]
    w.run(w.mm._donate(40))
    w.run(w.mm.flush())
    # small requests and donations come from broken blocks first: no whole block was broken
    assert w.mm.view.counts()["free_large_blocks"] == before


def test_quota_is_a_clear_error():
    w = World(config=Config(low=16, target=64, high=256, quota=10))
    assert isinstance(w.req(A, "alloc", pages=8, prot=1), dict)
    err = w.req(A, "alloc", pages=3, prot=1)
    assert err.code == Errno.ENOMEM and "quota" in err.message and err.details["quota"] == 10
    assert isinstance(w.req(B, "alloc", pages=10, prot=1), dict)  # quotas are per client


def test_alloc_at_a_taken_vaddr_is_ebusy_and_changes_nothing():
    w = World()
    r = w.req(A, "alloc", pages=4, prot=1, vaddr=0x1000_0000)
    digest = w.kernel.core.digest()
    err = w.req(A, "alloc", pages=1, prot=1, vaddr=0x1000_2000)
    assert err.code == Errno.EBUSY
    assert w.kernel.core.digest() == digest
    assert r["vaddr"] == 0x1000_0000


def test_bad_alloc_arguments():
    w = World()
    assert w.req(A, "alloc", pages=1, prot=1, vaddr=0x1001).code == Errno.EINVAL
    assert w.req(A, "alloc", pages=1, prot=1, vaddr=0xBFFF_F000 + 4096).code == Errno.EINVAL
    assert w.req(A, "alloc", pages=1, prot=6).code == Errno.ENOTSUP  # W+X refused by the kernel
    assert w.req(A, "alloc", pages=3, prot=1, large=True).code == Errno.EINVAL
    assert w.audit()["divergences"] == 0


def test_share_raises_refcounts_and_survives_the_owner_freeing():
    w = World()
    r = w.req(A, "alloc", pages=2, prot=3)
    s = w.req(A, "share", vaddr=r["vaddr"], pages=2, peer=B, peer_vaddr=0x2000_0000, prot=1)
    assert s["frames"] == r["frames"]
    f = r["frames"][0][0]
    assert w.kernel.core.frames.refs[f] == 2 and w.mm.view.refs[f] == 2
    assert w.req(A, "free", vaddr=r["vaddr"], pages=2)["pages"] == 2
    assert w.kernel.core.frames.refs[f] == 1 and w.mm.view.state[f] == USED  # B still maps it
    assert w.req(B, "free", vaddr=0x2000_0000, pages=2)["pages"] == 2
    assert w.mm.view.state[f] == FREE
    assert w.audit()["divergences"] == 0


def test_share_cannot_widen_access_or_target_self():
    w = World()
    r = w.req(A, "alloc", pages=1, prot=1)
    assert w.req(A, "share", vaddr=r["vaddr"], pages=1, peer=B, peer_vaddr=0x2000_0000, prot=3).code == Errno.EPERM
    assert w.req(A, "share", vaddr=r["vaddr"], pages=1, peer=A, peer_vaddr=0x2000_0000).code == Errno.EINVAL
    assert w.req(B, "share", vaddr=r["vaddr"], pages=1, peer=A, peer_vaddr=0x2000_0000).code == Errno.EINVAL


def test_client_death_returns_its_frames():
    w = World()
    r = w.req(A, "alloc", pages=16, prot=3)
    w.req(A, "share", vaddr=r["vaddr"], pages=16, peer=B, peer_vaddr=0x3000_0000)
    pid = w.mm.view.clients[A].pid
    # A stops calling: the kernel's lease runs out
    w.kernel.last_seen[w.mm.view.clients[B].pid] = 10.0
    assert [e["pid"] for e in w.kernel.expire(now=2.0)] == [pid]
    w.mm.kernel_free = -1
    assert w.run(w.mm.poll_events()) >= 1
    assert A not in w.mm.view.clients and w.mm.counters.deaths == 1
    assert w.mm.kernel_free == w.kernel.core.frames.free_count  # the events reply carries the pool's size
    f = r["frames"][0][0]
    assert w.mm.view.refs[f] == 1  # B's share remains
    w.kernel.core.proc_destroy(w.mm.view.clients[B].pid, "proc_destroy")
    w.run(w.mm.poll_events())
    assert w.mm.view.state[f] == FREE
    assert w.audit()["divergences"] == 0
    w.conservation()


def _steps(w: World, gen):
    """Run ``gen`` effect by effect, yielding after each effect is handled."""
    value = None
    while True:
        try:
            effect = gen.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(effect, KCall):
            value = w.kcall(effect.call, effect.args)
        else:
            assert isinstance(effect, Persist)
            w.journal.extend(effect.ops)
            value = None
        yield effect


def _crash_after(w: World, make_gen, n: int) -> bool:
    """Run an operation but crash the mm after its n-th effect; True if it got that far."""
    gen = make_gen()
    it = _steps(w, gen)
    for i, _ in enumerate(it):
        if i + 1 == n:
            return True
    return False


def _restart(w: World) -> dict:
    w.mm = w.new_mm()
    w.mm.replay(w.journal)
    return w.run(w.mm.recover())


@pytest.mark.parametrize("call", ["alloc", "free", "share"])
def test_crash_at_every_effect_boundary_then_recover(call):
    """kill -9 of the mm after any journal write or kernel call: the restarted mm agrees with the kernel."""
    n = 1
    while True:
        w = World(pool=0, config=Config(low=0, target=8, high=64))
        base = w.req(A, "alloc", pages=3, prot=1)
        args = {
            "alloc": dict(pages=5, prot=3),
            "free": dict(vaddr=base["vaddr"], pages=3),
            "share": dict(vaddr=base["vaddr"], pages=3, peer=B, peer_vaddr=0x5000_0000),
        }[call]
        model = validate(MM_CALLS, call, args)
        reached = _crash_after(w, lambda: w.mm.request(A, call, model), n)
        if not reached:
            break
        report = _restart(w)
        assert report["remaining"]["divergences"] == 0, (call, n, report)
        assert w.audit()["divergences"] == 0
        assert not w.mm.view.pending
        w.conservation()
        # the system still works after recovery
        assert isinstance(w.req(A, "alloc", pages=1, prot=1), dict)
        assert w.audit()["divergences"] == 0
        n += 1
    assert n > 2  # the operation had several effects to crash at


def test_restart_after_unjournaled_donation_is_repaired():
    w = World(pool=0, config=Config(low=8, target=16, high=64))
    w.run(w.mm.maintain())  # donates; the op is deferred and then flushed
    # lose the journal's donate op, as if the mm died right after the kernel said yes
    w.journal = [op for op in w.journal if op["op"] != "donate"]
    report = _restart(w)
    assert report["found"]["class_counts"]["free_but_kernel"] == 16
    assert report["remaining"]["divergences"] == 0
    assert w.audit()["divergences"] == 0


def test_journal_replay_rebuilds_the_same_view():
    w = World()
    r = w.req(A, "alloc", pages=7, prot=3)
    w.req(A, "share", vaddr=r["vaddr"], pages=7, peer=B, peer_vaddr=0x4000_0000)
    w.req(A, "alloc", pages=2, prot=1)
    w.run(w.mm.flush())
    old = w.mm.view
    _restart(w)
    assert (w.mm.view.state == old.state).all() and (w.mm.view.refs == old.refs).all()
    assert set(w.mm.view.clients) == set(old.clients)


def test_audit_finds_a_planted_divergence():
    w = World()
    w.req(A, "alloc", pages=2, prot=1)
    free = int(w.mm.view.pick(1)[0])
    w.mm.view.state[free] = KERNEL  # the mm's view lies about one frame
    report = w.audit()
    assert report["divergences"] == 1 and report["class_counts"]["owner_mismatch"] + report["class_counts"]["kernel_but_user"] == 1


# ---- at-most-once across an mm crash (I12), through the service ----------------------------------

class SWorld(World):
    """The world with the service in front of the core: requests and replies as wire bytes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.svc = MMService(self.mm, MM)
        self.rid = 1000

    def request(self, key: str, call: str, **args) -> bytes:
        self.rid += 1
        return wire.request(self.rid, call, args)

    def handle(self, key: str, data: bytes) -> bytes:
        return self.run(_handle_then_maintain(self.svc, key, data))

    def send(self, key: str, call: str, **args) -> dict:
        return wire.parse_reply(self.handle(key, self.request(key, call, **args)))

    def restart(self) -> dict:
        """A new mm process: the journal replayed (view and replies), then settled with the kernel."""
        self.mm = self.new_mm()
        self.svc = MMService(self.mm, MM)
        self.svc.restore(self.journal)
        return self.run(self.svc.recover())

    def kernel_work(self, since: int) -> list:
        """The map/unmap calls the kernel carried out since kcalls[since]."""
        return [c for c in self.kcalls[since:] if c[0] in ("map", "unmap") and isinstance(c[2], dict)]


def _handle_then_maintain(svc: MMService, key: str, data: bytes):
    reply = yield from svc.handle(key, data)
    yield from svc.maintain()  # as the server does after each request (a compaction may come here)
    return reply


RESEND_CASES = ["alloc", "alloc_new_client", "free", "share"]


@pytest.mark.parametrize("compact_every", [2000, 1], ids=["no_compaction", "compaction_after_each_request"])
@pytest.mark.parametrize("case", RESEND_CASES)
def test_a_resend_after_a_crash_at_any_effect_boundary_is_executed_once(case, compact_every):
    """kill -9 of the mm after any effect of a request (or with the reply computed but not sent), a restart,
    then the client's resend of the same bytes: the request was executed exactly once in all, the resend is
    answered with what the first run did when the kernel had done it, and the views agree (I8, I12)."""
    n = 1
    while True:
        w = SWorld(pool=0, config=Config(low=0, target=8, high=64, headroom=0, compact_every=compact_every))
        base = w.send(A, "alloc", pages=3, prot=1)["result"]
        key, call, args = {
            "alloc": (A, "alloc", dict(pages=5, prot=3)),
            "alloc_new_client": (B, "alloc", dict(pages=5, prot=3)),  # the process is made first (ENOMEM, donate)
            "free": (A, "free", dict(vaddr=base["vaddr"], pages=3)),
            "share": (A, "share", dict(vaddr=base["vaddr"], pages=3, peer=B, peer_vaddr=0x5000_0000)),
        }[case]
        data = w.request(key, call, **args)
        mark = len(w.kcalls)
        reached = _crash_after(w, lambda: _handle_then_maintain(w.svc, key, data), n)
        first = w.kernel_work(mark)  # what the kernel did for the first run before the crash
        report = w.restart()
        assert report["remaining"]["divergences"] == 0, (case, n, report)
        assert not w.mm.view.pending
        mark = len(w.kcalls)
        reply = w.handle(key, data)  # the client's Lazy Pirate resend: same identity, id and bytes
        again = w.kernel_work(mark)
        got = wire.parse_reply(reply)
        assert got["ok"] is True, (case, n, got)
        assert len(first) + len(again) == 1, (case, n, first, again)  # executed once, whatever the crash
        if first:  # the kernel had done it: the resend is answered from the journal, with what was done
            kargs = first[0][1]
            assert got["result"]["vaddr"] == kargs["vaddr"]
            if call != "free":
                assert got["result"]["frames"] == kargs["frames"]
        assert w.handle(key, data) == reply  # and every further resend gets the same bytes
        assert w.kernel_work(mark) == again
        pid = w.mm.view.clients[key if call != "share" else B].pid
        pages = len(w.kernel.core.procs[pid].pages)
        assert pages == {"alloc": 8, "alloc_new_client": 5, "free": 0, "share": 3}[case]
        assert w.audit()["divergences"] == 0
        w.conservation()
        n += 1
        if not reached:  # the last round ran the request whole and lost only its reply
            break
    assert n > 3


def test_one_journal_write_per_request_before_its_reply():
    w = SWorld()
    w.send(A, "alloc", pages=1, prot=3)  # the process and its first page table
    V = 0x1000_0000
    for call, args in [("alloc", dict(pages=1, prot=3, vaddr=V)), ("free", dict(vaddr=V, pages=1))] * 3:
        effects: list[str] = []

        def kcall(c, a):
            effects.append(c)
            return w.kcall(c, a)

        def persist(ops):
            effects.append("write: " + ",".join(op["op"] for op in ops))
            w.journal.extend(ops)

        reply = wire.parse_reply(drive(_handle_then_maintain(w.svc, A, w.request(A, call, **args)), kcall, persist))
        assert reply["ok"] is True
        kernel_call = "map" if call == "alloc" else "unmap"
        # the intent (with the outcome of the request before riding along) then the kernel call: nothing else
        assert len(effects) == 2 and effects[0].startswith("write: ") and effects[0].endswith("intent")
        assert effects[1] == kernel_call
    assert w.mm.deferred == [{"op": "done", "n": w.mm.intent_no}]  # the last outcome waits for the next write
    w.run(w.mm.flush())  # (the server's tick)
    replayed = View(w.kernel.call(MM, "address_map"), w.mm.view.block)
    for op in w.journal:
        replayed.apply(op)
    _assert_same_view(replayed, w.mm.view)


def test_a_refusal_after_the_request_changed_something_is_journaled_and_given_again():
    w = SWorld()
    w.send(A, "alloc", pages=1, prot=1)
    data = w.request(A, "alloc", pages=1, prot=6)  # W+X: the kernel refuses the map after the intent
    mark = len(w.kcalls)
    reply = w.handle(A, data)
    assert wire.parse_reply(reply)["error"]["code"] == "ENOTSUP"
    ops = [op["op"] for op in w.journal]
    assert ops[-2:] == ["undo", "reply"]  # one write, before the reply was sent
    w.restart()
    assert w.handle(A, data) == reply
    assert [c[0] for c in w.kcalls[mark:]].count("map") == 1  # the refused map was not tried again


def test_a_lost_kernel_reply_is_eio_and_stays_the_answer_after_recovery():
    """The kernel maps but its answer is lost: the client gets EIO, the intent stays pending; when the
    kernel is back, recovery finds the map done, and the resend still gets the first answer (EIO)."""
    w = SWorld()
    w.send(A, "alloc", pages=1, prot=3)
    data = w.request(A, "alloc", pages=2, prot=3)

    def lossy(call, args):
        result = w.kcall(call, args)
        return Error(Errno.EIO, "no reply") if call == "map" else result

    reply = drive(w.svc.handle(A, data), lossy, w.journal.extend)
    assert wire.parse_reply(reply)["error"]["code"] == "EIO" and len(w.mm.view.pending) == 1
    watch = health.KernelWatch(boot_id="0", lost="no reply to map")
    verdict = w.run(health.check(watch, w.svc))
    assert verdict.state == "back" and verdict.recovery["settled_intents"] == 1 and watch.lost is None
    assert not w.mm.view.pending and w.audit()["divergences"] == 0
    maps = len(w.kernel_work(0))
    assert w.handle(A, data) == reply and len(w.kernel_work(0)) == maps


# ---- journal compaction ----------------------------------------------------------------------------

def _assert_same_view(a: View, b: View) -> None:
    for name in ("state", "refs", "bfree", "bowner", "never_whole"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.alive == b.alive and a.next_tag == b.next_tag
    assert np.array_equal(a.alive_tags[: a.next_tag], b.alive_tags[: b.next_tag])
    assert (a.event_seq, a.last_intent, a.ram) == (b.event_seq, b.last_intent, b.ram)
    assert a.pending == b.pending and a.by_pid == b.by_pid
    assert list(a.clients) == list(b.clients)
    for key, ca in a.clients.items():
        cb = b.clients[key]
        assert (ca.pid, ca.tag, ca.charged, ca.va_next, ca.starts) == (cb.pid, cb.tag, cb.charged, cb.va_next, cb.starts)
        assert ca.maps == cb.maps and list(ca.maps) == list(cb.maps)
    for owner in sorted(a.alive) + [a.next_tag]:  # the next request is placed the same way
        for n in (1, 37):
            pa, pb = a.pick(n, owner=owner), b.pick(n, owner=owner)
            assert (pa is None and pb is None) or np.array_equal(pa, pb)


def _churn(w: SWorld, steps: int, seed: int = 7) -> list[bytes]:
    """Seeded alloc/free/share/death traffic; the replies."""
    keys = [f"{i:040d}" for i in range(6)]
    rng = np.random.default_rng(seed)
    live: dict[str, list] = {k: [] for k in keys}
    replies = []
    for step in range(steps):
        key = keys[int(rng.integers(len(keys)))]
        if key in w.mm.view.clients and step % 61 == 0:
            w.kernel.call(MM, "proc_destroy", {"pid": w.mm.view.clients[key].pid})
            w.run(w.mm.poll_events())
            live[key] = []
            continue
        if live[key] and rng.random() < 0.4:
            r = live[key].pop(int(rng.integers(len(live[key]))))
            data = w.request(key, "free", vaddr=r["vaddr"], pages=r["pages"])
        elif live[key] and rng.random() < 0.1:
            r = live[key][0]
            peer = keys[int(rng.integers(len(keys)))]
            data = w.request(key, "share", vaddr=r["vaddr"], pages=r["pages"], peer=peer,
                             peer_vaddr=0x8000_0000 + step * 0x10_0000)
        else:
            data = w.request(key, "alloc", pages=int(rng.integers(1, 40)), prot=3)
        reply = w.handle(key, data)
        replies.append(reply)
        got = wire.parse_reply(reply)
        if got["ok"] and "peer" not in got["result"] and wire.decode(data)["call"] == "alloc":
            live[key].append(got["result"])
    return replies


def test_compaction_rebuilds_exactly_the_same_view_and_changes_no_decision():
    plain = SWorld(pool=16, config=Config(low=8, target=32, high=128, compact_every=10**9))
    compacted = SWorld(pool=16, config=Config(low=8, target=32, high=128, compact_every=40))
    assert _churn(plain, 300) == _churn(compacted, 300)  # the same replies, byte for byte
    for w in (plain, compacted):
        w.run(w.mm.flush())
    _assert_same_view(plain.mm.view, compacted.mm.view)
    snaps = [i for i, op in enumerate(compacted.journal) if op["op"] == "snapshot"]
    assert len(snaps) >= 5
    amap = compacted.kernel.call(MM, "address_map")
    tail = compacted.journal[snaps[-1]:]  # what the compacted journal holds: the last snapshot and what follows
    assert len(tail) < 60 and len(plain.journal) > 500
    for journal in (tail, compacted.journal, plain.journal):
        v = View(amap, compacted.mm.view.block)
        for op in journal:
            v.apply(op)
        _assert_same_view(v, compacted.mm.view)
    # a restart from the compacted journal: the same view, every recent durable reply, nothing to repair
    svc = MMService(compacted.new_mm(), MM)
    assert svc.restore(tail) == len(tail)
    _assert_same_view(svc.core.view, compacted.mm.view)
    assert svc.core.intent_no == compacted.mm.intent_no
    assert svc.durable.replies == compacted.svc.durable.replies  # what the next snapshot keeps
    for key, cache in compacted.svc.durable.replies.items():  # all answered again after the restart
        assert all(svc.replay.replies[key][i] == hit for i, hit in cache.items())
    compacted.mm, compacted.svc = svc.core, svc
    assert compacted.run(svc.recover())["found"]["divergences"] == 0


def test_journal_compaction_on_disk_is_one_transaction(tmp_path):
    path = str(tmp_path / "mm.db")
    j = Journal(path)
    j.append([{"op": "events", "seq": 1}])
    j.append([{"op": "events", "seq": 2}, {"op": "events", "seq": 3}])
    assert j.count() == 3
    w = SWorld()
    w.send(A, "alloc", pages=3, prot=3)
    snap = w.mm.snapshot()

    class FailingInsert:  # the process dies between deleting the old ops and writing the snapshot
        def __init__(self, db):
            self.db, self.deleted = db, False

        def execute(self, sql, *args):
            if sql.startswith("DELETE"):
                self.deleted = True
            elif sql.startswith("INSERT") and self.deleted:
                raise OSError("disk gone")
            return self.db.execute(sql, *args)

    real = j.db
    j.db = FailingInsert(real)
    with pytest.raises(OSError):
        j.append([snap])
    j.db = real
    assert [op["seq"] for op in j.replay()] == [1, 2, 3]  # nothing changed
    j.append([snap])
    j.append([{"op": "events", "seq": 4}])
    j.close()
    j = Journal(path)
    ops = list(j.replay())
    assert [op["op"] for op in ops] == ["snapshot", "events"] and j.count() == 2
    assert j.db.execute("SELECT COUNT(*) FROM ops").fetchone()[0] == 2  # the old rows are gone
    # a row written by an earlier version (one op per row) is read too
    j.db.execute("INSERT INTO ops (op) VALUES (?)", (msgpack.packb({"op": "events", "seq": 5}),))
    assert [op.get("seq") for op in j.replay()][-2:] == [4, 5]
    j.close()
    assert os.path.getsize(path) > 0


# ---- the kernel watch (health.check / verify): one logic for the server and the simulator ------------

class Kernel:
    """Answers hello and address_map as a kernel of boot ``boot`` would (or EIO while ``down``)."""

    def __init__(self, w: SWorld, boot: str = "0"):
        self.w, self.boot, self.down, self.is_mm, self.calls = w, boot, False, True, []

    def __call__(self, call, args):
        self.calls.append(call)
        if self.down:
            return Error(Errno.EIO, "no reply")
        if call == "hello":
            return {**self.w.kernel.call(MM, "hello"), "boot_id": self.boot, "is_mm": self.is_mm}
        return self.w.kcall(call, args)


def test_the_kernel_watch_verdicts():
    w = SWorld()
    k = Kernel(w)
    watch = health.KernelWatch(boot_id="0")
    check = lambda: drive(health.check(watch, w.svc), k, w.journal.extend)
    assert check().state == "up" and k.calls == ["hello"]
    k.down = True
    v = check()
    assert v.state == "down" and not v.serving and watch.lost == "no reply to hello"
    assert check().state == "down" and watch.lost == "no reply to hello"  # the first reason stays
    k.down = False
    k.calls.clear()
    v = check()
    assert v.state == "back" and v.serving and watch.lost is None and v.recovery["remaining"]["divergences"] == 0
    assert "frame_info" in k.calls  # it reconciled with the kernel's frame table
    k.boot = "1"
    v = check()
    assert v.state == "new_boot" and v.amap["frames"] == w.mm.view.n and watch.restarts == 1
    assert not v.serving  # the driver rebuilds the view for the new boot first
    watch.boot_id = "1"
    assert check().state == "up"
    k.boot, k.is_mm = "2", False
    assert check().state == "foreign" and watch.restarts == 1
    refused = drive(health.check(watch, w.svc), lambda c, a: Error(Errno.EPERM, "no"), w.journal.extend)
    assert refused.state == "refused" and watch.lost is None
    # after a resend: an answer from another boot means the kernel restarted under the mm
    k.boot, k.is_mm = "1", True
    assert drive(health.verify(watch), k, w.journal.extend) is True
    k.boot = "3"
    assert drive(health.verify(watch), k, w.journal.extend) is False and "restarted" in watch.lost
