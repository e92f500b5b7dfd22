"""The ``mmsim bench`` commands: kernel, mm, isolation, largepages, hot, sim, swarm, check, all.

Each starts what it measures as real processes in a fresh run directory
(a temporary one unless ``--run-dir`` is given), shows progress on stderr,
and prints a table of figures (or JSON with ``--json``): each figure, the
floor it is compared with (measured in the same run), the ratio and the
target. Targets are the design's (docs/design.md); a MISS does not fail the command
unless ``--strict`` is given (machines are noisy; benchmarks report).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer

from mmsim import options
from mmsim.options import Transport

BENCH_HELP = ("Benchmarks: each figure is a ratio against a floor (a bare pyzmq CURVE echo with the "
              "servers' own socket loop, on the same transport, answering with replies of the same size) measured "
              "in the same run, with its spread over the rounds, its conditions, its target and PASS/MISS.")

bench_app = typer.Typer(help=BENCH_HELP, no_args_is_help=True)

_SECONDS = "Seconds per measurement (one side, one round); smaller is quicker and noisier."
_ROUNDS = ("Rounds: the floor and the measured server are timed in turn this many times; a figure is the "
           "median of the per-round ratios (their range is shown below it).")
_TRANSPORT = "Transport for every socket: ipc or tcp (loopback)."
_JSON = "Print the report as JSON on stdout (progress still goes to stderr)."
_RUN_DIR = "Run directory for keys, endpoints and logs (default: a temporary directory, removed afterwards)."
_RUN_DIR_CHECK = options.dir_callback()
_KEEP = "Keep the run directory (logs of every process) instead of removing it."
_STRICT = "Exit with status 1 when a figure misses its target."


def _check_transport(transport: Transport | str) -> str:
    return options.value(transport)


def _check_size(text: str, hint: str) -> str:
    """The size in bytes, as a plain number (every parser reads that the same way)."""
    try:
        n = options.parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    if n < options.PAGE:
        raise typer.BadParameter(f"{text!r} is less than one {options.PAGE}-byte page", param_hint=hint)
    return str(n)


@contextmanager
def _run_dir(given: Optional[str], keep: bool) -> Iterator[str]:
    """The run directory; a temporary one is removed afterwards unless ``keep``."""
    path = os.path.abspath(options.make_dir(given)) if given else tempfile.mkdtemp(prefix="mmsim-bench-")
    try:
        yield path
    finally:
        if keep or given:
            typer.echo(f"run directory: {path}", err=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _progress(total: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A step callback driving a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda s: None
        return
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=console.is_terminal) as prog:
        task = prog.add_task("starting", total=total)
        first = [True]

        def step(text: str) -> None:
            if not first[0]:
                prog.advance(task)
            first[0] = False
            prog.update(task, description=text)
            if not console.is_terminal:
                console.print(f"[dim]{text}[/dim]")

        yield step
        prog.update(task, completed=total)


def _emit(report, json_out: bool, strict: bool, title: str) -> None:
    from rich.console import Console

    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=150)
        report.render(console, title=title)
    if strict and any(f.passed is False for f in report.figures):
        raise typer.Exit(1)


def _fail(exc: Exception) -> None:
    typer.echo(f"benchmark failed: {exc}", err=True)
    raise typer.Exit(3)


# ---- the pieces ----------------------------------------------------------------------------

def _kernel(run_dir: str, step: Callable[[str], None], opts):
    from bench import kernel as kb

    return kb.run(opts, os.path.join(run_dir, "kernel-bench"), step)


def _mm(run_dir: str, step: Callable[[str], None], opts):
    from bench import mm as mb

    return mb.run(opts, os.path.join(run_dir, "mm-bench"), step)


def _isolation(run_dir: str, step: Callable[[str], None], opts):
    from bench import isolation as ib

    return ib.run(opts, os.path.join(run_dir, "isolation-bench"), step)


def _isolation_opts(seconds: float, rounds: int, transport: str, kinds: list[str] | None, nice: int,
                    kernel_worst: bool):
    from bench.isolation import IsolationBenchOptions

    opts = IsolationBenchOptions(seconds=seconds, rounds=rounds, transport=transport, nice=nice,
                                 kernel_worst=kernel_worst)
    if kinds:
        opts.classes = list(dict.fromkeys(kinds))
    try:
        opts.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kind") from None
    return opts


def _largepages(seed: int, steps: int, step: Callable[[str], None]):
    from bench.largepages import compare
    from bench.report import Figure, Report

    step(f"anti-fragmentation churn, {steps} requests, pageblock then first fit")
    r = compare(seed, steps)
    a, b = r["pageblock"], r["first_fit"]
    rep = Report()
    rep.add(Figure("largepages.ratio", "large pages allocatable after churn (pageblock)", a["large_pages"],
                   "pages", b["large_pages"], "pages", "first fit", r["ratio"], target="info (higher is better)",
                   note=f"seed {seed}, {steps} requests; {a['possible']} possible by free frames"))
    rep.details["largepages"] = r
    return rep


def _sim(seconds: float, step: Callable[[str], None], detect_seeds: int = 20, steps: int = 2000):
    """The simulator: client operations per CPU second under each way of checking (target: the design's
    20,000 with the default checks), and the seeds needed per finding of each planted bug with swarm
    testing against a fixed mix of every fault family at a low rate (information: fewer is better)."""
    from bench.report import Figure, Report
    from simulator import bench, mutants
    from simulator.runner import detection

    step(f"simulator: {seconds:g} s of CPU over four ways of checking")
    r = bench(seconds)
    rep = Report()
    target = 20_000
    labels = {
        "full_every_step": "full invariant recomputation after every step",
        "incremental_every_step_full_every_500_steps": "exact incremental checks every step, full every 500 (default)",
        "incremental_every_step_full_at_quiet_points": "exact incremental checks every step, full at quiet points",
        "none_between_quiet_points": "full checks at quiet points only (the loop's own cost)",
    }
    for label, words in labels.items():
        rate = r[f"ops_per_s_checks_{label}"]
        default = label.startswith("incremental_every_step_full_every")
        rep.add(Figure(f"sim.{label}", f"client operations per CPU second: {words}", rate, "ops/s", target, "ops/s",
                       "target", rate / target, ">=" if default else None, 1.0 if default else None,
                       f">= {target:,} client ops/s on one core" if default else "info (against the target)",
                       note=f"{r[f'seeds_checks_{label}']} seeds of {r['steps_per_seed']} steps; "
                            f"{r[f'steps_per_s_checks_{label}']:,} steps/s"))
    found: dict[str, dict] = {}
    if detect_seeds > 0:
        bugs = list(mutants.BUGS)
        step(f"simulator: seeds 0-{detect_seeds - 1} against each of {len(bugs)} planted bugs, swarm and fixed")
        found = detection(bugs, most=detect_seeds, steps=steps)
        worst = float(detect_seeds + 1)  # what a bug no seed found counts
        totals = {"swarm": 0.0, "fixed": 0.0}
        for bug, got in found.items():
            sw, fx = (got[m]["per_find"] or worst for m in ("swarm", "fixed"))
            totals["swarm"] += sw
            totals["fixed"] += fx
            rep.add(Figure(f"sim.detect.{bug}", f"seeds needed per finding of planted bug {bug}: swarm (against "
                           "the fixed mix)", sw, "seeds", fx, "seeds", "fixed mix", sw / fx, None, None,
                           "info (fewer is better)",
                           note=f"found by {got['swarm']['found']} (swarm) and {got['fixed']['found']} (fixed) of "
                                f"{detect_seeds} seeds; first at seed {got['swarm']['first'] or '-'} and "
                                f"{got['fixed']['first'] or '-'}"))
        rep.add(Figure("sim.detect.total", "seeds needed per finding, summed over every planted bug: swarm "
                       "(against the fixed mix)", totals["swarm"], "seeds", totals["fixed"], "seeds", "fixed mix",
                       totals["swarm"] / totals["fixed"], None, None, "info (fewer is better)",
                       note=f"a bug no seed found counts {detect_seeds + 1}; {steps} steps per seed"))
    rep.details["sim"] = {**r, "target_ops_per_s": target, "detection": found, "detect_seeds": detect_seeds}
    return rep


def _swarm(seeds: int, steps: int, batch: int, dask: bool, step: Callable[[str], None]):
    from bench import swarm as sb

    return sb.report(sb.measure(seeds, steps, batch, dask, step))


def _check(seconds: float, step: Callable[[str], None]):
    from bench.explore import figures

    step(f"mmsim check: breadth-first on the tiny machine for {seconds:g} s")
    return figures(seconds)


def _kernel_opts(seconds: float, rounds: int, transport: str, window: int, batch: int, scale: bool):
    from bench.kernel import KernelBenchOptions

    opts = KernelBenchOptions(seconds=seconds, rounds=rounds, window=window, transport=transport, batch=batch,
                              scale=scale)
    try:
        opts.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return opts


def _mm_opts(seconds: float, rounds: int, transport: str, storm: str, clients: int = 16):
    from bench.mm import MMBenchOptions

    opts = MMBenchOptions(seconds=seconds, rounds=rounds, transport=transport, storm=storm, clients=clients)
    try:
        opts.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--storm") from None
    return opts


# ---- commands ---------------------------------------------------------------------------------

@bench_app.command("kernel")
def kernel_cmd(
    seconds: float = typer.Option(0.5, "--seconds", min=0.01, help=_SECONDS),
    rounds: int = typer.Option(5, "--rounds", min=1, help=_ROUNDS),
    transport: Transport = typer.Option(Transport.ipc, "--transport", help=_TRANSPORT),
    window: int = typer.Option(16, "--window", min=2, max=1024, help="Requests in flight when pipelined."),
    batch: int = typer.Option(4096, "--batch", min=1, max=1 << 16, help="Frames in the batch run "
                              "(donate/reclaim/map/unmap)."),
    scale: bool = typer.Option(True, "--scale/--no-scale", help="Also boot a 16 Mi-frame (64 GiB i686-pae) "
                               "and a 1 Ki-frame kernel and compare their rates."),
    profile: bool = typer.Option(False, "--profile", help="Also time KernelService.handle in-process, stage by "
                                 "stage, and print cProfile's top functions (no sockets)."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help=_RUN_DIR, callback=_RUN_DIR_CHECK),
    keep: bool = typer.Option(False, "--keep", help=_KEEP),
    strict: bool = typer.Option(False, "--strict", help=_STRICT),
) -> None:
    """Kernel map/unmap against the floor (one at a time and pipelined; server CPU per call; with page-table
    churn), ping and hello, 4096-frame batches, the worst requests, scale with RAM."""
    from bench.roundtrip import BenchError

    transport = _check_transport(transport)
    opts = _kernel_opts(seconds, rounds, transport, window, batch, scale)
    with _run_dir(run_dir, keep) as rd:
        try:
            with _progress(opts.steps() + (1 if profile else 0)) as step:
                rep = _kernel(rd, step, opts)
                if profile:
                    step("profiling KernelService.handle in-process")
                    _add_profile(rep)
        except (BenchError, RuntimeError, OSError) as exc:
            _fail(exc)
    if profile and not json_out:
        _print_profile(rep.details["profile"])
    _emit(rep, json_out, strict, "mmsim bench kernel")


def _add_profile(rep) -> None:
    from bench.kernel import profile_handle

    rep.details["profile"] = profile_handle(cprofile=True)


def _print_profile(p: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    t = Table(title=f"KernelService.handle in-process: {p['handle_us_per_call']} us per map/unmap call "
              f"(the floor's handler: {p.get('floor_handler_us_per_call', '-')} us)", title_justify="left")
    t.add_column("stage")
    t.add_column("us/call", justify="right")
    for k, v in p["stages_us_per_call"].items():
        t.add_row(k, f"{v:.2f}")
    console.print(t)
    typer.echo(p.get("cprofile", ""))


@bench_app.command("mm")
def mm_cmd(
    seconds: float = typer.Option(0.5, "--seconds", min=0.01, help=_SECONDS),
    rounds: int = typer.Option(5, "--rounds", min=1, help=_ROUNDS),
    transport: Transport = typer.Option(Transport.ipc, "--transport", help=_TRANSPORT),
    storm: str = typer.Option("64MiB", "--storm", help="Memory one client allocates in 4 KiB pages for the "
                              "donation storm, e.g. 64MiB or 1GiB (1 GiB takes minutes)."),
    clients: int = typer.Option(16, "--clients", min=1, max=256, help="Clients in flight at once (one request "
                                "each) for the many-clients figures."),
    profile: bool = typer.Option(False, "--profile", help="Also time the mm's driver and journal in-process "
                                 "(no sockets, an in-process kernel) and print cProfile's top functions."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help=_RUN_DIR, callback=_RUN_DIR_CHECK),
    keep: bool = typer.Option(False, "--keep", help=_KEEP),
    strict: bool = typer.Option(False, "--strict", help=_STRICT),
) -> None:
    """Client alloc+free of one page through the mm against the floor (many clients in flight and one at a
    time), the mm's CPU per call and where it goes, and a donation storm."""
    from bench.roundtrip import BenchError

    transport = _check_transport(transport)
    storm = _check_size(storm, "--storm")
    opts = _mm_opts(seconds, rounds, transport, storm, clients)
    with _run_dir(run_dir, keep) as rd:
        try:
            with _progress(opts.steps() + (2 if profile else 0)) as step:
                rep = _mm(rd, step, opts)
                if profile:
                    from bench.mm import profile_driver

                    step(f"timing the mm's driver and journal in-process, {clients} clients and one")
                    rep.details["profile"] = {"many": profile_driver(clients), "one": profile_driver(1)}
                    step(f"the same under cProfile, {clients} clients")
                    rep.details["profile"]["cprofile"] = profile_driver(clients, 4000, cprofile=True)["cprofile"]
        except (BenchError, RuntimeError, OSError) as exc:
            _fail(exc)
    _emit(rep, json_out, strict, "mmsim bench mm")
    if not json_out:
        _print_mm_stages(rep.details["mm"]["stages"], rep.details.get("profile"))


def _print_mm_stages(stages: dict, profile: Optional[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    loads = list(stages)
    t = Table(title="Where the mm's CPU goes (us per call; main thread by stage, counted in one pass of each load)",
              title_justify="left")
    t.add_column("")
    for load in loads:
        t.add_column(load, justify="right")
    for stage in next(iter(stages.values()))["main_thread_us"]:
        t.add_row(f"main thread: {stage}", *(f"{stages[x]['main_thread_us'][stage]:.1f}" for x in loads))
    for kind, name in (("main", "main thread, all"), ("zmq_io", "ZeroMQ I/O thread"), ("other", "other threads")):
        t.add_row(name, *(f"{stages[x]['threads_us'][kind]:.1f}" for x in loads))
    t.add_row("calls per wake-up", *(f"{stages[x]['calls_per_wakeup']:.2f}" for x in loads))
    t.add_row("calls per journal batch", *(f"{stages[x]['calls_per_journal_batch']:.2f}" for x in loads))
    console.print(t)
    if profile:
        for p in (profile["many"], profile["one"]):
            u = p["us_per_call"]
            typer.echo(f"in-process, {p['clients']} client(s), no sockets (an in-process kernel): driver {u['driver']:.1f} "
                       f"us, journal {u['journal']:.1f} us per call ({p['calls_per_wakeup']} calls per wake-up, "
                       f"{p['records_per_batch']} records per batch)")
        typer.echo(profile["cprofile"])


@bench_app.command("isolation")
def isolation_cmd(
    seconds: float = typer.Option(0.5, "--seconds", min=0.05, help="Seconds of one slice: the honest client alone, "
                                  "then beside the attack, this long each."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Slices of each attack (each after one alone); the "
                               "figure is the median of the rounds' ratios."),
    transport: Transport = typer.Option(Transport.ipc, "--transport", help=_TRANSPORT),
    kind: Optional[list[str]] = typer.Option(None, "--kind", help="A resource attack to run (repeatable; default: "
                                             "all of them, see `mmsim client attack --list`)."),
    nice: int = typer.Option(10, "--nice", min=0, max=19, help="Lower the attacker's CPU priority by this much "
                             "(this process's, for good): its own work would otherwise count against the servers."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help=_RUN_DIR, callback=_RUN_DIR_CHECK),
    keep: bool = typer.Option(False, "--keep", help=_KEEP),
    strict: bool = typer.Option(False, "--strict", help=_STRICT),
) -> None:
    """An honest client's rate beside each resource attack at full speed over its rate alone (target 0.5, no
    error), and the mm's and the kernel's worst requests over an ordinary call."""
    from bench.roundtrip import BenchError

    transport = _check_transport(transport)
    opts = _isolation_opts(seconds, rounds, transport, kind, nice, True)
    with _run_dir(run_dir, keep) as rd:
        try:
            with _progress(opts.steps()) as step:
                rep = _isolation(rd, step, opts)
        except (BenchError, RuntimeError, OSError) as exc:
            _fail(exc)
    _emit(rep, json_out, strict, "mmsim bench isolation")


@bench_app.command("largepages")
def largepages_cmd(
    seed: int = typer.Option(1, "--seed", help="Seed of the churn workload (both policies see the same requests)."),
    steps: int = typer.Option(6000, "--steps", min=10, help="Client requests in the churn."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
) -> None:
    """Large pages still allocatable after a seeded churn: the mm's pageblock placement against first fit."""
    with _progress(1) as step:
        rep = _largepages(seed, steps, step)
    _emit(rep, json_out, False, "mmsim bench largepages")


@bench_app.command("hot")
def hot_cmd(
    calls: int = typer.Option(4000, "--calls", min=100, help="Calls per pass."),
    passes: int = typer.Option(5, "--passes", min=1, help="Passes per part (the best is the figure: the least "
                               "disturbed)."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
) -> None:
    """The in-process hot paths, no sockets: the mm's Driver.handle per alloc or free (one client, 16 clients,
    with an observer) and the kernel's KernelService.handle per map or unmap of the mm (with and without an
    observer), in microseconds of CPU per call."""
    from bench import hot

    with _progress(len(hot.PARTS)) as step:
        rep = hot.report(hot.measure(calls, passes, step=step))
    _emit(rep, json_out, False, "mmsim bench hot")


@bench_app.command("sim")
def sim_cmd(
    seconds: float = typer.Option(8.0, "--seconds", min=0.5, help="CPU seconds in all (a quarter per way of checking)."),
    detect_seeds: int = typer.Option(20, "--detect-seeds", min=0, help="Seeds run against each planted bug, with "
                                     "swarm testing and with the fixed mix, to count how many find it (0: skip)."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
    strict: bool = typer.Option(False, "--strict", help=_STRICT),
) -> None:
    """Client operations per CPU second in one process (target 20,000 on one core), per way of checking
    invariants; seeds needed to find each planted bug, swarm testing against a fixed mix."""
    with _progress(2) as step:
        try:
            rep = _sim(seconds, step, detect_seeds)
        except RuntimeError as exc:  # a seed violated an invariant: that is a bug, not a figure
            _fail(exc)
    _emit(rep, json_out, strict, "mmsim bench sim")


@bench_app.command("swarm")
def swarm_cmd(
    seeds: int = typer.Option(192, "--seeds", min=1, help="Seeds each executor runs (the same seeds each time)."),
    steps: int = typer.Option(600, "--steps", min=1, help="Steps per seed."),
    batch: int = typer.Option(16, "--batch", min=1, help="Seeds per range (one task)."),
    dask: bool = typer.Option(True, "--dask/--no-dask", help="Also run them on a Dask LocalCluster (the "
                              "mmsim[dask] extra)."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
    strict: bool = typer.Option(False, "--strict", help=_STRICT),
) -> None:
    """mmsim swarm's throughput: seeds per second with 1, 2 and all cores on the local process pool (against
    linear scaling), and a Dask LocalCluster against the pool (its overhead per range)."""
    with _progress(4) as step:
        try:
            rep = _swarm(seeds, steps, batch, dask, step)
        except (RuntimeError, OSError) as exc:
            _fail(exc)
    _emit(rep, json_out, strict, "mmsim bench swarm")


@bench_app.command("check")
def check_cmd(
    seconds: float = typer.Option(60.0, "--seconds", min=0.5, help="How long the search runs."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
) -> None:
    """How far mmsim check gets on its tiny machine: states per second and the depth reached (no target)."""
    with _progress(1) as step:
        try:
            rep = _check(seconds, step)
        except RuntimeError as exc:  # a violation is a bug, not a figure
            _fail(exc)
    _emit(rep, json_out, False, "mmsim bench check")


@bench_app.command("all")
def all_cmd(
    seconds: float = typer.Option(0.5, "--seconds", min=0.01, help=_SECONDS),
    rounds: int = typer.Option(5, "--rounds", min=1, help=_ROUNDS),
    transport: Transport = typer.Option(Transport.ipc, "--transport", help=_TRANSPORT),
    window: int = typer.Option(16, "--window", min=2, max=1024, help="Requests in flight when pipelined."),
    storm: str = typer.Option("64MiB", "--storm", help="Memory the donation-storm client allocates in 4 KiB pages."),
    steps: int = typer.Option(6000, "--steps", min=10, help="Client requests in the large-page churn."),
    seed: int = typer.Option(1, "--seed", help="Seed of the large-page churn."),
    quick: bool = typer.Option(False, "--quick", help="About a minute: --seconds 0.3 --rounds 2 --storm 8MiB "
                               "--steps 1500, 5 s of mmsim check (noisier)."),
    json_out: bool = typer.Option(False, "--json", help=_JSON),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help=_RUN_DIR, callback=_RUN_DIR_CHECK),
    keep: bool = typer.Option(False, "--keep", help=_KEEP),
    strict: bool = typer.Option(False, "--strict", help=_STRICT),
) -> None:
    """Every benchmark (kernel, mm, largepages, hot, sim, swarm, check, isolation) in one report: about four minutes
    by default."""
    from bench import hot
    from bench.report import Report
    from bench.roundtrip import BenchError

    if quick:
        seconds, rounds, storm, steps = 0.3, 2, "8MiB", 1500
    transport = _check_transport(transport)
    storm = _check_size(storm, "--storm")
    kopts = _kernel_opts(seconds, rounds, transport, window, 4096, True)
    mopts = _mm_opts(seconds, rounds, transport, storm)
    iopts = _isolation_opts(seconds, min(rounds, 3), transport, None, 10, False)  # (the kernel bench has its worst)
    rep = Report()
    with _run_dir(run_dir, keep) as rd:
        try:
            with _progress(kopts.steps() + mopts.steps() + 7 + len(hot.PARTS) + iopts.steps()) as step:
                rep.extend(_kernel(rd, step, kopts))
                rep.extend(_mm(rd, step, mopts))
                rep.extend(_largepages(seed, steps, step))
                rep.extend(hot.report(hot.measure(1000 if quick else 4000, 3 if quick else 5, step=step)))
                rep.extend(_sim(2.0 if quick else 8.0, step, 3 if quick else 10))
                rep.extend(_swarm(48 if quick else 192, 400 if quick else 600, 8 if quick else 16, True, step))
                rep.extend(_check(5.0 if quick else 60.0, step))
                rep.extend(_isolation(rd, step, iopts))  # last: it lowers this process's priority
        except (BenchError, RuntimeError, OSError) as exc:
            _fail(exc)
    _emit(rep, json_out, strict, "mmsim bench all")


def main() -> None:  # pragma: no cover - ``python -m bench.cli``
    bench_app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
