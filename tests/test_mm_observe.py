"""The mm's observer seam (``mm_service.observe``): every change of the view is reported as the record
that made it, and every request the service executes (a replay-cache miss) is reported once. A view
mutator that changes the view without going through ``View.apply`` (and so without a report) fails here,
as does a request executed without a report."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_service import records as J
from mm_service.observe import MMObserver
from mm_service.policy import Config, drive
from mm_service.service import MMService
from mm_service.view import KERNEL, View
from mm_support import A, B, C, MM, OP, SWorld
from protocol import runs as R
from protocol import wire
from protocol.errors import Errno, Error

KEYS = (A, B, C)


def view_state(v: View) -> tuple:
    """Everything of the view a record may change, as a value."""
    clients = sorted(
        (k, c.pid, c.tag, c.quota, c.kernel_quota, c.charged, c.va_next, sorted(c.offers_out), sorted(c.offers_in),
         sorted((m.vaddr, m.pages, m.prot, m.large, repr(m.frames), m.offer, m.pending) for m in c.maps.values()))
        for k, c in v.clients.items())
    offers = sorted((o.offer, o.key, o.vaddr, o.pages, o.prot, o.peer, o.taken) for o in v.offers.values())
    return (v.state.tobytes(), v.refs.tobytes(), v.bfree.tobytes(), v.bowner.tobytes(), clients, offers,
            sorted(v.pending), v.event_seq, v.last_intent, v.last_offer, v.granted_user, v.granted_kernel,
            v.next_tag)


class Watch(MMObserver):
    """Remembers the view as of its last report; ``unreported()`` says whether it changed since."""

    def __init__(self) -> None:
        self.view: View | None = None
        self.last: tuple | None = None
        self.records: list[Any] = []
        self.misses: list[tuple[str, int]] = []

    def bind(self, view: View) -> None:
        self.view = view
        self.last = view_state(view)
        self.records = []

    def applied(self, record: Any) -> None:
        assert self.view is not None
        self.records.append(record)
        self.last = view_state(self.view)

    def replay_miss(self, identity: str, req_id: int) -> None:
        self.misses.append((identity, req_id))

    def unreported(self) -> bool:
        assert self.view is not None
        return view_state(self.view) != self.last


def watched(w: SWorld, watch: Watch) -> None:
    watch.bind(w.mm.view)
    w.svc.set_observer(watch)


def run_checked(w: SWorld, watch: Watch, gen: Any, outcome: str = "ok") -> Any:
    """Run an operation effect by effect, its map/unmap calls answered (``outcome`` "ok"), executed with the
    reply lost ("done_lost") or lost before the kernel saw them ("not_done"); after each effect the view is
    what it was at its last report."""
    value = None
    while True:
        try:
            effect = gen.send(value)
        except StopIteration as stop:
            assert not watch.unreported(), "the view changed without a report"
            return stop.value
        assert not watch.unreported(), f"the view changed without a report (before {type(effect).__name__})"
        if isinstance(effect, tuple) and type(effect).__name__ == "KCall":
            lost = outcome != "ok" and effect.call in ("map", "unmap")
            value = Error(Errno.EIO, "no reply") if lost and outcome == "not_done" else w.kcall(effect.call,
                                                                                               effect.args)
            if lost:
                value = Error(Errno.EIO, "no reply")
        else:
            w.journal.extend(effect.ops)
            value = None


@given(data=st.data())
@settings(max_examples=30, deadline=None)
def test_every_view_change_is_reported(data):
    """Random requests (the kernel answering, or its replies lost), restarts from the journal, recoveries,
    housekeeping and compaction: after every effect, the view is exactly what it was when the last record
    was reported; the records reported rebuild the view."""
    w = SWorld(memory=16 << 20, pool=32, config=Config(low=8, target=32, high=256, compact_every=20))
    watch = Watch()
    watched(w, watch)
    held: dict[str, list[tuple[int, int]]] = {k: [] for k in KEYS}
    offers: dict[str, list[int]] = {k: [] for k in KEYS}
    for _ in range(data.draw(st.integers(3, 25))):
        op = data.draw(st.sampled_from(["alloc", "alloc", "free", "share", "accept", "restart", "maintain", "compact",
                                        "death", "events"]))
        key = data.draw(st.sampled_from(KEYS))
        lost = data.draw(st.sampled_from(["ok", "ok", "done_lost", "not_done"]))
        if op in ("alloc", "free", "share", "accept"):
            args: dict[str, Any] = {}
            if op == "alloc":
                args = {"pages": data.draw(st.integers(1, 6)), "prot": 3}
            elif op in ("free", "share"):
                if not held[key]:
                    continue
                vaddr, pages = data.draw(st.sampled_from(held[key]))
                args = {"vaddr": vaddr, "pages": pages}
                if op == "share":
                    args.update(peer=data.draw(st.sampled_from([k for k in KEYS if k != key])), prot=1)
            else:
                if not offers[key]:
                    continue
                args = {"offer": offers[key].pop()}
            reply = wire.parse_reply(run_checked(w, watch, w.svc.handle(key, w.request(op, **args)), lost))
            if reply["ok"]:
                r = reply["result"]
                if op in ("alloc", "accept"):
                    held[key].append((r["vaddr"], r["pages"]))
                elif op == "free":
                    held[key].remove((args["vaddr"], args["pages"]))
                else:
                    offers[r["peer"]].append(r["offer"])
        elif op == "restart":
            w.mm = w.new_mm()
            w.svc = MMService(w.mm, MM, OP)
            watched(w, watch)
            w.svc.restore(w.journal)
            assert not watch.unreported()
            run_checked(w, watch, w.svc.recover())
        elif op == "maintain":
            run_checked(w, watch, w.svc.maintain())
        elif op == "death":  # the client's process ends (its lease ran out): the mm hears of it later
            pid = w.kernel.core.by_key.get(key)
            if pid is not None:
                w.kernel.call(MM, "proc_destroy", {"pid": pid})
                held[key], offers[key] = [], []
        elif op == "events":
            run_checked(w, watch, w.mm.poll_events())
        else:
            run_checked(w, watch, w.svc.compact())
    run_checked(w, watch, w.mm.flush())
    # the records reported since this view was made, applied in order to a fresh view, rebuild it exactly
    again = w.new_mm()
    for rec in watch.records:
        again.view.apply(rec)
    assert view_state(again.view) == view_state(w.mm.view)


class MarksDonations(View):
    """A view with a new mutator that changes frame states itself, without a record (and so no report)."""

    def mark_kernel(self, runs: list) -> None:
        self._set(R.to_array(runs), KERNEL)


def test_a_view_mutator_that_does_not_report_is_caught():
    """The check above fails for a change made outside ``View.apply``."""
    w = SWorld(memory=16 << 20, pool=32, config=Config(low=8, target=32, high=256))
    watch = Watch()
    watched(w, watch)
    v = w.mm.view
    v.__class__ = MarksDonations
    free = int((v.state == 2).nonzero()[0][0])

    def sneaky() -> Any:
        v.mark_kernel([[free, 1]])  # type: ignore[attr-defined]
        yield from w.mm.refresh()

    with pytest.raises(AssertionError, match="without a report"):
        run_checked(w, watch, sneaky())
    # the same change made as a record is reported
    w2 = SWorld(memory=16 << 20, pool=32, config=Config(low=8, target=32, high=256))
    watch2 = Watch()
    watched(w2, watch2)

    def recorded() -> Any:
        w2.mm.record(J.Donate([[free, 1]]))
        yield from w2.mm.refresh()

    run_checked(w2, watch2, recorded())
    assert isinstance(watch2.records[-1], J.Donate)


def test_every_request_executed_is_reported_once():
    """A request missing the replay cache is reported (then executed); a resend of the same bytes is answered
    from the cache and reported no more; malformed and unauthenticated requests are not executed."""
    w = SWorld(memory=16 << 20, pool=32, config=Config(low=8, target=32, high=256))
    watch = Watch()
    watched(w, watch)
    data = w.request("alloc", pages=2, prot=3)
    first = w.handle(A, data)
    assert watch.misses == [(A, w.rid)]
    assert w.handle(A, data) == first and watch.misses == [(A, w.rid)]
    w.handle(B, w.request("hello"))
    assert watch.misses[-1] == (B, w.rid) and len(watch.misses) == 2
    drive(w.svc.handle(A, b"\x93garbage"), w.kcall, w.journal.extend)
    drive(w.svc.handle(None, w.request("hello")), w.kcall, w.journal.extend)
    assert len(watch.misses) == 2
    # the default observer: nothing is reported, nothing breaks
    w.svc.set_observer(None)
    w.handle(A, w.request("alloc", pages=1, prot=3))
    assert len(watch.misses) == 2 and not w.svc._watched and not w.mm.view._watched
