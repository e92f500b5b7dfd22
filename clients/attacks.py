"""Lying clients (``mmsim client attack``): every lie of DESIGN section 7 and more, with real sockets.

Each attack is a function that tells a lie to the kernel or the mm over a real
CURVE connection and records, for every request, whether the refusal is the
one expected (the exact error name, and the field it names where that
matters). Around each attack the kernel's ``stats`` (frame counts, the
attacker's and the victim's processes) and the mm's ``stats`` are compared
before and after: a refused lie changes nothing. After each attack both
servers must still answer a ping. One line per attack: kind, expected, got,
PASS/FAIL.

The attacker is the key pair ``attacker`` of the run directory; attacks that
need someone to steal from start a ``victim`` (key pair ``victim``) that
allocates memory, a thread and an endpoint. The verdict functions
(``verdict_error``, ``verdict_no_reply``) are pure, so a test can show that
an accepted lie is reported as FAIL.

Exit status: 0 every lie refused and both servers answering; 1 a lie was
accepted, a state changed or a server stopped answering; 2 bad options;
3 could not start (no kernel or mm).
"""

from __future__ import annotations

import itertools
import secrets
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import msgpack
import typer
import zmq

from clients.client import Client
from protocol import PROT_EXEC, PROT_READ, PROT_WRITE, rundir, wire
from protocol.calls import MAX_FRAME, MAX_PAGES_PER_CALL
from protocol.errors import CallError, Errno

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_START = 0, 1, 2, 3
RW = PROT_READ | PROT_WRITE
PAGE = 4096
NO_REPLY_WAIT = 0.5  # seconds a refused connection is given to (wrongly) answer
STATE_TRIES = 3  # an attack is run again when someone else changed the system meanwhile

# Fixed virtual addresses, so the attacker never touches what it owns by accident.
OWN_RW = 0x4000_0000  # the attacker's own read-write page
OWN_RO = 0x4000_2000  # the attacker's own read-only page
OWN_REPLAY = 0x4000_8000  # the retried alloc
ATTACK_VA = 0x9000_0000  # where the attacker tries its maps (never mapped)
VICTIM_VA = 0x5000_0000  # the victim's two pages

ATTACK_HELP = ("Lie to the kernel and the mm (forged identities, other processes' pids and frames, donate and "
               "reclaim without privilege, kernel frames, garbage, huge lists, floods, replays) and check every "
               "refusal. Exit 0 when every lie was refused and both servers still answer, 1 otherwise.")


# ---- verdicts (pure) -----------------------------------------------------------------------------

def describe(reply: dict[str, Any] | None) -> str:
    """A reply in a few words: ``EPERM``, ``EINVAL(field=tid)``, ``ok``, ``no reply``."""
    if reply is None:
        return "no reply"
    if reply.get("malformed"):
        return "malformed reply"
    if reply.get("ok") is True:
        return "ok"
    err = reply.get("error")
    if not isinstance(err, dict):
        return "error without details"
    code = str(err.get("code"))
    return f"{code}(field={err['field']})" if "field" in err else code


def verdict_error(reply: dict[str, Any] | None, codes: Iterable[Errno], field: str | None = None) -> tuple[bool, str]:
    """Is ``reply`` a refusal with one of ``codes`` (naming ``field`` or a part of it, if given)?

    Returns (passed, what the reply was)."""
    got = describe(reply)
    if reply is None or reply.get("ok") is not False or not isinstance(reply.get("error"), dict):
        return False, got
    err = reply["error"]
    names = {c.name: int(c) for c in codes}
    code = err.get("code")
    if code not in names or err.get("errno") != names[code]:
        return False, got
    named = str(err.get("field", ""))
    if field is not None and named != field and not named.startswith(field + "."):
        return False, got  # "frames.0.0" names a part of "frames"
    return True, got


def verdict_no_reply(reply: dict[str, Any] | None) -> tuple[bool, str]:
    """A connection that must not be served: no reply at all."""
    return reply is None, describe(reply)


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

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        notes = f"  [{'; '.join(self.notes)}]" if self.notes else ""
        return f"{self.kind:<28} {self.server:<6} expected {self.expected:<34} got {self.got:<40} {verdict}{notes}"


class Check:
    """What one attack saw, request by request."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.notes: list[str] = []

    def refused(self, label: str, reply: dict[str, Any] | None, *codes: Errno, field: str | None = None) -> bool:
        ok, got = verdict_error(reply, codes, field)
        self.parts.append(Part(label, ok, got, expect_text(codes, field)))
        return ok

    def unanswered(self, label: str, reply: dict[str, Any] | None) -> bool:
        ok, got = verdict_no_reply(reply)
        self.parts.append(Part(label, ok, got, "no reply"))
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
                 ids: Iterable[int], routing_id: bytes | None = None, hwm: int | None = None) -> None:
        s = zctx.socket(zmq.DEALER)
        s.linger = 0
        if keypair is not None and server_key is not None:  # None: no CURVE at all (an anonymous peer)
            s.curve_serverkey = server_key
            s.curve_publickey, s.curve_secretkey = keypair
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        if hwm is not None:
            s.sndhwm = s.rcvhwm = hwm
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_TRANSPORT_BYTES)
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

    def ask(self, call: str, args: Any = None, rid: int | None = None, timeout: float = 2.0,
            envelope: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Send one request (our id unless ``rid``; ``envelope`` replaces the whole message) and wait."""
        rid = self.new_id() if rid is None else rid
        msg = envelope if envelope is not None else {"v": wire.PROTOCOL_VERSION, "id": rid, "call": call,
                                                     "args": {} if args is None else args}
        self.send(msgpack.packb(msg, use_bin_type=True))
        want = msg.get("id") if isinstance(msg, dict) and type(msg.get("id")) is int else None
        return self.recv(timeout, want)


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

@dataclass
class Victim:
    client: Client
    key: str
    pid: int
    vaddr: int
    pages: int
    frames: list[list[int]]
    tid: int
    eid: int


class Ctx:
    """Keys, endpoints, connections and what the attacker learnt about the system."""

    def __init__(self, run_dir: str, timeout: float = 2.0) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self.zctx = zmq.Context()
        self.zctx.linger = 0
        rundir.generate(run_dir, "attacker")
        rundir.generate(run_dir, "victim")
        self.keypair = rundir.load_keypair(run_dir, "attacker")
        self.identity = self.keypair[0].decode()
        self.endpoints = {s: rundir.read_endpoint(run_dir, s) for s in ("kernel", "mm")}
        self.server_keys = {s: rundir.public_key(run_dir, s) for s in ("kernel", "mm")}
        self._ids = itertools.count(secrets.randbits(63))  # fresh per run, like protocol.connection
        self.lines: dict[str, Line] = {s: self.line(s) for s in ("kernel", "mm")}
        self.hello = result_of(self.lines["kernel"].ask("hello", timeout=timeout), "kernel hello")
        result_of(self.lines["mm"].ask("ping", timeout=timeout), "mm ping")
        self.amap = result_of(self.lines["kernel"].ask("address_map", timeout=timeout), "address_map")
        self.lease = float(self.hello.get("lease_seconds", 5.0))
        self.frames = int(self.hello.get("frames", 0))
        self.user_top = int(self.hello.get("user_top", 0xC000_0000))
        sizes = self.hello.get("large_page_sizes") or []
        self.large_frames = min(sizes) // PAGE if sizes else 0
        self.regions: dict[str, list[tuple[int, int]]] = {}
        for e in self.amap.get("entries", []):
            self.regions.setdefault(e["kind"], []).append((e["first"], e["count"]))
        self.victim: Victim | None = None
        self.keeper: Client | None = None  # keeps the attacker's lease (it sends nothing else)
        self.own_pid: int | None = None

    def close(self) -> None:
        for c in (self.keeper, self.victim.client if self.victim else None):
            if c is not None:
                c.close()
        for line in self.lines.values():
            line.close()
        self.zctx.term()

    # ---- connections ----------------------------------------------------------------

    def line(self, server: str, keypair: tuple[bytes, bytes] | None | str = "attacker", server_key: bytes | None = None,
             routing_id: bytes | None = None, hwm: int | None = None) -> Line:
        """A fresh socket to ``server``: as the attacker, as ``keypair``, or anonymous (``keypair=None``)."""
        kp = self.keypair if keypair == "attacker" else keypair
        sk = server_key if server_key is not None else self.server_keys[server]
        return Line(self.zctx, self.endpoints[server], sk if kp is not None else None, kp,  # type: ignore[arg-type]
                    self._ids, routing_id=routing_id, hwm=hwm)

    def ask(self, server: str, call: str, args: Any = None, **kw: Any) -> dict[str, Any] | None:
        kw.setdefault("timeout", self.timeout)
        return self.lines[server].ask(call, args, **kw)

    def alive(self) -> dict[str, bool]:
        """Does each server still answer a ping (on a fresh socket)?"""
        out = {}
        for s in ("kernel", "mm"):
            with self.line(s) as line:
                r = line.ask("ping", timeout=self.timeout)
            out[s] = r is not None and r.get("ok") is True
        return out

    # ---- the victim and the attacker's own process ------------------------------------------

    def _alloc_fixed(self, call: Callable[[str, dict], dict[str, Any] | None], vaddr: int, pages: int,
                     prot: int) -> dict[str, Any]:
        """An allocation at ``vaddr`` (an earlier run's leftover there is freed first)."""
        args = {"pages": pages, "prot": prot, "vaddr": vaddr}
        r = call("alloc", args)
        if r is not None and r.get("ok") is False and (r.get("error") or {}).get("code") == "EBUSY":
            call("free", {"vaddr": vaddr, "pages": pages})
            r = call("alloc", args)
        return result_of(r, f"alloc at {vaddr:#x}")

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
        self.keeper = Client.from_run_dir(self.run_dir, "attacker", create_key=False, kernel_endpoint=self.endpoints["kernel"],
                                          mm_endpoint=self.endpoints["mm"])
        self.keeper.start_keepalive(max(0.05, self.lease / 3))
        self.own_pid = hello["pid"]
        return self.own_pid

    def need_victim(self) -> Victim:
        if self.victim is not None:
            return self.victim
        c = Client.from_run_dir(self.run_dir, "victim", create_key=False, kernel_endpoint=self.endpoints["kernel"],
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
        self.victim = Victim(c, c.identity, pid, got["vaddr"], got["pages"], got["frames"], tid, eid)
        return self.victim

    # ---- frames of each kind ----------------------------------------------------------

    def first_of(self, kind: str) -> int:
        regs = self.regions.get(kind)
        if not regs:
            raise SetupFailed(f"the address map has no {kind} region")
        return regs[0][0]

    def shared_frame(self) -> int:
        for kind in ("kernel_image", "ramdisk", "firmware"):
            if self.regions.get(kind):
                return self.first_of(kind)
        raise SetupFailed("the address map has no kernel-shared frames")

    def free_user_frame(self) -> int:
        """A user frame nobody has mapped (the last frame of the last user region)."""
        first, count = self.regions["user"][-1]
        return first + count - 1

    # ---- state --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        st = result_of(self.ask("kernel", "stats"), "kernel stats")
        mm = result_of(self.ask("mm", "stats"), "mm stats")
        procs = {p.get("key"): p for p in st.get("per_process", [])}
        vkey = self.victim.key if self.victim else None
        snap = {
            "kernel frames": {k: st.get(k) for k in ("kernel_free", "kernel_used", "kernel_shared", "user_free",
                                                     "user_mapped")},
            "kernel slabs": st.get("slab_frames"),
            "attacker process": procs.get(self.identity),
            "victim process": procs.get(vkey) if vkey else None,
            "mm view": mm.get("view"),
            "mm attacker": mm.get("you"),
            "others": sorted((repr(p) for k, p in procs.items() if k not in (self.identity, vkey))),
            "mm activity": {k: (mm.get("counters") or {}).get(k) for k in ("donations", "reclaims", "deaths",
                                                                           "enomem_retries")},
        }
        if self.victim is not None:
            try:
                snap["mm victim"] = self.victim.client.mm_stats().get("you")
            except CallError as exc:
                raise SetupFailed(f"victim's mm stats: {exc}") from None
        return snap


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], bool]:
    """(what changed that the attacker may not change, whether someone else was busy meanwhile)."""
    busy = before["others"] != after["others"] or before["mm activity"] != after["mm activity"]
    changed = [k for k in before if k not in ("others", "mm activity") and before.get(k) != after.get(k)]
    return changed, busy


# ---- the attacks --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    kind: str
    server: str
    expected: str
    fn: Callable[[Ctx, Check], None]
    doc: str
    needs: tuple[str, ...] = ()  # "process" (the attacker's own), "victim": set up before the state is taken


ATTACKS: dict[str, Attack] = {}


def attack(kind: str, server: str, expected: str,
           needs: tuple[str, ...] = ()) -> Callable[[Callable[[Ctx, Check], None]], Callable[[Ctx, Check], None]]:
    def register(fn: Callable[[Ctx, Check], None]) -> Callable[[Ctx, Check], None]:
        ATTACKS[kind] = Attack(kind, server, expected, fn, (fn.__doc__ or "").strip().splitlines()[0], needs)
        return fn

    return register


def for_both(kind: str, expected: str,
             needs: tuple[str, ...] = ()) -> Callable[[Callable[[Ctx, Check, str], None]], Callable[[Ctx, Check, str], None]]:
    """Register a lie told to both servers: ``kind`` (kernel) and ``mm-kind``."""

    def register(fn: Callable[[Ctx, Check, str], None]) -> Callable[[Ctx, Check, str], None]:
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        for server, name in (("kernel", kind), ("mm", f"mm-{kind}")):
            ATTACKS[name] = Attack(name, server, expected, lambda ctx, c, s=server: fn(ctx, c, s), doc, needs)
        return fn

    return register


# -- identity ----------------------------------------------------------------------------------------------

@attack("forged-routing-id", "kernel", "identity=attacker; EPERM")
def forged_routing_id(ctx: Ctx, c: Check) -> None:
    """A socket whose ZeroMQ routing id is the mm's public key: the kernel still sees the attacker's key."""
    mm_key = ctx.server_keys["mm"]
    with ctx.line("kernel", routing_id=mm_key) as line:
        r = line.ask("hello", timeout=ctx.timeout)
        res = r.get("result") if r and r.get("ok") else {}
        c.true("hello identity", isinstance(res, dict) and res.get("identity") == ctx.identity
               and res.get("is_mm") is False, f"identity={str((res or {}).get('identity'))[:8]}.. "
               f"is_mm={(res or {}).get('is_mm')}", "the attacker's key, is_mm False")
        c.refused("donate", line.ask("donate", {"frames": [[ctx.free_user_frame(), 1]]}, timeout=ctx.timeout),
                  Errno.EPERM)
        c.refused("reclaim", line.ask("reclaim", {"count": 1}, timeout=ctx.timeout), Errno.EPERM)
    with ctx.line("mm", routing_id=mm_key) as line:
        c.refused("mm audit", line.ask("audit", timeout=ctx.timeout), Errno.EPERM)


@attack("throwaway-key", "kernel", "pid None; EPERM/ESRCH")
def throwaway_key(ctx: Ctx, c: Check) -> None:
    """A fresh CURVE key nobody knows: served, but with no process and no privilege."""
    kp = rundir.fresh_keypair()
    with ctx.line("kernel", keypair=kp) as line:
        r = line.ask("hello", timeout=ctx.timeout)
        res = (r or {}).get("result") or {}
        c.true("hello", res.get("identity") == kp[0].decode() and res.get("pid") is None and res.get("is_mm") is False,
               describe(r) + f" pid={res.get('pid')}", "ok, own key, pid None")
        c.refused("donate", line.ask("donate", {"frames": [[ctx.free_user_frame(), 1]]}, timeout=ctx.timeout),
                  Errno.EPERM)
        c.refused("thread_create", line.ask("thread_create", timeout=ctx.timeout), Errno.ESRCH)
        c.refused("map shared", line.ask("map", {"vaddr": ATTACK_VA, "frames": [[ctx.shared_frame(), 1]],
                                                 "prot": PROT_READ}, timeout=ctx.timeout), Errno.ESRCH)


@for_both("anonymous", "no reply")
def anonymous(ctx: Ctx, c: Check, server: str) -> None:
    """A connection without CURVE (the NULL mechanism): never served."""
    with ctx.line(server, keypair=None) as line:
        c.unanswered("ping", line.ask("ping", timeout=NO_REPLY_WAIT))


@for_both("wrong-server-key", "no reply")
def wrong_server_key(ctx: Ctx, c: Check, server: str) -> None:
    """CURVE towards a made-up server key (a man in the middle's): the handshake fails, nothing is served."""
    with ctx.line(server, server_key=rundir.fresh_keypair()[0]) as line:
        c.unanswered("ping", line.ask("ping", timeout=NO_REPLY_WAIT))


# -- privilege ------------------------------------------------------------------------------------------------

@attack("donate-unprivileged", "kernel", "EPERM", needs=("victim",))
def donate_unprivileged(ctx: Ctx, c: Check) -> None:
    """Donate frames (a free user frame, the victim's frames) without being the mm."""
    v = ctx.need_victim()
    c.refused("free user frame", ctx.ask("kernel", "donate", {"frames": [[ctx.free_user_frame(), 1]]}), Errno.EPERM)
    c.refused("victim's frames", ctx.ask("kernel", "donate", {"frames": v.frames}), Errno.EPERM)


@attack("reclaim-unprivileged", "kernel", "EPERM")
def reclaim_unprivileged(ctx: Ctx, c: Check) -> None:
    """Reclaim kernel frames (by count, by frame) without being the mm."""
    c.refused("count", ctx.ask("kernel", "reclaim", {"count": 16}), Errno.EPERM)
    c.refused("frames", ctx.ask("kernel", "reclaim", {"frames": [[ctx.first_of("kernel_pool"), 1]]}), Errno.EPERM)


@attack("proc-create-unprivileged", "kernel", "EPERM")
def proc_create_unprivileged(ctx: Ctx, c: Check) -> None:
    """Create processes (for a made-up key, for itself) without being the mm."""
    c.refused("fresh key", ctx.ask("kernel", "proc_create", {"key": rundir.fresh_keypair()[0].decode()}), Errno.EPERM)
    c.refused("own key", ctx.ask("kernel", "proc_create", {"key": ctx.identity}), Errno.EPERM)


@attack("proc-destroy-unprivileged", "kernel", "EPERM", needs=("victim",))
def proc_destroy_unprivileged(ctx: Ctx, c: Check) -> None:
    """Destroy the victim's process without being the mm."""
    v = ctx.need_victim()
    c.refused("victim's pid", ctx.ask("kernel", "proc_destroy", {"pid": v.pid}), Errno.EPERM)


@attack("frame-info-unprivileged", "kernel", "EPERM")
def frame_info_unprivileged(ctx: Ctx, c: Check) -> None:
    """Read the kernel's frame table without being the mm."""
    c.refused("all frames", ctx.ask("kernel", "frame_info", {"frames": [[0, ctx.frames]]}), Errno.EPERM)


@attack("events-unprivileged", "kernel", "EPERM")
def events_unprivileged(ctx: Ctx, c: Check) -> None:
    """Read the kernel's process events without being the mm."""
    c.refused("events", ctx.ask("kernel", "events", {"since": 0}), Errno.EPERM)


@attack("mm-audit-unprivileged", "mm", "EPERM")
def mm_audit_unprivileged(ctx: Ctx, c: Check) -> None:
    """Ask the mm for the operator's audit without the mm's key."""
    c.refused("audit", ctx.ask("mm", "audit"), Errno.EPERM)


# -- other processes --------------------------------------------------------------------------------------

@attack("foreign-pid-map", "kernel", "EPERM", needs=("process", "victim"))
def foreign_pid_map(ctx: Ctx, c: Check) -> None:
    """Map into the victim's address space by naming its pid."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("shared frame", ctx.ask("kernel", "map", {"pid": v.pid, "vaddr": ATTACK_VA,
                                                         "frames": [[ctx.shared_frame(), 1]], "prot": PROT_READ}),
              Errno.EPERM)
    c.refused("victim's frames", ctx.ask("kernel", "map", {"pid": v.pid, "vaddr": ATTACK_VA, "frames": v.frames,
                                                            "prot": RW}), Errno.EPERM)


@attack("foreign-pid-unmap", "kernel", "EPERM", needs=("process", "victim"))
def foreign_pid_unmap(ctx: Ctx, c: Check) -> None:
    """Unmap the victim's memory by naming its pid."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("victim's pages", ctx.ask("kernel", "unmap", {"pid": v.pid, "vaddr": v.vaddr, "pages": v.pages}),
              Errno.EPERM)


@attack("foreign-frame-map", "kernel", "EPERM", needs=("process", "victim"))
def foreign_frame_map(ctx: Ctx, c: Check) -> None:
    """Map frames that are not the attacker's (the victim's, a free user frame) into itself."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("victim's frames", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": v.frames, "prot": RW}),
              Errno.EPERM)
    c.refused("victim's frames RO", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": v.frames,
                                                               "prot": PROT_READ}), Errno.EPERM)
    c.refused("free user frame", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[ctx.free_user_frame(), 1]],
                                                           "prot": RW}), Errno.EPERM)


@attack("foreign-vaddr-unmap", "kernel", "EINVAL", needs=("process", "victim"))
def foreign_vaddr_unmap(ctx: Ctx, c: Check) -> None:
    """Unmap at the victim's virtual address (in its own space, where nothing is mapped)."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("victim's vaddr", ctx.ask("kernel", "unmap", {"vaddr": v.vaddr, "pages": v.pages}), Errno.EINVAL)


@attack("unmap-mm-memory", "kernel", "EPERM", needs=("process",))
def unmap_mm_memory(ctx: Ctx, c: Check) -> None:
    """Unmap, in its own address space, pages the mm mapped there (they are freed through the mm only)."""
    ctx.need_process()
    c.refused("own RW page", ctx.ask("kernel", "unmap", {"vaddr": OWN_RW, "pages": 1}), Errno.EPERM)
    c.refused("own RO page", ctx.ask("kernel", "unmap", {"vaddr": OWN_RO, "pages": 1}), Errno.EPERM)


@attack("foreign-objects", "kernel", "ESRCH", needs=("process", "victim"))
def foreign_objects(ctx: Ctx, c: Check) -> None:
    """Destroy the victim's thread and endpoint by id."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("victim's thread", ctx.ask("kernel", "thread_destroy", {"tid": v.tid}), Errno.ESRCH)
    c.refused("victim's endpoint", ctx.ask("kernel", "endpoint_destroy", {"eid": v.eid}), Errno.ESRCH)


@attack("mm-free-foreign", "mm", "EINVAL", needs=("process", "victim"))
def mm_free_foreign(ctx: Ctx, c: Check) -> None:
    """Ask the mm to free the victim's allocation."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("victim's allocation", ctx.ask("mm", "free", {"vaddr": v.vaddr, "pages": v.pages}), Errno.EINVAL)


@attack("mm-share-foreign", "mm", "EINVAL", needs=("process", "victim"))
def mm_share_foreign(ctx: Ctx, c: Check) -> None:
    """Ask the mm to share the victim's memory into the attacker."""
    ctx.need_process()
    v = ctx.need_victim()
    c.refused("victim's allocation", ctx.ask("mm", "share", {"vaddr": v.vaddr, "pages": v.pages, "peer": ctx.identity,
                                                              "peer_vaddr": ATTACK_VA, "prot": PROT_READ}),
              Errno.EINVAL)


# -- the attacker's own address space ---------------------------------------------------------------------

@attack("map-kernel-frame", "kernel", "EPERM", needs=("process",))
def map_kernel_frame(ctx: Ctx, c: Check) -> None:
    """Map kernel frames (free pool, frame table, a large page over the kernel image) into itself."""
    ctx.need_process()
    c.refused("kernel pool frame", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[ctx.first_of("kernel_pool"), 1]],
                                                             "prot": PROT_READ}), Errno.EPERM)
    c.refused("frame table frame", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[ctx.first_of("frame_table"), 1]],
                                                             "prot": PROT_READ}), Errno.EPERM)
    if ctx.large_frames:
        n = ctx.large_frames
        base = ctx.first_of("kernel_image") // n * n
        c.refused("large page over the kernel image", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[base, n]],
                                                                                "prot": PROT_READ, "large": True}),
                  Errno.EPERM)


@attack("map-boot-image-writable", "kernel", "EPERM", needs=("process",))
def map_boot_image_writable(ctx: Ctx, c: Check) -> None:
    """Map kernel-shared frames (boot image, RAM disk, firmware) writable or executable."""
    ctx.need_process()
    for kind in ("kernel_image", "ramdisk", "firmware"):
        if ctx.regions.get(kind):
            c.refused(f"{kind} RW", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[ctx.first_of(kind), 1]],
                                                              "prot": RW}), Errno.EPERM)
    c.refused("kernel_image RX", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[ctx.shared_frame(), 1]],
                                                           "prot": PROT_READ | PROT_EXEC}), Errno.EPERM)


@attack("map-wx", "kernel", "ENOTSUP", needs=("process",))
def map_wx(ctx: Ctx, c: Check) -> None:
    """Map writable and executable at once."""
    ctx.need_process()
    for prot in (PROT_WRITE | PROT_EXEC, RW | PROT_EXEC):
        c.refused(f"prot {prot}", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": [[ctx.shared_frame(), 1]],
                                                            "prot": prot}), Errno.ENOTSUP)


@attack("map-unaligned", "kernel", "EINVAL(field=vaddr)", needs=("process",))
def map_unaligned(ctx: Ctx, c: Check) -> None:
    """Map and unmap at addresses that are not page-aligned (and a large page not large-aligned)."""
    ctx.need_process()
    f = ctx.shared_frame()
    c.refused("map", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA + 0x800, "frames": [[f, 1]], "prot": PROT_READ}),
              Errno.EINVAL, field="vaddr")
    c.refused("unmap", ctx.ask("kernel", "unmap", {"vaddr": OWN_RW + 1, "pages": 1}), Errno.EINVAL, field="vaddr")
    if ctx.large_frames:
        c.refused("large map", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA + PAGE, "frames": [[f, ctx.large_frames]],
                                                         "prot": PROT_READ, "large": True}), Errno.EINVAL, field="vaddr")


@attack("map-out-of-range", "kernel", "EINVAL", needs=("process",))
def map_out_of_range(ctx: Ctx, c: Check) -> None:
    """Addresses beyond user space or 64 bits, negative ones, frames beyond RAM or any frame number."""
    ctx.need_process()
    f = ctx.shared_frame()
    top = ctx.user_top
    m = lambda vaddr, frames: ctx.ask("kernel", "map", {"vaddr": vaddr, "frames": frames, "prot": PROT_READ})  # noqa: E731
    c.refused("vaddr = user top", m(top, [[f, 1]]), Errno.EINVAL, field="vaddr")
    c.refused("crossing user top", m(top - PAGE, [[f, 2]]), Errno.EINVAL, field="vaddr")
    c.refused("vaddr near 2**64", m((1 << 64) - PAGE, [[f, 1]]), Errno.EINVAL, field="vaddr")
    c.refused("vaddr 2**64 - 1", m((1 << 64) - 1, [[f, 1]]), Errno.EINVAL, field="vaddr")
    c.refused("negative vaddr", m(-PAGE, [[f, 1]]), Errno.EINVAL, field="vaddr")
    c.refused("frame beyond RAM", m(ATTACK_VA, [[ctx.frames, 1]]), Errno.EINVAL)
    c.refused("frame beyond any", m(ATTACK_VA, [[MAX_FRAME + 1, 1]]), Errno.EINVAL, field="frames")
    c.refused("unmap at user top", ctx.ask("kernel", "unmap", {"vaddr": top, "pages": 1}), Errno.EINVAL, field="vaddr")
    c.refused("unmap too many pages", ctx.ask("kernel", "unmap", {"vaddr": 0, "pages": MAX_PAGES_PER_CALL + 1}),
              Errno.EINVAL, field="pages")


@attack("bad-runs", "kernel", "EINVAL(field=frames)", needs=("process",))
def bad_runs(ctx: Ctx, c: Check) -> None:
    """Frame runs that are not runs: count 0, negative, three numbers, overflowing, not a list."""
    ctx.need_process()
    for label, runs in (("count 0", [[5, 0]]), ("negative first", [[-1, 1]]), ("three numbers", [[5, 1, 1]]),
                        ("overflow", [[MAX_FRAME, 2]]), ("empty", []), ("not a list", 5), ("strings", [["5", "1"]])):
        c.refused(label, ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": runs, "prot": PROT_READ}),
                  Errno.EINVAL, field="frames")


@attack("too-many-runs", "kernel", "EINVAL(field=frames)", needs=("process",))
def too_many_runs(ctx: Ctx, c: Check) -> None:
    """One run more than the per-call limit (map and donate)."""
    ctx.need_process()
    runs = [[ctx.shared_frame(), 1]] * (wire.MAX_RUNS + 1)
    c.refused("map", ctx.ask("kernel", "map", {"vaddr": ATTACK_VA, "frames": runs, "prot": PROT_READ}),
              Errno.EINVAL, field="frames")
    c.refused("donate", ctx.ask("kernel", "donate", {"frames": runs}), Errno.EINVAL, field="frames")


# -- the mm's rules -------------------------------------------------------------------------------------

@attack("mm-quota", "mm", "ENOMEM", needs=("process",))
def mm_quota(ctx: Ctx, c: Check) -> None:
    """Ask the mm for more pages than a client's quota."""
    ctx.need_process()
    st = result_of(ctx.ask("mm", "stats"), "mm stats")
    quota = int(st.get("quota") or 0)
    r = ctx.ask("mm", "alloc", {"pages": max(1, quota + 1), "prot": RW})
    if c.refused("quota + 1 pages", r, Errno.ENOMEM, Errno.EINVAL):
        err = (r or {}).get("error") or {}
        if err.get("code") == "ENOMEM":
            c.true("details", err.get("quota") == quota, f"quota={err.get('quota')}", f"quota={quota}")


@attack("mm-share-more-rights", "mm", "EPERM", needs=("process",))
def mm_share_more_rights(ctx: Ctx, c: Check) -> None:
    """Share a read-only allocation writable (to its own peer key)."""
    ctx.need_process()
    peer = rundir.fresh_keypair()[0].decode()
    c.refused("RO shared RW", ctx.ask("mm", "share", {"vaddr": OWN_RO, "pages": 1, "peer": peer,
                                                      "peer_vaddr": ATTACK_VA, "prot": RW}), Errno.EPERM)


@attack("mm-share-to-mm", "mm", "EINVAL", needs=("process",))
def mm_share_to_mm(ctx: Ctx, c: Check) -> None:
    """Share memory into the mm's own identity (or into itself)."""
    ctx.need_process()
    c.refused("peer = mm", ctx.ask("mm", "share", {"vaddr": OWN_RW, "pages": 1, "peer": ctx.server_keys["mm"].decode(),
                                                   "peer_vaddr": ATTACK_VA, "prot": PROT_READ}), Errno.EINVAL)
    c.refused("peer = self", ctx.ask("mm", "share", {"vaddr": OWN_RW, "pages": 1, "peer": ctx.identity,
                                                     "peer_vaddr": ATTACK_VA, "prot": PROT_READ}), Errno.EINVAL)


@attack("mm-alloc-wx", "mm", "ENOTSUP", needs=("process",))
def mm_alloc_wx(ctx: Ctx, c: Check) -> None:
    """Ask the mm for writable and executable memory."""
    ctx.need_process()
    c.refused("prot W+X", ctx.ask("mm", "alloc", {"pages": 1, "prot": RW | PROT_EXEC}), Errno.ENOTSUP)


@attack("mm-alloc-out-of-range", "mm", "EINVAL", needs=("process",))
def mm_alloc_out_of_range(ctx: Ctx, c: Check) -> None:
    """Ask the mm for memory at kernel addresses, unaligned, zero or too many pages."""
    ctx.need_process()
    a = lambda args: ctx.ask("mm", "alloc", args)  # noqa: E731
    c.refused("vaddr = user top", a({"pages": 1, "prot": RW, "vaddr": ctx.user_top}), Errno.EINVAL, field="vaddr")
    c.refused("unaligned vaddr", a({"pages": 1, "prot": RW, "vaddr": ATTACK_VA + 1}), Errno.EINVAL, field="vaddr")
    c.refused("0 pages", a({"pages": 0, "prot": RW}), Errno.EINVAL, field="pages")
    c.refused("too many pages", a({"pages": MAX_PAGES_PER_CALL + 1, "prot": RW}), Errno.EINVAL, field="pages")
    c.refused("prot 0", a({"pages": 1, "prot": 0}), Errno.EINVAL, field="prot")


# -- bytes and envelopes -------------------------------------------------------------------------------------

GARBAGE = (b"\xc1\xc1\xc1", b"", b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n", msgpack.packb([1, 2, 3]),
           msgpack.packb("ping"), b"\x85\xa1v")


@for_both("garbage-bytes", "EPROTO")
def garbage_bytes(ctx: Ctx, c: Check, server: str) -> None:
    """Bytes that are not a msgpack map: invalid, empty, truncated, a list, a string, HTTP."""
    with ctx.line(server) as line:
        for i, data in enumerate(GARBAGE):
            line.send(data)
            c.refused(f"garbage {i}", line.recv(ctx.timeout), Errno.EPROTO)


@for_both("bad-envelope", "EPROTO")
def bad_envelope(ctx: Ctx, c: Check, server: str) -> None:
    """Envelopes that lie: version 2, negative or string ids, a huge call name, args not a map, extra keys."""
    v = wire.PROTOCOL_VERSION
    cases = (
        ("version 2", {"v": 2, "id": 1, "call": "ping", "args": {}}),
        ("negative id", {"v": v, "id": -1, "call": "ping", "args": {}}),
        ("string id", {"v": v, "id": "1", "call": "ping", "args": {}}),
        ("no id", {"v": v, "call": "ping", "args": {}}),
        ("long call name", {"v": v, "id": 2, "call": "p" * 1000, "args": {}}),
        ("args a list", {"v": v, "id": 3, "call": "ping", "args": [1]}),
        ("extra key", {"v": v, "id": 4, "call": "ping", "args": {}, "identity": ctx.server_keys["mm"].decode()}),
    )
    with ctx.line(server) as line:
        for label, env in cases:
            if type(env.get("id")) is int and env["id"] >= 0:
                env = {**env, "id": line.new_id()}
            c.refused(label, line.ask("", envelope=env, timeout=ctx.timeout), Errno.EPROTO)


@for_both("wrong-types", "EINVAL naming the field")
def wrong_types(ctx: Ctx, c: Check, server: str) -> None:
    """Strings, floats and booleans where integers belong ("1" for 1)."""
    if server == "kernel":
        cases = (("tid '1'", "thread_destroy", {"tid": "1"}, "tid"), ("tid 1.0", "thread_destroy", {"tid": 1.0}, "tid"),
                 ("tid true", "thread_destroy", {"tid": True}, "tid"),
                 ("vaddr '4096'", "unmap", {"vaddr": "4096", "pages": 1}, "vaddr"),
                 ("prot '1'", "map", {"vaddr": ATTACK_VA, "frames": [[1, 1]], "prot": "1"}, "prot"),
                 ("count 1.5", "reclaim", {"count": 1.5}, "count"))
    else:
        cases = (("pages '1'", "alloc", {"pages": "1", "prot": RW}, "pages"),
                 ("pages 1.0", "alloc", {"pages": 1.0, "prot": RW}, "pages"),
                 ("prot true", "alloc", {"pages": 1, "prot": True}, "prot"),
                 ("vaddr '0'", "free", {"vaddr": "0", "pages": 1}, "vaddr"),
                 ("peer 5", "share", {"vaddr": 0, "pages": 1, "peer": 5, "peer_vaddr": 0}, "peer"))
    for label, call, args, fld in cases:
        c.refused(label, ctx.ask(server, call, args), Errno.EINVAL, field=fld)


@for_both("unknown-call", "ENOSYS")
def unknown_call(ctx: Ctx, c: Check, server: str) -> None:
    """Calls that do not exist (including the other server's calls)."""
    other = "alloc" if server == "kernel" else "donate"
    for call in ("format_disk", "__init__", other):
        c.refused(call, ctx.ask(server, call, {}), Errno.ENOSYS)


@for_both("unknown-fields", "EINVAL naming the field")
def unknown_fields(ctx: Ctx, c: Check, server: str) -> None:
    """Arguments the call does not have (an identity or a pid smuggled in)."""
    call, args = ("ping", {"as": ctx.server_keys["mm"].decode()}) if server == "kernel" else \
        ("alloc", {"pages": 1, "prot": RW, "owner": ctx.identity})
    c.refused(f"{call} + extra", ctx.ask(server, call, args), Errno.EINVAL, field=next(k for k in args if k not in
                                                                                       ("pages", "prot")))
    if server == "kernel":
        c.refused("thread_create + pid", ctx.ask(server, "thread_create", {"pid": 1}), Errno.EINVAL, field="pid")


@for_both("multi-frame", "EPROTO")
def multi_frame(ctx: Ctx, c: Check, server: str) -> None:
    """A request split over several ZeroMQ frames."""
    with ctx.line(server) as line:
        req = wire.request(line.new_id(), "ping")
        line.send([req, req])
        c.refused("2 frames", line.recv(ctx.timeout), Errno.EPROTO)
        line.send([b"", req, b"x"])
        c.refused("3 frames", line.recv(ctx.timeout), Errno.EPROTO)


@for_both("million-runs", "E2BIG/EINVAL")
def million_runs(ctx: Ctx, c: Check, server: str) -> None:
    """A list of a million frame runs (about 3 MB)."""
    runs = [[0, 1]] * 1_000_000
    call, args = ("donate", {"frames": runs}) if server == "kernel" else ("alloc", {"pages": 1, "prot": RW, "vaddr": runs})
    c.refused("1e6 runs", ctx.ask(server, call, args, timeout=max(ctx.timeout, 5.0)), Errno.E2BIG, Errno.EINVAL)


@for_both("oversized-message", "E2BIG; dropped")
def oversized_message(ctx: Ctx, c: Check, server: str) -> None:
    """Messages beyond the size limit: 2 MiB (refused with E2BIG) and 5 MiB (the transport drops the peer)."""
    with ctx.line(server) as line:
        rid = line.new_id()
        line.send(msgpack.packb({"v": 1, "id": rid, "call": "ping", "args": {"pad": b"x" * (2 << 20)}}))
        c.refused("2 MiB", line.recv(max(ctx.timeout, 5.0)), Errno.E2BIG)
    with ctx.line(server) as line:
        line.send(b"\x00" * (5 << 20))
        r = line.recv(NO_REPLY_WAIT)
        c.true("5 MiB", r is None or verdict_error(r, (Errno.E2BIG,))[0], describe(r), "no reply or E2BIG")


def _flood(ctx: Ctx, c: Check, server: str, n: int) -> None:
    plan = (("ping", {}, "ok"), ("hello", {}, "ok"), ("no_such_call", {}, "ENOSYS"), ("ping", {"x": 1}, "EINVAL"))
    expect: dict[int, str] = {}
    wrong = answered = in_flight = 0
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
                if got != want:
                    wrong += 1
    c.true("answers", wrong == 0, f"{wrong} wrong", "every answer right")
    alive = ctx.alive()[server]
    c.true("answered or alive", answered == n or alive,
           f"{answered}/{n} answered (up to {in_flight} in flight)", "all answered, or a ping answered after")
    c.notes.append(f"{answered}/{n} answered, up to {in_flight} in flight")


@attack("flood", "kernel", "all answered")
def flood(ctx: Ctx, c: Check) -> None:
    """5000 requests in flight at once (pings, hellos, unknown calls, bad fields)."""
    _flood(ctx, c, "kernel", 5000)


@attack("mm-flood", "mm", "all answered")
def mm_flood(ctx: Ctx, c: Check) -> None:
    """3000 requests in flight at once to the mm."""
    _flood(ctx, c, "mm", 3000)


# -- replays (I12) -------------------------------------------------------------------------------------------

@for_both("replay-different", "EINVAL(field=id)", needs=("process",))
def replay_different(ctx: Ctx, c: Check, server: str) -> None:
    """A request id used again for a different request (a ping's id reused for a state change)."""
    ctx.need_process()
    rid = ctx.lines[server].new_id()
    first = describe(ctx.ask(server, "ping", rid=rid))
    c.true("ping", first == "ok", first, "ok")
    call, args = ("thread_create", {}) if server == "kernel" else ("alloc", {"pages": 1, "prot": RW})
    c.refused(f"{call} with the ping's id", ctx.ask(server, call, args, rid=rid), Errno.EINVAL, field="id")


@attack("replay-identical", "kernel", "same tid, one thread", needs=("process",))
def replay_identical(ctx: Ctx, c: Check) -> None:
    """thread_create sent twice with the same id: executed once, the same answer twice."""
    ctx.need_process()

    def threads() -> int:
        st = result_of(ctx.ask("kernel", "stats"), "stats")
        return next((p["threads"] for p in st["per_process"] if p.get("key") == ctx.identity), -1)

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


@attack("mm-replay-alloc", "mm", "same vaddr, one allocation", needs=("process",))
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


# ---- running them --------------------------------------------------------------------------------------------

def run_one(ctx: Ctx, a: Attack) -> tuple[Outcome, bool]:
    """Run one attack with the state check around it; (outcome, both servers still answer)."""
    t0 = time.monotonic()
    notes: list[str] = []
    check = Check()
    try:
        if "process" in a.needs:
            ctx.need_process()
        if "victim" in a.needs:
            ctx.need_victim()
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
    alive = ctx.alive()
    for server, ok in alive.items():
        if not ok:
            check.true(f"{server} alive", False, f"the {server} stopped answering", "a ping answered")
    return Outcome(a.kind, a.server, a.expected, check.got(), check.passed, check.parts, notes + check.notes,
                   round(time.monotonic() - t0, 3)), all(alive.values())


def run_attacks(run_dir: str, kinds: list[str], timeout: float = 2.0,
                on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``kinds`` in order; raises SetupFailed/FileNotFoundError when the system is not there."""
    ctx = Ctx(run_dir, timeout)
    out: list[Outcome] = []
    up = True
    try:
        for kind in kinds:
            a = ATTACKS[kind]
            if not up:
                o = Outcome(kind, a.server, a.expected, "not run: a server stopped answering", False)
            else:
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
    timeout: float = typer.Option(2.0, "--timeout", min=0.05, help="Seconds to wait for an answer that must come."),
) -> None:
    """Lie to the kernel and the mm and check that every lie is refused."""
    if list_:
        for a in ATTACKS.values():
            typer.echo(f"{a.kind:<28} {a.server:<6} expect {a.expected:<30} {a.doc}")
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
        outcomes = run_attacks(run_dir, kinds, timeout, on_outcome=lambda o: print(o.line(), file=table, flush=True))
    except (SetupFailed, FileNotFoundError) as exc:
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
