"""Lying clients and a lying mm: forged requests that must be refused and change nothing (I6, I9, I10).

Each lie is built from the current state (so it is a lie *now*), sent through
the real envelope to the real ``handle`` at once (no network: what is checked
is the refusal, not the transport), and checked:

- the kernel: the reply is an error and ``checks.state`` (every piece of
  kernel state ``KernelCore.digest`` covers, compared as plain values) is
  what it was before;
- the mm: the reply is an error and the mm's request generator finished
  without a single effect (no kernel call, no journal write).

A client lies with its own identity (or as an outsider with no process);
the lying mm holds the mm's key, which may donate, reclaim and map, and
tries what the kernel must still refuse: donating in-use or kernel frames,
reclaiming allocated ones, mapping kernel frames writable.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np

from simulator import checks
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, USER
from protocol import wire

if TYPE_CHECKING:
    from simulator.world import World

LIE_ID_BASE = 1 << 60  # the lying mm's request ids: clear of the real mm's
_OVERSIZED: bytes | None = None
_HUGE_RUNS = [[i, 1] for i in range(wire.MAX_RUNS + 1)]  # one run more than a request may carry


def _oversized() -> bytes:
    global _OVERSIZED
    if _OVERSIZED is None:
        _OVERSIZED = wire.request(1, "ping", {"pad": "x" * (wire.MAX_REQUEST_BYTES + 16)})
    return _OVERSIZED


def _pick(rng: random.Random, frames: np.ndarray, default: int) -> int:
    return int(frames[rng.randrange(frames.size)]) if frames.size else default


class Frames:
    """Frames of each kind, as the kernel has them now."""

    def __init__(self, world: World, rng: random.Random) -> None:
        kind = world.kernel.core.frames.kind
        refs = world.kernel.core.frames.refs
        n = kind.size
        self.n = n
        self.kfree = _pick(rng, np.flatnonzero(kind == KERNEL_FREE), -1)
        self.kused = _pick(rng, np.flatnonzero(kind == KERNEL_USED), -1)
        self.shared = _pick(rng, np.flatnonzero(kind == KERNEL_SHARED), -1)
        self.user = _pick(rng, np.flatnonzero(kind == USER), -1)
        self.mapped = _pick(rng, np.flatnonzero((kind == USER) & (refs > 0)), -1)
        self.kernel = self.kused if self.kfree < 0 else self.kfree


def client_kernel_lie(world: World, rng: random.Random, own_pid: int | None) -> tuple[str, bytes]:
    core = world.kernel.core
    f = Frames(world, rng)
    others = [p for p in core.procs if p != own_pid]
    other = others[rng.randrange(len(others))] if others else 999_999
    vaddr = 0x7000_0000 + rng.randrange(256) * 4096
    lies: list[tuple[str, str, dict[str, Any]]] = [
        ("map_other_process", "map", {"pid": other, "vaddr": vaddr, "frames": [[max(f.user, 0), 1]], "prot": 1}),
        ("map_kernel_frame", "map", {"vaddr": vaddr, "frames": [[max(f.kernel, 0), 1]], "prot": 1}),
        ("map_shared_writable", "map", {"vaddr": vaddr, "frames": [[max(f.shared, 0), 1]], "prot": 3}),
        ("map_wx", "map", {"vaddr": vaddr, "frames": [[max(f.shared, 0), 1]], "prot": 6}),
        ("map_user_frame_itself", "map", {"vaddr": vaddr, "frames": [[max(f.user, 0), 1]], "prot": 3}),
        ("unmap_other_process", "unmap", {"pid": other, "vaddr": 0x40_0000, "pages": 1}),
        ("donate_unprivileged", "donate", {"frames": [[max(f.user, 0), 1]]}),
        ("reclaim_unprivileged", "reclaim", {"count": 4}),
        ("proc_create_unprivileged", "proc_create", {"key": "x" * 40}),
        ("proc_destroy_unprivileged", "proc_destroy", {"pid": other}),
        ("frame_info_unprivileged", "frame_info", {"frames": [[0, 16]]}),
        ("events_unprivileged", "events", {"since": 0}),
        ("thread_destroy_foreign", "thread_destroy", {"tid": _foreign(core, own_pid, "threads", rng)}),
        ("endpoint_destroy_foreign", "endpoint_destroy", {"eid": _foreign(core, own_pid, "endpoints", rng)}),
        ("wrong_type", "map", {"vaddr": str(vaddr), "frames": [[1, 1]], "prot": 1}),
        ("float_for_int", "unmap", {"vaddr": float(vaddr), "pages": 1}),
        ("unknown_field", "ping", {"please": True}),
        ("huge_run_list", "map", {"vaddr": vaddr, "frames": _HUGE_RUNS, "prot": 1}),
        ("beyond_memory", "map", {"vaddr": vaddr, "frames": [[f.n + 5, 3]], "prot": 1}),
        ("unknown_call", "format_disk", {}),
    ]
    name, call, args = lies[rng.randrange(len(lies))]
    return name, wire.request(world.lie_id(), call, args)


def _foreign(core: Any, own_pid: int | None, what: str, rng: random.Random) -> int:
    ids = [i for pid, p in core.procs.items() if pid != own_pid for i in getattr(p, what)]
    return ids[rng.randrange(len(ids))] if ids else 10**9


def garbage(world: World, rng: random.Random) -> tuple[str, bytes]:
    roll = rng.randrange(5)
    if roll == 0:
        return "garbage_bytes", bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    if roll == 1:
        return "bad_version", wire.encode({"v": 2, "id": world.lie_id(), "call": "ping", "args": {}})
    if roll == 2:
        return "args_not_a_map", wire.encode({"v": 1, "id": world.lie_id(), "call": "ping", "args": [1, 2]})
    if roll == 3:
        return "negative_id", wire.encode({"v": 1, "id": -5, "call": "ping", "args": {}})
    return "oversized", _oversized()


def client_mm_lie(world: World, rng: random.Random, identity: str) -> tuple[str, bytes]:
    core = world.mm.core
    assert core is not None
    own = core.view.clients.get(identity)
    taken = set(own.maps) if own else set()
    vaddrs = [v for c in core.view.clients.values() for v in c.maps if v not in taken]
    vaddr = vaddrs[rng.randrange(len(vaddrs))] if vaddrs else 0x40_0000
    while vaddr in taken:
        vaddr += 0x1000
    block = core.view.block
    quota = core.quota or 1
    lies: list[tuple[str, str, dict[str, Any]]] = [
        ("free_not_own", "free", {"vaddr": vaddr, "pages": 1}),
        ("share_not_own", "share", {"vaddr": vaddr, "pages": 1, "peer": "y" * 40, "peer_vaddr": 0x5000_0000}),
        ("alloc_string_pages", "alloc", {"pages": "1", "prot": 3}),
        ("alloc_unknown_field", "alloc", {"pages": 1, "prot": 3, "physical": 42}),
        ("alloc_too_many", "alloc", {"pages": core.config.max_alloc + 1, "prot": 3}),
        ("alloc_over_quota", "alloc", {"pages": min(quota + 1, core.config.max_alloc), "prot": 3}),
        ("alloc_misaligned", "alloc", {"pages": 1, "prot": 3, "vaddr": 0x40_0123}),
        ("alloc_beyond_user_space", "alloc", {"pages": 4, "prot": 3, "vaddr": core.user_top - 0x1000}),
        ("alloc_large_not_whole", "alloc", {"pages": block + 1 if block > 1 else 3, "prot": 3, "large": True}),
        ("share_bad_peer_key", "share", {"vaddr": vaddr, "pages": 1, "peer": "short", "peer_vaddr": 0}),
        ("audit_not_operator", "audit", {}),
        ("unknown_call", "steal", {}),
    ]
    name, call, args = lies[rng.randrange(len(lies))]
    if name == "alloc_large_not_whole" and block <= 1:
        name, call, args = lies[0]
    return name, wire.request(world.lie_id(), call, args)


def mm_kernel_lie(world: World, rng: random.Random) -> tuple[str, bytes]:
    core = world.kernel.core
    f = Frames(world, rng)
    pids = list(core.procs)
    pid = pids[rng.randrange(len(pids))] if pids else 999_999
    vaddr = 0x7800_0000 + rng.randrange(256) * 4096
    in_use = f.mapped if f.mapped >= 0 else f.shared
    lies: list[tuple[str, str, dict[str, Any]]] = [
        ("donate_in_use", "donate", {"frames": [[in_use, 1]]}),
        ("donate_in_use", "donate", {"frames": [[in_use, 1]]}),
        ("donate_kernel_frame", "donate", {"frames": [[max(f.kernel, f.shared), 1]]}),
        ("donate_twice_in_one_call", "donate", {"frames": [[max(f.user, 0), 1], [max(f.user, 0), 1]]}),
        ("donate_beyond_memory", "donate", {"frames": [[f.n, 2]]}),
        ("reclaim_allocated", "reclaim", {"frames": [[max(f.kused, f.shared), 1]]}),
        ("reclaim_user_frame", "reclaim", {"frames": [[max(f.user, 0), 1]]}),
        ("reclaim_shared", "reclaim", {"frames": [[max(f.shared, 0), 1]]}),
        ("map_kernel_writable", "map", {"pid": pid, "vaddr": vaddr, "frames": [[max(f.kernel, 0), 1]], "prot": 3}),
        ("map_kernel_writable", "map", {"pid": pid, "vaddr": vaddr, "frames": [[max(f.kused, 0), 1]], "prot": 3}),
        ("map_shared_writable", "map", {"pid": pid, "vaddr": vaddr, "frames": [[max(f.shared, 0), 1]], "prot": 3}),
        ("map_wx", "map", {"pid": pid, "vaddr": vaddr, "frames": [[max(f.user, 0), 1]], "prot": 7}),
        ("map_no_such_process", "map", {"pid": 10**6, "vaddr": vaddr, "frames": [[max(f.user, 0), 1]], "prot": 1}),
        ("proc_create_own_key", "proc_create", {"key": world.mm.key}),
        ("proc_destroy_no_such_process", "proc_destroy", {"pid": 10**6}),
    ]
    name, call, args = lies[rng.randrange(len(lies))]
    return name, wire.request(world.lie_id(), call, args)


# ---- sending a lie and judging the answer ----------------------------------------------------------

def lie_client(world: World) -> None:
    """A live client (or an outsider) sends one forged request to the kernel or the mm."""
    rng = world.lie_rng
    live = [c for c in world.clients.values() if c.alive]
    identity = live[rng.randrange(len(live))].identity if live and rng.random() < 0.85 else world.outsider
    to_mm = world.mm.service is not None and rng.random() < 0.4
    if rng.random() < 0.15:
        name, data = garbage(world, rng)
    elif to_mm:
        name, data = client_mm_lie(world, rng, identity)
    else:
        name, data = client_kernel_lie(world, rng, world.kernel.core.by_key.get(identity))
    if to_mm:
        lie_to_mm(world, identity, name, data)
    else:
        lie_to_kernel(world, identity, name, data)


def lie_to_kernel(world: World, identity: str, name: str, data: bytes) -> None:
    """Through the real envelope and ``handle``; refused, and the kernel's state unchanged."""
    core = world.kernel.core
    before = checks.state(core)
    world.kernel.lying = True  # counted as lies, not as kernel calls
    try:
        reply = world.kernel.svc.handle(identity, data, world.clock.now / 1e6)
    finally:
        world.kernel.lying = False
    world.calls += 1
    world.trace.call(world.step, world.clock.now, identity, "kernel", data, reply, False)
    judge(world, "kernel", identity, name, reply)
    if checks.state(core) != before:
        world.flag("I6", f"the forged request {name} from {world.trace.name(identity)} was answered but changed "
                        "the kernel's state")


def lie_to_mm(world: World, identity: str, name: str, data: bytes) -> None:
    """Refused by the mm before it does anything: no kernel call, no journal write."""
    service = world.mm.service
    assert service is not None
    fresh = world.mm.fresh
    gen = service.handle(identity, data)
    try:
        effect = next(gen)
    except StopIteration as stop:
        reply = stop.value
    else:
        gen.close()
        world.mm.fresh = fresh
        world.flag("I9", f"the mm acted on the forged request {name} from {world.trace.name(identity)}: {effect!r}")
        return
    world.mm.fresh = fresh
    world.calls += 1
    world.trace.call(world.step, world.clock.now, identity, "mm", data, reply, False)
    judge(world, "mm", identity, name, reply)


def judge(world: World, target: str, identity: str, name: str, reply: bytes) -> None:
    """The reply must be a well-formed refusal."""
    try:
        decoded = wire.parse_reply(reply)
    except ValueError:
        world.flag("I10", f"the {target} answered the forged request {name} with a malformed reply")
        return
    err = decoded.get("error") if isinstance(decoded.get("error"), dict) else {}
    outcome = "ok" if decoded.get("ok") is not False else str(err.get("code", "?"))
    world.count(f"lie->{target}", name, outcome)
    if decoded.get("ok") is not False:
        world.flag("I9", f"the {target} accepted the forged request {name} from {world.trace.name(identity)}")


def lie_mm(world: World) -> None:
    """A process holding the mm's key sends the kernel one thing it must refuse."""
    name, data = mm_kernel_lie(world, world.lie_rng)
    lie_to_kernel(world, world.mm.key, name, data)
