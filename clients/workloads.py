"""Workloads, written sans-I/O: generators of requests that receive their results.

Rules for this file: no sockets, clocks or I/O; all randomness from the
``random.Random`` passed in. A workload yields ``Req(target, call, args,
as_peer)`` and is sent back the result dict or an ``Error``. The real client
process (``clients.runner``) sends the requests over ZeroMQ; the simulator
runs the same generators against the in-process cores. Workloads run until
their driver stops them.

- ``steady``: allocates and frees small blocks (and now and then a large page).
- ``sparse``: one page per page-table span, far apart: the kernel needs many
  page tables (kernel-memory pressure through ``map``).
- ``kobjects``: threads and endpoints (kernel memory through its own calls),
  plus read-only maps of kernel-shared frames into itself.
- ``sharer``: offers its memory to a peer identity it also speaks for, which
  accepts the offers (so frames have reference counts above 1, each mapping
  charged to its mapper) and frees its side.

Every workload tolerates refusals it can expect in a healthy system (quota,
out of memory, a restarted mm, a lease that ran out while it was paused).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, NamedTuple

from protocol import PROT_READ, PROT_WRITE
from protocol.errors import Errno, Error

PAGE = 4096
RW = PROT_READ | PROT_WRITE


class Req(NamedTuple):
    target: str  # "mm" or "kernel"
    call: str
    args: dict[str, Any]
    as_peer: bool = False  # sent with the peer identity (the sharer's other half)


@dataclass(frozen=True)
class Env:
    """What a workload knows about the system it runs in."""

    identity: str
    peer: str = ""  # the peer identity this client also speaks for (sharer)
    large_frames: int = 1024  # frames in the smallest large page (0: none)
    table_span: int = 4 << 20  # bytes of virtual space one leaf page table covers
    user_top: int = 0xC000_0000
    shared_runs: tuple[tuple[int, int], ...] = ()  # kernel-shared frames (boot image, ramdisk, ...)
    large: bool = True  # use large pages now and then
    limits: dict[str, int] = field(default_factory=dict)


Workload = Generator[Req, Any, None]


def _ok(r: Any) -> bool:
    return isinstance(r, dict)


def _code(r: Any) -> Errno | None:
    return r.code if isinstance(r, Error) else None


def steady(rng: random.Random, env: Env) -> Workload:
    live: list[tuple[int, int]] = []
    max_live = env.limits.get("max_live", 32)
    while True:
        if live and (len(live) >= max_live or rng.random() < 0.45):
            vaddr, pages = live.pop(rng.randrange(len(live)))
            r = yield Req("mm", "free", {"vaddr": vaddr, "pages": pages})
            if _code(r) in (Errno.EIO, Errno.EAGAIN):
                live.append((vaddr, pages))  # the mm is away: try again later
            continue
        args: dict[str, Any] = {"pages": rng.choice((1, 1, 1, 2, 3, 4, 8, 16)), "prot": rng.choice((PROT_READ, RW))}
        if env.large and env.large_frames and rng.random() < 0.04:
            args = {"pages": env.large_frames, "prot": RW, "large": True}
        r = yield Req("mm", "alloc", args)
        if _ok(r):
            live.append((r["vaddr"], r["pages"]))


def sparse(rng: random.Random, env: Env) -> Workload:
    base = 0x1000_0000
    slots = max(1, min(env.limits.get("slots", 64), (env.user_top - base) // env.table_span))
    live: dict[int, int] = {}  # slot -> vaddr
    while True:
        if live and (len(live) >= min(48, slots) or rng.random() < 0.35):
            slot = rng.choice(sorted(live))
            r = yield Req("mm", "free", {"vaddr": live[slot], "pages": 1})
            if _code(r) not in (Errno.EIO, Errno.EAGAIN):
                del live[slot]
            continue
        slot = rng.randrange(slots)
        if slot in live:
            continue
        vaddr = base + slot * env.table_span + rng.randrange(env.table_span // PAGE) * PAGE
        r = yield Req("mm", "alloc", {"pages": 1, "prot": RW, "vaddr": vaddr})
        if _ok(r):
            live[slot] = r["vaddr"]


def kobjects(rng: random.Random, env: Env) -> Workload:
    threads: list[int] = []
    endpoints: list[int] = []
    ro: list[int] = []  # vaddrs of read-only maps of kernel-shared frames
    has_process = False
    ro_base = 0x8000_0000
    while True:
        if not has_process:  # the mm creates our process on our first alloc
            r = yield Req("mm", "alloc", {"pages": 1, "prot": RW})
            has_process = _ok(r)
            threads, endpoints, ro = [], [], []
            continue
        roll = rng.random()
        if roll < 0.25 and len(threads) < env.limits.get("threads", 16):
            r = yield Req("kernel", "thread_create", {})
            if _ok(r):
                threads.append(r["tid"])
        elif roll < 0.40 and threads:
            r = yield Req("kernel", "thread_destroy", {"tid": threads.pop(rng.randrange(len(threads)))})
        elif roll < 0.65 and len(endpoints) < env.limits.get("endpoints", 96):
            r = yield Req("kernel", "endpoint_create", {})
            if _ok(r):
                endpoints.append(r["eid"])
        elif roll < 0.80 and endpoints:
            r = yield Req("kernel", "endpoint_destroy", {"eid": endpoints.pop(rng.randrange(len(endpoints)))})
        elif roll < 0.90 and env.shared_runs and len(ro) < 8:
            first, count = env.shared_runs[rng.randrange(len(env.shared_runs))]
            vaddr = ro_base + rng.randrange(1 << 14) * PAGE
            if vaddr in ro:
                continue
            r = yield Req("kernel", "map", {"vaddr": vaddr, "frames": [[first + rng.randrange(count), 1]],
                                            "prot": PROT_READ})
            if _ok(r):
                ro.append(vaddr)
        elif roll < 0.95 and ro:
            r = yield Req("kernel", "unmap", {"vaddr": ro.pop(rng.randrange(len(ro))), "pages": 1})
        else:
            r = yield Req("kernel", "ping", {})
        if _code(r) == Errno.ESRCH:
            has_process = False  # our process is gone (lease ran out while we were paused)


def sharer(rng: random.Random, env: Env) -> Workload:
    own: list[tuple[int, int]] = []  # our allocations
    peer_maps: list[tuple[int, int]] = []  # (peer vaddr, pages): offers the peer accepted
    peer_live = False  # an offer needs a peer with a live process: the peer's first alloc makes it
    peer_base = 0x6000_0000
    slot = 0
    while True:
        roll = rng.random()
        if env.peer and not peer_live:
            r = yield Req("mm", "alloc", {"pages": 1, "prot": RW}, as_peer=True)
            peer_live = _ok(r)
            if peer_live:
                peer_maps.append((r["vaddr"], 1))
        elif roll < 0.3 and len(own) < 8:
            r = yield Req("mm", "alloc", {"pages": rng.choice((1, 2, 4, 8)), "prot": RW})
            if _ok(r):
                own.append((r["vaddr"], r["pages"]))
        elif roll < 0.6 and own and env.peer and len(peer_maps) < 16:
            vaddr, pages = own[rng.randrange(len(own))]
            r = yield Req("mm", "share", {"vaddr": vaddr, "pages": pages, "peer": env.peer, "prot": PROT_READ})
            if _code(r) == Errno.ESRCH:
                peer_live = False  # the peer's process is gone (its lease ran out while we were paused)
            if not _ok(r):
                continue
            args: dict[str, Any] = {"offer": r["offer"]}
            if rng.random() < 0.5:  # the peer chooses where, or lets the mm place it
                slot = (slot + 1) % 4096
                args["vaddr"] = peer_base + slot * 16 * PAGE
            r = yield Req("mm", "accept", args, as_peer=True)
            if _ok(r):
                peer_maps.append((r["vaddr"], r["pages"]))
        elif roll < 0.8 and peer_maps:
            peer_vaddr, pages = peer_maps.pop(rng.randrange(len(peer_maps)))
            r = yield Req("mm", "free", {"vaddr": peer_vaddr, "pages": pages}, as_peer=True)
            if _code(r) in (Errno.EIO, Errno.EAGAIN):
                peer_maps.append((peer_vaddr, pages))
        elif roll < 0.9 and peer_maps:
            r = yield Req("kernel", "ping", {}, as_peer=True)  # the peer renews its lease too
            if _code(r) == Errno.ESRCH:
                peer_live, peer_maps = False, []
        elif own:
            vaddr, pages = own.pop(rng.randrange(len(own)))
            r = yield Req("mm", "free", {"vaddr": vaddr, "pages": pages})
            if _code(r) in (Errno.EIO, Errno.EAGAIN):
                own.append((vaddr, pages))


WORKLOADS: dict[str, Callable[[random.Random, Env], Workload]] = {
    "steady": steady,
    "sparse": sparse,
    "kobjects": kobjects,
    "sharer": sharer,
}


def make(name: str, rng: random.Random, env: Env) -> Workload:
    try:
        fn = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None
    return fn(rng, env)


def env_from(identity: str, hello: dict[str, Any], address_map: dict[str, Any], peer: str = "",
             large: bool = True, limits: dict[str, int] | None = None) -> Env:
    """An Env from the kernel's ``hello`` and ``address_map`` replies."""
    sizes = hello.get("large_page_sizes") or []
    arch = hello.get("arch", "i686")
    table_span = (4 << 20) if arch == "i686" else (2 << 20)
    shared = tuple((e["first"], e["count"]) for e in address_map.get("entries", []) if e.get("shared"))
    return Env(identity=identity, peer=peer, large_frames=(min(sizes) // PAGE) if sizes else 0,
               table_span=table_span, user_top=int(hello.get("user_top", 0xC000_0000)), shared_runs=shared,
               large=large and bool(sizes), limits=dict(limits or {}))
