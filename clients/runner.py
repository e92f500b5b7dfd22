"""The workload client process (``mmsim client run``): a workload generator driven over the network.

The generator (``clients.workloads``) decides every request; this module only
does the I/O: it sends each ``Req`` with a ``Client`` (the peer identity
``NAME-peer`` for ``as_peer`` requests of the ``sharer``), sends the result
dict or the ``Error`` back into the generator, keeps the leases alive, and
counts what happened. It checks every answer for what a client can see is
wrong (``check_reply``: e.g. an alloc whose frames do not add up to its pages,
or EPROTO for a well-formed request); any such answer makes the exit status 1.

It survives what a healthy system does to it: the mm killed and restarted
(calls fail with EIO after the Lazy Pirate retries; it re-reads
``RUN/<server>.endpoint`` and reconnects if the server moved), SIGSTOP and
SIGCONT (the lease may run out; the workloads handle ESRCH/EINVAL), SIGTERM or
Ctrl-C (stops at once and prints its summary).

Exit status: 0 ran to the end (refusals a healthy system gives, like quota
ENOMEM or EIO during an mm restart, are not failures); 1 a server gave a
wrong or malformed answer; 2 bad options; 3 could not start (no kernel or mm
answered within ``--connect-wait``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Optional, TextIO

import typer

from clients.client import Client
from clients.workloads import PAGE, WORKLOADS, Req, env_from, make
from mmsim import options
from protocol import rundir
from protocol.connection import Connection
from protocol.errors import CallError, Errno, Error

EXIT_OK, EXIT_WRONG, EXIT_USAGE, EXIT_START = 0, 1, 2, 3
SAMPLE_EVERY = 0.25  # seconds between looks at the kernel's stats (peak usage in the summary)
WRONG_LIMIT = 20  # wrong answers kept verbatim in the summary

# Errors a server must never give to the well-formed requests a workload sends.
WRONG_FOR_WELL_FORMED = frozenset((Errno.EPROTO, Errno.ENOSYS, Errno.E2BIG))

RUN_HELP = ("Run a workload client process: a workload generator (steady, sparse, kobjects, sharer) driven "
            "against the kernel and the mm of a run directory. Exit 0 when it ran to the end, 1 on a wrong "
            "answer from a server, 2 on bad options, 3 when it could not start.")


# ---- what a client can see is wrong in an answer (pure) -----------------------------------------

@dataclass(frozen=True)
class Bounds:
    """What the client knows about the machine, to check answers against."""

    frames: int  # frames in the kernel's frame table
    user_top: int  # first virtual address beyond user space
    large_frames: int = 0  # frames in the smallest large page


class WrongAnswer(Exception):
    pass


def _int(result: dict[str, Any], key: str, call: str) -> int:
    v = result.get(key)
    if type(v) is not int:
        raise WrongAnswer(f"{call}: result field {key!r} is {v!r}, not an integer")
    return v


def _runs_total(runs: Any, bounds: Bounds, call: str, aligned: int = 0) -> int:
    if not isinstance(runs, list) or not runs:
        raise WrongAnswer(f"{call}: result field 'frames' is {runs!r}, not a list of runs")
    n = 0
    for r in runs:
        if (not isinstance(r, list) or len(r) != 2 or any(type(x) is not int for x in r) or r[0] < 0 or r[1] < 1
                or r[0] + r[1] > bounds.frames):
            raise WrongAnswer(f"{call}: bad frame run {r!r} (the machine has {bounds.frames} frames)")
        if aligned and (r[0] % aligned or r[1] % aligned):
            raise WrongAnswer(f"{call}: large-page run {r!r} is not aligned to {aligned} frames")
        n += r[1]
    return n


def check_reply(req: Req, result: Any, bounds: Bounds) -> str | None:
    """What is visibly wrong with a server's answer ``result`` to ``req``, or None."""
    call, a = req.call, req.args
    if isinstance(result, Error):
        if result.code in WRONG_FOR_WELL_FORMED:
            return f"{call}: {result.code.name} for a well-formed request: {result.message}"
        return None
    if not isinstance(result, dict):
        return f"{call}: the result is a {type(result).__name__}, not a map"
    try:
        if call == "alloc":
            pages = _int(result, "pages", call)
            vaddr = _int(result, "vaddr", call)
            large = bool(a.get("large")) and bounds.large_frames > 0
            n = _runs_total(result.get("frames"), bounds, call, bounds.large_frames if large else 0)
            if pages != a["pages"] or n != pages:
                return f"alloc: asked for {a['pages']} pages, got pages={pages} and {n} frames"
            align = PAGE * (bounds.large_frames if large else 1)
            if vaddr % align or vaddr < 0 or vaddr + pages * PAGE > bounds.user_top:
                return f"alloc: vaddr {vaddr:#x} is unaligned (to {align:#x}) or outside user space"
            if a.get("vaddr") is not None and vaddr != a["vaddr"]:
                return f"alloc: asked for vaddr {a['vaddr']:#x}, got {vaddr:#x}"
        elif call == "free":
            pages = _int(result, "pages", call)
            vaddr = _int(result, "vaddr", call)
            n = _runs_total(result.get("frames"), bounds, call)
            if pages != a["pages"] or n != pages or vaddr != a["vaddr"]:
                return (f"free: asked for {a['pages']} pages at {a['vaddr']:#x}, got {pages} pages "
                        f"({n} frames) at {vaddr:#x}")
        elif call == "share":
            if _int(result, "offer", call) < 1:
                return f"share: offer {result['offer']} is not a valid offer number"
            if result.get("peer") != a["peer"]:
                return f"share: asked to share with {a['peer']!r}, the answer names {result.get('peer')!r}"
            if _int(result, "pages", call) != a["pages"] or _int(result, "prot", call) != a.get("prot", 1):
                return f"share: asked to offer {a['pages']} pages, got {result['pages']} (prot {result['prot']})"
        elif call == "accept":
            pages = _int(result, "pages", call)
            vaddr = _int(result, "vaddr", call)
            n = _runs_total(result.get("frames"), bounds, call)
            if _int(result, "offer", call) != a["offer"] or n != pages:
                return f"accept: asked for offer {a['offer']}, got offer {result['offer']} with {pages} pages ({n} frames)"
            if vaddr % PAGE or vaddr + pages * PAGE > bounds.user_top or (a.get("vaddr") is not None
                                                                          and vaddr != a["vaddr"]):
                return f"accept: vaddr {vaddr:#x} is unaligned, outside user space or not where asked"
        elif call in ("thread_create", "endpoint_create"):
            key = "tid" if call == "thread_create" else "eid"
            if _int(result, key, call) < 1:
                return f"{call}: {key} {result[key]} is not a valid id"
        elif call in ("thread_destroy", "endpoint_destroy"):
            key = "tid" if call == "thread_destroy" else "eid"
            if _int(result, key, call) != a[key]:
                return f"{call}: destroyed {key} {result[key]}, asked for {a[key]}"
        elif call == "map":
            want = sum(c for _, c in a["frames"])
            if _int(result, "pages", call) != want:
                return f"map: mapped {result['pages']} pages, asked for {want}"
        elif call == "unmap":
            if _int(result, "pages", call) != a["pages"]:
                return f"unmap: unmapped {result['pages']} pages, asked for {a['pages']}"
        elif call == "ping":
            if "pid" not in result:
                return "ping: the answer has no 'pid'"
    except WrongAnswer as exc:
        return str(exc)
    return None


# ---- the process ------------------------------------------------------------------------------------

@dataclass
class RunOptions:
    run_dir: str
    name: str
    workload: str
    seed: int = 1
    duration: float = 10.0
    max_steps: int | None = None
    large: bool = True
    rate: float | None = None  # calls per second, None: as fast as the servers answer
    json: bool = False
    timeout: float = 2.0  # seconds to wait for one reply before the Lazy Pirate resend
    retries: int = 2
    progress: float = 2.0  # seconds between progress lines (0: none)
    connect_wait: float = 10.0
    kernel: str | None = None  # explicit endpoints (containers): never re-read from the run directory
    mm: str | None = None


class StartFailed(Exception):
    pass


class Interrupted(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave a blocking call at once."""


class Runner:
    def __init__(self, opts: RunOptions, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.client: Client | None = None
        self.peer: Client | None = None
        self.bounds = Bounds(0, 0)
        self.stop_reason: str | None = None
        self.blocking = False  # a signal may interrupt what runs now
        self.calls: dict[str, Counter] = defaultdict(Counter)
        self.errors: Counter = Counter()
        self.wrong: list[str] = []
        self.wrong_count = 0
        self.steps = 0
        self.reconnects: Counter = Counter()
        self.peak: dict[str, dict[str, int]] = {"self": {}, "peer": {}}
        self.keepalive_interval = 1.0
        self.identity = ""
        self.arch = ""

    # ---- signals ----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_reason = signal.Signals(signum).name
        if self.blocking:
            raise Interrupted()

    def _install_signals(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.stop_reason is None:
            self.blocking = True
            try:
                time.sleep(seconds)
            finally:
                self.blocking = False

    # ---- set-up ----------------------------------------------------------------------

    def _new_client(self, name: str, kernel_ep: str, mm_ep: str) -> Client:
        return Client.from_run_dir(self.opts.run_dir, name, kernel_endpoint=kernel_ep, mm_endpoint=mm_ep,
                                   timeout=self.opts.timeout, retries=self.opts.retries)

    def connect(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Clients for our identities; the kernel's hello and address map. StartFailed if nobody answers."""
        o = self.opts
        deadline = time.monotonic() + o.connect_wait
        why = ""
        while self.stop_reason is None:
            try:
                kernel_ep = o.kernel or rundir.read_endpoint(o.run_dir, "kernel")
                mm_ep = o.mm or rundir.read_endpoint(o.run_dir, "mm")
                if self.client is None:
                    self.client = self._new_client(o.name, kernel_ep, mm_ep)
                    if o.workload == "sharer":
                        self.peer = self._new_client(f"{o.name}-peer", kernel_ep, mm_ep)
                else:
                    self._follow("kernel")
                    self._follow("mm")
                self.blocking = True
                try:
                    hello = self.client.kernel.call("hello", timeout=min(1.0, o.timeout), retries=0)
                    amap = self.client.kernel.call("address_map")
                    self.client.mm.call("ping", timeout=min(1.0, o.timeout), retries=0)
                finally:
                    self.blocking = False
                return hello, amap
            except FileNotFoundError as exc:
                why = str(exc)
            except CallError as exc:
                if exc.code != Errno.EIO:
                    raise StartFailed(f"the server refused: {exc}") from None
                why = str(exc)
            if time.monotonic() > deadline:
                raise StartFailed(f"no answer within {o.connect_wait:g}s: {why}")
            self._sleep(0.1)
        raise Interrupted()

    # ---- I/O ---------------------------------------------------------------------------

    def _follow(self, target: str) -> bool:
        """After EIO: if the server published another endpoint, move every connection there."""
        if getattr(self.opts, target):
            return False  # given explicitly: the endpoint files may name another host's view
        try:
            endpoint = rundir.read_endpoint(self.opts.run_dir, target)
        except FileNotFoundError:
            return False  # it is (re)starting: keep the old endpoint, the Lazy Pirate retries it
        moved = False
        for c in (self.client, self.peer):
            if c is None:
                continue
            old: Connection = getattr(c, target)
            if old.endpoint == endpoint:
                continue
            new = Connection(endpoint, old.server_key, old.public, old.secret, old.timeout, old.retries, c.ctx)
            old.close()  # the socket only: the context is the client's
            setattr(c, target, new)
            moved = True
            if target == "kernel":
                c.kernel_endpoint = endpoint
                if c._keepalive is not None:
                    c.stop_keepalive()
                    c.start_keepalive(self.keepalive_interval)
        if moved:
            self.reconnects[target] += 1
            print(f"{self.opts.name}: the {target} moved to {endpoint}; reconnected", file=self.err, flush=True)
        return moved

    def send(self, req: Req) -> Any:
        """One request over the network: the result dict or the Error the generator expects."""
        client = self.peer if req.as_peer else self.client
        if client is None:
            return Error(Errno.EINVAL, "this runner has no peer identity")
        self.blocking = True
        try:
            return client.call(req.target, req.call, req.args)
        except CallError as exc:
            if exc.code == Errno.EIO:
                self._follow(req.target)
            return exc.error
        finally:
            self.blocking = False

    def sample(self) -> None:
        """Note the peak kernel usage of our processes (a look, not a workload call): each identity's own
        ``stats`` shows its process as ``you``."""
        assert self.client is not None
        for who, c in (("self", self.client), ("peer", self.peer)):
            if c is None:
                continue
            try:
                st = c.kernel.call("stats", timeout=min(0.5, self.opts.timeout), retries=0)
            except CallError:
                return
            p = st.get("you")
            if not isinstance(p, dict):
                continue
            peak = self.peak[who]
            for k in ("pages", "large_pages", "tables", "threads", "endpoints", "kernel_used"):
                if isinstance(p.get(k), int):
                    peak[k] = max(peak.get(k, 0), p[k])

    # ---- the loop ----------------------------------------------------------------------

    def record(self, req: Req, result: Any) -> None:
        self.steps += 1
        outcome = result.code.name if isinstance(result, Error) else "ok"
        self.calls[req.call][outcome] += 1
        if isinstance(result, Error):
            self.errors[result.code.name] += 1
        problem = check_reply(req, result, self.bounds)
        if problem is not None:
            self.wrong_count += 1
            if len(self.wrong) < WRONG_LIMIT:
                self.wrong.append(problem)
            print(f"{self.opts.name}: WRONG ANSWER: {problem}", file=self.err, flush=True)

    def progress_line(self, elapsed: float) -> str:
        ok = sum(c["ok"] for c in self.calls.values())
        errs = ", ".join(f"{k} {v}" for k, v in self.errors.most_common(4))
        return (f"{self.opts.name} [{self.opts.workload}] {elapsed:6.1f}s: {self.steps} calls "
                f"({self.steps / max(elapsed, 1e-9):.0f}/s), ok {ok}" + (f", errors: {errs}" if errs else ""))

    def main(self) -> int:
        o = self.opts
        self._install_signals()
        t0 = time.monotonic()
        code = EXIT_OK
        try:
            try:
                hello, amap = self.connect()
            except StartFailed as exc:
                print(f"{o.name}: could not start: {exc}", file=self.err, flush=True)
                return EXIT_START
            assert self.client is not None
            self.identity = self.client.identity
            self.arch = str(hello.get("arch", ""))
            env = env_from(self.identity, hello, amap, peer=self.peer.identity if self.peer else "",
                           large=o.large)
            self.bounds = Bounds(int(hello.get("frames", 0)), env.user_top, env.large_frames if env.large else 0)
            self.keepalive_interval = max(0.05, float(hello.get("lease_seconds", 5.0)) / 3)
            for c in (self.client, self.peer):
                if c is not None:
                    c.start_keepalive(self.keepalive_interval)
            gen = make(o.workload, random.Random(o.seed), env)
            start = time.monotonic()
            deadline = start + o.duration
            next_progress = start + o.progress if o.progress > 0 else float("inf")
            next_sample = start
            try:
                req = next(gen)
                while True:
                    now = time.monotonic()
                    if self.stop_reason is not None:
                        break
                    if now >= deadline:
                        self.stop_reason = "duration"
                        break
                    if o.max_steps is not None and self.steps >= o.max_steps:
                        self.stop_reason = "max-steps"
                        break
                    if now >= next_sample:
                        self.sample()
                        next_sample = now + SAMPLE_EVERY
                    if now >= next_progress:
                        print(self.progress_line(now - start), file=self.err, flush=True)
                        next_progress = now + o.progress
                    wait = start + self.steps / o.rate - time.monotonic() if o.rate else 0.0
                    if wait > 0:
                        self._sleep(min(wait, 0.25))
                        continue  # look at the clock and the stop flag again
                    result = self.send(req)
                    self.record(req, result)
                    req = gen.send(result)
            except StopIteration:
                self.stop_reason = "workload ended"
            except Interrupted:
                pass  # the signal's name is the stop reason
            self.sample()
        except Interrupted:
            print(f"{o.name}: stopped by {self.stop_reason} while starting", file=self.err, flush=True)
            return EXIT_OK
        finally:
            for c in (self.peer, self.client):
                if c is not None:
                    c.close()
        if self.wrong_count:
            code = EXIT_WRONG
        self.report(self.summary(time.monotonic() - t0, code))
        return code

    # ---- the summary -------------------------------------------------------------------

    def summary(self, elapsed: float, code: int) -> dict[str, Any]:
        resends = sum(getattr(c, t).resends for c in (self.client, self.peer) if c is not None for t in ("kernel", "mm"))
        return {
            "name": self.opts.name,
            "workload": self.opts.workload,
            "seed": self.opts.seed,
            "identity": self.identity,
            "peer": self.peer.identity if self.peer else None,
            "arch": self.arch,
            "elapsed": round(elapsed, 3),
            "steps": self.steps,
            "rate": round(self.steps / max(elapsed, 1e-9), 1),
            "stopped": self.stop_reason,
            "ok": sum(c["ok"] for c in self.calls.values()),
            "refused": sum(self.errors.values()),
            "calls": {name: dict(sorted(c.items())) for name, c in sorted(self.calls.items())},
            "errors": dict(self.errors.most_common()),
            "wrong": self.wrong_count,
            "wrong_answers": self.wrong,
            "reconnects": dict(self.reconnects),
            "resends": resends,
            "peak": self.peak["self"],
            "peer_peak": self.peak["peer"],
            "exit": code,
        }

    def report(self, s: dict[str, Any]) -> None:
        human = self.err if self.opts.json else self.out
        lines = [f"{s['name']} [{s['workload']} seed {s['seed']}]: {s['steps']} calls in {s['elapsed']:.1f}s "
                 f"({s['rate']:.0f}/s), stopped by {s['stopped']}; ok {s['ok']}, refused {s['refused']}, "
                 f"wrong answers {s['wrong']}"]
        for name, outcomes in s["calls"].items():
            lines.append(f"  {name:<17} " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
        if s["reconnects"] or s["resends"]:
            lines.append(f"  reconnects {s['reconnects']}, resent requests {s['resends']}")
        if s["peak"]:
            lines.append(f"  peak kernel usage: {s['peak']}" + (f"; peer {s['peer_peak']}" if s["peer"] else ""))
        for w in s["wrong_answers"]:
            lines.append(f"  WRONG: {w}")
        print("\n".join(lines), file=human, flush=True)
        if self.opts.json:
            print(json.dumps(s, separators=(",", ":")), file=self.out, flush=True)


def run(opts: RunOptions) -> int:
    return Runner(opts).main()


# ---- the command -------------------------------------------------------------------------------

def run_cmd(
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory of a running system (keys/, kernel.endpoint, "
                                "mm.endpoint)."),
    name: Optional[str] = typer.Option(None, "--name", help="Key pair name of this client in RUN/keys (made if "
                                       "missing; default: client-HOSTNAME, distinct per container); the sharer's "
                                       "peer identity is NAME-peer."),
    workload: str = typer.Option(..., "--workload", help=f"One of: {', '.join(WORKLOADS)}."),
    seed: int = typer.Option(1, "--seed", help="Seed of the workload's random choices."),
    duration: float = typer.Option(10.0, "--duration", min=0.0, help="Seconds to run."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many calls."),
    no_large: bool = typer.Option(False, "--no-large", help="Never ask for large pages."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Calls per second at most (default: unlimited)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON line on stdout at the end "
                                  "(progress and the readable summary go to stderr)."),
    timeout: float = typer.Option(2.0, "--timeout", min=0.01, help="Seconds to wait for a reply before resending."),
    retries: int = typer.Option(2, "--retries", min=0, help="Resends of a request before it fails with EIO."),
    progress: float = typer.Option(2.0, "--progress", min=0.0, help="Seconds between progress lines (0: none)."),
    connect_wait: float = typer.Option(10.0, "--connect-wait", min=0.0, help="Seconds to wait for the kernel and "
                                       "the mm at start."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="Kernel endpoint, e.g. tcp://kernel:5555 "
                                         "(default: RUN/kernel.endpoint, followed if the kernel moves).",
                                         callback=options.endpoint_callback("--kernel")),
    mm: Optional[str] = typer.Option(None, "--mm", help="The mm's endpoint, e.g. tcp://mm:5556 "
                                     "(default: RUN/mm.endpoint, followed if the mm moves).",
                                     callback=options.endpoint_callback("--mm")),
) -> None:
    """Run a workload client against the kernel and the mm of a run directory."""
    if workload not in WORKLOADS:
        raise typer.BadParameter(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}",
                                 param_hint="--workload")
    if rate is not None and rate <= 0:
        raise typer.BadParameter("must be a positive number of calls per second", param_hint="--rate")
    if name is None:
        import re
        import socket

        name = "client-" + re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    for n in (name, f"{name}-peer"):
        if not rundir.NAME_RE.match(n):
            raise typer.BadParameter(f"{name!r}: letters, digits, '_', '.', '-' only, at most 59 characters",
                                     param_hint="--name")
    if not os.path.isfile(os.path.join(rundir.keys_dir(run_dir), "kernel.key")):
        raise typer.BadParameter(f"{run_dir} is not a run directory (no keys/kernel.key): start the system "
                                 "with `mmsim kernel`/`mmsim mm` or run `mmsim keys init` first",
                                 param_hint="--run-dir")
    opts = RunOptions(run_dir=run_dir, name=name, workload=workload, seed=seed, duration=duration,
                      max_steps=max_steps, large=not no_large, rate=rate, json=json_out, timeout=timeout,
                      retries=retries, progress=progress, connect_wait=connect_wait, kernel=kernel, mm=mm)
    raise typer.Exit(run(opts))
