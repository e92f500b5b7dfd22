"""The mm's sans-I/O policy and service against the in-process kernel: alloc/free, the kernel pool
(donations, watermarks, reclaims), quotas and the no-overcommit budget (I13), offers and accepts, refusals
that create nothing, client death, the audit, at-most-once across an mm crash at any effect boundary (I12),
journal records, compaction, and the kernel watch."""

from __future__ import annotations

import os
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from mm_service import health, placement
from mm_service import records as J
from mm_service.journal import Journal, JournalFormatError
from mm_service.policy import Config, drive
from mm_service.service import MMService
from mm_service.view import FREE, KERNEL, USED, View
from mm_support import (A, B, C, D, MM, OP, SWorld, World, crash_after, exact, handle_then_maintain)
from protocol import runs as R
from protocol import wire
from protocol.errors import Errno, Error


# ---- alloc and free ---------------------------------------------------------------------------------

def test_alloc_maps_frames_and_views_agree():
    w = World()
    r = w.req(A, "alloc", pages=8, prot=3)
    assert r["pages"] == 8 and r["vaddr"] % 4096 == 0
    pid = w.mm.view.clients[A].pid
    assert len(w.kernel.core.procs[pid].pages) == 8
    for first, count in r["frames"]:
        assert all(w.kernel.core.frames.refs[f] == 1 for f in range(first, first + count))
        assert all(w.mm.view.state[f] == USED for f in range(first, first + count))
    exact(w)
    w.conservation()


def test_free_returns_frames_to_the_free_view():
    w = World()
    r = w.req(A, "alloc", pages=4, prot=1)
    f = w.req(A, "free", vaddr=r["vaddr"], pages=4)
    assert f["frames"] == r["frames"]
    first, _ = r["frames"][0]
    assert w.mm.view.state[first] == FREE and w.kernel.core.frames.refs[first] == 0
    exact(w)


def test_free_of_unknown_or_partial_allocation_is_einval():
    w = World()
    r = w.req(A, "alloc", pages=4, prot=1)
    assert w.req(A, "free", vaddr=r["vaddr"] + 4096, pages=1).code == Errno.EINVAL
    assert w.req(A, "free", vaddr=r["vaddr"], pages=2).code == Errno.EINVAL
    assert w.req(B, "free", vaddr=r["vaddr"], pages=4).code == Errno.EINVAL  # not B's
    exact(w)


def test_alloc_at_a_taken_vaddr_is_ebusy_and_changes_nothing():
    w = World()
    r = w.req(A, "alloc", pages=4, prot=1, vaddr=0x1000_0000)
    digest, mark = w.kernel.core.digest(), len(w.kcalls)
    err = w.req(A, "alloc", pages=1, prot=1, vaddr=0x1000_2000)
    assert err.code == Errno.EBUSY and w.calls(mark) == []
    assert w.kernel.core.digest() == digest and r["vaddr"] == 0x1000_0000


# ---- the kernel's pool --------------------------------------------------------------------------------

def test_a_new_process_gets_its_kernel_quota_reserved_by_donating_without_the_client_seeing_enomem():
    # a tiny pool: the process's kernel quota (reserved whole at proc_create) needs more than the kernel has
    w = World(pool=2, config=Config(low=0, target=0, high=1 << 20, headroom=0))
    for i in range(40):  # 40 pages 4 MiB apart: 40 page tables, all within the reserved quota
        r = w.req(A, "alloc", pages=1, prot=3, vaddr=0x1000_0000 + i * 0x40_0000)
        assert isinstance(r, dict), r
    assert w.mm.counters.enomem_retries == 1  # once, for the quota; the page tables never need one
    (donate,) = [c for c in w.kcalls if c[0] == "donate"]
    creates = [c for c in w.kcalls if c[0] == "proc_create"]
    assert creates[0][2].code == Errno.ENOMEM and isinstance(creates[1][2], dict)
    need = creates[0][2].details
    assert R.total(donate[1]["frames"]) == need["needed"] - need["available"]  # exactly what was missing
    proc = w.kernel.core.procs[w.mm.view.clients[A].pid]
    assert proc.kernel_limit == w.mm.kernel_quota and proc.kernel_used == 2 + 40
    exact(w)
    w.conservation()


def test_watermarks_keep_the_unreserved_pool_in_range():
    w = World(pool=4, config=Config(low=32, target=64, high=128))
    w.run(w.mm.maintain())
    assert w.kernel.core.frames.free_count == 64
    assert isinstance(w.run(w.mm._donate(200)), int)
    w.run(w.mm.flush())
    assert w.kernel.core.frames.free_count == 264
    w.run(w.mm.maintain())
    assert w.kernel.core.frames.free_count == 64
    assert w.mm.counters.reclaims == 1 and w.mm.counters.reclaimed_frames == 200
    # a process reserves its quota in the pool: the watermarks count what is not reserved
    w.req(A, "alloc", pages=1, prot=3)
    k = w.kernel.core
    assert k.reserved > 0 and 32 <= k.frames.free_count - k.reserved <= 128
    assert w.mm.unreserved == k.frames.free_count - k.reserved
    exact(w)


def test_donations_are_kernel_eligible_only():
    w = World(pool=0, arch="i686-pae", memory=5 << 30, config=Config(low=8, target=16, high=64))
    w.run(w.mm.maintain())
    limit = w.kernel.core.frames.kernel_limit
    for call, args, _ in w.kcalls:
        if call == "donate":
            assert all(f + c <= limit for f, c in args["frames"])
    assert w.kernel.core.frames.free_count == 16


def test_donations_keep_large_aligned_blocks_intact():
    w = World(pool=0, config=Config(low=8, target=16, high=64))
    w.req(A, "alloc", pages=3, prot=1)  # breaks one block
    before = w.mm.view.counts()["free_large_blocks"]
    w.run(w.mm._donate(40))
    w.run(w.mm.flush())
    assert w.mm.view.counts()["free_large_blocks"] == before


def test_a_refused_donation_frees_its_frames_again():
    w = World(pool=0, config=Config(low=0, target=0, high=64))
    free = w.mm.view.free_count()
    real = w.kcall
    w.kcall = lambda call, args: Error(Errno.EBUSY, "no") if call == "donate" else real(call, args)
    assert w.run(w.mm._donate(10)).code == Errno.EBUSY
    assert w.mm.view.free_count() == free  # marked kernel-owned while in flight, free again after
    w.run(w.mm.flush())
    assert [type(r) for r in w.journal[-2:]] == [J.Donate, J.Reclaim]


def test_when_memory_is_short_the_mm_reclaims_from_the_pool_instead_of_refusing():
    w = World(pool=512, config=Config(low=0, target=0, high=1 << 20))
    user = w.mm.view.free_count()
    w.admission = lambda key: SimpleNamespace(quota=user - 10 if key == A else 200, kernel_quota=None)
    w.mm.admission = w.admission
    assert isinstance(w.req(A, "alloc", pages=user - 10, prot=3), dict)
    assert w.mm.view.free_count() < 100 and w.mm.unreserved > 100
    r = w.req(B, "alloc", pages=100, prot=3)  # within B's quota: never ENOMEM while the pool has spare frames
    assert isinstance(r, dict), r
    assert any(c[0] == "reclaim" and "count" in c[1] for c in w.kcalls)
    exact(w)


# ---- quotas and the budget (I13) ----------------------------------------------------------------------

def test_quota_is_a_clear_error():
    w = World(config=Config(low=16, target=64, high=256, quota=10))
    assert isinstance(w.req(A, "alloc", pages=8, prot=1), dict)
    err = w.req(A, "alloc", pages=3, prot=1)
    assert err.code == Errno.ENOMEM and "quota" in err.message and err.details["limit"] == 10
    assert isinstance(w.req(B, "alloc", pages=10, prot=1), dict)  # quotas are per client


def test_default_quotas_leave_room_for_the_clients_and_never_overcommit():
    w = World(pool=64, config=Config(low=16, target=32, high=256, room=4))
    mm = w.mm
    assert mm.quota + mm.kernel_quota <= mm.budget // 4
    ram = mm.view.free_count() + 64
    assert mm.budget == ram - 16  # user RAM and the boot pool, less the pool's low watermark
    keys = [f"{i:040d}" for i in range(5)]
    for key in keys[:4]:
        assert isinstance(w.req(key, "alloc", pages=mm.quota, prot=3), dict)  # each can use all of its quota
    gu, gk = mm.granted()
    assert gu + gk <= mm.budget
    # a fifth would overcommit: ENOMEM on its first request, and nothing is made for it
    mark, journal = len(w.kcalls), len(w.journal)
    err = w.req(keys[4], "alloc", pages=1, prot=3)
    assert err.code == Errno.ENOMEM and "cannot grant" in err.message
    assert "proc_create" not in w.calls(mark) and len(w.journal) == journal
    assert keys[4] not in mm.view.clients and mm.counters.grants_refused == 1
    # a client's death gives its quotas back to the budget
    w.kernel.call(MM, "proc_destroy", {"pid": mm.view.clients[keys[0]].pid})
    w.run(mm.poll_events())
    assert isinstance(w.req(keys[4], "alloc", pages=1, prot=3), dict)
    exact(w)


def test_the_admitted_certificate_may_grant_a_key_its_own_quotas():
    grants = {A: SimpleNamespace(quota=5, kernel_quota=8), B: SimpleNamespace(quota=None, kernel_quota=None)}
    w = World(admission=grants.get)
    assert isinstance(w.req(A, "alloc", pages=5, prot=3), dict)
    assert w.req(A, "alloc", pages=1, prot=3).details["limit"] == 5
    proc = w.kernel.core.procs[w.mm.view.clients[A].pid]
    assert (proc.kernel_limit, proc.user_quota) == (8, 5)
    assert isinstance(w.req(B, "alloc", pages=50, prot=3), dict)
    assert w.mm.view.clients[B].quota == w.mm.quota
    mark = len(w.kcalls)
    err = w.req(C, "alloc", pages=1, prot=3)  # not admitted (any more): refused before anything is made
    assert err.code == Errno.EPERM and w.calls(mark) == [] and C not in w.mm.view.clients
    exact(w)


def test_a_kernel_quota_enomem_is_the_clients_own_and_is_never_donated_for():
    w = World(config=Config(low=16, target=64, high=256, kernel_quota=3))  # object, root, one page table
    assert isinstance(w.req(A, "alloc", pages=1, prot=3, vaddr=0x1000_0000), dict)
    mark = len(w.kcalls)
    err = w.req(A, "alloc", pages=1, prot=3, vaddr=0x2000_0000)  # needs a second page table
    assert err.code == Errno.ENOMEM and "kernel quota" in err.message
    assert (err.details["kernel_quota"], err.details["used"]) == (3, 3)
    assert "donate" not in w.calls(mark)  # the pool has room: the limit is the client's
    assert w.mm.view.clients[A].charged == 1  # nothing of the refused request is charged
    exact(w)


def test_a_process_whose_first_map_the_kernel_refuses_is_destroyed_again():
    w = World(config=Config(low=16, target=64, high=256, kernel_quota=2))  # the process only: no page table
    err = w.req(A, "alloc", pages=1, prot=3)
    assert err.code == Errno.ENOMEM and "kernel quota" in err.message
    assert [c for c in w.calls() if c in ("proc_create", "map", "proc_destroy")] == ["proc_create", "map",
                                                                                     "proc_destroy"]
    assert A not in w.mm.view.clients and not w.kernel.core.procs and w.mm.granted() == (0, 0)
    w.run(w.mm.flush())
    v = View(w.kernel.call(MM, "address_map"), w.mm.view.block)
    for rec in w.journal:
        v.apply(rec)
    assert not v.clients and v.granted_user == 0  # the journal holds nothing lasting of it either
    exact(w)


@pytest.mark.parametrize("call, args, code", [
    ("alloc", dict(pages=1, prot=6), Errno.ENOTSUP),  # W+X
    ("alloc", dict(pages=1, prot=1, vaddr=0x1001), Errno.EINVAL),
    ("alloc", dict(pages=1, prot=1, vaddr=0xBFFF_F000 + 4096), Errno.EINVAL),
    ("alloc", dict(pages=3, prot=1, large=True), Errno.EINVAL),
    ("alloc", dict(pages=10_000, prot=1), Errno.ENOMEM),  # beyond the quota
    ("free", dict(vaddr=0x40_0000, pages=1), Errno.EINVAL),
    ("share", dict(vaddr=0x40_0000, pages=1, peer=B), Errno.EINVAL),
    ("accept", dict(offer=1), Errno.ESRCH),
])
def test_a_refused_first_request_creates_nothing(call, args, code):
    """Everything the mm can check is checked before any process, journal record or charge is made."""
    w = World(config=Config(low=0, target=0, high=1 << 20, quota=1000))
    mark = len(w.kcalls)
    err = w.req(A, call, **args)
    assert isinstance(err, Error) and err.code == code, err
    assert w.calls(mark) == [] and w.journal == [] and not w.mm.view.clients and not w.kernel.core.procs


# ---- offers and accepts -------------------------------------------------------------------------------

def _offer(w: World, frm: str = A, to: str = B, pages: int = 2, prot: int = 1) -> tuple[dict, dict]:
    if to not in w.mm.view.clients:
        assert isinstance(w.req(to, "alloc", pages=1, prot=3), dict)  # the peer needs a live process
    r = w.req(frm, "alloc", pages=pages, prot=3)
    s = w.req(frm, "share", vaddr=r["vaddr"], pages=pages, peer=to, prot=prot)
    assert isinstance(s, dict), s
    return r, s


def test_share_makes_an_offer_and_the_peer_maps_it_where_it_chooses_charged_to_itself():
    w = World()
    r, s = _offer(w)
    assert s == {"offer": s["offer"], "peer": B, "pages": 2, "prot": 1}
    f = r["frames"][0][0]
    assert w.kernel.core.frames.refs[f] == 1  # an offer maps nothing
    charged = w.mm.view.clients[B].charged
    a = w.req(B, "accept", offer=s["offer"], vaddr=0x2000_0000)
    assert a == {"vaddr": 0x2000_0000, "pages": 2, "frames": r["frames"], "offer": s["offer"], "prot": 1}
    assert w.kernel.core.frames.refs[f] == 2 and w.mm.view.refs[f] == 2
    assert w.mm.view.clients[B].charged == charged + 2 and w.mm.view.clients[A].charged == 2  # both mappers
    assert w.req(B, "accept", offer=s["offer"]).code == Errno.ESRCH  # accepted once
    # freeing the allocation releases only the freer's mapping and charge
    assert w.req(A, "free", vaddr=r["vaddr"], pages=2)["pages"] == 2
    assert w.kernel.core.frames.refs[f] == 1 and w.mm.view.state[f] == USED and w.mm.view.clients[A].charged == 0
    exact(w)
    assert w.req(B, "free", vaddr=0x2000_0000, pages=2)["pages"] == 2
    assert w.mm.view.state[f] == FREE
    exact(w)


def test_the_mm_places_an_accepted_offer_when_the_peer_does_not_say_where():
    w = World()
    _, s = _offer(w, pages=3)
    a = w.req(B, "accept", offer=s["offer"])
    assert w.mm.view.clients[B].maps[a["vaddr"]].pages == 3
    exact(w)


def test_offer_rules():
    w = World(config=Config(low=16, target=64, high=256, max_offers=3))
    r = w.req(A, "alloc", pages=1, prot=1)
    w.req(B, "alloc", pages=1, prot=3)
    share = lambda **kw: w.req(A, "share", **{"vaddr": r["vaddr"], "pages": 1, "peer": B, "prot": 1, **kw})
    assert share(prot=3).code == Errno.EPERM  # more access than the allocation has
    assert share(prot=6).code == Errno.ENOTSUP
    assert share(peer=A).code == Errno.EINVAL
    assert share(pages=2).code == Errno.EINVAL
    mark = len(w.kcalls)
    err = share(peer=C)  # no live process: nothing is made for it
    assert err.code == Errno.ESRCH and C not in w.mm.view.clients and w.calls(mark) == []
    assert w.req(B, "share", vaddr=0x7000_0000, pages=1, peer=A).code == Errno.EINVAL  # B has nothing there
    offers = [share()["offer"] for _ in range(3)]
    assert share().code == Errno.EAGAIN  # at most max_offers open
    assert w.req(C, "accept", offer=offers[0]).code == Errno.ESRCH  # not C's offer
    assert isinstance(w.req(B, "accept", offer=offers[0]), dict)
    assert isinstance(share(), dict)  # the accepted one is closed: room again
    exact(w)


def test_an_accept_refused_for_its_place_or_quota_leaves_the_offer_open():
    w = World(config=Config(low=16, target=64, high=256, quota=4))
    b = w.req(B, "alloc", pages=1, prot=3, vaddr=0x3000_0000)
    _, s = _offer(w, pages=3)
    assert w.req(B, "accept", offer=s["offer"], vaddr=b["vaddr"]).code == Errno.EBUSY
    w.req(B, "alloc", pages=1, prot=3)
    assert w.req(B, "accept", offer=s["offer"]).code == Errno.ENOMEM  # 2 + 3 > 4: the peer's own quota
    w.req(B, "free", vaddr=b["vaddr"], pages=1)
    assert isinstance(w.req(B, "accept", offer=s["offer"]), dict)
    exact(w)


def test_an_offer_dies_with_its_allocation_or_either_client():
    w = World()
    r, s1 = _offer(w)
    w.req(A, "free", vaddr=r["vaddr"], pages=2)
    assert w.req(B, "accept", offer=s1["offer"]).code == Errno.ESRCH
    _, s2 = _offer(w, to=B)
    _, s3 = _offer(w, frm=B, to=A)
    w.kernel.call(MM, "proc_destroy", {"pid": w.mm.view.clients[B].pid})
    w.run(w.mm.poll_events())
    assert not w.mm.view.offers and not w.mm.view.clients[A].offers_out and not w.mm.view.clients[A].offers_in
    del s2, s3
    exact(w)


def test_client_death_returns_its_frames_but_not_the_peers_mapping():
    w = World()
    r, s = _offer(w, pages=16)
    w.req(B, "accept", offer=s["offer"], vaddr=0x3000_0000)
    pid = w.mm.view.clients[A].pid
    w.kernel.last_seen[w.mm.view.clients[B].pid] = 10.0  # A stops calling: its lease runs out
    assert [e["pid"] for e in w.kernel.expire(now=2.0)] == [pid]
    w.mm.kernel_free = -1
    assert w.run(w.mm.poll_events()) >= 1
    assert A not in w.mm.view.clients and w.mm.counters.deaths == 1
    assert w.mm.kernel_free == w.kernel.core.frames.free_count  # the events reply carries the pool's size
    f = r["frames"][0][0]
    assert w.mm.view.refs[f] == 1  # B's mapping remains
    exact(w)
    w.kernel.core.proc_destroy(w.mm.view.clients[B].pid, "proc_destroy")
    w.run(w.mm.poll_events())
    assert w.mm.view.state[f] == FREE and w.mm.granted() == (0, 0)
    exact(w)
    w.conservation()


# ---- stats, hello, audit -------------------------------------------------------------------------------

def test_stats_and_hello_show_each_clients_quotas_charges_and_offers():
    w = World(config=Config(low=16, target=64, high=256, quota=100, kernel_quota=20))
    _, s = _offer(w, pages=3)
    you = w.req(B, "stats")["you"]
    assert (you["quota"], you["kernel_quota"], you["charged"]) == (100, 20, 1)
    assert you["offers"]["to_you"] == [{"offer": s["offer"], "from": A, "pages": 3, "prot": 1}]
    assert w.req(A, "stats")["you"]["offers"]["made"] == 1
    h = w.req(C, "hello")  # no process yet: what it would be granted
    assert (h["pid"], h["quota"], h["kernel_quota"], h["charged"]) == (None, 100, 20, 0)
    st = w.req(A, "stats")
    assert st["budget"]["granted"] == 2 * 120 and st["offers"] == 1


def test_the_audit_checks_every_charge():
    w = World()
    _, s = _offer(w)
    w.req(B, "accept", offer=s["offer"])
    report = w.audit()
    i13 = report["i13"]
    assert i13["problems"] == [] and i13["charged"] == i13["view_refs"] == i13["kernel_refs"] == 5
    assert {row["key"]: row["charged"] for row in i13["clients"]} == {A: 2, B: 3}
    w.mm.view.clients[A].charged += 1  # a planted charge error
    assert any("charged 3 pages, its mappings hold 2" in p for p in w.audit()["i13"]["problems"])
    w.mm.view.clients[A].charged -= 1
    w.kernel.core.procs[w.mm.view.clients[B].pid].kernel_limit += 1  # the kernel disagrees on a quota
    assert any("quotas" in p for p in w.audit()["i13"]["problems"])


def test_audit_finds_a_planted_divergence():
    w = World()
    w.req(A, "alloc", pages=2, prot=1)
    free = int(placement.pick(w.mm.view, 1)[0])
    w.mm.view.state[free] = KERNEL  # the mm's view lies about one frame
    report = w.audit()
    assert report["divergences"] == 1
    assert report["class_counts"]["owner_mismatch"] + report["class_counts"]["kernel_but_user"] == 1


def test_the_audit_is_the_operators():
    w = SWorld()
    assert w.send(A, "audit")["error"]["code"] == "EPERM"
    assert w.send(MM, "audit")["error"]["code"] == "EPERM"
    assert w.send(OP, "audit")["ok"] is True
    assert w.send(OP, "alloc", pages=1, prot=1)["error"]["code"] == "EPERM"  # it reads, never changes
    assert OP not in w.mm.view.clients


# ---- the replay cache -----------------------------------------------------------------------------------

def test_other_callers_traffic_never_evicts_a_live_clients_replies():
    w = SWorld()
    data = w.request("alloc", pages=1, prot=3)
    first = w.handle(A, data)
    assert wire.parse_reply(first)["ok"] is True
    for i in range(5000):  # thousands of other callers, each with a request of its own
        w.handle(f"{i:040d}", w.request("free", vaddr=0x40_0000, pages=1))
    assert w.svc.replay.evicted > 0  # others were forgotten to make room ...
    mark = len(w.kcalls)
    assert w.handle(A, data) == first and w.kernel_work(mark) == []  # ... not the live client: answered, not rerun


# ---- at-most-once across an mm crash (I12) ----------------------------------------------------------------

def _case(w: SWorld, case: str) -> tuple[str, str, dict]:
    base = w.send(A, "alloc", pages=3, prot=1)["result"]
    if case in ("share", "accept"):
        w.send(B, "alloc", pages=1, prot=3)
    offer = w.send(A, "share", vaddr=base["vaddr"], pages=3, peer=B)["result"]["offer"] if case == "accept" else 0
    return {
        "alloc": (A, "alloc", dict(pages=5, prot=3)),
        "alloc_new_client": (D, "alloc", dict(pages=5, prot=3)),  # the process is made first (ENOMEM, donate)
        "free": (A, "free", dict(vaddr=base["vaddr"], pages=3)),
        "share": (A, "share", dict(vaddr=base["vaddr"], pages=3, peer=B)),
        "accept": (B, "accept", dict(offer=offer, vaddr=0x5000_0000)),
    }[case]


@pytest.mark.parametrize("compact_every", [2000, 1], ids=["no_compaction", "compaction_after_each_request"])
@pytest.mark.parametrize("case", ["alloc", "alloc_new_client", "free", "share", "accept"])
def test_a_resend_after_a_crash_at_any_effect_boundary_is_executed_once(case, compact_every):
    """kill -9 of the mm after any effect of a request (or with the reply computed but not sent), a restart,
    then the client's resend of the same bytes: the request was executed exactly once in all, the resend is
    answered with what the first run did when the kernel had done it, and the views agree (I8, I12)."""
    n = 1
    while True:
        w = SWorld(pool=0, config=Config(low=0, target=8, high=64, headroom=0, compact_every=compact_every))
        key, call, args = _case(w, case)
        data = w.request(call, **args)
        mark, journal = len(w.kcalls), len(w.journal)
        reached = crash_after(w, lambda: handle_then_maintain(w.svc, key, data), n)
        first = w.kernel_work(mark)  # what the kernel did for the first run before the crash
        offered = [r for r in w.journal[journal:] if isinstance(r, J.Offered)]
        report = w.restart()
        assert report["remaining"]["divergences"] == 0, (case, n, report)
        mark = len(w.kcalls)
        reply = w.handle(key, data)  # the client's Lazy Pirate resend: same identity, id and bytes
        again = w.kernel_work(mark)
        got = wire.parse_reply(reply)
        assert got["ok"] is True, (case, n, got)
        if call == "share":  # no kernel call: the offer is made once, and the resend gets the same one
            assert len(w.mm.view.offers) == 1
            if offered:
                assert got["result"]["offer"] == offered[0].offer
        else:
            assert len(first) + len(again) == 1, (case, n, first, again)  # executed once, whatever the crash
        if first:  # the kernel had done it: the resend is answered from the journal, with what was done
            kargs = first[0][1]
            assert got["result"]["vaddr"] == kargs["vaddr"]
            if call != "free":
                assert got["result"]["frames"] == kargs["frames"]
        assert w.handle(key, data) == reply  # and every further resend gets the same bytes
        assert w.kernel_work(mark) == again
        pid = w.mm.view.clients[key].pid
        pages = len(w.kernel.core.procs[pid].pages)
        assert pages == {"alloc": 8, "alloc_new_client": 5, "free": 0, "share": 3, "accept": 4}[case]
        exact(w)
        w.conservation()
        n += 1
        if not reached:  # the last round ran the request whole and lost only its reply
            break
    assert n > 3 or case == "share"


def test_the_intent_is_journaled_before_the_kernel_call_and_the_outcome_before_the_reply():
    w = SWorld()
    w.send(A, "alloc", pages=1, prot=3)  # the process and its first page table
    V = 0x1000_0000
    for call, args in [("alloc", dict(pages=1, prot=3, vaddr=V)), ("free", dict(vaddr=V, pages=1))] * 3:
        effects: list[str] = []

        def kcall(c, a):
            effects.append(c)
            return w.kcall(c, a)

        def persist(ops):
            effects.append("write: " + ",".join(J.TAGS[type(r)] for r in ops))
            w.journal.extend(ops)

        reply = wire.parse_reply(drive(w.svc.handle(A, w.request(call, **args)), kcall, persist))
        assert reply["ok"] is True
        assert effects == ["write: intent", "map" if call == "alloc" else "unmap", "write: done"]
    replayed = View(w.kernel.call(MM, "address_map"), w.mm.view.block)
    for rec in w.journal:
        replayed.apply(rec)
    _assert_same_view(replayed, w.mm.view)


def test_a_refusal_after_the_request_changed_something_is_journaled_and_given_again():
    w = SWorld()
    w.send(A, "alloc", pages=1, prot=1)
    pid = w.mm.view.clients[A].pid
    shared = next(e for e in w.kernel.call(MM, "address_map")["entries"] if e["shared"])
    assert isinstance(w.kernel.call(A, "map", {"vaddr": 0x7000_0000, "frames": [[shared["first"], 1]], "prot": 1}),
                      dict)  # the client maps a kernel-shared frame there itself: the mm cannot know
    data = w.request("alloc", pages=1, prot=1, vaddr=0x7000_0000)
    mark = len(w.kcalls)
    reply = w.handle(A, data)
    assert wire.parse_reply(reply)["error"]["code"] == "EBUSY"
    assert [type(r) for r in w.journal[-2:]] == [J.Undo, J.Reply]  # one write, before the reply was sent
    w.restart()
    assert w.handle(A, data) == reply
    assert w.calls(mark).count("map") == 1  # the refused map was not tried again
    del pid


def test_a_lost_kernel_reply_is_eio_until_recovery_then_the_resend_gets_what_the_kernel_did():
    """The kernel maps but its answer is lost: the client gets EIO (again on a resend: never a second
    map); once the kernel is back and recovery finds the map done, the resend gets the allocation."""
    w = SWorld()
    w.send(A, "alloc", pages=1, prot=3)
    data = w.request("alloc", pages=2, prot=3)

    def lossy(call, args):
        result = w.kcall(call, args)
        return Error(Errno.EIO, "no reply") if call == "map" else result

    reply = drive(w.svc.handle(A, data), lossy, w.journal.extend)
    assert wire.parse_reply(reply)["error"]["code"] == "EIO" and len(w.mm.view.pending) == 1
    maps = len(w.kernel_work(0))
    assert w.handle(A, data) == reply and len(w.kernel_work(0)) == maps  # pending: the same EIO
    watch = health.KernelWatch(boot_id="0", lost="no reply to map")
    verdict = w.run(health.check(watch, w.svc))
    assert verdict.state == "back" and verdict.recovery["settled_intents"] == 1 and watch.lost is None
    exact(w)
    got = wire.parse_reply(w.handle(A, data))
    assert got["ok"] is True and got["result"]["pages"] == 2 and len(w.kernel_work(0)) == maps
    assert got["result"]["frames"] == w.kernel_work(0)[-1][1]["frames"]


# ---- journal records, replay, compaction ------------------------------------------------------------------

def test_journal_replay_rebuilds_the_same_view():
    w = World()
    _, s = _offer(w, pages=7)
    w.req(B, "accept", offer=s["offer"], vaddr=0x4000_0000)
    w.req(A, "alloc", pages=2, prot=1)
    _offer(w, frm=B, to=A)
    w.run(w.mm.flush())
    old = w.mm
    w.mm = w.new_mm()
    w.mm.replay(w.journal)
    _assert_same_view(w.mm.view, old.view)
    assert w.run(w.mm.recover())["found"]["divergences"] == 0


def test_every_record_has_one_wire_form():
    recs = [J.NewClient(A, 1, 10, 20), J.ClientGone(A), J.Intent(3, "map", A, 4096, 1, [[5, 1]], 3, False, 2, B, 7,
                                                                   b"d" * 16),
            J.Done(3), J.Undo(4), J.Offered(1, A, 4096, 1, 1, B), J.Donate([[1, 2]]), J.Reclaim([[1, 2]]),
            J.EventsRead(9), J.Reply(A, 1, b"x", b"y"), J.Repair([[1, 1]], USED, 2),
            J.RepairMapping(A, 4096, [[4096, 1, 5, 3, 0]]), J.Snapshot({"v": 2})]
    assert {type(r) for r in recs} == set(J.TAGS)
    for r in recs:
        wire_form = msgpack.unpackb(msgpack.packb(J.encode(r), use_bin_type=True), raw=False)
        assert J.decode(wire_form) == r
    with pytest.raises(J.RecordError, match="unknown journal record kind"):
        J.decode(["nope", 1])
    with pytest.raises(J.RecordError, match="fields"):
        J.decode(["done"])


def test_a_journal_of_the_old_format_is_refused_with_a_clear_message(tmp_path):
    path = str(tmp_path / "mm.db")
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE ops (seq INTEGER PRIMARY KEY, op BLOB NOT NULL)")
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('boot_id', 'b1')")
    db.execute("INSERT INTO ops (op) VALUES (?)", (msgpack.packb([{"op": "events", "seq": 1}]),))
    db.commit()
    db.close()
    with pytest.raises(JournalFormatError, match="earlier mm .format 1."):
        Journal.open_for_boot(path, "b1")
    j, moved = Journal.open_for_boot(path, "b2")  # another boot's journal is set aside, whatever its format
    assert moved and list(j.replay()) == []
    j.close()


def _assert_same_view(a: View, b: View) -> None:
    for name in ("state", "refs", "bfree", "bowner", "never_whole"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.alive == b.alive and a.next_tag == b.next_tag
    assert np.array_equal(a.alive_tags[: a.next_tag], b.alive_tags[: b.next_tag])
    assert (a.event_seq, a.last_intent, a.last_offer, a.ram) == (b.event_seq, b.last_intent, b.last_offer, b.ram)
    assert a.pending == b.pending and a.by_pid == b.by_pid and a.offers == b.offers
    assert (a.granted_user, a.granted_kernel) == (b.granted_user, b.granted_kernel)
    assert list(a.clients) == list(b.clients)
    for key, ca in a.clients.items():
        cb = b.clients[key]
        assert (ca.pid, ca.tag, ca.charged, ca.va_next, ca.starts, ca.quota, ca.kernel_quota) == \
            (cb.pid, cb.tag, cb.charged, cb.va_next, cb.starts, cb.quota, cb.kernel_quota)
        assert (ca.offers_in, ca.offers_out) == (cb.offers_in, cb.offers_out)
        assert ca.maps == cb.maps and list(ca.maps) == list(cb.maps)
    for owner in sorted(a.alive) + [a.next_tag]:  # the next request is placed the same way
        for n in (1, 37):
            pa, pb = placement.pick(a, n, owner=owner), placement.pick(b, n, owner=owner)
            assert (pa is None and pb is None) or np.array_equal(pa, pb)


def _churn(w: SWorld, steps: int, seed: int = 7) -> list[bytes]:
    """Seeded alloc/free/share/accept/death traffic; the replies."""
    keys = [f"{i:040d}" for i in range(6)]
    rng = np.random.default_rng(seed)
    live: dict[str, list] = {k: [] for k in keys}
    offers: dict[str, list[int]] = {k: [] for k in keys}
    replies = []
    for step in range(steps):
        key = keys[int(rng.integers(len(keys)))]
        if key in w.mm.view.clients and step % 61 == 0:
            w.kernel.call(MM, "proc_destroy", {"pid": w.mm.view.clients[key].pid})
            w.run(w.mm.poll_events())
            live[key], offers[key] = [], []
            continue
        roll = rng.random()
        if live[key] and roll < 0.4:
            r = live[key].pop(int(rng.integers(len(live[key]))))
            data = w.request("free", vaddr=r["vaddr"], pages=r["pages"])
        elif live[key] and roll < 0.5:
            r = live[key][0]
            peer = keys[int(rng.integers(len(keys)))]
            data = w.request("share", vaddr=r["vaddr"], pages=r["pages"], peer=peer)
        elif offers[key] and roll < 0.6:
            data = w.request("accept", offer=offers[key].pop())
        else:
            data = w.request("alloc", pages=int(rng.integers(1, 40)), prot=3)
        reply = w.handle(key, data)
        replies.append(reply)
        got = wire.parse_reply(reply)
        call = wire.decode(data)["call"]
        if got["ok"] and call in ("alloc", "accept"):
            live[key].append(got["result"])
        elif got["ok"] and call == "share":
            offers[got["result"]["peer"]].append(got["result"]["offer"])
    return replies


def test_compaction_rebuilds_exactly_the_same_view_and_changes_no_decision():
    plain = SWorld(pool=16, config=Config(low=8, target=32, high=128, compact_every=10**9))
    compacted = SWorld(pool=16, config=Config(low=8, target=32, high=128, compact_every=40))
    assert _churn(plain, 300) == _churn(compacted, 300)  # the same replies, byte for byte
    for w in (plain, compacted):
        w.run(w.mm.flush())
    _assert_same_view(plain.mm.view, compacted.mm.view)
    snaps = [i for i, r in enumerate(compacted.journal) if isinstance(r, J.Snapshot)]
    assert len(snaps) >= 5
    amap = compacted.kernel.call(MM, "address_map")
    tail = compacted.journal[snaps[-1]:]  # what the compacted journal holds: the last snapshot and what follows
    assert len(tail) < 60 and len(plain.journal) > 500
    for journal in (tail, compacted.journal, plain.journal):
        v = View(amap, compacted.mm.view.block)
        for rec in journal:
            v.apply(rec)
        _assert_same_view(v, compacted.mm.view)
    # a restart from the compacted journal: the same view, every recent durable reply, nothing to repair
    svc = MMService(compacted.new_mm(), MM, OP)
    assert svc.restore(tail) == len(tail)
    _assert_same_view(svc.core.view, compacted.mm.view)
    assert svc.core.intent_no == compacted.mm.intent_no and svc.core.offer_no == compacted.mm.offer_no
    assert svc.durable.replies == compacted.svc.durable.replies  # what the next snapshot keeps
    for key, cache in compacted.svc.durable.replies.items():  # all answered again after the restart
        assert all(svc.replay.replies[key][i] == hit for i, hit in cache.items())
    compacted.mm, compacted.svc = svc.core, svc
    assert compacted.run(svc.recover())["found"]["divergences"] == 0
    exact(compacted)


def test_journal_compaction_on_disk_is_one_transaction(tmp_path):
    path = str(tmp_path / "mm.db")
    j = Journal(path)
    j.append([J.EventsRead(1)])
    j.append([J.EventsRead(2), J.EventsRead(3)])
    assert j.count() == 3
    w = SWorld()
    w.send(A, "alloc", pages=3, prot=3)
    snap = w.mm.snapshot()

    class FailingInsert:  # the process dies between deleting the old records and writing the snapshot
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
    assert [r.seq for r in j.replay()] == [1, 2, 3]  # nothing changed
    j.append([J.EventsRead(4), snap])  # (a batch holding a snapshot: what came before it is in it too)
    j.append([J.EventsRead(5)])
    j.close()
    j = Journal(path)
    recs = list(j.replay())
    assert [type(r) for r in recs] == [J.Snapshot, J.EventsRead] and j.count() == 2
    assert j.db.execute("SELECT COUNT(*) FROM ops").fetchone()[0] == 2  # the old rows are gone
    v = View(w.kernel.call(MM, "address_map"), w.mm.view.block)
    v.apply(recs[0])
    _assert_same_view(v, w.mm.view)
    j.close()
    assert os.path.getsize(path) > 0


# ---- the kernel watch (health.check) ------------------------------------------------------------------------

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
