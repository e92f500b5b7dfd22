"""Lying clients (``mmsim client attack``): the catalogue's lies, floods and replays, and the resource
attacks beside an honest client, with real sockets.

Every kind ``clients.catalogue.KINDS`` lists runs here:

- lies (``catalogue.LIES``, grouped by kind): each request is built from a
  scene of the live system (the attacker's own process and allocations,
  another client to lie about, an admitted key with no process, a key nobody
  admitted) and sent the way the lie says (an ordinary request, no CURVE, a
  wrong server key, a forged routing id, several frames); its reply must be
  exactly the refusal the catalogue names. Around each kind the system is
  looked at before and after (the kernel's counts and processes, the mm's
  view, the attacker's and the other client's usage): a refused lie changes
  nothing.
- procedures: floods of requests in flight at once, request ids reused for
  other requests, the same request twice (I12).
- classes (``clients.isolation``): resource attacks at full speed beside an
  honest client (``clients.honest``, a process of its own); the verdict is
  the victim's experience (no error, the same process, its p99 latency
  within ``--p99-bound`` times its own alone, progress) and the attacker's
  refusals.

After each kind both servers must still answer a ping. One line per kind:
kind, server, expected, got, PASS/FAIL.

The attacker's cast are key pairs of the run directory, admitted by the
tool itself as the operator would (it needs write access to ``RUN/keys``):
``attacker``, ``victim`` (the other client of the lies: memory, a thread, an
endpoint), ``attacker-stranger`` (admitted, never given a process),
``attacker-peer`` (a colluding client) and ``honest`` (the victim of the
classes); the classes admit more and revoke them after. With the operator's
key pair in the run directory the state checks see every process.

The verdict functions are pure (``clients.catalogue``), so a test can show
that an accepted lie is reported as FAIL.

Exit status: 0 every lie refused as expected, every victim unharmed and both
servers answering; 1 otherwise; 2 bad options; 3 could not start.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import msgpack
import typer
import zmq

from clients import catalogue as CAT
from clients.catalogue import (  # noqa: F401  (re-exported: the verdicts are part of this module's interface)
    KINDS,
    Lie,
    Other,
    Scene,
    Teller,
    Via,
    describe,
    verdict_error,
    verdict_no_reply,
)
from clients.client import Client
from protocol import PROT_READ, PROT_WRITE, rundir, wire
from protocol.errors import CallError, Errno

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_START = 0, 1, 2, 3
RW = PROT_READ | PROT_WRITE
NO_REPLY_WAIT = 0.5  # seconds a refused connection is given to (wrongly) answer
STATE_TRIES = 3  # a kind is run again when someone else changed the system meanwhile

# Fixed virtual addresses, so the attacker never touches what it owns by accident.
OWN_RW = 0x4000_0000  # the attacker's own read-write page
OWN_RO = 0x4000_2000  # the attacker's own read-only page
OWN_REPLAY = 0x4000_8000  # the retried alloc
VICTIM_VA = 0x5000_0000  # the other client's two pages
CAST = {"attacker": "attacker", "victim": "victim", "stranger": "attacker-stranger", "peer": "attacker-peer",
        "honest": "honest"}

ATTACK_HELP = ("Lie to the kernel and the mm (forged identities, other processes' pids and frames, privileged calls, "
               "kernel frames, garbage, costly and oversized requests, floods, replays) and attack their resources "
               "beside an honest client (strangers, kernel frames, share laundering, unsolicited mappings, many "
               "keys, replay-cache floods, unread replies); check every refusal and the victim's experience. Exit 0 "
               "when every lie was refused as expected, every victim unharmed and both servers still answer, 1 "
               "otherwise.")


def expect_text(codes: Iterable[Errno], field: str | None = None) -> str:
    text = "/".join(c.name for c in codes)
    return f"{text}(field={field})" if field else text


# ---- results ----------------------------------------------------------------------------------------

@dataclass
class Part:
    label: str
    passed: bool
    got: str
    expected: str


@dataclass
class Outcome:
    kind: str
    server: str
    expected: str
    got: str
    passed: bool
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)  # classes: the victim's windows, the attacker's tallies

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        notes = f"  [{'; '.join(self.notes)}]" if self.notes else ""
        return f"{self.kind:<28} {self.server:<6} expected {self.expected:<34} got {self.got:<40} {verdict}{notes}"


class Check:
    """What one kind saw, part by part."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.notes: list[str] = []
        self.figures: dict[str, Any] = {}

    def refused(self, label: str, reply: dict[str, Any] | None, *codes: Errno, field: str | None = None) -> bool:
        ok, got = verdict_error(reply, codes, field)
        self.parts.append(Part(label, ok, got, expect_text(codes, field)))
        return ok

    def lie(self, lie: Lie, reply: dict[str, Any] | None, scene: Scene) -> bool:
        ok, got = lie.judge(reply, scene)
        self.parts.append(Part(lie.label, ok, got, lie.expect.describe()))
        return ok

    def true(self, label: str, cond: bool, got: str, expected: str) -> bool:
        self.parts.append(Part(label, bool(cond), got, expected))
        return bool(cond)

    @property
    def passed(self) -> bool:
        return bool(self.parts) and all(p.passed for p in self.parts)

    def got(self) -> str:
        bad = [p for p in self.parts if not p.passed]
        if bad:
            return "; ".join(f"{p.label}: {p.got} (expected {p.expected})" for p in bad)
        seen: dict[str, int] = {}
        for p in self.parts:
            seen[p.got] = seen.get(p.got, 0) + 1
        return ", ".join(f"{g} x{n}" if n > 1 else g for g, n in seen.items())


class SetupFailed(Exception):
    pass


# ---- raw access to a server ----------------------------------------------------------------------

class Line:
    """One DEALER socket to a server, with explicit request ids and raw replies (None: no reply)."""

    def __init__(self, zctx: zmq.Context, endpoint: str, server_key: bytes | None, keypair: tuple[bytes, bytes] | None,
                 ids: Iterable[int], routing_id: bytes | None = None, hwm: int | None = None,
                 rcvhwm: int | None = None) -> None:
        s = zctx.socket(zmq.DEALER)
        s.linger = 0
        if keypair is not None and server_key is not None:  # None: no CURVE at all (an anonymous peer)
            s.curve_serverkey = server_key
            s.curve_publickey, s.curve_secretkey = keypair
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        if hwm is not None:
            s.sndhwm = s.rcvhwm = hwm
        if rcvhwm is not None:
            s.rcvhwm = rcvhwm
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_REPLY_BYTES)
        s.connect(endpoint)
        self.sock = s
        self.ids = iter(ids)

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> "Line":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def new_id(self) -> int:
        return next(self.ids)

    def send(self, data: bytes | list[bytes]) -> None:
        if isinstance(data, list):
            self.sock.send_multipart(data)
        else:
            self.sock.send(data)

    def recv(self, timeout: float, rid: int | None = None) -> dict[str, Any] | None:
        """The next reply (with id ``rid`` or no id, if ``rid`` is given) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000, zmq.POLLIN):
                return None
            frames = self.sock.recv_multipart()
            try:
                reply = wire.parse_reply(frames[-1]) if len(frames) == 1 else None
            except Exception:
                reply = None
            if reply is None:
                return {"malformed": True, "frames": len(frames)}
            if rid is None or reply.get("id") in (rid, None):
                return reply

    def ask(self, call: str, args: Any = None, rid: int | None = None, timeout: float = 2.0) -> dict[str, Any] | None:
        """Send one request (our id unless ``rid``) and wait for its reply."""
        rid = self.new_id() if rid is None else rid
        self.send(msgpack.packb({"v": wire.PROTOCOL_VERSION, "id": rid, "call": call,
                                 "args": {} if args is None else args}, use_bin_type=True))
        return self.recv(timeout, rid)


def result_of(reply: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if reply is None:
        raise SetupFailed(f"{what}: no reply")
    if reply.get("ok") is not True:
        raise SetupFailed(f"{what}: {describe(reply)}: {(reply.get('error') or {}).get('message', '')}")
    res = reply.get("result")
    if not isinstance(res, dict):
        raise SetupFailed(f"{what}: result is not a map")
    return res


# ---- the attacker's world ---------------------------------------------------------------------------

def _admit(run_dir: str, name: str) -> None:
    rundir.generate(run_dir, name)
    if not os.path.exists(os.path.join(rundir.admitted_dir(run_dir), f"{name}.key")):
        rundir.admit(run_dir, name)


class Ctx:
    """Keys, endpoints, connections and what the attacker learnt about the system."""

    def __init__(self, run_dir: str, timeout: float = 2.0, seconds: float = 2.0, p99_bound: float = 20.0) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self.seconds = seconds  # how long each resource attack runs at full speed
        self.p99_bound = p99_bound
        self.zctx = zmq.Context()
        self.zctx.linger = 0
        for name in CAST.values():  # the cast is admitted, as the operator would
            _admit(run_dir, name)
        self.keypair = rundir.load_keypair(run_dir, CAST["attacker"])
        self.identity = self.keypair[0].decode()
        self.stranger_keypair = rundir.load_keypair(run_dir, CAST["stranger"])
        self.stranger = self.stranger_keypair[0].decode()
        self.unknown = rundir.fresh_keypair()[0].decode()  # a key nobody admitted
        self.endpoints = {s: rundir.read_endpoint(run_dir, s) for s in ("kernel", "mm")}
        self.server_keys = {s: rundir.public_key(run_dir, s) for s in ("kernel", "mm")}
        self._ids = itertools.count(secrets.randbits(62))  # fresh per run, like protocol.connection
        self.lines: dict[str, Line] = {s: self.line(s) for s in ("kernel", "mm")}
        self.stranger_lines: dict[str, Line] = {s: self.line(s, self.stranger_keypair) for s in ("kernel", "mm")}
        self.hello = result_of(self.lines["kernel"].ask("hello", timeout=timeout), "kernel hello")
        result_of(self.lines["mm"].ask("ping", timeout=timeout), "mm ping")
        self.amap = result_of(self.lines["kernel"].ask("address_map", timeout=timeout), "address_map")
        self.lease = float(self.hello.get("lease_seconds", 5.0))
        self.frames = int(self.hello.get("frames", 0))
        self.user_top = int(self.hello.get("user_top", 0xC000_0000))
        sizes = self.hello.get("large_page_sizes") or []
        self.large_frames = min(sizes) // 4096 if sizes else 0
        self.regions = tuple((str(e["kind"]), int(e["first"]), int(e["count"])) for e in self.amap.get("entries", []))
        try:
            self.operator: Line | None = self.line("kernel", rundir.load_keypair(run_dir, "operator"))
            self.operator_mm: Line | None = self.line("mm", rundir.load_keypair(run_dir, "operator"))
            self.operator_key = rundir.operator_key(run_dir) or ""
        except (OSError, ValueError):
            self.operator = self.operator_mm = None  # no operator key pair here: counts only
            self.operator_key = ""
        self.victim: Other | None = None
        self.victim_client: Client | None = None
        self.keeper: Client | None = None  # keeps the attacker's lease (it sends nothing else)
        self.own_pid: int | None = None
        self.offer: int | None = None  # an open offer of OWN_RW the attacker made to the victim
        self.honest: Any = None  # the honest client's process (clients.honest.HonestProcess), for the classes
        self.extra: list[Any] = []  # more to close at the end (clients.isolation)
        self.routed: dict[str, Line] = {}  # the attacker's sockets whose routing id is the mm's public key

    def close(self) -> None:
        if self.honest is not None:
            self.honest.stop()
        for c in (self.keeper, self.victim_client, *self.extra):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 (closing what is left: nothing to report)
                    pass
        for line in (*self.lines.values(), *self.stranger_lines.values(), *self.routed.values(), self.operator,
                     self.operator_mm):
            if line is not None:
                line.close()
        self.zctx.destroy(linger=0)  # (closes any socket left open: term would wait for it forever)

    # ---- connections ----------------------------------------------------------------

    def line(self, server: str, keypair: tuple[bytes, bytes] | None | str = "attacker", server_key: bytes | None = None,
             routing_id: bytes | None = None, hwm: int | None = None, rcvhwm: int | None = None) -> Line:
        """A fresh socket to ``server``: as the attacker, as ``keypair``, or anonymous (``keypair=None``)."""
        kp = self.keypair if keypair == "attacker" else keypair
        sk = server_key if server_key is not None else self.server_keys[server]
        return Line(self.zctx, self.endpoints[server], sk if kp is not None else None, kp,  # type: ignore[arg-type]
                    self._ids, routing_id=routing_id, hwm=hwm, rcvhwm=rcvhwm)

    def ask(self, server: str, call: str, args: Any = None, **kw: Any) -> dict[str, Any] | None:
        kw.setdefault("timeout", self.timeout)
        return self.lines[server].ask(call, args, **kw)

    def alive(self) -> dict[str, bool]:
        """Does each server still answer a ping (on a fresh socket)?"""
        out = {}
        for s in ("kernel", "mm"):
            with self.line(s) as line:
                r = line.ask("ping", timeout=max(self.timeout, 5.0))
            out[s] = r is not None and r.get("ok") is True
        return out

    def client(self, name: str, keepalive: bool = False) -> Client:
        """A Client of key pair ``name`` (admitted first), closed with the context."""
        _admit(self.run_dir, name)
        c = Client.from_run_dir(self.run_dir, name, create_key=False, kernel_endpoint=self.endpoints["kernel"],
                                mm_endpoint=self.endpoints["mm"], timeout=self.timeout)
        self.extra.append(c)
        if keepalive:
            c.start_keepalive(max(0.05, self.lease / 3))
        return c

    # ---- the attacker's own process, the other client, an offer ---------------------------------

    def _alloc_fixed(self, call: Callable[[str, dict], dict[str, Any] | None], vaddr: int, pages: int,
                     prot: int) -> dict[str, Any]:
        """An allocation at ``vaddr`` (an earlier run's leftover there is freed first)."""
        args = {"pages": pages, "prot": prot, "vaddr": vaddr}
        freed = None
        for _ in range(5):
            r = call("alloc", args)
            if r is None or r.get("ok") is not False or (r.get("error") or {}).get("code") not in ("EBUSY", "EAGAIN"):
                break
            freed = call("free", {"vaddr": vaddr, "pages": pages})
            time.sleep(0.1)
        return result_of(r, f"alloc at {vaddr:#x}" + (f" (after a free: {describe(freed)} "
                                                       f"{(freed or {}).get('error', {}).get('message', '')})"
                                                       if freed else ""))

    def need_process(self) -> int:
        """The attacker's own process (an RW and an RO page from the mm), kept alive; its pid."""
        if self.own_pid is not None:
            return self.own_pid
        mm = lambda c, a: self.ask("mm", c, a)  # noqa: E731
        self._alloc_fixed(mm, OWN_RW, 1, RW)
        self._alloc_fixed(mm, OWN_RO, 1, PROT_READ)
        hello = result_of(self.ask("kernel", "hello"), "hello")
        if not isinstance(hello.get("pid"), int):
            raise SetupFailed("the mm allocated memory but the kernel shows no process for the attacker")
        self.keeper = Client.from_run_dir(self.run_dir, CAST["attacker"], create_key=False,
                                          kernel_endpoint=self.endpoints["kernel"], mm_endpoint=self.endpoints["mm"])
        self.keeper.start_keepalive(max(0.05, self.lease / 3))
        self.own_pid = hello["pid"]
        return self.own_pid

    def need_victim(self) -> Other:
        if self.victim is not None:
            return self.victim
        c = Client.from_run_dir(self.run_dir, CAST["victim"], create_key=False,
                                kernel_endpoint=self.endpoints["kernel"],
                                mm_endpoint=self.endpoints["mm"], timeout=self.timeout)

        def call(name: str, args: dict) -> dict[str, Any] | None:
            try:
                return {"ok": True, "result": c.mm.call(name, args)}
            except CallError as exc:
                return {"ok": False, "error": exc.error.to_wire()}

        try:
            got = self._alloc_fixed(call, VICTIM_VA, 2, RW)
            tid = c.thread_create()
            eid = c.endpoint_create()
            pid = c.hello()["pid"]
        except CallError as exc:
            c.close()
            raise SetupFailed(f"victim: {exc}") from None
        except SetupFailed:
            c.close()
            raise
        c.start_keepalive(max(0.05, self.lease / 3))
        self.victim_client = c
        self.victim = Other(c.identity, pid, got["vaddr"], got["pages"], tuple(tuple(r) for r in got["frames"]), tid,
                            eid)
        return self.victim

    def need_offer(self) -> int:
        """An open offer of the attacker's OWN_RW page to the victim."""
        if self.offer is None:
            self.need_process()
            v = self.need_victim()
            got = result_of(self.ask("mm", "share", {"vaddr": OWN_RW, "pages": 1, "peer": v.key, "prot": PROT_READ}),
                            "share with the victim")
            self.offer = int(got["offer"])
        return self.offer

    def prepare(self, lies: list[Lie]) -> None:
        """Make what these lies need before the state is looked at."""
        needs = {n for x in lies for n in x.needs}
        if any(x.teller in (Teller.CLIENT, Teller.ABOUT_OTHER) for x in lies) and \
                needs & {"pid", "own_rw", "own_ro", "quota", "offer_to_other"}:
            self.need_process()
        if "other" in needs or "offer_to_other" in needs:
            self.need_victim()
        if "offer_to_other" in needs:
            self.need_offer()

    def scene(self, teller: Teller) -> Scene:
        base = dict(frames=self.frames, user_top=self.user_top, large_frames=self.large_frames, regions=self.regions,
                    mm_key=self.server_keys["mm"].decode(), operator_key=self.operator_key, stranger=self.stranger,
                    unknown=self.unknown)
        if teller is Teller.STRANGER:
            hello = result_of(self.stranger_lines["mm"].ask("hello", timeout=self.timeout), "mm hello as a stranger")
            return Scene(me=self.stranger, pid=None, quota=int(hello.get("quota") or 0), **base)
        quota = 0
        if self.own_pid is not None:
            you = result_of(self.ask("mm", "stats"), "mm stats").get("you") or {}
            quota = int(you.get("quota") or 0)
        else:
            quota = int(result_of(self.ask("mm", "hello"), "mm hello").get("quota") or 0)
        return Scene(me=self.identity, pid=self.own_pid, quota=quota,
                     own_rw=OWN_RW if self.own_pid is not None else None,
                     own_ro=OWN_RO if self.own_pid is not None else None,
                     offer_to_other=self.offer, other=self.victim, **base)

    # ---- telling a lie ------------------------------------------------------------------------

    def tell(self, lie: Lie, scene: Scene) -> dict[str, Any] | None:
        """Send one lie the way it travels; the reply (None: none came)."""
        server = lie.server
        payload = lie.payload(scene)
        wait = NO_REPLY_WAIT if lie.expect.errno is None and lie.expect.check is None else self.timeout
        mine = self.stranger_keypair if lie.teller is Teller.STRANGER else self.keypair
        fresh: Line | None = None
        if lie.via is Via.NO_CURVE:
            fresh = self.line(server, keypair=None)
        elif lie.via is Via.WRONG_SERVER_KEY:
            fresh = self.line(server, mine, server_key=rundir.fresh_keypair()[0])
        elif lie.via is Via.UNKNOWN_KEY:
            fresh = self.line(server, rundir.fresh_keypair())
        elif lie.via is not Via.CURVE or isinstance(payload, CAT.Raw) or wait == NO_REPLY_WAIT:
            fresh = self.line(server, mine)  # bytes that may end the connection: a socket of their own
        if lie.via is Via.ROUTING_ID:  # one socket per server: a ROUTER ignores a second peer with the same id
            if server not in self.routed:
                self.routed[server] = self.line(server, mine, routing_id=self.server_keys["mm"])
            line = self.routed[server]
        else:
            line = fresh or (self.stranger_lines if lie.teller is Teller.STRANGER else self.lines)[server]
        try:
            rid = line.new_id()
            data = lie.encode(scene, rid)
            if lie.via is Via.TWO_FRAMES:
                line.send([data, data])
            elif lie.via is Via.THREE_FRAMES:
                line.send([b"", data, b"x"])
            else:
                line.send(data)
            return line.recv(wait, None if isinstance(payload, CAT.Raw) else rid)
        finally:
            if fresh is not None:
                fresh.close()

    # ---- state --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What a refused lie must leave as it was (with the operator's key: every process)."""
        me = result_of(self.ask("kernel", "stats"), "kernel stats")
        mm = result_of(self.ask("mm", "stats"), "mm stats")
        snap: dict[str, Any] = {"attacker process": me.get("you"), "mm attacker": mm.get("you"),
                                "others": None, "mm activity": None}
        if self.operator is not None and self.operator_mm is not None:
            st = result_of(self.operator.ask("stats", {"from_pid": 0, "limit": 1000}, timeout=self.timeout),
                           "kernel stats (operator)")
            om = result_of(self.operator_mm.ask("stats", timeout=self.timeout), "mm stats (operator)")
            procs = {p.get("key"): p for p in st.get("per_process", [])}
            vkey = self.victim.key if self.victim else None
            snap.update({
                "kernel frames": {k: st.get(k) for k in ("kernel_free", "kernel_used", "kernel_shared", "user_free",
                                                         "user_mapped", "kernel_reserved", "processes")},
                "kernel slabs": st.get("slab_frames"),
                "victim process": procs.get(vkey) if vkey else None,
                "stranger process": procs.get(self.stranger),
                "mm view": om.get("view"),
                "others": sorted(repr(p) for k, p in procs.items() if k not in (self.identity, vkey)),
                "mm activity": {k: (om.get("counters") or {}).get(k) for k in ("requests", "donations", "reclaims",
                                                                                 "deaths", "enomem_retries")},
            })
        if self.victim_client is not None:
            try:
                snap["mm victim"] = self.victim_client.mm_stats().get("you")
            except CallError as exc:
                raise SetupFailed(f"victim's mm stats: {exc}") from None
        return snap


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], bool]:
    """(what changed that the attacker may not change, whether someone else was busy meanwhile)."""
    busy = before["others"] != after["others"] or before["mm activity"] != after["mm activity"]
    changed = [k for k in before if k not in ("others", "mm activity") and before.get(k) != after.get(k)]
    return changed, busy


# ---- the lies, the procedures ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    kind: str
    server: str
    expected: str
    fn: Callable[[Ctx, Check], None]
    doc: str
    what: str = "lies"  # "lies", "procedure" or "class"


def _lies_fn(kind: str) -> Callable[[Ctx, Check], None]:
    lies = [x for x in CAT.lies_of(kind) if x.teller is not Teller.MM_KEY]

    def run(ctx: Ctx, c: Check) -> None:
        scenes: dict[Teller, Scene] = {}
        for x in lies:
            t = Teller.STRANGER if x.teller is Teller.STRANGER else Teller.CLIENT
            if t not in scenes:
                scenes[t] = ctx.scene(t)
            scene = scenes[t]
            if not x.applicable(scene):
                missing = [n for n in x.needs if not CAT._present(getattr(scene, n))]
                if missing == ["large_frames"]:
                    c.notes.append(f"{x.label}: not on this machine (no large pages)")
                    continue
                c.true(x.label, False, f"cannot be built: the scene has no {', '.join(missing)}", "built")
                continue
            c.lie(x, ctx.tell(x, scene), scene)

    return run


def _flood(ctx: Ctx, c: Check, server: str, n: int) -> None:
    plan = (("ping", {}, "ok"), ("hello", {}, "ok"), ("no_such_call", {}, "ENOSYS"), ("ping", {"x": 1}, "EINVAL"))
    expect: dict[int, str] = {}
    wrong = answered = in_flight = later = 0
    with ctx.line(server, hwm=0) as line:  # no high-water mark: every request goes out at once
        sock = line.sock
        sent = 0
        deadline = time.monotonic() + 30.0
        last = time.monotonic()
        while answered < n and time.monotonic() < deadline:
            while sent < n:
                call, args, want = plan[sent % len(plan)]
                rid = line.new_id()
                try:
                    sock.send(wire.request(rid, call, args), zmq.NOBLOCK)
                except zmq.Again:
                    break
                expect[rid] = want
                sent += 1
            in_flight = max(in_flight, sent - answered)
            if not sock.poll(50, zmq.POLLIN):
                if sent >= n and time.monotonic() - last > 3.0:
                    break  # nothing more is coming: some replies were dropped
                continue
            last = time.monotonic()
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    r = wire.parse_reply(data)
                except Exception:
                    wrong += 1
                    continue
                want = expect.pop(r.get("id"), None)
                if want is None:
                    wrong += 1
                    continue
                answered += 1
                got = "ok" if r.get("ok") is True else (r.get("error") or {}).get("code")
                if got == "EAGAIN":  # past the requests a caller may have waiting: "send it again later"
                    later += 1
                elif got != want:
                    wrong += 1
    c.true("answers", wrong == 0, f"{wrong} wrong, {later} EAGAIN", "every answer right (or EAGAIN past the "
           "caller's queue)")
    alive = ctx.alive()[server]
    c.true("answered or alive", answered == n or alive,
           f"{answered}/{n} answered (up to {in_flight} in flight)", "all answered, or a ping answered after")
    c.notes.append(f"{answered}/{n} answered, up to {in_flight} in flight")


def flood(ctx: Ctx, c: Check) -> None:
    _flood(ctx, c, "kernel", 5000)


def mm_flood(ctx: Ctx, c: Check) -> None:
    _flood(ctx, c, "mm", 3000)


def _replay_different(ctx: Ctx, c: Check, server: str) -> None:
    ctx.need_process()
    rid = ctx.lines[server].new_id()
    first = describe(ctx.ask(server, "ping", rid=rid))
    c.true("ping", first == "ok", first, "ok")
    call, args = ("thread_create", {}) if server == "kernel" else ("alloc", {"pages": 1, "prot": RW})
    c.refused(f"{call} with the ping's id", ctx.ask(server, call, args, rid=rid), Errno.EINVAL, field="id")


def replay_identical(ctx: Ctx, c: Check) -> None:
    """thread_create sent twice with the same id: executed once, the same answer twice."""
    ctx.need_process()

    def threads() -> int:
        you = result_of(ctx.ask("kernel", "stats"), "stats").get("you") or {}
        return int(you.get("threads", -1))

    before = threads()
    rid = ctx.lines["kernel"].new_id()
    r1 = ctx.ask("kernel", "thread_create", rid=rid)
    r2 = ctx.ask("kernel", "thread_create", rid=rid)
    t1 = ((r1 or {}).get("result") or {}).get("tid")
    t2 = ((r2 or {}).get("result") or {}).get("tid")
    c.true("same answer", t1 is not None and t1 == t2, f"tids {t1}, {t2}", "one tid twice")
    after = threads()
    c.true("executed once", after == before + 1, f"threads {before} -> {after}", f"{before} -> {before + 1}")
    for t in {t1, t2} - {None}:
        ctx.ask("kernel", "thread_destroy", {"tid": t})


def mm_replay_alloc(ctx: Ctx, c: Check) -> None:
    """alloc sent twice with the same id: one allocation, the same answer twice."""
    ctx.need_process()

    def mappings() -> int:
        you = result_of(ctx.ask("mm", "stats"), "mm stats").get("you") or {}
        return int(you.get("mappings", -1))

    before = mappings()
    rid = ctx.lines["mm"].new_id()
    args = {"pages": 1, "prot": RW, "vaddr": OWN_REPLAY}
    r1 = ctx.ask("mm", "alloc", args, rid=rid)
    r2 = ctx.ask("mm", "alloc", args, rid=rid)
    c.true("same answer", r1 is not None and r1 == r2 and r1.get("ok") is True, f"{describe(r1)}, {describe(r2)}",
           "ok twice, identical")
    after = mappings()
    c.true("executed once", after == before + 1, f"mappings {before} -> {after}", f"{before} -> {before + 1}")
    if r1 and r1.get("ok"):
        ctx.ask("mm", "free", {"vaddr": OWN_REPLAY, "pages": 1})


PROCEDURE_FNS: dict[str, Callable[[Ctx, Check], None]] = {
    "flood": flood,
    "mm-flood": mm_flood,
    "replay-different": lambda ctx, c: _replay_different(ctx, c, "kernel"),
    "mm-replay-different": lambda ctx, c: _replay_different(ctx, c, "mm"),
    "replay-identical": replay_identical,
    "mm-replay-alloc": mm_replay_alloc,
}


def _class_fn(kind: str) -> Callable[[Ctx, Check], None]:
    def run(ctx: Ctx, c: Check) -> None:
        from clients import isolation  # (it builds on this module)

        isolation.run_class(ctx, kind, c)

    return run


def _registry() -> dict[str, Attack]:
    out: dict[str, Attack] = {}
    for kind, k in KINDS.items():
        if k.what == "lies":
            fn = _lies_fn(kind)
        elif k.what == "procedure":
            fn = PROCEDURE_FNS[kind]
        else:
            fn = _class_fn(kind)
        out[kind] = Attack(kind, k.server, k.expected, fn, k.doc, k.what)
    return out


ATTACKS: dict[str, Attack] = _registry()


# ---- running them --------------------------------------------------------------------------------------------

def run_one(ctx: Ctx, a: Attack) -> tuple[Outcome, bool]:
    """Run one kind (lies with the state check around them); (outcome, both servers still answer)."""
    t0 = time.monotonic()
    notes: list[str] = []
    check = Check()
    try:
        if a.what == "class":
            a.fn(ctx, check)
        else:
            if a.what == "lies":
                ctx.prepare([x for x in CAT.lies_of(a.kind) if x.teller is not Teller.MM_KEY])
            else:
                ctx.need_process()
            for attempt in range(STATE_TRIES):
                check = Check()
                before = ctx.snapshot()
                a.fn(ctx, check)
                after = ctx.snapshot()
                changed, busy = compare(before, after)
                if not changed:
                    break
                if not busy:
                    check.true("state", False, "changed: " + ", ".join(changed), "unchanged")
                    break
                if attempt == STATE_TRIES - 1:
                    notes.append("state not checked: the system was busy")
    except SetupFailed as exc:
        check.true("setup", False, f"setup failed: {exc}", "set-up succeeds")
    except RuntimeError as exc:  # the honest client could not be started or driven
        check.true("victim", False, f"{exc}", "an honest client beside the attack")
    except (KeyError, TypeError, ValueError, AttributeError, CallError, zmq.ZMQError) as exc:
        # an answer of the wrong shape (a server that lies about itself), or a call that failed outright
        check.true("answers", False, f"{type(exc).__name__}: {str(exc)[:200]}", "answers of the documented shape")
    alive = ctx.alive()
    for server, ok in alive.items():
        if not ok:
            check.true(f"{server} alive", False, f"the {server} stopped answering", "a ping answered")
    return Outcome(a.kind, a.server, a.expected, check.got(), check.passed, check.parts, notes + check.notes,
                   round(time.monotonic() - t0, 3), check.figures), all(alive.values())


def run_attacks(run_dir: str, kinds: list[str], timeout: float = 2.0,
                on_outcome: Callable[[Outcome], None] | None = None, seconds: float = 2.0,
                p99_bound: float = 20.0, nice: int = 0) -> list[Outcome]:
    """Run ``kinds`` in order; raises SetupFailed/FileNotFoundError when the system is not there. With
    ``nice``, this process lowers its CPU priority before the first resource attack (for good)."""
    ctx = Ctx(run_dir, timeout, seconds, p99_bound)
    out: list[Outcome] = []
    up = True
    try:
        for kind in kinds:
            a = ATTACKS[kind]
            if not up:
                o = Outcome(kind, a.server, a.expected, "not run: a server stopped answering", False)
            else:
                if a.what == "class" and nice:
                    os.nice(nice)
                    nice = 0
                o, up = run_one(ctx, a)
            out.append(o)
            if on_outcome is not None:
                on_outcome(o)
    finally:
        ctx.close()
    return out


# ---- the command ----------------------------------------------------------------------------------------------

def attack_cmd(
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Run directory of a running system (keys/, "
                                          "endpoints); required unless --list."),
    kind: Optional[list[str]] = typer.Option(None, "--kind", help="An attack to run (repeatable); see --list."),
    all_: bool = typer.Option(False, "--all", help="Run every attack."),
    list_: bool = typer.Option(False, "--list", help="List the attacks and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcomes as one JSON line on stdout at the end "
                                  "(the table goes to stderr)."),
    timeout: float = typer.Option(2.0, "--timeout", min=0.05, max=600.0, help="Seconds to wait for an answer that "
                                  "must come."),
    seconds: float = typer.Option(2.0, "--seconds", min=0.1, max=3600.0, help="Seconds each resource attack runs "
                                  "at full speed beside the honest client (which is first timed alone for half "
                                  "as long)."),
    p99_bound: float = typer.Option(20.0, "--p99-bound", min=1.0, max=1e6, help="The honest client's p99 latency "
                                    "beside an attack may be at most this many times its p99 alone (the median of "
                                    "the rounds' ratios)."),
    nice: int = typer.Option(10, "--nice", min=0, max=19, help="Lower the attacker's own CPU priority by this much "
                             "while it attacks resources: on a machine of few cores its own work would otherwise "
                             "be counted against the servers."),
) -> None:
    """Lie to the kernel and the mm and attack their resources; check every refusal and the victim."""
    if list_:
        for a in ATTACKS.values():
            typer.echo(f"{a.kind:<28} {a.server:<6} {a.what:<9} expect {a.expected:<36} {a.doc}")
        raise typer.Exit(0)
    if all_ and kind:
        raise typer.BadParameter("give --kind or --all, not both", param_hint="--kind")
    if not all_ and not kind:
        raise typer.BadParameter("give --kind NAME (repeatable) or --all; --list shows the attacks",
                                 param_hint="--kind")
    kinds = list(ATTACKS) if all_ else list(dict.fromkeys(kind or []))
    unknown = [k for k in kinds if k not in ATTACKS]
    if unknown:
        raise typer.BadParameter(f"unknown attack(s) {', '.join(unknown)}; --list shows them", param_hint="--kind")
    if run_dir is None:
        raise typer.BadParameter("the run directory of a running system is required", param_hint="--run-dir")
    if not os.path.isfile(os.path.join(rundir.keys_dir(run_dir), "kernel.key")):
        raise typer.BadParameter(f"{run_dir} is not a run directory (no keys/kernel.key)", param_hint="--run-dir")
    table = sys.stderr if json_out else sys.stdout
    try:
        outcomes = run_attacks(run_dir, kinds, timeout, on_outcome=lambda o: print(o.line(), file=table, flush=True),
                               seconds=seconds, p99_bound=p99_bound, nice=nice)
    except (SetupFailed, FileNotFoundError, PermissionError) as exc:
        typer.echo(f"attack: cannot start: {exc}", err=True)
        raise typer.Exit(EXIT_START) from None
    failed = [o for o in outcomes if not o.passed]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} attack(s) refused as expected"
          + (f"; FAILED: {', '.join(o.kind for o in failed)}" if failed else ""), file=table, flush=True)
    code = EXIT_FAIL if failed else EXIT_OK
    if json_out:
        print(json.dumps({"passed": len(outcomes) - len(failed), "failed": len(failed), "exit": code,
                          "attacks": [asdict(o) for o in outcomes]}, separators=(",", ":"), default=str), flush=True)
    raise typer.Exit(code)
