"""Lying clients (``mmsim client attack``) against a real kernel and mm, the catalogue in-process, and the
checker against a liar.

``attack --all`` must pass against the real system with exactly the refusals the design names (checked
here against an independent table, written from the design's refusal order, not read from the
catalogue), leave nothing behind (audit: 0 divergences once the leases ran out), and FAIL against servers
that accept every lie, so the attacks are not checks that cannot fail. In-process, every lie of the
catalogue (the mm key's holder's too) gets its refusal from the kernel's service and the mm's driver and
changes nothing, on every profile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import pytest
from typer.testing import CliRunner

from clients import catalogue as CAT
from clients.attacks import ATTACKS, run_attacks, verdict_error, verdict_no_reply
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, USER
from mm_service import driver as D
from mm_service.policy import Config
from mm_support import MM, OP
from mmsim.cli import app
from mmsim.system import System
from protocol import wire
from protocol.errors import Errno
from test_clients import LyingServers, plausible  # the fake servers live with the runner's tests
from test_mm_driver import Harness

# What the design says each lie gets, kept apart from clients.catalogue: every part of a kind starts with
# its kind's refusal, unless OVERRIDE names another for that part's label.
REFUSAL = {
    "anonymous": "no reply", "mm-anonymous": "no reply", "wrong-server-key": "no reply",
    "mm-wrong-server-key": "no reply", "unknown-key": "no reply", "mm-unknown-key": "no reply",
    "forged-routing-id": "EPERM",
    "donate-unprivileged": "EPERM", "reclaim-unprivileged": "EPERM", "proc-create-unprivileged": "EPERM",
    "stranger-donate-unprivileged": "EPERM", "stranger-reclaim-unprivileged": "EPERM",
    "stranger-proc-create-unprivileged": "EPERM", "proc-destroy-unprivileged": "EPERM",
    "frame-info-unprivileged": "EPERM", "events-unprivileged": "EPERM", "mappings-unprivileged": "EPERM",
    "stats-listing": "EPERM", "mm-audit-unprivileged": "EPERM",
    "foreign-pid-map": "EPERM", "foreign-pid-unmap": "EPERM", "foreign-frame-map": "EPERM",
    "foreign-vaddr-unmap": "EINVAL", "foreign-objects": "ESRCH", "mm-free-foreign": "EINVAL",
    "mm-share-foreign": "EINVAL", "mm-accept-foreign": "ESRCH", "mm-share-unsolicited": "ESRCH",
    "mm-share-more-rights": "EPERM", "map-kernel-frame": "EPERM", "map-boot-image-writable": "EPERM",
    "map-wx": "ENOTSUP", "map-unaligned": "EINVAL(field=vaddr)", "map-out-of-range": "EINVAL(field=vaddr)",
    "bad-runs": "EINVAL(field=frames", "too-many-runs": "E2BIG", "unmap-mm-memory": "EPERM",
    "stranger-no-process": "ESRCH", "mm-alloc-wx": "ENOTSUP", "stranger-mm-alloc-wx": "ENOTSUP",
    "mm-quota": "ENOMEM", "stranger-mm-quota": "ENOMEM", "mm-alloc-out-of-range": "EINVAL(field=",
    "expanding-runs": "E2BIG", "garbage-bytes": "EPROTO", "mm-garbage-bytes": "EPROTO",
    "bad-envelope": "EPROTO", "mm-bad-envelope": "EPROTO", "container-limits": "E2BIG",
    "mm-container-limits": "E2BIG", "oversized-message": "E2BIG", "mm-oversized-message": "E2BIG",
    "unknown-call": "ENOSYS", "mm-unknown-call": "ENOSYS", "multi-frame": "EPROTO", "mm-multi-frame": "EPROTO",
    "wrong-types": "EINVAL(field=", "mm-wrong-types": "EINVAL(field=", "unknown-fields": "EINVAL(field=",
    "mm-unknown-fields": "EINVAL(field=",
    # the mm key's holder (in-process only: a live attacker never holds the mm's key)
    "mm-key-donate": "EINVAL", "mm-key-reclaim": "EBUSY", "mm-key-map": "EPERM", "mm-key-proc": "EINVAL",
}
OVERRIDE = {
    ("forged-routing-id", "hello"): "ok",
    ("mm-share-unsolicited", "to itself"): "EINVAL(field=peer)",
    ("map-kernel-frame", "a large page over the kernel image (more pages than a client maps)"): "E2BIG",
    ("map-out-of-range", "a frame beyond RAM"): "EINVAL",
    ("map-out-of-range", "a frame beyond any"): "EINVAL(field=frames",
    ("stranger-no-process", "free"): "EINVAL", ("stranger-no-process", "share"): "EINVAL",
    ("expanding-runs", "frame_info of everything, as a client"): "EPERM",
    ("expanding-runs", "an alloc of more pages than one call takes"): "EINVAL(field=pages)",
    ("expanding-runs", "an alloc past the mm's per-alloc limit"): "EINVAL(field=pages)",
    ("expanding-runs", "a free of 2**20 pages"): "EINVAL",
    ("bad-envelope", "call name of 1000 bytes"): "E2BIG", ("mm-bad-envelope", "call name of 1000 bytes"): "E2BIG",
    ("container-limits", "a string that claims 2**32 bytes and ends"): "EPROTO",
    ("container-limits", "arrays nested 3000 deep"): "EPROTO",
    ("mm-container-limits", "a string that claims 2**32 bytes and ends"): "EPROTO",
    ("mm-container-limits", "arrays nested 3000 deep"): "EPROTO",
    ("oversized-message", "100 KiB (the transport drops it)"): "no reply",
    ("mm-oversized-message", "100 KiB (the transport drops it)"): "no reply",
    ("wrong-types", "count 1.5 (a call it may not make)"): "EPERM",
    ("mm-key-donate", "a mapped user frame"): "EBUSY", ("mm-key-donate", "a kernel frame"): "EEXIST",
    ("mm-key-reclaim", "a user frame"): "EINVAL", ("mm-key-map", "W+X"): "ENOTSUP",
    ("mm-key-map", "no pid"): "EINVAL", ("mm-key-map", "a process that does not exist"): "ESRCH",
    ("mm-key-proc", "destroy a process that does not exist"): "ESRCH",
}
# Procedures and classes: a part's label -> what that part must have got (a prefix).
SPECIAL = {
    "replay-different": {"thread_create with the ping's id": "EINVAL(field=id)"},
    "mm-replay-different": {"alloc with the ping's id": "EINVAL(field=id)"},
    "replay-identical": {"executed once": "threads 0 -> 1"},
    "mm-replay-alloc": {"same answer": "ok, ok"},
    "flood": {"answers": "0 wrong"},
    "mm-flood": {"answers": "0 wrong"},
    "stranger-flood": {"strangers served": "0 of"},
    "costly-requests": {"each its own refusal": "yes"},
    "kernel-frames": {"map past the quota": "ENOMEM", "endpoint_create past the quota": "ENOMEM",
                      "thread_create past the quota": "ENOMEM", "refusals at full speed": "ENOMEM x"},
    "share-laundering": {"accept past the peer's quota": "ENOMEM x"},
    "unsolicited-mapping": {"no process made": "processes"},
    "many-keys": {"no process for a refused key": "0 of"},
    "refused-creates-nothing": {"no process": "kernel pid None, mm pid None", "no charge": "charged 0"},
    "replay-cache-flood": {"kernel retry answered from the cache": "ok then ok, same",
                           "mm retry answered from the cache": "ok then ok, same"},
    "unread-replies": {"the servers worked through it": "yes"},
    "stats-bounded": {"every answer small": "kernel up to"},
}
VICTIM = ("victim errors", "victim process", "victim progress", "victim p99")


def expected(kind: str, label: str) -> str:
    return OVERRIDE.get((kind, label), REFUSAL.get(kind, ""))


def test_every_attack_has_an_independent_expectation() -> None:
    assert set(ATTACKS) == ({x.kind for x in CAT.LIES if x.teller is not CAT.Teller.MM_KEY} | set(SPECIAL))
    assert {x.kind for x in CAT.LIES} <= set(REFUSAL)
    for x in CAT.LIES:  # the catalogue and the table agree, lie by lie
        assert x.expect.describe().startswith(expected(x.kind, x.label)) or (
            x.expect.check is not None and expected(x.kind, x.label) == "ok"), (x.name, x.expect.describe())
    assert len({x.name for x in CAT.LIES}) == len(CAT.LIES)  # every lie once


# ---- the catalogue in-process, on every profile -----------------------------------------------------------

class World:
    """A kernel and the mm's driver in-process (tests/test_mm_driver.Harness), with an attacker A (its own
    read-write and read-only pages, an offer to V), another client V (memory, a thread, an endpoint) and an
    admitted stranger S that never gets a process."""

    A, V, S, U = "A" * 40, "V" * 40, "S" * 40, "U" * 40

    def __init__(self, arch: str) -> None:
        self.h = Harness(Config(low=8, target=32, high=256), memory=64 << 20)
        if arch != "i686":  # the harness boots i686: boot the profile asked for instead
            from kernel_server.service import KernelService

            self.h.kernel = KernelService.boot(arch=arch, memory=64 << 20, mm_key=MM, kernel_pool_frames=64,
                                               operator_key=OP, lease_seconds=1e9)
            self.h.journal.clear()
            self.h.boot()
        self.h.settle()
        self.mm(self.A, "alloc", pages=1, prot=3, vaddr=0x4000_0000)
        self.mm(self.A, "alloc", pages=1, prot=1, vaddr=0x4000_2000)
        v = self.mm(self.V, "alloc", pages=2, prot=3, vaddr=0x5000_0000)["result"]
        k = self.h.kernel
        tid = wire.parse_reply(k.handle(self.V, wire.request(1, "thread_create"), 0.0))["result"]["tid"]
        eid = wire.parse_reply(k.handle(self.V, wire.request(2, "endpoint_create"), 0.0))["result"]["eid"]
        offer = self.mm(self.A, "share", vaddr=0x4000_0000, pages=1, peer=self.V, prot=1)["result"]["offer"]
        core = k.core
        kind, refs = core.frames.kind, core.frames.refs
        last = lambda mask: int(mask.nonzero()[0][-1])  # noqa: E731
        frame_of = {"user_free": last((kind == USER) & (refs == 0)), "user_mapped": last((kind == USER) & (refs > 0)),
                    "kernel_free": last(kind == KERNEL_FREE), "kernel_used": last(kind == KERNEL_USED),
                    "kernel_shared": last(kind == KERNEL_SHARED)}
        hello = k.call(MM, "hello")
        amap = k.call(MM, "address_map")
        sizes = hello["large_page_sizes"]
        base: dict[str, Any] = dict(
            frames=hello["frames"], user_top=hello["user_top"], large_frames=min(sizes) // 4096 if sizes else 0,
            regions=tuple((e["kind"], e["first"], e["count"]) for e in amap["entries"]), mm_key=MM, operator_key=OP,
            stranger=self.S, unknown=self.U, frame_of=frame_of, target_pid=core.by_key[self.V])
        mm = self.h.d.core
        other = CAT.Other(self.V, core.by_key[self.V], v["vaddr"], v["pages"], tuple(map(tuple, v["frames"])), tid, eid)
        client = CAT.Scene(me=self.A, pid=core.by_key[self.A], quota=mm.view.clients[self.A].quota, own_rw=0x4000_0000,
                           own_ro=0x4000_2000, offer_to_other=offer, other=other, **base)
        self.scenes = {CAT.Teller.CLIENT: client, CAT.Teller.ABOUT_OTHER: client,
                       CAT.Teller.STRANGER: CAT.Scene(me=self.S, quota=mm.quota, **base),
                       CAT.Teller.MM_KEY: CAT.Scene(me=MM, **base)}
        self.who = {CAT.Teller.CLIENT: self.A, CAT.Teller.ABOUT_OTHER: self.A, CAT.Teller.STRANGER: self.S,
                    CAT.Teller.MM_KEY: MM}

    def mm(self, who: str, call: str, **args: Any) -> dict:
        peer = self.h.request(who, call=call, **args)
        self.h.settle()
        got = self.h.replies[peer]
        assert got["ok"], got
        return got

    def tell(self, lie: CAT.Lie, rid: int) -> tuple[dict, str]:
        """(the reply, what changed: "" if nothing)."""
        scene = self.scenes[lie.teller]
        data = lie.encode(scene, rid)
        if lie.server == "kernel":
            before = self.h.kernel.core.digest()
            reply = wire.parse_reply(self.h.kernel.handle(self.who[lie.teller], data, 0.0))
            return reply, "" if self.h.kernel.core.digest() == before else "the kernel's state"
        h = self.h
        inbox, write = len(h.inbox), h.write
        h.next_peer += 1
        peer = h.next_peer
        h.peers[peer] = (self.who[lie.teller], None, data)  # (its id may not even decode)
        h.perform(h.d.handle(D.ClientRequest(peer, self.who[lie.teller], data)))
        acted = "the mm sent the kernel a call" if len(h.inbox) != inbox else "the mm wrote" if h.write != write else ""
        return h.replies.pop(peer, {"no reply": True}), acted


@pytest.mark.parametrize("arch", ["i686", "i686-pae", "x86_64"])
def test_every_lie_of_the_catalogue_gets_its_refusal_in_process(arch: str) -> None:
    w = World(arch)
    told = 0
    for i, lie in enumerate(CAT.LIES):
        if lie.via not in (CAT.Via.CURVE, CAT.Via.ROUTING_ID) or lie.expect.describe() == "no reply":
            continue  # lies about the transport: the sockets' business (the live tests tell them)
        scene = w.scenes[lie.teller]
        assert lie.applicable(scene), lie.name
        reply, changed = w.tell(lie, 10_000 + i)
        ok, got = lie.judge(reply, scene)
        assert ok, (lie.name, got, reply.get("error"))
        assert got.startswith(expected(lie.kind, lie.label)), (lie.name, got)
        assert lie.expect.check is not None or not changed, (lie.name, changed)
        told += 1
    assert told > 150
    w.h.settle()
    w.h.exact()  # the lies left the mm's view and the kernel exactly in step


# ---- the real system ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def system():
    run_dir = tempfile.mkdtemp(prefix="mma-", dir="/tmp")
    s = System(run_dir, lease=1.0, clients=0, memory="64MiB")
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_attack_all_is_refused_by_the_real_system(system: System) -> None:
    # (short slices, and the victim's latency is test_isolation's business: a looser bound here)
    p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "attack", "--run-dir", system.run_dir, "--all",
                        "--json", "--seconds", "0.6", "--p99-bound", "100"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-6000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["failed"] == 0 and report["passed"] == len(ATTACKS)
    table = p.stderr.splitlines()
    assert sum(line.endswith("PASS") or "PASS  [" in line for line in table) == len(ATTACKS)
    for o in report["attacks"]:
        assert o["passed"], o
        got = {part["label"]: part["got"] for part in o["parts"]}
        if o["kind"] in SPECIAL:
            for label, want in SPECIAL[o["kind"]].items():
                assert got[label].startswith(want), (o["kind"], label, got[label])
            if ATTACKS[o["kind"]].what == "class":
                assert set(VICTIM) <= set(got), o
        else:
            for part in o["parts"]:
                if part["label"] != "state":
                    assert part["got"].startswith(expected(o["kind"], part["label"])), (o["kind"], part)
    assert system.kernel_stats()  # still there
    audit = system.wait_quiet(timeout=20)
    assert audit["divergences"] == 0 and audit["i13_problems"] == 0, audit  # nothing left behind, charges exact


def test_one_kind_from_the_command_line(system: System) -> None:
    p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "attack", "--run-dir", system.run_dir,
                        "--kind", "donate-unprivileged", "--kind", "mm-garbage-bytes"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.endswith("PASS")]
    assert [ln.split()[0] for ln in lines] == ["donate-unprivileged", "mm-garbage-bytes"]
    assert "EPERM" in lines[0] and "EPROTO" in lines[1]


def test_bad_options_exit_2(system: System) -> None:
    runner = CliRunner()
    for args in (["--all"], ["--run-dir", system.run_dir], ["--run-dir", system.run_dir, "--kind", "no-such-lie"],
                 ["--run-dir", system.run_dir, "--all", "--kind", "flood"], ["--run-dir", "/nonexistent", "--all"],
                 ["--run-dir", system.run_dir, "--all", "--seconds", "0"],
                 ["--run-dir", system.run_dir, "--all", "--p99-bound", "0.5"]):
        r = runner.invoke(app, ["client", "attack", *args])
        assert r.exit_code == 2, (args, r.output)
    r = runner.invoke(app, ["client", "attack", "--list"])
    assert r.exit_code == 0 and all(kind in r.output for kind in ATTACKS)


# ---- the checker can fail ---------------------------------------------------------------------------------

def refusal(code: Errno, **details) -> dict:
    return {"v": 1, "id": 1, "ok": False, "error": {"code": code.name, "errno": int(code), "message": "no", **details}}


def test_verdicts_fail_a_lie_that_was_accepted() -> None:
    accepted = {"v": 1, "id": 1, "ok": True, "result": {"frames": [[0, 1]], "kernel_free": 5}}
    assert verdict_error(accepted, [Errno.EPERM]) == (False, "ok")
    assert verdict_error(None, [Errno.EPERM]) == (False, "no reply")
    assert verdict_error(refusal(Errno.EINVAL), [Errno.EPERM])[0] is False  # refused, but for the wrong reason
    assert verdict_error({**refusal(Errno.EPERM), "error": {"code": "EPERM", "errno": 3}}, [Errno.EPERM])[0] is False
    assert verdict_error(refusal(Errno.EINVAL, field="pages"), [Errno.EINVAL], field="tid")[0] is False
    assert verdict_error({"malformed": True}, [Errno.EPROTO])[0] is False
    assert verdict_no_reply(accepted) == (False, "ok")
    # a refusal must carry the details the catalogue names, with the values the scene says
    quota = next(x for x in CAT.LIES if x.kind == "mm-quota")
    scene = CAT.Scene(frames=1, user_top=1, large_frames=0, regions=(), me="A" * 40, quota=10)
    assert quota.judge(refusal(Errno.ENOMEM, limit=10, used=0), scene)[0] is True
    assert quota.judge(refusal(Errno.ENOMEM, limit=11, used=0), scene)[0] is False
    assert quota.judge(refusal(Errno.ENOMEM), scene)[0] is False
    # and the right refusals pass
    assert verdict_error(refusal(Errno.EPERM), [Errno.EPERM]) == (True, "EPERM")
    assert verdict_error(refusal(Errno.EINVAL, field="frames.0.0"), [Errno.EINVAL], field="frames")[0] is True
    assert verdict_no_reply(None) == (True, "no reply")


def test_the_victims_verdict_fails_what_hurts_it() -> None:
    from clients.isolation import summarize, victim_parts

    def w(p99: float, **kw: Any) -> dict:
        return {"calls": 100, "rate": 1000.0, "p99_ms": p99, "errors": {}, "pids": [3], "first_error": "",
                "extra_pages": 0, "extra_mappings": 0, "offers_to_me": 0, **kw}

    def failed(pairs: list, bound: float = 20.0) -> set[str]:
        return {label for label, ok, _, _ in victim_parts(summarize(pairs), 3, bound) if not ok}

    assert failed([(w(1.0), w(5.0))] * 3) == set()
    assert failed([(w(1.0), w(25.0))] * 3) == {"victim p99"}
    assert failed([(w(1.0), w(25.0)), (w(1.0), w(2.0)), (w(1.0), w(30.0))]) == {"victim p99"}  # the median
    assert failed([(w(1.0), w(2.0, errors={"ENOMEM": 1}))]) == {"victim errors"}
    assert failed([(w(1.0), w(2.0, pids=[3, "ping: ESRCH"]))]) == {"victim process"}
    assert failed([(w(1.0), w(2.0, pids=[4]))]) == {"victim process"}
    assert failed([(w(1.0), w(2.0, calls=0))]) == {"victim progress"}
    assert failed([(w(1.0), w(2.0, extra_pages=1))]) == {"victim address space"}
    assert failed([]) == {"victim p99", "victim progress"}
    # the first error named is the earliest seen, whatever window holds it (set-up before the rounds here)
    later = w(2.0, began=20.0, errors={"EBUSY": 4}, first_error="alloc burst: EBUSY")
    earlier = w(2.0, began=10.0, errors={"EIO": 1}, first_error="alloc burst: EIO")
    v = summarize([(w(1.0, began=15.0), later)], [earlier])
    assert v["first_error"] == "alloc burst: EIO" and v["errors"] == {"EIO": 1, "EBUSY": 4}


def test_the_honest_client_settles_an_eio_with_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """An alloc answered EIO may have been made: the honest client sends the same request (same id) until
    a real answer comes, so it knows what it holds; each EIO is still an error of its window."""
    import clients.honest as honest
    from protocol.errors import CallError, Errno, Error

    class MM:
        def __init__(self, answers: list) -> None:
            self.answers, self.ids = answers, []

        def new_id(self) -> int:
            return 41 + len(self.ids)

        def call(self, call: str, args: dict, req_id: int) -> dict:
            self.ids.append(req_id)
            a = self.answers.pop(0)
            if isinstance(a, Error):
                raise CallError(a, call)
            return a

    monkeypatch.setattr(honest, "SETTLE_PAUSE", 0.0)
    eio = Error(Errno.EIO, "the kernel is unreachable")
    mm = MM([eio, eio, {"vaddr": honest.BURST_VA, "pages": 16}])
    h = honest.Honest(type("C", (), {"mm": mm})(), hold=8, burst=16)
    assert h.settled("alloc burst", "alloc", {"pages": 16}) == {"vaddr": honest.BURST_VA, "pages": 16}
    assert mm.ids == [41, 41, 41]
    win = h.mark()
    assert win["errors"] == {"EIO": 2} and win["first_error"].startswith("alloc burst") and win["calls"] == 3
    # any other refusal is an answer: not sent again
    mm = MM([Error(Errno.EBUSY, "already allocated")])
    h = honest.Honest(type("C", (), {"mm": mm})(), hold=8, burst=16)
    assert isinstance(h.settled("alloc", "alloc", {"pages": 1}), CallError) and mm.ids == [41]
    # an outcome that stays unknown ends after SETTLE_TRIES resends, as the EIO it is
    mm = MM([eio] * (honest.SETTLE_TRIES + 1))
    h = honest.Honest(type("C", (), {"mm": mm})(), hold=8, burst=16)
    out = h.settled("free", "free", {"vaddr": 0, "pages": 1})
    assert isinstance(out, CallError) and out.code == Errno.EIO and len(mm.ids) == honest.SETTLE_TRIES + 1


@pytest.fixture
def liar():
    d = tempfile.mkdtemp(prefix="mml-", dir="/tmp")
    servers = LyingServers(d, plausible)
    try:
        yield d
    finally:
        servers.close()
        shutil.rmtree(d, ignore_errors=True)


def test_every_attack_fails_against_servers_that_accept_every_lie(liar: str) -> None:
    # the liar speaks CURVE with the right keys, so the transport-level refusals (anonymous, a wrong server
    # key) still hold; every other attack must see through it (a key nobody admitted is served by the liar)
    kinds = [k for k in ATTACKS if REFUSAL.get(k) != "no reply" or k.endswith("unknown-key")]
    outcomes = run_attacks(liar, kinds, timeout=0.5, seconds=0.3)
    passed = [o.kind for o in outcomes if o.passed]
    assert passed == [], passed
    p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "attack", "--run-dir", liar, "--kind",
                        "donate-unprivileged", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "ok (expected EPERM)" in json.loads(p.stdout.strip().splitlines()[-1])["attacks"][0]["got"]
