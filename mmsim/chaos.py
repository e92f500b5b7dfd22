"""``mmsim chaos``: the system under workload, with faults injected at seeded random moments.

``make_plan(seed, ...)`` decides every fault before anything runs (so the plan
is printed first and the same seed gives the same plan): kill -9 a client
(and start a replacement with a new key), kill -9 the mm and restart it,
pause a client or the mm with SIGSTOP for a while then SIGCONT, run a lying
client (``mmsim client attack --kind K --json``). Every kind appears at
least once. Faults run one after another at their planned times; each is
followed by an audit (I8; retried a few times, since a lease can run out
between the mm's event poll and its frame-table read while workloads run).

At the end the clients are stopped and the run is checked like ``mmsim up``
does (audit, conservation, leaks: ``launcher.final_checks``), and a table of
faults injected and errors seen is printed. Exit 1 on any violation.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import typer

from mmsim.launcher import (
    DEFAULT_WORKLOADS,
    Check,
    check_system_options,
    checks_table,
    client_summary,
    final_checks,
    fresh_run_dir,
)
from protocol.errors import CallError

CHAOS_HELP = ("Run the system under workload and inject faults at seeded random moments (kill -9 clients, kill -9 "
              "and restart the mm, SIGSTOP/SIGCONT, lying clients); then audit, check conservation and leaks, "
              "and print a table of faults and errors. Exit 1 on any violation.")
FAULTS = ("kill_client", "kill_mm", "pause_client", "pause_mm", "attack")
FAULT_TEXT = {
    "kill_client": "kill -9 a client, start a replacement",
    "kill_mm": "kill -9 the mm, restart it",
    "pause_client": "SIGSTOP a client, SIGCONT later",
    "pause_mm": "SIGSTOP the mm, SIGCONT later",
    "attack": "run a lying client",
}
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
    """The kinds of lying client ``mmsim client attack --kind`` knows."""
    from clients.attacks import ATTACKS

    return sorted(ATTACKS)


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
        new = run.start_client(f.target, t0)
        out.note = f"killed {victim}, started {new}"
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
        name = f"attack-{len(run.attacks)}"
        part = system.spawn(name, "attack", ["client", "attack", "--run-dir", system.run_dir, "--kind", f.target,
                                             "--json"])
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
    duration: float = typer.Option(20.0, "--duration", min=1.0, help="Seconds of workload with faults."),
    seed: int = typer.Option(1, "--seed", help="Seed of the fault plan and the workloads (same seed, same plan)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="A fresh (absent or empty) run directory "
                                          "(default: ./mmsim-run-chaos-<timestamp>)."),
    arch: str = typer.Option("i686", "--arch", help="Architecture profile: i686, i686-pae or x86_64."),
    memory: str = typer.Option("256MiB", "--memory", help="RAM size, e.g. 256MiB, 4GiB."),
    clients: int = typer.Option(4, "--clients", min=0, max=64, help="Workload client processes."),
    lease: float = typer.Option(1.0, "--lease", min=0.2, help="Client lease in seconds (pauses last up to twice "
                                "this, so some outlast it)."),
    transport: str = typer.Option("ipc", "--transport", help="ipc (sockets under /tmp) or tcp (127.0.0.1)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the fault plan and exit without running it."),
) -> None:
    """Inject faults into a running system and check its invariants."""
    from rich.console import Console

    from mmsim.system import StartError, System
    from mmsim.view import Recording

    check_system_options(arch, memory, transport)
    kinds = attack_kinds()
    plan = make_plan(seed, duration, clients, kinds, lease)
    typer.echo(f"chaos plan (seed {seed}, {duration:g}s, {clients} client(s), lease {lease:g}s): {len(plan)} faults")
    for f in plan:
        typer.echo("  " + f.describe())
    if plan_only:
        raise typer.Exit(0)
    run_dir = fresh_run_dir(run_dir, "mmsim-run-chaos")
    console = Console() if Console().is_terminal else Console(width=130)
    system = System(run_dir, arch=arch, memory=memory, lease=lease, transport=transport, clients=clients)
    typer.echo(f"run directory {system.run_dir} (logs in {system.run_dir}/logs)")
    violations: list[str] = []
    outcomes: list[Outcome] = []
    run = Run(system, {f"client-{i}": DEFAULT_WORKLOADS[i % len(DEFAULT_WORKLOADS)] for i in range(clients)},
              seed, duration)
    try:
        try:
            system.start()
        except StartError as exc:
            typer.echo(f"chaos: {exc}", err=True)
            raise typer.Exit(1) from None
        boot = system.kernel_stats()
        t0 = time.monotonic()
        for slot in run.workloads:
            run.start_client(slot, t0)
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
                typer.echo(f"[{out.started:6.2f}s] {f.action:<13} {f.target}: {out.note}; audit {out.audit or '-'}"
                           + (f"; VIOLATION: {out.violation}" if out.violation else ""))
                if out.violation:
                    violations.append(f"{f.action} {f.target}: {out.violation}")
                if not system.parts["kernel"].alive():
                    break
            left = t0 + duration - time.monotonic()
            if left > 0 and system.parts["kernel"].alive():
                time.sleep(left)
        except KeyboardInterrupt:
            violations.append("interrupted before the plan finished")
        typer.echo("stopping clients; waiting for the kernel to release their processes; final checks")
        stopped = set()  # parts still running at the end; one just started may die of SIGTERM before its handler
        for p in list(system.parts.values()):
            if p.role in ("client", "attack") and p.alive():
                stopped.add(p.name)
                system.kill(p.name, signal.SIGTERM)
        checks: list[Check] = []
        for p in ("kernel", "mm"):
            part = system.parts[p]
            if not part.alive():
                violations.append(f"the {p} died (status {part.proc.returncode}):\n{part.log_tail(8)}")
        if system.parts["kernel"].alive() and system.parts["mm"].alive():
            try:
                checks, _report = final_checks(system, boot, quiet_timeout=3 * lease + 10)
            except CallError as exc:
                violations.append(f"final checks failed: {exc}")
        violations.extend(f"{c.name}: {c.detail}" for c in checks if not c.ok)
        client_rows = []
        for p in system.parts.values():
            if p.role != "client":
                continue
            summ = client_summary(p.log_path) if p.name not in run.killed else None
            code = p.proc.returncode
            if p.name in run.killed:
                expected = code == -signal.SIGKILL
            else:
                expected = code == 0 or (p.name in stopped and code == -signal.SIGTERM)
            if not expected:
                violations.append(f"client {p.name} exited {code}" + (" (a server gave a wrong answer)"
                                                                      if code == 1 else ""))
            client_rows.append((p.name, code, summ))
        servers: dict[str, dict] = {}
        for server in ("kernel", "mm"):
            try:
                with system.connection(server) as conn:
                    servers[server] = conn.call("stats")
            except (CallError, FileNotFoundError):
                pass
        for v in violations:
            recording.note(v, violation=True)
        if page := recording.stop():
            typer.echo(f"frame view of the run: {page}")
        codes = system.stop()
        for p in ("mm", "kernel"):
            if codes.get(p) not in (0, None) and not any(v.startswith(f"the {p} died") for v in violations):
                violations.append(f"the {p} exited {codes.get(p)} when stopped")
        _print_tables(console, plan, outcomes, client_rows, run, checks, servers)
    finally:
        system.stop()
    if violations:
        console.print("[bold red]VIOLATIONS:[/]")
        for v in violations:
            console.print(f"  - {v}", markup=False)
        raise typer.Exit(1)
    console.print("[bold green]no violations[/]: every fault survived, audits clean, nothing leaked")


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
