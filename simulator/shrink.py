"""Shrinking a failing seed: record its stream of decisions, delta-debug it, write a replayable capsule.

A run's *decisions that matter* are (1) the operations each client asks for
(the workload generator's choices) and (2) the faults: each step fault the
plan applies (``faults.STEP_FAULTS``, with its variant: where an mm crash
strikes, which call the kernel is lost after, ...) and which per-message fault
families are on (``net_loss``, ``net_dup``, ``net_delay``, ``reply_loss``,
``reorder``). Everything else (latencies, think times, which message a
per-message fault hits, a lie's content) still comes from the seed.

- **Recording** (``record``): the world runs the seed with a ``Recorder`` as its
  script (``World(script=...)``: ``spawn`` asks it for each client's workload and
  hands it the new client, ``Recorder.started`` wraps the client's generator
  and logs each request with its answer). A request argument that names what
  an earlier answer gave (the ``vaddr`` an alloc or accept returned, the
  ``offer`` a share returned, a ``tid``/``eid``, the ``vaddr`` of an earlier
  kernel map) is kept as a reference to that operation, not as a number.
- **Replaying** (``Script``): each client's generator is replaced by one that
  yields the recorded operations, resolving references from the answers of
  this run; an operation whose reference cannot be resolved (its source was
  removed, or failed this time) is skipped; a client whose operations run out
  stays idle (alive, keeping its leases). The plan's step faults are the
  capsule's, the families switched off get rate 0 (timings stay the seed's).
  With nothing removed, the replay is the seed's run exactly.
- **Shrinking** (``shrink``): ``ddmin`` (Zeller's delta debugging) over the
  items (families, faults, operations), after removing whole clients' and
  families' items first, keeping a candidate only if it still fails with the
  same fingerprint (``swarm.fingerprint``); candidate runs stop a little after
  the step where the original failed. The capsule's ``steps`` is then cut to
  its violation's step (a violation before the faults stop is reached the same
  way with fewer steps).

A capsule is JSON (``mmsim sim --replay capsule.json`` runs it): the seed and
configuration, the fingerprint it fails with, its step faults, families off,
and per client its workload and operations, and the sizes before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

from clients.workloads import Req
from simulator.faults import make_plan
from simulator.swarm import Fingerprint, SwarmConfig, drive, fingerprint

CAPSULE = 1
NET_FAMILIES = {"net_loss": "loss", "net_dup": "dup", "net_delay": "delay", "reply_loss": "reply_loss",
                "reorder": "jitter"}  # family -> NetPlan field
# argument -> the calls whose answers (or, for "args", requests) produce it; consumers are the calls in REFS
PRODUCERS = {"vaddr": (("alloc", "result"), ("accept", "result"), ("map", "args")),
             "offer": (("share", "result"),), "tid": (("thread_create", "result"),),
             "eid": (("endpoint_create", "result"),)}
REFS = {"free": ("vaddr",), "share": ("vaddr",), "unmap": ("vaddr",), "accept": ("offer",),
        "thread_destroy": ("tid",), "endpoint_destroy": ("eid",)}


# ---- recording -----------------------------------------------------------------------------------------

class Recorder:
    """The world's script while recording: every client's workload and operations (with references)."""

    def __init__(self) -> None:
        self.clients: dict[int, dict[str, Any]] = {}

    def workload(self, idx: int, workload: str) -> str:
        self.clients[idx] = {"workload": workload, "ops": []}
        return workload

    def started(self, client: Any) -> None:
        client.gen = self._wrap(client.gen, self.clients[client.idx]["ops"])

    @staticmethod
    def _wrap(gen: Iterator[Req], ops: list[dict[str, Any]]) -> Iterator[Req]:
        answers: list[Any] = []
        req = next(gen)
        while True:
            ops.append(_op(len(ops), req, ops, answers))
            result = yield req
            answers.append(result)
            req = gen.send(result)


def _op(j: int, req: Req, ops: list[dict[str, Any]], answers: list[Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"j": j, "target": req.target, "call": req.call, "args": copy.deepcopy(req.args)}
    if req.as_peer:
        op["as_peer"] = True
    refs = {}
    for key in REFS.get(req.call, ()):
        value = req.args.get(key)
        for i in range(len(ops) - 1, -1, -1):
            prev, ans = ops[i], answers[i]
            if key == "vaddr" and prev.get("as_peer", False) != req.as_peer:
                continue
            if not isinstance(ans, dict):
                continue
            for call, where in PRODUCERS[key]:
                if prev["call"] == call and (ans if where == "result" else prev["args"]).get(key) == value:
                    refs[key] = [prev["j"], where]
                    break
            if key in refs:
                break
    if refs:
        op["refs"] = refs
    return op


# ---- replaying -----------------------------------------------------------------------------------------

class Script:
    """The world's script while replaying a capsule: each client's operations come from it."""

    def __init__(self, clients: dict[int, dict[str, Any]]) -> None:
        self.clients = clients

    def workload(self, idx: int, workload: str) -> str:
        c = self.clients.get(idx)
        return c["workload"] if c is not None else workload

    def started(self, client: Any) -> None:
        c = self.clients.get(client.idx)
        client.gen = scripted(c["ops"] if c is not None else [])


def scripted(ops: list[dict[str, Any]]) -> Iterator[Req]:
    got: dict[int, tuple[dict[str, Any], Any]] = {}
    for op in ops:
        args = copy.deepcopy(op["args"])
        ok = True
        for key, (src, where) in op.get("refs", {}).items():
            prev = got.get(src)
            value = None
            if prev is not None and isinstance(prev[1], dict):
                value = (prev[1] if where == "result" else prev[0]).get(key)
            if value is None:
                ok = False
                break
            args[key] = value
        if not ok:  # what it names was never made in this run: a filler instead
            args = {}
            op = filler(op)
        result = yield Req(op["target"], op["call"], args, op.get("as_peer", False))
        got[op["j"]] = (args, result)


# ---- capsules ------------------------------------------------------------------------------------------

def sizes(capsule: dict[str, Any]) -> dict[str, int]:
    """Operations (not counting fillers), fillers, step faults, per-message fault families on, clients with
    an operation."""
    real = [[op for op in c["ops"] if not op.get("filler")] for c in capsule["clients"].values()]
    return {"ops": sum(map(len, real)), "fillers": sum(len(c["ops"]) for c in capsule["clients"].values())
            - sum(map(len, real)), "faults": len(capsule["faults"]), "families": len(capsule["families_on"]),
            "clients": sum(1 for r in real if r)}


def plan_of(capsule: dict[str, Any]) -> Any:
    cfg = SwarmConfig.from_json(capsule["config"])
    plan = make_plan(capsule["seed"], capsule["steps"], cfg.arch, cfg.memory, cfg.zombies, cfg.mode)
    faults: dict[int, list[tuple[str, str]]] = {}
    for step, kind, variant in capsule["faults"]:
        faults.setdefault(step, []).append((kind, variant))
    plan.faults = faults
    off = {f: 0.0 for f in NET_FAMILIES if plan.families.get(f) and f not in capsule["families_on"]}
    if off:
        plan.net = dataclasses.replace(plan.net, **{NET_FAMILIES[f]: 0.0 for f in off})
        plan.families.update(off)
    return plan


def run_capsule(capsule: dict[str, Any], cap: int | None = None, trace: IO[str] | None = None) -> tuple[Any, Fingerprint | None]:
    """Run a capsule: the world after its run and the fingerprint of its violation (None: none)."""
    from simulator.world import World

    cfg = SwarmConfig.from_json(capsule["config"])
    kw = cfg.world_kw()
    kw.pop("arch")
    w = World(capsule["seed"], capsule["steps"], capsule["arch"], plan=plan_of(capsule),
              script=Script({int(k): v for k, v in capsule["clients"].items()}), trace=trace, **kw)
    site = drive(w, cap)
    return w, (fingerprint(w.violations[0], site) if site is not None else None)


def record(seed: int, config: SwarmConfig) -> tuple[dict[str, Any], Fingerprint | None, Any]:
    """Run ``seed`` recording its decisions: the full capsule, its fingerprint (None: it passed), the world."""
    from simulator.world import World

    rec = Recorder()
    w = World(seed, config.steps, script=rec, **config.world_kw())
    site = drive(w)
    fp = fingerprint(w.violations[0], site) if site is not None else None
    last = min(w.step, w.steps)
    faults = [[step, kind, variant] for step in sorted(w.plan.faults) if step <= last
              for kind, variant in w.plan.faults[step]]
    capsule = {
        "capsule": CAPSULE, "seed": seed, "steps": config.steps, "arch": w.plan.arch, "config": config.to_json(),
        "fingerprint": fp.to_json() if fp else None,
        "violation": ({"invariant": w.violations[0].invariant, "message": w.violations[0].message,
                       "step": w.violations[0].step} if w.violations else None),
        "families_on": [f for f in NET_FAMILIES if w.plan.families.get(f)],
        "faults": faults,
        "clients": {str(i): c for i, c in rec.clients.items()},
    }
    return capsule, fp, w


def _items(capsule: dict[str, Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [("family", f) for f in capsule["families_on"]]
    out += [("fault", i) for i in range(len(capsule["faults"]))]
    for i, c in capsule["clients"].items():
        out += [("op", i, op["j"]) for op in c["ops"]]
    return out


def filler(op: dict[str, Any]) -> dict[str, Any]:
    """What a removed operation becomes: a ping to the same server (it changes nothing, but takes the same
    turns, so the rest of the run keeps its timing)."""
    out = {"j": op["j"], "target": op["target"], "call": "ping", "args": {}, "filler": True}
    return out


def _with(capsule: dict[str, Any], items: list[tuple[Any, ...]], dropped: frozenset = frozenset()) -> dict[str, Any]:
    """The capsule with only ``items``: families and faults not in it are gone, operations not in it become
    fillers (``filler``), and those in ``dropped`` ((client, j)) are gone altogether."""
    keep = set(items)
    out = dict(capsule)
    out["families_on"] = [f for f in capsule["families_on"] if ("family", f) in keep]
    out["faults"] = [f for i, f in enumerate(capsule["faults"]) if ("fault", i) in keep]
    out["clients"] = {i: {"workload": c["workload"],
                          "ops": [op if ("op", i, op["j"]) in keep else filler(op) for op in c["ops"]
                                  if (i, op["j"]) not in dropped]}
                      for i, c in capsule["clients"].items()}
    return out


def ddmin(items: list[Any], fails: Callable[[list[Any]], bool], budget: Callable[[], bool]) -> list[Any]:
    """Zeller's ddmin: a subset of ``items`` that still ``fails`` and from which no single chunk at the final
    granularity can be removed (1-minimal when it gets to single items). Stops early when ``budget()`` is
    spent, returning the smallest failing subset found."""
    n = 2
    while len(items) >= 2 and not budget():
        size = len(items) // n
        chunks = [items[i * size:(i + 1) * size] if i < n - 1 else items[i * size:] for i in range(n)]
        for i, chunk in enumerate(chunks):  # a chunk alone?
            if budget():
                return items
            if len(chunk) < len(items) and fails(chunk):
                items, n = chunk, 2
                break
        else:
            for i in range(n):  # the rest without a chunk?
                if budget():
                    return items
                rest = [x for j, c in enumerate(chunks) if j != i for x in c]
                if fails(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return items


@dataclass
class Shrunk:
    capsule: dict[str, Any]
    fingerprint: Fingerprint
    before: dict[str, int]
    after: dict[str, int]
    runs: int = 0
    seconds: float = 0.0
    complete: bool = True  # False: the budget ran out before ddmin finished
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint.to_json(), "before": self.before, "after": self.after,
                "runs": self.runs, "seconds": round(self.seconds, 2), "complete": self.complete}


class NotFailing(Exception):
    pass


def shrink(seed: int, config: SwarmConfig, max_runs: int = 3000, max_seconds: float = 600.0,
           on_progress: Callable[[str], None] | None = None) -> Shrunk:
    """Shrink a failing seed of ``config`` to a minimal capsule failing with the same fingerprint."""
    t0 = time.perf_counter()
    full, fp, w = record(seed, config)
    if fp is None:
        raise NotFailing(f"seed {seed} does not fail with {config.sim_options()}")
    _, again = run_capsule(full)
    if again != fp:  # the script must reproduce the seed's run exactly
        raise RuntimeError(f"replaying seed {seed}'s recorded decisions ended with {again} instead of {fp}")
    vstep = w.violations[0].step
    cap = vstep + max(200, vstep // 2) if vstep <= config.steps else None
    runs = [1]
    out = Shrunk(full, fp, sizes(full), sizes(full))
    dropped: frozenset = frozenset()  # (client, j) of operations removed altogether (not even a filler)

    def fails(items: list[Any], drop: frozenset | None = None) -> bool:
        runs[0] += 1
        _, got = run_capsule(_with(full, items, dropped if drop is None else drop), cap)
        return got == fp

    def spent() -> bool:
        return runs[0] >= max_runs or time.perf_counter() - t0 >= max_seconds

    items = _items(full)
    say = on_progress or (lambda s: None)
    say(f"seed {seed}: {len(items)} items ({out.before}), failing with {fp.invariant} at step {vstep}")
    # 1. each client's operations cut short, altogether: the shortest prefix that still fails (what a client
    # asks after the defect was reached does not matter, and cutting it changes nothing before)
    for i, c in full["clients"].items():
        js = [op["j"] for op in c["ops"]]
        lo, hi = 0, len(js)  # hi: a length known to fail
        while lo < hi and not spent():
            mid = (lo + hi) // 2
            if fails(items, dropped | {(i, j) for j in js[mid:]}):
                hi = mid
            else:
                lo = mid + 1
        if hi < len(js):
            dropped = dropped | {(i, j) for j in js[hi:]}
            gone = {("op", i, j) for j in js[hi:]}
            items = [x for x in items if x not in gone]
            say(f"client c{i}: its first {hi} of {len(js)} operations suffice")
    # 2. whole groups: every net family, every step fault, each client's operations (made fillers)
    groups = [[x for x in items if x[0] == "family"], [x for x in items if x[0] == "fault"]]
    groups += [[x for x in items if x[0] == "op" and x[1] == i] for i in full["clients"]]
    for g in groups:
        if g and not spent():
            gone = set(g)
            rest = [x for x in items if x not in gone]
            if fails(rest):
                items = rest
                say(f"dropped a group of {len(g)}: {len(items)} items left")
    # 3. delta debugging over what is left (an operation removed becomes a filler)
    items = ddmin(items, fails, spent)
    # 4. the fillers themselves, a client at a time
    for i, c in full["clients"].items():
        kept = {x[2] for x in items if x[0] == "op" and x[1] == i}
        fill = {(i, op["j"]) for op in c["ops"] if op["j"] not in kept and (i, op["j"]) not in dropped}
        if fill and not spent() and fails(items, dropped | fill):
            dropped = dropped | fill
            say(f"client c{i}: its {len(fill)} filler(s) dropped")
    out.complete = not spent()
    small = _with(full, items, dropped)
    w2, got = run_capsule(small)
    if got != fp:  # (cannot happen: the cap only stops runs that did not fail in time)
        raise RuntimeError("the shrunk capsule does not fail the same way")
    v = w2.violations[0]
    if v.step <= small["steps"]:
        cut = dict(small, steps=v.step)
        _, got = run_capsule(cut)
        runs[0] += 1
        if got == fp:
            small = cut
    small["fingerprint"] = fp.to_json()
    small["violation"] = {"invariant": v.invariant, "message": v.message, "step": v.step}
    out.capsule = small
    out.after = sizes(small)
    out.runs = runs[0] + 1
    out.seconds = time.perf_counter() - t0
    small["shrink"] = {"before": out.before, "after": out.after, "runs": out.runs, "complete": out.complete,
                       "from": {"seed": seed, "steps": config.steps}}
    say(f"done: {out.before} -> {out.after} in {out.runs} runs, {out.seconds:.1f}s")
    return out


def save(capsule: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(capsule, f, indent=1)
        f.write("\n")


def load(path: str) -> dict[str, Any]:
    """A capsule from ``path``; ValueError (one line) if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read capsule {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("capsule") != CAPSULE:
        raise ValueError(f"{path} is not an mmsim capsule (version {CAPSULE})")
    for key in ("seed", "steps", "arch", "config", "faults", "families_on", "clients"):
        if key not in doc:
            raise ValueError(f"capsule {path} has no {key!r}")
    return doc
