"""Exact settlement: after a crash or a kernel that was away, the mm settles each pending intent on its own,
in journal order, by asking the kernel what that process maps in that range, never by comparing reference
counts of frames several intents share. Every order of executed / not executed (reply lost) / answered EIO
without being sent, for map and unmap intents on the same shared frames (allocs, accepts of offers, frees
of allocations and of accepted offers), with the mm restarted from its journal or the same mm settling when
the kernel is back, and with the mm killed in the middle of recovery itself. After recovery the view is the
kernel's on every frame and every page of every process, nothing is pending, and every request's resend
gets the reply of what the kernel did (executed once at most, I12)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from mm_service import health, placement
from mm_service.policy import Config, drive
from mm_service.service import MMService
from mm_support import A, B, C, MM, OP, SWorld, crash_after, exact
from protocol import wire
from protocol.errors import Errno, Error

OUTCOMES = ("ok", "done_lost", "not_done", "failfast")
# ok: executed and answered; done_lost: executed, the reply lost (EIO); not_done: the request lost (EIO);
# failfast: the mm knew the kernel was away and answered EIO at once, sending nothing


class Script:
    """Requests sent through the service, each map/unmap kernel call getting a planned outcome."""

    def __init__(self, w: SWorld) -> None:
        self.w = w
        self.sent: list[dict[str, Any]] = []  # {key, data, reply, executed: kernel calls it made}

    def send(self, key: str, call: str, outcome: str = "ok", **args: Any) -> dict:
        w = self.w
        data = w.request(call, **args)
        executed: list = []

        def kernel(c: str, a: dict) -> Any:
            if c not in ("map", "unmap") or outcome == "ok":
                r = w.kcall(c, a)
                if c in ("map", "unmap") and isinstance(r, dict):
                    executed.append((c, a))
                return r
            if outcome == "done_lost":
                r = w.kcall(c, a)
                if isinstance(r, dict):
                    executed.append((c, a))
            return Error(Errno.EIO, f"no reply from the kernel to {c}")

        reply = drive(w.svc.handle(key, data), kernel, w.journal.extend)
        got = wire.parse_reply(reply)
        self.sent.append({"key": key, "data": data, "reply": got, "executed": executed, "call": call})
        return got


def _setup(w: SWorld) -> dict[str, Any]:
    """A holds X (3 pages) and has offered it to B and to C; B and C have processes of their own."""
    x = w.send(A, "alloc", pages=3, prot=3)["result"]
    w.send(B, "alloc", pages=1, prot=3)
    w.send(C, "alloc", pages=1, prot=3)
    ob = w.send(A, "share", vaddr=x["vaddr"], pages=3, peer=B, prot=1)["result"]["offer"]
    oc = w.send(A, "share", vaddr=x["vaddr"], pages=3, peer=C, prot=1)["result"]["offer"]
    return {"x": x, "ob": ob, "oc": oc}


def _accept_b_first(w: SWorld, s: dict) -> None:
    s["xb"] = w.send(B, "accept", offer=s["ob"], vaddr=0x6000_0000)["result"]


SCRIPTS = {
    # two and three pending intents mapping the same frames
    "accept_b,accept_c": (None, lambda sc, s, o: [
        sc.send(B, "accept", o[0], offer=s["ob"], vaddr=0x6000_0000),
        sc.send(C, "accept", o[1], offer=s["oc"])]),
    "accept_b,accept_c,free_a": (None, lambda sc, s, o: [
        sc.send(B, "accept", o[0], offer=s["ob"], vaddr=0x6000_0000),
        sc.send(C, "accept", o[1], offer=s["oc"]),
        sc.send(A, "free", o[2], vaddr=s["x"]["vaddr"], pages=3)]),
    # the free of an accepted offer and the free of the allocation it came from
    "free_b_share,free_a": (_accept_b_first, lambda sc, s, o: [
        sc.send(B, "free", o[0], vaddr=0x6000_0000, pages=3),
        sc.send(A, "free", o[1], vaddr=s["x"]["vaddr"], pages=3)]),
    # an alloc, an accept and a free pending together
    "alloc_a,accept_c,free_a": (None, lambda sc, s, o: [
        sc.send(A, "alloc", o[0], pages=2, prot=3),
        sc.send(C, "accept", o[1], offer=s["oc"], vaddr=0x7000_0000),
        sc.send(A, "free", o[2], vaddr=s["x"]["vaddr"], pages=3)]),
}


def _cases() -> list:
    out = []
    for name, (_, body) in SCRIPTS.items():
        n = name.count(",") + 1
        for outcomes in itertools.product(OUTCOMES, repeat=n):
            out.append((name, outcomes))
    return out


def _resends_match_the_kernel(w: SWorld, sent: list[dict]) -> None:
    """Each request's resend gets what the kernel did: the result if it executed (and nothing runs again);
    otherwise it runs now (once) or is refused (and runs nothing)."""
    for r in sent:
        mark = len(w.kcalls)
        got = wire.parse_reply(w.handle(r["key"], r["data"]))
        again = w.kernel_work(mark)
        first = r["executed"]
        assert len(first) + len(again) <= 1, (r["call"], first, again)  # at most once (I12)
        if first:
            assert got["ok"] is True and not again, (r["call"], got)
            kargs = first[0][1]
            assert got["result"]["vaddr"] == kargs["vaddr"]
            if r["call"] != "free":
                assert got["result"]["frames"] == kargs["frames"]
        elif got["ok"]:
            assert len(again) == 1, (r["call"], got)  # it had had no effect: it ran now, once
        assert w.handle(r["key"], r["data"]) == w.handle(r["key"], r["data"])  # and then answers stay the same


@pytest.mark.parametrize("mode", ["restart", "kernel_back"])
@pytest.mark.parametrize("name,outcomes", _cases(), ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_pending_intents_on_shared_frames_settle_one_at_a_time(name, outcomes, mode):
    w = SWorld(memory=16 << 20, pool=64, config=Config(low=8, target=32, high=256))
    s = _setup(w)
    before, body = SCRIPTS[name]
    if before:
        before(w, s)
    sc = Script(w)
    body(sc, s, outcomes)
    for r, o in zip(sc.sent, outcomes):
        assert r["reply"]["ok"] is True or o != "ok", (o, r["reply"])
    if mode == "restart":
        report = w.restart()
    else:
        watch = health.KernelWatch(boot_id="0", lost="no reply")
        verdict = w.run(health.check(watch, w.svc))
        assert verdict.state == "back"
        report = verdict.recovery
    assert report["remaining"]["divergences"] == 0, report
    assert w.mm.counters.anomalies == 0 and w.mm.counters.refs_repaired == 0  # settled exactly, nothing to repair
    exact(w)
    _resends_match_the_kernel(w, sc.sent)
    exact(w)


def test_the_case_that_reference_counts_got_wrong():
    """A allocs X and offers it to B and C. B's accept is mapped but its reply is lost (the kernel counts as
    away); C's accept is answered EIO without being sent. Judged against reference counts together both
    look undone and B would keep a mapping the mm forgot; then A's free of X would hand X out while B still
    maps it. Settled one at a time, B's is done and C's undone."""
    w = SWorld(memory=16 << 20, pool=64, config=Config(low=8, target=32, high=256))
    s = _setup(w)
    sc = Script(w)
    sc.send(B, "accept", "done_lost", offer=s["ob"], vaddr=0x6000_0000)
    sc.send(C, "accept", "failfast", offer=s["oc"])
    w.restart()
    exact(w)
    assert w.mm.view.clients[B].maps[0x6000_0000].frames == s["x"]["frames"]
    assert 0x6000_0000 not in w.mm.view.clients[C].maps
    w.send(A, "free", vaddr=s["x"]["vaddr"], pages=3)
    f = s["x"]["frames"][0][0]
    assert w.mm.view.refs[f] == 1 == w.kernel.core.frames.refs[f]  # B's mapping keeps X in use
    exact(w)


def test_a_crash_during_recovery_is_settled_by_recovering_again():
    """kill -9 of the mm after any effect of its recovery: the next recovery, from the journal, settles
    what the first did not (whatever it had journaled or done in the kernel)."""
    plan = ("done_lost", "not_done", "done_lost")
    n = 1
    while True:
        w = SWorld(memory=16 << 20, pool=64, config=Config(low=8, target=32, high=256))
        s = _setup(w)
        sc = Script(w)
        sc.send(B, "accept", plan[0], offer=s["ob"], vaddr=0x6000_0000)
        sc.send(C, "accept", plan[1], offer=s["oc"])
        sc.send(A, "free", plan[2], vaddr=s["x"]["vaddr"], pages=3)
        w.mm = w.new_mm()
        w.svc = MMService(w.mm, MM, OP)
        w.svc.restore(w.journal)
        reached = crash_after(w, w.svc.recover, n)
        report = w.restart()
        assert report["remaining"]["divergences"] == 0, (n, report)
        exact(w)
        _resends_match_the_kernel(w, sc.sent)
        exact(w)
        n += 1
        if not reached:
            break
    assert n > 5


def test_an_intent_the_kernel_shows_neither_done_nor_undone_is_reported_and_repaired():
    w = SWorld(memory=16 << 20, pool=64, config=Config(low=8, target=32, high=256))
    w.send(A, "alloc", pages=1, prot=3)
    sc = Script(w)
    sc.send(A, "alloc", "not_done", pages=2, prot=3, vaddr=0x2000_0000)
    other = int(placement.pick(w.mm.view, 1)[0])
    pid = w.mm.view.clients[A].pid
    assert isinstance(w.kernel.call(MM, "map", {"pid": pid, "vaddr": 0x2000_0000, "frames": [[other, 1]],
                                                "prot": 3}), dict)  # something else got mapped there
    report = w.restart()
    assert w.mm.counters.anomalies == 1 and report["remaining"]["divergences"] == 0
    assert any("neither done nor undone" in t for t in w.mm.take_reports())
    exact(w)


def test_a_mapping_the_view_lost_is_found_and_taken_on_never_handed_out():
    """The journal lost a client's records (planted): recovery takes on the process the kernel has, reads
    its address space because reference counts differ, and the view charges what it maps; no frame the
    kernel shows mapped is handed out."""
    w = SWorld(memory=16 << 20, pool=64, config=Config(low=8, target=32, high=256))
    w.send(A, "alloc", pages=1, prot=3)
    got = w.send(B, "alloc", pages=5, prot=3)["result"]
    w.run(w.mm.flush())
    from mm_service import records as J
    w.journal = [r for r in w.journal if getattr(r, "key", None) != B]
    report = w.restart()
    assert w.mm.counters.adopted == 1 and w.mm.counters.refs_repaired == 5
    assert report["remaining"]["divergences"] == 0
    exact(w)
    assert w.mm.view.clients[B].charged == 5
    frames = {f for first, n in got["frames"] for f in range(first, first + n)}
    r = w.send(A, "alloc", pages=100, prot=3)["result"]
    assert not frames & {f for first, n in r["frames"] for f in range(first, first + n)}
    del J
