"""``mmsim sim``: run the deterministic simulator over many seeds, or replay one seed with its trace.

Exit status: 0 no violation, 1 a violation (the seed, the step and the last
trace lines are printed, with the command that replays it), 2 bad options.
"""

from __future__ import annotations

import sys

import typer

from mmsim import options
from mmsim.options import SimArch
from simulator import FULL_EVERY

SIM_HELP = ("Deterministic simulation of the whole system (kernel, mm, clients) in one process: simulated time "
            "and network, faults chosen by the seed (client deaths, mm crashes at any effect boundary, lost/"
            "duplicated/delayed messages, mm-kernel partitions, lying clients and a lying mm, kernel memory "
            "starvation), invariants I1-I12 checked after every step. A seed replays exactly: "
            "`mmsim sim --seed N --trace FILE`. Exit 0 no violation, 1 a violation, 2 bad options.")

ARCH_CHOICES = ("any", "i686", "i686-pae", "x86_64")


def _usage(message: str) -> None:
    typer.echo(f"mmsim sim: {message}", err=True)
    raise typer.Exit(2)


def sim(
    seeds: int = typer.Option(100, "--seeds", help="How many seeds to run (START, START+1, ...)."),
    start: int = typer.Option(0, "--start", help="The first seed of a sweep."),
    steps: int = typer.Option(2000, "--steps", help="Simulated steps per seed (one event each: a message "
                              "delivered, an mm effect, a client's request, a timeout, a tick)."),
    seed: int | None = typer.Option(None, "--seed", help="Run this one seed only (exactly as a sweep would)."),
    trace: str | None = typer.Option(None, "--trace", help="With --seed: write every call (caller, "
                                        "arguments, reply) and fault as JSON lines to this file; the same "
                                        "seed writes the same bytes.", callback=options.file_callback("--trace")),
    bug: str | None = typer.Option(None, "--bug", help="Plant a known bug (test-only subclasses inside the "
                                      "simulation) to show the simulator finds it; --list-bugs names them."),
    list_bugs: bool = typer.Option(False, "--list-bugs", help="List the plantable bugs and exit."),
    arch: SimArch = typer.Option(SimArch.any, "--arch", help="Architecture profile (any: the seed picks)."),
    memory: str = typer.Option("16MiB", "--memory", metavar="SIZE", help="Simulated RAM (small: the full checks "
                               "are O(frames)); 4MiB to 1GiB."),
    check_every: int = typer.Option(FULL_EVERY, "--check-every", help="Recompute the state checks (I1-I4, I7, "
                                    "I9 on both views) from scratch every N steps (1: after every step), at every "
                                    "quiet point and at the end; 0: at quiet points and the end only. Between, "
                                    "an exact incremental check of what each step changed runs after every step "
                                    "(see simulator/checks.py). The per-call checks (I6, I9, I10, I11, I12, "
                                    "write-ahead) always run."),
    incremental: bool = typer.Option(True, "--incremental/--no-incremental", help="Run the exact incremental "
                                     "check after every step between full ones (--no-incremental: nothing "
                                     "between them, to measure what the checks cost)."),
    zombies: bool = typer.Option(False, "--zombies", help="Break the transport assumption (simulator/net.py): "
                                 "the mm gives up on the kernel and restarts sooner than the slowest message, so "
                                 "its old requests may still run later. Nothing fences them: expect violations."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; only the verdict."),
) -> None:
    from simulator import mutants

    if list_bugs:
        for name, b in mutants.BUGS.items():
            typer.echo(f"{name:26} {b.description}")
        return
    if seeds < 1:
        _usage("--seeds must be at least 1")
    if start < 0 or (seed is not None and seed < 0):
        _usage("seeds are non-negative integers")
    if steps < 1:
        _usage("--steps must be at least 1")
    if check_every < 0:
        _usage("--check-every must be 0 or more")
    if trace is not None and seed is None:
        _usage("--trace needs --seed (a trace is of one run)")
    arch = options.value(arch)
    if bug is not None and bug not in mutants.BUGS:
        _usage(f"unknown --bug {bug!r}; choose one of {', '.join(mutants.BUGS)}")
    from kernel_server.bootmap import MiB

    try:
        mem = options.parse_size(memory)
    except ValueError as exc:
        _usage(f"--memory: {exc}")
    if mem % 4096 or not 4 * MiB <= mem <= 1024 * MiB:
        _usage(f"--memory must be a whole number of pages between 4MiB and 1GiB (got {memory})")
    from simulator.runner import Summary, run_seed

    arch_arg = None if arch == "any" else arch
    if seed is not None:
        try:
            r = run_seed(seed, steps, arch_arg, mem, bug, check_every, trace, zombies, incremental)
        except OSError as exc:
            _usage(f"cannot write the trace: {exc}")
        summary = Summary()
        summary.add(r)
    else:
        summary = _sweep(range(start, start + seeds), steps, arch_arg, mem, bug, check_every, quiet, zombies,
                         incremental)
    if not quiet:
        _table(summary, bug)
    _verdict(summary, steps, arch, memory, bug, trace, zombies, check_every, incremental)


def _sweep(seed_range: range, steps: int, arch: str | None, mem: int, bug: str | None, check_every: int,
           quiet: bool, zombies: bool, incremental: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from simulator.runner import run_seeds

    if quiet:
        return run_seeds(seed_range, steps, arch, mem, bug, check_every, zombies=zombies, incremental=incremental)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]sim[/] seed {task.fields[seed]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[calls]} calls"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("seeds", total=len(seed_range), seed=seed_range.start, calls=0)
        total = [0]

        def on_result(r) -> None:
            total[0] += r.calls
            progress.update(task, advance=1, seed=r.seed + 1, calls=total[0])

        return run_seeds(seed_range, steps, arch, mem, bug, check_every, on_result, zombies, incremental)


def _table(s, bug: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=f"mmsim sim{f' --bug {bug}' if bug else ''}", show_header=False)
    head.add_row("seeds", str(s.seeds))
    head.add_row("steps", f"{s.steps:,}")
    head.add_row("calls", f"{s.calls:,}")
    head.add_row("quiet points (I8 checked)", f"{s.quiet_points:,}")
    head.add_row("simulated time", f"{s.sim_seconds:.2f} s")
    head.add_row("wall time", f"{s.wall_seconds:.2f} s ({s.calls / max(s.wall_seconds, 1e-9):,.0f} calls/s)")
    head.add_row("architectures", ", ".join(f"{a} {n}" for a, n in sorted(s.archs.items())))
    head.add_row("violations", "1" if s.failed else "0")
    console.print(head)
    faults = Table(title="faults by kind")
    faults.add_column("kind")
    faults.add_column("count", justify="right")
    for kind, n in sorted(s.faults.items()):
        faults.add_row(kind, f"{n:,}")
    console.print(faults)
    calls = Table(title="calls by kind and result")
    calls.add_column("to")
    calls.add_column("call")
    calls.add_column("results")
    rows: dict = {}
    for (target, call, outcome), n in s.stats.items():
        rows.setdefault((target, call), {})[outcome] = n
    for (target, call), outcomes in sorted(rows.items()):
        calls.add_row(target, call, ", ".join(f"{o} {n:,}" for o, n in sorted(outcomes.items(), key=lambda x: -x[1])))
    console.print(calls)


def _verdict(s, steps: int, arch: str, memory: str, bug: str | None, trace: str | None,
             zombies: bool, check_every: int = FULL_EVERY, incremental: bool = True) -> None:
    r = s.failed
    if r is None:
        what = f"planted bug {bug!r} NOT found" if bug else "no violation"
        typer.echo(f"{what} in {s.seeds} seed(s) x {steps} steps ({s.calls:,} calls)")
        return
    v = r.violation
    typer.echo(f"VIOLATION of {v.invariant} at seed {r.seed}, step {v.step} (t={v.t / 1000:.3f}ms simulated):")
    typer.echo(f"  {v.message}")
    typer.echo("last trace lines:")
    for line in r.tail:
        typer.echo(f"  {line}")
    again = f"mmsim sim --seed {r.seed} --steps {steps}"
    if arch != "any":
        again += f" --arch {arch}"
    if memory != "16MiB":
        again += f" --memory {memory}"
    if bug:
        again += f" --bug {bug}"
    if zombies:
        again += " --zombies"
    if check_every != FULL_EVERY:
        again += f" --check-every {check_every}"
    if not incremental:
        again += " --no-incremental"
    typer.echo(f"replay it: {again} --trace {trace or f'sim-{r.seed}.jsonl'}")
    sys.stdout.flush()
    raise typer.Exit(1)
