"""``mmsim up`` and ``mmsim status``: the whole system on one machine, and a look at it.

``up`` runs in ``./mmsim-run`` by default, the directory every other command
looks at by default (``status``, ``audit``, ``ping``, ``keys``); a previous,
stopped run there is replaced, a running one is refused. It makes fresh keys,
starts the kernel, the mm and a few admitted workload clients as separate OS
processes (``System``), shows the frame picture live (or a line a second with
``--no-live``), then stops the clients, waits for their leases to run out,
audits, checks for leaks, stops the mm and the kernel, prints a summary and
writes it as data to ``RUN/report.json`` (``--json`` prints that instead). It
exits 0 only if every check passed and no part crashed; 130 when interrupted
(Ctrl-C ends the run early, the checks still run; a second Ctrl-C skips them).

``status`` draws the same picture once from a running system, and can save
it as SVG or print it as JSON; on a stopped system it says so at once. The
end-of-run checks (``final_checks``) and the run directory's preparation
(``fresh_run_dir``) are shared with ``mmsim chaos``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import typer

from mmsim import options
from mmsim.options import Arch, Transport

DEFAULT_WORKLOADS = ("steady", "sparse", "kobjects", "sharer")
STATUS_HELP = ("Draw the frame picture of a running system once (optionally saved as an SVG image, or printed as "
               "JSON with --json). Exit 0 drawn, 1 the system did not answer, 2 no system is running there.")
UP_HELP = ("Start kernel, mm and workload clients as separate processes, show the frame picture live, then stop, "
           "audit and summarise; the summary is also written to RUN/report.json. The run directory defaults to "
           f"{options.DEFAULT_RUN_DIR}, where status, audit and ping look by default; a previous stopped run there "
           "is replaced, a running one refused. Exit 0 only if everything checked out, 1 if not, 130 when "
           "interrupted (Ctrl-C ends the run early and the checks still run; a second Ctrl-C skips them).")
EXIT_INTERRUPTED = 130


# ---- shared with chaos ---------------------------------------------------------------

def check_system_options(arch: Any, memory: str) -> None:
    """A usage error (exit 2) for a machine the kernel would refuse to boot, before anything starts."""
    from kernel_server.arch import PROFILES
    from kernel_server.bootmap import pc_map

    try:
        pc_map(PROFILES[options.value(arch)], options.parse_memory(memory), None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--memory") from None


def fresh_run_dir(run_dir: str, hint: str = "--run-dir") -> tuple[str, list[str]]:
    """Make ``run_dir`` ready for a new run: created if missing; a previous run's files (the layout's
    only) removed if no server of it is running; refused if a system runs there or it holds other
    files. Returns (the directory, what was replaced: [] if it was new or empty)."""
    from protocol import rundir

    options.make_dir(run_dir, hint)
    entries = sorted(os.listdir(run_dir))
    if not entries:
        return run_dir, []
    live = rundir.running(run_dir)
    if live:
        who = ", ".join(f"the {n} (pid {rundir.holder(run_dir, n) or '?'})" for n in live)
        raise typer.BadParameter(f"a system is running in {run_dir}: {who}; stop it first (or choose another "
                                 "run directory)", param_hint=hint)
    foreign = [e for e in entries if not rundir.named_by_layout(e)]
    if foreign or not (rundir.is_run_dir(run_dir) or os.path.exists(rundir.report_path(run_dir))):
        shown = ", ".join((foreign or entries)[:5]) + (", ..." if len(foreign or entries) > 5 else "")
        raise typer.BadParameter(f"{run_dir} is not an empty directory nor a previous run (it holds {shown}); a "
                                 "run needs an empty, new or previous run directory (choose another)", param_hint=hint)
    rundir.reset(run_dir)
    return run_dir, entries


@contextmanager
def ctrl_c_deferred() -> Iterator[list[int]]:
    """Ctrl-C inside is noted (the list grows), not raised: what was started is always stopped."""
    hits: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    except ValueError:  # not the main thread: nothing to defer
        yield hits
        return
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, old)


def workload_names(text: str, clients: int) -> list[str]:
    """The comma-separated workloads of ``--workloads``, each one of ``options.Workload``."""
    known = [w.value for w in options.Workload]
    names = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in names if w not in known]
    if bad or (clients and not names):
        raise typer.BadParameter(f"unknown workload(s) {', '.join(bad) or '(none given)'}; choose from "
                                 f"{', '.join(known)}", param_hint="--workloads")
    return names


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    duration: float = typer.Option(20.0, "--duration", min=0.5, max=7 * 86400.0, help="Seconds to run the "
                                   "workloads (Ctrl-C stops earlier, cleanly)."),
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help="Run directory: new, empty, or a "
                                "previous stopped run (replaced; a running one is refused). Fresh keys are made "
                                "there. status, audit and ping look there by default.",
                                callback=options.dir_callback()),
    arch: Arch = typer.Option(Arch.i686, "--arch", help="Architecture profile."),
    memory: str = typer.Option("256MiB", "--memory", metavar="SIZE", help="RAM size, e.g. 256MiB, 4GiB, 1G "
                               "(= 10^9 bytes; rounded down to whole pages).",
                               callback=options.size_callback("--memory", memory=True)),
    clients: int = typer.Option(4, "--clients", min=0, max=64, help="Workload client processes."),
    workloads: str = typer.Option(",".join(DEFAULT_WORKLOADS), "--workloads",
                                  help="Comma-separated workloads given to the clients in turn, from: "
                                  + ", ".join(w.value for w in options.Workload) + "."),
    seed: int = typer.Option(1, "--seed", min=0, max=2**31, help="Seed of the workloads (client i gets "
                             "seed*1000+i)."),
    lease: float = typer.Option(2.0, "--lease", min=0.2, max=3600.0, help="Client lease in seconds (how soon "
                                "the kernel releases a silent client's memory)."),
    transport: Transport = typer.Option(Transport.ipc, "--transport", help="ipc (sockets under /tmp) or tcp "
                                        "(127.0.0.1)."),
    no_live: bool = typer.Option(False, "--no-live", help="Plain logs: one line a second instead of the live view."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout (what "
                                  "RUN/report.json holds); progress goes to stderr."),
    columns: int = typer.Option(64, "--columns", min=8, max=512, help="Cells per row of the frame picture."),
    rows: int = typer.Option(16, "--rows", min=1, max=256, help="Rows of the frame picture."),
) -> None:
    """Run the whole system for a while and check it."""
    names = workload_names(workloads, clients)
    check_system_options(arch, memory)
    run_dir, replaced = fresh_run_dir(run_dir)
    from mmsim.picture import Observer, render, summary_line
    from mmsim.system import StartError, System
    from mmsim.view import Recording
    from protocol import rundir
    from protocol.errors import CallError

    console = _console()
    live_view = not no_live and not json_out and console.is_terminal
    if live_view:
        say = console.print
    else:
        def say(*a: Any, **_: Any) -> None:
            typer.echo(" ".join(str(x) for x in a), err=json_out)
    arch_v, transport_v = options.value(arch), options.value(transport)
    system = System(run_dir, arch=arch_v, memory=memory, lease=lease, transport=transport_v, clients=clients)
    say(f"mmsim up: run directory {run_dir}" + (" (the previous run there was replaced)" if replaced else "")
        + f"; logs in {rundir.logs_dir(run_dir)}")
    labels: dict[str, str] = {}
    recording = None  # the HTML view of the run (RUN/view.html), recorded while it runs
    page = None
    crashed: list[str] = []
    checks: list[Check] = []
    audit_report: dict | None = None
    client_rows: list = []
    kstats_end = None
    codes: dict = {}
    last = None
    interrupted = ""  # where Ctrl-C came, if it did
    stopped: set[str] = set()
    began = time.monotonic()
    try:
        try:
            system.start()
            boot = system.kernel_stats()
        except StartError as exc:
            typer.echo(f"mmsim up: {exc}", err=True)
            crashed.append("start")
            raise _Done() from None
        except KeyboardInterrupt:
            interrupted = "while starting"
            raise _Done() from None
        say(f"kernel and mm up ({arch_v}, {memory}, lease {lease:g}s); starting {clients} client(s) for {duration:g}s")
        try:
            for i in range(clients):
                name, wl = f"client-{i}", names[i % len(names)]
                labels[name] = wl
                system.start_client(name, wl, seed=seed * 1000 + i, duration=duration, extra=["--json"])
        except KeyboardInterrupt:
            interrupted = "while starting the clients"
        recording = Recording(system.run_dir, labels=labels).start()
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
                while not interrupted:
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
                        say(summary_line(snap, prev, elapsed))
                        next_line += 1.0
                        time.sleep(max(0.0, next_line - time.monotonic()))
            except KeyboardInterrupt:
                interrupted = f"after {time.monotonic() - started:.1f}s of {duration:g}s"
            finally:
                if live is not None:
                    live.stop()
            with ctrl_c_deferred():
                say("stopping clients" + (f" (interrupted {interrupted})" if interrupted else ""))
                for p in list(system.parts.values()):
                    if p.role == "client" and p.alive():
                        stopped.add(p.name)  # one that had not set up its handler yet dies of SIGTERM
                        system.kill(p.name, signal.SIGTERM)
            for name in crashed:
                part = system.parts[name]
                typer.echo(f"mmsim up: the {name} died (status {part.proc.returncode}):\n{part.log_tail()}", err=True)
            if not crashed:
                try:
                    say(f"waiting for the kernel to release the clients' processes (lease {lease:g}s), then auditing"
                        + (" (Ctrl-C again skips this)" if interrupted else ""))
                    checks, audit_report = final_checks(system, boot, quiet_timeout=3 * lease + 10)
                    last = obs.snapshot()
                except (CallError, FileNotFoundError) as exc:
                    say(f"final checks failed: {exc}")
                    checks.append(Check("final checks", False, str(exc)))
                except KeyboardInterrupt:
                    interrupted = interrupted or "during the final checks"
                    checks = []
                    say("final checks skipped (interrupted)")
        client_rows = _client_rows(system, labels, stopped, crashed)
        try:
            kstats_end = system.kernel_stats()
        except (CallError, FileNotFoundError):
            kstats_end = None
    except _Done:
        pass
    except KeyboardInterrupt:
        interrupted = interrupted or "while stopping the clients"
    finally:
        with ctrl_c_deferred():
            if recording is not None:
                page = recording.stop()
            codes = system.stop()  # clients, then the mm, then the kernel; then their leftovers
    if page and not json_out:
        say(f"frame view of the run: {page}")
    for role in ("mm", "kernel"):
        if codes.get(role) not in (0, None) and role not in crashed:
            crashed.append(role)
    ok = not crashed and not interrupted and bool(checks) and all(c.ok for c in checks)
    code = EXIT_INTERRUPTED if interrupted else 0 if ok else 1
    report = {
        "command": "up", "run_dir": os.path.abspath(run_dir), "ok": ok, "exit": code,
        "interrupted": interrupted or None, "seconds": round(time.monotonic() - began, 3),
        "options": {"duration": duration, "arch": arch_v, "memory": memory,
                    "memory_bytes": options.parse_memory(memory), "clients": clients, "workloads": names,
                    "seed": seed, "lease": lease, "transport": transport_v},
        "checks": [c.to_json() for c in checks], "crashed": crashed,
        "clients": [{"name": n, "workload": wl, "exit": c, "summary": summ} for n, wl, c, summ in client_rows],
        "servers": {role: {"exit": codes.get(role)} for role in ("kernel", "mm")},
        "frames": last.counts() if last is not None else None,
        "kernel": {k: v for k, v in (kstats_end or {}).items() if k != "per_process"} or None,
        "audit": audit_report,
    }
    rundir.write_report(run_dir, report)
    if json_out:
        typer.echo(json.dumps(report, default=str))
    else:
        _print_up_summary(console, audit_report, checks, client_rows, kstats_end, codes, crashed, ok, last,
                          interrupted)
        say(f"report: {rundir.report_path(run_dir)}")
    raise typer.Exit(code)


class _Done(Exception):
    """Nothing more to run: go straight to stopping what was started."""


def _client_rows(system: Any, labels: dict[str, str], stopped: set[str], crashed: list[str]) -> list:
    rows = []
    for p in system.parts.values():
        if p.role != "client":
            continue
        code = p.proc.poll()
        good = code == 0 or (p.name in stopped and code == -signal.SIGTERM)
        if not good and code is not None:
            crashed.append(p.name)
        rows.append((p.name, labels.get(p.name, ""), code, client_summary(p.log_path)))
    return rows


def _print_up_summary(console: Any, report: dict | None, checks: list, client_rows: list, kstats: dict | None,
                      codes: dict, crashed: list, ok: bool, last: Any, interrupted: str = "") -> None:
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
    if interrupted:
        console.print(Text(f"interrupted {interrupted}" + ("; what was checked passed" if checks and
                                                          all(c.ok for c in checks) and not crashed else ""),
                           style="bold yellow"))
    else:
        console.print(Text("audit clean, no leaks, nothing crashed" if ok else "FAILED", style="bold green" if ok
                           else "bold red"))


# ---- status --------------------------------------------------------------------------

def status(
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help="Run directory of a running system "
                                f"(default: {options.DEFAULT_RUN_DIR}, where mmsim up runs).",
                                callback=options.run_dir_callback()),
    svg: Optional[str] = typer.Option(None, "--svg", help="Also save the picture as an SVG image to this file.",
                                      callback=options.file_callback("--svg")),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="Kernel endpoint (default: RUN/kernel.endpoint).",
                                         callback=options.endpoint_callback("--kernel")),
    mm: Optional[str] = typer.Option(None, "--mm", help="The mm's endpoint (default: RUN/mm.endpoint).",
                                     callback=options.endpoint_callback("--mm")),
    interval: float = typer.Option(0.5, "--interval", min=0.0, max=60.0, help="Seconds between the two samples "
                                   "call rates are measured over (0: no rates)."),
    json_out: bool = typer.Option(False, "--json", help="Print what the picture shows as one JSON object instead "
                                  "(frames by class, the kernel's and the mm's figures, rates, processes)."),
    columns: int = typer.Option(64, "--columns", min=8, max=512, help="Cells per row of the frame picture."),
    rows: int = typer.Option(16, "--rows", min=1, max=256, help="Rows of the frame picture."),
) -> None:
    """Draw the frame picture of a running system once."""
    from protocol import rundir

    if kernel is None and not rundir.held(run_dir, "kernel"):  # known at once, without waiting for a timeout
        typer.echo(f"status: no system is running in {run_dir} (no kernel holds {rundir.lock_path(run_dir, 'kernel')})"
                   "; start one with mmsim up", err=True)
        raise typer.Exit(2)
    from rich.console import Console

    from mmsim.picture import Observer, rates, render
    from protocol.errors import CallError

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
    if json_out:
        typer.echo(json.dumps(status_data(run_dir, snap, prev, rates), default=str))
    else:
        picture = render(snap, prev, columns, rows, title=f"mmsim: physical memory of {run_dir}")
        _console(width=max(110, columns + 50)).print(picture)
    if svg:
        picture = render(snap, prev, columns, rows, title=f"mmsim: physical memory of {run_dir}")
        rec = Console(record=True, width=max(110, columns + 50), file=io.StringIO())
        rec.print(picture)
        try:
            rec.save_svg(svg, title=f"mmsim status {run_dir}")
        except OSError as exc:
            typer.echo(f"status: cannot write {svg}: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"saved {svg}", err=json_out)


def status_data(run_dir: str, snap: Any, prev: Any, rates: Any) -> dict[str, Any]:
    """What ``status --json`` prints: the picture's figures as data."""
    kstats = snap.kstats
    return {
        "run_dir": os.path.abspath(run_dir),
        "frames": kstats.get("frames"),
        "classes": snap.counts(),
        "kernel": {k: v for k, v in kstats.items() if k != "per_process"},
        "processes": [{**p, "name": snap.names.get(p.get("key", ""))} for p in kstats.get("per_process", [])],
        "mm": snap.mstats,
        "mm_error": snap.mm_error or None,
        "rates": rates(snap, prev),
    }
