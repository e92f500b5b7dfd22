"""``mmsim check``: every sequence of kernel calls on a tiny machine, breadth-first, with every invariant
checked after every step.

The machine (``tiny_machine``): ``frames`` frames (one reserved, one kernel-shared boot-image frame,
a small kernel pool, the rest user frames) on the ``tiny`` profile, a two-level page-table tree
shaped like i686 but small (4 entries per table, 16 KiB large pages of 4 frames, 16 pages of user
space), so page tables come and go and a large page fits in 8 frames. The real profiles can be
checked too (their large pages do not fit; those calls are refused).

The alphabet (``alphabet``) is finite and names things symbolically, resolved against the state
when the action runs: "client-1's pid", "the caller's oldest thread". It covers every call: process
creation (two quotas, a server's key, a quota below the cost), destruction, donate and reclaim of
every frame, of a run, by count, map of representative frames (user, kernel-shared, kernel, not
RAM) at vaddr slots in one page table and in another, large pages (aligned, misaligned), a client's
own read-only map, unmaps (the mm's and the client's, a cut large page), threads, endpoints, every
read, and the privileged calls by a caller without a process.

The search is breadth-first from the boot state; a state already seen (hashed canonically:
the frame table, the free list in order, each role's process with its objects in creation order,
but not pid/tid/eid numbers or the event log, which only name things) is not expanded again, so
the first violation found is at the shortest depth, and its sequence of actions is printed
(``--replay`` runs it again step by step). After every step: ``invariants.check_kernel`` (I1-I4, I7,
I13, page-table accounting) on every new state; a refused call changed nothing (I6); donate and
reclaim allocated nothing (I5); a successful call sent again with the same request id is answered
from the replay cache and changes nothing (I12).

mm crash points: the kernel sees the mm only through its calls, each atomic. An mm that crashes
between two calls and restarts (a new connection, re-reading the kernel with frame_info, mappings,
stats, events) then makes any call: every sequence of the alphabet includes every such crash point,
at the level the kernel sees. A crash while a call is in flight is the call having run or not
(both are sequences); a reply lost and the request sent again is the I12 check above. The mm's own
journal and recovery are the simulator's business (``mmsim sim``), not this checker's.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE, Profile, get_profile
from kernel_server.bootmap import BootMap, Region
from kernel_server.conformance.cases import key_for, role_for
from kernel_server.invariants import check_kernel
from kernel_server.service import KernelService
from protocol import wire
from protocol.errors import Error

TINY = Profile(name="tiny", entry_shifts=(14, 12), table_entries=4, user_top=16 * PAGE_SIZE, max_phys=1 << 32,
               kernel_limit=None, root_is_slab=False, large_levels=(0,))
MUTATING = frozenset(("proc_create", "proc_destroy", "donate", "reclaim", "map", "unmap", "thread_create",
                      "thread_destroy", "endpoint_create", "endpoint_destroy"))


@dataclass(frozen=True)
class Machine:
    arch: str
    frames: int
    pool: int
    procs: int

    @property
    def profile(self) -> Profile:
        return TINY if self.arch == "tiny" else get_profile(self.arch)

    def bootmap(self) -> BootMap:
        if self.frames < self.pool + 4:
            raise ValueError(f"{self.frames} frames leave no user frame beside a reserved frame, a boot image "
                             f"frame and a pool of {self.pool}")
        return BootMap((Region("reserved", 0, 1), Region("kernel_image", 1, 1), *(
            [Region("kernel_pool", 2, self.pool)] if self.pool else []),
            Region("user", 2 + self.pool, self.frames - 2 - self.pool)))


def tiny_machine(frames: int = 8, procs: int = 2, pool: int = 2, arch: str = "tiny") -> Machine:
    return Machine(arch, frames, pool, procs)


@dataclass(frozen=True)
class Action:
    role: str
    call: str
    args: tuple[tuple[str, Any], ...]  # values may be symbolic: ("pid", ROLE), ("tid", ROLE), ("eid", ROLE)

    def resolve(self, core: Any) -> dict[str, Any]:
        out = {}
        for k, v in self.args:
            if isinstance(v, tuple) and v and v[0] in ("pid", "tid", "eid", "key"):
                kind, role = v
                if kind == "key":
                    v = key_for(role)
                else:
                    pid = core.by_key.get(key_for(role))
                    if kind == "pid":
                        v = pid if pid is not None else 999
                    else:
                        objs = core.procs[pid].threads if pid is not None and kind == "tid" else (
                            core.procs[pid].endpoints if pid is not None else {})
                        v = min(objs) if objs else 999
            out[k] = v
        return out

    def describe(self, core: Any | None = None) -> str:
        """``role: call(arg=value, ...)``; symbolic values as ``pid(client-0)`` unless resolved on ``core``."""
        args = self.resolve(core) if core is not None else dict(self.args)

        def show(k: str, v: Any) -> str:
            if isinstance(v, tuple):
                return v[1] if v[0] == "key" else f"{v[0]}({v[1]})"
            return role_for(v) if k == "key" and isinstance(v, str) else str(v)
        return f"{self.role}: {self.call}({', '.join(f'{k}={show(k, v)}' for k, v in args.items())})"


def _a(role: str, call: str, **args: Any) -> Action:
    return Action(role, call, tuple(sorted(args.items())))


def alphabet(m: Machine) -> list[Action]:
    """The actions of the search (see the module docstring)."""
    p = m.profile
    cost = 1 if p.root_is_slab else 2
    n = m.frames
    user = list(range(2 + m.pool, n))
    pool = list(range(2, 2 + m.pool))
    image = 1
    clients = [f"client-{i}" for i in range(m.procs)]
    table_pages = 1 << (p.entry_shifts[-2] - PAGE_SHIFT) if p.levels > 1 else 1  # pages one leaf table maps
    slots = [0, 1, table_pages]  # two pages in one leaf table, one in the next
    large = p.pages_at(max(p.large_levels))
    block = next((b for b in range(0, n, large) if b >= user[0] and b + large <= n), None)
    out: list[Action] = []
    for c in clients:
        out += [_a("mm", "proc_create", key=("key", c), kernel_quota=cost),
                _a("mm", "proc_create", key=("key", c), kernel_quota=cost + 2),
                _a("mm", "proc_destroy", pid=("pid", c))]
    out += [_a("mm", "proc_create", key=("key", "mm"), kernel_quota=cost),
            _a("mm", "proc_create", key=("key", clients[0]), kernel_quota=max(1, cost - 1)),
            _a("mm", "proc_destroy", pid=999)]
    for f in range(n + 1):
        out.append(_a("mm", "donate", frames=[[f, 1]]))
    out += [_a("mm", "donate", frames=[[user[0], 2]]), _a("stranger", "donate", frames=[[user[0], 1]])]
    for f in range(n):
        out.append(_a("mm", "reclaim", frames=[[f, 1]]))
    out += [_a("mm", "reclaim", count=1), _a("mm", "reclaim", count=n)]
    map_frames = [user[0], user[1] if len(user) > 1 else user[0], image, (pool or user)[0], 0]
    for c in clients:
        for s in slots:
            for f in map_frames:
                out.append(_a("mm", "map", pid=("pid", c), vaddr=s * PAGE_SIZE, frames=[[f, 1]], prot=1))
        out.append(_a("mm", "map", pid=("pid", c), vaddr=slots[0] * PAGE_SIZE, frames=[[user[0], 1]], prot=3))
        out.append(_a(c, "map", vaddr=2 * PAGE_SIZE, frames=[[image, 1]], prot=1))
        out.append(_a(c, "map", vaddr=2 * PAGE_SIZE, frames=[[user[0], 1]], prot=1))
        for s in slots:
            out.append(_a("mm", "unmap", pid=("pid", c), vaddr=s * PAGE_SIZE, pages=1))
        out += [_a(c, "unmap", vaddr=2 * PAGE_SIZE, pages=1), _a(c, "unmap", vaddr=0, pages=1)]
        if block is not None:
            for base in (0, 2 * large):
                if (base + large) * PAGE_SIZE <= p.user_top:
                    out.append(_a("mm", "map", pid=("pid", c), vaddr=base * PAGE_SIZE, frames=[[block, large]],
                                  prot=1, large=True))
                    out.append(_a("mm", "unmap", pid=("pid", c), vaddr=base * PAGE_SIZE, pages=large))
        out += [_a(c, "thread_create"), _a(c, "thread_destroy", tid=("tid", c)),
                _a(c, "endpoint_create"), _a(c, "endpoint_destroy", eid=("eid", c))]
    out += [_a("mm", "map", pid=("pid", clients[0]), vaddr=PAGE_SIZE, frames=[[user[0], 1]], prot=6),
            _a("mm", "map", pid=("pid", clients[0]), vaddr=PAGE_SIZE, frames=[[user[0] + 1, large]], prot=1,
               large=True)]
    out += [_a("stranger", "hello"), _a("operator", "address_map"), _a(clients[0], "ping"),
            _a(clients[0], "stats"), _a("operator", "stats", from_pid=0), _a("mm", "frame_info", frames=[[0, n]]),
            _a("mm", "mappings", pid=("pid", clients[0]), vaddr=0, pages=p.user_top >> PAGE_SHIFT),
            _a("mm", "events"), _a("stranger", "frame_info", frames=[[0, 1]]), _a("stranger", "thread_create")]
    return out


def state_key(core: Any) -> bytes:
    """A hash of everything that decides what the kernel does next, naming nothing by number: the frame
    table and the free list in order, the pool's reservation, and each role's process (its tables,
    mappings, objects in creation order, slab)."""
    ft = core.frames
    h = hashlib.blake2b(digest_size=16)
    h.update(ft.kind.tobytes())
    h.update(ft.refs.tobytes())
    h.update(repr((ft.free_list(), core.reserved, len(core.spare_leaves), sorted(core.large_index.items()))).encode())
    for key in sorted(core.by_key):
        proc = core.procs[core.by_key[key]]
        st = proc.state()  # (pid, key, ..., threads, endpoints, slab used, slab free, tree)
        h.update(repr((key, st[2:7], [f for _t, f in sorted(proc.threads.items())],
                       [o for _e, o in sorted(proc.endpoints.items())], st[9], st[10])).encode())
        tables, small, large, leaves = st[-1]
        h.update(repr((tables, small, large, [t for t, _ in leaves])).encode())
        for _t, raw in leaves:
            h.update(raw)
    return h.digest()


@dataclass
class Violation:
    depth: int
    path: list[int]
    steps: list[str]
    problems: list[str]


@dataclass
class Result:
    machine: Machine
    actions: int
    states: int = 0  # distinct states found (the boot state included)
    transitions: int = 0
    depth: int = 0  # depth fully explored
    partial: int = 0  # states expanded at the next depth when time ran out
    seconds: float = 0.0
    violation: Violation | None = None
    level_sizes: list[int] = field(default_factory=list)
    timed_out: bool = False

    def to_json(self) -> dict[str, Any]:
        m = self.machine
        out = {"arch": m.arch, "frames": m.frames, "pool": m.pool, "procs": m.procs, "actions": self.actions,
               "states": self.states, "transitions": self.transitions, "depth": self.depth,
               "partial_states_at_next_depth": self.partial, "seconds": round(self.seconds, 3),
               "states_per_second": round(self.states / self.seconds, 1) if self.seconds else None,
               "transitions_per_second": round(self.transitions / self.seconds, 1) if self.seconds else None,
               "level_sizes": self.level_sizes, "timed_out": self.timed_out, "violation": None}
        if self.violation is not None:
            v = self.violation
            out["violation"] = {"depth": v.depth, "path": v.path, "steps": v.steps, "problems": v.problems}
        return out


class Explorer:
    def __init__(self, machine: Machine, core: type | None = None) -> None:
        self.m = machine
        self.core_class = core
        self.actions = alphabet(machine)
        self.req = 0

    def boot(self) -> KernelService:
        from kernel_server.core import KernelCore

        cls = self.core_class or KernelCore
        return KernelService(cls(self.m.profile, self.m.bootmap(), key_for("mm"), key_for("operator")), 1e9)

    def apply(self, svc: KernelService, a: Action) -> tuple[Any, list[str]]:
        """Run action ``a``; its reply and what it broke of I5, I6, I12 (the state checks come after)."""
        core = svc.core
        args = a.resolve(core)
        before = core.digest()
        used = core.frames.kernel_used
        self.req += 1
        data = wire.request(self.req, a.call, args)
        raw = svc.handle(key_for(a.role), data, 0.0)
        reply = wire.parse_reply(raw)
        problems: list[str] = []
        if not reply["ok"]:
            if core.digest() != before:
                problems.append(f"I6: refused {a.call} ({reply['error']['code']}) changed the kernel state")
            return Error.from_wire(reply["error"]), problems
        if a.call in ("donate", "reclaim") and core.frames.kernel_used != used:
            problems.append(f"I5: {a.call} changed kernel_used ({used} -> {core.frames.kernel_used})")
        if a.call in MUTATING:
            after = core.digest()
            if svc.handle(key_for(a.role), data, 0.0) != raw or core.digest() != after:
                problems.append(f"I12: {a.call} sent again with the same request id ran again")
        return reply["result"], problems

    def replay(self, path: list[int]) -> tuple[KernelService, list[str]]:
        svc = self.boot()
        lines = []
        for i in path:
            a = self.actions[i]
            shown = a.describe(svc.core)
            out, problems = self.apply(svc, a)
            verdict = f"{out.code.name}: {out.message}" if isinstance(out, Error) else "ok"
            lines.append(f"{shown} -> {verdict}" + (f"  [{'; '.join(problems)}]" if problems else ""))
        return svc, lines

    def run(self, depth: int, seconds: float | None = None,
            progress: Callable[[int, int, int], None] = lambda d, s, t: None) -> Result:
        res = Result(self.m, len(self.actions))
        t0 = time.monotonic()
        root = self.boot()
        problems = check_kernel(root.core)
        seen = {state_key(root.core)}
        res.states = 1
        if problems:
            res.violation = Violation(0, [], [], problems)
            return self._done(res, t0)
        frontier: deque[tuple[int, ...]] = deque([()])
        res.level_sizes.append(1)
        for d in range(1, depth + 1):
            nxt: deque[tuple[int, ...]] = deque()
            expanded = 0
            while frontier:
                if seconds is not None and time.monotonic() - t0 > seconds:
                    res.timed_out = True
                    res.partial = expanded
                    return self._done(res, t0)
                path = frontier.popleft()
                parent, _ = self.replay(list(path)) if path else (self.boot(), [])
                blob = pickle.dumps(parent, pickle.HIGHEST_PROTOCOL)
                base = state_key(parent.core)
                svc = pickle.loads(blob)
                for i, a in enumerate(self.actions):
                    out, probs = self.apply(svc, a)
                    res.transitions += 1
                    key = state_key(svc.core)
                    if key != base or probs:
                        if key not in seen or probs:
                            seen.add(key)
                            res.states += 1
                            probs = probs + check_kernel(svc.core)
                            if probs:
                                p = list(path) + [i]
                                _, steps = self.replay(p)
                                res.violation = Violation(d, p, steps, probs)
                                res.depth = d - 1
                                return self._done(res, t0)
                            nxt.append(path + (i,))
                        svc = pickle.loads(blob)
                expanded += 1
            res.depth = d
            res.level_sizes.append(len(nxt))
            progress(d, res.states, res.transitions)
            if not nxt:
                break
            frontier = nxt
        return self._done(res, t0)

    @staticmethod
    def _done(res: Result, t0: float) -> Result:
        res.seconds = time.monotonic() - t0
        return res


def render(res: Result, explorer: Explorer, console: Any) -> None:
    m = res.machine
    console.print(f"machine: {m.arch}, {m.frames} frames ({m.pool} in the kernel pool), {m.procs} client "
                  f"process(es); {res.actions} actions", highlight=False)
    rate = res.states / res.seconds if res.seconds else 0.0
    console.print(f"explored: {res.states} states, {res.transitions} transitions, depth {res.depth} complete"
                  + (f" (+{res.partial} states expanded at depth {res.depth + 1} when time ran out)"
                     if res.timed_out else "") + f", {res.seconds:.1f} s ({rate:.0f} states/s)", highlight=False)
    console.print(f"states per depth: {res.level_sizes}", highlight=False)
    v = res.violation
    if v is None:
        console.print("[green]no violation[/green]")
        return
    console.print(f"[red]VIOLATION at depth {v.depth}[/red]: {v.problems[0]}", highlight=False)
    for extra in v.problems[1:4]:
        console.print(f"  also: {extra}", highlight=False)
    console.print("shortest sequence:")
    for i, line in enumerate(v.steps):
        console.print(f"  {i + 1}. {line}", highlight=False, markup=False)
    console.print(f"replay it: --replay {','.join(map(str, v.path))}", highlight=False)


__all__ = ["TINY", "Action", "Explorer", "Machine", "Result", "alphabet", "render", "state_key", "tiny_machine"]
