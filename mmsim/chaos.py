"""``mmsim chaos``: the system under workload, with faults injected at seeded random moments.

``make_plan(seed, ...)`` decides every fault before anything runs (so the plan
is printed first and the same seed gives the same plan): kill -9 a client
(revoke its key, start a replacement with a new, admitted key), kill -9 the
mm and restart it,
pause a client or the mm with SIGSTOP for a while then SIGCONT, run a lying
client (``mmsim client attack --kind K --json``, K from the catalogue of
lies and resource attacks, ``clients.catalogue``). Every kind appears at
least once. Faults run one after another at their planned times; each is
followed by an audit (I8; retried a few times, since a lease can run out
between the mm's event poll and its frame-table read while workloads run).

At the end the clients are stopped and the run is checked like ``mmsim up``
does (audit, conservation, leaks: ``launcher.final_checks``), and a table of
faults injected and errors seen is printed; the same, as data, goes to
``RUN/report.json`` (``--json`` prints it). Exit 1 on any violation. Ctrl-C
is an interruption, not a violation: everything started is stopped, the
report says how far the plan got, and the exit status is 130 (1 if a
violation was found before it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import typer

from mmsim import options
from mmsim.launcher import (
    DEFAULT_WORKLOADS,
    EXIT_INTERRUPTED,
    Check,
    check_system_options,
    checks_table,
    client_summary,
    ctrl_c_deferred,
    final_checks,
    fresh_run_dir,
)
from mmsim.options import Arch, Transport

CHAOS_HELP = ("Run the system under workload and inject faults at seeded random moments (kill -9 clients, kill -9 "
              "and restart the mm, SIGSTOP/SIGCONT, lying clients); then audit, check conservation and leaks, "
              "print a table of faults and errors and write it to RUN/report.json. Exit 0 no violation, 1 a "
              "violation, 130 interrupted (Ctrl-C stops everything it started and says how far it got).")
FAULTS = ("kill_client", "kill_mm", "pause_client", "pause_mm", "attack")
FAULT_TEXT = {
    "kill_client": "kill -9 a client, start a replacement",
    "kill_mm": "kill -9 the mm, restart it",
    "pause_client": "SIGSTOP a client, SIGCONT later",
    "pause_mm": "SIGSTOP the mm, SIGCONT later",
    "attack": "run a lying client",
}
ATTACK_SECONDS = 1.0  # how long a resource attack runs at full speed beside its honest client
AUDIT_TRIES = 3  # audits after a fault before a divergence counts (workloads keep running meanwhile)
ATTACK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the workloads started
    action: str  # one of FAULTS
    target: str  # a client slot (client-N), "mm", or an attack kind
    hold: float = 0.0  # seconds a pause lasts

    def describe(self) -> str:
        hold = f" for {self.hold:.2f}s" if self.action.startswith("pause") else ""
        return f"{self.at:7.2f}s  {self.action:<13} {self.target}{hold}"


def attack_kinds() -> list[str]:
    """The kinds of lying client chaos picks from: the catalogue's (``clients.catalogue.chaos_kinds``: every
    lie and check, and the resource attacks that are quick and leave the system as they found it)."""
    from clients.catalogue import chaos_kinds

    return chaos_kinds()


def attack_cast() -> list[str]:
    """The key pairs a lying client (``mmsim client attack``) talks with."""
    from clients.attacks import CAST

    return list(CAST.values())


def make_plan(seed: int, duration: float, clients: int, kinds: list[str], lease: float) -> list[Fault]:
    """The faults of a run, from the seed alone: every kind at least once (a client kind only if
    there are clients), then about one more every 1.5 seconds; pauses last up to twice the lease,
    so some outlast it."""
    rng = random.Random(seed)
    allowed = [f for f in FAULTS if (clients or "client" not in f) and (kinds or f != "attack")]
    if not allowed:
        return []
    extra = max(0, int(duration / 1.5) - len(allowed))
    actions = list(allowed) + [rng.choice(allowed) for _ in range(extra)]
    rng.shuffle(actions)
    lo, hi = min(0.5, duration / 4), max(min(0.5, duration / 4), duration - 1.0)
    times = sorted(round(rng.uniform(lo, hi), 2) for _ in actions)
    plan = []
    for at, action in zip(times, actions):
        hold = 0.0
        if action in ("kill_client", "pause_client"):
            target = f"client-{rng.randrange(clients)}"
        elif action == "attack":
            target = rng.choice(kinds)
        else:
            target = "mm"
        if action.startswith("pause"):
            hold = round(rng.uniform(0.2, 2.0 * lease), 2)
        plan.append(Fault(at, action, target, hold))
    return plan


@dataclass
class Outcome:
    fault: Fault
    started: float = 0.0  # when it actually ran (seconds after the start)
    done: bool = False
    note: str = ""
    audit: str = ""  # clean / clean on retry N / DIVERGED ... / failed: ...
    violation: str = ""


@dataclass
class Run:
    system: Any
    workloads: dict[str, str]  # slot -> workload
    seed: int
    duration: float
    current: dict[str, str] = field(default_factory=dict)  # slot -> the name of its live incarnation
    killed: set[str] = field(default_factory=set)  # parts we killed on purpose
    attacks: list[tuple[str, str]] = field(default_factory=list)  # (part name, kind)
    incarnation: Counter = field(default_factory=Counter)

    def start_client(self, slot: str, t0: float) -> str:
        k = self.incarnation[slot]
        self.incarnation[slot] += 1
        name = slot if k == 0 else f"{slot}.r{k}"
        left = self.duration - (time.monotonic() - t0)
        self.system.start_client(name, self.workloads[slot], seed=self.seed * 1000 + int(slot.split("-")[1]) * 10 + k,
                                 duration=max(1.0, left) + 60.0, extra=["--json", "--progress", "0"])
        self.current[slot] = name
        return name


def _audit(system: Any) -> tuple[str, str]:
    """(audit text, violation or ""): up to AUDIT_TRIES audits 0.3 s apart; clean if one is."""
    from protocol.errors import CallError

    first = None
    for attempt in range(AUDIT_TRIES):
        try:
            rep = system.audit(timeout=15.0)
        except CallError as exc:
            return f"failed: {exc}", f"audit failed: {exc}"
        if rep["divergences"] == 0:
            if attempt == 0:
                return "clean", ""
            return f"clean on try {attempt + 1} (first: {first})", ""
        if first is None:
            first = f"{rep['divergences']} divergent: {rep.get('class_counts')}"
        time.sleep(0.3)
    return f"DIVERGED: {first}", f"audit diverged after {AUDIT_TRIES} tries: {first}"


def inject(run: Run, f: Fault, t0: float) -> Outcome:
    system = run.system
    out = Outcome(f, started=time.monotonic() - t0)
    if f.action == "kill_client":
        victim = run.current[f.target]
        system.kill(victim, signal.SIGKILL)
        run.killed.add(victim)
        system.retire(victim)  # its key is not needed again: revoked; the replacement has a new one
        new = run.start_client(f.target, t0)
        out.note = f"killed {victim} (key revoked), started {new} (new key, admitted)"
    elif f.action == "kill_mm":
        from mmsim.system import StartError

        system.kill("mm", signal.SIGKILL)
        run.killed.add("mm")
        began = time.monotonic()
        try:
            system.start_mm()
        except StartError as exc:
            out.violation = f"the mm did not come back: {exc}"
            out.note = "restart FAILED"
            return out
        out.note = f"restarted in {time.monotonic() - began:.2f}s"
    elif f.action in ("pause_client", "pause_mm"):
        name = "mm" if f.action == "pause_mm" else run.current[f.target]
        system.send_signal(name, signal.SIGSTOP)
        time.sleep(f.hold)
        system.send_signal(name, signal.SIGCONT)
        out.note = f"paused {name} {f.hold:.2f}s"
    elif f.action == "attack":
        for key in attack_cast():  # a lying client is an admitted client that lies: let it in first
            system.admit(key)
        name = f"attack-{len(run.attacks)}"
        part = system.spawn(name, "attack", ["client", "attack", "--run-dir", system.run_dir, "--kind", f.target,
                                             "--json", "--seconds", str(ATTACK_SECONDS)])
        run.attacks.append((name, f.target))
        try:
            code = part.proc.wait(ATTACK_TIMEOUT)
        except subprocess.TimeoutExpired:
            system.kill(name, signal.SIGKILL)
            code = part.proc.returncode
        summ = client_summary(part.log_path) or {}
        out.note = f"{name} exit {code}" + (f": {_attack_text(summ)}" if summ else "")
        if code != 0:
            out.violation = f"attack {f.target} exited {code} (a lie was accepted or a server stopped answering)"
    out.done = True
    for p in ("kernel", "mm"):
        if not system.parts[p].alive():
            out.violation = out.violation or f"the {p} died (status {system.parts[p].proc.returncode})"
            return out
    out.audit, bad = _audit(system)
    out.violation = out.violation or bad
    return out


def _attack_text(summ: dict[str, Any]) -> str:
    """An attack's JSON summary in a few words: each lie, refused or not, and what the servers said."""
    parts = [f"{a.get('kind')} {'refused' if a.get('passed') else 'ACCEPTED'} ({a.get('got')})"
             for a in summ.get("attacks", [])]
    return "; ".join(parts) or ", ".join(f"{k} {v}" for k, v in summ.items() if isinstance(v, (int, str)))


def chaos(
    duration: float = typer.Option(20.0, "--duration", min=1.0, max=86400.0, help="Seconds of workload with faults."),
    seed: int = typer.Option(1, "--seed", min=0, max=2**31, help="Seed of the fault plan and the workloads (same "
                             "seed, same plan)."),
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help="Run directory: new, empty, or a "
                                "previous stopped run (replaced; a running one is refused). status, audit and ping "
                                "look there by default.", callback=options.dir_callback()),
    arch: Arch = typer.Option(Arch.i686, "--arch", help="Architecture profile."),
    memory: str = typer.Option("256MiB", "--memory", metavar="SIZE", help="RAM size, e.g. 256MiB, 4GiB, 1G "
                               "(= 10^9 bytes; rounded down to whole pages).",
                               callback=options.size_callback("--memory", memory=True)),
    clients: int = typer.Option(4, "--clients", min=0, max=64, help="Workload client processes."),
    lease: float = typer.Option(1.0, "--lease", min=0.2, max=3600.0, help="Client lease in seconds (pauses last "
                                "up to twice this, so some outlast it)."),
    transport: Transport = typer.Option(Transport.ipc, "--transport", help="ipc (sockets under /tmp) or tcp "
                                        "(127.0.0.1)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the fault plan and exit without running it "
                                   "(nothing is started, the run directory is not touched)."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object on stdout (what "
                                  "RUN/report.json holds); the plan and progress go to stderr."),
) -> None:
    """Inject faults into a running system and check its invariants."""
    check_system_options(arch, memory)
    kinds = attack_kinds()
    plan = make_plan(seed, duration, clients, kinds, lease)

    def say(text: str) -> None:
        typer.echo(text, err=json_out)

    say(f"chaos plan (seed {seed}, {duration:g}s, {clients} client(s), lease {lease:g}s): {len(plan)} faults")
    for f in plan:
        say("  " + f.describe())
    if plan_only:
        if json_out:
            typer.echo(json.dumps({"command": "chaos", "plan": [asdict(f) for f in plan]}))
        raise typer.Exit(0)
    run_dir, replaced = fresh_run_dir(run_dir)
    from rich.console import Console

    from mmsim.system import StartError, System
    from mmsim.view import Recording
    from protocol import rundir
    from protocol.errors import CallError

    console = Console(stderr=json_out)
    if not console.is_terminal:
        console = Console(width=130, stderr=json_out)
    system = System(run_dir, arch=options.value(arch), memory=memory, lease=lease, transport=options.value(transport),
                    clients=clients)
    say(f"run directory {system.run_dir}" + (" (the previous run there was replaced)" if replaced else "")
        + f"; logs in {rundir.logs_dir(system.run_dir)}")
    violations: list[str] = []
    recording = None  # the HTML view of the run (RUN/view.html), recorded while it runs
    page = None
    outcomes: list[Outcome] = []
    checks: list[Check] = []
    client_rows: list = []
    servers: dict[str, dict] = {}
    interrupted = ""
    began = time.monotonic()
    t0 = None
    run = Run(system, {f"client-{i}": DEFAULT_WORKLOADS[i % len(DEFAULT_WORKLOADS)] for i in range(clients)},
              seed, duration)
    try:
        try:
            system.start()
            boot = system.kernel_stats()
            t0 = time.monotonic()
            for slot in run.workloads:
                run.start_client(slot, t0)
        except StartError as exc:
            typer.echo(f"chaos: {exc}", err=True)
            violations.append(f"the system did not start: {str(exc).splitlines()[0]}")
            raise _Stop() from None
        except KeyboardInterrupt:
            interrupted = "while starting the system, before any fault"
            raise _Stop() from None
        recording = Recording(system.run_dir, labels=run.workloads).start()  # the HTML view: RUN/view.html
        try:
            for f in plan:
                wait = t0 + f.at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                out = inject(run, f, t0)
                outcomes.append(out)
                recording.note(f"{f.action} {f.target}: {out.note}; {out.violation or 'audit ' + out.audit}",
                               violation=bool(out.violation))
                say(f"[{out.started:6.2f}s] {f.action:<13} {f.target}: {out.note}; audit {out.audit or '-'}"
                    + (f"; VIOLATION: {out.violation}" if out.violation else ""))
                if out.violation:
                    violations.append(f"{f.action} {f.target}: {out.violation}")
                if not system.parts["kernel"].alive():
                    break
            left = t0 + duration - time.monotonic()
            if left > 0 and system.parts["kernel"].alive():
                time.sleep(left)
        except KeyboardInterrupt:
            interrupted = (f"after {len(outcomes)} of {len(plan)} faults, {time.monotonic() - t0:.1f}s of "
                           f"{duration:g}s")
        with ctrl_c_deferred() as hits:
            say("interrupted: stopping everything it started (no final checks)" if interrupted else
                "stopping clients; waiting for the kernel to release their processes; final checks")
            stopped = set()  # parts still running at the end; one just started may die of SIGTERM before its handler
            for p in list(system.parts.values()):
                if p.role in ("client", "attack") and p.alive():
                    stopped.add(p.name)
                    system.kill(p.name, signal.SIGTERM)
            for p in ("kernel", "mm"):
                part = system.parts[p]
                if not part.alive():
                    violations.append(f"the {p} died (status {part.proc.returncode}):\n{part.log_tail(8)}")
        if hits and not interrupted:
            interrupted = f"after all {len(plan)} faults, while stopping the clients"
        if not interrupted and system.parts["kernel"].alive() and system.parts["mm"].alive():
            try:
                checks, _audit = final_checks(system, boot, quiet_timeout=3 * lease + 10)
            except CallError as exc:
                violations.append(f"final checks failed: {exc}")
            except KeyboardInterrupt:
                interrupted = f"after all {len(plan)} faults, during the final checks"
                checks = []
        violations.extend(f"{c.name}: {c.detail}" for c in checks if not c.ok)
        client_rows = _client_rows(run, stopped, violations)
        for server in ("kernel", "mm"):
            try:
                with system.connection(server) as conn:
                    servers[server] = conn.call("stats")
            except (CallError, FileNotFoundError):
                pass
    except _Stop:
        pass
    except KeyboardInterrupt:
        interrupted = interrupted or f"after {len(outcomes)} of {len(plan)} faults, while stopping"
    finally:
        with ctrl_c_deferred():
            if recording is not None:
                for v in violations:
                    recording.note(v, violation=True)
                page = recording.stop()
            codes = system.stop()
    if page:
        say(f"frame view of the run: {page}")
    if not interrupted:
        for p in ("mm", "kernel"):
            if codes.get(p) not in (0, None) and not any(v.startswith(f"the {p} died") for v in violations):
                violations.append(f"the {p} exited {codes.get(p)} when stopped")
    code = 1 if violations else EXIT_INTERRUPTED if interrupted else 0
    report = chaos_report(run, plan, outcomes, checks, client_rows, servers, codes, violations, interrupted, code,
                     time.monotonic() - began, {"duration": duration, "seed": seed, "arch": options.value(arch),
                                                 "memory": memory, "clients": clients, "lease": lease,
                                                 "transport": options.value(transport)})
    rundir.write_report(system.run_dir, report)
    if json_out:
        typer.echo(json.dumps(report, default=str))
    else:
        _print_tables(console, plan, outcomes, client_rows, run, checks, servers)
    if interrupted:
        console.print(f"[bold yellow]interrupted[/] {interrupted}; everything it started is stopped", markup=True)
    if violations:
        console.print("[bold red]VIOLATIONS:[/]")
        for v in violations:
            console.print(f"  - {v}", markup=False)
    elif not interrupted:
        console.print("[bold green]no violations[/]: every fault survived, audits clean, nothing leaked")
    say(f"report: {rundir.report_path(system.run_dir)}")
    raise typer.Exit(code)


class _Stop(Exception):
    """Nothing more to run: go straight to stopping what was started."""


def _client_rows(run: Run, stopped: set[str], violations: list[str]) -> list:
    rows = []
    for p in run.system.parts.values():
        if p.role != "client":
            continue
        summ = client_summary(p.log_path) if p.name not in run.killed else None
        code = p.proc.returncode
        if p.name in run.killed:
            expected = code == -signal.SIGKILL
        else:
            expected = code == 0 or (p.name in stopped and code == -signal.SIGTERM)
        if not expected:
            violations.append(f"client {p.name} exited {code}" + (" (a server gave a wrong answer)" if code == 1
                                                                  else ""))
        rows.append((p.name, code, summ))
    return rows


def chaos_report(run: Run, plan: list[Fault], outcomes: list[Outcome], checks: list[Check], client_rows: list,
            servers: dict[str, dict], codes: dict[str, Any], violations: list[str], interrupted: str, code: int,
            seconds: float, opts: dict[str, Any]) -> dict[str, Any]:
    """What chaos found, as data (``RUN/report.json``, ``--json``)."""
    attacks = []
    for name, kind in run.attacks:
        part = run.system.parts[name]
        attacks.append({"name": name, "kind": kind, "exit": part.proc.returncode,
                        "summary": client_summary(part.log_path)})
    return {
        "command": "chaos", "run_dir": os.path.abspath(run.system.run_dir), "ok": not violations and not interrupted,
        "exit": code, "interrupted": interrupted or None, "seconds": round(seconds, 3),
        "options": opts,
        "plan": [asdict(f) for f in plan],
        "faults": [{**asdict(o.fault), "started": round(o.started, 3), "done": o.done, "note": o.note,
                    "audit": o.audit, "violation": o.violation or None} for o in outcomes],
        "progress": {"planned": len(plan), "injected": sum(1 for o in outcomes if o.done)},
        "checks": [c.to_json() for c in checks],
        "clients": [{"name": n, "exit": c, "summary": s} for n, c, s in client_rows],
        "attacks": attacks,
        "servers": {k: {kk: vv for kk, vv in v.items() if kk != "per_process"} for k, v in servers.items()},
        "stopped": codes,  # exit status of every part still running at the end (0: stopped cleanly)
        "violations": violations,
    }


def _print_tables(console: Any, plan: list[Fault], outcomes: list[Outcome], client_rows: list, run: Run,
                  checks: list[Check], servers: dict[str, dict]) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title="faults injected", title_justify="left")
    for col in ("fault", "what", "planned", "injected", "audits after it", "violations"):
        t.add_column(col)
    for kind in FAULTS:
        mine = [o for o in outcomes if o.fault.action == kind]
        planned = sum(1 for f in plan if f.action == kind)
        clean = sum(1 for o in mine if o.audit.startswith("clean"))
        retried = sum(1 for o in mine if o.audit.startswith("clean on try"))
        bad = sum(1 for o in mine if o.violation)
        audits = f"{clean}/{len(mine)} clean" + (f" ({retried} on a retry)" if retried else "")
        t.add_row(kind, FAULT_TEXT[kind], str(planned), str(sum(1 for o in mine if o.done)), Text(audits),
                  Text(str(bad), style="bold red" if bad else "green"))
    console.print(t)

    e = Table(title="errors seen", title_justify="left")
    for col in ("source", "calls", "ok", "refused", "refusals by error", "wrong answers", "resends"):
        e.add_column(col)
    total: Counter = Counter()
    for name, code, summ in client_rows:
        if summ is None:
            e.add_row(f"{name} (exit {code})", "-", "-", "-", "killed before its summary" if name in run.killed
                      else "no summary", "-", "-")
            continue
        total.update(summ.get("errors", {}))
        e.add_row(Text(f"{name} [{summ.get('workload')}]"), str(summ.get("steps")), str(summ.get("ok")),
                  str(summ.get("refused")), ", ".join(f"{k} {v}" for k, v in summ.get("errors", {}).items()) or "-",
                  str(summ.get("wrong")), str(summ.get("resends")))
    e.add_row(Text("all workload clients", style="bold"), "", "", str(sum(total.values())),
              ", ".join(f"{k} {v}" for k, v in total.most_common()) or "-", "", "")
    for name, kind in run.attacks:  # lies told, lies refused as expected, lies accepted
        part = run.system.parts[name]
        summ = client_summary(part.log_path) or {}
        told, refused = summ.get("passed", 0) + summ.get("failed", 0), summ.get("passed", "-")
        accepted = summ.get("failed", "?") if part.proc.returncode is not None else "?"
        e.add_row(Text(f"{name} [{kind}] exit {part.proc.returncode}"), str(told), "", str(refused),
                  Text(_attack_text(summ) or "-"), Text(f"{accepted} lie(s) accepted", style="bold red")
                  if part.proc.returncode != 0 else "0", "")
    k = servers.get("kernel")
    if k is not None:
        e.add_row("kernel (every caller)", f"{k.get('calls', '-')}", "", f"{k.get('refused', '-')}",
                  "(attacks, workloads and the mm)", "", f"{k.get('replayed', '-')} replayed")
    m = servers.get("mm")
    if m is not None:
        c = m["counters"]
        e.add_row("mm (since its last restart)", str(c["requests"]), "", str(c["refused"]),
                  f"ENOMEM retries {c['enomem_retries']}, client deaths {c['deaths']}", "", "")
    console.print(e)
    if checks:
        console.print(checks_table(checks, "final checks"))
