"""Isolation benchmark: an honest client beside each attacker at full speed, and the mm's worst request.

A whole system runs (``mmsim.system.System``); an honest client
(``clients.honest``, a process of its own: a one-page alloc and free, a
burst, a thread, an endpoint, a ping, every call timed) goes on all along,
and each resource attack of ``mmsim client attack`` (``clients.isolation``,
this process at full speed: strangers' handshakes, costly requests, kernel
frames, share laundering, unsolicited mappings, many keys, refused requests,
replay-cache floods, unread replies, stats) runs beside it in ``rounds``
slices, each slice right after a window of the honest client alone of the
same length. Figures:

- ``isolation.<attack>``: the honest client's calls per second beside the
  attack over its rate alone, the median of the per-round ratios (adjacent
  windows see the same load from the rest of the machine), target >= 0.5;
  the note gives its p99 beside and alone.
- ``isolation.victim_errors``: errors the honest client got (ENOMEM, ESRCH,
  EIO, anything; a lost process shows as ESRCH) beside all the attacks:
  target 0.
- ``mm.worst_request``: the mm's CPU (in-process: its driver and the kernel
  service it calls, no sockets) for the costliest request a client or a
  stranger can send that gets no work granted (refused, or a read), over an
  ordinary one-page alloc or free (target <= 10);
  ``mm.worst_request_paid``: the largest request a client may make, an
  alloc of its whole quota and its free (information: work it pays for
  with its quota). The kernel's own (``kernel.worst_request``) is in
  ``mmsim bench kernel`` (and here, run alone).

The attacker lowers its own CPU priority (``nice``): on a machine of two
cores its own work would otherwise be counted against the servers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from bench.report import Figure, Report
from bench.roundtrip import BenchError

Step = Callable[[str], None]


def _all_classes() -> list[str]:
    from clients.catalogue import CLASSES

    return [k.kind for k in CLASSES]


@dataclass
class IsolationBenchOptions:
    seconds: float = 0.5  # one slice: the honest client alone, then beside the attack, this long each
    rounds: int = 3
    transport: str = "ipc"
    arch: str = "i686"
    memory: str = "256MiB"
    classes: list[str] = field(default_factory=_all_classes)
    nice: int = 10
    kernel_worst: bool = True  # also the kernel's worst request (``mmsim bench all`` has it from the kernel bench)
    lease: float = 2.0  # the system's lease: what a class made goes within three of them

    def check(self) -> None:
        if self.seconds <= 0 or self.rounds < 1:
            raise ValueError("seconds must be positive and rounds at least 1")
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.transport!r}")
        unknown = sorted(set(self.classes) - set(_all_classes()))
        if unknown or not self.classes:
            raise ValueError(f"unknown attack(s) {', '.join(unknown) or '(none given)'}; the resource attacks are "
                             f"{', '.join(_all_classes())}")
        if not 0 <= self.nice <= 19:
            raise ValueError("nice must be 0..19")

    def steps(self) -> int:
        return 2 + len(self.classes) + (1 if self.kernel_worst else 0)


def run(opts: IsolationBenchOptions, run_dir: str, step: Step = lambda s: None) -> Report:
    """The isolation figures; the system is started under ``run_dir`` and stopped after."""
    from clients.attacks import Check, Ctx, SetupFailed
    from clients.isolation import run_class
    from mmsim.system import StartError, System

    opts.check()
    rep = Report()
    step("the mm's worst requests (in-process)")
    mm_worst_figures(rep, opts.memory, opts.arch)
    if opts.kernel_worst:
        from bench.kernel import worst_figures

        step("the kernel's worst requests (in-process)")
        worst_figures(rep, opts.memory)
    step("starting the kernel and the mm")
    system = System(os.path.join(run_dir, "isolation"), arch=opts.arch, memory=opts.memory, lease=opts.lease,
                    transport=opts.transport, clients=0)
    rows: dict[str, Any] = {}
    errors: dict[str, int] = {}
    try:
        try:
            system.start()
        except StartError as exc:
            raise BenchError(f"the system did not start: {exc}") from None
        ctx = Ctx(system.run_dir, timeout=2.0, seconds=opts.seconds * opts.rounds, p99_bound=float("inf"))
        try:
            if opts.nice:
                os.nice(opts.nice)
            for kind in opts.classes:
                step(f"beside {kind}: {opts.rounds} rounds of {opts.seconds:g} s alone and {opts.seconds:g} s beside")
                c = Check()
                t0 = time.monotonic()
                try:
                    b = run_class(ctx, kind, c, rounds=opts.rounds)
                except (SetupFailed, RuntimeError) as exc:
                    raise BenchError(f"{kind}: {exc}") from None
                v = b.c.figures["victim"]
                for code, n in v["errors"].items():
                    errors[code] = errors.get(code, 0) + n
                if len(v["pids"]) > 1:
                    errors["a new process"] = errors.get("a new process", 0) + 1
                failed = [p.label for p in c.parts if not p.passed and not p.label.startswith("victim")]
                rows[kind] = {"victim": v, "attacker_failed": failed, "seconds": round(time.monotonic() - t0, 2),
                              "tallies": c.figures.get("tallies", {})}
                rep.add(Figure(
                    f"isolation.{kind}", f"honest client beside {kind} (calls/s)", v["beside_rate"], "calls/s",
                    v["alone_rate"], "calls/s", "the honest client alone", v["rate_ratio"], ">=", 0.5,
                    ">= 0.5 x alone",
                    note=f"p99 {v['beside_p99_ms']:.2f} ms beside, {v['alone_p99_ms']:.2f} ms alone "
                         f"({v['p99_ratio']:.1f}x); round ratios {v['rate_ratios']}"
                         + (f"; ERRORS {v['errors']}" if v["errors"] else "")
                         + (f"; attacker's checks failed: {', '.join(failed)}" if failed else "")))
        finally:
            ctx.close()
    finally:
        system.stop()
    total = sum(errors.values())
    rep.add(Figure("isolation.victim_errors", "errors the honest client got beside every attacker", total, "errors",
                   ratio=float(total), op="<=", threshold=0.0, target="0",
                   note=", ".join(f"{k} x{n}" for k, n in errors.items()) or "none"))
    rep.details["isolation"] = {"seconds": opts.seconds, "rounds": opts.rounds, "memory": opts.memory,
                                "classes": rows}
    rep.meta.setdefault("transport", opts.transport)
    return rep


# ---- the mm's worst request, in-process -------------------------------------------------------------------

WORST_MM, WORST_OP = "M" * 40, "O" * 40
WORST_CLIENT, WORST_STRANGER, WORST_PEER = "C" * 40, "S" * 40, "P" * 40


def mm_worst_catalog(memory: str = "256MiB", arch: str = "i686") -> tuple[Callable[[str, bytes], bytes | None],
                                                                          list[tuple[str, str, Callable[[int], bytes]]],
                                                                          int]:
    """(send: a request through the mm's driver, to an in-process kernel, its reply; the worst requests as
    (name, who, request by id); the client's quota)."""
    from kernel_server.bootmap import parse_size
    from kernel_server.service import KernelService
    from mm_service import driver as D
    from mm_service.policy import Config
    from protocol import wire

    k = KernelService.boot(arch=arch, memory=parse_size(memory), mm_key=WORST_MM, operator_key=WORST_OP,
                           lease_seconds=1e9)
    d = D.Driver(Config(), WORST_MM, WORST_OP, first_kid=1)
    out: list[bytes] = []

    def pump(actions: list[Any]) -> None:
        for a in actions:
            t = type(a)
            if t is D.SendKernel:
                pump(d.handle(D.KernelReply(k.handle(WORST_MM, a.data, 0.0))))
            elif t is D.WriteJournal:
                pump(d.handle(D.JournalCommitted(a.batch)))
            elif t is D.SendReply:
                out.append(a.data)

    def send(who: str, data: bytes) -> bytes | None:
        out.clear()
        pump(d.handle(D.ClientRequest(1, who, data)))
        return out[-1] if out else None

    pump(d.boot(k.call(WORST_MM, "hello"), k.call(WORST_MM, "address_map"), []))
    for who in (WORST_CLIENT, WORST_PEER):
        got = wire.parse_reply(send(who, wire.request(1, "alloc", {"pages": 1, "prot": 3, "vaddr": 0x4000_0000}))
                               or b"")
        if not got.get("ok"):
            raise BenchError(f"setting up the mm's worst requests: {got}")
    quota = d.core.view.clients[WORST_CLIENT].quota  # type: ignore[union-attr]

    def env(call: str, args: bytes) -> Callable[[int], bytes]:
        head = b"\xa4call" + msgpack.packb(call) + b"\xa4args"
        return lambda i: b"\x84\xa1v\x01\xa2id" + msgpack.packb(i) + head + args

    def req(call: str, args: dict[str, Any]) -> Callable[[int], bytes]:
        return lambda i: wire.request(i, call, args)

    C, S = WORST_CLIENT, WORST_STRANGER
    cat = [  # (name, who, request by id, the answer it must get)
        ("4 KiB of one-byte integers", C, env("ping", msgpack.packb({"x": [[0] * 1000] * 4})), "EINVAL"),
        ("14 fields of 256-byte strings", C, env("ping", msgpack.packb({f"k{j}": "x" * 256 for j in range(14)})),
         "EINVAL"),
        ("arrays nested 3000 deep", C, env("ping", b"\x81\xa1x" + b"\x91" * 3000 + b"\x00"), "EPROTO"),
        ("an array of 1025 items", C, env("ping", b"\x81\xa1x\xdc\x04\x01" + b"\x00" * 1025), "E2BIG"),
        ("a message past a client's size", C, lambda i: b"\x00" * (wire.MAX_CLIENT_REQUEST_BYTES + 1), "E2BIG"),
        ("a message past any size", S, lambda i: b"\x00" * (wire.MAX_REQUEST_BYTES + 1), "E2BIG"),
        ("alloc of 2**20 pages", C, req("alloc", {"pages": 1 << 20, "prot": 3}), "EINVAL"),
        ("alloc of its quota and one more", C, req("alloc", {"pages": quota + 1, "prot": 3}), "ENOMEM"),
        ("free of 2**20 pages it does not have", C, req("free", {"vaddr": 0, "pages": 1 << 20}), "EINVAL"),
        ("share to a key nobody admitted", C, req("share", {"vaddr": 0x4000_0000, "pages": 1, "peer": "U" * 40,
                                                            "prot": 1}), "ESRCH"),
        ("accept of an offer that does not exist", C, req("accept", {"offer": 1 << 40}), "ESRCH"),
        ("audit", C, req("audit", {}), "EPERM"),
        ("stats", C, req("stats", {}), "ok"),
        ("hello", S, req("hello", {}), "ok"),
        ("W+X alloc by a stranger", S, req("alloc", {"pages": 1, "prot": 7}), "ENOTSUP"),
        ("alloc past its quota by a stranger", S, req("alloc", {"pages": quota + 1, "prot": 3}), "ENOMEM"),
    ]
    for i, (name, who, make, want) in enumerate(cat):  # each is what it says it is
        got = wire.parse_reply(send(who, make(100 + i)) or b"\x80")
        code = "ok" if got.get("ok") is True else (got.get("error") or {}).get("code")
        if code != want:
            raise BenchError(f"the mm's worst request {name!r} got {code}, not {want}")
    return send, [(n, w, m) for n, w, m, _ in cat], quota


def mm_worst_request(memory: str = "256MiB", arch: str = "i686", reps: int = 30, passes: int = 5) -> dict[str, Any]:
    """The mm's CPU per request (in-process, the kernel calls it makes included) of each worst request and of
    an ordinary one-page alloc or free; the ratios (the best of ``passes`` passes of ``reps`` each)."""
    from protocol import wire

    send, cat, quota = mm_worst_catalog(memory, arch)
    clock = time.process_time
    rid = [1000]

    def nid() -> int:
        rid[0] += 1
        return rid[0]

    def best(fn: Callable[[], None], per: int) -> float:
        out = []
        for _ in range(passes):
            t0 = clock()
            fn()
            out.append(clock() - t0)
        return min(out) / per

    def ordinary() -> None:
        for _ in range(reps * 5):
            send(WORST_CLIENT, wire.request(nid(), "alloc", {"pages": 1, "prot": 3, "vaddr": 0x5000_0000}))
            send(WORST_CLIENT, wire.request(nid(), "free", {"pages": 1, "vaddr": 0x5000_0000}))

    def paid() -> None:
        for _ in range(max(1, reps // 10)):
            send(WORST_PEER, wire.request(nid(), "alloc", {"pages": quota - 1, "prot": 3, "vaddr": 0x6000_0000}))
            send(WORST_PEER, wire.request(nid(), "free", {"pages": quota - 1, "vaddr": 0x6000_0000}))

    base = best(ordinary, reps * 10)
    out: dict[str, Any] = {"ordinary_us": base * 1e6, "quota": quota, "requests": []}
    for name, who, make in cat:
        t = best(lambda who=who, make=make: [send(who, make(nid())) for _ in range(reps)], reps)
        out["requests"].append({"name": name, "us": t * 1e6, "ratio": t / base})
    worst = max(out["requests"], key=lambda r: r["us"])
    out["worst"] = worst
    t = best(paid, 2 * max(1, reps // 10))
    out["paid"] = {"name": f"alloc of {quota - 1} pages (its quota) and its free", "us": t * 1e6, "ratio": t / base}
    return out


def mm_worst_figures(rep: Report, memory: str = "256MiB", arch: str = "i686") -> None:
    w = mm_worst_request(memory, arch)
    base, worst, paid = w["ordinary_us"], w["worst"], w["paid"]
    rep.add(Figure("mm.worst_request", "worst request of a client or a stranger at the mm (CPU, in-process)",
                   worst["us"], "us", base, "us", "one-page alloc or free", worst["ratio"], "<=", 10.0,
                   "<= 10 x alloc/free", note=worst["name"] + " (the kernel calls it makes included)"))
    rep.add(Figure("mm.worst_request_paid", "a client's largest request at the mm (CPU, in-process)", paid["us"],
                   "us", base, "us", "one-page alloc or free", paid["ratio"],
                   target="info: work its quota pays for", note=paid["name"]))
    rep.details["mm_worst_request"] = w
