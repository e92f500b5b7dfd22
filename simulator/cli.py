"""``mmsim sim``: run the deterministic simulator over many seeds, replay one seed with its trace, or check
that seeds replay exactly.

Exit status: 0 no violation, 1 a violation (the seed, the step and the last
trace lines are printed, with the command that replays it; the failing seed's
trace and the HTML view of its run are written to ``--out``), 2 bad options,
130 interrupted (what was done so far is printed, with the ``--start`` that
resumes the sweep).
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from typing import Any, Optional

import typer

from mmsim import options
from mmsim.options import SimArch
from simulator import FULL_EVERY

SIM_HELP = ("Deterministic simulation of the whole system (the kernel, the mm's own driver, the workload clients) "
            "in one process: simulated time and network, fault families switched on or off per seed (swarm "
            "testing: client deaths, mm crashes at every boundary and during recovery, the kernel lost at a step, "
            "after it carried out a call or as a recovery begins, lost replies, lost/duplicated/delayed/reordered "
            "messages, lying clients and a lying mm, kernel memory starvation), invariants I1-I13 checked after "
            "every step, then every fault stops and everything must be answered and settled. A seed replays "
            "exactly: `mmsim sim --seed N --trace FILE`. Exit 0 no violation, 1 a violation (its trace and HTML "
            "view are written to --out), 2 bad options, 130 interrupted.")

DEFAULT_SEEDS = 100


class SimMode(str, Enum):
    """How a seed mixes the fault families."""

    swarm = "swarm"
    fixed = "fixed"


def _usage(message: str) -> None:
    typer.echo(f"mmsim sim: {message}", err=True)
    raise typer.Exit(2)


def sim(
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help=f"How many seeds to run (START, START+1, ...; "
                                        f"default {DEFAULT_SEEDS})."),
    start: Optional[int] = typer.Option(None, "--start", min=0, help="The first seed of a sweep (default 0)."),
    steps: int = typer.Option(2000, "--steps", min=1, help="Simulated steps per seed before every fault stops (one "
                              "event each: a message delivered, an mm wake-up, a journal commit, a client's "
                              "request, a timeout, a tick)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Run this one seed only (exactly as a sweep "
                                       "would); not with --seeds or --start."),
    trace: Optional[str] = typer.Option(None, "--trace", help="With --seed: write every call (caller, arguments, "
                                        "reply) and fault as JSON lines to this file; the same seed writes the "
                                        "same bytes. A violation's HTML view goes beside it.",
                                        callback=options.file_callback("--trace")),
    out: str = typer.Option(".", "--out", help="Where a failing seed of a sweep writes its trace "
                            "(sim-SEED.jsonl) and the HTML view of its run (sim-SEED.view.html).",
                            callback=options.dir_callback("--out")),
    view: bool = typer.Option(True, "--view/--no-view", help="Write the trace and HTML view of a failing seed "
                              "(it is replayed with a recorder)."),
    bug: Optional[str] = typer.Option(None, "--bug", help="Plant a known bug (test-only subclasses inside the "
                                      "simulation) to show the simulator finds it; --list-bugs names them."),
    list_bugs: bool = typer.Option(False, "--list-bugs", help="List the plantable bugs and exit."),
    mode: SimMode = typer.Option(SimMode.swarm, "--mode", help="swarm: each seed switches each fault family on or "
                                 "off and draws its rates and workload mix; fixed: every family on at a low rate."),
    arch: SimArch = typer.Option(SimArch.any, "--arch", help="Architecture profile (any: the seed picks)."),
    memory: str = typer.Option("16MiB", "--memory", metavar="SIZE", help="Simulated RAM (small: the full checks "
                               "are O(frames)); 4MiB to 1GiB."),
    check_every: int = typer.Option(FULL_EVERY, "--check-every", min=0, help="Recompute the state checks (I1-I4, "
                                    "I7, I9, I13 on both views) from scratch every N steps (1: after every step), at "
                                    "every quiet point and at the end; 0: at quiet points and the end only. Between, "
                                    "an exact incremental check of what each step changed runs after every step "
                                    "(see simulator/checks.py). The per-call checks always run."),
    incremental: bool = typer.Option(True, "--incremental/--no-incremental", help="Run the exact incremental "
                                     "check after every step between full ones (--no-incremental: nothing "
                                     "between them, to measure what the checks cost)."),
    check_determinism: bool = typer.Option(False, "--check-determinism", help="Run each seed twice and compare "
                                           "the SHA-256 of the two traces (exit 1 if any differ)."),
    zombies: bool = typer.Option(False, "--zombies", help="Break the transport assumption (simulator/net.py): "
                                 "the mm gives up on the kernel and restarts sooner than the slowest message, so "
                                 "its old requests may still run later. Nothing fences them: expect violations."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (progress still goes "
                                  "to stderr)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; only the verdict."),
    replay: Optional[str] = typer.Option(None, "--replay", metavar="CAPSULE", help="Run a capsule (a failing seed "
                                         "shrunk by mmsim swarm shrink) instead of seeds; with --trace, its trace. "
                                         "Exit 1 when it fails (it should, with the fingerprint it records)."),
) -> None:
    from simulator import mutants

    if replay is not None:
        if seed is not None or seeds is not None or start is not None or bug is not None:
            _usage("--replay runs a capsule (it holds the seed and the options): not with --seed, --seeds, "
                   "--start or --bug")
        from simulator.swarm_cli import replay_capsule

        replay_capsule(replay, trace, json_out)
        return

    if list_bugs:
        for name, b in mutants.BUGS.items():
            typer.echo(f"{name:26} {b.description}")
        return
    if seed is not None and (seeds is not None or start is not None):
        _usage("--seed runs one seed: give either --seed, or --start and --seeds for a sweep")
    if trace is not None and seed is None:
        _usage("--trace needs --seed (a trace is of one run)")
    if bug is not None and bug not in mutants.BUGS:
        _usage(f"unknown --bug {bug!r}; choose one of {', '.join(mutants.BUGS)}")
    from kernel_server.bootmap import MiB

    try:
        mem = options.parse_size(memory)
    except ValueError as exc:
        _usage(f"--memory: {exc}")
    if mem % 4096 or not 4 * MiB <= mem <= 1024 * MiB:
        _usage(f"--memory must be a whole number of pages between 4MiB and 1GiB (got {memory})")
    arch_v, mode_v = options.value(arch), options.value(mode)
    kw: dict[str, Any] = dict(arch=None if arch_v == "any" else arch_v, memory=mem, check_every=check_every,
                              zombies=zombies, incremental=incremental, mode=mode_v)
    first = seed if seed is not None else (start or 0)
    count = 1 if seed is not None else (seeds or DEFAULT_SEEDS)
    again = _again(steps, arch_v, memory, bug, zombies, check_every, incremental, mode_v)
    if check_determinism:
        _determinism(range(first, first + count), steps, kw, bug, quiet, json_out, again)
        return
    from simulator.runner import Summary, replay_twice, run_seed

    if seed is not None:
        try:
            r = run_seed(seed, steps, bug=bug, trace_path=trace, **kw)
        except OSError as exc:
            _usage(f"cannot write the trace: {exc}")
        if not r.ok:
            replay_twice(r, steps, **kw)
        summary = Summary()
        summary.add(r)
        if r.violation is not None:
            summary.failed = r
    else:
        summary = _sweep(range(first, first + count), steps, kw, bug, quiet or json_out, again)
    files = _write_failure(summary, steps, kw, bug, out, trace, view)
    if json_out:
        doc = summary.to_json()
        doc["command"] = again
        doc["files"] = files
        typer.echo(json.dumps(doc, indent=1))
    elif not quiet:
        _table(summary, bug)
    _verdict(summary, steps, bug, again, files, json_out)


def _again(steps: int, arch: str, memory: str, bug: str | None, zombies: bool, check_every: int,
           incremental: bool, mode: str) -> str:
    """The options that reproduce a run (what follows ``mmsim sim``)."""
    out = f"--steps {steps}"
    if arch != "any":
        out += f" --arch {arch}"
    if memory != "16MiB":
        out += f" --memory {memory}"
    if mode != "swarm":
        out += f" --mode {mode}"
    if bug:
        out += f" --bug {bug}"
    if zombies:
        out += " --zombies"
    if check_every != FULL_EVERY:
        out += f" --check-every {check_every}"
    if not incremental:
        out += " --no-incremental"
    return out


def _progress(total: int) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]sim[/] seed {task.fields[seed]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[ops]} client ops"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


def _interrupted(done: int, first: int, count: int, again: str, what: str = "") -> None:
    left = count - done
    typer.echo(f"mmsim sim: interrupted after {done} of {count} seed(s) ({first}..{first + done - 1 if done else '-'}"
               f" done{what}, no violation); resume with: mmsim sim --start {first + done} --seeds {left} {again}",
               err=True)
    raise typer.Exit(130)


def _sweep(seed_range: range, steps: int, kw: dict[str, Any], bug: str | None, quiet: bool, again: str) -> Any:
    from simulator.runner import Summary, run_seeds

    done = [0]
    progress = None if quiet else _progress(len(seed_range))
    total = [0]

    def on_result(r: Any) -> None:
        done[0] += 1
        total[0] += r.ops
        if progress is not None:
            progress.update(task, advance=1, seed=r.seed + 1, ops=f"{total[0]:,}")

    try:
        if progress is None:
            return run_seeds(seed_range, steps, bug=bug, on_result=on_result, **kw)
        with progress:
            task = progress.add_task("seeds", total=len(seed_range), seed=seed_range.start, ops="0")
            return run_seeds(seed_range, steps, bug=bug, on_result=on_result, **kw)
    except KeyboardInterrupt:
        _interrupted(done[0], seed_range.start, len(seed_range), again)
    return Summary()  # (not reached)


def _determinism(seed_range: range, steps: int, kw: dict[str, Any], bug: str | None, quiet: bool, json_out: bool,
                 again: str) -> None:
    from simulator.runner import determinism

    done = [0]
    progress = None if quiet or json_out else _progress(len(seed_range))
    checked: list[dict[str, Any]] = []

    def on_result(seed: int, a: str, b: str) -> None:
        done[0] += 1
        checked.append({"seed": seed, "same": a == b, "sha256": a if a == b else [a, b]})
        if progress is not None:
            progress.update(task, advance=1, seed=seed + 1, ops="-")

    t0 = time.perf_counter()
    try:
        if progress is None:
            bad = determinism(seed_range, steps, on_result=on_result, bug=bug, **kw)
        else:
            with progress:
                task = progress.add_task("seeds", total=len(seed_range), seed=seed_range.start, ops="-")
                bad = determinism(seed_range, steps, on_result=on_result, bug=bug, **kw)
    except KeyboardInterrupt:
        _interrupted(done[0], seed_range.start, len(seed_range), again + " --check-determinism",
                     ", each run twice with the same trace")
    if json_out:
        typer.echo(json.dumps({"seeds": len(seed_range), "differ": [s for s, _, _ in bad], "checked": checked,
                               "command": again + " --check-determinism"}, indent=1))
    if bad:
        for s, a, b in bad:
            typer.echo(f"NOT DETERMINISTIC: seed {s} wrote two different traces (sha256 {a[:16]}... and {b[:16]}...); "
                       f"compare: mmsim sim --seed {s} {again} --trace A.jsonl (twice)")
        sys.stdout.flush()
        raise typer.Exit(1)
    if not json_out:
        typer.echo(f"deterministic: {len(seed_range)} seed(s) each wrote the same trace twice "
                   f"({time.perf_counter() - t0:.1f}s)")


def _write_failure(s: Any, steps: int, kw: dict[str, Any], bug: str | None, out: str, trace: str | None,
                   view: bool) -> dict[str, str]:
    """Replay the failing seed with a recorder: its trace and the HTML view of its run; the paths written."""
    r = s.failed
    if r is None or not view:
        return {}
    from simulator.runner import record_view

    if trace is not None:
        base = trace[:-6] if trace.endswith(".jsonl") else trace
        paths = {"trace": trace, "view": base + ".view.html"}
    else:
        options.make_dir(out, "--out")
        paths = {"trace": os.path.join(out, f"sim-{r.seed}.jsonl"), "view": os.path.join(out, f"sim-{r.seed}.view.html")}
    try:
        again = record_view(r.seed, paths["view"], steps, trace_path=paths["trace"], bug=bug, **kw)
    except OSError as exc:
        typer.echo(f"mmsim sim: could not write the failing seed's trace and view: {exc}", err=True)
        return {}
    if again.violation != r.violation:  # (a replay that differs is itself a finding)
        paths["note"] = "the replay with a recorder did not end with the same violation"
    return paths


def _table(s: Any, bug: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=f"mmsim sim{f' --bug {bug}' if bug else ''}", show_header=False)
    head.add_row("seeds", str(s.seeds))
    head.add_row("steps", f"{s.steps:,}")
    head.add_row("client operations", f"{s.ops:,} ({s.ops / max(s.cpu_seconds, 1e-9):,.0f} per CPU second)")
    head.add_row("quiet points (I8 checked)", f"{s.quiet_points:,}")
    head.add_row("liveness (steps to settle, most)", f"{s.liveness_steps:,}")
    head.add_row("simulated time", f"{s.sim_seconds:.2f} s")
    head.add_row("CPU time", f"{s.cpu_seconds:.2f} s")
    head.add_row("architectures", ", ".join(f"{a} {n}" for a, n in sorted(s.archs.items())))
    head.add_row("fault families (seeds on)", ", ".join(f"{a} {n}" for a, n in sorted(s.families.items())))
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


def _verdict(s: Any, steps: int, bug: str | None, again: str, files: dict[str, str], json_out: bool) -> None:
    from simulator.runner import confirmed

    r = s.failed
    if r is None:
        if not json_out:
            what = f"planted bug {bug!r} NOT found" if bug else "no violation"
            typer.echo(f"{what} in {s.seeds} seed(s) x {steps} steps ({s.ops:,} client operations)")
        return
    if not json_out:
        v = r.violation
        typer.echo(f"VIOLATION of {v.invariant} at seed {r.seed}, step {v.step} (t={v.t / 1000:.3f}ms simulated):")
        typer.echo(f"  {v.message}")
        typer.echo("last trace lines:")
        for line in r.tail:
            typer.echo(f"  {line}")
        det = confirmed(r)
        if det is not None:
            typer.echo("replayed twice: " + (f"the same trace both times (sha256 {r.replays[0][:16]}...)" if det else
                                            "the replays DIFFER (the run is not deterministic)"))
        if files.get("view"):
            typer.echo(f"trace: {files['trace']}")
            typer.echo(f"view of the run: {files['view']}" + (f" ({files['note']})" if files.get("note") else ""))
        typer.echo(f"replay it: mmsim sim --seed {r.seed} {again} --trace {files.get('trace') or f'sim-{r.seed}.jsonl'}")
    sys.stdout.flush()
    raise typer.Exit(1)
