"""Helpers for the mm's sans-I/O tests (imported as ``mm_support``): an in-process kernel with an mm core (or
service) on it, driven with synchronous effect handlers, and the exact comparison of the mm's view with the
kernel (every frame, every mapping of every process)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kernel_server.core import CLIENT_MADE, ENTRY_SHIFT, PROT_MASK
from kernel_server.service import KernelService
from mm_service import records as J
from mm_service.policy import Config, KCall, MMCore, Persist, drive
from mm_service.service import MMService
from protocol import runs as R
from protocol import wire
from protocol.calls import MM_CALLS, validate
from protocol.errors import Error

MM = "M" * 40
OP = "O" * 40  # the operator
A = "A" * 40
B = "B" * 40
C = "C" * 40
D = "D" * 40


class World:
    """One kernel service, one mm core, a journal list, and a log of kernel calls."""

    def __init__(self, pool: int = 256, config: Config | None = None, memory: int = 64 << 20, arch: str = "i686",
                 admission: Callable[[str], Any] | None = None) -> None:
        self.kernel = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=pool,
                                         lease_seconds=1.0, operator_key=OP)
        self.journal: list[J.Record] = []
        self.kcalls: list[tuple[str, dict, Any]] = []
        self.config = config or Config(low=16, target=64, high=256)
        self.admission = admission
        self.mm = self.new_mm()
        self.run(self.mm.refresh())

    def new_mm(self) -> MMCore:
        cfg = Config(**vars(self.config))
        return MMCore(self.kernel.call(MM, "address_map"), self.kernel.call(MM, "hello"), cfg, self.admission)

    def kcall(self, call: str, args: dict) -> Any:
        result = self.kernel.call(MM, call, args)
        self.kcalls.append((call, args, result))
        return result

    def run(self, gen: Any) -> Any:
        return drive(gen, self.kcall, self.journal.extend)

    def req(self, key: str, call: str, **args: Any) -> Any:
        model = validate(MM_CALLS, call, args)
        assert not isinstance(model, Error), model
        result = self.run(self.mm.request(key, call, model))
        self.run(self.mm.maintain())
        return result

    def audit(self) -> dict:
        return self.run(self.mm.audit())

    def calls(self, since: int = 0) -> list[str]:
        return [c[0] for c in self.kcalls[since:]]

    def conservation(self) -> None:
        c = self.kernel.core.frames.counts()
        assert c["kernel_free"] + c["kernel_used"] + c["kernel_shared"] + c["user_free"] + c["user_mapped"] == c["ram"]
        v = self.mm.view.counts()
        assert v["kernel"] + v["free"] + v["used"] == v["ram"] == c["ram"]


class SWorld(World):
    """The world with the service in front of the core: requests and replies as wire bytes."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.svc = MMService(self.mm, MM, OP)
        self.rid = 1000

    def request(self, call: str, **args: Any) -> bytes:
        self.rid += 1
        return wire.request(self.rid, call, args)

    def handle(self, key: str, data: bytes) -> bytes:
        return self.run(handle_then_maintain(self.svc, key, data))

    def send(self, key: str, call: str, **args: Any) -> dict:
        return wire.parse_reply(self.handle(key, self.request(call, **args)))

    def restart(self) -> dict:
        """A new mm process: the journal replayed (view and replies), then settled with the kernel."""
        self.mm = self.new_mm()
        self.svc = MMService(self.mm, MM, OP)
        self.svc.restore(self.journal)
        return self.run(self.svc.recover())

    def kernel_work(self, since: int) -> list:
        """The map/unmap calls the kernel carried out since kcalls[since]."""
        return [c for c in self.kcalls[since:] if c[0] in ("map", "unmap") and isinstance(c[2], dict)]


def handle_then_maintain(svc: MMService, key: str, data: bytes) -> Any:
    reply = yield from svc.handle(key, data)
    yield from svc.maintain()  # as the driver does when it is due (a compaction may come here)
    return reply


def steps(w: World, gen: Any) -> Any:
    """Run ``gen`` effect by effect, yielding after each effect is handled."""
    value = None
    while True:
        try:
            effect = gen.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(effect, KCall):
            value = w.kcall(effect.call, effect.args)
        else:
            assert isinstance(effect, Persist)
            w.journal.extend(effect.ops)
            value = None
        yield effect


def crash_after(w: World, make_gen: Callable[[], Any], n: int) -> bool:
    """Run an operation but crash the mm after its n-th effect; True if it got that far."""
    for i, _ in enumerate(steps(w, make_gen())):
        if i + 1 == n:
            return True
    return False


def kernel_maps(kernel: KernelService, pid: int) -> dict[int, tuple[int, int]]:
    """What the mm mapped in process ``pid``: virtual page -> (frame, prot) (large pages page by page)."""
    core = kernel.core
    proc = core.procs[pid]
    vps, ents = proc.entries()
    mine = (ents & CLIENT_MADE) == 0
    out = {int(v): (int(e) >> ENTRY_SHIFT, int(e) & PROT_MASK) for v, e in zip(vps[mine], ents[mine])}
    for base, (lv, frame, prot) in proc.large.items():
        for i in range(core.profile.pages_at(lv)):
            out[base + i] = (frame + i, prot)
    return out


def view_maps(mm: MMCore, key: str) -> dict[int, tuple[int, int]]:
    c = mm.view.clients[key]
    out: dict[int, tuple[int, int]] = {}
    for m in c.maps.values():
        for i, f in enumerate(R.to_array(m.frames).tolist()):
            vp = m.vaddr // 4096 + i
            assert vp not in out, f"two mappings of {key[:4]} at page {vp:#x}"
            out[vp] = (f, m.prot)
    return out


def exact(w: World) -> None:
    """The mm's view is the kernel's, exactly: every frame (owner, reference count), every process and
    every page each one maps (frame and protection), nothing pending, every charge its mappings."""
    mm, core = w.mm, w.kernel.core
    assert not mm.view.pending, mm.view.pending
    report = w.audit()
    assert report["divergences"] == 0, report
    assert not report["i13"]["problems"], report["i13"]["problems"]
    assert {k: c.pid for k, c in mm.view.clients.items()} == {p.key: p.pid for p in core.procs.values()}
    for key, c in mm.view.clients.items():
        assert view_maps(mm, key) == kernel_maps(w.kernel, c.pid), key[:4]
        assert c.charged == sum(m.pages for m in c.maps.values())
    assert np.array_equal(mm.view.refs[mm.view.state >= 2], core.frames.refs[mm.view.state >= 2])
