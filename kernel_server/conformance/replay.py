"""Running the vectors against a kernel: the model's core in-process, or any kernel speaking the wire
protocol (this project's kernel process, or another implementation behind an adapter).

A ``Kernel`` answers ``call(role, name, args)`` with a result dict or an ``Error``:
``ServiceKernel`` is the core in-process (requests as bytes through ``KernelService.handle``),
``WireKernel`` one CURVE connection per role to an endpoint.

Two ways to give each test a fresh machine:

- ``fresh``: a new in-process kernel per test, booted from the test's boot map;
- ``shared``: one kernel per boot map, brought back to its boot state between tests by calls
  (``reset``: the mm destroys every process, reclaims the frames that were user-owned at boot and
  donates back those that were kernel-owned; the state digest must then be the test's
  ``initialDigest``), with object ids translated (``normal.Ids``: ids keep counting on a kernel
  that is not rebooted).

``run(tests, ...)`` returns one ``Outcome`` per test; ``table`` aggregates them per group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from kernel_server.bootmap import OWNER, BootMap, Region
from kernel_server.conformance import digest as D
from kernel_server.conformance.cases import KIND_CODE, _drop_frames, key_for, resolve_frames, role_for, symbolic
from kernel_server.conformance.normal import Ids, expected, resolve
from protocol import wire
from protocol.errors import CallError, Errno, Error

CLIENT_ROLES = 6  # client-0 .. client-5 are admitted for a replay (the vectors use client-0 .. client-3)
ROLES = ("mm", "operator", "stranger") + tuple(f"client-{i}" for i in range(CLIENT_ROLES))
RECLAIM_CHUNK = 1024  # runs per reset call


# ---- loading -----------------------------------------------------------------------------------------

@dataclass
class Test:
    file: str
    group: str
    profile: str
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def boot_key(self) -> str:
        bm = self.data["bootMap"]
        return json.dumps([bm["arch"], bm["regions"]])


def load(path: str) -> list[Test]:
    """Every test of a vectors directory (or of one vectors file)."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json") and f != "schema.json")
    if not files:
        raise FileNotFoundError(f"no vector files in {path}")
    out = []
    for f in files:
        with open(f) as fh:
            doc = json.load(fh)
        if not isinstance(doc, dict) or "testGroups" not in doc:
            raise ValueError(f"{f} is not a vectors file (no testGroups)")
        for g in doc["testGroups"]:
            for t in g["tests"]:
                out.append(Test(os.path.basename(f), g["group"], g["profile"], t))
    return out


def bootmap_of(test: Test) -> tuple[str, BootMap]:
    bm = test.data["bootMap"]
    return bm["arch"], BootMap(tuple(Region(k, f, c) for k, f, c in bm["regions"]))


# ---- kernels ---------------------------------------------------------------------------------------

class Kernel:
    """A kernel to replay against: calls by role, and the keys behind the roles."""

    def call(self, role: str, name: str, args: dict[str, Any]) -> dict[str, Any] | Error:
        raise NotImplementedError

    def key_of(self, role: str) -> str:
        raise NotImplementedError

    def role_of(self, key: str) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ServiceKernel(Kernel):
    """The model's kernel in-process: each request encoded and sent through ``KernelService.handle``."""

    def __init__(self, arch: str, bootmap: BootMap, core: type | None = None) -> None:
        from kernel_server.conformance.cases import boot

        self.svc = boot(arch, bootmap, core=core)
        self.req = 0

    def call(self, role: str, name: str, args: dict[str, Any]) -> dict[str, Any] | Error:
        self.req += 1
        reply = wire.parse_reply(self.svc.handle(self.key_of(role), wire.request(self.req, name, args), 0.0))
        return reply["result"] if reply["ok"] else Error.from_wire(reply["error"])

    def key_of(self, role: str) -> str:
        return key_for(role)

    def role_of(self, key: str) -> str:
        return role_for(key)


class WireKernel(Kernel):
    """A kernel at ``endpoint``, with the keys of a run directory: the kernel's public key, the mm's and
    the operator's pairs, and the client roles' pairs (made and admitted by ``admit_roles``)."""

    def __init__(self, endpoint: str, run_dir: str, timeout: float = 5.0) -> None:
        import zmq

        from protocol import rundir
        from protocol.connection import Connection

        self.ctx = zmq.Context()
        self.ctx.linger = 0
        server = rundir.public_key(run_dir, "kernel")
        self.conns: dict[str, Any] = {}
        self.keys: dict[str, str] = {}
        for role in ROLES:
            name = "stranger-role" if role == "stranger" else role
            pub, sec = rundir.load_keypair(run_dir, name)
            self.keys[role] = pub.decode()
            self.conns[role] = Connection(endpoint, server, pub, sec, timeout=timeout, retries=0, ctx=self.ctx)
        self.roles = {v: k for k, v in self.keys.items()}

    def call(self, role: str, name: str, args: dict[str, Any]) -> dict[str, Any] | Error:
        try:
            return self.conns[role].call(name, args)
        except CallError as e:
            return e.error

    def key_of(self, role: str) -> str:
        return self.keys[role]

    def role_of(self, key: str) -> str:
        return self.roles.get(key, "?")

    def wait_admitted(self, timeout: float = 10.0) -> None:
        """Until every role gets an answer (the kernel re-reads admitted keys every so often)."""
        deadline = time.monotonic() + timeout
        for role, conn in self.conns.items():
            while True:
                try:
                    conn.call("ping", {}, timeout=0.5, retries=0)
                    break
                except CallError as e:
                    if e.code != Errno.EIO or time.monotonic() > deadline:
                        raise RuntimeError(f"the kernel does not answer role {role}: {e.error.message}") from None

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.ctx.term()


def admit_roles(run_dir: str) -> None:
    """Key pairs for every client role and the stranger, admitted (the stranger: a client key that is
    never given a process)."""
    from protocol import rundir

    rundir.init(run_dir, clients=0)
    for role in ROLES:
        if role.startswith("client-") or role == "stranger":
            name = "stranger-role" if role == "stranger" else role
            rundir.generate(run_dir, name)
            rundir.admit(run_dir, name)


# ---- one test ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    test: Test
    passed: bool
    steps: int  # steps run
    failure: str = ""  # the first difference
    skipped: str = ""


def _read(k: Kernel) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    def read(name: str, args: dict[str, Any]) -> dict[str, Any]:
        out = k.call("operator", name, args)
        if isinstance(out, Error):
            raise RuntimeError(f"the operator's {name} was refused: {out.code.name} {out.message}")
        return out
    return read


class Session:
    """A kernel and what a replayer knows of it: its ids so far (shared mode), its user space top."""

    def __init__(self, kernel: Kernel, arch: str, bootmap: BootMap, shared: bool) -> None:
        self.k = kernel
        self.arch = arch
        self.bootmap = bootmap
        self.shared = shared
        self.last = {"pid": 0, "tid": 0, "eid": 0}
        self.ids = Ids()
        hello = kernel.call("operator", "hello", {})
        if isinstance(hello, Error):
            raise RuntimeError(f"the kernel refuses the operator's hello: {hello.message}")
        self.user_top = hello["user_top"]

    def kinds(self) -> np.ndarray:
        read = _read(self.k)
        n = read("stats", {})["frames"]
        snap_kinds = np.zeros(n, dtype=np.uint8)
        ask: list[list[int]] = [[0, n]]
        while ask:
            got = read("frame_info", {"frames": ask, "max_segments": D.READ_SEGMENTS})
            for first, count, kind, _r in got["segments"]:
                snap_kinds[first:first + count] = KIND_CODE[kind]
            ask = got["rest"]
        return snap_kinds

    def digest(self) -> str:
        s = D.from_reads(_read(self.k), self.k.role_of, self.user_top)
        base = self.ids.base["pid"]
        for p in s.procs:
            p["pid"] -= base
        return s.digest()

    def reset(self) -> str:
        """Back to the boot state by calls (shared mode); '' or what went wrong."""
        k = self.k
        read = _read(k)
        stats = read("stats", {"from_pid": 0, "limit": 1000})
        pids = [p["pid"] for p in stats["per_process"]]
        while stats.get("next_pid") is not None:
            stats = read("stats", {"from_pid": stats["next_pid"], "limit": 1000})
            pids.extend(p["pid"] for p in stats["per_process"])
        for pid in pids:
            self.last["pid"] = max(self.last["pid"], pid)
            out = k.call("mm", "proc_destroy", {"pid": pid})
            if isinstance(out, Error):
                return f"reset: proc_destroy {pid} refused: {out.code.name} {out.message}"
        kinds = self.kinds()
        boot = np.zeros(kinds.size, dtype=np.uint8)
        for r in self.bootmap.regions:
            boot[r.first:r.end] = KIND_CODE["user"] if OWNER[r.kind] == "user" else 1
        from protocol import runs as R

        back = np.flatnonzero((boot == KIND_CODE["user"]) & (kinds == KIND_CODE["kernel_free"]))
        give = np.flatnonzero((boot == 1) & (kinds == KIND_CODE["user"]))
        for call, frames in (("reclaim", back), ("donate", give)):
            runs = R.from_array(frames)
            for i in range(0, len(runs), RECLAIM_CHUNK):
                out = k.call("mm", call, {"frames": runs[i:i + RECLAIM_CHUNK]})
                if isinstance(out, Error):
                    return f"reset: {call} refused: {out.code.name} {out.message}"
        seq = read("stats", {})["event_seq"]
        self.ids = Ids({**self.last, "seq": seq})
        return ""

    def run(self, test: Test, fresh_kernel: Callable[[], Kernel] | None = None) -> Outcome:
        if fresh_kernel is not None:
            self.k = fresh_kernel()
            self.ids = Ids()
        elif self.shared:
            why = self.reset()
            if why:
                return Outcome(test, False, 0, why)
        got = self.digest()
        if got != test.data["initialDigest"]:
            return Outcome(test, False, 0, f"initial state: digest {got[:12]}, expected "
                           f"{test.data['initialDigest'][:12]} (a different boot map, or a reset that failed)")
        for i, step in enumerate(test.data["steps"]):
            args = resolve(step["args"], self.k.key_of)
            sym = symbolic(args)
            if sym:
                args = resolve_frames(args, self.kinds)
            if step["call"] == "events" and "since" not in args and not self.ids.identity:
                args = {**args, "since": 0}  # (the default, made explicit so that it is translated)
            args = self.ids.to_kernel(args)
            out = self.k.call(step["as"], step["call"], args)
            if not isinstance(out, Error):
                for kind in ("pid", "tid", "eid"):
                    if step["call"].endswith("_create") and isinstance(out.get(kind), int):
                        self.last[kind] = max(self.last[kind], out[kind])
            exp = self.ids.to_vector(expected(step["call"], args, out, self.k.role_of))
            if sym:
                _drop_frames(exp)
            if exp != step["expect"]:
                msg = out.message if isinstance(out, Error) else ""
                return Outcome(test, False, i + 1, f"step {i} {step['as']} {step['call']}: got {_short(exp)}"
                               f"{' (' + msg + ')' if msg else ''}, expected {_short(step['expect'])}")
            if step["digest"] is not None:
                got = self.digest()
                if got != step["digest"]:
                    return Outcome(test, False, i + 1, f"step {i} {step['as']} {step['call']}: state digest "
                                   f"{got[:12]}, expected {step['digest'][:12]}")
        return Outcome(test, True, len(test.data["steps"]))


def _short(v: Any, limit: int = 240) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= limit else s[:limit] + "..."


# ---- running many --------------------------------------------------------------------------------------

def by_boot_map(tests: Iterable[Test]) -> dict[str, list[Test]]:
    out: dict[str, list[Test]] = {}
    for t in tests:
        out.setdefault(t.boot_key, []).append(t)
    return out


def run_in_process(tests: list[Test], shared: bool = False, step: Callable[[str], None] = lambda s: None,
                   core: type | None = None) -> list[Outcome]:
    """Every test against the model's core (or ``core``, a ``KernelCore`` subclass): a fresh kernel per
    test, or (``shared``) one per boot map, reset by calls between tests."""
    out = []
    for key, group in by_boot_map(tests).items():
        arch, bm = bootmap_of(group[0])
        step(f"{arch}: {len(group)} test(s) on one boot map")
        if shared:
            s = Session(ServiceKernel(arch, bm, core), arch, bm, shared=True)
            out.extend(s.run(t) for t in group)
        else:
            s = Session(ServiceKernel(arch, bm, core), arch, bm, shared=False)
            out.extend(s.run(t, fresh_kernel=lambda: ServiceKernel(arch, bm, core)) for t in group)
    return out


def run_endpoint(tests: list[Test], endpoint: str, run_dir: str, step: Callable[[str], None] = lambda s: None,
                 timeout: float = 5.0) -> list[Outcome]:
    """The tests whose boot map is the one the kernel at ``endpoint`` booted from (the rest: skipped),
    on that kernel, reset by calls between tests."""
    admit_roles(run_dir)
    k = WireKernel(endpoint, run_dir, timeout)
    try:
        k.wait_admitted()
        amap = k.call("operator", "address_map", {})
        if isinstance(amap, Error):
            raise RuntimeError(f"address_map refused: {amap.message}")
        mine = json.dumps([amap["arch"], [[e["kind"], e["first"], e["count"]] for e in amap["entries"]]])
        out = []
        groups = by_boot_map(tests)
        for key, group in groups.items():
            if key != mine:
                out.extend(Outcome(t, False, 0, skipped="the kernel booted from another boot map") for t in group)
                continue
            arch, bm = bootmap_of(group[0])
            step(f"{arch}: {len(group)} test(s) on the kernel at {endpoint}")
            s = Session(k, arch, bm, shared=True)
            out.extend(s.run(t) for t in group)
        return out
    finally:
        k.close()


KERNEL_CMD = [sys.executable, "-m", "mmsim.cli", "kernel", "--boot-map", "{boot_map}", "--run-dir", "{run_dir}",
              "--bind", "{bind}", "--lease", "86400", "--log-level", "WARNING"]


def run_spawned(tests: list[Test], command: list[str] | None = None, step: Callable[[str], None] = lambda s: None,
                timeout: float = 5.0) -> list[Outcome]:
    """One kernel process per boot map (``command``, with {boot_map}, {run_dir} and {bind} filled in; this
    project's kernel by default), started in a temporary run directory, the tests of that boot map run
    on it with resets between them, then stopped."""
    command = command or KERNEL_CMD
    out: list[Outcome] = []
    for key, group in by_boot_map(tests).items():
        arch, bm = bootmap_of(group[0])
        step(f"{arch}: a kernel process for {len(group)} test(s)")
        with _kernel_process(command, group[0].data["bootMap"]) as (endpoint, run_dir):
            k = WireKernel(endpoint, run_dir, timeout)
            try:
                k.wait_admitted()
                s = Session(k, arch, bm, shared=True)
                out.extend(s.run(t) for t in group)
            finally:
                k.close()
    return out


class _kernel_process:
    def __init__(self, command: list[str], bootmap: dict[str, Any]) -> None:
        self.command = command
        self.bootmap = bootmap

    def __enter__(self) -> tuple[str, str]:
        from protocol import rundir

        self.run_dir = tempfile.mkdtemp(prefix="mmv-", dir="/tmp")
        admit_roles(self.run_dir)
        path = os.path.join(self.run_dir, "boot-map.json")
        with open(path, "w") as f:
            json.dump(self.bootmap, f)
        bind = rundir.default_bind(self.run_dir, "kernel")
        argv = [a.format(boot_map=path, run_dir=self.run_dir, bind=bind) for a in self.command]
        self.log = open(os.path.join(self.run_dir, "kernel.log"), "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                endpoint = rundir.read_endpoint(self.run_dir, "kernel")
                break
            except (FileNotFoundError, OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the kernel did not start: {' '.join(argv)}")
            time.sleep(0.02)
        return endpoint, self.run_dir

    def __exit__(self, *exc: Any) -> None:
        import shutil

        from protocol import rundir

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        rundir.remove_ipc_dir(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)


# ---- reporting ---------------------------------------------------------------------------------------

def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for o in outcomes:
        g = groups.setdefault((o.test.profile, o.test.group), {"profile": o.test.profile, "group": o.test.group,
                                                                "passed": 0, "failed": 0, "skipped": 0,
                                                                "failures": []})
        if o.skipped:
            g["skipped"] += 1
        elif o.passed:
            g["passed"] += 1
        else:
            g["failed"] += 1
            g["failures"].append({"id": o.test.id, "tcId": o.test.data["tcId"], "why": o.failure})
    rows = sorted(groups.values(), key=lambda g: (g["profile"], g["group"] == "walk", g["group"]))
    return {"passed": sum(g["passed"] for g in rows), "failed": sum(g["failed"] for g in rows),
            "skipped": sum(g["skipped"] for g in rows), "groups": rows}


def render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="kernel test vectors", title_justify="left")
    for col, just in (("profile", "left"), ("group", "left"), ("passed", "right"), ("failed", "right"),
                      ("skipped", "right"), ("verdict", "left")):
        t.add_column(col, justify=just)
    for g in report["groups"]:
        verdict = "[red]FAIL[/red]" if g["failed"] else ("[yellow]skipped[/yellow]" if not g["passed"] else
                                                          "[green]pass[/green]")
        t.add_row(g["profile"], g["group"], str(g["passed"]), str(g["failed"]), str(g["skipped"]), verdict)
    console.print(t)
    shown = 0
    for g in report["groups"]:
        for f in g["failures"]:
            if shown < 20:
                console.print(f"[red]FAIL[/red] {f['id']} (tcId {f['tcId']}): {f['why']}", markup=True,
                              highlight=False)
            shown += 1
    if shown > 20:
        console.print(f"... and {shown - 20} more failures (--json lists them all)")
    console.print(f"{report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped")


def iter_tests(tests: list[Test], groups: list[str] | None, profiles: list[str] | None) -> Iterator[Test]:
    for t in tests:
        if groups and t.group not in groups:
            continue
        if profiles and t.profile not in profiles:
            continue
        yield t


__all__ = ["KERNEL_CMD", "Outcome", "ServiceKernel", "Session", "Test", "WireKernel", "admit_roles", "iter_tests",
           "load", "render", "run_endpoint", "run_in_process", "run_spawned", "summary"]
