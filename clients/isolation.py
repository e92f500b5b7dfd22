"""Resource attacks beside an honest client: the attack classes of ``mmsim client attack``.

Each class is an attacker at full speed (this process, many sockets) beside
an honest client (``clients.honest``: a process of its own, its workload
within its quotas, every call timed). ``run_class`` runs the class's set-up,
its full-speed phase in ``rounds`` slices, each right after a window of the
honest client alone of the same length (``Bout.slices``; the machine's other
load drifts, and adjacent windows see the same drift), and its clean-up (it
waits until what it made is gone, so the next class finds the system as it
was). What the honest client saw outside the windows (set-up, clean-up) is
kept too: its errors and pids count.

The verdict has two halves. The attacker's: every reply it got is the
refusal the design names (the catalogue's, or the class's own checks: the
pair's charges, the budget, the replay cache). The victim's
(``victim_parts``, pure): no error of any kind, the same process all along
(no ESRCH, the same pid), progress, and its p99 latency beside the attack at
most ``p99_bound`` times its p99 alone (the median of the rounds' ratios).

The classes (``catalogue.CLASSES`` describes them): stranger-flood,
costly-requests, kernel-frames, share-laundering, unsolicited-mapping,
many-keys, refused-creates-nothing, replay-cache-flood, unread-replies,
stats-bounded. ``Bout.figures`` keeps the windows and tallies
(``mmsim bench isolation`` reads them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import msgpack
import zmq

from clients import catalogue as CAT
from clients.attacks import CAST, Check, Ctx, Line, result_of
from clients.catalogue import Teller
from clients.honest import HonestProcess
from protocol import PROT_READ, PROT_WRITE, rundir, wire
from protocol.errors import CallError, Errno

RW = PROT_READ | PROT_WRITE
FLOOD_KEYS = 4200  # admitted keys of the replay-cache flood: more than a replay cache remembers callers (4096)
FLOOD_CHUNK = 64  # of them calling at once
WINDOW = 8  # requests in flight per socket of a full-speed attacker
RSS_GROWTH = 64 << 20  # bytes a server's memory may grow by under a flood it never drains
TABLE_SPAN = 4 << 20  # virtual bytes between the kernel-frames attacker's maps (each needs a table of its own)
SPARSE_VA = 0x6000_0000  # where those maps go
UNSOLICITED_VA = 0x4400_0000
REPLAY_VA = 0x4000_a000
UNREAD_VA = 0x4000_c000
COSTLY_SERVERS = ("kernel", "mm")  # whom costly-requests attacks


# ---- the victim's half of the verdict (pure) ------------------------------------------------------------

def median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarize(pairs: list[tuple[dict[str, Any], dict[str, Any]]],
              between: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """The victim's rounds (alone, beside) in a few figures: per-round ratios and their medians (the
    machine's other load drifts; adjacent windows see the same drift), and what every window saw (those
    ``between`` the rounds too: set-up and clean-up)."""
    p99 = [b["p99_ms"] / a["p99_ms"] if a.get("p99_ms") else float("inf") for a, b in pairs]
    rate = [b["rate"] / a["rate"] if a.get("rate") else 0.0 for a, b in pairs]
    errors: Counter = Counter()
    pids: set[str] = set()
    first = ""
    for w in sorted([*(w for pair in pairs for w in pair), *between], key=lambda w: w.get("began", 0.0)):
        errors.update(w.get("errors", {}))  # (in the order they were seen: the first error is the earliest)
        pids |= {str(x) for x in w.get("pids", [])}
        first = first or w.get("first_error", "")
    side = lambda i, k: [pair[i].get(k, 0) for pair in pairs]  # noqa: E731
    return {
        "rounds": len(pairs), "p99_ratio": median(p99), "p99_ratios": [round(x, 2) for x in p99],
        "rate_ratio": median(rate), "rate_ratios": [round(x, 3) for x in rate],
        "alone_p99_ms": median(side(0, "p99_ms")), "beside_p99_ms": median(side(1, "p99_ms")),
        "alone_rate": median(side(0, "rate")), "beside_rate": median(side(1, "rate")),
        "beside_calls": sum(side(1, "calls")), "errors": dict(errors), "first_error": first, "pids": sorted(pids),
        "extra_pages": max(side(1, "extra_pages") or [0]), "extra_mappings": max(side(1, "extra_mappings") or [0]),
        "offers_to_me": max(side(1, "offers_to_me") or [0]),
    }


def victim_parts(v: dict[str, Any], pid: Any, p99_bound: float) -> list[tuple[str, bool, str, str]]:
    """(label, passed, got, expected) for the honest client's experience: ``v`` is ``summarize`` of its
    rounds, ``pid`` its process at start."""
    out = []
    errs, first = v["errors"], v["first_error"]
    got = ("none" if not errs else ", ".join(f"{k} x{n}" for k, n in errs.items())
           + (f" ({first[:120]})" if first else ""))
    out.append(("victim errors", not errs, got, "none"))
    out.append(("victim process", set(v["pids"]) <= {str(pid)}, f"pids {v['pids']}", f"pid {pid} all along"))
    out.append(("victim progress", v["beside_calls"] > 0, f"{v['beside_calls']} calls beside the attack",
                "some calls"))
    out.append(("victim p99", v["rounds"] > 0 and v["p99_ratio"] <= p99_bound,
                f"{v['beside_p99_ms']:.2f} ms beside, {v['alone_p99_ms']:.2f} ms alone (median of round ratios "
                f"{v['p99_ratio']:.1f}x: {v['p99_ratios']})", f"<= {p99_bound:g}x alone"))
    if v["extra_pages"] or v["extra_mappings"]:
        out.append(("victim address space", False, f"{v['extra_pages']} pages and {v['extra_mappings']} mappings it "
                    "did not make", "only what it mapped"))
    return out


# ---- a bout: one class against the honest client ------------------------------------------------------------

SETTLE = 0.1  # seconds between an attack's slice and the victim's next window alone (the servers drain)


@dataclass
class Bout:
    """One class against the honest client. The full-speed phase comes in ``rounds`` slices, each right
    after a window of the victim alone of the same length: ``for deadline in b.slices(): ...`` (or
    ``deadline = b.begin()`` ... ``b.end()`` for one slice of the whole time)."""

    ctx: Ctx
    honest: HonestProcess
    c: Check
    seconds: float
    rounds: int = 3
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    between: list[dict[str, Any]] = field(default_factory=list)  # the victim outside the rounds
    attacked: float = 0.0  # seconds at full speed
    _alone: dict[str, Any] | None = None
    _began: float = 0.0

    def begin(self, seconds: float | None = None) -> float:
        """A window of the victim alone, then the attack: returns the attack's deadline."""
        seconds = self.seconds if seconds is None else seconds
        self.between.append(self.honest.mark())
        time.sleep(seconds)
        self._alone = self.honest.mark()
        self._began = time.monotonic()
        return self._began + seconds

    def end(self) -> None:
        if self._alone is not None:
            beside = self.honest.mark()
            self.attacked += time.monotonic() - self._began
            self.pairs.append((self._alone, beside))
            self._alone = None
            time.sleep(SETTLE)

    def slices(self) -> Iterator[float]:
        """The attack in ``rounds`` slices (each yields its deadline), each after the victim alone."""
        for _ in range(self.rounds):
            yield self.begin(self.seconds / self.rounds)
            self.end()

    def tally(self, label: str, got: Counter, allowed: set[str], expected: str, need: int = 1) -> bool:
        """A part: every outcome in ``got`` is one of ``allowed`` (and there are at least ``need``)."""
        bad = {k: v for k, v in got.items() if k not in allowed}
        n = sum(got.values())
        text = ", ".join(f"{k} x{v}" for k, v in got.most_common(6)) or "nothing"
        self.c.figures.setdefault("tallies", {})[label] = dict(got)
        return self.c.true(label, not bad and n >= need, text, expected)


def honest_of(ctx: Ctx) -> HonestProcess:
    """The honest client (started once per context)."""
    if ctx.honest is None or not ctx.honest.alive():
        ctx.honest = HonestProcess(ctx.run_dir, CAST["honest"], timeout=max(ctx.timeout, 2.0))
    return ctx.honest


def run_class(ctx: Ctx, kind: str, c: Check, rounds: int = 3) -> Bout:
    """Run attack class ``kind`` beside the honest client (``ctx.seconds`` at full speed in ``rounds``
    slices); its parts and figures go into ``c``."""
    honest = honest_of(ctx)
    b = Bout(ctx, honest, c, ctx.seconds, rounds=rounds)
    honest.mark()  # (what came before this class is not its doing)
    try:
        CLASS_FNS[kind](b)
    finally:
        b.end()
        b.between.append(honest.mark())  # its clean-up
    v = summarize(b.pairs, b.between)
    for label, ok, got, expected in victim_parts(v, honest.pid, ctx.p99_bound):
        c.true(label, ok, got, expected)
    c.figures.update(victim=v, windows=b.pairs, between=b.between, attack_seconds=round(b.attacked, 3))
    c.notes.append(f"victim {v['beside_rate']:.0f} calls/s beside, {v['alone_rate']:.0f} alone (median round ratio "
                   f"{v['rate_ratio']:.2f})")
    return b


# ---- tools ------------------------------------------------------------------------------------------------

def outcome(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "no reply"
    if reply.get("ok") is True:
        return "ok"
    return str((reply.get("error") or {}).get("code"))


def blast(lines: list[tuple[Line, Callable[[int], bytes]]], deadline: float,
          judge: Callable[[int, dict[str, Any] | None, int], str], window: int = WINDOW) -> Counter:
    """Keep ``window`` requests in flight on each line until ``deadline``; ``judge(line index, reply,
    reply size)`` names each reply's outcome. Returns the outcomes counted."""
    poller = zmq.Poller()
    index = {}
    for i, (line, _) in enumerate(lines):
        poller.register(line.sock, zmq.POLLIN)
        index[line.sock] = i
    got: Counter = Counter()
    flying = [0] * len(lines)
    for i, (line, make) in enumerate(lines):
        for _ in range(window):
            line.sock.send(make(line.new_id()))
            flying[i] += 1
    while time.monotonic() < deadline or any(flying):
        if time.monotonic() > deadline + 5.0:
            got["no reply"] += sum(flying)
            break
        for sock, _ in poller.poll(100):
            i = index[sock]
            line, make = lines[i]
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                flying[i] -= 1
                try:
                    reply = wire.parse_reply(data)
                except Exception:  # noqa: BLE001 (a malformed reply is an outcome)
                    reply = {"malformed": True}
                got[judge(i, reply, len(data))] += 1
                if time.monotonic() < deadline:
                    sock.send(make(line.new_id()))
                    flying[i] += 1
    return got


def ask(line: Line, call: str, args: dict | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
    return line.ask(call, args or {}, timeout=timeout)


def kstats(ctx: Ctx) -> dict[str, Any]:
    return result_of(ctx.ask("kernel", "stats"), "kernel stats")


def wait_processes(ctx: Ctx, count: int) -> bool:
    """Wait (up to three leases and a bit) until the kernel has at most ``count`` processes."""
    deadline = time.monotonic() + 3 * ctx.lease + 5.0
    while time.monotonic() < deadline:
        if kstats(ctx).get("processes", 0) <= count:
            return True
        time.sleep(0.1)
    return False


def rss(run_dir: str, server: str) -> int | None:
    """A server's resident memory in bytes (None: not on this host)."""
    pid = rundir.holder(run_dir, server)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _env(rid: int, call: str, args_bytes: bytes) -> bytes:
    """A request whose args are given as raw msgpack bytes."""
    return (b"\x84\xa1v\x01\xa2id" + msgpack.packb(rid) + b"\xa4call" + msgpack.packb(call) + b"\xa4args"
            + args_bytes)


# ---- the classes --------------------------------------------------------------------------------------------

def stranger_flood(b: Bout) -> None:
    """Keys nobody admitted, handshaking and asking at full speed: never served."""
    ctx = b.ctx
    attempts = answered = unsent = 0
    for deadline in b.slices():
        while time.monotonic() < deadline:
            lines = []
            for _ in range(16):
                for server in ("kernel", "mm"):
                    line = ctx.line(server, rundir.fresh_keypair())
                    attempts += 1
                    try:
                        line.sock.send(wire.request(line.new_id(), "ping"), zmq.NOBLOCK)
                    except zmq.Again:  # the server refused the handshake before the ping left: no way in at all
                        unsent += 1
                        line.close()
                        continue
                    lines.append(line)
            end = time.monotonic() + 0.1
            for line in lines:
                if line.sock.poll(max(0, int((end - time.monotonic()) * 1000)), zmq.POLLIN):
                    answered += 1
                line.close()
    b.c.true("strangers served", answered == 0, f"{answered} of {attempts} answered", "none answered")
    b.c.figures["stranger_attempts"] = attempts
    b.c.figures["stranger_unsent"] = unsent


def costly_requests(b: Bout) -> None:
    """The costliest requests under the limits, six at once on one socket, every kind in turn, to the kernel
    and the mm in alternate slices (both at once oversubscribe a two-core machine: the victim then waits for
    a CPU, not for the servers): each refused exactly."""
    ctx = b.ctx
    ctx.need_process()
    big = msgpack.packb({"x": [[0] * 1000] * 4})  # 4 KiB of integers (a client's limit): decoded, then refused
    strings = msgpack.packb({f"k{i}": "x" * 256 for i in range(14)})
    deep = b"\x81\xa1x" + b"\x91" * 3000 + b"\x00"
    long_array = b"\x81\xa1x\xdc\x04\x01" + b"\x00" * 1025
    five = msgpack.packb({"p": [b"x" * 200] * 25})
    shared = next((f for k, f, _ in ctx.regions if k == "kernel_image"), 0)
    # (label, request by id, the refusal, whether it is refused before its id is read: answered in turn, id None)
    common: list[tuple[str, Callable[[int], bytes], str, bool]] = [
        ("4 KiB of integers", lambda r: _env(r, "ping", big), "EINVAL", False),
        ("14 strings of 256 bytes", lambda r: _env(r, "ping", strings), "EINVAL", False),
        ("arrays 3000 deep", lambda r: _env(r, "ping", deep), "EPROTO", True),
        ("an array of 1025", lambda r: _env(r, "ping", long_array), "E2BIG", True),
        ("5 KiB", lambda r: _env(r, "ping", five), "E2BIG", True),
    ]
    plans = {
        "kernel": common + [
            ("16 runs of 2**36 frames", lambda r: wire.request(r, "map", {"vaddr": CAT.PROBE_VA, "prot": 1, "frames":
                                                                          [[shared, 1 << 36]] * 16}), "E2BIG", False),
            ("frame_info of everything", lambda r: wire.request(r, "frame_info", {"frames": [[0, ctx.frames]]}),
             "EPERM", False),
            ("the process listing", lambda r: wire.request(r, "stats", {"from_pid": 0, "limit": 1000}), "EPERM", False),
        ],
        "mm": common + [
            ("mappings of everything", lambda r: wire.request(r, "stats", {"from_pid": 0}), "EINVAL", False),
        ],
    }
    servers = [s for s in ("kernel", "mm") if s in COSTLY_SERVERS]
    lines: list[tuple[Line, Callable[[int], bytes]]] = []
    waiting: list[tuple[dict[int, tuple[str, str]], list[tuple[str, str]]]] = []
    wrong: Counter = Counter()
    for server in servers:
        plan = plans[server]
        by_id: dict[int, tuple[str, str]] = {}
        in_turn: list[tuple[str, str]] = []
        turn = [0]

        def make(rid: int, plan=plan, by_id=by_id, in_turn=in_turn, turn=turn) -> bytes:
            label, build, errno, idless = plan[turn[0] % len(plan)]
            turn[0] += 1
            (in_turn.append((label, errno)) if idless else by_id.__setitem__(rid, (label, errno)))
            return build(rid)

        lines.append((ctx.line(server), make))
        waiting.append((by_id, in_turn))

    def judge(i: int, reply: dict[str, Any] | None, size: int) -> str:
        by_id, in_turn = waiting[i]
        rid = (reply or {}).get("id")
        want = by_id.pop(rid, None) if rid is not None else (in_turn.pop(0) if in_turn else None)
        got = outcome(reply)
        if want is None or got != want[1]:
            wrong[f"{servers[i]} {want[0] if want else '?'}: {got}"] += 1
        return got

    got: Counter = Counter()
    try:
        for i, deadline in enumerate(b.slices()):
            got += blast([lines[i % len(lines)]], deadline, lambda _, r, n, j=i % len(lines): judge(j, r, n), window=6)
    finally:
        for line, _ in lines:
            line.close()
    b.tally("refusals", got, {p[2] for s in servers for p in plans[s]}, "each exactly its refusal")
    b.c.true("each its own refusal", not wrong, ", ".join(f"{k} x{v}" for k, v in wrong.most_common(3)) or "yes",
             "yes")


def kernel_frames(b: Bout) -> None:
    """Threads, endpoints and page tables up to and past the attacker's kernel quota."""
    ctx = b.ctx
    ctx.need_process()
    k = ctx.lines["kernel"]
    you = kstats(ctx).get("you") or {}
    limit = int(you.get("kernel_limit", 0))
    shared = next((f for kk, f, _ in ctx.regions if kk == "kernel_image"), 0)
    tids: list[int] = []
    eids: list[int] = []
    maps: list[int] = []
    first: dict[str, dict[str, Any]] = {}
    slot = [0]

    def next_va() -> int:
        va = SPARSE_VA + slot[0] * TABLE_SPAN
        slot[0] += 1
        return va

    try:
        for _ in range(4 * limit + 64):  # each round takes kernel frames until the quota is used
            if len(first) == 3:
                break
            if "map" not in first:
                va = next_va()
                r = ask(k, "map", {"vaddr": va, "frames": [[shared, 1]], "prot": PROT_READ})
                if r and r.get("ok"):
                    maps.append(va)
                else:
                    first["map"] = r or {}
            if "endpoint_create" not in first:
                r = ask(k, "endpoint_create")
                if r and r.get("ok"):
                    eids.append(r["result"]["eid"])
                else:
                    first["endpoint_create"] = r or {}
            if "thread_create" not in first:
                r = ask(k, "thread_create")
                if r and r.get("ok"):
                    tids.append(r["result"]["tid"])
                else:
                    first["thread_create"] = r or {}
        for call in ("map", "endpoint_create", "thread_create"):
            r = first.get(call)
            err = (r or {}).get("error") or {}
            ok = (err.get("code") == "ENOMEM" and err.get("limit") == limit and isinstance(err.get("used"), int)
                  and err["used"] <= limit < err["used"] + int(err.get("needed", 0)))
            b.c.true(f"{call} past the quota", ok, f"{CAT.describe(r)} limit={err.get('limit')} used={err.get('used')} "
                     f"needed={err.get('needed')}", f"ENOMEM naming its own limit {limit}")
        fresh_va = next_va()  # a range no table covers yet
        streams = [
            (ctx.line("kernel"), lambda r: wire.request(r, "thread_create")),
            (ctx.line("kernel"), lambda r: wire.request(r, "endpoint_create")),
            (ctx.line("kernel"), lambda r: wire.request(r, "map", {"vaddr": fresh_va, "frames": [[shared, 1]],
                                                                     "prot": PROT_READ})),
        ]
        bad: Counter = Counter()

        def judge(i: int, reply: dict[str, Any] | None, size: int) -> str:
            got = outcome(reply)
            err = (reply or {}).get("error") or {}
            if got == "ENOMEM" and err.get("limit") != limit:
                bad[f"limit {err.get('limit')}"] += 1
            return got

        got: Counter = Counter()
        try:
            for deadline in b.slices():
                got += blast(streams, deadline, judge)
        finally:
            for line, _ in streams:
                line.close()
        b.tally("refusals at full speed", got, {"ENOMEM"}, "ENOMEM only")
        b.c.true("its own limit", not bad, ", ".join(bad) or f"limit {limit}", f"limit {limit}")
        after = kstats(ctx).get("you") or {}
        b.c.true("charged within its quota", after.get("kernel_used", 0) <= limit,
                 f"kernel_used {after.get('kernel_used')} of {limit}", f"<= {limit}")
        b.c.figures["kernel_frames"] = {"limit": limit, "threads": len(tids), "endpoints": len(eids),
                                        "tables": len(maps)}
    finally:
        for t in tids:
            ask(k, "thread_destroy", {"tid": t})
        for e in eids:
            ask(k, "endpoint_destroy", {"eid": e})
        for va in maps:
            ask(k, "unmap", {"vaddr": va, "pages": 1})


def share_laundering(b: Bout) -> None:
    """Alloc, offer to a colluding peer, accept, free, repeat: each mapper charged."""
    ctx = b.ctx
    ctx.need_process()
    a = ctx.lines["mm"]
    p = ctx.line("mm", rundir.load_keypair(ctx.run_dir, CAST["peer"]))
    peer_key = rundir.public_key(ctx.run_dir, CAST["peer"]).decode()
    peer_maps: list[tuple[int, int]] = []
    mine: list[tuple[int, int]] = []
    ctx.client(CAST["peer"], keepalive=True)  # the peer's lease (kept by the context)
    try:
        got = result_of(ask(p, "alloc", {"pages": 1, "prot": RW}), "the peer's first page")
        peer_maps.append((got["vaddr"], 1))
        qa = int((result_of(ask(a, "stats"), "mm stats").get("you") or {}).get("quota", 0))
        you_p = result_of(ask(p, "stats"), "the peer's mm stats").get("you") or {}
        qp = int(you_p.get("quota", 0))
        chunk = max(1, min(64, qp // 8))
        base = kstats(ctx)["user_mapped"]
        slack = int(b.honest.info.get("burst", 16)) + 1
        peak = base
        accepts: Counter = Counter()
        quota_said: set[Any] = set()
        n = 0
        for deadline in b.slices():
            while time.monotonic() < deadline:
                r = ask(a, "alloc", {"pages": chunk, "prot": RW})
                if not (r and r.get("ok")):
                    accepts[f"alloc {CAT.describe(r)}"] += 1
                    break
                va = r["result"]["vaddr"]
                mine.append((va, chunk))
                s = ask(a, "share", {"vaddr": va, "pages": chunk, "peer": peer_key, "prot": RW})
                if s and s.get("ok"):
                    acc = ask(p, "accept", {"offer": s["result"]["offer"]})
                    accepts[outcome(acc)] += 1
                    if acc and acc.get("ok"):
                        peer_maps.append((acc["result"]["vaddr"], chunk))
                    elif acc and outcome(acc) == "ENOMEM":
                        quota_said.add((acc.get("error") or {}).get("limit"))
                else:
                    accepts[f"share {CAT.describe(s)}"] += 1
                if ask(a, "free", {"vaddr": va, "pages": chunk}) is not None:
                    mine.pop()
                n += 1
                if n % 4 == 0:
                    peak = max(peak, kstats(ctx)["user_mapped"])
        peak = max(peak, kstats(ctx)["user_mapped"])
        you_p = result_of(ask(p, "stats"), "the peer's mm stats").get("you") or {}
        you_a = result_of(ask(a, "stats"), "mm stats").get("you") or {}
        b.tally("accepts", accepts, {"ok", "ENOMEM"}, "ok until the peer's quota, then ENOMEM")
        b.c.true("accept past the peer's quota", accepts.get("ENOMEM", 0) > 0 and quota_said == {qp},
                 f"ENOMEM x{accepts.get('ENOMEM', 0)} naming quota {sorted(map(str, quota_said))}",
                 f"ENOMEM naming the peer's quota {qp}")
        b.c.true("peer charged within its quota", 0 < you_p.get("charged", 0) <= qp,
                 f"charged {you_p.get('charged')} of {qp}", f"<= {qp}")
        grew = peak - base
        b.c.true("the pair within their quotas", grew <= qa + qp + slack and you_a.get("charged", 0) <= qa,
                 f"user pages in use grew by {grew} (quotas {qa} + {qp})", f"<= {qa + qp} (+{slack} the victim's)")
        b.c.figures["laundering"] = {"rounds": n, "chunk": chunk, "peer_quota": qp, "grew": grew}
    finally:
        for va, pages in peer_maps:
            ask(p, "free", {"vaddr": va, "pages": pages})
        for va, pages in mine:
            ask(a, "free", {"vaddr": va, "pages": pages})
        p.close()


def unsolicited_mapping(b: Bout) -> None:
    """Offers nobody accepts, shares to keys that cannot take them, accepts of others' offers."""
    ctx = b.ctx
    ctx.need_process()
    a = ctx.lines["mm"]
    victim = b.honest.identity
    p = ctx.line("mm", rundir.load_keypair(ctx.run_dir, CAST["peer"]))
    gone_name = "attacker-gone"
    gone = ctx.client(gone_name)
    try:
        if ask(a, "alloc", {"pages": 1, "prot": RW, "vaddr": UNSOLICITED_VA}) is None:
            raise RuntimeError("no reply to the attacker's alloc")
        gone.alloc(1)  # a process for a key that is revoked next: admitted no more
        rundir.revoke(ctx.run_dir, gone_name)
        gone_key = gone.identity
        offers: Counter = Counter()
        offer_no = None
        for _ in range(200):
            r = ask(a, "share", {"vaddr": UNSOLICITED_VA, "pages": 1, "peer": victim, "prot": PROT_READ})
            offers[outcome(r)] += 1
            if r and r.get("ok") and offer_no is None:
                offer_no = r["result"]["offer"]
            if outcome(r) != "ok":
                limit_said = (r or {}).get("error", {}).get("limit")
                break
        else:
            limit_said = None
        b.c.true("offers to the victim", offers.get("EAGAIN", 0) == 1 and isinstance(limit_said, int)
                 and 1 <= offers.get("ok", 0) <= limit_said, ", ".join(f"{k} x{v}" for k, v in offers.items())
                 + f" (limit {limit_said})", "ok up to the limit of open offers, then EAGAIN naming it")
        before = kstats(ctx)["processes"]
        targets = {"a key nobody admitted": ctx.unknown, "an admitted key with no process": ctx.stranger,
                   "a revoked key": gone_key, "the mm": ctx.server_keys["mm"].decode()}
        shares: Counter = Counter()
        rounds = 0
        for deadline in b.slices():
            while time.monotonic() < deadline:
                for label, key in targets.items():
                    r = ask(a, "share", {"vaddr": UNSOLICITED_VA, "pages": 1, "peer": key, "prot": PROT_READ})
                    shares[f"share to {label}: {outcome(r)}"] += 1
                if offer_no is not None:
                    r = ask(p, "accept", {"offer": offer_no})
                    shares[f"accept of the victim's offer by a peer: {outcome(r)}"] += 1
                    r = ctx.stranger_lines["mm"].ask("accept", {"offer": offer_no}, timeout=ctx.timeout)
                    shares[f"accept of the victim's offer by a stranger: {outcome(r)}"] += 1
                rounds += 1
        after = kstats(ctx)["processes"]
        bad = {k: v for k, v in shares.items() if not k.endswith("ESRCH")}
        b.c.true("shares and accepts refused", not bad and rounds > 0,
                 ", ".join(f"{k} x{v}" for k, v in (bad or shares).items() if not bad or k in bad)[:300],
                 "ESRCH for every one")
        b.c.true("no process made", after <= before, f"processes {before} -> {after}", "not more")
        v = summarize(b.pairs, b.between)
        b.c.true("the victim saw offers, nothing mapped", v["offers_to_me"] > 0 and v["extra_pages"] == 0
                 and v["extra_mappings"] == 0, f"{v['offers_to_me']} offers to it, {v['extra_pages']} pages and "
                 f"{v['extra_mappings']} mappings it did not make", "offers; nothing it did not map")
    finally:
        ask(a, "free", {"vaddr": UNSOLICITED_VA, "pages": 1})  # (its offers die with it)
        p.close()


def many_keys(b: Bout) -> None:
    """Many admitted keys, each taking its whole quota: grants stop when the budget is used."""
    ctx = b.ctx
    ctx.need_process()
    st = result_of(ctx.ask("mm", "stats"), "mm stats")
    budget = st["budget"]
    quota, kquota = int(st["quota"]), int(st["kernel_quota"])
    fit = max(0, (budget["frames"] - budget["granted"]) // max(1, quota + kquota))
    names = [f"attacker-many-{i}" for i in range(fit + 3)]
    procs_before = kstats(ctx)["processes"]
    clients = []
    got: Counter = Counter()
    refused_keys = []
    try:
        for name in names:
            clients.append(ctx.client(name, keepalive=True))
        deadline = b.begin()
        details_ok = True
        for cl in clients:
            try:
                cl.alloc(quota)
                got["granted, whole quota taken"] += 1
            except CallError as exc:
                got[exc.code.name] += 1
                refused_keys.append(cl)
                d = exc.error.details
                details_ok = details_ok and exc.code == Errno.ENOMEM and "needed" in d and "available" in d
        while time.monotonic() < deadline:  # the refused keep asking, the granted ask for more
            for cl in clients:
                try:
                    cl.alloc(1)
                    got["ok past its quota?"] += 1
                except CallError as exc:
                    got[exc.code.name] += 1
                if time.monotonic() >= deadline:
                    break
        b.end()
        granted = got.get("granted, whole quota taken", 0)
        b.c.true("grants stop at the budget", 1 <= len(refused_keys) and granted <= fit + 1 and details_ok,
                 f"{granted} keys granted of {len(names)} ({fit} fit), {len(refused_keys)} refused",
                 "grants until the budget is used, then ENOMEM {needed, available}")
        b.tally("refusals", Counter({k: v for k, v in got.items() if k != "granted, whole quota taken"}),
                {"ENOMEM"}, "ENOMEM only")
        no_proc = [cl for cl in refused_keys if cl.hello().get("pid") is None]
        b.c.true("no process for a refused key", len(no_proc) == len(refused_keys),
                 f"{len(refused_keys) - len(no_proc)} of {len(refused_keys)} have one", "none has one")
        st2 = result_of(ctx.ask("mm", "stats"), "mm stats")["budget"]
        b.c.true("no overcommit", st2["granted"] <= st2["frames"], f"{st2['granted']} of {st2['frames']} granted",
                 "at most the budget")
        b.c.figures["many_keys"] = {"keys": len(names), "fit": fit, "granted": granted}
    finally:
        for cl in clients:
            cl.stop_keepalive()
        for name in names:
            rundir.revoke(ctx.run_dir, name)
        if not wait_processes(ctx, procs_before):
            b.c.notes.append("the many keys' processes were still there after three leases")


def refused_creates_nothing(b: Bout) -> None:
    """A key with no process sends what the mm refuses: no process, no client record, no charge."""
    ctx = b.ctx
    lies = [x for x in CAT.LIES if x.teller is Teller.STRANGER and x.server == "mm"]
    lies.append(CAT.Lie("refused", "alloc beyond user space", "mm", "alloc", Teller.STRANGER,
                        lambda s: {"pages": 2, "prot": RW, "vaddr": s.user_top - 4096},
                        CAT.refused(Errno.EINVAL, "vaddr")))
    scene = ctx.scene(Teller.STRANGER)
    clients_before = result_of(ctx.ask("mm", "stats"), "mm stats")["clients"]
    wrong: Counter = Counter()
    told = 0
    for deadline in b.slices():
        while time.monotonic() < deadline:
            for x in lies:
                ok, got = x.judge(ctx.tell(x, scene), scene)
                told += 1
                if not ok:
                    wrong[f"{x.label}: {got}"] += 1
    b.c.true("refused as the catalogue says", not wrong and told > 0,
             ", ".join(f"{k} x{v}" for k, v in wrong.most_common(3)) or f"{told} refusals", "every one")
    k = result_of(ctx.stranger_lines["kernel"].ask("hello", timeout=ctx.timeout), "kernel hello")
    m = result_of(ctx.stranger_lines["mm"].ask("hello", timeout=ctx.timeout), "mm hello")
    b.c.true("no process", k.get("pid") is None and m.get("pid") is None, f"kernel pid {k.get('pid')}, mm pid "
             f"{m.get('pid')}", "none at either")
    clients_after = result_of(ctx.ask("mm", "stats"), "mm stats")["clients"]
    b.c.true("no client record", clients_after <= clients_before, f"mm clients {clients_before} -> {clients_after}",
             "not more")
    b.c.true("no charge", (m.get("charged") or 0) == 0, f"charged {m.get('charged')}", "0")


def replay_cache_flood(b: Bout) -> None:
    """Thousands of admitted keys call between a live client's request and its retry."""
    ctx = b.ctx
    ctx.need_process()
    k, m = ctx.lines["kernel"], ctx.lines["mm"]
    you = kstats(ctx).get("you") or {}
    threads0 = int(you.get("threads", -1))
    kid, mid = k.new_id(), m.new_id()
    kreq = wire.request(kid, "thread_create")
    mreq = wire.request(mid, "alloc", {"pages": 1, "prot": RW, "vaddr": REPLAY_VA})
    k.send(kreq)
    r1 = k.recv(ctx.timeout, kid)
    m.send(mreq)
    m1 = m.recv(ctx.timeout, mid)
    maps0 = int(((result_of(ask(m, "stats"), "mm stats").get("you") or {}).get("mappings", -1)))
    ran = (r1 or {}).get("ok") is True and (m1 or {}).get("ok") is True and \
        int((kstats(ctx).get("you") or {}).get("threads", -1)) == threads0 + 1
    if not b.c.true("the live client's requests ran", ran, f"{CAT.describe(r1)}, {CAT.describe(m1)}; threads "
                    f"{threads0} -> {(kstats(ctx).get('you') or {}).get('threads')}", "ok, ok; one more thread"):
        _undo_replayed(b, r1)
        return
    names = [f"attacker-flood-{i}" for i in range(FLOOD_KEYS)]
    pairs = [rundir.fresh_keypair() for _ in names]
    served: Counter = Counter()
    zctx = zmq.Context()  # the flood's own: thousands of sockets
    zctx.linger = 0
    zctx.set(zmq.MAX_SOCKETS, 2 * FLOOD_KEYS + 64)
    socks: list[tuple[str, zmq.Socket]] = []

    def ping_all() -> Counter:
        """Every flood socket pings once, FLOOD_CHUNK at a time (thousands at once would be thousands of
        clients the victim shares the servers with, fairly: that is not what this class is about); the
        callers answered, by server."""
        got: Counter = Counter()
        for i in range(0, len(socks), FLOOD_CHUNK):
            chunk = socks[i:i + FLOOD_CHUNK]
            for _, sock in chunk:
                try:
                    sock.send(wire.request(1, "ping"), zmq.NOBLOCK)
                except zmq.Again:  # its handshake was refused (the pipe is gone): not served, counted below
                    pass
            end = time.monotonic() + 10.0
            for server, sock in chunk:
                sock.rcvtimeo = max(1, int((end - time.monotonic()) * 1000))
                try:
                    sock.recv()
                    got[server] += 1
                except zmq.Again:
                    pass
        return got

    staging = tempfile.mkdtemp(prefix="mmsim-admit-")  # written there, then moved in: the servers re-read once
    try:
        for name, (pub, _) in zip(names, pairs):
            rundir.admit(staging, name, key=pub)
        there, here = rundir.admitted_dir(staging), rundir.admitted_dir(ctx.run_dir)
        for name in names:
            os.replace(os.path.join(there, f"{name}.key"), os.path.join(here, f"{name}.key"))
        time.sleep(0.5)  # the servers re-read the admitted keys
        for kp in pairs:  # the handshakes happen here, before the victim is watched (stranger-flood watches those)
            for server in ("kernel", "mm"):
                sock = zctx.socket(zmq.DEALER)
                sock.curve_serverkey = ctx.server_keys[server]
                sock.curve_publickey, sock.curve_secretkey = kp
                sock.connect(ctx.endpoints[server])
                socks.append((server, sock))
        served = ping_all()  # thousands of callers in the replay caches
        for deadline in b.slices():  # and they keep calling
            while time.monotonic() < deadline:
                served += ping_all()
        b.end()
        k.send(kreq)
        r2 = k.recv(ctx.timeout, kid)
        m.send(mreq)
        m2 = m.recv(ctx.timeout, mid)
        threads1 = int((kstats(ctx).get("you") or {}).get("threads", -1))
        maps1 = int(((result_of(ask(m, "stats"), "mm stats").get("you") or {}).get("mappings", -1)))
        b.c.true("flood reached both caches", min(served["kernel"], served["mm"]) > 4096,
                 f"kernel {served['kernel']}, mm {served['mm']} requests of {len(pairs)} callers answered",
                 "more than 4096 callers each")
        b.c.true("kernel retry answered from the cache", r1 is not None and r1 == r2 and r1.get("ok") is True
                 and threads1 == threads0 + 1, f"{CAT.describe(r1)} then {CAT.describe(r2)}"
                 + (", same" if r1 == r2 else ", different") + f"; threads {threads0} -> {threads1}",
                 "the same reply; one thread")
        b.c.true("mm retry answered from the cache", m1 is not None and m1 == m2 and m1.get("ok") is True
                 and maps1 == maps0, f"{CAT.describe(m1)} then {CAT.describe(m2)}"
                 + (", same" if m1 == m2 else ", different") + f"; mappings {maps0} -> {maps1}",
                 "the same reply; one allocation")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for _, sock in socks:
            sock.close(0)
        zctx.destroy(linger=0)
        for name in names:
            rundir.revoke(ctx.run_dir, name)
        _undo_replayed(b, r1)


def _undo_replayed(b: Bout, r1: dict[str, Any] | None) -> None:
    tid = ((r1 or {}).get("result") or {}).get("tid")
    if isinstance(tid, int):
        ask(b.ctx.lines["kernel"], "thread_destroy", {"tid": tid})
    ask(b.ctx.lines["mm"], "free", {"vaddr": REPLAY_VA, "pages": 1})


def _drain(line: Line, seen: Counter, timeout: float = 30.0) -> bool:
    """Read a never-read socket empty: a marker ping goes behind everything sent, and the replies are read
    until a marker's answer comes (the server has worked through the backlog; a marker whose answer found
    the reply queue still full was dropped: another follows every half second). Whether one came."""
    markers: set[int] = set()
    end = time.monotonic() + timeout
    again = 0.0
    while time.monotonic() < end:
        if time.monotonic() >= again:
            markers.add(line.new_id())
            try:
                line.sock.send(wire.request(max(markers), "ping"), zmq.NOBLOCK)
            except zmq.Again:
                pass
            again = time.monotonic() + 0.5
        if not line.sock.poll(100, zmq.POLLIN):
            continue
        while True:
            try:
                reply = wire.parse_reply(line.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if reply.get("id") in markers:
                return True
            seen[outcome(reply)] += 1
    return False


def unread_replies(b: Bout) -> None:
    """Requests at full speed whose replies are never read (a slice of pings to the kernel, a slice of allocs
    and frees to the mm); each slice ends when the servers have worked through what was sent."""
    ctx = b.ctx
    ctx.need_process()
    base = {s: rss(ctx.run_dir, s) for s in ("kernel", "mm")}
    peak = dict(base)
    dropped0 = int(kstats(ctx).get("replies_dropped", 0))
    sent: Counter = Counter()
    seen: Counter = Counter()
    drained = True
    # (as many requests on their way as four reply queues hold: more than a server keeps for a peer, so replies
    # are dropped, and what is on its way is worked through in well under a second)
    kl = ctx.line("kernel", hwm=4 * wire.REPLY_QUEUE, rcvhwm=1)
    ml = ctx.line("mm", hwm=4 * wire.REPLY_QUEUE, rcvhwm=1)

    def send(line: Line, data: bytes) -> bool:
        try:
            line.sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:  # as much on its way as the socket takes: as fast as the server works through it
            time.sleep(0.001)
            return False

    try:
        n = 0
        for i, deadline in enumerate(b.slices()):
            while time.monotonic() < deadline:
                if i % 2 == 0:
                    sent["kernel"] += send(kl, wire.request(kl.new_id(), "ping"))
                else:
                    call, args = (("alloc", {"pages": 1, "prot": RW, "vaddr": UNREAD_VA}) if n % 2 == 0 else
                                  ("free", {"vaddr": UNREAD_VA, "pages": 1}))
                    if send(ml, wire.request(ml.new_id(), call, args)):
                        sent["mm"] += 1
                        n += 1
            for server in peak:
                r = rss(ctx.run_dir, server)
                if r is not None and peak[server] is not None:
                    peak[server] = max(peak[server], r)  # type: ignore[type-var]
            drained = _drain(kl if i % 2 == 0 else ml, seen) and drained
        dropped1 = int(kstats(ctx).get("replies_dropped", 0))
        b.c.true("the kernel dropped what was not read", dropped1 > dropped0,
                 f"{dropped1 - dropped0} replies dropped of {sent['kernel']} pings", "some dropped, counted")
        if sent["mm"]:
            b.c.true("the mm refused past the caller's queue", seen.get("EAGAIN", 0) > 0,
                     ", ".join(f"{k} x{v}" for k, v in seen.most_common(4)) + f" read back of {sent['mm']} sent",
                     "EAGAIN among them")
        b.c.true("the servers worked through it", drained, "yes" if drained else "a marker ping got no answer",
                 "every marker ping answered")
        for server in ("kernel", "mm"):
            r0, r1 = base[server], peak[server]
            if r0 is None or r1 is None:
                b.c.notes.append(f"the {server}'s memory is not visible from here")
                continue
            b.c.true(f"{server} memory bounded", r1 - r0 <= RSS_GROWTH, f"grew {(r1 - r0) >> 20} MiB",
                     f"<= {RSS_GROWTH >> 20} MiB")
        b.c.figures["unread"] = dict(sent)
    finally:
        kl.close()
        ml.close()
        ask(ctx.lines["mm"], "free", {"vaddr": UNREAD_VA, "pages": 1})


def stats_bounded(b: Bout) -> None:
    """Stats and listings at full speed, to the kernel and the mm in alternate slices: the listing refused,
    every answer small."""
    ctx = b.ctx
    ctx.need_process()
    plan = [("kernel", lambda r: wire.request(r, "stats"), "ok", 4096),
            ("kernel", lambda r: wire.request(r, "stats", {"from_pid": 0, "limit": 1000}), "EPERM", 1024),
            ("kernel", lambda r: wire.request(r, "events", {"limit": 1000}), "EPERM", 1024),
            ("mm", lambda r: wire.request(r, "stats"), "ok", 8192)]
    lines = [(ctx.line(server), make) for server, make, _, _ in plan]
    big: Counter = Counter()
    sizes = [0] * len(plan)

    def judge(i: int, reply: dict[str, Any] | None, size: int) -> str:
        sizes[i] = max(sizes[i], size)
        got = outcome(reply)
        if size > plan[i][3] or (got == "ok" and "per_process" in (reply or {}).get("result", {})):
            big[i] += 1
        return f"{plan[i][0]} {got}" if got == plan[i][2] else f"{plan[i][0]} {got} (wrong)"

    got: Counter = Counter()
    turns = [[i for i, p in enumerate(plan) if p[0] == server] for server in ("kernel", "mm")]  # in turn, as costly
    try:
        for r, deadline in enumerate(b.slices()):
            idx = turns[r % 2]
            got += blast([lines[i] for i in idx], deadline, lambda k, reply, n, idx=idx: judge(idx[k], reply, n),
                         window=2)
    finally:
        for line, _ in lines:
            line.close()
    b.tally("answers", got, {f"{s} {e}" for s, _, e, _ in plan}, "stats ok, listings EPERM")
    b.c.true("every answer small", not big, ", ".join(f"{plan[i][0]} up to {sizes[i]} bytes" for i in range(len(plan))),
             "stats within a few KiB, no listing")


CLASS_FNS: dict[str, Callable[[Bout], None]] = {
    "stranger-flood": stranger_flood,
    "costly-requests": costly_requests,
    "kernel-frames": kernel_frames,
    "share-laundering": share_laundering,
    "unsolicited-mapping": unsolicited_mapping,
    "many-keys": many_keys,
    "refused-creates-nothing": refused_creates_nothing,
    "replay-cache-flood": replay_cache_flood,
    "unread-replies": unread_replies,
    "stats-bounded": stats_bounded,
}
assert set(CLASS_FNS) == {k.kind for k in CAT.CLASSES}, "every class of the catalogue has its attacker"

__all__ = ["CLASS_FNS", "Bout", "blast", "run_class", "victim_parts"]
