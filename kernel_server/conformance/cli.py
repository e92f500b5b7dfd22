"""The ``mmsim vectors`` commands (export, run) and ``mmsim check``."""

from __future__ import annotations

import json
import os
import shlex
from typing import Optional

import typer

from mmsim import options

DEFAULT_DIR = os.path.join("tests", "vectors")
VECTORS_HELP = ("Kernel test vectors: an executable specification of the kernel's calls (boot map, calls by role, "
                "expected replies and state digests), for any implementation of the design.")
vectors_app = typer.Typer(help=VECTORS_HELP, no_args_is_help=True)


def _progress(quiet: bool):
    from rich.console import Console

    console = Console(stderr=True)

    def step(text: str) -> None:
        if not quiet:
            console.print(f"[dim]{text}[/dim]", highlight=False)
    return step


@vectors_app.command("export")
def export_cmd(
    out_dir: str = typer.Argument(DEFAULT_DIR, metavar="[DIR]", help="Where to write the vectors (default: "
                                  "tests/vectors, the repository's copy).", callback=options.dir_callback("DIR")),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write the vectors: every call's rules (alone and in pairs), the design's scenarios and walks of the
    kernel's state machine, on every profile; schema.json and README.md. Needs a source checkout with the
    test extra installed (walks are drawn with hypothesis)."""
    from kernel_server.conformance.cases import CaseError
    from kernel_server.conformance.export import export
    from kernel_server.conformance.walks import WalkError

    try:
        s = export(out_dir, step=_progress(json_out))
    except WalkError as exc:
        typer.echo(f"mmsim vectors export: {exc}", err=True)
        raise typer.Exit(2) from None
    except CaseError as exc:  # a scenario that does not test what it says: a bug to fix before exporting
        typer.echo(f"mmsim vectors export: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(s, indent=2, sort_keys=True))
        return
    total = sum(s["bytes"].values())
    typer.echo(f"{s['tests']} tests in {s['groups']} groups ({s['steps']} steps), {total / 1e6:.2f} MB in {out_dir}")
    for name, n in sorted(s["bytes"].items()):
        typer.echo(f"  {name}: {n / 1e3:.0f} kB")
    left = s["left_out"]
    typer.echo(f"left out: {left['pairs_not_breaking_the_earlier_rule']} rule pairs whose combined request does "
               f"not break the earlier rule, {left['walk_steps_dropped']} walk steps whose reply depends on the "
               f"kernel's choice of frames ({left['walks_ended_early']} walks end early for that reason)")


@vectors_app.command("run")
def run_cmd(
    path: str = typer.Argument(DEFAULT_DIR, metavar="[DIR]", help="A vectors directory or one vectors file "
                               "(default: tests/vectors)."),
    kernel: Optional[str] = typer.Option(None, "--kernel", metavar="ENDPOINT", help="A running kernel (ipc://... or "
                                         "tcp://...): runs the tests whose boot map it booted from, resetting it "
                                         "by calls between tests. Start it with a long --lease.",
                                         callback=options.endpoint_callback("--kernel")),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="With --kernel: the run directory holding the "
                                          "kernel's public key and the mm's and operator's key pairs; client and "
                                          "stranger keys are made and admitted there.",
                                          callback=options.run_dir_callback()),
    spawn: bool = typer.Option(False, "--spawn", help="Start a kernel process per boot map (this project's, or "
                               "--kernel-cmd) and run the tests on it."),
    kernel_cmd: Optional[str] = typer.Option(None, "--kernel-cmd", metavar="COMMAND", help="With --spawn: the "
                                             "command that starts a kernel, with {boot_map}, {run_dir} and {bind} "
                                             "filled in (default: mmsim kernel --boot-map {boot_map} ...)."),
    in_process: bool = typer.Option(False, "--in-process", help="Against the model's core, in this process: a "
                                    "fresh kernel per test."),
    group: Optional[list[str]] = typer.Option(None, "--group", help="Only this group (repeatable): a call, a "
                                              "scenario, or walk."),
    profile: Optional[list[str]] = typer.Option(None, "--profile", help="Only this profile (repeatable)."),
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, help="Seconds to wait for each reply."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Replay the vectors and print a pass/fail table per group (exit 1 on any failure)."""
    from rich.console import Console

    from kernel_server.conformance import replay as rp

    modes = sum((kernel is not None, spawn, in_process))
    if modes != 1:
        raise typer.BadParameter("choose one of --kernel ENDPOINT, --spawn, --in-process")
    if kernel is not None and run_dir is None:
        raise typer.BadParameter("--kernel needs --run-dir (the kernel's keys)", param_hint="--run-dir")
    if kernel_cmd is not None and not spawn:
        raise typer.BadParameter("--kernel-cmd goes with --spawn", param_hint="--kernel-cmd")
    if not os.path.exists(path):
        raise typer.BadParameter(f"{path} does not exist", param_hint="DIR")
    try:
        tests = list(rp.iter_tests(rp.load(path), group, profile))
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="DIR") from None
    if not tests:
        raise typer.BadParameter("no test matches --group/--profile")
    step = _progress(json_out)
    try:
        if in_process:
            outcomes = rp.run_in_process(tests, step=step)
        elif spawn:
            cmd = shlex.split(kernel_cmd) if kernel_cmd else None
            outcomes = rp.run_spawned(tests, cmd, step=step, timeout=timeout)
        else:
            outcomes = rp.run_endpoint(tests, kernel, run_dir, step=step, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        typer.echo(f"mmsim vectors run: {exc}", err=True)
        raise typer.Exit(3) from None
    report = rp.summary(outcomes)
    if json_out:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=150)
        rp.render(report, console)
    if report["failed"]:
        raise typer.Exit(1)


CHECK_HELP = """Exhaustive small-scope checking of the kernel: every sequence of calls of a finite alphabet (every
call, representative frames, vaddr slots, prots, large pages) on a tiny machine, breadth-first, a state
already seen is not explored again, and every invariant is checked after every step (I1-I7, I9, I12,
I13, the page tables' accounting). The first violation found is at the shortest depth; it is printed
with its sequence of calls (--replay runs it again). An mm crash between any two calls is covered:
every sequence is explored (the kernel sees the mm only through atomic calls). --bug plants one bug
in the kernel core (the checker must find it). Exit status: 0 no violation, 1 a violation."""


def check(
    frames: int = typer.Option(8, "--frames", min=5, max=64, help="Frames of the tiny machine (one reserved, one "
                               "boot-image frame, the kernel pool, the rest user frames)."),
    procs: int = typer.Option(2, "--procs", min=1, max=3, help="Client processes the mm may create."),
    depth: int = typer.Option(4, "--depth", min=1, max=64, help="Calls per sequence, at most."),
    pool: int = typer.Option(2, "--pool", min=0, max=16, help="Free kernel frames at boot."),
    arch: str = typer.Option("tiny", "--arch", help="tiny (a two-level i686-like tree: 4 entries per table, "
                             "16 KiB large pages) or a real profile: i686, i686-pae, x86_64."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=0.1, help="Stop after this long (the depth "
                                            "reached is reported)."),
    bug: Optional[str] = typer.Option(None, "--bug", help="Plant a bug (see --list-bugs)."),
    list_bugs: bool = typer.Option(False, "--list-bugs", help="List the planted bugs and exit."),
    replay: Optional[str] = typer.Option(None, "--replay", metavar="I,J,...", help="Run this sequence of actions "
                                         "(as printed with a violation) step by step and check the end state."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    from rich.console import Console

    from kernel_server.conformance import explore as E
    from kernel_server.conformance.mutants import BUGS
    from kernel_server.invariants import check_kernel

    if list_bugs:
        for name, b in BUGS.items():
            typer.echo(f"{name}: {b.core.__doc__.strip()} ({b.breaks})")
        return
    if bug is not None and bug not in BUGS:
        raise typer.BadParameter(f"unknown bug {bug!r}; choose one of {', '.join(BUGS)}", param_hint="--bug")
    if arch not in ("tiny", "i686", "i686-pae", "x86_64"):
        raise typer.BadParameter(f"unknown architecture {arch!r}; choose tiny, i686, i686-pae or x86_64",
                                 param_hint="--arch")
    m = E.tiny_machine(frames, procs, pool, arch)
    try:
        m.bootmap()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--frames/--pool") from None
    ex = E.Explorer(m, BUGS[bug].core if bug else None)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    if replay is not None:
        try:
            path = [int(x) for x in replay.split(",") if x.strip()]
            if any(not 0 <= i < len(ex.actions) for i in path):
                raise ValueError
        except ValueError:
            raise typer.BadParameter(f"a comma-separated list of action numbers below {len(ex.actions)}",
                                     param_hint="--replay") from None
        svc, lines = ex.replay(path)
        for i, line in enumerate(lines):
            console.print(f"{i + 1}. {line}", highlight=False, markup=False)
        problems = check_kernel(svc.core) + [line for line in lines if "[I" in line]
        for p in problems:
            console.print(f"[red]violation[/red]: {p}", highlight=False)
        if problems:
            raise typer.Exit(1)
        console.print("[green]no violation[/green]")
        return
    step = _progress(json_out)
    res = ex.run(depth, seconds, progress=lambda d, s, t: step(f"depth {d}: {s} states, {t} transitions"))
    if json_out:
        typer.echo(json.dumps(res.to_json(), indent=2, sort_keys=True))
    else:
        E.render(res, ex, console)
    if res.violation is not None:
        raise typer.Exit(1)
