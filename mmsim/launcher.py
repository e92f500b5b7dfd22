"""``mmsim up`` and ``mmsim status``: the whole system on one machine, and a look at it.

``up`` makes a fresh run directory (keys generated there), starts the kernel,
the mm and a few workload clients as separate OS processes (``System``),
shows the frame picture live (or a line a second with ``--no-live``), then
stops the clients, waits for their leases to run out, audits, checks for
leaks, stops the mm and the kernel, and prints a summary. It exits 0 only
if every check passed and no part crashed.

``status`` draws the same picture once from a running system, and can save
it as SVG. The end-of-run checks (``final_checks``) are shared with
``mmsim chaos``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import typer

from protocol.errors import CallError

DEFAULT_WORKLOADS = ("steady", "sparse", "kobjects", "sharer")
STATUS_HELP = "Draw the frame picture of a running system once (optionally saved as an SVG image)."
UP_HELP = ("Start kernel, mm and workload clients as separate processes in a fresh run directory, show the "
           "frame picture live, then stop, audit and summarise (exit 0 only if everything checked out).")


# ---- shared with chaos ---------------------------------------------------------------

def check_system_options(arch: str, memory: str, transport: str = "ipc") -> None:
    """Usage errors (exit 2) for options the kernel would refuse, before anything starts."""
    from kernel_server.arch import PROFILES
    from kernel_server.bootmap import parse_size, pc_map

    if arch not in PROFILES:
        raise typer.BadParameter(f"unknown architecture {arch!r}; choose one of {', '.join(PROFILES)}",
                                 param_hint="--arch")
    try:
        pc_map(PROFILES[arch], parse_size(memory), None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--memory") from None
    if transport not in ("ipc", "tcp"):
        raise typer.BadParameter(f"transport must be ipc or tcp, not {transport!r}", param_hint="--transport")


def fresh_run_dir(run_dir: Optional[str], prefix: str) -> str:
    """``run_dir`` (which must not hold files yet) or ``./<prefix>-<timestamp>``."""
    if run_dir is None:
        run_dir = f"./{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        base, k = run_dir, 1
        while os.path.exists(run_dir):
            k += 1
            run_dir = f"{base}-{k}"
    elif os.path.exists(run_dir) and (not os.path.isdir(run_dir) or os.listdir(run_dir)):
        raise typer.BadParameter(f"{run_dir} already exists and is not an empty directory; a run needs a fresh "
                                 "one (remove it or choose another)", param_hint="--run-dir")
    return run_dir


def client_summary(log_path: str) -> dict[str, Any] | None:
    """The last JSON object line a client (``--json``) wrote to its log, if any."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def final_checks(system: Any, boot: dict[str, Any], quiet_timeout: float) -> tuple[list[Check], dict[str, Any]]:
    """After every client is gone: wait until the kernel has no client process left, then
    audit (I8), conservation (I7) and leaks (I11). Returns the checks and the audit report."""
    checks: list[Check] = []
    deadline = time.monotonic() + quiet_timeout
    st = system.kernel_stats()
    while st["processes"] and time.monotonic() < deadline:
        time.sleep(min(0.2, system.lease / 4))
        st = system.kernel_stats()
    report = system.audit()
    st = system.kernel_stats()
    div = report["divergences"]
    checks.append(Check("audit (I8)", div == 0,
                        f"{div} divergent frame(s)" + (f": {report.get('class_counts')}" if div else "")
                        + f"; {report.get('pending', 0)} pending intent(s)"))
    total = st["kernel_free"] + st["kernel_used"] + st["kernel_shared"] + st["user_free"] + st["user_mapped"]
    checks.append(Check("conservation (I7)", total == st["ram"],
                        f"kernel free {st['kernel_free']} + used {st['kernel_used']} + shared {st['kernel_shared']}"
                        f" + user free {st['user_free']} + mapped {st['user_mapped']} = {total}; RAM {st['ram']}"))
    checks.append(Check("no client process left (I11)", st["processes"] == 0,
                        f"{st['processes']} process(es) left (waited up to {quiet_timeout:g}s)"))
    checks.append(Check("no user frame mapped (I11)", st["user_mapped"] == 0, f"{st['user_mapped']} mapped"))
    used = report["mm_view"]["used"]
    checks.append(Check("no frame in use in the mm's view", used == 0, f"{used} in use"))
    checks.append(Check("kernel memory back to its boot level", st["kernel_used"] == boot["kernel_used"],
                        f"kernel used {st['kernel_used']}, at boot {boot['kernel_used']}"))
    return checks, report


def checks_table(checks: list[Check], title: str = "checks") -> Any:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, title_justify="left")
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail")
    for c in checks:
        t.add_row(c.name, Text("ok", style="green") if c.ok else Text("FAILED", style="bold red"), Text(c.detail))
    return t


def views_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    mv, kv = report["mm_view"], report["kernel_view"]
    t = Table(title="frames per owner in each view", title_justify="left")
    t.add_column("owner / state")
    t.add_column("mm view", justify="right")
    t.add_column("kernel view", justify="right")
    t.add_row("kernel-owned", f"{mv['kernel']:,}", f"{kv['kernel']:,}")
    t.add_row("user free", f"{mv['free']:,}", f"{kv['user_free']:,}")
    t.add_row("user mapped", f"{mv['used']:,}", f"{kv['user_mapped']:,}")
    t.add_row("not RAM", "", f"{kv['none']:,}")
    t.add_row("divergences", str(report["divergences"]), "")
    return t


def _fmt_errors(errors: Any) -> str:
    if isinstance(errors, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
    return "-" if errors is None else str(errors)


# ---- up ------------------------------------------------------------------------------

def _console(width: int | None = None) -> Any:
    from rich.console import Console

    c = Console()
    if not c.is_terminal:
        c = Console(width=width or 110)
    return c


def up(
    duration: float = typer.Option(20.0, "--duration", min=0.5, help="Seconds to run the workloads (Ctrl-C stops "
                                   "earlier, cleanly)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="A fresh (absent or empty) run directory "
                                          "(default: ./mmsim-run-<timestamp>); keys are generated there."),
    arch: str = typer.Option("i686", "--arch", help="Architecture profile: i686, i686-pae or x86_64."),
    memory: str = typer.Option("256MiB", "--memory", help="RAM size, e.g. 256MiB, 4GiB."),
    clients: int = typer.Option(4, "--clients", min=0, max=64, help="Workload client processes."),
    workloads: str = typer.Option(",".join(DEFAULT_WORKLOADS), "--workloads",
                                  help="Comma-separated workloads given to the clients in turn."),
    seed: int = typer.Option(1, "--seed", help="Seed of the workloads (client i gets seed*1000+i)."),
    lease: float = typer.Option(2.0, "--lease", min=0.2, help="Client lease in seconds (how soon the kernel "
                                "releases a silent client's memory)."),
    transport: str = typer.Option("ipc", "--transport", help="ipc (sockets under /tmp) or tcp (127.0.0.1)."),
    no_live: bool = typer.Option(False, "--no-live", help="Plain logs: one line a second instead of the live view."),
    columns: int = typer.Option(64, "--columns", min=8, max=512, help="Cells per row of the frame picture."),
    rows: int = typer.Option(16, "--rows", min=1, max=256, help="Rows of the frame picture."),
) -> None:
    """Run the whole system for a while and check it."""
    from mmsim.picture import Observer, render, summary_line
    from mmsim.system import StartError, System
    from mmsim.view import Recording
    from clients.workloads import WORKLOADS

    check_system_options(arch, memory, transport)
    names = [w.strip() for w in workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or (clients and not names):
        raise typer.BadParameter(f"unknown workload(s) {', '.join(bad) or '(none given)'}; choose from "
                                 f"{', '.join(WORKLOADS)}", param_hint="--workloads")
    run_dir = fresh_run_dir(run_dir, "mmsim-run")
    console = _console()
    live_view = not no_live and console.is_terminal
    system = System(run_dir, arch=arch, memory=memory, lease=lease, transport=transport, clients=clients)
    say = console.print if live_view else (lambda *a, **k: typer.echo(" ".join(str(x) for x in a)))
    say(f"mmsim up: run directory {system.run_dir} (logs in {os.path.join(system.run_dir, 'logs')})")
    labels: dict[str, str] = {}
    crashed: list[str] = []
    interrupted = False
    ok = False
    last = None
    try:
        try:
            system.start()
        except StartError as exc:
            typer.echo(f"mmsim up: {exc}", err=True)
            raise typer.Exit(1) from None
        boot = system.kernel_stats()
        say(f"kernel and mm up ({arch}, {memory}, lease {lease:g}s); starting {clients} client(s) for {duration:g}s")
        for i in range(clients):
            name, wl = f"client-{i}", names[i % len(names)]
            labels[name] = wl
            system.start_client(name, wl, seed=seed * 1000 + i, duration=duration, extra=["--json"])
        recording = Recording(system.run_dir, labels=labels).start()  # the HTML view: RUN/view.html at the end
        started = time.monotonic()
        history: deque = deque(maxlen=16)
        with Observer(system.run_dir, labels=labels) as obs:
            live = None
            if live_view:
                from rich.live import Live

                live = Live(console=console, refresh_per_second=4, transient=False)
                live.start()
            try:
                next_line = started
                while True:
                    elapsed = time.monotonic() - started
                    for p in system.parts.values():
                        if p.role in ("kernel", "mm") and not p.alive() and p.name not in crashed:
                            crashed.append(p.name)
                    clients_alive = any(p.alive() for p in system.parts.values() if p.role == "client")
                    if crashed or (elapsed > duration and not clients_alive) or elapsed > duration + 15:
                        break
                    try:
                        snap = obs.snapshot()
                    except (CallError, FileNotFoundError) as exc:
                        say(f"[{elapsed:5.1f}s] kernel not answering: {exc}")
                        time.sleep(0.5)
                        continue
                    # rates over the last second or so: the newest earlier snapshot at least 0.9 s old
                    prev = next((s for s in reversed(history) if snap.at - s.at >= 0.9),
                                history[0] if history else None)
                    history.append(snap)
                    if live is not None:
                        footer = (f"{min(elapsed, duration):.1f}s of {duration:g}s; Ctrl-C stops cleanly. "
                                  f"Run directory {system.run_dir}")
                        live.update(render(snap, prev, columns, rows, footer=footer))
                        time.sleep(0.25)
                    elif time.monotonic() >= next_line:
                        typer.echo(summary_line(snap, prev, elapsed))
                        next_line += 1.0
                        time.sleep(max(0.0, next_line - time.monotonic()))
            except KeyboardInterrupt:
                interrupted = True
            finally:
                if live is not None:
                    live.stop()
            say("stopping clients" + (" (interrupted)" if interrupted else ""))
            stopped = set()  # still running: one that had not set up its handler yet dies of SIGTERM
            for p in list(system.parts.values()):
                if p.role == "client" and p.alive():
                    stopped.add(p.name)
                    system.kill(p.name, signal.SIGTERM)
            if crashed:
                for name in crashed:
                    part = system.parts[name]
                    typer.echo(f"mmsim up: the {name} died (status {part.proc.returncode}):\n{part.log_tail()}",
                               err=True)
                checks: list = []
                report = None
            else:
                say(f"waiting for the kernel to release the clients' processes (lease {lease:g}s), then auditing")
                checks, report = final_checks(system, boot, quiet_timeout=3 * lease + 10)
                try:
                    last = obs.snapshot()
                except (CallError, FileNotFoundError):
                    pass
        client_rows = []
        for p in system.parts.values():
            if p.role != "client":
                continue
            code = p.proc.returncode
            good = code == 0 or (p.name in stopped and code == -signal.SIGTERM)
            if not good:
                crashed.append(p.name)
            client_rows.append((p.name, labels.get(p.name, ""), code, client_summary(p.log_path)))
        try:
            kstats_end = system.kernel_stats()
        except (CallError, FileNotFoundError):
            kstats_end = None
        if page := recording.stop():
            say(f"frame view of the run: {page}")
        codes = system.stop()  # clients, then the mm, then the kernel
        for role in ("mm", "kernel"):
            if codes.get(role) not in (0, None) and role not in crashed:
                crashed.append(role)
        ok = not crashed and bool(checks) and all(c.ok for c in checks)
        _print_up_summary(console, report, checks, client_rows, kstats_end, codes, crashed, ok, last)
    finally:
        system.stop()
    raise typer.Exit(0 if ok else 1)


def _print_up_summary(console: Any, report: dict | None, checks: list, client_rows: list, kstats: dict | None,
                      codes: dict, crashed: list, ok: bool, last: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    if last is not None:
        counts = last.counts()
        console.print("frames by class at the end: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if report is not None:
        console.print(views_table(report))
    t = Table(title="parts", title_justify="left")
    for col in ("part", "workload", "exit", "calls", "wrong answers", "refusals seen"):
        t.add_column(col)
    for name, wl, code, summ in client_rows:
        summ = summ or {}
        t.add_row(name, wl, str(code), str(summ.get("steps", "-")), str(summ.get("wrong", "-")),
                  _fmt_errors(summ.get("errors")))
    for role in ("mm", "kernel"):
        calls = ""
        if role == "kernel" and kstats is not None:
            calls = f"{kstats.get('calls', '-')}"
        t.add_row(role, "", str(codes.get(role)), calls, "", "")
    console.print(t)
    if checks:
        console.print(checks_table(checks))
    if crashed:
        console.print(Text(f"crashed or failed: {', '.join(crashed)}", style="bold red"))
    console.print(Text("audit clean, no leaks, nothing crashed" if ok else "FAILED", style="bold green" if ok
                       else "bold red"))


# ---- status --------------------------------------------------------------------------

def status(
    run_dir: str = typer.Option("./mmsim-run", "--run-dir", help="Run directory of a running system."),
    svg: Optional[str] = typer.Option(None, "--svg", help="Also save the picture as an SVG image to this file."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="Kernel endpoint (default: RUN/kernel.endpoint)."),
    mm: Optional[str] = typer.Option(None, "--mm", help="The mm's endpoint (default: RUN/mm.endpoint)."),
    interval: float = typer.Option(0.5, "--interval", min=0.0, max=60.0, help="Seconds between the two samples "
                                   "call rates are measured over (0: no rates)."),
    columns: int = typer.Option(64, "--columns", min=8, max=512, help="Cells per row of the frame picture."),
    rows: int = typer.Option(16, "--rows", min=1, max=256, help="Rows of the frame picture."),
) -> None:
    """Draw the frame picture of a running system once."""
    from rich.console import Console

    from mmsim.picture import Observer, render
    from protocol import rundir

    if not os.path.isdir(rundir.keys_dir(run_dir)):
        raise typer.BadParameter(f"{run_dir} has no keys/ directory: not a run directory", param_hint="--run-dir")
    try:
        with Observer(run_dir, kernel, mm) as obs:
            first = obs.snapshot()
            prev, snap = None, first
            if interval > 0:
                time.sleep(interval)
                prev, snap = first, obs.snapshot()
    except FileNotFoundError as exc:
        typer.echo(f"status: {exc}", err=True)
        raise typer.Exit(2) from None
    except CallError as exc:
        typer.echo(f"status: the system is not answering: {exc}", err=True)
        raise typer.Exit(1) from None
    picture = render(snap, prev, columns, rows, title=f"mmsim: physical memory of {run_dir}")
    console = _console(width=max(110, columns + 50))
    console.print(picture)
    if svg:
        rec = Console(record=True, width=max(110, columns + 50), file=io.StringIO())
        rec.print(picture)
        try:
            rec.save_svg(svg, title=f"mmsim status {run_dir}")
        except OSError as exc:
            typer.echo(f"status: cannot write {svg}: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"saved {svg}")
