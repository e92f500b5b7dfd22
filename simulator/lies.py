"""Lies in the simulator: the catalogue's (``clients.catalogue``), told in-process and judged exactly.

The simulator tells the very lies ``mmsim client attack`` tells over CURVE:
one catalogue, read here. Each lie is built from a ``Scene`` made from the
world as it is at that step (so a lie is a lie *now*), sent through the real
envelope to the real ``handle`` (no network: what is judged is the answer,
not the transport), and judged twice:

- by the catalogue: ``Lie.judge`` (the exact errno the documented refusal
  precedence gives, the field or details where they matter, or the answer's
  check). A different answer is a violation: I9 if the lie was accepted, I10
  if it was refused for the wrong reason;
- by the state: a refused lie to the kernel leaves every piece of kernel state
  ``KernelCore.digest`` covers as it was (``checks.state``: I6); one to the
  mm finishes without a single effect (no kernel call, no journal write: I9).

Who tells it: a live client about itself or about another (``Teller.CLIENT``,
``Teller.ABOUT_OTHER``), the admitted stranger with no process
(``Teller.STRANGER``), or whoever holds the mm's key (``Teller.MM_KEY``, the
``lie_mm`` fault family). Lies about the transport itself (no CURVE, a wrong
server key, extra frames) and those whose verdict is "no reply" are the
sockets' business: the live attack tells them, the simulator does not.

A lie's exact answer depends on a state that is settled for what it names:
the teller (and the other client) have no request in flight and are known to
both the kernel and the mm with the same pid; their allocations named in the
scene are settled (no intent pending); the teller maps nothing where its
lies map (``PROBE_VA``) nor where the other client's named allocation is, and
its kernel quota has room for the page tables a map there needs (a full quota
is refused ENOMEM first: the documented precedence puts ``quota`` before the
frame rules); lies to the mm are told only while it is serving. Where the world offers no such teller, nothing is told that step.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from clients import catalogue as CAT
from mm_service import driver as D
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, USER
from protocol import PAGE_SIZE, PROT_READ, PROT_WRITE, wire
from simulator import checks

if TYPE_CHECKING:
    from simulator.world import World

LIE_ID_BASE = 1 << 60  # the lies' request ids: clear of every real request's
TOLD = (CAT.Via.CURVE, CAT.Via.ROUTING_ID)  # (in-process, a routing id is only a name: the identity is the key)
ROOM = 4  # kernel frames a target process must have left in its quota: a page table's path


def told(lie: CAT.Lie) -> bool:
    """Whether the simulator tells ``lie``: an ordinary request whose verdict is an answer (to the mm: a
    refusal, which must have no effect)."""
    if lie.via not in TOLD or lie.expect.describe() == "no reply":
        return False
    return lie.server == "kernel" or lie.expect.check is None


def probe_name(lie: CAT.Lie) -> str:
    """The lie's name as a probe: ``lie.<server>.<kind>.<label in lower case, words joined by _>``."""
    return f"lie.{lie.server}.{lie.kind}.{re.sub(r'[^a-z0-9]+', '_', lie.label.lower()).strip('_')}"


CLIENT_LIES = [x for x in CAT.LIES if told(x) and x.teller in (CAT.Teller.CLIENT, CAT.Teller.ABOUT_OTHER)]
STRANGER_LIES = [x for x in CAT.LIES if told(x) and x.teller is CAT.Teller.STRANGER]
MM_KEY_LIES = [x for x in CAT.LIES if told(x) and x.teller is CAT.Teller.MM_KEY]
TOLD_LIES = CLIENT_LIES + STRANGER_LIES + MM_KEY_LIES


# ---- the scene, from the world -------------------------------------------------------------------------

def _pick(rng: random.Random, mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[rng.randrange(idx.size)]) if idx.size else None


def _base(world: World) -> dict[str, Any]:
    """What every scene shares: the machine, the servers' keys, the stranger, frames of each state."""
    rng = world.lie_rng
    core = world.kernel.core
    hello, amap = world.boot_info
    kind, refs = core.frames.kind, core.frames.refs
    frame_of: dict[str, int] = {}
    for name, mask in (("user_free", (kind == USER) & (refs == 0)), ("user_mapped", (kind == USER) & (refs > 0)),
                       ("kernel_free", kind == KERNEL_FREE), ("kernel_used", kind == KERNEL_USED),
                       ("kernel_shared", kind == KERNEL_SHARED)):
        f = _pick(rng, mask)
        if f is not None:
            frame_of[name] = f
    sizes = hello.get("large_page_sizes") or []
    room = [pid for pid, p in core.procs.items() if p.kernel_limit - p.kernel_used >= ROOM]
    return dict(frames=int(hello["frames"]), user_top=int(hello["user_top"]),
                large_frames=min(sizes) // PAGE_SIZE if sizes else 0,
                regions=tuple((e["kind"], e["first"], e["count"]) for e in amap["entries"]),
                mm_key=world.mm.key, operator_key=world.operator, stranger=world.stranger, unknown=world.outsider,
                frame_of=frame_of, target_pid=room[rng.randrange(len(room))] if room else None)


def _settled(world: World, mm_serving: bool) -> dict[str, int]:
    """Identities whose state a lie may name: of a live client with no request in flight, with a process the
    kernel and (while it serves) the mm agree on. -> identity: pid."""
    by_key = world.kernel.core.by_key
    view = world.mm.core.view if mm_serving and world.mm.core is not None else None
    out: dict[str, int] = {}
    for c in world.clients.values():
        if not c.alive or c.waiting is not None:
            continue
        for identity in c.identities:
            pid = by_key.get(identity)
            if pid is None:
                continue
            proc = world.kernel.core.procs[pid]
            if not _hole(proc, CAT.PROBE_VA, 2) or proc.kernel_limit - proc.kernel_used < ROOM:
                continue  # (its lies map at PROBE_VA: nothing may be there, and its quota has room for the tables)
            if view is not None:
                mine = view.clients.get(identity)
                if mine is None or mine.pid != pid:
                    continue
            out[identity] = pid
    return out


def _hole(space: Any, vaddr: int, pages: int) -> bool:
    """Nothing mapped in ``space`` (a kernel process) at ``pages`` pages from ``vaddr``."""
    lo = vaddr // PAGE_SIZE
    return space.first_small(lo, lo + pages) is None and space.first_large_in(lo, lo + pages) is None


def _own(view: Any, key: str, rw: bool) -> int | None:
    """The vaddr of a settled one-page allocation of ``key``'s own, read-write or read-only."""
    c = view.clients.get(key) if view is not None else None
    if c is None:
        return None
    for m in c.maps.values():
        if m.pages == 1 and not m.large and not m.offer and not m.pending and m.prot & PROT_READ \
                and (m.prot == PROT_READ | PROT_WRITE if rw else not m.prot & PROT_WRITE):
            return m.vaddr
    return None


def _other(world: World, view: Any, key: str, pid: int, me: int) -> CAT.Other | None:
    """``key`` as another client names it: one of its own settled allocations (where the teller, process
    ``me``, maps nothing), a thread, an endpoint."""
    c = view.clients.get(key) if view is not None else None
    mine = world.kernel.core.procs[me]
    m = next((m for m in c.maps.values() if not m.offer and not m.pending and not m.large
              and _hole(mine, m.vaddr, m.pages)), None) if c else None
    if m is None:
        return None
    proc = world.kernel.core.procs[pid]
    return CAT.Other(key, pid, m.vaddr, m.pages, tuple((int(a), int(b)) for a, b in m.frames),
                     min(proc.threads, default=0), min(proc.endpoints, default=0))


def client_scene(world: World, mm_serving: bool) -> CAT.Scene | None:
    """A settled client's scene, about itself and another settled client (None: no settled client)."""
    rng = world.lie_rng
    settled = _settled(world, mm_serving)
    if not settled:
        return None
    keys = sorted(settled)
    me = keys[rng.randrange(len(keys))]
    view = world.mm.core.view if mm_serving and world.mm.core is not None else None
    others = [k for k in keys if k != me]
    other, offer = None, None
    if view is not None and others:
        mine = view.clients[me]
        open_to = {view.offers[o].peer: o for o in sorted(mine.offers_out)
                   if o in view.offers and not view.offers[o].taken and view.offers[o].peer in settled}
        k = sorted(open_to)[rng.randrange(len(open_to))] if open_to and rng.random() < 0.5 \
            else others[rng.randrange(len(others))]
        other = _other(world, view, k, settled[k], settled[me])
        offer = open_to.get(k) if other is not None else None
    proc = world.kernel.core.procs[settled[me]]
    return CAT.Scene(me=me, pid=settled[me], quota=proc.user_quota, own_rw=_own(view, me, True),
                     own_ro=_own(view, me, False), offer_to_other=offer, other=other, **_base(world))


def stranger_scene(world: World) -> CAT.Scene:
    core = world.mm.core
    return CAT.Scene(me=world.stranger, quota=core.quota if core is not None else 0, **_base(world))


def mm_key_scene(world: World) -> CAT.Scene:
    return CAT.Scene(me=world.mm.key, **_base(world))


# ---- telling a lie and judging the answer ------------------------------------------------------------------

def _choose(rng: random.Random, lies: list[CAT.Lie], scene: CAT.Scene, mm_serving: bool) -> CAT.Lie | None:
    fit = [x for x in lies if (x.server == "kernel" or mm_serving) and x.applicable(scene)]
    return fit[rng.randrange(len(fit))] if fit else None


def lie_client(world: World) -> None:
    """A settled client (or the admitted stranger) tells the kernel or the mm one lie of the catalogue."""
    rng = world.lie_rng
    mm_serving = world.mm.service is not None and world.mm.phase == "serving" and not world.mm.recovering
    scene = client_scene(world, mm_serving) if rng.random() < 0.85 else None
    lies = CLIENT_LIES
    if scene is None:
        scene, lies = stranger_scene(world), STRANGER_LIES
    lie = _choose(rng, lies, scene, mm_serving)
    if lie is not None:
        tell(world, lie, scene)


def lie_mm(world: World) -> None:
    """Whoever holds the mm's key tells the kernel one thing it must refuse even to its memory manager."""
    scene = mm_key_scene(world)
    lie = _choose(world.lie_rng, MM_KEY_LIES, scene, False)
    if lie is not None:
        tell(world, lie, scene)


def tell(world: World, lie: CAT.Lie, scene: CAT.Scene) -> None:
    data = lie.encode(scene, world.lie_id())
    if lie.server == "kernel":
        _to_kernel(world, lie, scene, data)
    else:
        _to_mm(world, lie, scene, data)


def _to_kernel(world: World, lie: CAT.Lie, scene: CAT.Scene, data: bytes) -> None:
    """Through the real envelope and ``handle``; judged, and a refusal changed nothing."""
    core = world.kernel.core
    before = checks.state(core)
    world.kernel.lying = True  # counted as lies, not as kernel calls
    try:
        reply = world.kernel.svc.handle(scene.me, data, world.clock.now / 1e6)
    finally:
        world.kernel.lying = False
    world.calls += 1
    world.trace.call(world.step, world.clock.now, scene.me, "kernel", data, reply, False)
    _judge(world, lie, scene, reply)
    if lie.expect.check is None and checks.state(core) != before:
        world.flag("I6", f"the lie {lie.name!r} from {world.trace.name(scene.me)} was refused but changed the "
                         "kernel's state")


def _to_mm(world: World, lie: CAT.Lie, scene: CAT.Scene, data: bytes) -> None:
    """Refused by the mm before it does anything: no kernel call, no journal write."""
    service = world.mm.service
    assert service is not None
    if len(data) > wire.MAX_CLIENT_REQUEST_BYTES:  # (the driver refuses it before the service sees it)
        reply = D.oversized(data)
        world.trace.call(world.step, world.clock.now, scene.me, "mm", data, reply, False)
        _judge(world, lie, scene, reply)
        return
    fresh = world.mm.fresh
    gen = service.handle(scene.me, data)
    try:
        effect = next(gen)
    except StopIteration as stop:
        reply = stop.value
    else:
        gen.close()
        world.mm.fresh = fresh
        world.flag("I9", f"the mm acted on the lie {lie.name!r} from {world.trace.name(scene.me)}: {effect!r}")
        return
    world.mm.fresh = fresh
    world.calls += 1
    world.trace.call(world.step, world.clock.now, scene.me, "mm", data, reply, False)
    _judge(world, lie, scene, reply)


def _judge(world: World, lie: CAT.Lie, scene: CAT.Scene, reply: bytes | None) -> None:
    """The answer the catalogue says, exactly."""
    try:
        decoded = wire.parse_reply(reply) if reply is not None else None
    except ValueError:
        world.flag("I10", f"the {lie.server} answered the lie {lie.name!r} with a malformed reply")
        return
    ok, got = lie.judge(decoded, scene)
    world.count(f"lie->{lie.server}", probe_name(lie), "as expected" if ok else got)
    if not ok:
        accepted = decoded is not None and decoded.get("ok") is True and lie.expect.check is None
        world.flag("I9" if accepted else "I10",
                   f"the {lie.server} answered the lie {lie.name!r} from {world.trace.name(scene.me)} with {got}; "
                   f"the catalogue says {lie.expect.describe()} ({lie.rule or 'its rule'})")
