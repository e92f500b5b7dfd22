"""``mmsim swarm``: many seeds across cores or machines, a seed database, reports, merges and shrinking.

- ``mmsim swarm --seeds N [--workers K | --scheduler tcp://HOST:8786] --db DIR``: seeds START..START+N-1 in
  ranges of ``--batch`` on a local process pool (default) or a Dask cluster; failures fingerprinted into the
  seed database, the trace of each fingerprint's smallest seed stored. Exit 0 no failure, 1 failures, 2 bad
  options, 130 interrupted (the ranges finished are kept: the same command resumes).
- ``mmsim swarm report``: per configuration, seeds run and failed, fingerprints, probes never hit.
- ``mmsim swarm merge DIR...``: fold other seed databases in (a Kubernetes job's per-pod files).
- ``mmsim swarm range --index I``: one range in this process (a Kubernetes Indexed Job's pod: the index
  defaults to ``JOB_COMPLETION_INDEX``).
- ``mmsim swarm shrink --seed N``: a failing seed shrunk to a minimal capsule (``mmsim sim --replay FILE``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import typer

from mmsim import options
from mmsim.options import SimArch
from simulator import FULL_EVERY

SWARM_HELP = ("Swarm testing at scale: seeds run in ranges on a local process pool (one worker per core) or a Dask "
              "cluster (--scheduler, the mmsim[dask] extra), failures de-duplicated by fingerprint into a seed "
              "database (--db: per code version and configuration: seeds run, fingerprints with their first and "
              "smallest seed, the replay command and trace, coverage probes), shrinking a failing seed to a "
              "minimal replayable capsule. Exit 0 no failure, 1 failures found, 2 bad options, 130 interrupted "
              "(finished ranges are kept: run the same command again to resume).")
DEFAULT_DB = "./mmsim-swarm"
DEFAULT_SEEDS = 1000

swarm_app = typer.Typer(help=SWARM_HELP, no_args_is_help=True, invoke_without_command=True)


def _usage(message: str, cmd: str = "swarm") -> None:
    typer.echo(f"mmsim {cmd}: {message}", err=True)
    raise typer.Exit(2)


def _config(steps: int, mode: str, arch: Any, memory: str, bug: Optional[str], check_every: int, cmd: str) -> Any:
    from kernel_server.bootmap import MiB
    from simulator import mutants
    from simulator.faults import MODES
    from simulator.swarm import SwarmConfig

    if bug is not None and bug not in mutants.BUGS:
        _usage(f"unknown --bug {bug!r}; choose one of {', '.join(mutants.BUGS)}", cmd)
    if mode not in MODES:
        _usage(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}", cmd)
    try:
        mem = options.parse_size(memory)
    except ValueError as exc:
        _usage(f"--memory: {exc}", cmd)
    if mem % 4096 or not 4 * MiB <= mem <= 1024 * MiB:
        _usage(f"--memory must be a whole number of pages between 4MiB and 1GiB (got {memory})", cmd)
    a = options.value(arch)
    return SwarmConfig(steps=steps, mode=mode, arch=None if a == "any" else a, memory=mem, bug=bug,
                       check_every=check_every)


# the options every command that runs seeds takes
def _steps() -> Any:
    return typer.Option(2000, "--steps", min=1, help="Simulated steps per seed before every fault stops.")


def _mode() -> Any:
    return typer.Option("swarm", "--mode", help="swarm (each seed switches fault families on or off) or fixed.")


def _arch() -> Any:
    return typer.Option(SimArch.any, "--arch", help="Architecture profile (any: each seed picks).")


def _memory() -> Any:
    return typer.Option("16MiB", "--memory", metavar="SIZE", help="Simulated RAM, 4MiB to 1GiB.")


def _bug() -> Any:
    return typer.Option(None, "--bug", help="Plant a known bug (mmsim sim --list-bugs names them).")


def _check_every() -> Any:
    return typer.Option(FULL_EVERY, "--check-every", min=0, help="Full state checks every N steps (as mmsim sim).")


def _db() -> Any:
    return typer.Option(DEFAULT_DB, "--db", help=f"The seed database's directory (default {DEFAULT_DB}).",
                        callback=options.dir_callback("--db"))


def _json() -> Any:
    return typer.Option(False, "--json", help="Print the result as JSON on stdout (progress goes to stderr).")


# ---- mmsim swarm ----------------------------------------------------------------------------------------

@swarm_app.callback(invoke_without_command=True)
def swarm(
    ctx: typer.Context,
    seeds: int = typer.Option(DEFAULT_SEEDS, "--seeds", min=1, help="How many seeds (START, START+1, ...)."),
    start: int = typer.Option(0, "--start", min=0, help="The first seed."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, max=4096, help="Local worker processes "
                                          "(default: one per core); with --scheduler, ranges in flight per worker "
                                          "thread is what matters and this is ignored."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", envvar="DASK_SCHEDULER_ADDRESS",
                                            help="Run on this Dask scheduler (tcp://HOST:8786; also "
                                            "DASK_SCHEDULER_ADDRESS) instead of a local process pool."),
    batch: int = typer.Option(200, "--batch", min=1, max=1_000_000, help="Seeds per range (one task)."),
    steps: int = _steps(),
    mode: str = _mode(),
    arch: SimArch = _arch(),
    memory: str = _memory(),
    bug: Optional[str] = _bug(),
    check_every: int = _check_every(),
    db: str = _db(),
    traces: bool = typer.Option(True, "--traces/--no-traces", help="Store the trace of each fingerprint's "
                                "smallest failing seed (one replay each, after the swarm)."),
    json_out: bool = _json(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; only the verdict."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if scheduler is not None and not scheduler.strip():
        _usage("--scheduler is empty (give tcp://HOST:8786)")
    cfg = _config(steps, mode, arch, memory, bug, check_every, "swarm")
    from simulator import swarm as S
    from simulator.seeddb import SeedDB, code_version

    options.make_dir(db, "--db")
    code = code_version()
    store = SeedDB(db)
    cid = store.config(code, cfg)
    todo = S.ranges(start, seeds, batch, store.done_ranges(cid))
    skipped = seeds - sum(n for _, n in todo)
    client = None
    if scheduler is not None:
        try:
            client = S.dask_client(scheduler)
        except RuntimeError as exc:
            _usage(str(exc))
        except (OSError, TimeoutError) as exc:
            typer.echo(f"mmsim swarm: cannot reach the Dask scheduler at {scheduler}: {exc}", err=True)
            raise typer.Exit(3)
        executor = S.dask_executor(client)
        width = S.dask_workers(client)
        where = f"Dask scheduler {scheduler} ({width} worker thread(s))"
    else:
        width = workers or os.cpu_count() or 1
        pin = S.pinned_hash_seed()
        pin.__enter__()
        executor = S.local_executor(width)
        where = f"local process pool ({width} worker(s))"
    prog = S.Progress(total=seeds, skipped=skipped)
    t0 = time.perf_counter()
    bar = None if quiet or json_out else _progress_bar()
    task = None

    def on_range(r: Any) -> None:
        store.add_range(cid, r)
        prog.done += r.done
        prog.failed += r.failed
        prog.ops += r.ops
        prog.ranges_done += 1
        prog.fingerprints.update(f["fingerprint"]["id"] for f in r.failures)
        if bar is not None:
            bar.update(task, advance=r.done, failed=prog.failed, fps=len(prog.fingerprints))

    interrupted = False
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("seeds", total=seeds - skipped, failed=0, fps=0)
        for _ in S.run_swarm(cfg, todo, executor, in_flight=2 * width, on_range=on_range):
            pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.stop()
        _shutdown(executor, client, interrupted)
        if scheduler is None:
            pin.__exit__()
    seconds = time.perf_counter() - t0
    if interrupted:
        store.close()
        typer.echo(f"mmsim swarm: interrupted after {prog.done} of {seeds - skipped} seed(s) ({prog.ranges_done} "
                   f"range(s) of {len(todo)} recorded in {db}, {prog.failed} failing); resume: run the same command "
                   "again (recorded ranges are skipped)", err=True)
        raise typer.Exit(130)
    if traces:
        _store_traces(store, cid, cfg, quiet or json_out)
    report = [c for c in store.report(_declared()) if c["config_id"] == cid][0]
    store.close()
    doc = {"code": code, "config_id": cid, "config": cfg.to_json(), "executor": where, "db": db,
           "seeds": seeds, "start": start, "skipped": skipped, "run": prog.done, "failed": prog.failed,
           "ranges": len(todo), "seconds": round(seconds, 2),
           "seeds_per_second": round(prog.done / seconds, 1) if seconds > 0 else None,
           "fingerprints_this_run": sorted(prog.fingerprints), "database": report}
    if json_out:
        typer.echo(json.dumps(doc, indent=1))
    elif not quiet:
        _print_report([report])
    if not json_out:
        typer.echo(f"{prog.done} seed(s) run ({skipped} already in {db}) on {where} in {seconds:.1f}s "
                   f"({doc['seeds_per_second']} seeds/s): "
                   + (f"{prog.failed} failing, {len(prog.fingerprints)} fingerprint(s)" if prog.failed
                      else "no failure"))
    sys.stdout.flush()
    if prog.failed:
        raise typer.Exit(1)


def _declared() -> dict[str, str]:
    from simulator.probes import PROBES

    return PROBES


def _progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]swarm[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[failed]} failing, {task.fields[fps]} fingerprint(s)"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def _shutdown(executor: Any, client: Any, now: bool) -> None:
    """Stop the executor; when interrupted, also the local workers still running a range (by their pids: the
    processes this command started)."""
    procs = list(getattr(executor, "_processes", {}).values()) if now else []
    try:
        executor.shutdown(wait=not now, cancel_futures=True)
    except TypeError:  # an executor without cancel_futures
        executor.shutdown(wait=not now)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
    if client is not None:
        client.close()


def _store_traces(store: Any, cid: str, cfg: Any, quiet: bool) -> None:
    """Replay each fingerprint's smallest failing seed with a trace and keep it in the database."""
    import io

    from simulator.swarm import drive
    from simulator.world import World

    for fp, seed in store.traces_wanted(cid):
        buf = io.StringIO()
        w = World(seed, cfg.steps, trace=buf, **cfg.world_kw())
        drive(w)
        store.set_trace(cid, fp, seed, buf.getvalue())
        if not quiet:
            typer.echo(f"trace of seed {seed} (fingerprint {fp}) stored", err=True)


def _print_report(configs: list[dict[str, Any]], probes: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for c in configs:
        cfg = c["config"]
        head = Table(title=f"configuration {c['config_id']}", show_header=False, title_justify="left")
        head.add_row("code", c["code"])
        head.add_row("options", " ".join(f"{k}={v}" for k, v in cfg.items() if v is not None))
        head.add_row("seeds run", f"{c['seeds']:,} in {c['ranges']:,} range(s), {c['steps']:,} steps, "
                                  f"{c['client_ops']:,} client operations, {c['cpu_seconds']:,.0f} CPU s")
        head.add_row("seeds failing", f"{c['failed']:,} ({len(c['fingerprints'])} fingerprint(s))")
        console.print(head)
        if c["fingerprints"]:
            t = Table(title="fingerprints", title_justify="left")
            for col in ("fingerprint", "invariant", "site", "seeds", "first", "smallest", "replay"):
                t.add_column(col, overflow="fold")
            for f in c["fingerprints"]:
                t.add_row(f["fingerprint"], f["invariant"], f["site"], str(f["count"]), str(f["first_seed"]),
                          str(f["smallest_seed"]), f["replay"])
            console.print(t)
            for f in c["fingerprints"]:
                console.print(f"  {f['fingerprint']}: {f['message']}", highlight=False, markup=False)
        if probes and "probes_never_hit" in c:
            never = c["probes_never_hit"]
            console.print(f"probes hit: {len(c['probes']) - len(c.get('probes_undeclared', []))} of "
                          f"{len(never) + len(c['probes']) - len(c.get('probes_undeclared', []))}; never hit "
                          f"({len(never)}): " + (", ".join(never) if never else "none"), highlight=False)
            if c.get("probes_undeclared"):
                console.print("hit but not declared (simulator/probes.py): " + ", ".join(c["probes_undeclared"]),
                              highlight=False)


# ---- mmsim swarm report / merge / range / shrink --------------------------------------------------------

@swarm_app.command("report")
def report_cmd(
    db: str = _db(),
    json_out: bool = _json(),
) -> None:
    """What a seed database holds: per configuration, seeds run and failed, each fingerprint (seeds, first and
    smallest seed, replay command), probes never hit."""
    from simulator.seeddb import FILE, SeedDB

    if not os.path.exists(os.path.join(db, FILE)):
        _usage(f"--db: {db} has no seed database (run mmsim swarm --db {db} first)", "swarm report")
    with SeedDB(db) as store:
        configs = store.report(_declared())
    if json_out:
        typer.echo(json.dumps({"db": db, "configs": configs}, indent=1))
        return
    if not configs:
        typer.echo(f"{db}: no swarm recorded yet")
        return
    _print_report(configs)


@swarm_app.command("merge")
def merge_cmd(
    sources: Optional[list[str]] = typer.Argument(None, help="Seed databases to fold in (directories or "
                                                  "seeds.sqlite files), e.g. the per-pod ones of a job."),
    db: str = _db(),
    json_out: bool = _json(),
) -> None:
    """Fold other seed databases into --db: ranges it has not recorded (with their probes and failing seeds),
    fingerprints, and traces of smaller seeds. Merging the same file twice adds nothing."""
    from simulator.seeddb import SeedDB

    if not sources:
        _usage("give the seed databases to merge (directories or seeds.sqlite files)", "swarm merge")
    for src in sources:
        if os.path.abspath(src) in (os.path.abspath(db), os.path.abspath(os.path.join(db, "seeds.sqlite"))):
            _usage(f"{src} is the database merged into", "swarm merge")
        if not os.path.exists(src):
            _usage(f"{src} does not exist", "swarm merge")
    options.make_dir(db, "--db")
    total: dict[str, int] = {"ranges": 0, "seeds": 0, "failing": 0}
    with SeedDB(db) as store:
        for src in sources:
            try:
                got = store.merge(src)
            except (FileNotFoundError, ValueError) as exc:
                _usage(str(exc), "swarm merge")
            except Exception as exc:  # noqa: BLE001 - sqlite3.DatabaseError: not a seed database
                _usage(f"{src} is not a seed database: {exc}", "swarm merge")
            for k in total:
                total[k] += got[k]
    if json_out:
        typer.echo(json.dumps({"db": db, "merged": total}))
    else:
        typer.echo(f"merged {len(sources)} database(s) into {db}: {total['ranges']} new range(s), "
                   f"{total['seeds']} seed(s), {total['failing']} failing")


@swarm_app.command("range")
def range_cmd(
    index: Optional[int] = typer.Option(None, "--index", min=0, envvar="JOB_COMPLETION_INDEX",
                                        help="Which range: seeds START + INDEX*SEEDS_PER_INDEX onwards (default: "
                                        "JOB_COMPLETION_INDEX, as a Kubernetes Indexed Job sets it)."),
    per_index: int = typer.Option(1000, "--seeds-per-index", min=1, help="Seeds per index."),
    start: int = typer.Option(0, "--start", min=0, help="The first seed of index 0."),
    workers: int = typer.Option(1, "--workers", min=1, max=4096, help="Local worker processes in this pod."),
    batch: int = typer.Option(200, "--batch", min=1, max=1_000_000, help="Seeds per task."),
    steps: int = _steps(),
    mode: str = _mode(),
    arch: SimArch = _arch(),
    memory: str = _memory(),
    bug: Optional[str] = _bug(),
    check_every: int = _check_every(),
    db: str = _db(),
    json_out: bool = _json(),
) -> None:
    """One index's seeds (a pod of a Kubernetes Indexed Job), recorded in --db (give each pod its own, e.g.
    /results/pod-$JOB_COMPLETION_INDEX, and fold them together with mmsim swarm merge). Exit 0 also when seeds
    fail: the database holds them."""
    cfg = _config(steps, mode, arch, memory, bug, check_every, "swarm range")
    if index is None:
        _usage("--index (or JOB_COMPLETION_INDEX) says which range to run", "swarm range")
    from simulator import swarm as S
    from simulator.seeddb import SeedDB, code_version

    options.make_dir(db, "--db")
    first = start + index * per_index
    with SeedDB(db) as store:
        cid = store.config(code_version(), cfg)
        todo = S.ranges(first, per_index, batch, store.done_ranges(cid))
        done = failed = 0
        if workers == 1:
            for s, n in todo:
                r = S.RangeResult.from_json(S.run_range(cfg.to_json(), s, n))
                store.add_range(cid, r)
                done, failed = done + r.done, failed + r.failed
        else:
            with S.pinned_hash_seed():
                ex = S.local_executor(workers)
                try:
                    for r in S.run_swarm(cfg, todo, ex, 2 * workers, lambda r: store.add_range(cid, r)):
                        done, failed = done + r.done, failed + r.failed
                finally:
                    ex.shutdown(cancel_futures=True)
        _store_traces(store, cid, cfg, True)
    doc = {"index": index, "first": first, "seeds": per_index, "run": done, "failed": failed, "db": db}
    typer.echo(json.dumps(doc) if json_out else
               f"index {index}: seeds {first}..{first + per_index - 1}: {done} run, {failed} failing -> {db}")


@swarm_app.command("shrink")
def shrink_cmd(
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="The failing seed to shrink."),
    fp: Optional[str] = typer.Option(None, "--fingerprint", help="Or: shrink the smallest failing seed of this "
                                     "fingerprint in --db (for this code and these options)."),
    steps: int = _steps(),
    mode: str = _mode(),
    arch: SimArch = _arch(),
    memory: str = _memory(),
    bug: Optional[str] = _bug(),
    check_every: int = _check_every(),
    db: str = _db(),
    out: str = typer.Option("capsule.json", "--out", help="Where the capsule is written.",
                            callback=options.file_callback("--out")),
    max_runs: int = typer.Option(3000, "--max-runs", min=1, help="Most candidate runs."),
    max_seconds: float = typer.Option(600.0, "--max-seconds", min=1.0, help="Most seconds spent."),
    json_out: bool = _json(),
) -> None:
    """Shrink a failing seed: record its client operations and faults, delta-debug them down to a minimal set
    that still fails with the same fingerprint, and write a capsule (replay it: mmsim sim --replay FILE).
    Exit 0 shrunk, 1 the seed does not fail, 2 bad options."""
    cfg = _config(steps, mode, arch, memory, bug, check_every, "swarm shrink")
    if (seed is None) == (fp is None):
        _usage("give either --seed or --fingerprint", "swarm shrink")
    from simulator import shrink as SH
    from simulator.seeddb import FILE, SeedDB, code_version

    cid = None
    if fp is not None:
        if not os.path.exists(os.path.join(db, FILE)):
            _usage(f"--db: {db} has no seed database", "swarm shrink")
        with SeedDB(db) as store:
            cid = store.config(code_version(), cfg)
            row = store.db.execute("SELECT MIN(seed) FROM failing WHERE config_id = ? AND fingerprint = ?",
                                   (cid, fp)).fetchone()
        if row is None or row[0] is None:
            _usage(f"--fingerprint: no failing seed with fingerprint {fp!r} for this code and these options in {db}",
                   "swarm shrink")
        seed = int(row[0])
    assert seed is not None
    say = (lambda s: None) if json_out else (lambda s: typer.echo(s, err=True))
    try:
        r = SH.shrink(seed, cfg, max_runs=max_runs, max_seconds=max_seconds, on_progress=say)
    except SH.NotFailing as exc:
        typer.echo(f"mmsim swarm shrink: {exc}", err=True)
        raise typer.Exit(1)
    SH.save(r.capsule, out)
    if cid is not None:
        with SeedDB(db) as store:
            store.set_capsule(cid, fp, r.capsule)
    doc = {**r.to_json(), "seed": seed, "capsule": out, "replay": f"mmsim sim --replay {out}"}
    if json_out:
        typer.echo(json.dumps(doc, indent=1))
    else:
        b, a = r.before, r.after
        typer.echo(f"seed {seed} ({r.fingerprint.invariant}, fingerprint {r.fingerprint.id}): {b['ops']} operations "
                   f"and {b['faults']} faults ({b['families']} message fault families) -> {a['ops']} operations "
                   f"(+{a['fillers']} fillers) and {a['faults']} faults ({a['families']} families), {r.runs} runs, "
                   f"{r.seconds:.1f}s{'' if r.complete else ' (budget spent: not minimal)'}")
        typer.echo(f"capsule: {out}; replay it: mmsim sim --replay {out}")


# ---- mmsim sim --replay ---------------------------------------------------------------------------------

def replay_capsule(path: str, trace: Optional[str], json_out: bool) -> None:
    """``mmsim sim --replay FILE``: run a capsule; exit 1 if it fails (it should: with its fingerprint)."""
    from simulator import shrink as SH

    try:
        capsule = SH.load(path)
    except ValueError as exc:
        _usage(f"--replay: {exc}", "sim")
    try:
        if trace is not None:
            with open(trace, "w", encoding="ascii", newline="\n") as sink:
                w, got = SH.run_capsule(capsule, trace=sink)
        else:
            w, got = SH.run_capsule(capsule)
    except OSError as exc:
        _usage(f"cannot write the trace: {exc}", "sim")
    except (KeyError, TypeError, ValueError) as exc:
        _usage(f"--replay: {path} is not a valid capsule: {exc}", "sim")
    want = capsule.get("fingerprint") or {}
    same = got is not None and got.id == want.get("id")
    doc = {"capsule": path, "seed": capsule["seed"], "steps": w.step, "sizes": SH.sizes(capsule),
           "fingerprint": got.to_json() if got else None, "expected": want or None, "same": same,
           "violation": ({"invariant": w.violations[0].invariant, "message": w.violations[0].message,
                          "step": w.violations[0].step} if w.violations else None)}
    if json_out:
        typer.echo(json.dumps(doc, indent=1))
    elif got is None:
        typer.echo(f"capsule {path}: no violation in {w.step} steps"
                   + (f" (it was recorded failing with {want.get('id')})" if want else ""))
    else:
        v = w.violations[0]
        s = doc["sizes"]
        typer.echo(f"VIOLATION of {v.invariant} at step {v.step} replaying capsule {path} (seed {capsule['seed']}, "
                   f"{s['ops']} operations, {s['faults']} faults):")
        typer.echo(f"  {v.message}")
        typer.echo(f"fingerprint {got.id} ({'the same as recorded' if same else 'NOT the one recorded: ' + str(want.get('id'))})")
        for line in w.trace.tail():
            typer.echo(f"  {line}")
    sys.stdout.flush()
    if got is not None:
        raise typer.Exit(1)
